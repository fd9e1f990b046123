"""`van-tfx data build|sample`: convert an image folder to TFRecords, or write the bundled sample."""

from __future__ import annotations

import argparse
import os
import sys

# 2 x sample.VALIDATION_IMAGES (360): more would leave validation shards without a record.
SAMPLE_MAX_SHARDS = 720


def int_in(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high]; argparse names the flag when it is not."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


def os_error_line(exc: OSError) -> str:
    """One line for an OSError: the path it names (escaped) and why."""
    from van_tfx.data.records import escaped

    if exc.filename is None:
        return " ".join(str(exc).split())
    return f"{escaped(os.fsdecode(exc.filename))}: {exc.strerror or exc}"


def split_name(text: str) -> str:
    """An argparse type: a split name that is a plain file name part, never a glob or a path."""
    from van_tfx.data.records import check_split_name

    try:
        return check_split_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(subparsers) -> None:
    """Register `data` with its `build` and `sample` subcommands."""
    data = subparsers.add_parser("data", help="Create ImageNet-style TFRecord data.")
    commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    build = commands.add_parser(
        "build",
        help="Convert IMAGE_DIR/<synset>/<file> into TFRecord shards.",
        description="Convert IMAGE_DIR/<synset>/<file> (ImageNet layout) into "
        "OUTPUT_DIR/<split>-NNNNN-of-MMMMM TFRecord shards plus OUTPUT_DIR/synsets.txt.",
    )
    build.add_argument("image_dir", metavar="IMAGE_DIR")
    build.add_argument("output_dir", metavar="OUTPUT_DIR")
    build.add_argument(
        "--split",
        default="train",
        type=split_name,
        help="Split name of the shards: letters, digits, _ - . (not first); default train.",
    )
    build.add_argument(
        "--shards", type=int_in(1), default=None, help="Default: one per 1024 images."
    )
    build.add_argument(
        "--skip-invalid",
        action="store_true",
        help="Convert the rest when inputs cannot be converted (undecodable or too large "
        "images, links to nothing, FIFOs, nested folders); list them in "
        "OUTPUT_DIR/rejected-<split>.tsv instead of failing. Files only: a class folder left "
        "with no record is still an error.",
    )
    build.add_argument(
        "--synsets-file",
        default=None,
        help="Synset -> text mapping ('n01440764 tench, Tinca tinca' per line).",
    )
    build.add_argument(
        "--max-image-pixels",
        type=int_in(1),
        default=None,
        metavar="N",
        help="Refuse (or with --skip-invalid skip) images whose header declares more than N "
        "pixels (width x height), before decoding them. Default: data.max_image_pixels's "
        "default, the bound Transform applies.",
    )
    build.add_argument(
        "--apply-exif-orientation",
        action="store_true",
        help="Turn images whose EXIF orientation is 2-8 (rotated or mirrored camera photos) "
        "upright and re-encode them as JPEG. Default: store every image as its pixels lie, "
        "as TensorFlow and TF Serving decode it (EXIF ignored), and count them in the summary.",
    )
    build.add_argument("--seed", type=int, default=0, help="Shuffle seed (default 0).")
    build.add_argument("--workers", type=int_in(1), default=None, help="Default: all cores.")
    build.set_defaults(func=run_build)

    sample = commands.add_parser(
        "sample",
        help="Write the bundled handwritten-digits sample (a span of ImageNet-style records).",
    )
    sample.add_argument(
        "dir", nargs="?", default=None, metavar="DIR", help="Default $VAN_TFX_HOME/data."
    )
    sample.add_argument("--new-span", action="store_true", help="Add span N+1 with new images.")
    sample.add_argument(
        "--shards",
        type=int_in(1, SAMPLE_MAX_SHARDS),
        default=2,
        help=f"Train shards (validation: half as many), 1 to {SAMPLE_MAX_SHARDS}; default 2.",
    )
    sample.set_defaults(func=run_sample)


