"""ImageNet-style tf.Example records: RGB-JPEG normalisation, synset lists, shard writing/reading.

The image work (PIL decode/convert/encode) is pure Python so it can run in worker processes that
never import TensorFlow; only shard writing and reading import TensorFlow, lazily.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import io
import os
import re
import shutil
import struct
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from PIL import Image, ImageFile, UnidentifiedImageError

from van_tfx import features
from van_tfx.config import DataConfig
from van_tfx.storage import write_local_text
from van_tfx.tfrecords import read_records

SYNSETS_FILE = "synsets.txt"
JPEG_QUALITY = 95
# Alpha is composited on white: ImageNet-style photos have no transparency, and black behind
# transparent logos/icons would change what the image shows.
ALPHA_BACKGROUND = (255, 255, 255)
# The largest image (width x height, from its header) the converter accepts: Transform's
# data.max_image_pixels default, so the converter never writes a record Transform refuses.
MAX_PIXELS: int = DataConfig.model_fields["max_image_pixels"].default
# EXIF Orientation (tag 0x0112; XMP's tiff:Orientation when EXIF has none, as PIL reads it): the
# transpose that shows the stored pixels upright, for 2-8 (1 is upright). The table of PIL's
# ImageOps.exif_transpose, applied by hand because exif_transpose parses the EXIF with PIL's
# getexif, which is not safe on hostile EXIF (see exif_orientation).
EXIF_ORIENTATION_TAG = 0x0112
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# exif_orientation's answer for EXIF that cannot be parsed or an orientation that is not 1-8.
UNREADABLE_ORIENTATION = 0


class InvalidImageError(ValueError):
    """A file that is not a decodable image; the message names the file and the reason."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{escaped(path)}: {reason}")
        self.path = path
        self.reason = reason


class SynsetListError(ValueError):
    """A synset list or mapping that does not match the images being converted."""


@dataclass(frozen=True)
class ImageRecord:
    """One labelled image, already normalised to RGB JPEG bytes."""

    jpeg: bytes
    height: int
    width: int
    label: int  # 1-based position of `synset` in the sorted synset list
    synset: str
    text: str
    filename: str | bytes  # bytes: a file system name as it is, UTF-8 or not


class ConvertedImage(NamedTuple):
    """One image as the converter stores it, and the EXIF orientation of its source."""

    jpeg: bytes
    height: int
    width: int
    orientation: int = 1  # the source's EXIF orientation 1-8, or UNREADABLE_ORIENTATION


def to_rgb_jpeg(
    data: bytes,
    name: str = "<bytes>",
    max_pixels: int = MAX_PIXELS,
    apply_exif_orientation: bool = False,
) -> ConvertedImage:
    """Decode any PIL-readable image and return it as RGB JPEG bytes with their size."""
    # RGB JPEGs are kept byte-for-byte; PNG, grayscale, CMYK, palette and alpha images are converted
    # (alpha composited on white) and re-encoded, as TF's build_imagenet_data.py does. An image
    # whose header declares more than `max_pixels` pixels is refused before it is decoded. With
    # `apply_exif_orientation`, an image whose EXIF orientation is 2-8 is turned upright and
    # re-encoded; otherwise the orientation is only reported, and the pixels stored as they lie.
    image = _decode_fully(data, name, max_pixels)
    orientation = exif_orientation(image)
    turn = UPRIGHT.get(orientation) if apply_exif_orientation else None
    if image.format == "JPEG" and image.mode == "RGB" and turn is None:
        return ConvertedImage(data, image.height, image.width, orientation)
    rgb = _as_rgb(image)
    if turn is not None:
        # Width x height is unchanged by a transpose, so the header's pixel bound still holds.
        rgb = rgb.transpose(turn)
    out = io.BytesIO()
    # No exif= argument: the new JPEG carries no EXIF, so no reader can turn it a second time.
    rgb.save(out, format="JPEG", quality=JPEG_QUALITY)
    return ConvertedImage(out.getvalue(), rgb.height, rgb.width, orientation)


