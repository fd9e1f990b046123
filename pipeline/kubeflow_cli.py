"""`van-tfx compile`, `van-tfx submit` and `van-tfx schedule`: the pipeline on Kubeflow Pipelines."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from pipeline.cli import add_config_arguments, resolve_config
from pipeline.kfp_spec import KubeflowError, load_pipeline_spec, resolver_tasks
from van_tfx.config import ConfigError
from van_tfx.data.cli import int_in

HOST_ENV = "KFP_HOST"


def _positive_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds > 0."""
    # 0 made the connection non-blocking ("cannot reach ...: Operation now in progress").
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text}")
    return seconds


DEFAULT_PACKAGE = "pipeline.yaml"


def add_parser(subparsers) -> None:
    """Register the compile, kfp-local, submit and schedule subcommands."""
    _add_compile(subparsers)
    _add_kfp_local(subparsers)
    _add_submit(subparsers)
    _add_schedule(subparsers)


def _add_kfp_local(subparsers) -> None:
    parser = subparsers.add_parser(
        "kfp-local",
        help="run a compiled PipelineSpec on this machine under open-source KFP's rules",
    )
    parser.add_argument("pipeline", help="the compiled .yaml (van-tfx compile)")
    parser.add_argument(
        "--param",
        dest="params",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a pipeline parameter, typed as the spec declares it (text as typed for a STRING, "
        "JSON for a LIST or STRUCT), repeatable",
    )
    parser.add_argument(
        "--pipeline-root", help="local directory for artifacts (default: the spec's, if local)"
    )
    parser.add_argument(
        "--no-publish-logs",
        dest="publish_logs",
        action="store_false",
        help="as a backend with PUBLISH_LOGS=false: no executor-logs output",
    )
    parser.add_argument(
        "--parallelism",
        type=int_in(1),  # 0 and negatives ran as the CPU count and as 1, unannounced
        help="tasks run at once, as Argo runs independent ones (default: the CPU count)",
    )
    parser.add_argument("--json", action="store_true", help="print the outcome as JSON")
    parser.set_defaults(func=kfp_local_command)


def _add_compile(subparsers) -> None:
    parser = subparsers.add_parser(
        "compile", help="compile the pipeline to a KFP v2 PipelineSpec YAML (KubeflowV2DagRunner)"
    )
    add_config_arguments(parser)
    parser.add_argument("--output", default=DEFAULT_PACKAGE, help="where to write the .yaml")
    _add_compile_options(parser)
    parser.set_defaults(func=compile_command)


def _add_compile_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", help="container image of every step (default: kubeflow.image)")
    parser.add_argument(
        "--gpus", type=int, help="accelerators for the Trainer (default: kubeflow.gpus)"
    )
    parser.add_argument(
        "--vertex-training",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train in a Vertex AI multi-worker CustomJob (default: kubeflow.vertex_training)",
    )


def _add_connection_arguments(parser: argparse.ArgumentParser, default=None) -> None:
    # Sub-actions use SUPPRESS so an option given before `list`/`disable` is not reset by them.
    parser.add_argument(
        "--host",
        default=default,
        help=f"KFP API endpoint, e.g. http://localhost:8080 (env {HOST_ENV})",
    )
    parser.add_argument(
        "--namespace", default=default, help="Kubernetes namespace (multi-user KFP)"
    )
    parser.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=default if default is not None else 30.0,
        help="seconds to wait for the KFP host (default 30)",
    )


def _add_request_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--pipeline",
        help=f"compiled package to send (default: compile to $VAN_TFX_HOME/kubeflow/{DEFAULT_PACKAGE})",
    )
    _add_compile_options(parser)
    _add_connection_arguments(parser)
    parser.add_argument("--experiment", help="KFP experiment (default: kubeflow.experiment)")
    parser.add_argument(
        "--no-cache", action="store_true", help="disable KFP step caching for this run/schedule"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the request as JSON and contact nothing"
    )


def _add_submit(subparsers) -> None:
    parser = subparsers.add_parser("submit", help="start one run on Kubeflow Pipelines")
    _add_request_arguments(parser)
    parser.add_argument("--run-name", help="display name of the run (default: kfp's)")
    parser.set_defaults(func=submit_command)


def _add_schedule(subparsers) -> None:
    parser = subparsers.add_parser(
        "schedule", help="create a recurring KFP run (retraining); `schedule list|disable`"
    )
    _add_request_arguments(parser)
    trigger = parser.add_mutually_exclusive_group()
    trigger.add_argument(
        "--cron", help="KFP 6-field cron, seconds first: '0 0 3 * * *' = every day at 03:00"
    )
    trigger.add_argument("--interval", type=int, help="run every N seconds instead of --cron")
    parser.add_argument("--job-name", help="recurring run name (default: <pipeline>-retrain)")
    parser.set_defaults(func=schedule_command)

    actions = parser.add_subparsers(dest="action", metavar="{list,disable}")
    listing = actions.add_parser("list", help="list recurring runs")
    _add_connection_arguments(listing, default=argparse.SUPPRESS)
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=schedule_list_command)
    disable = actions.add_parser("disable", help="disable a recurring run")
    disable.add_argument("job_id", help="recurring run id (see `van-tfx schedule list`)")
    _add_connection_arguments(disable, default=argparse.SUPPRESS)
    disable.set_defaults(func=schedule_disable_command)


