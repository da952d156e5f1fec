"""Request bodies: JSON, multipart forms, and the pictures (valid, odd and hostile) the upload cases send."""

from __future__ import annotations

import io
import json
import os
import secrets
import struct
import zlib


# -- bodies --------------------------------------------------------------------------------------------------------
JSON_CT = ("Content-Type", "application/json")


def jbody(obj) -> bytes:
    """JSON text; lone surrogates become `\\udXXX` escapes (ensure_ascii), NaN/Infinity are sent as literals."""
    return json.dumps(obj).encode("ascii")


def multipart(parts, boundary=None) -> tuple[bytes, str]:
    """parts: (name, data, filename or None, content type or None)."""
    b = boundary or "qimgattack" + secrets.token_hex(8)
    out = bytearray()
    for name, data, filename, ctype in parts:
        out += b"--" + b.encode() + b"\r\n"
        disp = b'Content-Disposition: form-data; name="' + _u(name) + b'"'
        if filename is not None:
            disp += b'; filename="' + _u(filename) + b'"'
        out += disp + b"\r\n"
        if ctype:
            out += b"Content-Type: " + ctype.encode() + b"\r\n"
        out += b"\r\n" + (data if isinstance(data, bytes) else str(data).encode("utf-8")) + b"\r\n"
    out += b"--" + b.encode() + b"--\r\n"
    return bytes(out), f"multipart/form-data; boundary={b}"


def _u(text) -> bytes:
    return text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")


def image_bytes(fmt="PNG", size=(64, 64), mode="RGB", color=(200, 30, 30), **save) -> bytes:
    from PIL import Image

    if mode in ("1", "L", "I;16", "I", "P"):
        color = 1 if mode == "1" else 120
    elif mode in ("LA",):
        color = (120, 200)
    elif mode == "CMYK":
        color = (0, 200, 200, 0)
    elif mode == "RGBA":
        color = (200, 30, 30, 128)
    img = Image.new(mode, size, color)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(w: int, h: int, bit_depth=1, color_type=0, idat: bytes | None = None) -> bytes:
    """A PNG whose header claims w x h; `idat` (or a tiny, far too short stream) follows, then IEND."""
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    data = idat if idat is not None else zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def png_bomb(side=20000) -> bytes:
    """A valid 1-bit side x side PNG of zeros, compressed: tens of KB that decode to side^2 pixels."""
    row = b"\0" + b"\0" * ((side + 7) // 8)
    comp = zlib.compressobj(9)
    data = bytearray()
    for _ in range(side):
        data += comp.compress(row)
    data += comp.flush()
    return png_header_only(side, side, 1, 0, bytes(data))


def animated_webp() -> bytes:
    from PIL import Image

    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="WEBP", save_all=True, append_images=frames[1:], duration=100)
    return buf.getvalue()


def exif_jpeg() -> bytes:
    from PIL import Image

    img = Image.new("RGB", (80, 40), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


def padded_png(total: int) -> bytes:
    """A valid PNG followed by zero bytes up to `total` bytes (decoders stop at IEND)."""
    data = image_bytes()
    return data + b"\0" * (total - len(data))


def make_images() -> dict:
    from PIL import Image

    pal = Image.new("P", (64, 64), 3)
    pal.putpalette([i % 256 for i in range(768)])
    buf = io.BytesIO()
    pal.save(buf, format="PNG", transparency=3)
    big40 = image_bytes() + os.urandom(40 * 2**20)
    return {
        "png": image_bytes(), "png_rgba": image_bytes(mode="RGBA"), "jpeg": image_bytes("JPEG"),
        "webp": image_bytes("WEBP"), "gif": image_bytes("GIF"), "bmp": image_bytes("BMP"),
        "tiff": image_bytes("TIFF"), "ico": image_bytes("ICO", (32, 32)), "bomb": png_bomb(20000),
        "big40": big40, "webp_anim": animated_webp(), "png_i16": image_bytes(mode="I;16"),
        "png_la": image_bytes(mode="LA"), "png_p": buf.getvalue(), "png_1": image_bytes(mode="1"),
        "jpeg_cmyk": image_bytes("JPEG", mode="CMYK"), "jpeg_exif": exif_jpeg(), "png_1x1": image_bytes(size=(1, 1)),
        "png_wide": image_bytes(size=(4096, 1)), "png_tall": image_bytes(size=(1, 4096)),
        "pad32": padded_png(32 * 2**20),
    }
