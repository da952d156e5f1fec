"""The Case record, its expectation check, and the generated cases for POST /v1/images/generations."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from attack.bodies import JSON_CT, image_bytes, jbody, multipart


# -- cases -----------------------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    method: str = "GET"
    path: str = "/health"
    headers: list = field(default_factory=list)
    body: bytes | None = None
    expect: str | None = None  # "2xx", "4xx", "400", "404", ...: what a correct server answers (None: either)
    server: str = "main"  # or "auth"
    chunked: bool = False
    host: bool = True
    raw: bytes | None = None  # the whole request, sent as is
    fn: Callable | None = None  # a custom case: fn(ctx) -> (Resp, note)
    async_job: bool = False  # sends Prefer: respond-async; a 202's job is cancelled after
    group: str = ""


def expect_ok(expect: str | None, status: int | None) -> bool:
    if expect is None or status is None:
        return True
    return any(str(status)[0] == e[0] if e.endswith("xx") else status == int(e) for e in expect.split("|"))


GEN = {"prompt": "a red circle", "size": "128x128", "steps": 1, "seed": 7}

# every JSON field of /v1/images/generations and the type it takes
GEN_FIELDS = {
    "prompt": "str", "model": "str", "size": "str", "quality": "str", "moderation": "str", "style": "str",
    "user": "str", "negative_prompt": "str", "sampler": "str", "preset": "str",
    "n": "int", "steps": "int", "seed": "int", "output_compression": "int", "partial_images": "int",
    "num_inference_steps": "int",
    "guidance_scale": "float", "true_cfg_scale": "float", "shift": "float",
    "stream": "bool", "cfg_normalize": "bool",
    "response_format": "literal", "output_format": "literal", "background": "literal",
    "sigmas": "float_list", "loras": "object_list", "scheduler_config": "object",
}
WRONG_TYPES = {
    "str": {"int": 123, "bool": True, "float": 1.5, "list": ["a"], "object": {"a": "b"}},
    "int": {"str": "3", "bool": True, "float": 2.5, "list": [1], "object": {"v": 1}},
    "float": {"str": "2.0", "bool": True, "list": [1.0], "object": {"v": 1.0}},
    "bool": {"str": "true", "int": 1, "float": 1.0, "list": [True], "object": {}},
    "literal": {"int": 1, "bool": True, "list": ["png"], "object": {"v": "png"}, "unknown_str": "gif"},
    "float_list": {"str": "0.5", "float": 0.5, "bool": True, "object": {"0": 0.5}, "list_of_str": ["0.5"],
                   "list_of_bool": [True], "list_of_list": [[0.5]]},
    "object_list": {"bad_json_str": "not json", "float": 0.5, "object": {"name": "x"}, "list_of_int": [1],
                    "name_int": [{"name": 1}], "scale_str": [{"name": "a", "scale": "1"}],
                    "extra_key": [{"name": "a", "extra": 1}], "missing_name": [{"scale": 1.0}]},
    "object": {"str": "{}", "list": [], "int": 1, "bool": True},
}


def gen_case(name, body=None, *, raw=None, expect="4xx", headers=(), async_job=False, **kw) -> Case:
    data = raw if raw is not None else jbody(body)
    return Case(f"gen.{name}", "POST", "/v1/images/generations", [JSON_CT, *headers], data, expect,
                async_job=async_job, group="generations", **kw)


def with_(**changes) -> dict:
    body = dict(GEN)
    for k, v in changes.items():
        if v is _DROP:
            body.pop(k, None)
        else:
            body[k] = v
    return body


_DROP = object()


def generation_cases() -> list[Case]:
    cases = []
    # 1. wrong types for every field
    for fld, kind in GEN_FIELDS.items():
        for tname, value in WRONG_TYPES[kind].items():
            cases.append(gen_case(f"type.{fld}.{tname}", with_(**{fld: value})))
    for fld in ("prompt", "n", "size"):
        cases.append(gen_case(f"type.{fld}.null", with_(**{fld: None}),
                              expect="2xx" if fld == "size" else "4xx"))
    cases.append(gen_case("type.steps.null_is_default", with_(steps=None), expect="2xx"))
    cases.append(gen_case("type.steps.float_integral", with_(steps=1.0)))
    cases.append(gen_case("type.seed.float_integral", with_(seed=3.0)))
    cases.append(gen_case("type.loras.json_string_in_json_body", with_(loras="[]"), expect=None))
    # 2. at and just past every limit
    big = "9" * 5000
    limits = [
        ("steps.0", with_(steps=0), "4xx"), ("steps.1", with_(steps=1), "2xx"), ("steps.-1", with_(steps=-1), "4xx"),
        ("steps.1001", with_(steps=1001), "4xx"), ("steps.2**63", with_(steps=2**63), "4xx"),
        ("num_inference_steps.0", with_(steps=_DROP, num_inference_steps=0), "4xx"),
        ("num_inference_steps.1001", with_(steps=_DROP, num_inference_steps=1001), "4xx"),
        ("n.0", with_(n=0), "4xx"), ("n.-1", with_(n=-1), "4xx"), ("n.10_max", with_(n=10), "2xx"),
        ("n.11", with_(n=11), "4xx"), ("n.10**30", with_(n=10**30), "4xx"),
        ("size.0x0", with_(size="0x0"), "4xx"), ("size.99999x99999", with_(size="99999x99999"), "4xx"),
        ("size.auto", with_(size="auto"), "2xx"), ("size.64x", with_(size="64x"), "4xx"),
        ("size.x64", with_(size="x64"), "4xx"), ("size.-64x64", with_(size="-64x64"), "4xx"),
        ("size.128x-128", with_(size="128x-128"), "4xx"), ("size.1x1", with_(size="1x1"), "4xx"),
        ("size.15x15", with_(size="15x15"), "4xx"), ("size.16x16_min", with_(size="16x16"), None),
        ("size.4097x16", with_(size="4097x16"), "4xx"), ("size.128X128_upper", with_(size="128X128"), "2xx"),
        ("size.spaces", with_(size=" 128 x 128 "), "2xx"), ("size.3d", with_(size="128x128x128"), "4xx"),
        ("size.1e3x1e3", with_(size="1e3x1e3"), "4xx"), ("size.fullwidth_digits", with_(size="１２８x１２８"), None),
        ("size.1000000x1", with_(size="1000000x1"), "4xx"), ("size.empty", with_(size=""), "4xx"),
        ("size.100_chars", with_(size="1" * 100), "4xx"), ("size.101_chars", with_(size="1" * 101), "4xx"),
        ("size.512x512_steps1_in_budget", with_(size="512x512"), "2xx"),
        ("seed.0", with_(seed=0), "2xx"), ("seed.2**63-1", with_(seed=2**63 - 1), "2xx"),
        ("seed.2**63", with_(seed=2**63), "4xx"), ("seed.2**64", with_(seed=2**64), "4xx"),
        ("seed.-1", with_(seed=-1), "4xx"), ("seed.-2**63", with_(seed=-2**63), "4xx"),
        ("guidance_scale.-1", with_(guidance_scale=-1), "4xx"), ("guidance_scale.0", with_(guidance_scale=0), "2xx"),
        ("guidance_scale.100", with_(guidance_scale=100), "2xx"),
        ("guidance_scale.101", with_(guidance_scale=101), "4xx"),
        ("guidance_scale.NaN_string", with_(guidance_scale="NaN"), "4xx"),
        ("guidance_scale.NaN_literal", with_(guidance_scale=float("nan")), "4xx"),
        ("guidance_scale.Infinity_literal", with_(guidance_scale=float("inf")), "4xx"),
        ("guidance_scale.1e999_overflow", None, "4xx"),
        ("true_cfg_scale.-1", with_(true_cfg_scale=-1), "4xx"),
        ("true_cfg_scale.101", with_(true_cfg_scale=101), "4xx"),
        ("true_cfg_scale.NaN_literal", with_(true_cfg_scale=float("nan")), "4xx"),
        ("shift.0", with_(shift=0), "4xx"), ("shift.-1", with_(shift=-1), "4xx"),
        ("shift.101", with_(shift=101), "4xx"),
        ("shift.tiny", with_(shift=1e-300), None), ("shift.NaN_literal", with_(shift=float("nan")), "4xx"),
        ("output_compression.-1", with_(output_compression=-1), "4xx"),
        ("output_compression.101", with_(output_compression=101), "4xx"),
        ("output_compression.0_jpeg", with_(output_compression=0, output_format="jpeg"), "2xx"),
        ("partial_images.4", with_(partial_images=4), "4xx"), ("partial_images.-1", with_(partial_images=-1), "4xx"),
        ("sigmas.empty", with_(sigmas=[]), "4xx"), ("sigmas.1001", with_(sigmas=[0.5] * 1001), "4xx"),
        ("sigmas.0", with_(sigmas=[0.0]), "4xx"), ("sigmas.2", with_(sigmas=[2.0]), "4xx"),
        ("sigmas.-1", with_(sigmas=[-1.0]), "4xx"), ("sigmas.NaN_literal", with_(sigmas=[float("nan")]), "4xx"),
        ("sigmas.Infinity_literal", with_(sigmas=[float("inf")]), "4xx"),
        ("sigmas.valid_1", with_(sigmas=[1.0]), None), ("sigmas.increasing", with_(sigmas=[0.2, 0.9]), None),
        ("loras.9_entries", with_(loras=[{"name": f"l{i}"} for i in range(9)]), "4xx"),
        ("loras.unknown_name", with_(loras=[{"name": "nope"}]), "4xx"),
        ("loras.traversal_name", with_(loras=[{"name": "../../etc/passwd"}]), "4xx"),
        ("loras.scale_9", with_(loras=[{"name": "a", "scale": 9}]), "4xx"),
        ("loras.scale_NaN", with_(loras=[{"name": "a", "scale": float("nan")}]), "4xx"),
        ("loras.empty_name", with_(loras=[{"name": ""}]), "4xx"),
        ("scheduler_config.unknown_key", with_(scheduler_config={"bogus": 1}), "4xx"),
        ("scheduler_config.shift_negative", with_(scheduler_config={"shift": -1}), None),
        ("scheduler_config.timesteps_0", with_(scheduler_config={"num_train_timesteps": 0}), None),
        ("scheduler_config.value_object", with_(scheduler_config={"shift": {"a": 1}}), "4xx"),
        ("scheduler_config.underscore_key_is_metadata", with_(scheduler_config={"__class__": "x"}), None),
        ("scheduler_config.fixed_shift_string", with_(scheduler_config={"use_dynamic_shifting": False,
                                                                        "shift": "abc"}), "4xx"),
        ("scheduler_config.fixed_shift_negative", with_(scheduler_config={"use_dynamic_shifting": False,
                                                                          "shift": -1}), None),
        ("scheduler_config.seq_len_equal_div0", with_(scheduler_config={"use_dynamic_shifting": True,
                                                                        "base_image_seq_len": 4096}), None),
        ("scheduler_config.max_shift_1e308", with_(scheduler_config={"use_dynamic_shifting": True,
                                                                     "max_shift": 1e308}), None),
        ("scheduler_config.shift_terminal_2", with_(scheduler_config={"shift_terminal": 2}), None),
        ("scheduler_config.dynamic_string", with_(scheduler_config={"use_dynamic_shifting": "yes"}), "4xx"),
        ("scheduler_config.timesteps_string", with_(scheduler_config={"num_train_timesteps": "x"}), "4xx"),
        ("scheduler_config.time_shift_type_list", with_(scheduler_config={"time_shift_type": ["linear"]}), "4xx"),
        ("sampler.unknown", with_(sampler="nope"), "4xx"), ("sampler.101_chars", with_(sampler="e" * 101), "4xx"),
        ("preset.unknown", with_(preset="nope"), "4xx"),
        ("response_format.url", with_(response_format="url"), "2xx"),
        ("background.transparent_jpeg", with_(background="transparent", output_format="jpeg"), "4xx"),
        ("output_format.webp", with_(output_format="webp"), "2xx"),
        ("stream.true", with_(stream=True, partial_images=2, steps=3), "2xx"),
        ("model.unknown", with_(model="nope"), "4xx"),
        ("model.layered_for_generate", with_(model="qimg-tiny-layered"), "4xx"),
        ("model.empty_is_auto", with_(model=""), "2xx"), ("model.1001_chars", with_(model="m" * 1001), "4xx"),
        ("model.traversal", with_(model="../../etc/passwd"), "4xx"),
        ("user.1001_chars", with_(user="u" * 1001), "4xx"),
        ("prompt.empty", with_(prompt=""), "4xx"), ("prompt.blank", with_(prompt=" \t\n "), "4xx"),
        ("prompt.32000_at_limit", with_(prompt="a" * 32000), None),
        ("prompt.32001_over_limit", with_(prompt="a" * 32001), "4xx"),
        ("prompt.100k_chars", with_(prompt="a red circle " * 7700), "4xx"),
        ("negative_prompt.32001", with_(negative_prompt="b" * 32001), "4xx"),
        ("prompt.control_chars", with_(prompt="a\x00b\x01c\x1b[31m\x7f\x08d"), "2xx"),
        ("prompt.nul_only", with_(prompt="\x00"), None),
        ("prompt.crlf_header_injection", with_(prompt="x\r\nX-Injected: 1\r\n\r\nGET / HTTP/1.1"), "2xx"),
        ("prompt.bidi_and_zero_width", with_(prompt="\u202e\u200b\ufeffred circle\u2066"), "2xx"),
        ("prompt.astral_and_combining", with_(prompt="\U0001F600" * 50 + "e\u0301" * 50), "2xx"),
        ("negative_prompt.control_chars", with_(negative_prompt="\x00\x1f"), None),
        ("quality.hd", with_(quality="hd"), "2xx"),
    ]
    for name, body, expect in limits:
        if name == "guidance_scale.1e999_overflow":
            cases.append(gen_case(f"limit.{name}", raw=b'{"prompt": "x", "steps": 1, "guidance_scale": 1e999}',
                                  expect=expect))
            continue
        cases.append(gen_case(f"limit.{name}", body, expect=expect))
    cases.append(gen_case("limit.seed.5000_digits", raw=b'{"prompt": "x", "steps": 1, "seed": ' + big.encode() + b"}",
                          expect="4xx"))
    cases.append(gen_case("limit.steps.5000_digits", raw=b'{"prompt": "x", "steps": ' + big.encode() + b"}",
                          expect="4xx"))
    cases.append(gen_case("limit.steps.1000_async_cancelled", with_(steps=1000), expect="2xx", async_job=True))
    cases.append(gen_case("limit.n.10_steps1000_async_cancelled", with_(n=10, steps=1000, size="64x64"),
                          expect="2xx", async_job=True))
    cases.append(gen_case("limit.cost_over_budget", with_(size="4096x4096", steps=100), expect="4xx"))
    # 3. lone UTF-16 surrogates in every string field (and in keys), sent as JSON escapes
    for fld in ("prompt", "negative_prompt", "model", "size", "quality", "moderation", "style", "user", "sampler",
                "preset", "response_format", "output_format", "background"):
        cases.append(gen_case(f"surrogate.{fld}", with_(**{fld: "a \ud800 b"})))
    cases.append(gen_case("surrogate.low_dc00_prompt", with_(prompt="\udc00")))
    cases.append(gen_case("surrogate.loras_name", with_(loras=[{"name": "\udfff", "scale": 1}])))
    cases.append(gen_case("surrogate.scheduler_config_key", with_(scheduler_config={"\ud800": 1})))
    cases.append(gen_case("surrogate.scheduler_config_value", with_(scheduler_config={"shift": "\ud800"})))
    cases.append(gen_case("surrogate.unknown_key", with_(**{"\ud800": 1})))
    cases.append(gen_case("surrogate.raw_cesu_bytes_in_prompt", raw=b'{"prompt": "a \xed\xa0\x80 b"}'))
    cases.append(gen_case("surrogate.pair_is_valid", with_(prompt="a \ud83d\ude00 b"), expect="2xx"))
    # 4. the body itself
    deep = b'{"prompt": "x", "scheduler_config": ' + b'{"a": ' * 10000 + b"1" + b"}" * 10000 + b"}"
    five_mb = jbody({"prompt": "x" * (5 * 1024 * 1024)})
    body_cases = [
        ("body.unknown_field", jbody(with_(colour="red")), [JSON_CT], "4xx"),
        ("body.unknown_fields_many", jbody(with_(**{f"f{i}": i for i in range(200)})), [JSON_CT], "4xx"),
        ("body.empty", b"", [JSON_CT], "4xx"),
        ("body.whitespace", b"  \r\n\t ", [JSON_CT], "4xx"),
        ("body.not_json", b"prompt=a red circle", [JSON_CT], "4xx"),
        ("body.truncated_json", b'{"prompt": "a', [JSON_CT], "4xx"),
        ("body.json_array", b'[{"prompt": "x"}]', [JSON_CT], "4xx"),
        ("body.json_string", b'"a red circle"', [JSON_CT], "4xx"),
        ("body.json_null", b"null", [JSON_CT], "4xx"),
        ("body.json_number", b"42", [JSON_CT], "4xx"),
        ("body.nested_10k_levels", b'{"prompt": "x", "a": ' + b"[" * 10000 + b"]" * 10000 + b"}", [JSON_CT], "4xx"),
        ("body.nested_10k_objects_in_scheduler", deep, [JSON_CT], "4xx"),
        ("body.nested_17_levels", b'{"prompt": "x", "sigmas": ' + b"[" * 17 + b"]" * 17 + b"}", [JSON_CT], "4xx"),
        ("body.invalid_utf8", b'{"prompt": "\xff\xfe"}', [JSON_CT], "4xx"),
        ("body.utf8_bom", b"\xef\xbb\xbf" + jbody(GEN), [JSON_CT], "2xx"),
        ("body.utf16_encoded", json.dumps(GEN).encode("utf-16"), [JSON_CT], "4xx"),
        ("body.duplicate_keys", b'{"prompt": "a", "prompt": "b", "steps": 1, "size": "128x128"}', [JSON_CT], None),
        ("body.trailing_garbage", jbody(GEN) + b" xyz", [JSON_CT], "4xx"),
        ("body.two_objects", jbody(GEN) + jbody(GEN), [JSON_CT], "4xx"),
        ("body.nul_bytes", b"\0" * 100, [JSON_CT], "4xx"),
        ("body.900kb_field", jbody(with_(user="u" * 900_000)), [JSON_CT], "4xx"),
        ("body.5mb_content_length", five_mb, [JSON_CT], "413"),
        ("body.content_length_lies_short", jbody(GEN), [JSON_CT, ("Content-Length", "10")], "4xx"),
        ("body.content_length_negative", jbody(GEN), [JSON_CT, ("Content-Length", "-1")], "4xx"),
        ("body.content_length_not_a_number", jbody(GEN), [JSON_CT, ("Content-Length", "abc")], "4xx"),
        ("body.content_length_huge", jbody(GEN), [JSON_CT, ("Content-Length", "99999999999999999999")], "4xx"),
        ("body.content_length_and_chunked", None, None, None),
        ("ctype.none", jbody(GEN), [], None),
        ("ctype.text_plain", jbody(GEN), [("Content-Type", "text/plain")], None),
        ("ctype.form_urlencoded", b"prompt=a+red+circle&steps=1",
         [("Content-Type", "application/x-www-form-urlencoded")], "4xx"),
        ("ctype.multipart_form", None, None, "4xx"),
        ("ctype.multipart_no_boundary", jbody(GEN), [("Content-Type", "multipart/form-data")], "4xx"),
        ("ctype.json_charset_utf16", jbody(GEN), [("Content-Type", "application/json; charset=utf-16")], None),
        ("ctype.garbage", jbody(GEN), [("Content-Type", "\x01\x02;;;=")], None),
        ("ctype.huge_header_value", jbody(GEN), [("Content-Type", "application/json;" + "a" * 100_000)], None),
        ("prefer.async_with_invalid_body", jbody(with_(n=0)), [JSON_CT, ("Prefer", "respond-async")], "4xx"),
        ("prefer.garbage_value", jbody(GEN), [JSON_CT, ("Prefer", "respond-async;;;\x01, wait=-1")], None),
    ]
    for name, body, headers, expect in body_cases:
        if name == "body.content_length_and_chunked":
            data = jbody(GEN)
            raw = (b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                   b"Content-Type: application/json\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                   + b"%x\r\n" % len(data) + data + b"\r\n0\r\n\r\n")
            cases.append(Case(f"gen.{name}", "POST", "/v1/images/generations", raw=raw, expect=expect,
                              group="generations"))
            continue
        if name == "ctype.multipart_form":
            data, ctype = multipart([("prompt", "x", None, None), ("image", image_bytes(), "a.png", "image/png")])
            body, headers = data, [("Content-Type", ctype)]
        cases.append(Case(f"gen.{name}", "POST", "/v1/images/generations", headers, body, expect, group="generations"))
    cases.append(Case("gen.body.5mb_chunked_no_length", "POST", "/v1/images/generations", [JSON_CT], five_mb, "413",
                      chunked=True, group="generations"))
    cases.append(Case("gen.body.expect_100_continue_5mb", "POST", "/v1/images/generations",
                      [JSON_CT, ("Expect", "100-continue")], five_mb, "413", group="generations"))
    cases.append(Case("gen.body.json_depth_bomb_5mb", "POST", "/v1/images/generations", [JSON_CT],
                      b"[" * (5 * 1024 * 1024), "413", group="generations"))
    return cases
