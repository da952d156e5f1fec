"""The generated cases for jobs, files, models, health and other routes, the HTTP parser, and authorization."""

from __future__ import annotations

import base64
import os

from attack.bodies import JSON_CT, jbody
from attack.cases import GEN, Case
from attack.client import API_KEY


def resource_cases(ctx) -> list[Case]:
    job, done, out = ctx["job_id"], ctx["job_id"], ctx["output_file"]
    ghost_job, ghost_file = "job_" + "0" * 32, "file_" + "0" * 32

    def g(name, method, path, expect, headers=(), body=None):
        return Case(name, method, path, list(headers), body, expect, group=name.split(".")[0])

    return [
        # jobs
        g("jobs.list", "GET", "/v1/jobs", "200"),
        g("jobs.list.limit_0", "GET", "/v1/jobs?limit=0", "4xx"),
        g("jobs.list.limit_200_max", "GET", "/v1/jobs?limit=200", "200"),
        g("jobs.list.limit_201", "GET", "/v1/jobs?limit=201", "4xx"),
        g("jobs.list.limit_-1", "GET", "/v1/jobs?limit=-1", "4xx"),
        g("jobs.list.limit_abc", "GET", "/v1/jobs?limit=abc", "4xx"),
        g("jobs.list.limit_float", "GET", "/v1/jobs?limit=1.5", "4xx"),
        g("jobs.list.limit_huge", "GET", "/v1/jobs?limit=" + "9" * 5000, "4xx"),
        g("jobs.list.limit_twice", "GET", "/v1/jobs?limit=1&limit=2", None),
        g("jobs.list.before_garbage", "GET", "/v1/jobs?before=abc", "4xx"),
        g("jobs.list.before_traversal", "GET", "/v1/jobs?before=..%2F..%2Fetc%2Fpasswd", "4xx"),
        g("jobs.list.before_unknown_id", "GET", f"/v1/jobs?before={ghost_job}", "200"),
        g("jobs.list.before_sql", "GET", "/v1/jobs?before=job_'%20OR%201=1--", "4xx"),
        g("jobs.list.query_surrogate_bytes", "GET", "/v1/jobs?before=%ED%A0%80", "4xx"),
        g("jobs.list.query_nul", "GET", "/v1/jobs?before=%00", "4xx"),
        g("jobs.get.valid", "GET", f"/v1/jobs/{job}", "200"),
        g("jobs.get.invalid_id", "GET", "/v1/jobs/abc", "400"),
        g("jobs.get.unknown_id", "GET", f"/v1/jobs/{ghost_job}", "404"),
        g("jobs.get.uppercase_id", "GET", f"/v1/jobs/{job.upper()}", "400"),
        g("jobs.get.traversal", "GET", "/v1/jobs/../../etc/passwd", "404"),
        g("jobs.get.traversal_urlenc", "GET", "/v1/jobs/..%2F..%2Fetc%2Fpasswd", "4xx"),
        g("jobs.get.traversal_dotdot", "GET", "/v1/jobs/..", "4xx"),
        g("jobs.get.nul", "GET", "/v1/jobs/%00", "400"),
        g("jobs.get.surrogate_bytes", "GET", "/v1/jobs/%ED%A0%80", "400"),
        g("jobs.get.10k_id", "GET", "/v1/jobs/" + "a" * 10000, "400"),
        g("jobs.get.sql", "GET", "/v1/jobs/job_'%20OR%20'1'='1", "400"),
        g("jobs.get.trailing_slash", "GET", f"/v1/jobs/{job}/", None),
        g("jobs.events.invalid_id", "GET", "/v1/jobs/abc/events", "400"),
        g("jobs.events.unknown_id", "GET", f"/v1/jobs/{ghost_job}/events", "404"),
        g("jobs.events.finished_job", "GET", f"/v1/jobs/{done}/events", "200"),
        g("jobs.delete.invalid_id", "DELETE", "/v1/jobs/abc", "400"),
        g("jobs.delete.unknown_id", "DELETE", f"/v1/jobs/{ghost_job}", "404"),
        g("jobs.delete.finished_job", "DELETE", f"/v1/jobs/{done}", "409"),
        g("jobs.delete.with_body", "DELETE", f"/v1/jobs/{done}", "409", [JSON_CT], b'{"x": 1}'),
        g("jobs.delete.collection", "DELETE", "/v1/jobs", "405"),
        g("jobs.post.collection", "POST", "/v1/jobs", "405", [JSON_CT], b"{}"),
        g("jobs.put.job", "PUT", f"/v1/jobs/{job}", "405", [JSON_CT], b"{}"),
        g("jobs.patch.job", "PATCH", f"/v1/jobs/{job}", "405", [JSON_CT], b"{}"),
        g("jobs.head.list", "HEAD", "/v1/jobs", None),
        g("jobs.head.job", "HEAD", f"/v1/jobs/{job}", None),
        g("jobs.method.custom_FOO", "FOO", "/v1/jobs", "405"),
        # files
        g("files.get.valid", "GET", f"/v1/files/{out}", "200"),
        g("files.get.valid_with_png_ext", "GET", f"/v1/files/{out}.png", "200"),
        g("files.get.valid_with_exe_ext", "GET", f"/v1/files/{out}.exe", None),
        g("files.get.download_true", "GET", f"/v1/files/{out}?download=true", "200"),
        g("files.get.download_garbage", "GET", f"/v1/files/{out}?download=maybe", "4xx"),
        g("files.get.unknown", "GET", f"/v1/files/{ghost_file}", "404"),
        g("files.get.invalid", "GET", "/v1/files/abc", "400"),
        g("files.get.traversal", "GET", "/v1/files/../../etc/passwd", "404"),
        g("files.get.traversal_urlenc", "GET", "/v1/files/..%2F..%2Fetc%2Fpasswd", "4xx"),
        g("files.get.traversal_double_urlenc", "GET", "/v1/files/..%252F..%252Fetc%252Fpasswd", "4xx"),
        g("files.get.traversal_backslash", "GET", "/v1/files/..%5C..%5Cetc%5Cpasswd", "4xx"),
        g("files.get.dotfile_lock", "GET", "/v1/files/.lock", "4xx"),
        g("files.get.sqlite_db", "GET", "/v1/files/..%2Fjobs.sqlite3", "4xx"),
        g("files.get.nul", "GET", "/v1/files/%00", "4xx"),
        g("files.get.id_nul_ext", "GET", f"/v1/files/{out}%00.png", "4xx"),
        g("files.get.surrogate_bytes", "GET", "/v1/files/%ED%A0%80", "4xx"),
        g("files.get.10k_id", "GET", "/v1/files/" + "f" * 10000, "4xx"),
        g("files.range.first_10", "GET", f"/v1/files/{out}", "206", [("Range", "bytes=0-9")]),
        g("files.range.suffix", "GET", f"/v1/files/{out}", "206", [("Range", "bytes=-5")]),
        g("files.range.past_end", "GET", f"/v1/files/{out}", "416", [("Range", "bytes=100000000-100000010")]),
        g("files.range.reversed", "GET", f"/v1/files/{out}", None, [("Range", "bytes=10-5")]),
        g("files.range.multi", "GET", f"/v1/files/{out}", None, [("Range", "bytes=0-1,5-9")]),
        g("files.range.1000_ranges", "GET", f"/v1/files/{out}", None,
          [("Range", "bytes=" + ",".join(f"{i}-{i}" for i in range(1000)))]),
        g("files.range.garbage", "GET", f"/v1/files/{out}", None, [("Range", "bytes=abc")]),
        g("files.range.other_unit", "GET", f"/v1/files/{out}", None, [("Range", "items=0-1")]),
        g("files.range.huge_numbers", "GET", f"/v1/files/{out}", None, [("Range", "bytes=0-" + "9" * 5000)]),
        g("files.head.valid", "HEAD", f"/v1/files/{out}", "200"),
        g("files.head.invalid", "HEAD", "/v1/files/abc", "400"),
        g("files.head.unknown", "HEAD", f"/v1/files/{ghost_file}", "404"),
        g("files.if_none_match", "GET", f"/v1/files/{out}", None, [("If-None-Match", "*")]),
        g("files.delete", "DELETE", f"/v1/files/{out}", "405"),
        g("files.post", "POST", "/v1/files", "4xx", [JSON_CT], b"{}"),
        g("files.list", "GET", "/v1/files", "404"),
        # models
        g("models.list", "GET", "/v1/models", "200"),
        g("models.get.tiny", "GET", "/v1/models/qimg-tiny", "200"),
        g("models.get.unknown", "GET", "/v1/models/nope", "404"),
        g("models.get.empty_name", "GET", "/v1/models/", "404"),
        g("models.get.traversal", "GET", "/v1/models/../../etc/passwd", "404"),
        g("models.get.traversal_urlenc", "GET", "/v1/models/..%2F..%2Fetc%2Fpasswd", "404"),
        g("models.get.nested_path", "GET", "/v1/models/a/b/c", "404"),
        g("models.get.surrogate_bytes", "GET", "/v1/models/%ED%A0%80", "404"),
        g("models.get.nul", "GET", "/v1/models/%00", "404"),
        g("models.get.10k_name", "GET", "/v1/models/" + "m" * 10000, "404"),
        g("models.post", "POST", "/v1/models", "405", [JSON_CT], b"{}"),
        g("models.delete", "DELETE", "/v1/models/qimg-tiny", "405"),
        g("loras.list", "GET", "/v1/loras", "200"),
        # health and the rest
        g("health.get", "GET", "/health", "200"),
        g("health.query", "GET", "/health?x=1&y=" + "z" * 4000, "200"),
        g("health.post", "POST", "/health", "405", [JSON_CT], b"{}"),
        g("health.head", "HEAD", "/health", None),
        g("health.options", "OPTIONS", "/health", None),
        g("misc.trace", "TRACE", "/", "405"),
        g("misc.unknown_route", "GET", "/v1/nope", "404"),
        g("misc.unknown_route_post", "POST", "/v1/images/nope", "404", [JSON_CT], b"{}"),
        g("misc.images_root", "GET", "/v1/images", "404"),
        g("misc.get_generations", "GET", "/v1/images/generations", "405"),
        g("misc.get_edits", "GET", "/v1/images/edits", "405"),
        g("misc.put_generations", "PUT", "/v1/images/generations", "405", [JSON_CT], jbody(GEN)),
        g("misc.delete_layers", "DELETE", "/v1/images/layers", "405"),
        g("misc.head_generations", "HEAD", "/v1/images/generations", None),
        g("misc.options_generations", "OPTIONS", "/v1/images/generations", None),
        g("misc.double_slash", "GET", "//v1/jobs", None),
        g("misc.absolute_uri", "GET", f"http://evil.example/v1/jobs/{job}", None),
        g("misc.static_traversal", "GET", "/static/../../../../etc/passwd", "404"),
        g("misc.static_traversal_urlenc", "GET", "/static/..%2F..%2F..%2F..%2Fetc%2Fpasswd", "404"),
        g("misc.openapi", "GET", "/openapi.json", "200"),
        g("misc.page", "GET", "/", "200"),
    ]


