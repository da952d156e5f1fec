"""What clients send, checked where it enters: the request models (OpenAI's fields, then qimg's extras), JSON bodies
read with their own limits, multipart forms, and text that could not be stored or tokenized.

JSON bodies are validated strictly, as OpenAI's API is (`"n": true` or `"stream": "yes"` are refused); multipart
forms carry every scalar as text, so their fields are converted (`"n": "2"`).
"""

from __future__ import annotations

import json
from typing import Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.formparsers import MultiPartException

from qimg.serve.errors import ClientGone, bad_request, validation_error

MAX_JSON_DEPTH = 16  # the deepest a valid request goes is 3 (loras: list of objects)


class LoraChoice(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(min_length=1, max_length=300)
    scale: float = Field(1.0, ge=-8, le=8)


class SamplingFields(BaseModel):
    """qimg's sampling extras, shared by every route (checked again, with the library's messages, by the options)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    loras: list[LoraChoice] | None = Field(None, max_length=8)

    @field_validator("loras", mode="before")
    @classmethod
    def _loras_from_form(cls, value):  # multipart forms send the list as JSON text
        if isinstance(value, str):
            try:
                return json.loads(value)
            except (json.JSONDecodeError, RecursionError) as err:
                raise ValueError(f"loras must be a JSON list of {{'name', 'scale'}} objects "
                                 f"({getattr(err, 'msg', 'nested too deeply')})") from None
        return value

    def lora_record(self, library) -> list[dict]:
        return library.specs([choice.model_dump() for choice in self.loras or []])

    steps: int | None = Field(None, ge=1, le=1000)
    seed: int | None = Field(None, ge=0, lt=2**63)
    negative_prompt: str | None = None
    guidance_scale: float | None = Field(None, ge=0, le=100)
    true_cfg_scale: float | None = Field(None, ge=0, le=100)
    cfg_normalize: bool | None = None
    sampler: str | None = Field(None, max_length=100)
    preset: str | None = Field(None, max_length=100)
    sigmas: list[float] | None = Field(None, min_length=1, max_length=1000)
    scheduler_config: dict | None = None
    shift: float | None = Field(None, gt=0, le=100)
    cache: str | None = Field(None, max_length=40)

    def sampling(self, negative_prompt: str | None) -> dict:
        """The sampling fields of the library's options."""
        return dict(steps=self.steps, seed=self.seed, negative_prompt=negative_prompt, cfg=requested_cfg(self),
                    cfg_normalize=self.cfg_normalize, sampler=self.sampler or "euler", preset=self.preset,
                    sigmas=self.sigmas, scheduler=self.scheduler_config, shift=self.shift, cache=self.cache)


class ImageOptions(SamplingFields):
    """Fields shared by generations and edits (OpenAI's, then qimg's extras)."""

    prompt: str
    model: str | None = Field(None, max_length=1000)
    n: int = Field(1, ge=1)
    size: str | None = Field("auto", max_length=100)
    quality: str | None = Field(None, max_length=100)
    response_format: Literal["url", "b64_json"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: int | None = Field(None, ge=0, le=100)
    background: Literal["transparent", "opaque", "auto"] | None = None
    moderation: str | None = Field(None, max_length=100)
    style: str | None = Field(None, max_length=100)
    user: str | None = Field(None, max_length=1000)
    stream: bool | None = False
    partial_images: int | None = Field(None, ge=0, le=3)
    num_inference_steps: int | None = Field(None, ge=1, le=1000)


class GenerationRequest(ImageOptions):
    pass


class EditRequest(ImageOptions):
    input_fidelity: str | None = Field(None, max_length=100)


class LayersRequest(SamplingFields):
    model: str | None = Field(None, max_length=1000)
    layers: int = Field(4, ge=1)
    resolution: int | None = Field(None, ge=32, le=4096)
    prompt: str | None = None
    format: Literal["psd", "ora", "pptx", "zip", "json"] = "json"
    response_format: Literal["url", "b64_json"] | None = None
    user: str | None = Field(None, max_length=1000)
    recurse: int | None = Field(None, ge=0)
    caption_language: Literal["en", "zh"] = "en"


class ExportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layers: list[str] = Field(min_length=1, max_length=64)
    format: Literal["psd", "ora", "pptx", "zip"]
    names: list[str] | None = None


def requested_cfg(req) -> float | None:
    """`guidance_scale`, else its diffusers name `true_cfg_scale` (None: the model's default)."""
    return req.guidance_scale if req.guidance_scale is not None else req.true_cfg_scale


def validate(model, data: dict, *, strict: bool):
    check_text(data)
    try:
        return model.model_validate(data, strict=strict)
    except ValidationError as err:
        raise validation_error(err.errors()) from None


# -- text ------------------------------------------------------------------------------------------------------
def unencodable(value, path: str = "") -> tuple[str, int, str] | None:
    """The first string, at any depth, that UTF-8 cannot encode (JSON's `\\ud800` escape makes a lone surrogate):
    (its field, the character's index, the character)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            return path or "body", err.start, value[err.start]
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        where = f"{path}.{key}" if path else str(key)  # pydantic's way: loras.0.name
        found = unencodable(key, path or "body") if isinstance(key, str) else None
        found = found or unencodable(item, where)
        if found:
            return found
    return None


def check_text(data) -> None:
    found = unencodable(data)
    if found:
        param, index, char = found
        raise bad_request(f"{param} contains a lone UTF-16 surrogate (U+{ord(char):04X}) at character {index}; "
                          f"send valid Unicode text", param=param, code="invalid_text")


def nesting(value) -> int:
    """How deep a parsed JSON value nests (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            depth += 1
            deepest = max(deepest, depth)
            stack.extend((child, depth) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


# -- bodies ----------------------------------------------------------------------------------------------------
def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number (send a finite number)")


def is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/")


async def read_json(request: Request) -> dict:
    """The JSON object a JSON route was sent, or HTTP 400 saying what is wrong with it. (Its size was bounded by
    the guard middleware before it was read.)"""
    if is_multipart(request):
        raise bad_request(f"{request.url.path} takes a JSON body (Content-Type: application/json), not a multipart "
                          f"form", code="unsupported_media_type")
    try:
        body = await request.body()
    except ClientDisconnect:
        raise ClientGone() from None
    if not body.strip():
        raise bad_request('the request body is empty: send a JSON object such as {"prompt": "a red circle"}',
                          code="empty_body")
    try:
        data = json.loads(body.decode("utf-8-sig"), parse_constant=_no_constant)
    except RecursionError:
        raise bad_request(f"the JSON body is nested too deeply; the limit is {MAX_JSON_DEPTH} levels",
                          code="invalid_json") from None
    except UnicodeDecodeError as err:
        raise bad_request(f"the request body is not UTF-8 text: {err.reason} at byte {err.start}",
                          code="invalid_json") from None
    except json.JSONDecodeError as err:
        raise bad_request(f"the request body is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}",
                          code="invalid_json") from None
    except ValueError as err:  # NaN / Infinity (not JSON), an integer of thousands of digits
        raise bad_request(f"the request body is not valid JSON: {err}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    if (depth := nesting(data)) > MAX_JSON_DEPTH:
        raise bad_request(f"the JSON body is nested {depth} levels deep; the limit is {MAX_JSON_DEPTH}",
                          code="invalid_json")
    return data


async def read_form(request: Request, limits, file_fields: tuple[str, ...]):
    """(form, scalar fields, {file field: [UploadFile]}); repeated scalars and files in scalar fields are refused."""
    ctype = request.headers.get("content-type", "").lower()
    if not (is_multipart(request) or ctype.startswith("application/x-www-form-urlencoded")):
        given = request.headers.get("content-type") or "none"
        raise bad_request(f"{request.url.path} takes a multipart/form-data body (text fields, and the pictures as "
                          f"file parts named {' or '.join(repr(f) for f in file_fields)}); the Content-Type was "
                          f"{given!r}", code="unsupported_media_type")
    part_limit = limits.max_prompt_chars * 4 + 4096
    try:
        form = await request.form(max_files=limits.max_images * 2 + 2, max_fields=64, max_part_size=part_limit)
    except ClientDisconnect:
        raise ClientGone() from None
    except (MultiPartException, HTTPException) as err:  # Starlette wraps the parser's errors in a 400
        if isinstance(err, HTTPException) and err.status_code != 400:
            raise
        reason = err.message if isinstance(err, MultiPartException) else err.detail
        hint = (f" (a text field may hold at most {part_limit:,} bytes; prompts at most "
                f"{limits.max_prompt_chars:,} characters)" if "size" in str(reason).lower() else "")
        raise bad_request(f"the multipart form could not be read: {reason}{hint}", code="invalid_form") from None
    scalars, files = {}, {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            base = key[:-2] if key.endswith("[]") else key
            if base not in file_fields:
                raise bad_request(f"unexpected file in field {key!r}; files go in {', '.join(file_fields)}",
                                  param=key)
            files.setdefault(base, []).append(value)
        else:
            if key.endswith("[]") and key[:-2] in file_fields or key in file_fields:
                raise bad_request(f"{key!r} must be an uploaded file (multipart/form-data), not text", param=key)
            if key in scalars:
                raise bad_request(f"parameter {key!r} is given more than once", param=key)
            scalars[key] = value
    return form, scalars, files


# -- the OpenAPI document (the routes read their bodies themselves) ----------------------------------------------
def inline_schema(model, *, form_files: tuple[str, ...] = ()) -> dict:
    """The model's JSON schema with its `$defs` inlined (so it can sit in an OpenAPI document as is); with
    `form_files`, the multipart form: those fields are arrays of binary parts."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref.split("/")[-1]])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    schema = inline(schema)
    if form_files:
        props = schema.setdefault("properties", {})
        if "loras" in props:
            props["loras"] = {"type": "string", "description": "a JSON list of {name, scale} objects"}
        for name in form_files:
            props[name] = {"type": "array", "items": {"type": "string", "format": "binary"}}
        schema["required"] = sorted({*schema.get("required", ()), form_files[0]})
    return schema


def json_body(model) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline_schema(model)}}}}


def form_body(model, files: tuple[str, ...]) -> dict:
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": inline_schema(model, form_files=files)}}}}
