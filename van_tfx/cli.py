"""`van-tfx` console script: one entry point whose subcommands live beside the code they drive."""

from __future__ import annotations

import argparse
import importlib
import sys

import van_tfx  # noqa: F401  (TF_USE_LEGACY_KERAS=1 before any subcommand imports TensorFlow)

# Each entry names a module exposing `add_parser(subparsers)`, which registers the subcommand and
# sets `func(args) -> int`. Those modules import TensorFlow lazily so `van-tfx --help` stays fast.
COMMAND_MODULES = (
    "van_trainer.cli",
    "van_tfx.data.cli",
    "pipeline.cli",
    "pipeline.kubeflow_cli",
    "serving.cli",
)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="van-tfx", description="Train VAN with TFX and serve it through TensorFlow Serving."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real import error inside an existing module must surface
                raise
            continue
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the van-tfx command line."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