def protocol_cases() -> list[Case]:
    """Requests the HTTP parser (h11, in uvicorn) refuses before the app sees them: no app-made JSON is possible."""
    raw = [
        ("garbage_request_line", b"GARBAGE\r\n\r\n"),
        ("binary_junk", os.urandom(512) + b"\r\n\r\n"),
        ("http_0.9", b"GET /health\r\n\r\n"),
        ("http_2_preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
        ("no_host_http11", b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n"),
        ("http_1.0", b"GET /health HTTP/1.0\r\n\r\n"),
        ("header_100kb", b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: " + b"a" * 100_000
         + b"\r\n\r\n"),
        ("header_no_colon", b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nbroken header\r\n\r\n"),
        ("header_nul", b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-A: a\0b\r\n\r\n"),
        ("lf_only_line_endings", b"GET /health HTTP/1.1\nHost: x\nConnection: close\n\n"),
        ("1000_headers", b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
         + b"".join(b"X-H%d: v\r\n" % i for i in range(1000)) + b"\r\n"),
        ("bad_chunk_size", (b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"zz\r\n{}\r\n0\r\n\r\n")),
        ("pipelined_two_requests", (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/nope HTTP/1.1\r\nHost: x\r\n"
                                    b"Connection: close\r\n\r\n")),
        ("space_in_path", b"GET /v1/jobs/a b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        ("url_64kb", b"GET /v1/jobs/" + b"a" * 65536 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    ]
    return [Case(f"protocol.{n}", raw=r, expect="4xx" if n not in ("http_1.0", "pipelined_two_requests",
                                                                    "lf_only_line_endings", "header_100kb",
                                                                    "1000_headers") else None,
                 group="protocol") for n, r in raw]


def auth_cases() -> list[Case]:
    gen = jbody(GEN)

    def c(name, headers, expect, method="GET", path="/v1/jobs", body=None):
        return Case(f"auth.{name}", method, path, list(headers), body, expect, server="auth", group="auth")

    return [
        c("no_header", [], "401"),
        c("bearer_empty", [("Authorization", "Bearer")], "401"),
        c("bearer_space", [("Authorization", "Bearer ")], "401"),
        c("wrong_key", [("Authorization", "Bearer wrong")], "401"),
        c("key_prefix", [("Authorization", f"Bearer {API_KEY[:-1]}")], "401"),
        c("key_plus_suffix", [("Authorization", f"Bearer {API_KEY}x")], "401"),
        c("basic_scheme", [("Authorization", "Basic " + base64.b64encode(f"u:{API_KEY}".encode()).decode())], "401"),
        c("key_without_scheme", [("Authorization", API_KEY)], "401"),
        c("token_scheme", [("Authorization", f"Token {API_KEY}")], "401"),
        c("two_keys_in_one_header", [("Authorization", f"Bearer {API_KEY}, Bearer x")], "401"),
        c("non_latin1_bytes", [("Authorization", b"Bearer \xff\xfe\x80")], "401"),
        c("10kb_token", [("Authorization", "Bearer " + "k" * 10_000)], "401"),
        c("nul_in_token", [("Authorization", b"Bearer a\x00b")], "4xx"),
        c("key_in_query", [], "401", path=f"/v1/jobs?api_key={API_KEY}"),
        c("key_in_x_api_key", [("X-Api-Key", API_KEY)], "401"),
        c("no_key_post_generation", [JSON_CT], "401", "POST", "/v1/images/generations", gen),
        c("no_key_5mb_body", [JSON_CT], "401", "POST", "/v1/images/generations", b"x" * (5 * 2**20)),
        c("no_key_file", [], "401", path="/v1/files/file_" + "0" * 32),
        c("no_key_models", [], "401", path="/v1/models"),
        c("no_key_health_public", [], "200", path="/health"),
        c("wrong_key_head", [("Authorization", "Bearer wrong")], None, "HEAD", "/v1/files/file_" + "0" * 32),
        c("valid_key", [("Authorization", f"Bearer {API_KEY}")], "200"),
        c("valid_key_lowercase_scheme", [("Authorization", f"bearer {API_KEY}")], "200"),
        c("valid_key_extra_spaces", [("Authorization", f"Bearer   {API_KEY}  ")], None),
        c("two_authorization_headers", [("Authorization", "Bearer wrong"), ("Authorization", f"Bearer {API_KEY}")],
          None),
        c("valid_key_bad_body", [("Authorization", f"Bearer {API_KEY}"), JSON_CT], "400", "POST",
          "/v1/images/generations", b"[]"),
    ]
