"""Folder converter: IMAGE_DIR/<synset>/<file> -> ImageNet-style TFRecord shards + synset list."""

from __future__ import annotations

import collections
import errno
import functools
import itertools
import math
import multiprocessing
import os
import random
import stat
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from van_tfx.data.records import (
    MAX_PIXELS,
    SYNSETS_FILE,
    UNREADABLE_ORIENTATION,
    UPRIGHT,
    ConvertedImage,
    ImageRecord,
    InvalidImageError,
    SynsetListError,
    check_split_name,
    escaped,
    label_of,
    load_image_file,
    make_output_dir,
    read_synset_mapping,
    synset_name_problem,
    write_shards,
    write_synset_list,
)
from van_tfx.storage import write_local_text

DEFAULT_SEED = 0
IMAGES_PER_SHARD = 1024
# The split the pipeline trains on: data.train_pattern's default reads `train-*`. Every class of
# its synsets.txt needs a record in it (Transform numbers the classes 1..N from its records).
TRAIN_SPLIT = "train"
# How many paths a summary names as examples of a kind of image (EXIF orientation).
EXAMPLES = 3


class InvalidImagesError(ValueError):
    """Some inputs cannot be converted (not decodable images, not files); lists every one."""

    def __init__(self, rejected: list[tuple[str, str]], skipping: bool = False):
        lines = "\n".join(f"  {escaped(path)}: {reason}" for path, reason in rejected)
        advice = "no input is left to convert" if skipping else "or pass --skip-invalid"
        super().__init__(
            f"{len(rejected)} input(s) cannot be converted; nothing was written "
            f"(fix or remove them, {advice}):\n{lines}"
        )
        self.rejected = rejected


class EmptyClassesError(ValueError):
    """Class folders that would end with no record in the split; names each one and why."""

    def __init__(self, split: str, empty: dict[str, tuple[str, list[tuple[str, str]]]]):
        # empty: class folder path -> (why it has no record, the rejected entries behind it)
        lines = []
        for folder, (why, entries) in empty.items():
            lines.append(f"  {escaped(folder)}: {why}")
            lines += [f"    {escaped(path)}: {reason}" for path, reason in entries]
        super().__init__(
            f"{len(empty)} class folder(s) would have no record in split {split!r}; nothing was "
            "written. --skip-invalid skips files, never a whole class: kept, the class would "
            "be a label without examples (Transform refuses a class without a training "
            "record); dropped, the model would lack it and nothing would say so. Fix their "
            "files, or move the folders out of IMAGE_DIR to leave the classes out:\n"
            + "\n".join(lines)
        )
        self.split = split
        self.empty = empty


@dataclass
class ExifSummary:
    """The converted images whose EXIF orientation is not 1, and those whose EXIF is unusable."""

    applied: bool = False  # turned upright (--apply-exif-orientation), else stored as they lie
    oriented: Counter = field(default_factory=Counter)  # orientation 2-8 -> images
    oriented_examples: list[str] = field(default_factory=list)  # the first EXAMPLES paths
    unreadable: int = 0  # EXIF that cannot be parsed, or an orientation that is not 1-8
    unreadable_examples: list[str] = field(default_factory=list)

    def add(self, path: str, orientation: int) -> None:
        """Count one converted image by its source's EXIF orientation."""
        if orientation in UPRIGHT:
            self.oriented[orientation] += 1
            if len(self.oriented_examples) < EXAMPLES:
                self.oriented_examples.append(path)
        elif orientation == UNREADABLE_ORIENTATION:
            self.unreadable += 1
            if len(self.unreadable_examples) < EXAMPLES:
                self.unreadable_examples.append(path)


@dataclass
class BuildResult:
    """What one converter run wrote."""

    shards: list[Path]
    num_records: int
    synsets_path: Path
    rejected: list[tuple[str, str]] = field(default_factory=list)
    rejected_report: Path | None = None
    ignored: list[tuple[str, str]] = field(default_factory=list)
    exif: ExifSummary = field(default_factory=ExifSummary)
    # Classes of an existing synsets.txt that this (non-training) split has no folder for.
    classes_without_records: list[str] = field(default_factory=list)


