"""What ImportExampleGen's check of each shard's start reads, before and after, in one run.

Shards of ImageNet-sized records (~110 KB) are checked the way the executor checked them before
(check_first_record at 495ac99: one tf.io.gfile open to sniff GZIP's magic, a second open to read
the first record) and the way it checks them now (no pass at all on the copy path; on TFX's own
Beam path one open, and on gs:// a ranged read). Counted per shard:

  local / file://   opens and bytes read, from strace of a child process (openat, read, pread64)
                    on local paths and on file:// URLs (which go through tf.io.gfile, the branch
                    object storage takes)
  gs://             requests and bytes served by tests/gcs_fake.py, a local server speaking GCS's
                    JSON API, to google-cloud-storage's real client (ranged read, after only)

What TF's own GCS file system would fetch is not measured here (no bucket): per its source
(tsl gcs_file_system.cc, BufferedGcsRandomAccessFile) each open's first read fills a
GCS_READ_CACHE_BLOCK_SIZE_MB buffer, 64 MiB by default, with one ranged GET; this is printed as
computed from the shard size, labelled so.

Run: TF_USE_LEGACY_KERAS=1 .venv/bin/python benchmarks/bench_shard_reads.py [--shards 8]
     [--records 64]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

GCS_BLOCK = 64 << 20  # tsl gcs_file_system.h kDefaultBlockSize
IMAGENET_SHARDS = 1252 + 49
MODES = ("before", "after-copy-path", "after-tfx-path")


def check_before(path: str) -> None:
    """check_first_record as it was at 495ac99 (components/example_gen.py), minus the name check."""
    from tfx.dsl.io import fileio

    from van_tfx.tfrecords import read_records

    with fileio.open(path, "rb") as handle:
        handle.read(2)  # GZIP's magic, for a shard not named .gz
    next(read_records(path), None)


def child(mode: str, paths: list[str]) -> None:
    """Run one mode's check over `paths` (under strace, in its own process)."""
    import van_tfx  # noqa: F401  (Keras 2 before TensorFlow)
    from components.example_gen import check_first_record
    from van_tfx import storage

    if mode == "before":
        storage.for_each_file(check_before, paths)
    elif mode == "after-tfx-path":
        storage.for_each_file(check_first_record, paths)
    # after-copy-path: nothing is read before the copy


_CALL = re.compile(r"^(\d+)\s+(openat|read|pread64|close)\((.*)")
_RESUMED = re.compile(r"^(\d+)\s+<\.\.\. (\w+) resumed>.*= (-?\d+)")


def traced(mode: str, paths: list[str]) -> dict[str, tuple[int, int]]:
    """{path: (opens, bytes read)} of one mode's child process over `paths`, from strace."""
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as log:
        command = [
            "strace", "-f", "-qq", "-e", "trace=openat,read,pread64,close", "-o", log.name,
            sys.executable, __file__, "--child", mode, *paths,
        ]  # fmt: skip
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_USE_LEGACY_KERAS": "1"}
        subprocess.run(command, check=True, env=env, capture_output=True)
        lines = log.read().splitlines()
    wanted = {p.removeprefix("file://") for p in paths}
    counts = {p: [0, 0] for p in wanted}
    fds: dict[str, str] = {}
    pending: dict[str, tuple[str, str]] = {}
    for line in lines:
        resumed = _RESUMED.match(line)
        if resumed:
            pid, _, result = resumed.groups()
            call, argument = pending.pop(pid, ("", ""))
            _count(call, argument, int(result), counts, fds)
            continue
        found = _CALL.match(line)
        if not found:
            continue
        pid, call, rest = found.groups()
        argument = _opened_path(rest) if call == "openat" else rest.split(",", 1)[0]
        if "<unfinished ...>" in rest:
            pending[pid] = (call, argument)
            continue
        result = re.search(r"= (-?\d+)", rest)
        _count(call, argument, int(result.group(1)) if result else -1, counts, fds)
    return {p: tuple(counts[p.removeprefix("file://")]) for p in paths}


def _opened_path(rest: str) -> str:
    found = re.match(r'\w+, "([^"]*)"', rest)
    return found.group(1) if found else ""


