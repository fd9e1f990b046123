"""Model subcommands of `van-tfx` (TensorFlow is imported lazily inside the handlers)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    """Register the van_trainer subcommands on the `van-tfx` parser."""
    _add_convert_weights(subparsers)


def _add_convert_weights(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert-weights",
        help="convert an official VAN-Classification checkpoint to tf_keras weights",
        description="Convert an official VAN .pth/.pth.tar (or .npz) checkpoint into a "
        ".weights.h5 that build_van(variant).load_weights() accepts. Needs no torch and "
        "never executes code from the checkpoint.",
    )
    parser.add_argument(
        "--variant", required=True, choices=["b0", "b1", "b2", "b3", "b4", "b5", "b6", "tiny"]
    )
    parser.add_argument("--checkpoint", required=True, help="official .pth/.pth.tar or .npz file")
    parser.add_argument("--output", required=True, help="destination .weights.h5 file")
    parser.add_argument(
        "--num-classes", type=int, default=None, help="default: taken from head.weight"
    )
    parser.set_defaults(func=_convert_weights)


def _convert_weights(args: argparse.Namespace) -> int:
    import pickle
    import sys

    from van_trainer.convert import convert_checkpoint

    try:
        output = convert_checkpoint(args.variant, args.checkpoint, args.output, args.num_classes)
    except (OSError, ValueError, pickle.UnpicklingError) as exc:  # bad user input, not a bug
        # Most messages name the file already ("checkpoint not found: F"); say it once.
        message = str(exc)
        if str(args.checkpoint) not in message:
            message = f"{args.checkpoint}: {message}"
        print(f"van-tfx convert-weights: {message}", file=sys.stderr)
        return 2
    print(f"wrote VAN-{args.variant} weights to {output}")
    return 0
