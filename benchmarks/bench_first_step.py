"""Seconds to the first training step, the Trainer's way, with each start-up fix undone in turn.

Every measurement is a fresh process (one-time costs are per process), run in alternation with
its baseline so background load on a shared machine hits both alike:

    .venv/bin/python benchmarks/bench_first_step.py                       # demo VAN-tiny, 32 px
    .venv/bin/python benchmarks/bench_first_step.py --models demo,b0 --undo all,autograph --rounds 2

A child builds the model, compiles it and runs `model.fit` with the Trainer's own functions
(`train.build_model`, `train.compile_model`, `train.build_callbacks`, `dataset.train_dataset`)
on Transform-layout records of real digit images; "first step" is from model building to the end
of the first `on_train_batch_end` (model build, tf.data tracing, train-step tracing, Grappler, the
first execution). `--undo` names the start-up fixes the baseline goes without (van_trainer.tracing,
optim.FusedAdamW): `autograph` (AutoGraph converts tf_keras again), `data-autograph` (and the
tf.data map functions), `single-trace` (the optimizer
creates its slots inside the first step), `shared-scalars` (the fused update rebuilds the step's
scalars per variable), `fused` (tf_keras' own AdamW update), `all`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

START = time.perf_counter()
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before any TensorFlow import
REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIXES = ("autograph", "data-autograph", "single-trace", "shared-scalars", "fused")
MODELS = {
    # The demo's settings (van_tfx.config.DEMO_OVERRIDES).
    "demo": [],
    # VAN-b0 at 224 px with the paper's full augmentation, at a CPU-sized batch.
    "b0": [
        "model.variant=b0",
        "model.image_size=224",
        "model.drop_path_rate=0.1",
        "train.batch_size=16",
        "augment.randaugment=true",
        "augment.mixup_prob=1.0",
        "augment.random_erasing_prob=0.25",
        "augment.horizontal_flip=true",
        "augment.crop_scale=[0.08, 1.0]",
    ],
}


def undo(fixes: set[str]) -> None:
    """Put the named start-up fixes back to tf_keras' behaviour (baseline runs only)."""
    import tf_keras as keras
    from tensorflow.python.autograph.core import config as autograph_config

    from van_trainer import dataset, model, optim, tracing  # noqa: F401  (model applies the rule)

    if "autograph" in fixes:
        autograph_config.CONVERSION_RULES = tuple(
            r for r in autograph_config.CONVERSION_RULES if str(r) != str(tracing.TF_KERAS_RULE)
        )
    if "data-autograph" in fixes:
        dataset.graph_function = lambda fn: fn
    if "single-trace" in fixes:
        tracing.create_optimizer_variables = lambda model: None
    if "shared-scalars" in fixes:
        optim.FusedAdamW._step_scalars = lambda self, dtype: self._build_step_scalars(dtype)
    if "fused" in fixes:
        optim.FusedAdamW = keras.optimizers.AdamW


