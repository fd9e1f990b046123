"""`van-tfx run` and `van-tfx demo`: drive the pipeline on this machine."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from van_tfx.config import DEMO_OVERRIDES, Config, ConfigError, load_config, save_config
from van_tfx.data.cli import int_in
from van_tfx.env import van_tfx_home

HOME_CONFIG = "config.yaml"


def add_parser(subparsers) -> None:
    """Register the run and demo subcommands."""
    run = subparsers.add_parser("run", help="run the TFX pipeline locally (LocalDagRunner + Beam)")
    add_config_arguments(run)
    run.add_argument("--force", action="store_true", help="retrain even if the data is unchanged")
    run.add_argument("--json", action="store_true", help="print the outcome as JSON")
    run.set_defaults(func=run_command)

    demo = subparsers.add_parser(
        "demo", help="build the sample, run the pipeline, serve the model, predict over gRPC"
    )
    add_config_arguments(demo)
    demo.add_argument(
        "--num-predictions",
        type=int_in(0),
        default=8,
        help="validation images printed with their prediction and truth (default 8; top-1 is "
        "over all of them)",
    )
    demo.set_defaults(func=demo_command)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config FILE and repeated --set key=value overrides."""
    parser.add_argument(
        "--config",
        help=f"YAML config (default: $VAN_TFX_HOME/{HOME_CONFIG}, else built-in defaults)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set train.epochs=30 (repeatable)",
    )


def resolve_config(args, profile: list[str] = (), keep: bool = True) -> Config:
    """Load the config a command runs with; a new home that a run (`keep`) uses keeps a copy."""
    # `profile` (e.g. the demo's settings) applies only when neither --config nor a home config
    # exists, so a home made by `make demo` keeps repeating the demo's pipeline. Commands that only
    # compile or send the pipeline elsewhere don't keep one: a Kubeflow config saved there would
    # have become what the next local `run` or `demo` used.
    from pathlib import Path

    home_config = Path(van_tfx_home()) / HOME_CONFIG
    source = args.config or (home_config if home_config.exists() else None)
    overrides = args.overrides if source else [*profile, *args.overrides]
    config = load_config(source, overrides)
    if keep and not home_config.exists():
        save_config(config, home_config)
    return config


def run_command(args) -> int:
    """Run the pipeline once and report what happened."""
    from pipeline.local import RunLockedError, run_locally
    from pipeline.outcome import outcome_as_dict, print_outcome

    try:
        config = resolve_config(args)
        # Keras and Beam print progress to stdout; keep stdout for the outcome (e.g. --json).
        with contextlib.redirect_stdout(sys.stderr):
            outcome = run_locally(config, force=args.force, echo=_stderr)
    except (ConfigError, RunLockedError) as exc:
        print(f"van-tfx run: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a component failed: say which error, not a 200-line traceback
        print(f"van-tfx run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(outcome_as_dict(outcome), indent=2))
    else:
        print_outcome(outcome)
    return 0


def demo_command(args) -> int:
    """The whole product on bundled data: sample → pipeline → server → gRPC predictions."""
    from pipeline.demo import run_demo
    from pipeline.local import RunLockedError

    try:
        config = resolve_config(args, DEMO_OVERRIDES)
        return run_demo(config, num_predictions=args.num_predictions, echo=_stderr)
    except (ConfigError, RunLockedError) as exc:
        print(f"van-tfx demo: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a full or read-only home, a failed step: one line, as `run`
        print(f"van-tfx demo failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