@dataclass
class Listing:
    """IMAGE_DIR's class folders and files, and what cannot be read or is left out on purpose."""

    images: dict[str, list[Path]]  # class folder name -> its files, sorted
    problems: list[tuple[str, str]]  # (path, reason): errors, or skipped with --skip-invalid
    ignored: list[tuple[str, str]]  # (path, reason): hidden entries, the output directory
    # class folder name -> its problems (the folder's own, then its entries'), for the classes
    # that have any; a class folder missing from `images` has at least its own.
    class_problems: dict[str, list[tuple[str, str]]] = field(default_factory=dict)


HIDDEN = "hidden (name starts with '.')"


def list_images(
    image_dir: str | os.PathLike, output_dir: str | os.PathLike | None = None
) -> Listing:
    """List IMAGE_DIR/<synset>/<file>: every entry is a class, an image, a problem or ignored."""
    # Hidden entries (names starting with '.') and OUTPUT_DIR are ignored, and listed as such.
    # Anything else that is not a folder at the top or a regular file (or a link to one) inside a
    # class folder is a problem: files at the top, nested folders, broken links, link loops, FIFOs,
    # devices; so is a class folder without images.
    root = Path(image_dir)
    if not root.is_dir():
        # A file given as IMAGE_DIR was reported as "not found", though it is there.
        if root.exists():
            raise NotADirectoryError(f"image directory {root}: exists and is not a directory")
        raise FileNotFoundError(f"image directory not found: {root}")
    try:
        out_stat = os.stat(output_dir) if output_dir is not None else None
    except OSError:
        out_stat = None  # not there yet: not inside IMAGE_DIR either
    problems: list[tuple[str, str]] = []
    ignored: list[tuple[str, str]] = []
    classes: list[Path] = []
    for entry in _entries(root):
        path = Path(entry.path)
        mode, problem = _mode(entry)
        if entry.name.startswith("."):
            ignored.append((entry.path, HIDDEN))
        elif stat.S_ISDIR(mode) and out_stat and os.path.samestat(os.stat(path), out_stat):
            ignored.append((entry.path, "the output directory"))
        elif stat.S_ISDIR(mode):
            classes.append(path)
        elif stat.S_ISREG(mode):
            problems.append((entry.path, "a file outside the class folders (IMAGE_DIR/<synset>/)"))
        else:
            problems.append((entry.path, problem))
    check_class_folder_names([d.name for d in classes], root)
    images: dict[str, list[Path]] = {}
    class_problems: dict[str, list[tuple[str, str]]] = {}
    for folder in classes:
        files = []
        own: list[tuple[str, str]] = []  # this class folder's problems
        try:
            entries = _entries(folder)
        except OSError as exc:
            own.append((str(folder), f"cannot list the folder ({exc.strerror})"))
            entries = []
        for entry in entries:
            mode, problem = _mode(entry)
            if entry.name.startswith("."):
                ignored.append((entry.path, HIDDEN))
            elif stat.S_ISREG(mode):
                files.append(Path(entry.path))
            elif stat.S_ISDIR(mode):
                own.append((entry.path, "a folder inside a class folder (not read)"))
            else:
                own.append((entry.path, problem))
        if files:
            images[folder.name] = files
        elif not own or entries:
            own.insert(0, (str(folder), "a class folder without images"))
        if own:
            problems += own
            class_problems[folder.name] = own
    if not images and not problems:
        raise SynsetListError(
            f"{root} has no <synset>/ subdirectories (expected IMAGE_DIR/<synset>/<file>)"
        )
    return Listing(images, problems, ignored, class_problems)


def _entries(folder: Path) -> list[os.DirEntry]:
    with os.scandir(folder) as entries:
        return sorted(entries, key=lambda e: e.name)