def child(model_name: str, fixes: set[str], steps: int) -> dict:
    """Build, compile and fit like the Trainer; return the one-time and per-step seconds."""
    sys.path.insert(0, REPO)
    import tensorflow as tf
    import tf_keras as keras

    import van_tfx  # noqa: F401  (legacy Keras before TensorFlow)
    from benchmarks.bench_input import write_records
    from van_tfx.config import DEMO_OVERRIDES, load_config
    from van_trainer import dataset, optim, train

    undo(fixes)
    imported = time.perf_counter()
    config = load_config(None, [*DEMO_OVERRIDES, *MODELS[model_name]])
    marks: dict[str, float] = {}

    class Marks(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            marks.setdefault("first_step", time.perf_counter())
            marks["last_step"] = time.perf_counter()

        def on_test_begin(self, logs=None):
            marks["test_begin"] = time.perf_counter()

        def on_test_end(self, logs=None):
            marks["test_end"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        side = max(64, config.model.image_size * 8 // 7)  # the demo's 64 px digits; 256 for 224
        files = write_records(__import__("pathlib").Path(tmp), 256, side)
        begin = time.perf_counter()
        model = train.build_model(config, 10)
        schedule = optim.build_schedule(config.train, steps, 1)
        train.compile_model(model, config, schedule, 10)
        built = time.perf_counter()
        train_ds = dataset.train_dataset(files, config, 10)
        eval_ds = dataset.eval_dataset(files, config, 10)
        callbacks = [*train.build_callbacks(config, tmp, schedule, chief=True), Marks()]
        model.fit(
            train_ds,
            epochs=1,
            steps_per_epoch=steps,
            validation_data=eval_ds,
            validation_steps=2,
            callbacks=callbacks,
            verbose=0,
        )
        traces = int(model.train_function.experimental_get_tracing_count())
        graph = model.train_function.get_concrete_function(iter(train_ds)).graph
    return {
        "import_s": imported - START,
        "build_compile_s": built - begin,
        "first_step_s": marks["first_step"] - begin,
        "later_step_s": (marks["last_step"] - marks["first_step"]) / max(steps - 1, 1),
        "first_validation_s": marks["test_end"] - marks["test_begin"],
        "traces": traces,
        "graph_ops": len(graph.get_operations()),
        "tf": tf.__version__,
    }


def run_child(model_name: str, fixes: set[str], steps: int) -> dict:
    """One fresh process; its JSON result."""
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2")
    args = [sys.executable, __file__, "--child", model_name, "--steps", str(steps)]
    args += ["--undo", ",".join(sorted(fixes)) or "none"]
    out = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"child {model_name} undo={sorted(fixes)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_undo(text: str) -> set[str]:
    """'all' | 'none' | comma-separated fix names -> the set of fixes to undo."""
    if text == "all":
        return set(FIXES)
    names = {n for n in text.split(",") if n and n != "none"}
    if names - set(FIXES):
        raise SystemExit(f"unknown fix(es) {sorted(names - set(FIXES))}; choose from {FIXES}")
    return names


def main(argv=None) -> int:
    """Alternate baseline and candidate processes; print medians and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo")
    parser.add_argument("--undo", default="all", help="baselines, separated by '/': all/autograph")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, parse_undo(args.undo), args.steps)))
        return 0
    sys.path.insert(0, REPO)
    from benchmarks.machine import describe_machine, load_average

    print(describe_machine())
    baselines = [parse_undo(u) for u in args.undo.split("/")] if args.undo != "none" else []
    for model_name in args.models.split(","):
        variants = {"ours": set(), **{f"without {'+'.join(sorted(b))}": b for b in baselines}}
        samples: dict[str, list[dict]] = {name: [] for name in variants}
        loads = [load_average()]
        for _ in range(args.rounds):
            for name, fixes in variants.items():
                samples[name].append(run_child(model_name, fixes, args.steps))
        loads.append(load_average())
        report(model_name, samples, loads)
    return 0


def report(model_name: str, samples: dict[str, list[dict]], loads: list[str]) -> None:
    """Median of each figure per variant, and first-step ratios against ours."""
    keys = ("first_step_s", "build_compile_s", "later_step_s", "first_validation_s", "import_s")
    print(f"\n== {model_name}: seconds (median of {len(next(iter(samples.values())))}) ==")
    print(f"load average before / after: {loads[0]} / {loads[1]}")
    print(f"{'variant':<42}" + "".join(f"{k[:-2]:>18}" for k in keys) + "  traces  graph ops")
    ours = statistics.median(s["first_step_s"] for s in samples["ours"])
    for name, runs in samples.items():
        row = [statistics.median(r[k] for r in runs) for k in keys]
        ratio = "" if name == "ours" else f"  (first step x{row[0] / ours:.1f} ours)"
        cells = "".join(f"{v:>18.2f}" for v in row)
        print(f"{name:<42}{cells}{runs[0]['traces']:>8}{runs[0]['graph_ops']:>11}{ratio}")


if __name__ == "__main__":
    raise SystemExit(main())
