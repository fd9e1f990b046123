"""The folder converter on real images: conversions, labels, failures, determinism, CLI."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from sklearn.datasets import load_digits, load_sample_images

from van_tfx import features
from van_tfx.cli import main
from van_tfx.data.build import EmptyClassesError, InvalidImagesError, build_dataset
from van_tfx.data.records import (
    InvalidImageError,
    SynsetListError,
    parse_synset_mapping,
    read_examples,
    read_synset_mapping,
    synset_name_problem,
    write_synset_list,
)
from van_tfx.tfrecords import CorruptShardError

DIGITS_PER_CLASS = 20  # 3 classes x 20 = 60 digits; with the photos > 64 files: the parallel path


def sample_photo_paths() -> dict[str, Path]:
    """sklearn's bundled real photos (china.jpg, flower.jpg) by name."""
    return {Path(p).name: Path(p) for p in load_sample_images().filenames}


def digit_image(pixels: np.ndarray) -> Image.Image:
    """An 8x8 digit as a 32x32 grayscale image."""
    gray = (255 - pixels * (255 / 16)).astype(np.uint8)
    return Image.fromarray(gray, "L").resize((32, 32), Image.BICUBIC)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """IMAGE_DIR/<synset>/<file> with RGB JPEG, PNG, grayscale, CMYK, RGBA and palette inputs."""
    root = tmp_path_factory.mktemp("images")
    photos = sample_photo_paths()
    china = Image.open(photos["china.jpg"])
    (root / "n_photo").mkdir()
    (root / "n_photo" / "china.jpg").write_bytes(photos["china.jpg"].read_bytes())
    Image.open(photos["flower.jpg"]).save(root / "n_photo" / "flower.png")
    china.resize((120, 80)).convert("CMYK").save(root / "n_photo" / "cmyk.jpg")
    rgba = china.resize((60, 40)).convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 0).point(lambda _: 0))  # fully transparent
    rgba.paste((0, 0, 0, 255), (0, 0, 30, 40))  # left half opaque black
    rgba.save(root / "n_photo" / "rgba.png")
    china.resize((50, 30)).convert("P", palette=Image.ADAPTIVE).save(
        root / "n_photo" / "palette.gif"
    )
    digits = load_digits()
    for digit in range(3):
        folder = root / f"digit_{digit}"
        folder.mkdir()
        chosen = np.flatnonzero(digits.target == digit)[:DIGITS_PER_CLASS]
        for k, index in enumerate(chosen):
            ext = "png" if k % 2 else "jpg"  # grayscale JPEGs and grayscale PNGs
            digit_image(digits.images[index]).save(folder / f"{index}.{ext}")
    return root


@pytest.fixture(scope="module")
def built(image_dir, tmp_path_factory):
    """One serial conversion into 3 shards."""
    out = tmp_path_factory.mktemp("out")
    result = build_dataset(image_dir, out, shards=3, workers=1, progress=False)
    return out, result


def test_every_payload_is_an_rgb_jpeg_matching_its_size(built):
    out, result = built
    records = list(read_examples(result.shards))
    assert len(records) == result.num_records == 5 + 3 * DIGITS_PER_CLASS
    for record in records:
        image = Image.open(io.BytesIO(record[features.IMAGE_ENCODED]))
        assert image.format == "JPEG" and image.mode == "RGB", record[features.IMAGE_FILENAME]
        assert (record[features.IMAGE_HEIGHT], record[features.IMAGE_WIDTH]) == (
            image.height,
            image.width,
        )
        assert record[features.IMAGE_FORMAT] == b"JPEG" and record[features.IMAGE_CHANNELS] == 3
        assert record[features.IMAGE_COLORSPACE] == b"RGB"


def test_rgb_jpeg_is_kept_byte_for_byte_and_others_converted(built):
    out, result = built
    by_name = {r[features.IMAGE_FILENAME].decode(): r for r in read_examples(result.shards)}
    china = sample_photo_paths()["china.jpg"].read_bytes()
    assert by_name["n_photo/china.jpg"][features.IMAGE_ENCODED] == china
    flower = by_name["n_photo/flower.png"]
    assert (flower[features.IMAGE_HEIGHT], flower[features.IMAGE_WIDTH]) == (427, 640)
    cmyk = Image.open(io.BytesIO(by_name["n_photo/cmyk.jpg"][features.IMAGE_ENCODED]))
    assert cmyk.mode == "RGB" and cmyk.size == (120, 80)
    # RGBA is composited on white: the transparent right half is white, the opaque left black.
    rgba = np.asarray(Image.open(io.BytesIO(by_name["n_photo/rgba.png"][features.IMAGE_ENCODED])))
    assert rgba[:, 40:].mean() > 240 and rgba[:, :20].mean() < 15


def test_labels_follow_the_written_synset_list(built):
    out, result = built
    synsets = list(read_synset_mapping(out / "synsets.txt"))
    assert synsets == ["digit_0", "digit_1", "digit_2", "n_photo"]
    for record in read_examples(result.shards):
        synset = record[features.SYNSET].decode()
        assert record[features.LABEL] == synsets.index(synset) + 1
        assert record[features.IMAGE_FILENAME].decode().startswith(synset + "/")