def exif_orientation(image: Image.Image) -> int:
    """The image's EXIF orientation: 1-8, 1 without one, UNREADABLE_ORIENTATION if unusable."""
    # Read here, not with PIL's getexif: that loads every tag of the block, each value as long
    # as its entry declares, so a 4 MB PNG whose eXIf chunk has 65,535 entries declaring 1 MB
    # values each asked for 64 GB (the process was killed). This reads the entries of the first
    # IFD, 12 bytes each, in place. Hostile EXIF never fails the image: TF's decoders ignore
    # EXIF, so the image itself is fine, and it is stored as its pixels lie.
    info = image.info
    try:
        if hasattr(image, "tag_v2"):  # a TIFF: its own first IFD, parsed when it was opened
            value = image.tag_v2.get(EXIF_ORIENTATION_TAG)
        elif "exif" in info:  # JPEG APP1, PNG eXIf, WebP EXIF: a TIFF-structured block
            value = _tiff_orientation(info["exif"])
        elif "Raw profile type exif" in info:  # PNG text from ImageMagick: hex after 3 lines
            text = info["Raw profile type exif"]
            value = _tiff_orientation(bytes.fromhex("".join(text.split("\n")[3:])))
        else:
            value = None
        if value is None:  # as PIL's getexif: XMP's tiff:Orientation when EXIF has none
            xmp = info.get("XML:com.adobe.xmp") or info.get("xmp") or b""
            if isinstance(xmp, str):
                xmp = xmp.encode("utf-8", "replace")
            found = _XMP_ORIENTATION.search(xmp) if isinstance(xmp, bytes) else None
            value = int(found[2]) if found else 1
    except Exception:  # metadata never fails an image (struct.error, ValueError, ...)
        return UNREADABLE_ORIENTATION
    # An integer 1-8 only: 0, 9, text or a list is malformed, and turning an image by a guess
    # would store it other than the camera meant as often as not.
    if type(value) is int and 1 <= value <= 8:
        return value
    return UNREADABLE_ORIENTATION


