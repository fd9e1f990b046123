"""Depthwise convolution (+ bias, + optional exact GELU) as C++ TensorFlow ops, for CPU training.

TF 2.16's oneDNN depthwise kernels spend several times a forward pass on the filter gradient
(VAN-b0's 7x7 dilated conv on 7x7 maps: 16 ms backward for a 2.4 ms forward) and run dilated
convs through SpaceToBatch/BatchToSpace; no library offers better ones for TF 2.16 on CPU (Intel's
ITEX ends at TF 2.15). These kernels compute forward, input and filter gradients directly in
NHWC, fuse the bias, and optionally the MLP's GELU (docs/model.md#performance).

Only the training graph uses them: `fold_for_inference` builds the exported model from stock ops,
so TF Serving needs nothing extra. `depthwise_conv2d` is differentiable; `load()` returns None
(and `unavailable_reason()` says why) where the library can't be built or loaded, and callers
fall back to stock ops.
"""

from __future__ import annotations

import logging
import threading

import tensorflow as tf

ACTIVATIONS = ("none", "gelu")

_lock = threading.Lock()
_state: dict = {}


def load():
    """The loaded op library, building it first if needed; None if that is impossible here."""
    with _lock:
        if "module" not in _state:
            _state["module"], _state["reason"] = _load()
        return _state["module"]


def unavailable_reason() -> str | None:
    """Why `load()` returned None, or None if the kernels are available."""
    load()
    return _state["reason"]


def _load():
    # Imported here: `python -m van_trainer.kernels.build` runs this package's __init__ first.
    from van_trainer.kernels import build

    try:
        path = build.find_library()
        if path is None:
            logging.info("building the van-tfx CPU kernels (once per TF version and compiler)")
            path = build.build_library()
        return tf.load_op_library(str(path)), None
    except (build.BuildError, OSError, tf.errors.NotFoundError) as exc:
        logging.warning("van-tfx CPU kernels unavailable, using stock TF ops: %s", exc)
        return None, str(exc)


def isa() -> str | None:
    """The instruction set the kernels run with here (avx512, avx2, avx), None if unavailable."""
    module = load()
    return None if module is None else module.van_kernels_isa().numpy().decode()


def depthwise_conv2d(inputs, kernel, bias, dilation: int = 1, activation: str = "none"):
    """act(depthwise conv(inputs, kernel[kh, kw, C, 1], SAME, stride 1, dilation) + bias)."""
    module = load()
    if module is None:
        raise RuntimeError(f"van-tfx CPU kernels are unavailable: {unavailable_reason()}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return module.van_depthwise_conv2d(
        inputs, kernel, bias, dilation=int(dilation), activation=activation
    )


@tf.RegisterGradient("VanDepthwiseConv2d")
def _depthwise_conv2d_grad(op, output_grad):
    inputs, kernel, bias = op.inputs
    return load().van_depthwise_conv2d_grad(
        inputs,
        kernel,
        bias,
        output_grad,
        dilation=op.get_attr("dilation"),
        activation=op.get_attr("activation").decode(),
    )
