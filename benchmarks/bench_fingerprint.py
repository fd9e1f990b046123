"""The input fingerprint with object-storage latency: TFX's serial stats vs ours, in one run.

A span of ImageNet-1k's shard counts (1,252 train + 49 validation files, tiny) is read through
`lagged://` (tests/filesystems.py), a TFX fileio file system over the local files that waits
`--delay` seconds before every glob and stat, as a round trip to object storage would (~0.1 s
was the reviewer's figure for a GCS stat; measure yours). Alternating rounds, each printed:

  fingerprint  TFX's utils.calculate_splits_fingerprint_span_and_version (its stats one after
               another) vs components.input_fingerprint's (CONCURRENT_CALLS at a time); the two
               strings must be equal
  gate         the NewDataGate's whole look at the span (components.new_data_gate.data_to_ingest)
               with TFX's FileBasedInputProcessor, as before, vs with ours

with the globs and stats each made. Ratios are before / after, from the same run.

Run: TF_USE_LEGACY_KERAS=1 .venv/bin/python benchmarks/bench_fingerprint.py [--delay 0.02]
     [--train 1252 --eval 49] [--rounds 2]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

import van_tfx  # noqa: E402,F401  (Keras 2 before TensorFlow)
from benchmarks.machine import describe_machine  # noqa: E402


def write_span(root: Path, train: int, evaluation: int) -> None:
    """span-1 with `train` + `evaluation` tiny shards, each its own size and mtime."""
    span = root / "span-1"
    span.mkdir(parents=True)
    names = [f"train-{i:05d}-of-{train:05d}" for i in range(train)]
    names += [f"validation-{i:05d}-of-{evaluation:05d}" for i in range(evaluation)]
    for number, name in enumerate(names):
        (span / name).write_bytes(b"\0" * (number % 97))
        os.utime(span / name, ns=((1_700_000_000 + 61 * number) * 10**9 + 250_000_000,) * 2)


def timed(function, root: str, splits):
    """(seconds, result, globs, stats, most stats in flight) of one call through lagged://."""
    from filesystems import LaggedFilesystem

    # A copy each time: TFX's function fills the patterns of the splits it is given in place.
    splits = [copy.deepcopy(split) for split in splits]
    LaggedFilesystem.reset(LaggedFilesystem.delay)
    start = time.perf_counter()
    result = function(root, splits)
    seconds = time.perf_counter() - start
    counts = (LaggedFilesystem.globs, LaggedFilesystem.stats, LaggedFilesystem.max_in_flight)
    return (seconds, result, *counts)


def main() -> int:
    """Build the span, time both ways alternately, print each round and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, default=0.02, help="seconds per glob and stat")
    parser.add_argument("--train", type=int, default=1252)
    parser.add_argument("--eval", type=int, default=49)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from filesystems import SCHEME, LaggedFilesystem
    from tfx.components.example_gen import input_processor
    from tfx.components.example_gen import utils as tfx_utils
    from tfx.utils import proto_utils

    import components.new_data_gate as gate
    from components import input_fingerprint
    from pipeline import ingest
    from van_tfx.config import DataConfig
    from van_tfx.storage import CONCURRENT_CALLS

    class TfxProcessor(input_processor.FileBasedInputProcessor):
        """TFX's processor as the gate used it before: every resolution fingerprints, serially."""

        def resolve_span_and_version(self, fingerprint: bool = True):
            """TFX's resolution, fingerprint included whatever the gate asks."""
            return super().resolve_span_and_version()

    def gate_look(processor_class, root: str, config: str) -> dict:
        """The gate's data_to_ingest, resolving with `processor_class`."""
        gate.InputProcessor = processor_class  # the one name the gate resolves with
        try:
            return gate.data_to_ingest(root, config)
        finally:
            gate.InputProcessor = input_fingerprint.InputProcessor

    print(describe_machine())
    print(
        f"span of {args.train} + {args.eval} files, {args.delay} s per glob and stat, "
        f"{CONCURRENT_CALLS} concurrent calls, {args.rounds} alternating rounds"
    )
    splits = ingest.input_config(DataConfig()).splits
    config = proto_utils.proto_to_json(ingest.input_config(DataConfig()))
    ways = {
        "fingerprint": (
            ("TFX", tfx_utils.calculate_splits_fingerprint_span_and_version),
            ("ours", input_fingerprint.calculate_splits_fingerprint_span_and_version),
        ),
        "gate": (
            ("TFX", lambda root, _splits: gate_look(TfxProcessor, root, config)),
            (
                "ours",
                lambda root, _splits: gate_look(input_fingerprint.InputProcessor, root, config),
            ),
        ),
    }
    with tempfile.TemporaryDirectory() as directory:
        write_span(Path(directory), args.train, args.eval)
        root = SCHEME + directory
        LaggedFilesystem.delay = args.delay
        for what, pair in ways.items():
            seconds = {name: [] for name, _ in pair}
            results = {}
            for number in range(args.rounds):
                for name, function in pair if number % 2 == 0 else pair[::-1]:
                    took, result, globs, stats, in_flight = timed(function, root, splits)
                    seconds[name].append(took)
                    results.setdefault(name, result)
                    print(
                        f"  {what:<11} {name:<4} round {number + 1}: {took:7.2f} s, {globs} globs, "
                        f"{stats} stats, at most {in_flight} in flight"
                    )
            before, after = (statistics.median(seconds[name]) for name, _ in pair)
            same = _fingerprint(results["TFX"]) == _fingerprint(results["ours"])
            print(
                f"{what}: TFX {before:.2f} s, ours {after:.2f} s (medians): x{before / after:.1f}; "
                f"same fingerprint: {same}"
            )
            if not same:  # reported, not raised: `make bench` prints every figure
                print("  NOT the same fingerprint:", results)
    return 0


def _fingerprint(result) -> str:
    return result["input_fingerprint"] if isinstance(result, dict) else result[0]


if __name__ == "__main__":
    sys.exit(main())