# PIL's own pattern for the orientation in XMP (Image.getexif).
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(="|>)([0-9])')


def _tiff_orientation(block: bytes) -> int | None:
    # The orientation tag of a TIFF-structured EXIF block's first IFD (None: no such tag);
    # struct.error or ValueError when the block is not one.
    block = block.removeprefix(b"Exif\0\0")
    order = {b"MM\0*": ">", b"II*\0": "<"}.get(block[:4])
    if order is None:
        raise ValueError("not a TIFF header")
    (ifd,) = struct.unpack_from(order + "I", block, 4)
    (entries,) = struct.unpack_from(order + "H", block, ifd)
    for k in range(entries):  # at most 65,535, each read in place
        tag, kind, count = struct.unpack_from(order + "HHI", block, ifd + 2 + 12 * k)
        if tag == EXIF_ORIENTATION_TAG:
            # One SHORT (as EXIF says; a LONG, as PIL also reads), left-justified in the value.
            if count != 1 or kind not in (3, 4):
                raise ValueError("the orientation is not one integer")
            size = "H" if kind == 3 else "I"
            return struct.unpack_from(order + size, block, ifd + 2 + 12 * k + 8)[0]
    return None


# What PIL holds while it opens an image with TIFF-structured directories (a TIFF's IFD chain,
# walked whole for n_frames; a JPEG's MPF segment, loaded and decoded tag by tag): every entry's
# declared value, read from wherever its offset points. Values may overlap, so a 1 MB TIFF of
# 1,000 tags pointing at one 1 MB run cost 3 GB, and a 66 KB JPEG's MPF segment of 1,000 LONG
# tags spanning the segment 650 MB and 12 s. A well-formed file stores each value once: the
# directories and values fit in the bytes that carry them, with this much room for values that
# several frames share.
SHARED_TAG_BYTES = 1 << 20


def check_tag_directories(data: bytes, name: str = "<bytes>") -> None:
    """InvalidImageError naming `name` if `data`'s TIFF-style directories overstate their size."""
    # The directories are those PIL loads while opening `data` (a TIFF's IFDs, a JPEG's MPF
    # segments); they fail when they declare more bytes of directories and tag values than the bytes
    # that carry them (plus SHARED_TAG_BYTES). The walk stops there, so it costs at most one pass
    # over `data`. Anything else is left for the decoder to judge.
    if data[:3] == b"\xff\xd8\xff":
        for segment in _jpeg_mpf_segments(data):
            _check_directories(segment, name, "JPEG's MPF segment")
    elif data[:4] in _TIFF_PREFIXES:
        _check_directories(data, name, "TIFF file")


_TIFF_PREFIXES = (b"MM\0*", b"II*\0", b"MM*\0", b"II\0*", b"MM\0+", b"II+\0")  # PIL's


def _jpeg_mpf_segments(data: bytes) -> Iterator[bytes]:
    # The markers before the scan as PIL's JPEG reader walks them: fill bytes and junk between
    # markers skipped, a segment's length believed as far as the data goes.
    from PIL.JpegImagePlugin import MARKER

    position = 2
    while (position := data.find(b"\xff", position)) != -1 and position + 1 < len(data):
        marker = 0xFF00 | data[position + 1]
        if marker in (0xFF00, 0xFFFF) or marker not in MARKER:
            position += 1
            continue
        position += 2
        if MARKER[marker][2] is None:  # no segment (RSTn, SOI, EOI, ...)
            continue
        if marker == 0xFFDA or position + 2 > len(data):  # the scan: PIL reads no further
            return
        length = int.from_bytes(data[position : position + 2], "big")
        segment = data[position + 2 : position + length]
        if marker == 0xFFE2 and segment.startswith(b"MPF\0"):
            yield segment[4:]
        position += max(length, 2)


def _check_directories(block: bytes, name: str, container: str) -> None:
    from PIL.TiffImagePlugin import ImageFileDirectory_v2

    units = {kind: size for kind, (size, _) in ImageFileDirectory_v2._load_dispatch.items()}
    order = ">" if block[:2] == b"MM" else "<"
    big = block[2:3] == b"+"
    entry_size, count_format, small = (20, "Q", 8) if big else (12, "I", 4)
    budget = len(block) + SHARED_TAG_BYTES
    declared, seen = 0, set()
    try:
        (offset,) = struct.unpack_from(order + ("Q" if big else "I"), block, 8 if big else 4)
        while offset and offset not in seen:  # PIL stops at a directory it has loaded
            seen.add(offset)
            (entries,) = struct.unpack_from(order + ("Q" if big else "H"), block, offset)
            declared += (16 if big else 6) + entries * entry_size  # count, entries, next
            if declared > budget:
                break
            for k in range(entries):
                kind, count = struct.unpack_from(
                    order + "H" + count_format,
                    block,
                    offset + (8 if big else 2) + 2 + k * entry_size,
                )
                size = count * units.get(kind, 0)
                declared += size if size > small else 0
                if declared > budget:
                    break
            if declared > budget:
                break
            (offset,) = struct.unpack_from(
                order + ("Q" if big else "I"),
                block,
                offset + (8 if big else 2) + entries * entry_size,
            )
    except struct.error:  # a directory cut off: PIL stops or fails there itself
        pass
    if declared > budget:
        raise InvalidImageError(
            name,
            f"its {container} declares more than {budget} bytes of directories and tag values "
            f"({len(block)} bytes of its own, each value counted where an entry points to it; "
            f"values read over and over would cost a decoder many times the file)",
        )


def upright_image_bytes(data: bytes, name: str = "<bytes>", max_pixels: int = MAX_PIXELS) -> bytes:
    """`data` as is, unless its EXIF orientation is 2-8: then upright, re-encoded as RGB JPEG."""
    # For clients (`van-tfx predict --apply-exif-orientation`) of a model trained on
    # `data build --apply-exif-orientation`: the same transform, so serving sees what training saw.
    try:
        check_tag_directories(data, name)
        with _own_pixel_limit(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as probe:  # the header and its EXIF, not the pixels
                orientation = exif_orientation(probe)
    except Exception:
        return data  # not an image PIL reads: the server says what is wrong with it
    if orientation not in UPRIGHT:
        return data
    return to_rgb_jpeg(data, name, max_pixels, apply_exif_orientation=True).jpeg


@contextlib.contextmanager
def _own_pixel_limit() -> Iterator[None]:
    # The caller checks max_pixels from the header; PIL's own limit would warn (into the progress
    # bar) or refuse with a message of its own, at a bound that is not Transform's.
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _decode_fully(data: bytes, name: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    # verify() catches structural damage; load() catches truncation (a second open is required).
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES must be False to detect truncation")
    check_tag_directories(data, name)
    try:
        # PIL warns about damaged metadata (a JPEG's EXIF is parsed while opening it); those
        # warnings would print into the progress bar, and the metadata is not what is stored.
        with _own_pixel_limit(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as probe:  # reads the header only
                if probe.width * probe.height > max_pixels:
                    raise InvalidImageError(
                        name,
                        f"image too large ({probe.width}x{probe.height} = "
                        f"{probe.width * probe.height} pixels, more than the limit of "
                        f"{max_pixels}: data.max_image_pixels, --max-image-pixels)",
                    )
                probe.verify()
            image = Image.open(io.BytesIO(data))
            image.load()
    except InvalidImageError:
        raise
    except UnidentifiedImageError:
        kind = _signature_format(data)
        reason = (
            f"a damaged {kind} file: its header cannot be read"
            if kind
            else "not an image format PIL reads"
        )
        raise InvalidImageError(name, f"not a decodable image ({reason})") from None
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        reason = _ADDRESS.sub("", str(exc)) or type(exc).__name__
        raise InvalidImageError(name, f"not a decodable image ({reason})") from None
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)  # animated GIF/PNG: the first frame, as tf.io.decode_image would
    return image


# The first bytes of the formats PIL reads for us. A file that starts like one but that PIL cannot
# identify is that format, damaged (e.g. its frame header): "not an image format PIL reads" sent
# users of a .jpg looking for missing JPEG support.
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)


def _signature_format(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((kind for magic, kind in _SIGNATURES if data.startswith(magic)), "")


# " at 0x7f3a..." in a repr: a memory address, different in every run.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _as_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA") or image.mode.endswith("A"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, ALPHA_BACKGROUND)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale PNG: scale to 8 bits instead of clipping.
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB")


# A file was read whole before its header was looked at: a 3 GB file in a class folder took
# 3 GB of memory and 297 s (PIL's JPEG reader skips junk a byte at a time) to be refused as not an
# image. No image within the pixel budget is larger than its pixels stored uncompressed at 16-bit
# RGBA (8 bytes a pixel), plus this much room for metadata (ICC profiles, XMP, thumbnails).
FILE_METADATA_BYTES = 64 << 20


def max_file_bytes(max_pixels: int) -> int:
    """The largest image file the converter reads for a pixel budget of `max_pixels`."""
    return max_pixels * 8 + FILE_METADATA_BYTES


def _read_at_most(handle, count: int) -> bytes:
    # In pieces: read(count) allocates `count` bytes up front, however short the file is.
    pieces, left = [], count
    while left and (piece := handle.read(min(left, 16 << 20))):
        pieces.append(piece)
        left -= len(piece)
    return b"".join(pieces)


def _too_large_file(size: int, limit: int, max_pixels: int) -> str:
    return (
        f"file of {size} bytes, more than an image within the pixel budget can take ({limit} "
        f"bytes: {max_pixels} pixels at 8 bytes, 16-bit RGBA uncompressed, plus "
        f"{FILE_METADATA_BYTES} of metadata; data.max_image_pixels, --max-image-pixels); not read"
    )


def load_image_file(
    path: str, max_pixels: int = MAX_PIXELS, apply_exif_orientation: bool = False
) -> ConvertedImage:
    """Read one file and normalise it to RGB JPEG; raises InvalidImageError naming it."""
    limit = max_file_bytes(max_pixels)
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > limit:
                raise InvalidImageError(path, _too_large_file(size, limit, max_pixels))
            data = _read_at_most(handle, limit + 1)  # bounded even if the file grows
    except OSError as exc:
        raise InvalidImageError(path, f"cannot read file ({exc.strerror})") from None
    if len(data) > limit:
        raise InvalidImageError(path, _too_large_file(len(data), limit, max_pixels))
    if not data:
        raise InvalidImageError(path, "empty file")
    return to_rgb_jpeg(data, path, max_pixels, apply_exif_orientation)


# ---- synset lists -----------------------------------------------------------------------------


def read_synset_mapping(path: str | os.PathLike) -> dict[str, str]:
    """Parse `synset text...` lines (synsets.txt / LOC_synset_mapping.txt / tab-separated)."""
    if Path(path).is_dir():
        raise SynsetListError(f"{path}: is a directory, not a synset list")
    return parse_synset_mapping(Path(path).read_bytes(), str(path))


def parse_synset_mapping(data: bytes, source: str) -> dict[str, str]:
    """The `synset text...` lines of a synset list's bytes; SynsetListError on a malformed one."""
    # The SynsetListError names `source` and the line of anything that is not one synset per line of
    # UTF-8 text.
    try:
        text = data.decode("utf-8-sig")  # a byte order mark is not part of the first synset
    except UnicodeDecodeError as exc:
        raise SynsetListError(
            f"{source}: not UTF-8 text (byte {exc.start} is {data[exc.start : exc.start + 1]!r})"
        ) from None
    mapping: dict[str, str] = {}
    # Lines end at \n (CRLF too), as every reader of the class list splits them; splitlines()
    # would also split at \x0c, \x1c or U+2028 and count classes no other reader sees.
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.strip().split(None, 1)
        synset = parts[0]
        if synset in mapping:
            raise SynsetListError(f"{source}:{number}: synset {synset!r} is listed twice")
        mapping[synset] = parts[1].strip() if len(parts) > 1 else synset
    return mapping


def synset_name_problem(name: str) -> str | None:
    """Why `name` would not read back unchanged from a synset list, or None if it would."""
    # Exactly what parse_synset_mapping keeps of a `name text` line as its synset.
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "is not UTF-8 text"
    if not name:
        return "is empty"
    space = next((c for c in name if c.isspace()), None)
    if space is not None:
        return f"contains whitespace or a line break ({space!r}; a synset is the line's first word)"
    if name.startswith("#"):
        return "starts with '#' (a comment line in synsets.txt)"
    if name.startswith("\ufeff"):
        return "starts with a byte order mark (U+FEFF)"
    return None


def escaped(name: str) -> str:
    """`name` on one line, unambiguously: non-UTF-8 bytes as \\xNN, controls as \\n, \\t, \\x01."""
    out = []
    for c in name:
        if "\udc80" <= c <= "\udcff":  # os.fsdecode's stand-in for a byte that is not UTF-8
            out.append(f"\\x{ord(c) - 0xDC00:02x}")
        elif c == "\\":
            out.append("\\\\")
        elif c.isprintable():
            out.append(c)
        else:
            out.append(c.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def write_synset_list(path: str | os.PathLike, texts: dict[str, str]) -> None:
    """Write the synset list (one `synset text` line each, in label order) atomically."""
    for synset, text in texts.items():
        problem = synset_name_problem(synset)
        if problem is None and ("\n" in text or "\r" in text):
            problem = f"has a class text with a line break ({escaped(text)})"
        if problem:
            raise SynsetListError(f"synset {escaped(synset)} {problem}; {path} would misread it")
    body = "".join(f"{synset} {text}\n" for synset, text in texts.items())
    make_output_dir(Path(path).parent)
    write_local_text(path, body)


def label_of(synsets: list[str]) -> dict[str, int]:
    """Map each synset to its 1-based label (its position in the list)."""
    return {synset: index for index, synset in enumerate(synsets, start=1)}


# ---- tf.Example encoding ----------------------------------------------------------------------


def example_bytes(record: ImageRecord) -> bytes:
    """Serialize one record as an ImageNet-style tf.Example (TF's build_imagenet_data.py keys)."""
    import tensorflow as tf

    def b(value: str | bytes):
        value = value.encode() if isinstance(value, str) else value
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    def i(value: int):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))

    feature = {
        features.IMAGE_ENCODED: b(record.jpeg),
        features.IMAGE_FORMAT: b("JPEG"),
        features.IMAGE_HEIGHT: i(record.height),
        features.IMAGE_WIDTH: i(record.width),
        features.IMAGE_CHANNELS: i(3),
        features.IMAGE_COLORSPACE: b("RGB"),
        features.IMAGE_FILENAME: b(record.filename),
        features.LABEL: i(record.label),
        features.SYNSET: b(record.synset),
        features.CLASS_TEXT: b(record.text),
    }
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    # Map fields serialize in arbitrary order unless asked: same input must give the same bytes.
    return example.SerializeToString(deterministic=True)


# A split names files and is matched by glob patterns: letters, digits, '_', '-', '.', and not
# hidden ('.' first), so never a pattern ('*'), a path ('../x') or empty.
SPLIT_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")


def check_split_name(split: str) -> str:
    """`split` if it is a simple name (SPLIT_NAME); ValueError saying what it must be otherwise."""
    if not isinstance(split, str) or not SPLIT_NAME.fullmatch(split):
        raise ValueError(
            f"split name must be letters, digits, '_', '-' or '.' (not first): got {split!r}"
        )
    return split


def shard_name(split: str, index: int, num_shards: int) -> str:
    """`<split>-NNNNN-of-MMMMM`, the ImageNet TFRecord naming."""
    return f"{check_split_name(split)}-{index:05d}-of-{num_shards:05d}"


def write_split(
    records: Iterable[ImageRecord], output_dir: str | os.PathLike, split: str, num_shards: int
) -> list[Path]:
    """Write records round-robin into `num_shards` shards, atomically per split; return paths."""
    # The records are held in memory (for the sample, tests and benchmarks) and written one shard
    # file at a time, so any shard count fits within the open-file limit.
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    records = list(records)
    return write_shards(
        (records[k::num_shards] for k in range(num_shards)), output_dir, split, num_shards
    )


def write_shards(
    shards: Iterable[Iterable[ImageRecord]],
    output_dir: str | os.PathLike,
    split: str,
    num_shards: int,
) -> list[Path]:
    """Write shard k from the k-th iterable, one open file at a time, atomically per split."""
    # `shards` is asked for one more item after the last shard (none may come): a generator can run
    # its final checks there, and raise to abort, while the split is still temporary.
    import tensorflow as tf

    names = [shard_name(split, k, num_shards) for k in range(num_shards)]
    shards = iter(shards)
    with _split_in_place(Path(output_dir), split, names) as tmp_dir:
        for name in names:
            try:
                with tf.io.TFRecordWriter(str(tmp_dir / name)) as writer:
                    for record in next(shards, ()):
                        writer.write(example_bytes(record))
            except tf.errors.OpError as exc:  # full disk, file size limit, ...: name the shard
                reason = exc.message.rsplit("; ", 1)[-1]
                raise OSError(errno.EIO, reason, str(Path(output_dir) / name)) from None
        if next(shards, None) is not None:
            raise ValueError(f"more than num_shards={num_shards} shards given for split {split}")
    return [Path(output_dir) / name for name in names]


def make_output_dir(path: Path) -> None:
    """Create the directory `path`; an OSError names it (e.g. a file of that name is there)."""
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", str(path))
    path.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def _split_in_place(output_dir: Path, split: str, names: list[str]) -> Iterator[Path]:
    # Shards are written to a temporary directory inside output_dir and renamed into place
    # (replacing any older shards of the split) only when writing succeeded, so a failed or
    # interrupted run never leaves a complete-looking split behind.
    make_output_dir(output_dir)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".tmp-{split}-", dir=output_dir))
    try:
        yield tmp_dir
        remove_split(output_dir, split)
        for name in names:
            os.replace(tmp_dir / name, output_dir / name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def remove_split(output_dir: Path, split: str) -> None:
    """Delete existing `<split>-*-of-*` shards (a rewrite may use a different shard count)."""
    for old in output_dir.glob(f"{glob.escape(check_split_name(split))}-?????-of-?????"):
        old.unlink()


# ---- reading ----------------------------------------------------------------------------------


def iter_shard(path: str | os.PathLike) -> Iterator[bytes]:
    """Yield the serialized records of one shard; CorruptShardError names a damaged shard."""
    return read_records(str(path))


def read_examples(paths: Iterable[str | os.PathLike]) -> Iterator[dict]:
    """Yield each record of the shards as a dict of plain Python values (for tests and tools)."""
    import tensorflow as tf

    for path in paths:
        for raw in iter_shard(path):
            parsed = tf.train.Example.FromString(raw).features.feature
            yield {key: _plain(value) for key, value in parsed.items()}


def _plain(feature) -> object:
    kind = feature.WhichOneof("kind")
    values = list(getattr(feature, kind).value) if kind else []
    return values[0] if len(values) == 1 else values
