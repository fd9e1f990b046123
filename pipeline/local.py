"""Run the pipeline on this machine: LocalDagRunner, Beam DirectRunner, SQLite ML Metadata."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import time
from pathlib import Path

from components.new_data_gate import INCOMPLETE_KEY
from pipeline.beam_workers import DIRECT_RUNNERS, with_worker_image
from pipeline.outcome import RunArtifact, RunOutcome, summarize
from van_tfx.config import Config

STATE_FILE = "last_run.json"
LOCK_FILE = ".van-tfx.lock"


class RunLockedError(RuntimeError):
    """Another van-tfx run holds this home's lock."""


# The DirectRunner's workers run in this process's environment (in_memory: this process;
# multi_processing: subprocesses of this Python), which has TFX and our code; no container is used.
LOCAL_WORKER_IMAGE = "this-python-environment"
LOCAL_WORKER_ENVIRONMENT = f"--sdk_container_image={LOCAL_WORKER_IMAGE}"


def beam_args_for_local_run(args: list[str]) -> list[str]:
    """The configured Beam args, plus the flag that spares the DirectRunner TFX's sdist."""
    return with_worker_image(args, LOCAL_WORKER_IMAGE, DIRECT_RUNNERS)


def local_location(config: Config):
    """Where a local run keeps data, artifacts, metadata and pushed models (all under the home)."""
    from pipeline.pipeline import PipelineLocation

    return PipelineLocation(
        data_root=str(config.data_dir),
        pipeline_root=str(config.pipeline_root),
        serving_base_path=str(config.serving_base_path),
        beam_args=beam_args_for_local_run(config.beam.args),
        metadata_path=str(config.metadata_path),
    )


@contextlib.contextmanager
def home_lock(home: Path):
    """Hold an exclusive lock on the home so two runs never share ML Metadata or serving dirs."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / LOCK_FILE
    handle = open(path, "a+")  # noqa: SIM115  (kept open for the lock's lifetime)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise RunLockedError(
            f"another van-tfx run is using {home} ({holder}); refusing to start a second one "
            "because two runs would interleave writes to ML Metadata and the serving directory. "
            "Wait for it to finish."
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} since {datetime.datetime.now().isoformat(timespec='seconds')}")
    handle.flush()
    try:
        yield
    finally:
        handle.seek(0)
        handle.truncate()
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def current_data(config: Config, location) -> dict:
    """Span, fingerprint and completeness of what ExampleGen would ingest now, as the gate sees it."""
    from tfx.utils import proto_utils

    from components.new_data_gate import data_to_ingest
    from pipeline import ingest

    # The gate's own function (TFX's calculation, plus the spelling and completeness checks),
    # so `van-tfx run` and the pipeline's gate agree on the span and on whether it is complete.
    input_config = proto_utils.proto_to_json(ingest.input_config(config.data))
    return data_to_ingest(location.data_root, input_config)


def previous_run(home: Path) -> dict | None:
    """The record of the last run that completed on this home, if any."""
    path = home / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def run_locally(config: Config, *, force: bool = False, echo=print) -> RunOutcome:
    """Run the whole pipeline once, unless the gate would skip the data the last run had."""
    home = config.home_dir
    location = local_location(config)
    config = with_force(config, force)
    with home_lock(home):
        current = current_data(config, location)
        fingerprint, span = current["input_fingerprint"], current["span"]
        last = previous_run(home)
        if current[INCOMPLETE_KEY]:
            # An upload in progress: no run, no record, so the next `van-tfx run` looks again.
            # --force does not help: ingestion refuses an incomplete span.
            outcome = RunOutcome(run_id=last["run_id"] if last else "", span=span, trained=False)
            outcome.reasons.append(
                f"nothing new to train on yet: {current[INCOMPLETE_KEY]}; nothing was trained "
                "or pushed. Run again once the upload is complete."
            )
            return outcome
        skip = None if force else same_data_as_last_run(config, current, last)
        if skip:
            outcome = RunOutcome(run_id=last["run_id"], span=span, trained=False)
            outcome.reasons.append(skip)
            return outcome
        run_id = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        log_path = home / "logs" / f"run-{run_id}.log"
        echo(f"van-tfx run {run_id}: span {span} from {location.data_root}")
        with stage_progress(log_path, echo):
            # The span found above, for the gate and both ExampleGens: each resolving the newest
            # itself, a span landing mid-run would have the Evaluator score a model trained on
            # it against the older span's eval split.
            run_pipeline(config, location, span)
        outcome = summarize_run(config, location, span, run_id)
        outcome.log_path = str(log_path)
        record = {"run_id": run_id, "fingerprint": fingerprint, "span": span}
        record.update(pushed_version=outcome.pushed_version, blessed=outcome.blessed)
        (home / STATE_FILE).write_text(json.dumps(record, indent=2))
        return outcome


def same_data_as_last_run(config: Config, current: dict, last: dict | None) -> str | None:
    """Why not to start the pipeline (the last run had this data); None when it would train."""
    # Only when the gate would skip it too: the gate, not the record, decides.
    from components.new_data_gate import RECIPE_KEY, decide, recipe_fingerprint
    from van_trainer.train import custom_config_for

    if not last or last.get("fingerprint") != current["input_fingerprint"]:
        return None
    # The gate's own verdict: after a smoke-test failure (nothing pushed), a rollback of the
    # served version or a hand push, the same data is worth a run, and the record alone said
    # "no new data" until --force.
    recipe = recipe_fingerprint(custom_config_for(config))
    train, why, _served = decide(
        {**current, RECIPE_KEY: recipe}, str(config.serving_base_path), force=False
    )
    if train:
        return None
    # The whole command, not "--force": `van-tfx demo` prints this too and has no such flag.
    return (
        f"no new data: {why} (last run {last['run_id']}); nothing was trained or pushed. Add "
        "data (e.g. `van-tfx data sample --new-span`) or retrain anyway with `van-tfx run "
        "--force`."
    )


def with_force(config: Config, force: bool) -> Config:
    """The config a run uses: --force gets past the check above and the pipeline's gate too."""
    if not force:
        return config
    return config.model_copy(update={"retrain_on_same_data": True})