def test_shards_mix_classes_and_are_named_of_total(built):
    out, result = built
    assert [p.name for p in result.shards] == [f"train-0000{k}-of-00003" for k in range(3)]
    first_shard = {r[features.SYNSET] for r in read_examples(result.shards[:1])}
    assert len(first_shard) >= 3  # the seeded shuffle spreads classes across shards


def test_parallel_conversion_is_byte_identical_to_serial(built, image_dir, tmp_path):
    out, result = built
    parallel = build_dataset(image_dir, tmp_path, shards=3, workers=2, progress=False)
    for a, b in zip(result.shards, parallel.shards, strict=True):
        assert a.read_bytes() == b.read_bytes()
    other_seed = build_dataset(
        image_dir, tmp_path / "s", shards=3, seed=1, workers=1, progress=False
    )
    assert other_seed.shards[0].read_bytes() != result.shards[0].read_bytes()


def test_validation_split_reuses_labels_and_rejects_unknown_synsets(built, image_dir, tmp_path):
    out, _ = built
    val_dir = tmp_path / "val"
    (val_dir / "n_photo").mkdir(parents=True)
    (val_dir / "n_photo" / "china.jpg").write_bytes(
        (image_dir / "n_photo" / "china.jpg").read_bytes()
    )
    result = build_dataset(val_dir, out, split="validation", workers=1, progress=False)
    [record] = read_examples(result.shards)
    assert record[features.LABEL] == 4  # n_photo's label in the train list, not 1
    (val_dir / "n_unknown").mkdir()
    (val_dir / "n_unknown" / "china.jpg").write_bytes(
        (image_dir / "n_photo" / "china.jpg").read_bytes()
    )
    with pytest.raises(SynsetListError, match="n_unknown"):
        build_dataset(val_dir, out, split="validation", workers=1, progress=False)


def test_synsets_file_supplies_class_texts(image_dir, tmp_path):
    mapping = tmp_path / "LOC_synset_mapping.txt"
    mapping.write_text(
        "digit_0 zero\ndigit_1 one\ndigit_2 two, deux\nn_photo photograph\tof a place\n"
    )
    result = build_dataset(
        image_dir, tmp_path / "o", synsets_file=mapping, workers=1, progress=False
    )
    texts = {r[features.SYNSET]: r[features.CLASS_TEXT] for r in read_examples(result.shards)}
    assert texts[b"digit_2"] == b"two, deux" and texts[b"n_photo"] == b"photograph\tof a place"
    mapping.write_text("digit_0 zero\n")
    with pytest.raises(SynsetListError, match="digit_1"):
        build_dataset(image_dir, tmp_path / "o2", synsets_file=mapping, workers=1, progress=False)