def compile_command(args) -> int:
    """Compile the pipeline to a PipelineSpec YAML."""
    from pipeline import kubeflow

    try:
        config = resolve_config(args, keep=False)
        spec = kubeflow.compile_pipeline(
            config,
            args.output,
            image=args.image,
            gpus=args.gpus,
            vertex_training=args.vertex_training,
        )
    except (ConfigError, KubeflowError) as exc:
        return _fail("compile", exc)
    tasks = sorted(spec["root"]["dag"]["tasks"])
    print(f"Wrote {args.output}: {len(tasks)} tasks ({', '.join(tasks)})")
    left = example_values(config, args.vertex_training)
    if left:
        print(
            f"warning: {args.output} holds placeholders no cluster can use (YOUR_BUCKET, "
            f"YOUR_PROJECT), from {', '.join(left)}: set them in your --config, as "
            "configs/kubeflow.example.yaml shows",
            file=sys.stderr,
        )
    return 0


# The defaults in KubeflowConfig that stand for the user's own bucket and project.
PLACEHOLDERS = ("YOUR_BUCKET", "YOUR_PROJECT")


def example_values(config, vertex_training: bool | None = None) -> list[str]:
    """The kubeflow settings still holding a YOUR_BUCKET / YOUR_PROJECT placeholder."""
    # A spec compiled from them is written without a word and fails only in the cluster's pods.
    kubeflow = config.kubeflow
    settings = {
        "data_root": kubeflow.data_root,
        "pipeline_root": kubeflow.pipeline_root,
        "serving_base_path": kubeflow.serving_base_path,
        "beam_args": " ".join(kubeflow.beam_args),
    }
    if kubeflow.vertex_training if vertex_training is None else vertex_training:
        settings["vertex_project"] = kubeflow.vertex_project
    return [
        f"kubeflow.{key}"
        for key, value in settings.items()
        if any(placeholder in value for placeholder in PLACEHOLDERS)
    ]


def kfp_local_command(args) -> int:
    """Replay a compiled spec locally; print the outcome like `van-tfx run`."""
    import contextlib

    from pipeline import kfp_local
    from pipeline.outcome import outcome_as_dict, print_outcome

    try:
        params = {}
        for item in args.params:
            name, sep, raw = item.partition("=")
            if not sep or not name:
                raise KubeflowError(f"--param {item!r} must look like NAME=VALUE")
            params[name] = raw  # typed as the spec declares the parameter (state.py)
        # Tasks write to their own log files; stdout stays for the outcome (e.g. --json).
        with contextlib.redirect_stdout(sys.stderr):
            summary = kfp_local.run_pipeline_spec(
                args.pipeline,
                pipeline_root=args.pipeline_root,
                params=params,
                publish_logs=args.publish_logs,
                parallelism=args.parallelism,
                echo=lambda line: print(line, file=sys.stderr, flush=True),
            )
    except KubeflowError as exc:
        return _fail("kfp-local", exc)
    if summary.error:
        print(f"van-tfx kfp-local: {summary.error}", file=sys.stderr)
    if args.json:
        print(json.dumps({**outcome_as_dict(summary.outcome), "error": summary.error}, indent=2))
    else:
        print_outcome(summary.outcome)
    return 1 if summary.failed_task else 0


def submit_command(args) -> int:
    """Create one run (or print the request with --dry-run)."""
    from pipeline import kfp_client

    try:
        config, package = _config_and_package(args)
        calls = kfp_client.submit_request(
            config,
            package,
            run_name=args.run_name,
            experiment=args.experiment,
            namespace=args.namespace,
            enable_caching=False if args.no_cache else None,
        )
        return _dispatch("submit", args, calls, _print_run)
    except (ConfigError, KubeflowError) as exc:
        return _fail("submit", exc)


def schedule_command(args) -> int:
    """Create a recurring run (or print the requests with --dry-run)."""
    from pipeline import kfp_client

    if args.cron is None and args.interval is None:
        return _fail(
            "schedule", "give --cron '0 0 3 * * *' or --interval SECONDS (or: list, disable)"
        )
    try:
        config, package = _config_and_package(args)
        calls = kfp_client.schedule_request(
            config,
            package,
            cron=args.cron,
            interval_seconds=args.interval,
            job_name=args.job_name,
            experiment=args.experiment,
            namespace=args.namespace,
            enable_caching=False if args.no_cache else None,
        )
        return _dispatch("schedule", args, calls, _print_schedule)
    except (ConfigError, KubeflowError) as exc:
        return _fail("schedule", exc)