def run_pipeline(config: Config, location, span: int | None = None) -> None:
    """Build the pipeline for this machine and run it with LocalDagRunner."""
    # Every ExampleGen is pinned to `span`, if given.
    from tfx.dsl.compiler import compiler
    from tfx.orchestration.local.local_dag_runner import LocalDagRunner

    from components.new_data_gate import GATE_ID
    from pipeline.pipeline import create_pipeline

    # LocalDagRunner.run(pipeline) is compile + run_with_ir; compiling here lets us switch the
    # cache off for the NewDataGate, which reads the serving dir (not one of its inputs).
    # (run() also resolves pip-dependency futures of module_file components; we have none.)
    ir = compiler.Compiler().compile(create_pipeline(config, location, span))
    never_cache(ir, GATE_ID)
    LocalDagRunner().run_with_ir(ir)


def never_cache(ir, node_id: str) -> None:
    """Switch caching off for one node of a compiled pipeline IR."""
    for node in ir.nodes:
        if node.pipeline_node.node_info.id == node_id:
            node.pipeline_node.execution_options.caching_options.enable_cache = False
            return
    raise ValueError(f"the compiled pipeline has no node {node_id!r}")


class _StageEcho(logging.Handler):
    """Turns LocalDagRunner's component log lines into one progress line per stage."""

    def __init__(self, echo):
        super().__init__(level=logging.INFO)
        self.echo = echo
        self.started: dict[str, float] = {}
        self.done = 0

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Component ") and message.endswith(" is running."):
            name = message[len("Component ") : -len(" is running.")]
            self.started[name] = time.monotonic()
            self.echo(f"  [{self.done + 1:2d}] {name} ...")
        elif message.startswith("Component ") and message.endswith(" is finished."):
            name = message[len("Component ") : -len(" is finished.")]
            self.done += 1
            seconds = time.monotonic() - self.started.get(name, time.monotonic())
            self.echo(f"  [{self.done:2d}] {name} done in {seconds:.0f}s")
        elif message.startswith("A cached execution"):
            self.echo("       (cached: inputs unchanged, reusing the previous result)")
        elif message.startswith("Skipping execution for "):
            self.echo("       (skipped: its run condition is false)")


