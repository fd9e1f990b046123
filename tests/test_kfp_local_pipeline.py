"""The default compiled pipeline, replayed under open-source KFP's rules on the digits sample.

One session-scoped home and one compiled spec (`van-tfx compile` with local paths and tiny
training settings): run 1 pushes a version; run 2 on the same data trains and pushes nothing (the
gated tasks are skipped by their condition, not by failure); after `van-tfx data sample
--new-span`, run 3 warm-starts from the served model, is evaluated against it and pushes; run 4,
compiled with an unreachable gate, trains on a third span, is blocked from pushing and says which
threshold; run 5, the same spec again, does not retrain the rejected span and recipe. Every run is `van-tfx kfp-local` in a real subprocess; every task in it is a real
subprocess of the compiled container command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from van_tfx.data.sample import build_sample

pytestmark = pytest.mark.slow

TINY = [
    "model.variant=tiny",
    "model.image_size=32",
    "model.drop_path_rate=0.0",
    "train.epochs=3",
    "train.batch_size=64",
    "train.base_learning_rate=0.03",
    "train.warmup_epochs=0.5",
    "augment.randaugment=false",
    "augment.random_erasing_prob=0.0",
    "augment.mixup_prob=0.0",
    "eval.min_top1=0.3",
    "eval.max_top1_drop=0.5",
    "kubeflow.beam_args=[--direct_running_mode=in_memory]",
]
GATED_ALWAYS_SKIPPED = (
    "ImportExampleGen",
    "EvalExampleGen",
    "CuratedSchema",
    "ServedModel",
)  # the gate's direct dependents


def van_tfx(home: Path, *args: str) -> subprocess.CompletedProcess:
    """The van-tfx CLI with VAN_TFX_HOME=home (temporary files in home/tmp) in a real subprocess."""
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ, VAN_TFX_HOME=str(home), TF_USE_LEGACY_KERAS="1", TMPDIR=str(home / "tmp")
    )
    return subprocess.run(
        [sys.executable, "-m", "van_tfx.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )


def compile_spec(home: Path, name: str, *overrides: str) -> Path:
    """`van-tfx compile` of the default pipeline, pointed at this home's directories."""
    settings = [
        f"kubeflow.data_root={home / 'data'}",
        f"kubeflow.pipeline_root={home / 'kfp_root'}",
        f"kubeflow.serving_base_path={home / 'serving' / 'van'}",
        *TINY,
        *overrides,
    ]
    path = home / name
    result = van_tfx(
        home, "compile", "--output", str(path), *[a for s in settings for a in ("--set", s)]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return path


def replay(home: Path, spec: Path) -> dict:
    """`van-tfx kfp-local --json`: the outcome, the task records and the progress lines."""
    result = van_tfx(home, "kfp-local", str(spec), "--json")
    assert result.stdout.strip(), result.stderr[-4000:]
    outcome = json.loads(result.stdout)
    records = sorted((home / "kfp_root" / "van-tfx").glob("*/kfp_local_run.json"))
    record = json.loads(records[-1].read_text())
    return {"code": result.returncode, "outcome": outcome, "record": record, "err": result.stderr}


def states(run: dict) -> dict[str, str]:
    return {task["name"]: task["state"] for task in run["record"]["tasks"]}


def versions(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "serving" / "van").glob("*") if p.name.isdigit())


def task_log(run: dict, name: str) -> str:
    [task] = [t for t in run["record"]["tasks"] if t["name"] == name]
    return Path(task["log"]).read_text()


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("kfp-home")
    build_sample(home / "data")
    return home


@pytest.fixture(scope="module")
def spec(home) -> Path:
    return compile_spec(home, "pipeline.yaml")


@pytest.fixture(scope="module")
def run1(home, spec) -> dict:
    return replay(home, spec)


@pytest.fixture(scope="module")
def run2(home, spec, run1) -> tuple[dict, list[str]]:
    before = versions(home)
    return replay(home, spec), before


@pytest.fixture(scope="module")
def run3(home, spec, run2) -> tuple[dict, list[str]]:
    build_sample(home / "data", new_span=True)
    before = versions(home)
    return replay(home, spec), before


@pytest.fixture(scope="module")
def unreachable(home, run3) -> Path:
    return compile_spec(home, "unreachable.yaml", "eval.min_top1=1.0")


@pytest.fixture(scope="module")
def run4(home, unreachable) -> tuple[dict, list[str]]:
    build_sample(home / "data", new_span=True)
    before = versions(home)
    return replay(home, unreachable), before


