"""One file-system poll of a model base path holding many numbered children: seconds and calls.

Builds `--children` numbered directories in a temporary base path, `--with-model` of them (the
lowest numbers) holding an empty saved_model.pb, and times what a poll of a `latest` model
does (serving.manager.aspired_children, the listing and the policy) plus, for comparison, the
complete-versions listing the NewDataGate and the demo use (serving.manager.version_dirs, one
stat per child). Prints the best of `--rounds` for each, and the tf.io.gfile calls each made.

Figures (2-core development machine, 100k children, none with a model): a poll stat'ed every
child without a model before it was read by name, as TF Serving reads it: 1.26 s and 100,001
calls a poll, now 0.19 s and one listing.

Run: TF_USE_LEGACY_KERAS=1 .venv/bin/python benchmarks/bench_poll.py [--children 100000]
     [--with-model 0] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO]

import van_tfx  # noqa: E402,F401  (Keras 2 before TensorFlow)


class CallCount:
    """Counts the tf.io.gfile calls made (listdir, exists, stat), passing each through."""

    def __init__(self):
        import tensorflow as tf

        self.calls = 0
        for name in ("listdir", "exists", "stat"):
            setattr(tf.io.gfile, name, self._counting(getattr(tf.io.gfile, name)))

    def _counting(self, call):
        def counted(*args, **kwargs):
            self.calls += 1
            return call(*args, **kwargs)

        return counted


def best(function, rounds: int, counter: CallCount) -> tuple[float, int, object]:
    """(fastest seconds, calls of one run, result) of `rounds` runs of `function`."""
    seconds = []
    for _ in range(rounds):
        counter.calls = 0
        start = time.perf_counter()
        result = function()
        seconds.append(time.perf_counter() - start)
    return min(seconds), counter.calls, result


def main() -> int:
    """Build the base path, time a poll and the complete-versions listing, print both."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--children", type=int, default=100_000)
    parser.add_argument("--with-model", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from serving.manager import aspired_children, version_dirs
    from serving.protos import ModelConfig

    base = tempfile.mkdtemp(prefix="bench_poll-")
    try:
        for version in range(args.children):
            os.mkdir(os.path.join(base, str(version)))
            if version < args.with_model:
                open(os.path.join(base, str(version), "saved_model.pb"), "wb").close()
        config = ModelConfig(name="m", base_path=base, model_platform="tensorflow")
        counter = CallCount()
        for label, function in (
            ("poll (aspired_children)", lambda: aspired_children(base, config)),
            ("complete versions (version_dirs)", lambda: len(version_dirs(base) or {})),
        ):
            seconds, calls, result = best(function, args.rounds, counter)
            print(f"{label:34} {seconds:7.3f} s  {calls:7d} calls  -> {result}")
    finally:
        shutil.rmtree(base)
    return 0


if __name__ == "__main__":
    sys.exit(main())