@contextlib.contextmanager
def stage_progress(log_path: Path, echo):
    """Echo stage-by-stage progress; send TFX's full INFO log to `log_path`."""
    from absl import logging as absl_logging

    log_path.parent.mkdir(parents=True, exist_ok=True)
    logger = absl_logging.get_absl_logger()
    file_handler = logging.FileHandler(log_path)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    stage_handler = _StageEcho(echo)
    previous_level = logger.level
    absl_handler = absl_logging.get_absl_handler()
    root = logging.getLogger()
    root_had_absl = absl_handler in root.handlers
    if root_had_absl:
        root.removeHandler(absl_handler)  # keep the terminal to progress lines; details go to file
    logger.setLevel(logging.INFO)
    # Beam configures the root logger; without this every TFX INFO line would reach the terminal.
    previous_propagate, logger.propagate = logger.propagate, False
    # Transform lowers absl's verbosity mid-run, which would silence the stage lines; pin the
    # level for the run by shadowing setLevel on this one logger instance.
    logger.setLevel = lambda level: None
    logger.addHandler(file_handler)
    logger.addHandler(stage_handler)
    # Our own stages (Trainer's run_fn, custom components) log through stdlib loggers.
    own_loggers = [logging.getLogger(name) for name in ("van_trainer", "components", "serving")]
    for own in own_loggers:
        own.addHandler(file_handler)
        own.setLevel(logging.INFO)
    try:
        yield
    except Exception:
        echo(f"  run failed; full log: {log_path}")
        raise
    finally:
        logger.removeHandler(file_handler)
        logger.removeHandler(stage_handler)
        for own in own_loggers:
            own.removeHandler(file_handler)
        del logger.setLevel
        logger.setLevel(previous_level)
        logger.propagate = previous_propagate
        if root_had_absl:
            root.addHandler(absl_handler)
        file_handler.close()


def summarize_run(config: Config, location, span: int | None, run_id: str) -> RunOutcome:
    """Read the run's decisions back from ML Metadata and write its report."""
    from pipeline.report import write_report

    _run_name, outputs = latest_run_outputs(open_store(location.metadata_path))
    outcome = summarize(outputs, span, run_id)
    outcome.report_path = write_report(report_path(config, run_id), outputs, outcome)
    return outcome


def report_path(config: Config, run_id: str) -> Path:
    """Where the HTML report of a local run goes."""
    return Path(config.pipeline_root) / "reports" / run_id / "report.html"


def open_store(metadata_path: str):
    """Open the SQLite ML Metadata store of a local home."""
    from ml_metadata.metadata_store import metadata_store
    from tfx.orchestration import metadata

    return metadata_store.MetadataStore(metadata.sqlite_metadata_connection_config(metadata_path))


def latest_run_outputs(store) -> tuple[str, dict[str, list[RunArtifact]]]:
    """Name of the newest pipeline run and its output artifacts, keyed by artifact type name."""
    from ml_metadata.proto import metadata_store_pb2

    output_events = (metadata_store_pb2.Event.OUTPUT, metadata_store_pb2.Event.DECLARED_OUTPUT)
    runs = store.get_contexts_by_type("pipeline_run")
    if not runs:
        return "", {}
    run = max(runs, key=lambda c: (c.create_time_since_epoch, c.id))
    execution_ids = [e.id for e in store.get_executions_by_context(run.id)]
    events = store.get_events_by_execution_ids(execution_ids)
    artifact_ids = sorted({e.artifact_id for e in events if e.type in output_events})
    types = {t.id: t.name for t in store.get_artifact_types()}
    outputs: dict[str, list[RunArtifact]] = {}
    for artifact in store.get_artifacts_by_id(artifact_ids):
        record = RunArtifact(types[artifact.type_id], artifact.uri, mlmd_properties(artifact))
        outputs.setdefault(record.type_name, []).append(record)
    return run.name, outputs


def mlmd_properties(artifact) -> dict:
    """An MLMD artifact's properties and custom properties as plain values (custom ones win)."""
    values = {}
    for mapping in (artifact.properties, artifact.custom_properties):
        for name, value in mapping.items():
            kind = value.WhichOneof("value")
            if kind in ("int_value", "double_value", "string_value", "bool_value"):
                values[name] = getattr(value, kind)
    return values