@pytest.fixture()
def dir_with_bad_files(image_dir, tmp_path) -> Path:
    """A copy of two classes plus a non-image and a truncated JPEG."""
    root = tmp_path / "bad"
    (root / "n_photo").mkdir(parents=True)
    china = (image_dir / "n_photo" / "china.jpg").read_bytes()
    (root / "n_photo" / "china.jpg").write_bytes(china)
    (root / "n_photo" / "truncated.jpg").write_bytes(china[: len(china) // 2])
    (root / "digit_0").mkdir()
    (root / "digit_0" / "notes.jpg").write_text("this is not an image")
    for source in sorted((image_dir / "digit_0").iterdir())[:3]:
        (root / "digit_0" / source.name).write_bytes(source.read_bytes())
    return root


def test_corrupt_files_fail_naming_all_of_them_and_write_nothing(dir_with_bad_files, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(InvalidImagesError) as failure:
        build_dataset(dir_with_bad_files, out, workers=1, progress=False)
    message = str(failure.value)
    assert "truncated.jpg" in message and "notes.jpg" in message
    assert sorted(p.name for p in out.iterdir()) == []  # no shards, temp dir or synset list


def test_skip_invalid_converts_the_rest_and_reports(dir_with_bad_files, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        ["data", "build", str(dir_with_bad_files), str(out), "--skip-invalid", "--workers", "1"]
    )
    assert code == 0
    err = capsys.readouterr().err
    assert "truncated.jpg" in err and "notes.jpg" in err
    report = (out / "rejected-train.tsv").read_text().splitlines()
    assert report[0] == "path\treason" and len(report) == 3
    assert len(list(read_examples(sorted(out.glob("train-*-of-*"))))) == 4


def test_every_file_a_build_leaves_in_a_span_is_an_input_or_outside_the_patterns(
    dir_with_bad_files, tmp_path
):
    import fnmatch

    import tensorflow as tf

    from van_tfx.config import DataConfig

    root = tmp_path / "data"
    span = root / "span-1"
    span.mkdir(parents=True)
    (span / "train-rejected.tsv").write_text("path\treason\n")  # left by an older build
    for split in ("train", "validation"):
        build_dataset(
            dir_with_bad_files, span, split=split, skip_invalid=True, workers=1, progress=False
        )
    config = DataConfig()
    patterns = [p.replace("{SPAN}", "1") for p in (config.train_pattern, config.eval_pattern)]
    left = sorted(str(p.relative_to(root)) for p in span.rglob("*") if p.is_file())
    inputs = [f for f in left if any(fnmatch.fnmatch(f, p) for p in patterns)]
    assert "span-1/rejected-train.tsv" in left and "span-1/rejected-train.tsv" not in inputs
    assert set(left) - set(inputs) == {
        "span-1/rejected-train.tsv",
        "span-1/rejected-validation.tsv",
        "span-1/synsets.txt",
    }
    # What ExampleGen would read: every matched file parses as TFRecords of tf.Examples.
    for split_pattern in patterns:
        files = sorted(tf.io.gfile.glob(str(root / split_pattern)))
        assert files
        records = [r.numpy() for r in tf.data.TFRecordDataset(files)]
        assert len(records) == 4
        assert all(tf.train.Example.FromString(r).features.feature for r in records)


def test_cli_without_skip_invalid_fails_naming_files(dir_with_bad_files, tmp_path, capsys):
    code = main(["data", "build", str(dir_with_bad_files), str(tmp_path / "o"), "--workers", "1"])
    assert code == 1
    err = capsys.readouterr().err
    assert "notes.jpg" in err and "--skip-invalid" in err


def test_a_jpeg_with_a_damaged_header_is_named_as_a_damaged_jpeg(image_dir, tmp_path, capsys):
    # Before: "not an image format PIL reads", as for a text file, which sent users of a .jpg
    # looking for missing JPEG support.
    root = tmp_path / "in"
    (root / "n_photo").mkdir(parents=True)
    china = bytearray((image_dir / "n_photo" / "china.jpg").read_bytes())
    frame = china.find(b"\xff\xc0")
    assert frame > 0
    china[frame + 5 : frame + 9] = bytes(4)  # height and width 0: PIL cannot identify it
    (root / "n_photo" / "frame.jpg").write_bytes(bytes(china))
    (root / "n_photo" / "notes.jpg").write_text("this is not an image")
    code = main(["data", "build", str(root), str(tmp_path / "o"), "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 1
    assert (
        "frame.jpg: not a decodable image (a damaged JPEG file: its header cannot be read)" in err
    )
    assert "notes.jpg: not a decodable image (not an image format PIL reads)" in err


def test_truncated_shard_is_reported_by_name(built, tmp_path):
    _, result = built
    shard = tmp_path / "train-00000-of-00001"
    data = result.shards[0].read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CorruptShardError, match="train-00000-of-00001"):
        list(read_examples([shard]))


def test_a_build_keeps_one_shard_file_open_at_a_time(image_dir, tmp_path):
    # ImageNet-1k's 1,252 train shards exceed the usual limit of 1,024 open files; here 65
    # shards are built with room for ~30 more open files than the process already holds.
    import subprocess
    import sys

    script = f"""
import os, resource
import tensorflow as tf
from van_tfx.data.build import build_dataset
from van_tfx.data.records import read_examples
used = len(os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (used + 30, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
result = build_dataset({str(image_dir)!r}, {str(tmp_path / "out")!r}, shards=65, workers=1, progress=False)
print(len(result.shards), len(list(read_examples(result.shards))))
"""
    # -B: under the size limit the child's bytecode cache writes would be cut too, and a cut
    # .pyc in the venv breaks every later import of that module (a fresh venv has none yet).
    done = subprocess.run(
        [sys.executable, "-B", "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["65", "65"]


SYNSET = st.text("abcdefghn0123456789_-", min_size=1, max_size=10)
TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp", "Zs")), max_size=12)


@given(
    entries=st.dictionaries(SYNSET, TEXT, min_size=1, max_size=8),
    bom=st.booleans(),
    crlf=st.booleans(),
    blank=st.booleans(),
)
def test_a_synset_list_reads_the_same_whatever_its_bom_line_ends_and_blank_lines(
    entries, bom, crlf, blank
):
    # A BOM was read as part of the first synset, and curated_schema counted lines its own way.
    end = "\r\n" if crlf else "\n"
    lines = [f"{synset} {text}".rstrip() for synset, text in entries.items()]
    body = end.join(line + (end if blank else "") for line in lines) + end
    data = (b"\xef\xbb\xbf" if bom else b"") + body.encode("utf-8")
    parsed = parse_synset_mapping(data, "synsets.txt")
    assert list(parsed) == list(entries)
    assert all(parsed[k] == (v.strip() or k) for k, v in entries.items())


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ("n01 caf\xe9\n".encode("latin-1"), "list.txt: not UTF-8 text (byte 7"),
        (b"n01 a\nn02 b\nn01 c\n", "list.txt:3: synset 'n01' is listed twice"),
    ],
    ids=["latin-1", "duplicate"],
)
def test_a_malformed_synset_list_is_refused_naming_the_file_and_line(data, says):
    # A Latin-1 file was an uncaught UnicodeDecodeError naming no file.
    with pytest.raises(SynsetListError) as failure:
        parse_synset_mapping(data, "list.txt")
    assert says in str(failure.value)


def test_a_directory_given_as_the_synset_list_is_named(tmp_path):
    with pytest.raises(SynsetListError, match="is a directory"):
        read_synset_mapping(tmp_path)


def jpeg_bytes(size=(8, 8), color=(90, 120, 200)) -> bytes:
    """A small real RGB JPEG."""
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "JPEG")
    return out.getvalue()


def make_tree(root: Path, files: dict[bytes, bytes]) -> Path:
    """Write `files` (relative paths as bytes, so names may be any bytes) under root."""
    for relative, data in files.items():
        path = os.fsencode(root) + b"/" + relative
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(data)
    return root


@pytest.mark.parametrize(
    ("folder", "shown"),
    [
        (b"my cat", "my cat': contains whitespace"),
        (b"#tag", "#tag': starts with '#'"),
        (b"zebra ", "zebra ': contains whitespace"),
        (b"b\nc", "b\\nc': contains whitespace or a line break ('\\n'"),
        (b"x\x1fy", "x\\x1fy': contains whitespace"),
        (b"caf\xe9", "caf\\xe9': is not UTF-8 text"),
    ],
    ids=["space", "hash", "trailing-space", "newline", "unit-separator", "latin-1"],
)
def test_a_class_folder_synsets_txt_would_misread_is_refused_before_writing(
    tmp_path, folder, shown
):
    # "my cat" was written as the line "my cat my cat" and read back as synset "my": the
    # pipeline counted 3 classes for labels 1-4.
    image_dir = make_tree(
        tmp_path / "img", {b"dog/a.jpg": jpeg_bytes(), folder + b"/b.jpg": jpeg_bytes()}
    )
    out = tmp_path / "out"
    with pytest.raises(SynsetListError) as failure:
        build_dataset(image_dir, out, workers=1, progress=False)
    assert shown in str(failure.value)
    assert not out.exists()


def test_names_equal_after_strip_are_refused(tmp_path, capsys):
    image_dir = make_tree(
        tmp_path / "img", {b"cat/a.jpg": jpeg_bytes(), b"cat /b.jpg": jpeg_bytes()}
    )
    assert main(["data", "build", str(image_dir), str(tmp_path / "out"), "--workers", "1"]) == 1
    assert "cat ': contains whitespace" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


FOLDER_NAMES = st.one_of(
    st.text(st.characters(blacklist_categories=()), max_size=8),  # surrogates too: non-UTF-8
    st.text(st.sampled_from(" \t\n\r#\ufeff\x1c\x85\u2028\udce9a-"), max_size=4),
)


@given(FOLDER_NAMES)
def test_a_folder_name_is_accepted_exactly_when_it_round_trips_through_synsets_txt(name):
    problem = synset_name_problem(name)
    try:
        data = f"{name} the class\n".encode()
    except UnicodeEncodeError:
        assert problem is not None  # not UTF-8: cannot be written as text at all
        return
    try:
        parsed = parse_synset_mapping(data, "synsets.txt")
    except SynsetListError:
        parsed = None
    assert (problem is None) == (parsed == {name: "the class"})
    if problem is None:
        with tempfile.TemporaryDirectory() as tmp:
            write_synset_list(Path(tmp) / "synsets.txt", {name: name, "zz_next": "next"})
            assert read_synset_mapping(Path(tmp) / "synsets.txt") == {name: name, "zz_next": "next"}
    else:
        with tempfile.TemporaryDirectory() as tmp, pytest.raises(SynsetListError):
            write_synset_list(Path(tmp) / "synsets.txt", {name: name})


def test_a_file_name_that_is_not_utf8_is_recorded_as_its_bytes(tmp_path):
    # A valid image named caf\xe9.jpg was a UnicodeEncodeError traceback in example_bytes.
    image_dir = make_tree(
        tmp_path / "img", {b"a/caf\xe9.jpg": jpeg_bytes(), b"b/ok.jpg": jpeg_bytes()}
    )
    result = build_dataset(image_dir, tmp_path / "out", workers=1, progress=False)
    names = sorted(r[features.IMAGE_FILENAME] for r in read_examples(result.shards))
    assert names == [b"a/caf\xe9.jpg", b"b/ok.jpg"]


def test_skipped_files_with_odd_names_are_one_escaped_row_each(tmp_path, capsys):
    # A skipped file named caf\xe9 made the report raise after the shards were committed
    # (a 0-byte rejected-train.tsv); a tab or newline in a name split the TSV row.
    image_dir = make_tree(
        tmp_path / "img",
        {
            b"a/ok.jpg": jpeg_bytes(),
            b"b/ok.jpg": jpeg_bytes(),
            b"a/caf\xe9.jpg": b"not an image",
            b"a/bad\nname\tx.jpg": b"not an image either",
        },
    )
    out = tmp_path / "out"
    code = main(["data", "build", str(image_dir), str(out), "--skip-invalid", "--workers", "1"])
    assert code == 0
    rows = (out / "rejected-train.tsv").read_bytes().decode("utf-8").split("\n")
    assert rows[0] == "path\treason" and rows[-1] == "" and len(rows) == 4
    paths = sorted(row.split("\t")[0] for row in rows[1:-1])
    assert [p.rsplit("/", 1)[1] for p in paths] == ["bad\\nname\\tx.jpg", "caf\\xe9.jpg"]
    assert all(len(row.split("\t")) == 2 for row in rows[1:-1])
    err = capsys.readouterr().err
    assert "skipped " + paths[0] in err and "skipped " + paths[1] in err


@pytest.fixture()
def hostile_dir(tmp_path) -> Path:
    """Two classes with one image each, plus every kind of entry a converter must not drop."""
    root = make_tree(
        tmp_path / "img",
        {
            b"a/ok.jpg": jpeg_bytes(),
            b"b/ok.jpg": jpeg_bytes(),
            b"b/nested/deep.jpg": jpeg_bytes(),
            b"b/.hidden.jpg": jpeg_bytes(),
            b".hiddenclass/h.jpg": jpeg_bytes(),
            b"toplevel.jpg": jpeg_bytes(),
        },
    )
    (root / "a" / "loop1").symlink_to("loop2")
    (root / "a" / "loop2").symlink_to("loop1")
    (root / "a" / "broken.jpg").symlink_to("/nonexistent/x.jpg")
    (root / "a" / "link.jpg").symlink_to(root / "a" / "ok.jpg")  # a link to a file is a file
    os.mkfifo(root / "b" / "fifo.jpg")
    (root / "empty").mkdir()
    return root


HOSTILE_PROBLEMS = {
    "toplevel.jpg": "a file outside the class folders",
    "a/broken.jpg": "a broken symbolic link (to /nonexistent/x.jpg)",
    "a/loop1": "a symbolic link loop",
    "a/loop2": "a symbolic link loop",
    "b/fifo.jpg": "a FIFO, not a regular file",
    "b/nested": "a folder inside a class folder",
    "empty": "a class folder without images",
}


def test_entries_that_are_not_images_in_class_folders_fail_the_build_listed(hostile_dir, tmp_path):
    # Broken links, loops, FIFOs, nested folders and top-level files were dropped silently,
    # and an empty folder became a label with no examples.
    out = tmp_path / "out"
    with pytest.raises(InvalidImagesError) as failure:
        build_dataset(hostile_dir, out, workers=1, progress=False)
    listed = {str(Path(p).relative_to(hostile_dir)): r for p, r in failure.value.rejected}
    assert set(listed) == set(HOSTILE_PROBLEMS)
    assert all(listed[p].startswith(r) for p, r in HOSTILE_PROBLEMS.items())
    assert not out.exists()


def test_skip_invalid_skips_and_lists_them_and_hidden_entries_are_ignored_and_listed(
    hostile_dir, tmp_path, capsys
):
    out = tmp_path / "out"
    argv = ["data", "build", str(hostile_dir), str(out), "--skip-invalid", "--workers", "1"]
    # --skip-invalid skips files, never a class: the empty class folder is an error naming it
    # (it used to become no class, listed only in the report), and nothing is written.
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"  {hostile_dir / 'empty'}: a class folder without images" in err
    assert not out.exists()
    (hostile_dir / "empty").rmdir()
    assert main(argv) == 0
    err = capsys.readouterr().err
    rows = (out / "rejected-train.tsv").read_text().splitlines()[1:]
    assert {str(Path(r.split("\t")[0]).relative_to(hostile_dir)) for r in rows} == set(
        HOSTILE_PROBLEMS
    ) - {"empty"}
    for hidden in (hostile_dir / "b" / ".hidden.jpg", hostile_dir / ".hiddenclass"):
        assert f"ignored {hidden}: hidden" in err
    assert list(read_synset_mapping(out / "synsets.txt")) == ["a", "b"]
    records = list(read_examples(sorted(out.glob("train-*"))))
    assert sorted(r[features.IMAGE_FILENAME] for r in records) == [
        b"a/link.jpg",
        b"a/ok.jpg",
        b"b/ok.jpg",
    ]


def test_an_output_dir_inside_the_image_dir_is_not_a_class(tmp_path, capsys):
    # A second build into IMAGE_DIR/out read out/ as a class of shards.
    image_dir = make_tree(tmp_path / "img", {b"a/x.jpg": jpeg_bytes(), b"b/y.jpg": jpeg_bytes()})
    out = image_dir / "out"
    for _ in range(2):
        assert main(["data", "build", str(image_dir), str(out), "--workers", "1"]) == 0
    assert f"ignored {out}: the output directory" in capsys.readouterr().err
    assert list(read_synset_mapping(out / "synsets.txt")) == ["a", "b"]


def test_an_image_over_transforms_pixel_bound_is_refused_from_its_header(tmp_path, capsys):
    # 72 M pixels: over data.max_image_pixels (64 M), which Transform applies, but under the
    # converter's old bound (268 M): it was decoded (GBs for 100 M) and written. The image data
    # is cut short: "too large", not "truncated", shows the header alone decided.
    big = io.BytesIO()
    Image.new("1", (9000, 8000)).save(big, "PNG")
    image_dir = make_tree(
        tmp_path / "img",
        {b"a/ok.jpg": jpeg_bytes(), b"a/big.png": big.getvalue()[:200], b"b/ok.jpg": jpeg_bytes()},
    )
    with pytest.raises(InvalidImagesError, match=r"big.png: image too large \(9000x8000"):
        build_dataset(image_dir, tmp_path / "out", workers=1, progress=False)
    out = tmp_path / "out2"
    argv = ["data", "build", str(image_dir), str(out), "--workers", "1", "--skip-invalid"]
    assert main([*argv, "--max-image-pixels", "64"]) == 0  # the 8x8 JPEGs are 64 pixels
    rows = (out / "rejected-train.tsv").read_text().splitlines()[1:]
    assert len(rows) == 1 and "big.png\timage too large" in rows[0]
    assert main([*argv, "--max-image-pixels", "63"]) == 1
    assert "a/ok.jpg: image too large (8x8 = 64 pixels, more than the limit of 63" in (
        capsys.readouterr().err
    )


def test_reasons_hold_no_memory_addresses(tmp_path):
    # "cannot identify image file <_io.BytesIO object at 0x7f...>" differed in every run.
    image_dir = make_tree(tmp_path / "img", {b"a/notes.jpg": b"hello", b"a/ok.jpg": jpeg_bytes()})
    with pytest.raises(InvalidImagesError) as failure:
        build_dataset(image_dir, tmp_path / "out", workers=1, progress=False)
    [(_, reason)] = failure.value.rejected
    assert "0x" not in reason and reason.startswith("not a decodable image")


@pytest.mark.parametrize("split", ["*", "../escaped", "", ".hidden", "a/b", "tr[a]in"])
def test_a_split_that_is_not_a_plain_name_is_refused_naming_the_flag(tmp_path, capsys, split):
    # --split '*' deleted every split's shards (a glob), '../escaped' was an unnamed ENOENT,
    # '' wrote -00000-of-00001.
    image_dir = make_tree(tmp_path / "img", {b"a/x.jpg": jpeg_bytes(), b"b/y.jpg": jpeg_bytes()})
    out = tmp_path / "out"
    assert main(["data", "build", str(image_dir), str(out), "--workers", "1"]) == 0
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(SystemExit) as exit_:
        main(["data", "build", str(image_dir), str(out), "--workers", "1", "--split", split])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --split: split name must be" in err and repr(split) in err
    assert sorted(p.name for p in out.iterdir()) == before
    with pytest.raises(ValueError, match="split name must be"):
        build_dataset(image_dir, out, split=split, workers=1, progress=False)
    assert sorted(p.name for p in out.iterdir()) == before


def test_an_output_path_that_is_a_file_is_one_line_naming_it(tmp_path, capsys):
    image_dir = make_tree(tmp_path / "img", {b"a/x.jpg": jpeg_bytes(), b"b/y.jpg": jpeg_bytes()})
    taken = tmp_path / "taken"
    taken.write_text("a file")
    for argv in (["data", "build", str(image_dir), str(taken)], ["data", "sample", str(taken)]):
        assert main([*argv]) == 1
        err = capsys.readouterr().err
        assert err == f"error: {taken}: exists and is not a directory\n"
    assert taken.read_text() == "a file"


def test_an_image_dir_that_is_missing_or_a_file_is_one_line_naming_it(tmp_path, capsys):
    # Before: a file given as IMAGE_DIR was "image directory not found".
    image = tmp_path / "x.jpg"
    image.write_bytes(jpeg_bytes())
    for image_dir, says in ((image, "exists and is not a directory"), (tmp_path / "no", None)):
        assert main(["data", "build", str(image_dir), str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err
        if says:
            assert err == f"error: image directory {image_dir}: {says}\n"
        else:
            assert err == f"error: image directory not found: {image_dir}\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["build", "sample"])
def test_a_full_output_disk_is_one_line_naming_the_file_and_leaves_nothing(tmp_path, command):
    # A full or size-limited output was a ResourceExhaustedError traceback. RLIMIT_FSIZE makes
    # writes past 4 KB fail with EFBIG, as a full disk fails them with ENOSPC.
    import subprocess
    import sys

    image_dir = make_tree(
        tmp_path / "img",
        {
            f"{c}/{k}.jpg".encode(): jpeg_bytes((64, 64), (k, 9 * k, 3))
            for c in "ab"
            for k in range(8)
        },
    )
    out = tmp_path / "out"
    argv = ["data", "build", str(image_dir), str(out), "--workers", "1"]
    if command == "sample":
        argv = ["data", "sample", str(out)]
    script = f"""
import resource, signal, sys
from van_tfx.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
sys.exit(main({argv!r}))
"""
    # -B: under the size limit the child's bytecode cache writes would be cut too, and a cut
    # .pyc in the venv breaks every later import of that module (a fresh venv has none yet).
    done = subprocess.run(
        [sys.executable, "-B", "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {out}/") and last.endswith(": File too large"), last
    assert "Traceback" not in done.stderr
    assert [p.name for p in out.rglob("*") if p.is_file()] == []


def test_skip_invalid_with_nothing_left_does_not_advise_skip_invalid(tmp_path, capsys):
    image_dir = make_tree(tmp_path / "img", {b"a/x.jpg": b"not an image", b"b/y.jpg": b""})
    argv = ["data", "build", str(image_dir), str(tmp_path / "o"), "--skip-invalid"]
    assert main([*argv, "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert "no input is left to convert" in err and "pass --skip-invalid" not in err
    assert not (tmp_path / "o" / "synsets.txt").exists()


# ---- classes left without records ---------------------------------------------------------------


def test_a_class_whose_every_file_is_rejected_is_refused_naming_it_and_why(tmp_path, capsys):
    # With --skip-invalid, a class whose every image was skipped still got its synsets.txt line
    # and label and no record: Transform refused the list later, far from the cause.
    image_dir = make_tree(
        tmp_path / "img",
        {
            b"a/ok.jpg": jpeg_bytes(),
            b"a/bad.jpg": b"not an image",  # skipped, but its class keeps a record
            b"b/ok.jpg": jpeg_bytes(),
            b"c/notes.jpg": b"not an image",
            b"c/empty.jpg": b"",
        },
    )
    (image_dir / "c" / "deeper").mkdir()
    out = tmp_path / "out"
    argv = ["data", "build", str(image_dir), str(out), "--skip-invalid", "--workers", "1"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "1 class folder(s) would have no record in split 'train'" in err
    assert f"  {image_dir / 'c'}: none of its 2 file(s) could be converted" in err
    assert f"    {image_dir / 'c' / 'notes.jpg'}: not a decodable image" in err
    assert f"    {image_dir / 'c' / 'empty.jpg'}: empty file" in err
    assert f"    {image_dir / 'c' / 'deeper'}: a folder inside a class folder" in err
    assert str(image_dir / "a" / "bad.jpg") not in err  # class a has a record
    assert list(out.iterdir()) == []  # no shards, no synsets.txt that disagrees with them
    with pytest.raises(EmptyClassesError) as failure:
        build_dataset(image_dir, out, skip_invalid=True, workers=1, progress=False)
    assert list(failure.value.empty) == [str(image_dir / "c")]
    # Leaving the class out is the user's move: then the rest is converted, labels 1..2.
    (image_dir / "c").rename(tmp_path / "c")
    assert main(argv) == 0
    assert list(read_synset_mapping(out / "synsets.txt")) == ["a", "b"]
    labels = {r[features.SYNSET]: r[features.LABEL] for r in read_examples(out.glob("train-*"))}
    assert labels == {b"a": 1, b"b": 2}


@pytest.mark.parametrize(
    ("entries", "why"),
    [
        ({b"cat/2019/x.jpg": None}, "a class folder without images"),  # images one level down
        ({}, "a class folder without images"),
        ({b"cat/.x.jpg": None}, "a class folder without images"),  # only hidden files
    ],
)
def test_a_class_folder_the_listing_leaves_empty_is_refused_before_decoding(
    tmp_path, monkeypatch, entries, why
):
    # `cat/2019/*.jpg` under --skip-invalid became no class at all: a model without cats,
    # said only by a line of the report.
    files = {b"dog/ok.jpg": jpeg_bytes(), **{k: jpeg_bytes() for k in entries}}
    image_dir = make_tree(tmp_path / "img", files)
    (image_dir / "cat").mkdir(exist_ok=True)
    import van_tfx.data.build as build

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded before refusing the class")

    monkeypatch.setattr(build, "_decoded", no_decoding)
    with pytest.raises(EmptyClassesError) as failure:
        build_dataset(image_dir, tmp_path / "out", skip_invalid=True, workers=1, progress=False)
    (folder, (reason, _)) = failure.value.empty.popitem()
    assert folder == str(image_dir / "cat") and reason == why
    assert not (tmp_path / "out").exists()


def test_an_unlistable_class_folder_is_refused_naming_why(tmp_path, monkeypatch):
    # A folder that cannot be listed (permissions; root lists any, hence the stand-in).
    import van_tfx.data.build as build

    image_dir = make_tree(tmp_path / "img", {b"a/ok.jpg": jpeg_bytes(), b"b/ok.jpg": jpeg_bytes()})
    entries = build._entries

    def unlistable_b(folder):
        if folder == image_dir / "b":
            raise PermissionError(13, "Permission denied", str(folder))
        return entries(folder)

    monkeypatch.setattr(build, "_entries", unlistable_b)
    with pytest.raises(EmptyClassesError) as failure:
        build_dataset(image_dir, tmp_path / "o", skip_invalid=True, workers=1, progress=False)
    assert failure.value.empty == {
        str(image_dir / "b"): ("cannot list the folder (Permission denied)", [])
    }


def test_validation_may_lack_listed_classes_but_the_training_split_may_not(tmp_path, capsys):
    # Labels are positions in the train list, which the validation split reuses: a class it has
    # no folder for is fine (evaluation covers the classes it has) and said in the summary. A
    # training split missing a listed class got labels with a gap that Transform refused.
    train = make_tree(tmp_path / "train", {f"{c}/x.jpg".encode(): jpeg_bytes() for c in "abc"})
    out = tmp_path / "out"
    assert main(["data", "build", str(train), str(out), "--workers", "1"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    val = make_tree(tmp_path / "val", {b"b/y.jpg": jpeg_bytes()})
    argv = ["data", "build", str(val), str(out), "--split", "validation", "--workers", "1"]
    assert main(argv) == 0
    assert (
        f"split 'validation' has no record of 2 class(es) listed in {out / 'synsets.txt'}: a, c"
        in capsys.readouterr().out
    )
    [record] = read_examples(out.glob("validation-*"))
    assert record[features.LABEL] == 2
    # An empty class folder in validation is still an error: leave it out instead.
    (val / "c").mkdir()
    (val / "c" / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(EmptyClassesError, match="none of its 1 file"):
        build_dataset(val, out, split="validation", skip_invalid=True, workers=1, progress=False)
    shutil_rmtree(val / "c")
    (train / "c" / "x.jpg").unlink()
    (train / "c").rmdir()
    assert main(["data", "build", str(train), str(out), "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert f"{out / 'synsets.txt'} lists 1 class(es) that IMAGE_DIR has no folder for: c." in err
    assert "'train' is the training split" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in before} == before


def shutil_rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


CLASS_NAMES = st.sampled_from(["a", "b", "c", "d"])


@settings(max_examples=15, deadline=None)
@given(
    st.dictionaries(
        CLASS_NAMES,
        st.lists(st.sampled_from(["good", "bad", "nested"]), min_size=0, max_size=3),
        min_size=1,
    )
)
def test_synsets_txt_always_agrees_with_the_records_or_nothing_is_written(classes):
    # Whatever mix of good files, bad files, nested folders and empty folders the classes hold,
    # a --skip-invalid build either writes a synsets.txt whose every class has a record, labels
    # 1..N, or writes nothing and names exactly the classes with no convertible file.
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "img"
        for name, kinds in classes.items():
            (root / name).mkdir(parents=True)
            for k, kind in enumerate(kinds):
                if kind == "good":
                    (root / name / f"{k}.jpg").write_bytes(jpeg_bytes())
                elif kind == "bad":
                    (root / name / f"{k}.jpg").write_bytes(b"not an image")
                else:
                    (root / name / f"d{k}").mkdir()
        out = Path(tmp) / "out"
        empty = sorted(str(root / n) for n, kinds in classes.items() if "good" not in kinds)
        # Folders without files are known from the listing and refused before decoding; the
        # classes whose files all fail to decode, after it.
        without_files = [str(root / n) for n, kinds in classes.items() if set(kinds) <= {"nested"}]
        try:
            result = build_dataset(root, out, skip_invalid=True, workers=1, progress=False)
        except EmptyClassesError as exc:
            assert sorted(exc.empty) == (sorted(without_files) or empty)
            assert not out.exists() or list(out.iterdir()) == []
            return
        except InvalidImagesError as exc:  # not one file converted: "no input is left"
            assert not without_files and len(empty) == len(classes)
            assert "no input is left to convert" in str(exc)
            assert list(out.iterdir()) == []
            return
        assert not empty
        synsets = list(read_synset_mapping(result.synsets_path))
        assert synsets == sorted(classes)
        labels = {r[features.LABEL] for r in read_examples(result.shards)}
        assert labels == set(range(1, len(synsets) + 1))


@settings(max_examples=30, deadline=None)
@given(
    items=st.lists(st.integers(0, 1000), max_size=60),
    in_flight=st.integers(1, 8),
    taken=st.integers(0, 60),
)
def test_decoding_runs_at_most_in_flight_ahead_of_the_writer_and_keeps_the_order(
    items, in_flight, taken
):
    # Executor.map submitted every path at once: with a writer slower than the decoders, every
    # decoded image of the dataset could wait in the parent (~110 KB each at ImageNet-1k).
    import itertools
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from van_tfx.data.build import in_order

    started = []
    lock = threading.Lock()

    def square(x):
        with lock:
            started.append(x)
        return x * x

    with ThreadPoolExecutor(4) as pool:
        answers = in_order(pool, square, iter(items), in_flight)
        got = list(itertools.islice(answers, taken))
        time.sleep(0.01)  # let submitted calls start: none beyond the bound may exist
        with lock:
            assert len(started) <= min(len(items), len(got) + in_flight)
        got += list(answers)
    assert got == [x * x for x in items]


def test_a_file_larger_than_any_image_within_budget_is_refused_unread(tmp_path):
    # Files were read whole before their header was looked at: a 3 GB file in a class folder
    # took 3 GB and 297 s to be refused. Now its size alone decides (sparse: no disk used).
    import tracemalloc

    from van_tfx.data.records import load_image_file, max_file_bytes

    image_dir = make_tree(tmp_path / "img", {b"a/ok.jpg": jpeg_bytes(), b"b/ok.jpg": jpeg_bytes()})
    huge = image_dir / "a" / "huge.jpg"
    with open(huge, "wb") as handle:
        handle.write(jpeg_bytes())
        handle.truncate(max_file_bytes(64) + 1)
    tracemalloc.start()
    with pytest.raises(InvalidImageError, match=r"huge\.jpg: file of 67109377 bytes, more than"):
        load_image_file(str(huge), max_pixels=64)
    assert tracemalloc.get_traced_memory()[1] < 1 << 20
    tracemalloc.stop()
    argv = ["data", "build", str(image_dir), str(tmp_path / "out"), "--workers", "1"]
    assert main([*argv, "--skip-invalid", "--max-image-pixels", "64"]) == 0  # 8x8 JPEGs
    rows = (tmp_path / "out" / "rejected-train.tsv").read_text().splitlines()[1:]
    assert len(rows) == 1 and f"huge.jpg\tfile of {max_file_bytes(64) + 1} bytes" in rows[0]
    # One byte less is read, and judged by its content as before: a JPEG with trailing zeros.
    with open(huge, "r+b") as handle:
        handle.truncate(max_file_bytes(64))
    assert load_image_file(str(huge), max_pixels=64)[1:3] == (8, 8)
