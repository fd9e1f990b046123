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

import re
import struct
from typing import NamedTuple

import numpy as np

from serving.errors import invalid_argument

_PNG = b"\x89PNG\r\n\x1a\n"
# TF's decoders want FF D8 FF, but extract_jpeg_shape and libjpeg itself skip bytes after SOI:
# anything starting with SOI is read as libjpeg would read it.
_JPEG = b"\xff\xd8"
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


def _alternatives(lengths, payload) -> bytes:
    """Regex alternatives "byte n, then payload(n) bytes" for each n in `lengths`."""
    return b"|".join(
        re.escape(bytes([n])) + (b"[\\s\\S]{%d}" % payload(n) if payload(n) else b"")
        for n in lengths
    )


# libjpeg's read_markers (jdmarker.c) after SOI, which TF's decoders and extract_jpeg_shape run:
# next_marker skips any bytes up to an 0xFF, then fill 0xFF bytes, and takes FF 00 for data, not a
# marker (a warning, "N extraneous bytes before marker"); RSTn and TEM have no length; DHT, DAC,
# DQT, DRI, DNL, APPn and COM are skipped by their length (below 2: just the length bytes). One
# match walks up to 4096 such units with a length below 256 in C: a Python loop pays ~0.3 us a
# step, and a step can be 2 bytes long (262k tiny segments in 1 MiB took seconds). Longer
# segments cost a Python step per >= 258 bytes.
_JPEG_SKIPPED = rb"[\xc4\xcc\xdb\xdc\xdd\xe0-\xef\xfe]"
_JPEG_UNIT = (
    rb"[^\xff]*\xff+(?:[\x00\x01\xd0-\xd7]|" + _JPEG_SKIPPED + rb"\x00(?:[\x00-\x02]|"
    + _alternatives(range(3, 256), lambda n: n - 2) + rb"))"
)  # fmt: skip
_JPEG_SKIP = re.compile(rb"(?:" + _JPEG_UNIT + rb"){0,4096}")
_JPEG_MARKER = re.compile(rb"[^\xff]*\xff+([\s\S])")
_JPEG_PARAMETERLESS = frozenset({0x00, 0x01, *range(0xD0, 0xD8)})  # 00: stuffed data, not a marker
_JPEG_LENGTH = frozenset({0xC4, 0xCC, 0xDB, 0xDC, 0xDD, *range(0xE0, 0xF0), 0xFE})


def _jpeg_size(data: bytes) -> ImageSize | None:
    """The frame size libjpeg's header reader finds, or None when it would fail (no SOF before
    SOS/EOI/the end, an unknown or repeated SOI marker): then no decode allocates anything."""
    position = 2
    while True:
        position = _JPEG_SKIP.match(data, position).end()
        found = _JPEG_MARKER.match(data, position)
        if found is None:  # the data ends: libjpeg reads a fake EOI, "no image"
            return None
        marker, position = data[found.end() - 1], found.end()
        if marker in _JPEG_PARAMETERLESS:  # only after 4096 skipped units
            continue
        if marker in _JPEG_LENGTH:
            (length,) = struct.unpack(">H", data[position : position + 2])
            position += max(length, 2)
            continue
        if marker in _SOF:
            # SOF3/5-7/11/13-15 are unsupported by libjpeg: sizing them anyway only ever refuses
            # an image TF would have refused too.
            height, width = struct.unpack(">HH", data[position + 3 : position + 7])
            return ImageSize(width, height)
        return None  # SOS or EOI before a frame, SOI again, JPG, DHP, EXP, JPGn, RESn: an error


# GIF data sub-blocks (a length byte 1-255, then that many bytes), walked in C as for JPEG.
_GIF_SUB_BLOCKS = re.compile(rb"(?:" + _alternatives(range(1, 256), lambda n: n) + rb"){0,4096}")


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
            position = _GIF_SUB_BLOCKS.match(data, position).end()
            if position < len(data) and data[position]:  # truncated, or 4096 blocks walked
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


_UNREAD = object()


def check_pixel_budget(alias: str, value: np.ndarray, max_pixels: int) -> None:
    """INVALID_ARGUMENT if any encoded image among a string tensor's elements is over budget."""
    if value.dtype != object or not value.size:
        return
    sizes: dict[bytes, ImageSize | None] = {}  # TF's repeat rule makes many elements one object
    for index, element in enumerate(value.flat):
        if not isinstance(element, bytes):
            continue
        size = sizes.get(element, _UNREAD)
        if size is _UNREAD:
            size = sizes[element] = image_size(element)
        if size is not None and size.pixels > max_pixels:
            frames = f" x {size.frames} frames" if size.frames > 1 else ""
            raise invalid_argument(
                f"Input {alias}[{index}] is an image of {size.width}x{size.height}{frames} = "
                f"{size.pixels} pixels, over this server's budget of {max_pixels} pixels per "
                "image (--max_image_pixels); it was refused before decoding"
            )
