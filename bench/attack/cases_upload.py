"""The generated cases for the multipart routes (/v1/images/edits, /v1/images/layers) and the layers export."""

from __future__ import annotations

import json
import os
import re

from attack.bodies import JSON_CT, image_bytes, jbody, multipart, png_header_only
from attack.cases import Case


EDIT_FIELDS = [("prompt", "add a blue square"), ("size", "128x128"), ("steps", "1"), ("seed", "3")]


def form_case(route, name, parts, expect="4xx", *, fields=True, headers=(), raw_body=None, **kw) -> Case:
    base = EDIT_FIELDS if route == "edits" else [("layers", "2"), ("steps", "1"), ("seed", "3")]
    allparts = ([(k, v, None, None) for k, v in base] if fields else []) + list(parts)
    data, ctype = multipart(allparts)
    if raw_body is not None:
        data = raw_body
    return Case(f"{route}.{name}", "POST", f"/v1/images/{route}", [("Content-Type", ctype), *headers], data, expect,
                group=route, **kw)


def replace_field(route, name, key, value, expect="4xx") -> Case:
    base = EDIT_FIELDS if route == "edits" else [("layers", "2"), ("steps", "1"), ("seed", "3")]
    parts = [(k, value if k == key else v, None, None) for k, v in base]
    if key not in dict(base):
        parts.append((key, value, None, None))
    img = image_bytes()
    parts.append(("image", img, "a.png", "image/png"))
    data, ctype = multipart(parts)
    return Case(f"{route}.{name}", "POST", f"/v1/images/{route}", [("Content-Type", ctype)], data, expect, group=route)


def field_case(route, key, value, expect) -> Case:
    """`replace_field` named after the field and its value (a long value shortened, odd characters replaced)."""
    label = value if len(value) <= 12 else f"{value[:6]}..{len(value)}chars"
    label = re.sub(r"[^A-Za-z0-9_.\-\[\]{}]", "_", label)
    return replace_field(route, f"field.{key}={label}", key, value, expect)