def _count(call: str, argument: str, result: int, counts, fds) -> None:
    # An fd is a shard's from its openat until its close; reads on it count as the shard's.
    if call == "openat":
        if argument in counts and result >= 0:
            counts[argument][0] += 1
            fds[str(result)] = argument
    elif call == "close":
        fds.pop(argument, None)
    elif call in ("read", "pread64") and argument in fds and result > 0:
        counts[fds[argument]][1] += result


def write_shards(directory: str, shards: int, records: int) -> list[str]:
    """`shards` TFRecord shards of `records` ~110 KB records each, as TensorFlow writes them."""
    import tensorflow as tf

    paths = []
    for index in range(shards):
        path = os.path.join(directory, f"train-{index:05d}-of-{shards:05d}")
        with tf.io.TFRecordWriter(path) as writer:
            for number in range(records):
                writer.write(bytes([number % 251]) * 110_000)
        paths.append(path)
    return paths


def on_fake_gcs(paths: list[str]) -> tuple[int, int]:
    """(requests, bytes) per shard of the ranged check of the same shards served as gs://."""
    from gcs_fake import fake_gcs

    from components.example_gen import check_first_records
    from van_tfx import storage

    with fake_gcs() as gcs:
        os.environ["STORAGE_EMULATOR_HOST"] = gcs.url
        storage._GCS.clear()
        remote = []
        for path in paths:
            remote.append(f"gs://bucket/data/{os.path.basename(path)}")
            with open(path, "rb") as handle:
                gcs.put(remote[-1], handle.read())
        check_first_records({"train": ("data/train-*", remote)})
        served = [gcs.served(path) for path in remote]
    del os.environ["STORAGE_EMULATOR_HOST"]
    storage._GCS.clear()
    return max(r for r, _ in served), max(b for _, b in served)


def main() -> int:
    """Write the shards, trace each mode, print opens and bytes per shard."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1:])
        return 0

    import van_tfx  # noqa: F401
    from benchmarks.machine import describe_machine
    from van_tfx.storage import RANGE_BYTES

    print(describe_machine())
    with tempfile.TemporaryDirectory() as directory:
        paths = write_shards(directory, args.shards, args.records)
        size = os.path.getsize(paths[0])
        print(f"{args.shards} shards of {args.records} records, {size:,} bytes each")
        print(f"{'mode':<16} {'paths':<8} {'opens/shard':>11} {'bytes read/shard':>17}")
        if not shutil.which("strace"):
            print("(no strace on this machine: the local and file:// rows are not measured)")
        for mode in MODES if shutil.which("strace") else ():
            for kind, given in (("local", paths), ("file://", [f"file://{p}" for p in paths])):
                seen = traced(mode, given)
                opens = {o for o, _ in seen.values()}
                read = {b for _, b in seen.values()}
                print(f"{mode:<16} {kind:<8} {_one(opens):>11} {_one(read):>17}")
        requests, served = on_fake_gcs(paths)
        print(
            f"{'after-tfx-path':<16} {'gs://':<8} {requests:>11} {served:>17,}  "
            f"(requests and bytes served by the fake GCS; RANGE_BYTES = {RANGE_BYTES:,})"
        )
        computed = 2 * min(size, GCS_BLOCK)
        print(
            f"{'before':<16} {'gs://':<8} {2:>11} {computed:>17,}  (computed, not measured: "
            "2 opens x min(shard size, 64 MiB block) by TF's GcsFileSystem)"
        )
        # ImageNet-1k: 1,252 + 49 shards of ~113 MB, records of ~110 KB like these.
        before, after = IMAGENET_SHARDS * 2 * GCS_BLOCK, IMAGENET_SHARDS * served
        print(
            f"ImageNet-1k's {IMAGENET_SHARDS:,} shards of ~113 MB, computed from the rows above: "
            f"before {before / 2**30:.1f} GiB fetched by the check on gs://; after 0 on the copy "
            f"path, {after / 2**30:.2f} GiB on TFX's path (ranged)"
        )
    return 0


def _one(values: set[int]) -> str:
    return f"{min(values):,}" if len(values) == 1 else f"{min(values):,}-{max(values):,}"


if __name__ == "__main__":
    sys.exit(main())
