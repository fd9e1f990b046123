"""What the last pipeline run decided, read back from ML Metadata and the Evaluator's output."""

from __future__ import annotations

from ml_metadata.metadata_store import metadata_store
from ml_metadata.proto import metadata_store_pb2
from tfx.orchestration import metadata

from components.new_data_gate import DECISION_TYPE_NAME, NEW_DATA_KEY, REASON_KEY

_OUTPUT_EVENTS = (metadata_store_pb2.Event.OUTPUT, metadata_store_pb2.Event.DECLARED_OUTPUT)


def open_store(metadata_path: str) -> metadata_store.MetadataStore:
    """Open the SQLite ML Metadata store of a local home."""
    return metadata_store.MetadataStore(metadata.sqlite_metadata_connection_config(metadata_path))


def latest_run_outputs(store: metadata_store.MetadataStore) -> tuple[str, dict[str, list]]:
    """Name of the newest pipeline run and its output artifacts, keyed by artifact type name."""
    runs = store.get_contexts_by_type("pipeline_run")
    if not runs:
        return "", {}
    run = max(runs, key=lambda c: (c.create_time_since_epoch, c.id))
    execution_ids = [e.id for e in store.get_executions_by_context(run.id)]
    events = store.get_events_by_execution_ids(execution_ids)
    artifact_ids = sorted({e.artifact_id for e in events if e.type in _OUTPUT_EVENTS})
    types = {t.id: t.name for t in store.get_artifact_types()}
    outputs: dict[str, list] = {}
    for artifact in store.get_artifacts_by_id(artifact_ids):
        outputs.setdefault(types[artifact.type_id], []).append(artifact)
    return run.name, outputs


def int_property(artifact, name: str, default: int = 0) -> int:
    """An integer custom property of an MLMD artifact."""
    value = artifact.custom_properties.get(name)
    return value.int_value if value is not None else default


def string_property(artifact, name: str) -> str | None:
    """A string custom property of an MLMD artifact."""
    value = artifact.custom_properties.get(name)
    return value.string_value if value is not None else None


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


def gate_decision(outputs: dict[str, list]):
    """The NewDataGate's decision artifact among a run's outputs (None if the gate did not run)."""
    for artifact in outputs.get(DECISION_TYPE_NAME, []):
        if NEW_DATA_KEY in artifact.custom_properties:
            return artifact
    return None


def latest_run_outcome(config, location, span, run_id: str):
    """Summarize the newest run: blessed?, pushed where?, and why not when it was not."""
    from pipeline.local import RunOutcome
    from pipeline.report import write_report

    store = open_store(location.metadata_path)
    _run_name, outputs = latest_run_outputs(store)
    outcome = RunOutcome(run_id=run_id, span=span)
    decision = gate_decision(outputs)
    if decision is not None and int_property(decision, NEW_DATA_KEY, 1) == 0:
        # Trainer, Evaluator, smoke test and Pusher were skipped by their condition.
        outcome.trained = False
        outcome.reasons.append(
            "no new data since the served model: trained nothing "
            f"({string_property(decision, REASON_KEY)}). Add data, or pass --force "
            "(retrain_on_same_data) to retrain anyway."
        )
        outcome.report_path = write_report(config, outputs, outcome)
        return outcome
    evaluations = outputs.get("ModelEvaluation", [])
    if evaluations:
        outcome.metrics, outcome.baseline_metrics = overall_metrics(evaluations[0].uri)
        outcome.reasons.extend(validation_failures(evaluations[0].uri, outcome.baseline_metrics))
        if not outcome.baseline_metrics:
            outcome.reasons.append("no blessed baseline yet: the change threshold was not applied")
    blessings = outputs.get("ModelBlessing", [])
    infra = outputs.get("InfraBlessing", [])
    outcome.blessed = bool(blessings) and int_property(blessings[0], "blessed") == 1
    if infra and int_property(infra[0], "blessed") != 1:
        outcome.reasons.append(
            "serving smoke test failed: see INFRA_NOT_BLESSED in " + infra[0].uri
        )
    pushed = outputs.get("PushedModel", [])
    if pushed and int_property(pushed[0], "pushed") == 1:
        outcome.pushed = True
        outcome.pushed_version = string_property(pushed[0], "pushed_version")
        outcome.pushed_path = string_property(pushed[0], "pushed_destination")
    outcome.report_path = write_report(config, outputs, outcome)
    return outcome
