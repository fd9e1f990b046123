"""Run the pipeline on this machine: LocalDagRunner, Beam DirectRunner, SQLite ML Metadata."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from van_tfx.config import Config

STATE_FILE = "last_run.json"
LOCK_FILE = ".van-tfx.lock"


class RunLockedError(RuntimeError):
    """Another van-tfx run holds this home's lock."""


@dataclass
class RunOutcome:
    """What one `van-tfx run` did, in terms a person deciding about a model needs."""

    run_id: str
    span: int | None
    trained: bool = True
    blessed: bool = False
    pushed: bool = False
    pushed_version: str | None = None
    pushed_path: str | None = None
    reasons: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    baseline_metrics: dict[str, float] = field(default_factory=dict)
    report_path: str | None = None
    log_path: str | None = None


def local_location(config: Config):
    """Where a local run keeps data, artifacts, metadata and pushed models (all under the home)."""
    from pipeline.pipeline import PipelineLocation

    return PipelineLocation(
        data_root=str(config.data_dir),
        pipeline_root=str(config.pipeline_root),
        serving_base_path=str(config.serving_base_path),
        beam_args=list(config.beam.args),
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


def current_data_fingerprint(config: Config, location) -> tuple[str, int]:
    """Fingerprint and span of the input ExampleGen would ingest now (TFX's own calculation)."""
    from tfx.components.example_gen import utils as example_gen_utils

    from pipeline import ingest

    splits = ingest.input_config(config.data).splits
    fingerprint, span, _version = example_gen_utils.calculate_splits_fingerprint_span_and_version(
        location.data_root, splits
    )
    return fingerprint, span


def previous_run(home: Path) -> dict | None:
    """The record of the last run that completed on this home, if any."""
    path = home / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def run_locally(config: Config, *, force: bool = False, echo=print) -> RunOutcome:
    """Run the whole pipeline once, unless the data has not changed since the last completed run."""
    home = config.home_dir
    location = local_location(config)
    config = with_force(config, force)
    with home_lock(home):
        fingerprint, span = current_data_fingerprint(config, location)
        last = previous_run(home)
        if not force and last and last.get("fingerprint") == fingerprint:
            outcome = RunOutcome(run_id=last["run_id"], span=span, trained=False)
            outcome.reasons.append(
                f"no new data: span {span} is unchanged since run {last['run_id']} "
                f"(pushed version {last.get('pushed_version') or 'none'}); "
                "nothing was trained or pushed. Add data (e.g. `van-tfx data sample --new-span`) "
                "or pass --force to retrain anyway."
            )
            return outcome
        run_id = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        log_path = home / "logs" / f"run-{run_id}.log"
        echo(f"van-tfx run {run_id}: span {span} from {location.data_root}")
        with stage_progress(log_path, echo):
            run_pipeline(config, location)
        outcome = summarize_run(config, location, span, run_id)
        outcome.log_path = str(log_path)
        record = {"run_id": run_id, "fingerprint": fingerprint, "span": span}
        record.update(pushed_version=outcome.pushed_version, blessed=outcome.blessed)
        (home / STATE_FILE).write_text(json.dumps(record, indent=2))
        return outcome


def with_force(config: Config, force: bool) -> Config:
    """The config a run uses: --force gets past the check above and the pipeline's gate too."""
    if not force:
        return config
    return config.model_copy(update={"retrain_on_same_data": True})


def run_pipeline(config: Config, location) -> None:
    """Build the pipeline for this machine and run it with LocalDagRunner."""
    from tfx.dsl.compiler import compiler
    from tfx.orchestration.local.local_dag_runner import LocalDagRunner

    from components.new_data_gate import GATE_ID
    from pipeline.pipeline import create_pipeline

    # LocalDagRunner.run(pipeline) is compile + run_with_ir; compiling here lets us switch the
    # cache off for the NewDataGate, which reads the serving dir (not one of its inputs).
    # (run() also resolves pip-dependency futures of module_file components; we have none.)
    ir = compiler.Compiler().compile(create_pipeline(config, location))
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
    """Read the run's blessing, validation and push results back from ML Metadata."""
    from pipeline import outcome as outcome_lib

    return outcome_lib.latest_run_outcome(config, location, span, run_id)


def print_outcome(outcome: RunOutcome, stream=sys.stdout) -> None:
    """Print a run outcome for people, most important line first."""
    if not outcome.trained:
        print(outcome.reasons[0], file=stream)
        return
    if outcome.pushed:
        print(f"PUSHED version {outcome.pushed_version} to {outcome.pushed_path}", file=stream)
    else:
        print("NOT pushed.", file=stream)
    for reason in outcome.reasons:
        print(f"  - {reason}", file=stream)
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