def upload_cases(route: str, images: dict) -> list[Case]:
    png = images["png"]

    def img(data, filename="a.png", ctype="image/png", name="image"):
        return (name, data, filename, ctype)

    cases = [
        form_case(route, "upload.no_image", []),
        form_case(route, "upload.empty_image", [img(b"")]),
        form_case(route, "upload.truncated_png", [img(png[: len(png) // 2])]),
        form_case(route, "upload.png_signature_only", [img(png[:8])]),
        form_case(route, "upload.text_named_png", [img(b"hello, I am not a picture\n" * 20)]),
        form_case(route, "upload.html_named_png",
                  [img(b"<html><script>alert(1)</script></html>", "x.png", "text/html")]),
        form_case(route, "upload.gif", [img(images["gif"], "a.gif", "image/gif")]),
        form_case(route, "upload.bmp", [img(images["bmp"], "a.bmp", "image/bmp")]),
        form_case(route, "upload.tiff", [img(images["tiff"], "a.tiff", "image/tiff")]),
        form_case(route, "upload.ico", [img(images["ico"], "a.ico", "image/x-icon")]),
        form_case(route, "upload.svg", [img(b'<svg xmlns="http://www.w3.org/2000/svg" width="9e9" height="9e9"/>',
                                            "a.svg", "image/svg+xml")]),
        form_case(route, "upload.png_bomb_1bit_20000x20000", [img(images["bomb"])]),
        form_case(route, "upload.png_header_65535x65535", [img(png_header_only(65535, 65535, 8, 2))]),
        form_case(route, "upload.png_header_4097x4097_over_pixels", [img(png_header_only(4097, 4097, 8, 2))]),
        form_case(route, "upload.png_header_0x0", [img(png_header_only(0, 0))]),
        form_case(route, "upload.png_bad_crc", [img(png[:20] + b"\0\0\0\0" + png[24:])]),
        form_case(route, "upload.40mb_file", [img(images["big40"])], expect="4xx"),
        form_case(route, "upload.jpeg_valid", [img(images["jpeg"], "a.jpg", "image/jpeg")], expect="2xx"),
        form_case(route, "upload.webp_valid", [img(images["webp"], "a.webp", "image/webp")], expect="2xx"),
        form_case(route, "upload.webp_animated", [img(images["webp_anim"], "a.webp", "image/webp")], expect=None),
        form_case(route, "upload.png_16bit_gray", [img(images["png_i16"])], expect=None),
        form_case(route, "upload.png_la", [img(images["png_la"])], expect="2xx"),
        form_case(route, "upload.png_palette_trns", [img(images["png_p"])], expect="2xx"),
        form_case(route, "upload.png_1bit_small", [img(images["png_1"])], expect="2xx"),
        form_case(route, "upload.jpeg_cmyk", [img(images["jpeg_cmyk"], "a.jpg", "image/jpeg")], expect=None),
        form_case(route, "upload.jpeg_exif_rotated", [img(images["jpeg_exif"], "a.jpg", "image/jpeg")], expect="2xx"),
        form_case(route, "upload.png_1x1", [img(images["png_1x1"])], expect=None),
        form_case(route, "upload.png_4096x1_extreme_aspect", [img(images["png_wide"])], expect=None),
        form_case(route, "upload.png_ctype_text_plain", [img(png, "a.txt", "text/plain")], expect="2xx"),
        form_case(route, "upload.filename_traversal", [img(png, "../../../../etc/passwd.png")], expect="2xx"),
        form_case(route, "upload.filename_crlf_and_quotes", [img(png, 'a"\r\nX-Evil: 1\r\n.png')], expect=None),
        form_case(route, "upload.filename_surrogate_bytes", [img(png, b"\xed\xa0\x80.png")], expect=None),
        form_case(route, "upload.image_as_text_field", [("image", "not a file", None, None)]),
        form_case(route, "upload.file_in_prompt_field", [img(png), ("prompt", png, "p.png", "image/png")],
                  fields=False),
        form_case(route, "upload.unknown_file_field", [img(png), ("extra", png, "e.png", "image/png")]),
        form_case(route, "field.300kb_prompt", [("prompt", "p" * 300_000, None, None), img(png)], fields=False),
        form_case(route, "field.unknown", [img(png), ("colour", "red", None, None)]),
        form_case(route, "field.invalid_utf8_prompt", [("prompt", b"\xff\xfe bad", None, None), img(png)],
                  fields=False, expect=None),
        form_case(route, "field.nul_in_field_name", [img(png), ("pro\x00mpt", "x", None, None)]),
        form_case(route, "field.empty_field_name", [img(png), ("", "x", None, None)]),
        form_case(route, "form.empty_multipart", [], fields=False),
        form_case(route, "form.no_closing_boundary", [], raw_body=b"--xyz\r\nContent-Disposition: form-data; "
                                                                   b'name="prompt"\r\n\r\nhello'),
        form_case(route, "form.garbage_body", [], raw_body=os.urandom(4096)),
        form_case(route, "form.65_fields", [img(png)] + [(f"f{i}", "x", None, None) for i in range(65)]),
        Case(f"{route}.form.boundary_missing", "POST", f"/v1/images/{route}",
             [("Content-Type", "multipart/form-data")], b"--x\r\n\r\n--x--\r\n", "4xx", group=route),
        Case(f"{route}.form.boundary_200_chars", "POST", f"/v1/images/{route}",
             [("Content-Type", "multipart/form-data; boundary=" + "b" * 200)], b"--" + b"b" * 200 + b"--\r\n", "4xx",
             group=route),
        Case(f"{route}.ctype.json", "POST", f"/v1/images/{route}", [JSON_CT], jbody({"prompt": "x"}), "4xx",
             group=route),
        Case(f"{route}.ctype.none", "POST", f"/v1/images/{route}", [], b"prompt=x", "4xx", group=route),
        Case(f"{route}.ctype.form_urlencoded", "POST", f"/v1/images/{route}",
             [("Content-Type", "application/x-www-form-urlencoded")], b"prompt=x&image=abc", "4xx", group=route),
        Case(f"{route}.ctype.text_plain", "POST", f"/v1/images/{route}", [("Content-Type", "text/plain")], b"x",
             "4xx", group=route),
        Case(f"{route}.body.empty_multipart_ctype", "POST", f"/v1/images/{route}",
             [("Content-Type", "multipart/form-data; boundary=x")], b"", "4xx", group=route),
    ]
    return cases


def edit_cases(images: dict) -> list[Case]:
    png = images["png"]
    img = ("image", png, "a.png", "image/png")
    cases = upload_cases("edits", images)
    cases += [
        form_case("edits", "valid_one_image", [img], expect="2xx"),
        form_case("edits", "image[]_naming", [("image[]", png, "a.png", "image/png")], expect="2xx"),
        form_case("edits", "10_images_max", [img] * 10, expect="2xx"),
        form_case("edits", "11_images", [img] * 11),
        form_case("edits", "mask_part", [img, ("mask", png, "m.png", "image/png")]),
        form_case("edits", "mask_only", [("mask", png, "m.png", "image/png")]),
        form_case("edits", "duplicate_prompt", [img, ("prompt", "again", None, None)]),
        form_case("edits", "duplicate_steps", [img, ("steps", "2", None, None)]),
        form_case("edits", "image_exactly_32mib", [("image", images["pad32"], "a.png", "image/png")], expect="2xx"),
        form_case("edits", "image_32mib_plus_1", [("image", images["pad32"] + b"\0", "a.png", "image/png")]),
        form_case("edits", "two_bombs", [("image", images["bomb"], "a.png", "image/png")] * 2),
        form_case("edits", "size_auto_from_1x4096", [("prompt", "x", None, None), ("steps", "1", None, None),
                                                      ("image", images["png_tall"], "a.png", "image/png")],
                  expect=None, fields=False),
    ]
    for key, value, expect in [("n", "abc", "4xx"), ("n", "true", "4xx"), ("n", "0", "4xx"), ("n", "11", "4xx"),
                               ("steps", "1.5", "4xx"), ("steps", "0", "4xx"), ("steps", "1001", "4xx"),
                               ("seed", "-1", "4xx"), ("seed", str(2**63), "4xx"), ("seed", "9" * 5000, "4xx"),
                               ("size", "0x0", "4xx"), ("size", "64x", "4xx"), ("size", "99999x99999", "4xx"),
                               ("guidance_scale", "NaN", "4xx"), ("guidance_scale", "-1", "4xx"),
                               ("guidance_scale", "inf", "4xx"), ("stream", "maybe", "4xx"),
                               ("loras", "not json", "4xx"), ("loras", "[" * 50_000, "4xx"),
                               ("loras", json.dumps([{"name": "\udfff"}]), "4xx"),
                               ("sigmas", "[0.5]", "4xx"), ("scheduler_config", "{}", "4xx"),
                               ("prompt", "", "4xx"), ("prompt", "x" * 32001, "4xx"),
                               ("response_format", "gif", "4xx"), ("input_fidelity", "high", "2xx"),
                               ("model", "qimg-tiny-layered", "4xx"), ("model", "nope", "4xx")]:
        cases.append(field_case("edits", key, value, expect))
    # a prompt field with the JSON-escaped surrogate is plain text in a form: no surrogate exists, it is accepted
    return cases


def layers_cases(images: dict) -> list[Case]:
    png = images["png_rgba"]
    img = ("image", png, "a.png", "image/png")
    cases = upload_cases("layers", images)
    cases += [
        form_case("layers", "valid", [img], expect="2xx"),
        form_case("layers", "two_images", [img, img]),
        form_case("layers", "mask_part", [img, ("mask", png, "m.png", "image/png")]),
        form_case("layers", "duplicate_layers", [img, ("layers", "3", None, None)]),
    ]
    for key, value, expect in [("layers", "0", "4xx"), ("layers", "1", "4xx"), ("layers", "-1", "4xx"),
                               ("layers", "10", None), ("layers", "11", "4xx"), ("layers", "16", "4xx"),
                               ("layers", "17", "4xx"), ("layers", "x", "4xx"), ("layers", str(2**64), "4xx"),
                               ("resolution", "31", "4xx"), ("resolution", "100", "4xx"),
                               ("resolution", "4097", "4xx"), ("resolution", "x", "4xx"),
                               ("resolution", "4096", "4xx"),
                               ("recurse", "2", "4xx"), ("recurse", "-1", "4xx"), ("recurse", "x", "4xx"),
                               ("format", "gif", "4xx"), ("format", "psd", None), ("caption_language", "fr", "4xx"),
                               ("steps", "0", "4xx"), ("steps", "1001", "4xx"), ("seed", "-1", "4xx"),
                               ("model", "qimg-tiny", "4xx"), ("model", "nope", "4xx"), ("prompt", "x" * 32001, "4xx"),
                               ("guidance_scale", "101", "4xx"), ("n", "2", "4xx")]:
        cases.append(field_case("layers", key, value, expect))
    return cases


def export_cases(ctx) -> list[Case]:
    out, jpg, inp = ctx["output_file"], ctx["jpeg_file"], ctx["input_file"]
    layers = ctx.get("layer_files") or [out]
    ghost = "file_" + "0" * 32
    specs = [
        ("valid_zip", {"layers": layers, "format": "zip"}, "2xx"),
        ("valid_psd", {"layers": layers, "format": "psd"}, None),
        ("valid_ora_output_png", {"layers": [out], "format": "ora"}, None),
        ("empty_layers", {"layers": [], "format": "zip"}, "4xx"),
        ("65_layers", {"layers": [out] * 65, "format": "zip"}, "4xx"),
        ("64_layers_max", {"layers": [out] * 64, "format": "zip"}, None),
        ("unknown_file", {"layers": [ghost], "format": "zip"}, "4xx"),
        ("traversal", {"layers": ["../../etc/passwd"], "format": "zip"}, "4xx"),
        ("traversal_urlenc", {"layers": ["..%2F..%2Fetc%2Fpasswd"], "format": "zip"}, "4xx"),
        ("file_id_with_ext", {"layers": [out + ".png"], "format": "zip"}, "4xx"),
        ("input_role_file", {"layers": [inp], "format": "zip"}, "4xx"),
        ("jpeg_output", {"layers": [jpg], "format": "zip"}, "4xx"),
        ("format_gif", {"layers": [out], "format": "gif"}, "4xx"),
        ("format_missing", {"layers": [out]}, "4xx"),
        ("format_json", {"layers": [out], "format": "json"}, "4xx"),
        ("names_mismatch", {"layers": [out], "format": "zip", "names": ["a", "b"]}, "4xx"),
        ("names_201_chars", {"layers": [out], "format": "zip", "names": ["n" * 201]}, "4xx"),
        ("names_traversal", {"layers": [out], "format": "zip", "names": ["../../evil"]}, None),
        ("names_surrogate", {"layers": [out], "format": "zip", "names": ["\ud800"]}, "4xx"),
        ("names_control_chars", {"layers": [out], "format": "psd", "names": ["\x00\x1b\r\n"]}, None),
        ("layers_string", {"layers": out, "format": "zip"}, "4xx"),
        ("layers_ints", {"layers": [1, 2], "format": "zip"}, "4xx"),
        ("layers_null", {"layers": None, "format": "zip"}, "4xx"),
        ("layers_objects", {"layers": [{"id": out}], "format": "zip"}, "4xx"),
        ("unknown_field", {"layers": [out], "format": "zip", "x": 1}, "4xx"),
        ("surrogate_layer_id", {"layers": ["file_\ud800"], "format": "zip"}, "4xx"),
    ]
    cases = [Case(f"export.{n}", "POST", "/v1/images/layers/export", [JSON_CT], jbody(b), e, group="export")
             for n, b, e in specs]
    cases += [
        Case("export.body.empty", "POST", "/v1/images/layers/export", [JSON_CT], b"", "4xx", group="export"),
        Case("export.body.array", "POST", "/v1/images/layers/export", [JSON_CT], b"[]", "4xx", group="export"),
        Case("export.body.nested_10k", "POST", "/v1/images/layers/export", [JSON_CT],
             b'{"layers": ' + b"[" * 10000 + b"]" * 10000 + b"}", "4xx", group="export"),
        Case("export.ctype.multipart", "POST", "/v1/images/layers/export",
             [("Content-Type", "multipart/form-data; boundary=x")], b"--x--\r\n", "4xx", group="export"),
        Case("export.method.get", "GET", "/v1/images/layers/export", [], None, "405", group="export"),
    ]
    return cases
