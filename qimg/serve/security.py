"""API keys and the request body limit, as one pure ASGI middleware (streaming responses pass untouched).

With keys set, every route needs `Authorization: Bearer <key>` (compared with `hmac.compare_digest`) except the
page itself (`/`, `/static/...`, `/favicon.ico`) and `/health`. Missing or wrong keys get HTTP 401 in OpenAI's
error shape. A body larger than its limit gets HTTP 413 (from Content-Length before reading, or while reading a
chunked body): multipart forms may carry the pictures (`Limits.max_form_bytes()`), every other body is JSON and
small (`Limits.max_json_bytes`), so a huge JSON body is refused before it is read or parsed.
"""

from __future__ import annotations

import hmac
import json

from qimg.serve.errors import ApiError, error_body

PUBLIC = ("/", "/health", "/favicon.ico")
PUBLIC_PREFIXES = ("/static/",)


def is_public(path: str) -> bool:
    return path in PUBLIC or path.startswith(PUBLIC_PREFIXES)


def key_matches(header: str | None, keys: tuple[str, ...]) -> bool:
    if not header:
        return False
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    token_b = token.strip().encode("latin-1")  # the header's bytes as sent (decoded as latin-1 by the server)
    ok = False
    for key in keys:  # compare with every key, so timing tells nothing about which one matched
        ok |= hmac.compare_digest(token_b, key.encode("utf-8"))
    return ok


class BodyTooLarge(ApiError):
    """Raised from `receive`, so the app's ApiError handler answers 413 (the middleware does if it cannot)."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than {limit:,} bytes", code="request_too_large")


async def _send_error(send, status: int, message: str, type: str, code: str, extra_headers=()) -> None:
    body = json.dumps(error_body(message, type, None, code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *extra_headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    def __init__(self, app, *, api_keys: tuple[str, ...], max_form_bytes: int, max_json_bytes: int):
        self.app, self.api_keys = app, tuple(api_keys)
        self.max_form_bytes, self.max_json_bytes = max_form_bytes, max_json_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_keys and not is_public(scope.get("path", "")) and scope.get("method") != "OPTIONS":
            if not key_matches(headers.get("authorization"), self.api_keys):
                missing = "authorization" not in headers
                message = ("this server needs an API key: send 'Authorization: Bearer <key>'" if missing
                           else "the API key is not valid")
                return await _send_error(send, 401, message, "authentication_error",
                                         "missing_api_key" if missing else "invalid_api_key",
                                         [(b"www-authenticate", b"Bearer")])
        form = headers.get("content-type", "").lower().startswith("multipart/")
        limit = self.max_form_bytes if form else self.max_json_bytes
        kind = "a multipart body" if form else "a JSON body"
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _send_error(send, 413, f"the request body is {int(length):,} bytes; the limit for {kind} is "
                                                f"{limit:,}", "invalid_request_error", "request_too_large")
        seen = 0
        started = exceeded = replaced = False

        async def limited_receive():
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    exceeded = True
                    raise BodyTooLarge(limit)
            return message

        async def guarded_send(message):
            # Whatever the app answers after the limit was hit (frameworks may wrap the error as a parse
            # error), the client gets the 413.
            nonlocal started, replaced
            if message["type"] == "http.response.start":
                started = True
                if exceeded:
                    replaced = True
                    await _send_error(send, 413, f"the request body is larger than {limit:,} bytes",
                                      "invalid_request_error", "request_too_large")
                    return
            elif replaced:
                return
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyTooLarge:
            if not started:
                await _send_error(send, 413, f"the request body is larger than {limit:,} bytes",
                                  "invalid_request_error", "request_too_large")
