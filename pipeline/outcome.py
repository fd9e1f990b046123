"""What a pipeline run decided, in terms a person deciding about a model needs.

Both runners end here: `van-tfx run` (LocalDagRunner) reads its run's artifacts back from ML
Metadata, `van-tfx kfp-local` from the ExecutorOutputs of a compiled KFP spec's tasks. Each turns
them into `RunArtifact`s keyed by TFX type name; `summarize` reads the gate's decision, the
Evaluator's metrics and failed thresholds, the smoke test's and the Pusher's results from those.
This module only reads; the runners write the report and their own state.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from components.new_data_gate import (
    DECISION_TYPE_NAME,
    INCOMPLETE_KEY,
    NEW_DATA_KEY,
    REASON_KEY,
)
from components.served_model import BASELINE_DROPPED_KEY
from components.serving_smoke_test import MODEL_SERVER_KEY

TFX_TITLE_PREFIX = "tfx."  # KFP schema titles of first-party TFX types: tfx.Model, tfx.File, ...


@dataclass(frozen=True)
class RunArtifact:
    """One output artifact of a run: its TFX type name, URI, and (custom) properties."""

    type_name: str
    uri: str
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunOutcome:
    """What one pipeline run did: trained?, blessed?, pushed where?, and why not."""

    run_id: str
    span: int | None
    trained: bool = True
    blessed: bool = False
    pushed: bool = False
    pushed_version: str | None = None
    pushed_path: str | None = None
    reasons: list[str] = field(default_factory=list)
    model_server: str | None = None  # which model server the smoke test validated with
    metrics: dict[str, float] = field(default_factory=dict)
    baseline_metrics: dict[str, float] = field(default_factory=dict)
    report_path: str | None = None
    log_path: str | None = None


def type_name_of_title(schema_title: str) -> str:
    """The TFX type name behind a KFP schema title (`tfx.Model` -> `Model`)."""
    return schema_title.removeprefix(TFX_TITLE_PREFIX)


def int_property(artifact: RunArtifact, name: str, default: int = 0) -> int:
    """An integer (custom) property; KFP metadata carries every number as a double."""
    value = artifact.properties.get(name)
    return default if value is None or value == "" else int(value)


def string_property(artifact: RunArtifact, name: str) -> str | None:
    """A string (custom) property, or None when the artifact has none of that name."""
    value = artifact.properties.get(name)
    return None if value is None else str(value)


def gate_decision(outputs: dict[str, list[RunArtifact]]) -> RunArtifact | None:
    """The NewDataGate's decision among a run's outputs (None if the gate did not run)."""
    for artifact in outputs.get(DECISION_TYPE_NAME, []):
        if NEW_DATA_KEY in artifact.properties:
            return artifact
    return None


def overall_metrics(evaluation_uri: str) -> tuple[dict[str, float], dict[str, float]]:
    """Candidate and baseline metrics on the overall slice of a TFMA evaluation."""
    import tensorflow_model_analysis as tfma

    candidate: dict[str, float] = {}
    baseline: dict[str, float] = {}
    for metrics_for_slice in tfma.load_metrics(evaluation_uri):
        if metrics_for_slice.slice_key.single_slice_keys:
            continue
        for item in metrics_for_slice.metric_keys_and_values:
            key, value = item.key, item.value
            if key.is_diff or not value.HasField("double_value"):
                continue
            target = baseline if key.model_name == "baseline" else candidate
            target[key.name] = value.double_value.value
    return candidate, baseline


def validation_failures(evaluation_uri: str, baseline: dict[str, float]) -> list[str]:
    """Readable lines for each failed threshold: metric, value, threshold, baseline value."""
    import tensorflow_model_analysis as tfma

    result = tfma.load_validation_result(evaluation_uri)
    if result.validation_ok:
        return []
    lines = [
        describe_failure(failure, baseline)
        for per_slice in result.metric_validations_per_slice
        for failure in per_slice.failures
    ]
    return lines or ["evaluator: validation failed (no per-metric detail recorded)"]


def describe_failure(failure, baseline: dict[str, float]) -> str:
    """One failed TFMA threshold as a sentence a person can act on."""
    name = failure.metric_key.name
    value = failure.metric_value.double_value.value
    threshold = failure.metric_threshold
    if threshold.HasField("change_threshold"):
        allowed = threshold.change_threshold.absolute.value
        return (
            f"evaluator: {name} changed by {value:+.4f} vs the baseline "
            f"({baseline.get(name, float('nan')):.4f}); the change threshold allows >= {allowed:+.4f}"
        )
    bound = threshold.value_threshold.lower_bound.value
    return f"evaluator: {name} = {value:.4f} is below the value threshold {bound:.4f}"


def skipped_reason(decision: RunArtifact) -> str:
    """Why a run the gate closed trained nothing, and what would make the next one train."""
    reason = string_property(decision, REASON_KEY)
    if int_property(decision, INCOMPLETE_KEY) == 1:
        # An upload in progress: nothing to do but wait (forcing would not help: ingest refuses
        # an incomplete span).
        return (
            f"nothing new to train on yet: trained nothing ({reason}). If every run says this "
            "of the same span, its upload has stopped."
        )
    return (
        f"nothing new to train on: trained nothing ({reason}). Add data, change the training "
        "recipe, or set retrain_on_same_data (van-tfx run --force) to retrain anyway."
    )


def summarize(outputs: dict[str, list[RunArtifact]], span: int | None, run_id: str) -> RunOutcome:
    """Blessed?, pushed where?, and why not, from the output artifacts of one run."""
    outcome = RunOutcome(run_id=run_id, span=span)
    decision = gate_decision(outputs)
    if decision is not None and int_property(decision, NEW_DATA_KEY, 1) == 0:
        # Everything downstream of the gate was skipped by its run condition.
        outcome.trained = False
        outcome.reasons.append(skipped_reason(decision))
        return outcome
    evaluations = outputs.get("ModelEvaluation", [])
    if evaluations:
        outcome.metrics, outcome.baseline_metrics = overall_metrics(evaluations[0].uri)
        outcome.reasons.extend(validation_failures(evaluations[0].uri, outcome.baseline_metrics))
        if not outcome.baseline_metrics:
            dropped = string_property(evaluations[0], BASELINE_DROPPED_KEY)
            outcome.reasons.append(
                f"the change threshold was not applied: {dropped}"
                if dropped
                else "no model is served yet: the change threshold was not applied"
            )
    blessings = outputs.get("ModelBlessing", [])
    infra = outputs.get("InfraBlessing", [])
    outcome.blessed = bool(blessings) and int_property(blessings[0], "blessed") == 1
    if infra:
        outcome.model_server = string_property(infra[0], MODEL_SERVER_KEY)
    if infra and int_property(infra[0], "blessed") != 1:
        outcome.reasons.append(
            "serving smoke test failed: see INFRA_NOT_BLESSED in " + infra[0].uri
        )
    pushed = outputs.get("PushedModel", [])
    if pushed and int_property(pushed[0], "pushed") == 1:
        outcome.pushed = True
        outcome.pushed_version = string_property(pushed[0], "pushed_version")
        outcome.pushed_path = string_property(pushed[0], "pushed_destination")
    return outcome


def print_outcome(outcome: RunOutcome, stream=sys.stdout) -> None:
    """Print a run outcome for people, most important line first."""
    if not outcome.trained:
        print(outcome.reasons[0], file=stream)
        if outcome.report_path:
            print(f"Run report: {outcome.report_path}", file=stream)
        return
    if outcome.pushed:
        print(f"PUSHED version {outcome.pushed_version} to {outcome.pushed_path}", file=stream)
    else:
        print("NOT pushed.", file=stream)
    for reason in outcome.reasons:
        print(f"  - {reason}", file=stream)
    if outcome.model_server:
        print(f"  smoke-tested with {outcome.model_server}", file=stream)
    for name, value in sorted(outcome.metrics.items()):
        base = outcome.baseline_metrics.get(name)
        versus = f" (baseline {base:.4f})" if base is not None else ""
        print(f"  {name}: {value:.4f}{versus}", file=stream)
    if outcome.report_path:
        print(f"Run report: {outcome.report_path}", file=stream)
    if outcome.log_path:
        print(f"Full log:   {outcome.log_path}", file=stream)


def outcome_as_dict(outcome: RunOutcome) -> dict:
    """JSON-safe form of an outcome (for --json and tests)."""
    return asdict(outcome)