def schedule_list_command(args) -> int:
    """Print the recurring runs on the host."""
    from pipeline import kfp_client

    try:
        schedules = kfp_client.list_schedules(
            _host(args), namespace=args.namespace, timeout=args.timeout
        )
    except KubeflowError as exc:
        return _fail("schedule list", exc)
    if args.json:
        print(json.dumps(schedules, indent=2))
        return 0
    for item in schedules:
        trigger = item["cron"] or f"every {item['interval_second']}s"
        print(f"{item['id']}  {item['status']:<8}  {trigger:<16}  {item['name']}")
    if not schedules:
        print("no recurring runs")
    return 0


def schedule_disable_command(args) -> int:
    """Disable one recurring run."""
    from pipeline import kfp_client

    try:
        kfp_client.disable_schedule(
            _host(args), args.job_id, namespace=args.namespace, timeout=args.timeout
        )
    except KubeflowError as exc:
        return _fail("schedule disable", exc)
    print(f"disabled recurring run {args.job_id}")
    return 0


def _config_and_package(args):
    """The config, and the package to send: --pipeline as given, else a fresh compile."""
    from pipeline import kubeflow

    config = resolve_config(args, keep=False)
    if args.pipeline:
        package = Path(args.pipeline)
        spec = load_pipeline_spec(package)  # refuse to send a file KFP would reject
        # The run's pipeline root overrides the package's; taken from the config, a package
        # compiled elsewhere ran under another root (with no --config: gs://YOUR_BUCKET/...).
        root = spec.default_pipeline_root
        if root and root != config.kubeflow.pipeline_root:
            kubeflow_section = config.kubeflow.model_copy(update={"pipeline_root": root})
            config = config.model_copy(update={"kubeflow": kubeflow_section})
        _warn_about_placeholders(package)
        return config, package
    package = config.home_dir / "kubeflow" / DEFAULT_PACKAGE
    kubeflow.compile_pipeline(
        config,
        package,
        image=args.image,
        gpus=args.gpus,
        vertex_training=args.vertex_training,
    )
    _warn_about_placeholders(package)
    return config, package


def _warn_about_placeholders(package: Path) -> None:
    # What is sent, whoever compiled it: a run from it would fail in the cluster's pods.
    text = package.read_text(encoding="utf-8", errors="replace")
    found = [placeholder for placeholder in PLACEHOLDERS if placeholder in text]
    if found:
        print(
            f"warning: {package} holds placeholders no cluster can use ({', '.join(found)}): "
            "set kubeflow.* in your --config, as configs/kubeflow.example.yaml shows",
            file=sys.stderr,
        )


def _dispatch(command: str, args, calls, print_result) -> int:
    from pipeline import kfp_client

    _warn_about_open_source_refusals(calls)
    host = args.host or os.environ.get(HOST_ENV)
    if args.dry_run:
        print(kfp_client.describe_request(host, calls))
        return 0
    if not host:
        return _fail(command, f"no KFP host: pass --host URL or set {HOST_ENV}")
    results = kfp_client.send(host, calls, namespace=args.namespace, timeout=args.timeout)
    print_result(results[-1])
    return 0


def _warn_about_open_source_refusals(calls) -> None:
    """Warn about what open-source KFP refuses in the package sent: resolvers, a 2.0.0 spec."""
    # Warnings, not errors: Vertex AI Pipelines runs both (TFX's KubeflowV2DagRunner output).
    from pipeline.kfp_backend import BackendRefusal
    from pipeline.kfp_backend.compiler import check_template

    package = calls[-1]["kwargs"].get("pipeline_file") or calls[-1]["kwargs"].get(
        "pipeline_package_path"
    )
    spec = load_pipeline_spec(package)
    resolvers = resolver_tasks(spec)
    if resolvers:
        print(
            f"warning: {package} has TFX resolver executors ({', '.join(resolvers)}); "
            "open-source KFP refuses to compile such a run ('non-container and non-importer "
            "executor not implemented'), only Vertex AI Pipelines runs them. A package from "
            "`van-tfx compile` has none. See docs/kubeflow.md.",
            file=sys.stderr,
        )
    try:
        check_template(spec)
    except BackendRefusal as exc:
        print(
            f"warning: open-source KFP's API server refuses {package} when the run is created "
            f"({exc}); only Vertex AI Pipelines runs it. A package from `van-tfx compile` "
            "passes. See docs/kubeflow.md.",
            file=sys.stderr,
        )


def _print_run(result) -> None:
    print(f"created run {result.run_id}")


def _print_schedule(result) -> None:
    print(f"created recurring run {result.recurring_run_id} ({result.display_name})")


def _host(args) -> str:
    host = args.host or os.environ.get(HOST_ENV)
    if not host:
        raise KubeflowError(f"no KFP host: pass --host URL or set {HOST_ENV}")
    return host


def _fail(command: str, error) -> int:
    print(f"van-tfx {command}: {error}", file=sys.stderr)
    return 2
