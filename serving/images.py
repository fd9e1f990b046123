"""Pixel budget: how many pixels an encoded image will decode to, read from its header alone.

A 1 MB PNG or JPEG can declare 12000 x 12000 pixels; TensorFlow's decoders would allocate and fill
all of them (~0.4 GB of RGB, several times that once a resize works in float32) before any
model code can object. TF Serving has no limit of its own (the graph decides); our exported graph
refuses over-budget images before decoding (van_trainer/export.py), and the server checks every
encoded image it is sent as a string tensor element the same way, whatever the model.

The formats are the ones tf.io.decode_image reads: JPEG, PNG, GIF (every frame counts: decode_gif
returns them all) and BMP. Only headers are parsed, in a few microseconds per image; PIL's
Image.open would do it too, but it enforces its own process-wide 89 M pixel limit and warns.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import numpy as np

from serving.errors import invalid_argument

_PNG = b"\x89PNG\r\n\x1a\n"
_JPEG = b"\xff\xd8\xff"
_GIF = (b"GIF87a", b"GIF89a")
# JPEG start-of-frame markers (C0-CF except DHT C4, JPG C8, DAC CC) carry the image size.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


class ImageSize(NamedTuple):
    """What an encoded image declares: width, height and frames (1 but for animated GIFs)."""

    width: int
    height: int
    frames: int = 1

    @property
    def pixels(self) -> int:
        """Pixels a full decode produces."""
        return self.width * self.height * self.frames


def image_size(data: bytes) -> ImageSize | None:
    """The size an image's header declares; None when `data` is not a JPEG/PNG/GIF/BMP header."""
    try:
        if data.startswith(_PNG):
            return _png_size(data)
        if data.startswith(_JPEG):
            return _jpeg_size(data)
        if data[:6] in _GIF:
            return _gif_size(data)
        if data.startswith(b"BM"):
            return _bmp_size(data)
    except (struct.error, IndexError):
        return None  # a truncated header: the decoder will reject it without allocating
    return None


def _png_size(data: bytes) -> ImageSize:
    width, height = struct.unpack(">II", data[16:24])  # IHDR is always the first chunk
    return ImageSize(width, height)


def _jpeg_size(data: bytes) -> ImageSize | None:
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            position += 2
            continue
        (length,) = struct.unpack(">H", data[position + 2 : position + 4])
        if marker in _SOF:
            height, width = struct.unpack(">HH", data[position + 5 : position + 9])
            return ImageSize(width, height)
        if marker == 0xDA:  # start of scan without a frame header: not a valid JPEG
            return None
        position += 2 + length
    return None


def _gif_size(data: bytes) -> ImageSize:
    width, height, flags = struct.unpack("<HHB", data[6:11])
    position = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    frames = 0
    while position < len(data):
        block = data[position]
        if block == 0x3B:  # trailer
            break
        if block == 0x2C:  # image descriptor [+ local colour table], LZW code size, sub-blocks
            frames += 1
            local = data[position + 9]
            position += 10 + (3 << ((local & 7) + 1) if local & 0x80 else 0) + 1
        elif block == 0x21:  # extension: label, then sub-blocks
            position += 2
        else:
            break
        while position < len(data) and data[position]:  # sub-blocks end with a zero length
            position += data[position] + 1
        position += 1
    return ImageSize(width, height, max(frames, 1))


# BMP info header sizes (BITMAPCOREHEADER 12, BITMAPINFOHEADER 40, ... V5 124): "BM" alone is
# too weak a signature, text inputs may start with it.
_BMP_HEADERS = frozenset({12, 40, 52, 56, 64, 108, 124})


def _bmp_size(data: bytes) -> ImageSize | None:
    (header,) = struct.unpack("<I", data[14:18])
    if header not in _BMP_HEADERS:
        return None
    if header == 12:
        width, height = struct.unpack("<HH", data[18:22])
        return ImageSize(width, height)
    width, height = struct.unpack("<ii", data[18:26])
    return ImageSize(abs(width), abs(height))  # negative height: rows stored top-down


def check_pixel_budget(alias: str, value: np.ndarray, max_pixels: int) -> None:
    """INVALID_ARGUMENT if any encoded image among a string tensor's elements is over budget."""
    if value.dtype != object or not value.size:
        return
    for index, element in enumerate(value.flat):
        size = image_size(element) if isinstance(element, bytes) else None
        if size is not None and size.pixels > max_pixels:
            frames = f" x {size.frames} frames" if size.frames > 1 else ""
            raise invalid_argument(
                f"Input {alias}[{index}] is an image of {size.width}x{size.height}{frames} = "
                f"{size.pixels} pixels, over this server's budget of {max_pixels} pixels per "
                "image (--max_image_pixels); it was refused before decoding"
            )