@pytest.fixture(scope="module")
def run5(home, unreachable, run4) -> tuple[dict, list[str]]:
    before = versions(home)
    return replay(home, unreachable), before


def test_the_compiled_spec_has_no_legacy_parameters_and_no_resolver(spec):
    text = spec.read_text()
    assert "constantValue" not in text and "resolver" not in text
    assert "baseline_model" in text


def test_run1_pushes_a_version(home, run1):
    assert run1["code"] == 0, run1["err"][-3000:]
    assert set(states(run1).values()) == {"succeeded"}
    outcome = run1["outcome"]
    assert outcome["pushed"] and outcome["span"] == 1
    assert versions(home) == [outcome["pushed_version"]]
    assert "no model is served yet" in " ".join(outcome["reasons"])
    assert "nothing is served yet" in task_log(run1, "ServedModel")
    # The span and fingerprint the executor resolved itself travel with the model.
    record = json.loads(
        (
            home
            / "serving"
            / "van"
            / outcome["pushed_version"]
            / "assets.extra"
            / "van_training_data.json"
        ).read_text()
    )
    assert record["span"] == 1 and record["input_fingerprint"]
    assert "resolved span 1, version None as the NewDataGate decided" in task_log(
        run1, "ImportExampleGen"
    )
    assert Path(outcome["report_path"]).exists()


def test_replayed_beam_steps_build_no_tfx_sdist(home, spec, run1):
    # The compiled DirectRunner args name the image as the workers' environment, so TFX's Beam
    # executors in each task skip packaging TFX as a `tfx_ephemeral` sdist.
    assert "--sdk_container_image=" in spec.read_text()
    assert not list((home / "tmp").rglob("tfx_ephemeral*"))


def test_run2_on_the_same_data_skips_by_condition_and_pushes_nothing(home, run2):
    run, before = run2
    assert run["code"] == 0, run["err"][-3000:]
    assert not run["outcome"]["trained"] and not run["outcome"]["pushed"]
    assert run["outcome"]["reasons"][0].startswith("nothing new to train on")
    task_states = states(run)
    assert task_states.pop("NewDataGate") == "succeeded"
    for name in GATED_ALWAYS_SKIPPED:
        assert task_states.pop(name) == "skipped", name
    assert set(task_states.values()) == {"omitted"}  # Argo `depends: X.Succeeded`
    assert "failed" not in json.dumps(run["record"]["tasks"])
    assert versions(home) == before


def test_run3_on_a_new_span_warm_starts_is_judged_against_the_served_model_and_pushes(home, run3):
    run, before = run3
    assert run["code"] == 0, run["err"][-3000:]
    outcome = run["outcome"]
    assert outcome["span"] == 2 and outcome["pushed"]
    assert versions(home) == sorted([*before, outcome["pushed_version"]])
    assert f"served version {before[-1]}" in task_log(run, "ServedModel")
    assert "warm start from" in task_log(run, "Trainer")
    assert outcome["baseline_metrics"]["sparse_categorical_accuracy"] > 0
    # The change threshold was in force: the Evaluator had the served model as its baseline.
    assert "no model is served yet" not in " ".join(outcome["reasons"])


def test_run4_with_an_unreachable_gate_is_blocked_and_says_which_threshold(home, run4):
    run, before = run4
    assert run["code"] == 0, run["err"][-3000:]
    outcome = run["outcome"]
    assert outcome["trained"] and not outcome["pushed"]
    assert versions(home) == before
    assert any(
        "sparse_categorical_accuracy" in r and "below the value threshold 1.0000" in r
        for r in outcome["reasons"]
    ), outcome["reasons"]
    assert states(run)["Pusher"] == "succeeded"  # it ran, and declined to push


def test_run5_does_not_retrain_the_span_and_recipe_the_evaluator_rejected(home, run4, run5):
    run, before = run5
    assert run["code"] == 0, run["err"][-3000:]
    outcome = run["outcome"]
    assert not outcome["trained"] and not outcome["pushed"]
    assert outcome["reasons"][0].startswith("nothing new to train on")
    assert "span 3" in outcome["reasons"][0] and "not blessed" in outcome["reasons"][0]
    [record] = (home / "serving" / "van" / ".van_tfx_rejected").glob("span-3-*.json")
    assert json.loads(record.read_text())["span"] == 3
    assert str(record) in outcome["reasons"][0]
    assert "recorded in" in task_log(run4[0], "RecordRejection")
    task_states = states(run)
    assert task_states.pop("NewDataGate") == "succeeded"
    assert set(task_states.values()) <= {"skipped", "omitted"}
    assert versions(home) == before