def run_build(args: argparse.Namespace) -> int:
    """Run the folder converter; 1 with a message naming the bad input on failure."""
    from van_tfx.data.build import EmptyClassesError, InvalidImagesError, build_dataset
    from van_tfx.data.records import MAX_PIXELS, SynsetListError, escaped

    try:
        result = build_dataset(
            args.image_dir,
            args.output_dir,
            split=args.split,
            shards=args.shards,
            skip_invalid=args.skip_invalid,
            synsets_file=args.synsets_file,
            seed=args.seed,
            workers=args.workers,
            max_pixels=args.max_image_pixels or MAX_PIXELS,
            apply_exif_orientation=args.apply_exif_orientation,
        )
    except (InvalidImagesError, EmptyClassesError, SynsetListError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # unreadable input, unwritable, full or misnamed output
        print(f"error: {os_error_line(exc)}", file=sys.stderr)
        return 1
    for path, reason in result.ignored:
        print(f"ignored {escaped(path)}: {reason}", file=sys.stderr)
    if result.ignored:
        print(f"{len(result.ignored)} entry(ies) ignored (listed above)", file=sys.stderr)
    for path, reason in result.rejected:
        print(f"skipped {escaped(path)}: {reason}", file=sys.stderr)
    if result.rejected_report:
        print(
            f"{len(result.rejected)} file(s) skipped; see {result.rejected_report}", file=sys.stderr
        )
    print(
        f"wrote {result.num_records} records of split {args.split!r} into {len(result.shards)} "
        f"shard(s) in {args.output_dir}; labels from {result.synsets_path}"
    )
    for line in summary_notes(result, args.split):
        print(line)
    return 0


def summary_notes(result, split: str) -> list[str]:
    """The build summary's notes: classes the split lacks, images by EXIF orientation."""
    from van_tfx.data.records import JPEG_QUALITY, escaped

    notes = []
    if result.classes_without_records:
        names = ", ".join(escaped(s) for s in result.classes_without_records)
        notes.append(
            f"split {split!r} has no record of {len(result.classes_without_records)} class(es) "
            f"listed in {result.synsets_path}: {names} (allowed outside the training split: "
            "evaluation covers the classes it has)"
        )
    exif = result.exif
    if exif.oriented:
        count = sum(exif.oriented.values())
        kinds = ", ".join(f"{o}: {n}" for o, n in sorted(exif.oriented.items()))
        examples = ", ".join(escaped(p) for p in exif.oriented_examples)
        what = f"{count} image(s) carry an EXIF orientation other than 1 ({kinds}; e.g. {examples})"
        if exif.applied:
            notes.append(
                f"{what}: turned upright and re-encoded as JPEG (quality {JPEG_QUALITY}), "
                "without EXIF. Send this model upright images too: `van-tfx predict "
                "--apply-exif-orientation`, or turn them upright before a request."
            )
        else:
            notes.append(
                f"{what}: stored as their pixels lie (sideways or mirrored), which is how "
                "TensorFlow's decode_jpeg, the pipeline and TF Serving read them (EXIF ignored), "
                "so the model learns them that way. --apply-exif-orientation stores them upright."
            )
    if exif.unreadable:
        examples = ", ".join(escaped(p) for p in exif.unreadable_examples)
        notes.append(
            f"{exif.unreadable} image(s) have EXIF that cannot be read or an orientation that is "
            f"not 1-8 (e.g. {examples}): taken as orientation 1, stored as their pixels lie, as "
            "TensorFlow reads them."
        )
    return notes


def run_sample(args: argparse.Namespace) -> int:
    """Write (or find) the bundled digits sample and print where it is."""
    from pathlib import Path

    from van_tfx.data.sample import build_sample, existing_spans
    from van_tfx.env import van_tfx_home

    root = Path(args.dir) if args.dir else Path(van_tfx_home()) / "data"
    already_there = bool(existing_spans(root)) and not args.new_span
    try:
        span_dir = build_sample(root, new_span=args.new_span, shards=args.shards)
    except OSError as exc:  # unwritable or full DIR, or a file of that name
        print(f"error: {os_error_line(exc)}", file=sys.stderr)
        return 1
    if already_there:
        print(f"sample already present: {span_dir} (use --new-span to add new data)")
    else:
        print(f"wrote the digits sample span to {span_dir}")
    return 0