def _mode(entry: os.DirEntry) -> tuple[int, str]:
    # The entry's file type after links (0 if it has none) and what it is if not a file/folder.
    try:
        mode = os.stat(entry.path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return 0, "a symbolic link loop"
        if exc.errno == errno.ENOENT and entry.is_symlink():
            return 0, f"a broken symbolic link (to {escaped(os.readlink(entry.path))})"
        return 0, f"cannot be read ({exc.strerror})"
    kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
    return mode, f"{kind}, not a regular file"


def check_class_folder_names(names: list[str], root: Path) -> None:
    """Refuse class folder names that synsets.txt could not hold (SynsetListError lists them)."""
    bad = [(name, problem) for name in names if (problem := synset_name_problem(name))]
    if bad:
        lines = "\n".join(f"  '{escaped(str(root / name))}': {problem}" for name, problem in bad)
        raise SynsetListError(
            f"{len(bad)} class folder name(s) cannot be synsets (one word of UTF-8 text per "
            f"synsets.txt line, not starting with '#'); rename them, nothing was written:\n{lines}"
        )


def resolve_synsets(
    found: list[str], output_dir: Path, synsets_file: str | os.PathLike | None
) -> tuple[dict[str, str], bool]:
    """The synset list (in label order, with texts) and whether it already exists on disk."""
    # An existing OUTPUT_DIR/synsets.txt fixes the labels (so validation matches train); otherwise
    # the sorted synset directories do. Texts come from --synsets-file, else the existing list.
    existing_path = output_dir / SYNSETS_FILE
    existing = read_synset_mapping(existing_path) if existing_path.exists() else None
    mapping = read_synset_mapping(synsets_file) if synsets_file else None
    order = list(existing) if existing is not None else sorted(found)
    unknown = [s for s in found if s not in order]
    if unknown:
        raise SynsetListError(
            f"synset(s) {', '.join(unknown)} are not in the existing list {existing_path}; "
            "labels must match the other splits (convert into a fresh OUTPUT_DIR or extend the list)"
        )
    if mapping is not None:
        missing = [s for s in order if s not in mapping]
        if missing:
            raise SynsetListError(f"synset(s) {', '.join(missing)} have no entry in {synsets_file}")
        return {s: mapping[s] for s in order}, existing is not None
    texts = existing or {}
    return {s: texts.get(s, s) for s in order}, existing is not None


def shuffled_items(images: dict[str, list[Path]], seed: int) -> list[tuple[Path, str]]:
    """All (file, synset) pairs in a seeded shuffle, so every shard mixes classes reproducibly."""
    items = [(path, synset) for synset, files in images.items() for path in files]
    random.Random(seed).shuffle(items)
    return items


def _load(
    path: Path, max_pixels: int, apply_exif_orientation: bool
) -> ConvertedImage | InvalidImageError:
    # Runs in worker processes: return the error instead of raising so every failure is collected.
    try:
        return load_image_file(str(path), max_pixels, apply_exif_orientation)
    except InvalidImageError as exc:
        return exc


# Images per task sent to a decoding process, and tasks in flight per process: enough to keep
# every process busy while the writer works, few enough that decoded images wait in the parent
# by the hundred, not by the dataset (Executor.map queued all 1.28 M paths at once, and every
# image decoded ahead of a slow writer stayed in memory: ~110 KB each).
_CHUNK = 16


def _load_all(load, paths: list[Path]) -> list:
    return [load(path) for path in paths]


def _decoded(
    paths: list[Path], workers: int, max_pixels: int, apply_exif_orientation: bool
) -> Iterator[ConvertedImage | InvalidImageError]:
    load = functools.partial(
        _load, max_pixels=max_pixels, apply_exif_orientation=apply_exif_orientation
    )
    if workers <= 1 or len(paths) < 64:
        yield from map(load, paths)
        return
    # spawn: the parent may already hold TensorFlow's threads, which fork would copy half-alive.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        chunks = (paths[start : start + _CHUNK] for start in range(0, len(paths), _CHUNK))
        for answers in in_order(pool, functools.partial(_load_all, load), chunks, 4 * workers):
            yield from answers


def in_order(pool, function, items: Iterable, in_flight: int) -> Iterator:
    """`function` over `items` on `pool`, answers in order, at most `in_flight` calls pending."""
    # Pending: at most `in_flight` calls submitted and not yet taken by the caller.
    pending: collections.deque = collections.deque()
    try:
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= in_flight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:  # the caller stopped early (a write failed): drop the rest
            future.cancel()


@dataclass
class _Run:
    # What one conversion collects while it writes: rejections, records per class, EXIF.
    split: str
    root: Path  # IMAGE_DIR
    listing: Listing
    rejected: list[tuple[str, str]]
    exif: ExifSummary
    written: Counter = field(default_factory=Counter)  # synset -> records written
    rejected_by_class: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def empty_classes(self) -> dict[str, tuple[str, list[tuple[str, str]]]]:
        """Each class folder with files of which none was written, with why (for the error)."""
        empty = {}
        for synset, files in self.listing.images.items():
            if self.written[synset]:
                continue
            inside = self.listing.class_problems.get(synset, [])
            entries = inside + self.rejected_by_class.get(synset, [])
            why = f"none of its {len(files)} file(s) could be converted"
            empty[str(self.root / synset)] = (why, entries)
        return empty


def _records(
    items: list[tuple[Path, str]],
    texts: dict[str, str],
    workers: int,
    run: _Run,
    progress: bool,
    skip_invalid: bool,
    max_pixels: int,
    apply_exif_orientation: bool,
) -> Iterator[ImageRecord | None]:
    # One answer per item, in order: its record, or None for a rejected file.
    from tqdm import tqdm

    rejected = run.rejected
    labels = label_of(list(texts))
    results = _decoded([path for path, _ in items], workers, max_pixels, apply_exif_orientation)
    bar = tqdm(
        zip(items, results, strict=False),
        total=len(items),
        unit="img",
        disable=not progress,
        file=sys.stderr,
    )
    written = 0
    with bar:  # closed (its line ended) before an error is printed, also when the writer fails
        for (path, synset), result in bar:
            if isinstance(result, InvalidImageError):
                rejected.append((str(path), result.reason))
                run.rejected_by_class.setdefault(synset, []).append((str(path), result.reason))
                yield None
                continue
            written += 1
            run.written[synset] += 1
            run.exif.add(str(path), result.orientation)
            # The file name's own bytes: a name that is not UTF-8 is still named exactly.
            filename = os.fsencode(f"{synset}/{path.name}")
            yield ImageRecord(
                result.jpeg,
                result.height,
                result.width,
                labels[synset],
                synset,
                texts[synset],
                filename,
            )
    # Inside the writer: raising discards the temp shards, and no synsets.txt is written.
    if rejected and (not skip_invalid or written == 0):
        raise InvalidImagesError(rejected, skipping=skip_invalid)
    empty = run.empty_classes()
    if empty:
        # Only with --skip-invalid: a class whose every file was skipped.
        raise EmptyClassesError(run.split, empty)


def _in_shards(answers: Iterator, sizes: list[int]) -> Iterator[Iterator[ImageRecord]]:
    # The records of each shard (`sizes` items each, rejected ones left out), then the rest of
    # `answers`, so _records' final check runs (and may raise) inside write_shards.
    for size in sizes:
        yield (record for record in itertools.islice(answers, size) if record is not None)
    for _ in answers:
        pass


def build_dataset(
    image_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    split: str = "train",
    shards: int | None = None,
    skip_invalid: bool = False,
    synsets_file: str | os.PathLike | None = None,
    seed: int = DEFAULT_SEED,
    workers: int | None = None,
    progress: bool = True,
    max_pixels: int = MAX_PIXELS,
    apply_exif_orientation: bool = False,
) -> BuildResult:
    """Convert IMAGE_DIR/<synset>/<file> into OUTPUT_DIR/<split>-NNNNN-of-MMMMM TFRecord shards."""
    output_dir = Path(output_dir)
    check_split_name(split)
    listing = list_images(image_dir, output_dir)
    if listing.problems and not skip_invalid:
        raise InvalidImagesError(listing.problems)
    images = listing.images
    # A class folder the listing left without files: refused before anything is decoded.
    empty = {
        str(Path(image_dir) / name): (problems[0][1], problems[1:])
        for name, problems in listing.class_problems.items()
        if name not in images
    }
    if empty:
        raise EmptyClassesError(split, empty)
    if not images:
        raise InvalidImagesError(listing.problems, skipping=True)  # only files at the top
    texts, list_exists = resolve_synsets(list(images), output_dir, synsets_file)
    without_records = [synset for synset in texts if synset not in images]
    if without_records and split == TRAIN_SPLIT:
        raise SynsetListError(_missing_training_classes(output_dir / SYNSETS_FILE, without_records))
    items = shuffled_items(images, seed)
    num_shards = shards or math.ceil(len(items) / IMAGES_PER_SHARD)
    num_shards = max(1, min(num_shards, len(items)))
    rejected: list[tuple[str, str]] = list(listing.problems)
    run = _Run(split, Path(image_dir), listing, rejected, ExifSummary(apply_exif_orientation))
    # Dealt round-robin (shard k holds items k, k + n, ...), converted shard by shard so one
    # shard file is open at a time: ImageNet-1k's 1,252 shards exceed the usual 1,024 open files.
    dealt = [items[k::num_shards] for k in range(num_shards)]
    answers = _records(
        [item for shard in dealt for item in shard],
        texts,
        workers or os.cpu_count() or 1,
        run,
        progress,
        skip_invalid,
        max_pixels,
        apply_exif_orientation,
    )
    try:
        paths = write_shards(
            _in_shards(answers, [len(shard) for shard in dealt]), output_dir, split, num_shards
        )
    finally:
        answers.close()  # a failed write: stop the decoders and end the progress bar now
    synsets_path = output_dir / "synsets.txt"
    if not list_exists:
        write_synset_list(synsets_path, texts)
    report = write_rejected_report(output_dir, split, rejected)
    num_records = len(items) - (len(rejected) - len(listing.problems))
    return BuildResult(
        paths,
        num_records,
        synsets_path,
        rejected,
        report,
        listing.ignored,
        run.exif,
        without_records,
    )


def _missing_training_classes(synsets_path: Path, missing: list[str]) -> str:
    # Why a training split cannot leave classes of an existing synsets.txt without records.
    return (
        f"{synsets_path} lists {len(missing)} class(es) that IMAGE_DIR has no folder for: "
        f"{', '.join(escaped(s) for s in missing)}. Split {TRAIN_SPLIT!r} is the training "
        "split, which needs a record of every class in that list (Transform numbers the "
        "classes 1..N from the training records and refuses a class without one). Add their "
        "folders, or convert into a fresh OUTPUT_DIR (or remove that synsets.txt) so the list "
        "is made from IMAGE_DIR"
    )


def rejected_report_path(output_dir: Path, split: str) -> Path:
    """Where a build lists the files it skipped: `rejected-<split>.tsv`."""
    # Not `<split>-…`: ExampleGen's patterns (`span-{SPAN}/<split>-*`) would read it as a shard.
    return output_dir / f"rejected-{check_split_name(split)}.tsv"


def write_rejected_report(
    output_dir: Path, split: str, rejected: list[tuple[str, str]]
) -> Path | None:
    """Write `rejected-<split>.tsv` (path, reason), or remove a stale one if none was rejected."""
    # Fields are `escaped`: a tab, line break or non-UTF-8 byte in a file name cannot split a row.
    report = rejected_report_path(output_dir, split)
    # Older builds wrote `<split>-rejected.tsv`, which the split's input pattern matches.
    (output_dir / f"{split}-rejected.tsv").unlink(missing_ok=True)
    if not rejected:
        report.unlink(missing_ok=True)
        return None
    rows = "".join(f"{escaped(path)}\t{escaped(reason)}\n" for path, reason in rejected)
    make_output_dir(output_dir)
    write_local_text(report, "path\treason\n" + rows)
    return report
