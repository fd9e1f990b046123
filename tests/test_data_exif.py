"""EXIF orientation in `van-tfx data build` and `van-tfx predict`, on real images made by PIL."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps, PngImagePlugin

from van_tfx import features
from van_tfx.cli import main
from van_tfx.data.records import (
    UNREADABLE_ORIENTATION,
    UPRIGHT,
    InvalidImageError,
    exif_orientation,
    load_image_file,
    read_examples,
    to_rgb_jpeg,
    upright_image_bytes,
)

# What each EXIF orientation asks a viewer to do to the stored rows and columns (EXIF 2.32,
# tag 0x0112), written in numpy independently of PIL: the reference the converter must match.
REFERENCE = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # upside down
    4: lambda a: a[::-1],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # mirrored along the main diagonal
    6: lambda a: np.rot90(a, -1),  # rotate 90 degrees clockwise to view
    7: lambda a: np.rot90(a, -1)[::-1],  # mirrored along the other diagonal
    8: lambda a: np.rot90(a, 1),  # rotate 90 degrees counter-clockwise to view
}


def photo(width: int = 48, height: int = 32) -> np.ndarray:
    """A smooth RGB picture that no flip or rotation maps onto itself."""
    y, x = np.mgrid[0:height, 0:width]
    red = 255 * x / max(width - 1, 1)
    green = 255 * y / max(height - 1, 1)
    blue = np.where((x < width // 3) & (y < height // 2), 230, 20)
    return np.stack([red, green, blue], axis=-1).astype(np.uint8)


def jpeg(pixels: np.ndarray, orientation: int | None = None, mode: str = "RGB", **save) -> bytes:
    """`pixels` as a JPEG carrying EXIF `orientation` (none when None), as a camera writes it."""
    image = Image.fromarray(pixels).convert(mode)
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        save["exif"] = exif.tobytes()
    out = io.BytesIO()
    image.save(out, "JPEG", quality=save.pop("quality", 95), **save)
    return out.getvalue()


def with_app1(data: bytes, payload: bytes) -> bytes:
    """A JPEG with a raw APP1 segment (an EXIF block as hostile as wanted) after its SOI."""
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:]


def png_with_exif_chunk(pixels: np.ndarray, blob: bytes) -> bytes:
    """A PNG whose eXIf chunk holds `blob` (PNG's EXIF, any size)."""
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    data = out.getvalue()
    chunk = b"eXIf" + blob
    eXIf = struct.pack(">I", len(blob)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return data[:33] + eXIf + data[33:]  # after the signature and IHDR


def decoded(data: bytes) -> np.ndarray:
    """The pixels as stored, EXIF ignored (as TensorFlow and TF Serving decode them)."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def tiff_ifd(entries: list[tuple[int, int, int, int]], count: int | None = None) -> bytes:
    """An EXIF block: big-endian TIFF header and one IFD of (tag, type, count, value) entries."""
    n = len(entries) if count is None else count
    body = b"".join(struct.pack(">HHII", *entry) for entry in entries)
    return b"Exif\0\0MM\0*" + struct.pack(">IH", 8, n) + body + b"\0\0\0\0"


@pytest.fixture()
def phone_photos(tmp_path) -> Path:
    """IMAGE_DIR with JPEGs a phone writes: sideways (6), upside down (3), upright, untagged."""
    root = tmp_path / "img"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "a" / "six.jpg").write_bytes(jpeg(photo(), 6))
    (root / "a" / "three.jpg").write_bytes(jpeg(photo(40, 24), 3))
    (root / "a" / "plain.jpg").write_bytes(jpeg(photo()))
    (root / "b" / "one.jpg").write_bytes(jpeg(photo(), 1))
    # Grayscale is always re-encoded; with the flag it is turned upright on the way.
    (root / "b" / "gray8.jpg").write_bytes(jpeg(photo(), 8, mode="L"))
    return root


def records_by_name(out: Path) -> dict[str, dict]:
    """The records of OUTPUT_DIR's train split by image/filename."""
    return {
        r[features.IMAGE_FILENAME].decode(): r for r in read_examples(sorted(out.glob("train-*")))
    }


def test_by_default_oriented_photos_are_stored_as_they_lie_and_counted(
    phone_photos, tmp_path, capsys
):
    # A folder of phone photos trained on sideways images and nothing said so.
    import tensorflow as tf

    out = tmp_path / "out"
    assert main(["data", "build", str(phone_photos), str(out), "--workers", "1"]) == 0
    summary = capsys.readouterr().out
    assert "3 image(s) carry an EXIF orientation other than 1 (3: 1, 6: 1, 8: 1; e.g. " in summary
    assert "stored as their pixels lie" in summary
    assert "TF Serving read them (EXIF ignored)" in summary
    assert "--apply-exif-orientation stores them upright" in summary
    records = records_by_name(out)
    for name in ("a/six.jpg", "a/three.jpg", "a/plain.jpg", "b/one.jpg"):
        assert records[name][features.IMAGE_ENCODED] == (phone_photos / name).read_bytes()
    six = records["a/six.jpg"]
    assert (six[features.IMAGE_HEIGHT], six[features.IMAGE_WIDTH]) == (32, 48)  # as stored
    # What the pipeline, the trainer and TF Serving see: the stored pixels, EXIF ignored.
    assert tf.io.decode_jpeg(six[features.IMAGE_ENCODED]).shape == (32, 48, 3)
    gray = records["b/gray8.jpg"]  # re-encoded as RGB, not turned
    assert (gray[features.IMAGE_HEIGHT], gray[features.IMAGE_WIDTH]) == (32, 48)
    reference = decoded(jpeg(photo(), mode="L"))
    assert np.abs(decoded(gray[features.IMAGE_ENCODED]) - reference).mean() < 3


def test_apply_exif_orientation_stores_them_upright_and_says_so(phone_photos, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["data", "build", str(phone_photos), str(out), "--workers", "1"]
    assert main([*argv, "--apply-exif-orientation"]) == 0
    assert "3 image(s) carry an EXIF orientation other than 1" in capsys.readouterr().out
    records = records_by_name(out)
    for name, orientation in (("a/six.jpg", 6), ("a/three.jpg", 3), ("b/gray8.jpg", 8)):
        record = records[name]
        stored = record[features.IMAGE_ENCODED]
        upright = REFERENCE[orientation](decoded((phone_photos / name).read_bytes()))
        assert decoded(stored).shape == upright.shape, name
        assert (record[features.IMAGE_HEIGHT], record[features.IMAGE_WIDTH]) == upright.shape[:2]
        assert np.abs(decoded(stored) - upright).mean() < 3, name
        # No EXIF left to turn it again, in a viewer or in a later `predict --apply-...`.
        assert 0x0112 not in Image.open(io.BytesIO(stored)).getexif()
    for name in ("a/plain.jpg", "b/one.jpg"):  # upright already: byte for byte
        assert records[name][features.IMAGE_ENCODED] == (phone_photos / name).read_bytes()


def test_the_pixel_bound_holds_for_images_turned_upright(tmp_path, capsys):
    # 48x32 = 1,536 pixels either way up: refused from its header before it is decoded (the
    # image data is cut short, and the reason is "too large", not "truncated").
    data = jpeg(photo(), 6)
    root = tmp_path / "img"
    (root / "a").mkdir(parents=True)
    (root / "a" / "big.jpg").write_bytes(data[: data.index(b"\xff\xda") + 20])  # SOS + a bit
    (root / "a" / "ok.jpg").write_bytes(data)
    argv = ["data", "build", str(root), str(tmp_path / "o"), "--workers", "1"]
    assert main([*argv, "--apply-exif-orientation", "--max-image-pixels", "1535"]) == 1
    err = capsys.readouterr().err
    assert "big.jpg: image too large (48x32 = 1536 pixels" in err
    assert "ok.jpg: image too large (48x32 = 1536 pixels" in err
    (root / "a" / "big.jpg").unlink()
    assert main([*argv, "--apply-exif-orientation", "--max-image-pixels", "1536"]) == 0
    [record] = records_by_name(tmp_path / "o").values()
    assert (record[features.IMAGE_HEIGHT], record[features.IMAGE_WIDTH]) == (48, 32)


HOSTILE = {
    # (the EXIF block, what exif_orientation makes of it)
    "not TIFF": (b"Exif\0\0" + bytes(range(256)) * 40, UNREADABLE_ORIENTATION),
    "entries past the end, orientation first": (
        tiff_ifd([(0x0112, 3, 1, 6 << 16)], count=0xFFFF),
        6,
    ),
    "entries past the end": (tiff_ifd([(0x0100, 3, 1, 6 << 16)], count=0xFFFF), 0),
    "a 4 GB orientation": (tiff_ifd([(0x0112, 3, 0xFFFFFFFF, 8)]), UNREADABLE_ORIENTATION),
    "4 GB values": (tiff_ifd([(0x0128 + k, 4, 0xFFFFFFFF, 8) for k in range(9)]), 1),
    "orientation 9": (tiff_ifd([(0x0112, 3, 1, 9 << 16)]), UNREADABLE_ORIENTATION),
    "orientation 6 as a LONG": (tiff_ifd([(0x0112, 4, 1, 6)]), 6),  # odd, not hostile: as PIL
    "orientation 0": (tiff_ifd([(0x0112, 3, 1, 0)]), UNREADABLE_ORIENTATION),
    "orientation as text": (tiff_ifd([(0x0112, 2, 4, 0x36000000)]), UNREADABLE_ORIENTATION),
    "first IFD past the end": (b"Exif\0\0MM\0*\xff\xff\xff\xf0", UNREADABLE_ORIENTATION),
    "empty": (b"Exif\0\0", UNREADABLE_ORIENTATION),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_exif_in_a_jpeg_neither_raises_nor_warns(name):
    blob, expected = HOSTILE[name]
    data = with_app1(jpeg(photo()), blob)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's own open warns ("Truncated File Read")
        image = Image.open(io.BytesIO(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert exif_orientation(image) == expected
        converted = to_rgb_jpeg(data, name, apply_exif_orientation=True)
    # None reaches the progress bar (PIL warns about damaged EXIF while opening a JPEG).
    assert [str(w.message) for w in caught] == []
    if expected in UPRIGHT:
        assert (converted.height, converted.width) == (48, 32)
    else:  # unusable or absent: kept byte for byte, as TF reads it
        assert converted.jpeg == data and converted.orientation == expected


def test_exif_pil_cannot_parse_is_taken_as_orientation_1_and_counted(tmp_path, capsys):
    # PIL's getexif raises on a PNG's "Raw profile type exif" text that is not hex; the image
    # itself decodes (and TF ignores EXIF), so it is kept, counted, not refused.
    info = PngImagePlugin.PngInfo()
    info.add_text("Raw profile type exif", "\nexif\n  12\nthis is not hex")
    bad_png = io.BytesIO()
    Image.fromarray(photo()).save(bad_png, "PNG", pnginfo=info)
    with pytest.raises(ValueError):
        Image.open(io.BytesIO(bad_png.getvalue())).getexif()
    root = tmp_path / "img"
    (root / "a").mkdir(parents=True)
    (root / "a" / "raw-profile.png").write_bytes(bad_png.getvalue())
    nine = with_app1(jpeg(photo()), HOSTILE["orientation 9"][0])
    (root / "a" / "nine.jpg").write_bytes(nine)
    out = tmp_path / "out"
    for flag in ([], ["--apply-exif-orientation"]):
        assert main(["data", "build", str(root), str(out), "--workers", "1", *flag]) == 0
        summary = capsys.readouterr().out
        assert "2 image(s) have EXIF that cannot be read or an orientation that is not 1-8" in (
            summary
        )
        assert "carry an EXIF orientation other than 1" not in summary
        records = records_by_name(out)
        assert records["a/nine.jpg"][features.IMAGE_ENCODED] == nine
        png = records["a/raw-profile.png"]
        assert (png[features.IMAGE_HEIGHT], png[features.IMAGE_WIDTH]) == (32, 48)


def test_hostile_exif_costs_no_memory_or_time(tmp_path):
    # A 4 MB PNG whose eXIf chunk has 65,535 entries declaring 1 MB values each: PIL's getexif
    # loads every value and asked for 64 GB (the process was killed). Now: the first IFD's
    # entries are read in place. In a child process under a 3 GB address-space limit, so a
    # regression fails the test instead of the machine.
    import subprocess
    import sys

    entries = [(0x0200 + k % 0x7000, 4, 0x3FFFF, 8) for k in range(0xFFFF)]
    blob = tiff_ifd(entries)[6:] + bytes(4_000_000)
    path = tmp_path / "bomb.png"
    path.write_bytes(png_with_exif_chunk(photo(), blob))
    script = f"""
import resource, time
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, resource.RLIM_INFINITY))
from van_tfx.data.records import load_image_file
start = time.monotonic()
converted = load_image_file({str(path)!r}, apply_exif_orientation=True)
print(converted.orientation, converted.height, converted.width, time.monotonic() - start)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    orientation, height, width, seconds = done.stdout.split()
    assert (orientation, height, width) == ("1", "32", "48") and float(seconds) < 5


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([0x0112, 0x0128, 0x8769, 0x8825, 0x011A]) | st.integers(0, 0xFFFF),
            st.integers(0, 20),
            st.sampled_from([0, 1, 2, 0xFFFFFFFF]) | st.integers(0, 2**32 - 1),
            st.integers(0, 2**32 - 1),
        ),
        max_size=6,
    ),
    st.binary(max_size=64),
    st.booleans(),
)
def test_exif_orientation_answers_for_any_exif_block(entries, tail, in_jpeg):
    # Whatever the block holds, the answer is an orientation 1-8 or "unreadable" (0), quickly,
    # and converting the image either works or is an InvalidImageError naming it.
    blob = tiff_ifd(entries) + tail
    data = (
        with_app1(jpeg(photo(16, 8)), blob)
        if in_jpeg
        else png_with_exif_chunk(photo(16, 8), blob[6:])
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            image = Image.open(io.BytesIO(data))
        except Exception:
            return  # PIL refuses the file as a whole: the converter reports it as undecodable
    assert exif_orientation(image) in range(9)
    try:
        converted = to_rgb_jpeg(data, "hostile.jpg", apply_exif_orientation=True)
    except InvalidImageError as exc:
        assert "hostile.jpg" in str(exc)
    else:
        assert converted.orientation in range(9)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 8),
    st.integers(1, 6),
    st.integers(1, 6),
    st.integers(0, 2**32 - 1),
)
def test_every_orientation_turns_upright_as_the_exif_spec_says(orientation, cols, rows, seed):
    # Blocks of 8x8 pixels in random colours: the table is exact on lossless pixels, and after
    # the JPEG round trip the stored image is nearest to the spec's transform of the source.
    blocks = np.random.default_rng(seed).integers(0, 256, (rows, cols, 3), dtype=np.uint8)
    pixels = blocks.repeat(8, axis=0).repeat(8, axis=1)
    expected = REFERENCE[orientation](pixels)
    turned = Image.fromarray(pixels).transpose(UPRIGHT[orientation]) if orientation > 1 else None
    assert turned is None or np.array_equal(np.asarray(turned), expected)
    lossless = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(lossless, "PNG", exif=exif.tobytes())
    source = Image.open(io.BytesIO(lossless.getvalue()))
    assert exif_orientation(source) == orientation
    assert np.array_equal(np.asarray(ImageOps.exif_transpose(source)), expected)  # PIL agrees

    data = jpeg(pixels, orientation, quality=100)
    kept = to_rgb_jpeg(data)
    assert kept.jpeg == data and kept.orientation == orientation  # default: as it lies
    upright = to_rgb_jpeg(data, apply_exif_orientation=True)
    stored = decoded(upright.jpeg)
    assert (upright.height, upright.width) == stored.shape[:2] == expected.shape[:2]
    error = np.abs(stored - REFERENCE[orientation](decoded(data))).mean()
    # Every transform that gives other pixels (not all do, on symmetric blocks) is further off.
    others = {
        o: np.abs(stored - transform(decoded(data))).mean()
        for o, transform in REFERENCE.items()
        if transform(pixels).shape == expected.shape
        and not np.array_equal(transform(pixels), expected)
    }
    assert error < 8 and all(error < other for other in others.values()), (error, others)
    if orientation == 1:
        assert upright.jpeg == data


TAGS = {  # some tags a camera writes, with values of their types
    0x010F: st.text("abcXYZ ", max_size=12),  # Make
    0x0110: st.text("abc123", max_size=12),  # Model
    0x0131: st.text("abc.1", max_size=8),  # Software
    0x0128: st.integers(1, 3),  # ResolutionUnit
    0x0213: st.integers(1, 2),  # YCbCrPositioning
}


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 8) | st.none(),
    st.fixed_dictionaries({}, optional=TAGS),
    st.booleans(),
)
def test_the_orientation_reader_agrees_with_pil_on_well_formed_exif(orientation, tags, big_endian):
    # The converter reads the tag itself (PIL's getexif is not safe on hostile EXIF); on EXIF
    # a camera or PIL writes, it reads what PIL reads.
    exif = Image.Exif()
    exif.endian = ">" if big_endian else "<"
    for tag, value in tags.items():
        exif[tag] = value
    if orientation is not None:
        exif[0x0112] = orientation
    data = jpeg(photo(16, 8), None, exif=exif.tobytes())
    image = Image.open(io.BytesIO(data))
    assert exif_orientation(image) == image.getexif().get(0x0112, 1) == (orientation or 1)


def test_upright_image_bytes_leaves_every_other_input_alone():
    plain = jpeg(photo())
    assert upright_image_bytes(plain) is plain
    assert upright_image_bytes(b"not an image") == b"not an image"  # the server will say
    png = io.BytesIO()
    Image.fromarray(photo()).save(png, "PNG")
    assert upright_image_bytes(png.getvalue()) == png.getvalue()
    sideways = upright_image_bytes(jpeg(photo(), 6), "six.jpg")
    assert decoded(sideways).shape == (48, 32, 3)
    with pytest.raises(InvalidImageError, match="six.jpg: image too large"):
        upright_image_bytes(jpeg(photo(), 6), "six.jpg", max_pixels=100)


def test_predict_sends_what_a_model_trained_with_the_same_flag_saw(tmp_path, monkeypatch):
    # `predict` sends file bytes; the server decodes them as TF Serving does, EXIF ignored, as
    # the default converter stores them. With the flag it sends them upright, as
    # `data build --apply-exif-orientation` stores them.
    from serving import client

    sent = []

    def fake_predict(server, images, *args):
        sent.append(list(images))
        return [[] for _ in images]

    monkeypatch.setattr(client, "predict_images", fake_predict)
    six, plain = tmp_path / "six.jpg", tmp_path / "plain.jpg"
    six.write_bytes(jpeg(photo(), 6))
    plain.write_bytes(jpeg(photo()))
    argv = ["predict", str(six), str(plain), "--server", "127.0.0.1:1"]
    assert main(argv) == 0
    assert sent[-1] == [six.read_bytes(), plain.read_bytes()]
    assert main([*argv, "--apply-exif-orientation"]) == 0
    upright, same = sent[-1]
    assert same == plain.read_bytes()
    assert np.abs(decoded(upright) - REFERENCE[6](decoded(six.read_bytes()))).mean() < 3


# ---- TIFF-structured directories PIL loads while opening an image --------------------------


def tiff_with_tags(extra: list[tuple[int, int, int, int]], pad: int, frames: int = 1) -> bytes:
    """A little-endian 1x1 gray TIFF whose IFD(s) also hold `extra` (tag, type, count, offset)
    entries; offset -1 points at `pad` zero bytes after the directories. `frames` IFDs chained."""
    base = [(256, 3, 1, 1), (257, 3, 1, 1), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
            (273, 4, 1, -2), (278, 3, 1, 1), (279, 4, 1, 1)]  # fmt: skip
    entries = base + extra
    ifd_size = 2 + 12 * len(entries) + 4
    pad_at = 8 + frames * ifd_size
    pixel_at = pad_at + pad
    ifds = []
    for frame in range(frames):
        next_at = 8 + (frame + 1) * ifd_size if frame + 1 < frames else 0
        body = b"".join(
            struct.pack("<HHII", tag, kind, count, {-1: pad_at, -2: pixel_at}.get(value, value))
            for tag, kind, count, value in entries
        )
        ifds.append(struct.pack("<H", len(entries)) + body + struct.pack("<I", next_at))
    return b"II*\0" + struct.pack("<I", 8) + b"".join(ifds) + bytes(pad) + b"\x80"


def jpeg_with_mpf(pixels: np.ndarray, mp: bytes) -> bytes:
    """A JPEG with an APP2 MPF segment holding the TIFF-structured block `mp`."""
    data = jpeg(pixels)
    payload = b"MPF\0" + mp
    return data[:2] + b"\xff\xe2" + struct.pack(">H", len(payload) + 2) + payload + data[2:]


def overlapping_mpf(tags: int) -> bytes:
    """An MPF block filling one APP2 segment, whose `tags` LONG entries all span the segment."""
    size = 65533 - 4
    count = (size - 8) // 4
    mp = b"II*\0" + struct.pack("<IH", 8, tags)
    mp += b"".join(struct.pack("<HHII", 0xB100 + k, 4, count, 8) for k in range(tags)) + bytes(4)
    return mp + b"\x07" * (size - len(mp))


def _peak_while(load) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        load()
    except InvalidImageError:
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_tiff_tags_that_overlap_are_refused_before_pil_holds_them(tmp_path):
    # 1,000 tags pointing at one 1 MB run: PIL's TIFF reader holds every value, and converting
    # the 1 MB file peaked at 3 GB. Now it is refused from the directory, naming the file.
    path = tmp_path / "tags.tif"
    path.write_bytes(tiff_with_tags([(1000 + k, 1, 1_000_000, -1) for k in range(1000)], 10**6))
    with pytest.raises(InvalidImageError, match=r"tags\.tif: its TIFF file declares more than"):
        load_image_file(str(path))
    assert _peak_while(lambda: load_image_file(str(path))) < 20_000_000


def test_a_chain_of_tiff_directories_counts_as_one_budget(tmp_path):
    # 200 frames sharing 100 tags of 60 KB: each frame alone fits the file, all of them don't.
    path = tmp_path / "frames.tif"
    path.write_bytes(
        tiff_with_tags([(1000 + k, 7, 60_000, -1) for k in range(100)], 60_000, frames=200)
    )
    with pytest.raises(InvalidImageError, match=r"frames\.tif: its TIFF file declares"):
        load_image_file(str(path))


def test_jpeg_mpf_tags_that_overlap_are_refused_before_pil_decodes_them(tmp_path):
    # A 66 KB JPEG whose MPF segment has 1,000 LONG tags spanning the segment: PIL decodes each
    # to a tuple of 16K ints, 12 s and 650 MB. Now it is refused from the directory.
    path = tmp_path / "mpf.jpg"
    path.write_bytes(jpeg_with_mpf(photo(8, 8), overlapping_mpf(1000)))
    with pytest.raises(InvalidImageError, match=r"mpf\.jpg: its JPEG's MPF segment declares"):
        load_image_file(str(path))
    assert _peak_while(lambda: load_image_file(str(path))) < 20_000_000
    assert upright_image_bytes(path.read_bytes(), str(path)) == path.read_bytes()


def test_well_formed_tiffs_and_mpos_still_convert(tmp_path):
    frames = [Image.fromarray(photo(24, 16)), Image.fromarray(photo(16, 24))]
    out = io.BytesIO()
    frames[0].save(out, "TIFF", save_all=True, append_images=frames[1:], compression="raw")
    assert to_rgb_jpeg(out.getvalue(), "two.tif")[1:3] == (16, 24)
    out = io.BytesIO()
    frames[0].save(out, "MPO", save_all=True, append_images=frames[1:])
    assert out.getvalue().count(b"MPF\0")  # PIL wrote an MP index
    assert to_rgb_jpeg(out.getvalue(), "two.mpo")[1:3] == (16, 24)
    # Tags that fit the file, even many of them, are fine.
    data = tiff_with_tags([(1000 + k, 1, 100, -1) for k in range(500)], 50_000)
    assert to_rgb_jpeg(data, "many.tif")[1:3] == (1, 1)


def _pil_tag_bytes(data: bytes) -> int:
    # What PIL's directories hold after opening `data` and counting its frames, as the
    # converter does: the raw tag values of every IFD it loaded.
    from PIL import TiffImagePlugin

    held = 0
    load = TiffImagePlugin.ImageFileDirectory_v2.load

    def counting(self, fp):
        nonlocal held
        load(self, fp)
        held += sum(map(len, self._tagdata.values()))

    TiffImagePlugin.ImageFileDirectory_v2.load = counting
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                getattr(image, "n_frames", 1)
    except Exception:
        pass
    finally:
        TiffImagePlugin.ImageFileDirectory_v2.load = load
    return held


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 0xFFFF),
            st.integers(0, 19),
            st.sampled_from([0, 1, 5, 100, 10_000, 2**31]) | st.integers(0, 2**32 - 1),
            st.sampled_from([-1, 0, 8, 30]) | st.integers(0, 2**32 - 1),
        ),
        max_size=12,
    ),
    st.integers(0, 4000),
    st.integers(1, 6),
    st.booleans(),
)
def test_what_pil_holds_of_tag_directories_is_bounded_by_the_file(extra, pad, frames, as_mpf):
    # Any directories: refused naming the file, or what PIL then holds fits the bytes that
    # carry them (plus the room for shared values).
    from van_tfx.data.records import SHARED_TAG_BYTES, check_tag_directories

    data = tiff_with_tags(extra, pad, frames)
    if as_mpf:
        data = jpeg_with_mpf(photo(8, 8), data[: 65533 - 4])
    try:
        check_tag_directories(data, "any.tif")
    except InvalidImageError as exc:
        assert str(exc).startswith("any.tif: its ")
        return
    if not as_mpf:
        assert _pil_tag_bytes(data) <= len(data) + SHARED_TAG_BYTES
