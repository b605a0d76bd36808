"""A corpus of odd and hostile uploads, generated on the fly.

Each entry: file name -> (writer, expectation). The expectation is "ok" (the image must be
converted to a normal 256x256 RGB input) or a regular expression the error message must match.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from conftest import lesion_image
from PIL import Image


def _bomb_png(path: Path, width: int = 30000, height: int = 30000) -> None:
    """A valid greyscale PNG of width x height pixels that is only a few KB on disk."""
    raw_row = b"\x00" + b"\x00" * width  # filter byte + one byte per pixel
    comp = zlib.compressobj(9)
    data = b"".join(comp.compress(raw_row) for _ in range(height)) + comp.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def _exif_rotated(path: Path) -> None:
    img = Image.new("RGB", (120, 60), (200, 150, 130))
    img.paste((60, 30, 20), (0, 0, 30, 60))  # dark band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    img.save(path, exif=exif.tobytes())


def _animated(path: Path) -> None:
    frames = [lesion_image(64, seed=i).convert("P") for i in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


def _sixteen_bit(path: Path) -> None:
    arr = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    Image.fromarray(arr, mode="I;16").save(path)


def _write(data: bytes) -> Callable[[Path], None]:
    return lambda p: p.write_bytes(data)


def _save(img: Image.Image, **kw) -> Callable[[Path], None]:
    return lambda p: img.save(p, **kw)


def _truncated(p: Path) -> None:
    buf = io.BytesIO()
    lesion_image(128).save(buf, format="JPEG")
    p.write_bytes(buf.getvalue()[:400])


BASE = lesion_image(96, seed=5)

CORPUS: dict[str, tuple[Callable[[Path], None], str]] = {
    "zero.jpg": (_write(b""), "empty"),
    "truncated.jpg": (_truncated, "could not be read"),
    "random.jpg": (_write(np.random.default_rng(0).bytes(5000)), "could not be read"),
    "text.png": (_write(b"just some text, not a PNG"), "could not be read"),
    "script.svg.png": (
        _write(b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>"),
        "could not be read",
    ),
    "page.html.jpg": (_write(b"<html><body><script>alert('x')</script></body></html>"), "could not be read"),
    "bomb.png": (_bomb_png, "limit|too large"),
    "tiny_1x1.png": (_save(Image.new("RGB", (1, 1), (120, 80, 60))), "ok"),
    "wide_4000x10.png": (_save(lesion_image(64).resize((4000, 10))), "ok"),
    "sixteen_bit.png": (_sixteen_bit, "ok"),
    "cmyk.jpg": (_save(BASE.convert("CMYK")), "ok"),
    "rgba.png": (_save(BASE.convert("RGBA")), "ok"),
    "palette.png": (_save(BASE.convert("P")), "ok"),
    "animated.gif": (_animated, "ok"),
    "exif_rotated.jpg": (_exif_rotated, "ok"),
    "grey.png": (_save(BASE.convert("L")), "ok"),
}


def make(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    CORPUS[name][0](path)
    return path
