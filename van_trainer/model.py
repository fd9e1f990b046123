"""Visual Attention Network (VAN, Guo et al. 2022) in tf_keras, faithful to VAN-Classification.

timm-style layout: a config table (`VARIANTS`), small layers (`LayerScale`, `DropPath`), block
builders (`_attention`, `_mlp`, `_block`, `_patch_embed`) and one public builder `build_van`.

Every layer carries the official PyTorch state-dict name (``patch_embed1.proj``,
``block1.0.attn.spatial_gating_unit.conv0``, ``norm4``, ``head``...), so the converter maps
``<layer name>.<weight>`` keys straight onto ``model.get_layer(<layer name>)``.
Images are NHWC float32, already normalised; logits are float32 under every precision policy.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow as tf
import tf_keras as keras

from van_trainer.tracing import keep_autograph_out_of_tf_keras

keep_autograph_out_of_tf_keras()  # idempotent; every path that builds VAN traces it

BN_EPSILON = 1e-5  # PyTorch BatchNorm2d default
BN_MOMENTUM = 0.9  # PyTorch momentum 0.1 in Keras terms
LN_EPSILON = 1e-6
LAYER_SCALE_INIT = 1e-2


@dataclasses.dataclass(frozen=True)
class VanConfig:
    """Widths, depths and MLP expansion of the four stages of one VAN variant."""

    embed_dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    mlp_ratios: tuple[int, int, int, int] = (8, 8, 4, 4)


VARIANTS: dict[str, VanConfig] = {
    "b0": VanConfig((32, 64, 160, 256), (3, 3, 5, 2)),
    "b1": VanConfig((64, 128, 320, 512), (2, 2, 4, 2)),
    "b2": VanConfig((64, 128, 320, 512), (3, 3, 12, 3)),
    "b3": VanConfig((64, 128, 320, 512), (3, 5, 27, 3)),
    "b4": VanConfig((64, 128, 320, 512), (3, 6, 40, 3)),
    "b5": VanConfig((96, 192, 480, 768), (3, 3, 24, 3)),
    "b6": VanConfig((96, 192, 384, 768), (6, 6, 90, 6)),
    # Not in the paper: a few-thousand-parameter VAN for tests and the 32 px CPU demo.
    "tiny": VanConfig((16, 32, 64, 128), (1, 1, 1, 1)),
}


@dataclasses.dataclass(frozen=True)
class Implementation:
    """How the same maths is laid out in TF ops; only the benchmark changes the defaults."""

    # ``pointwise="dense"`` runs 1x1 convs as a MatMul on NHWC (kernel [in, out]); ``"conv"`` as
    # Conv2D (kernel [1, 1, in, out]). ``depthwise="grouped"`` is the naive Conv2D(groups=C) port;
    # ``"kernels"`` runs depthwise convs as van_trainer.kernels' C++ ops (CPU, float32), with the
    # MLP's GELU fused into its 3x3 conv (`training_implementation` picks it where it can run).
    # ``gelu="fused"`` runs GELU and its gradient as one XLA-compiled kernel each, ``"analytic"`` as
    # TF ops with the analytic gradient, ``"autodiff"`` as TF ops differentiated op by op.
    # ``fold_gelu_constants`` (inference fold only) moves GELU's 1/sqrt(2) and 1/2 into the
    # neighbouring convolutions, leaving 3 element-wise ops per GELU instead of 5.

    pointwise: str = "dense"
    depthwise: str = "depthwise"
    fused_batch_norm: bool = True
    gelu: str = "fused"
    fold_gelu_constants: bool = True

    def __post_init__(self):
        if self.gelu not in GELU_FORMS:
            raise ValueError(f"gelu must be one of {sorted(GELU_FORMS)}, got {self.gelu!r}")
        if self.depthwise not in DEPTHWISE_FORMS:
            raise ValueError(
                f"depthwise must be one of {sorted(DEPTHWISE_FORMS)}, got {self.depthwise!r}"
            )


GELU_FORMS = ("fused", "analytic", "autodiff")
DEPTHWISE_FORMS = ("depthwise", "grouped", "kernels")
DEFAULT_IMPLEMENTATION = Implementation()
KERNELS_IMPLEMENTATION = Implementation(depthwise="kernels")


def training_implementation(use_kernels: bool = True) -> Implementation:
    """The fastest layout that runs here: C++ depthwise kernels where they load, else stock TF."""
    # The kernels run on a CPU-only host where they load (`use_kernels` and no GPU); otherwise stock
    # TF ops (GPUs, XLA, no compiler).
    if not use_kernels or tf.config.list_logical_devices("GPU"):
        return DEFAULT_IMPLEMENTATION
    from van_trainer import kernels  # builds the library on first use if `make venv` did not

    return KERNELS_IMPLEMENTATION if kernels.load() is not None else DEFAULT_IMPLEMENTATION


@keras.saving.register_keras_serializable(package="van")
class LayerScale(keras.layers.Layer):
    """Per-channel learnable scale (the official ``layer_scale_{1,2}``), initialised to 1e-2."""

    def __init__(self, init_value: float = LAYER_SCALE_INIT, **kwargs):
        super().__init__(**kwargs)
        self.init_value = init_value

    def build(self, input_shape):
        """Create the per-channel scale, initialised to `init_value`."""
        self.scale = self.add_weight(
            name="scale",
            shape=(input_shape[-1],),
            initializer=keras.initializers.Constant(self.init_value),
            trainable=True,
        )
        super().build(input_shape)

    def call(self, inputs):
        """Scale each channel of `inputs` by the learned scale."""
        return inputs * tf.cast(self.scale, inputs.dtype)

    def get_config(self):
        """The layer's config, with `init_value`."""
        return {**super().get_config(), "init_value": self.init_value}


@keras.saving.register_keras_serializable(package="van")
class DropPath(keras.layers.Layer):
    """Stochastic depth: drop the whole residual branch per sample while training."""

    def __init__(self, rate: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.rate = float(rate)

    def call(self, inputs, training=None):
        """Drop samples' branch at `rate` while training, rescaling the rest; else identity."""
        if self.rate == 0.0 or not training:
            return inputs
        keep = 1.0 - self.rate
        batch = tf.shape(inputs)[0]
        shape = tf.concat([[batch], tf.ones([tf.rank(inputs) - 1], tf.int32)], axis=0)
        mask = tf.floor(keep + tf.random.uniform(shape, dtype=inputs.dtype))
        return inputs / tf.cast(keep, inputs.dtype) * mask

    def get_config(self):
        """The layer's config, with `rate`."""
        return {**super().get_config(), "rate": self.rate}


def _conv_init(kernel: int, out_channels: int, groups: int = 1) -> keras.initializers.Initializer:
    # Official _init_weights: normal(0, sqrt(2 / fan_out)), fan_out = kh * kw * out / groups.
    fan_out = kernel * kernel * out_channels // groups
    return keras.initializers.RandomNormal(0.0, math.sqrt(2.0 / fan_out))


def _pointwise(filters: int, name: str, impl: Implementation) -> keras.layers.Layer:
    """1x1 convolution with bias, as MatMul or Conv2D depending on the implementation."""
    init = _conv_init(1, filters)
    if impl.pointwise == "dense":
        return keras.layers.Dense(filters, kernel_initializer=init, name=name)
    return keras.layers.Conv2D(filters, 1, kernel_initializer=init, name=name)


@keras.saving.register_keras_serializable(package="van")
class KernelDepthwiseConv2D(keras.layers.DepthwiseConv2D):
    """DepthwiseConv2D (same weights, same names) run by van_trainer.kernels, optionally + GELU."""

    # The exact GELU is fused on its output when `fused_gelu`; stock ops run where the layer
    # computes in another dtype.

    def __init__(self, *args, fused_gelu: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused_gelu = fused_gelu
        unsupported = {
            "strides": self.strides != (1, 1),
            "padding": self.padding != "same",
            "depth_multiplier": self.depth_multiplier != 1,
            "data_format": self.data_format != "channels_last",
            "activation (use fused_gelu)": self.activation is not keras.activations.linear,
            "unequal dilation_rate": self.dilation_rate[0] != self.dilation_rate[1],
            "even kernel_size": any(k % 2 == 0 for k in self.kernel_size),
        }
        if refused := [name for name, bad in unsupported.items() if bad]:
            raise ValueError(f"{self.name}: KernelDepthwiseConv2D does not support {refused}")

    def call(self, inputs):
        """Depthwise conv (+ GELU) with the C++ kernels in float32, stock ops in other dtypes."""
        if inputs.dtype != tf.float32:  # the kernels are float32 only (mixed precision)
            outputs = super().call(inputs)
            return fused_gelu(outputs) if self.fused_gelu else outputs
        from van_trainer import kernels

        bias = self.bias if self.use_bias else tf.zeros_like(self.depthwise_kernel[0, 0, :, 0])
        return kernels.depthwise_conv2d(
            inputs,
            self.depthwise_kernel,
            bias,
            dilation=self.dilation_rate[0],
            activation="gelu" if self.fused_gelu else "none",
        )

    def get_config(self):
        """The layer's config, with `fused_gelu`."""
        return {**super().get_config(), "fused_gelu": self.fused_gelu}


def uses_kernels(model: keras.Model) -> bool:
    """Whether `model` runs its depthwise convs with van_trainer.kernels."""
    return any(isinstance(layer, KernelDepthwiseConv2D) for layer in model.layers)


def _depthwise(
    channels: int,
    kernel: int,
    name: str,
    impl: Implementation,
    dilation: int = 1,
    gelu: bool = False,
    bias: bool = True,
):
    """Depthwise 'same' conv (odd kernel, stride 1: symmetric padding as in PyTorch), with a
    bias unless `bias` is off; `gelu` fuses GELU on the output (kernels layout only)."""
    init = _conv_init(kernel, channels, groups=channels)
    same = {"padding": "same", "dilation_rate": dilation, "use_bias": bias, "name": name}
    if impl.depthwise == "kernels":
        return KernelDepthwiseConv2D(kernel, depthwise_initializer=init, fused_gelu=gelu, **same)
    if impl.depthwise == "grouped":
        return keras.layers.Conv2D(
            channels, kernel, groups=channels, kernel_initializer=init, **same
        )
    return keras.layers.DepthwiseConv2D(kernel, depthwise_initializer=init, **same)


def _batch_norm(name: str, impl: Implementation) -> keras.layers.Layer:
    return keras.layers.BatchNormalization(
        momentum=BN_MOMENTUM, epsilon=BN_EPSILON, fused=impl.fused_batch_norm or None, name=name
    )


_SQRT2 = math.sqrt(2.0)
_INV_SQRT2 = 1.0 / _SQRT2
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _gelu_forward(x):
    return x * (0.5 * (1.0 + tf.math.erf(x * _INV_SQRT2)))


def _gelu_backward(x, dy):
    # d/dx x*Phi(x) = Phi(x) + x*phi(x): a few element-wise ops instead of autodiff through erf.
    cdf = 0.5 * (1.0 + tf.math.erf(x * _INV_SQRT2))
    return dy * (cdf + x * tf.exp(-0.5 * tf.square(x)) * _INV_SQRT_2PI)


@tf.custom_gradient
def _exact_gelu(x):
    return _gelu_forward(x), lambda dy: _gelu_backward(x, dy)


# Each TF op above is one pass over the tensor, and on the MLP's hidden maps (8x the block width)
# those passes are most of GELU's cost; XLA fuses each direction into a single loop (~6x faster
# forward + backward on stage 1's 56x56x256 maps, benchmarks/bench_model.py --ideas). Only the
# training graph uses it: TF Serving runs XLA:CPU only behind --xla_cpu_compilation_enabled.
_fused_gelu_forward = tf.function(_gelu_forward, jit_compile=True, autograph=False)
_fused_gelu_backward = tf.function(_gelu_backward, jit_compile=True, autograph=False)


@tf.custom_gradient
def _xla_gelu(x):
    return _fused_gelu_forward(x), lambda dy: _fused_gelu_backward(x, dy)


@keras.saving.register_keras_serializable(package="van")
def gelu(x):
    """Exact (erf) GELU as torch.nn.GELU(), with an analytic gradient (~5% faster training)."""
    return _exact_gelu(x)


@keras.saving.register_keras_serializable(package="van")
def fused_gelu(x):
    """Exact (erf) GELU with forward and analytic gradient each one XLA-compiled kernel."""
    return _xla_gelu(x)


@keras.saving.register_keras_serializable(package="van")
def prescaled_gelu(y):
    """sqrt(2) * gelu(sqrt(2) * y): exact GELU once the fold has moved its constants into convs."""
    return y * (1.0 + tf.math.erf(y))


def _gelu(name: str, impl: Implementation) -> keras.layers.Layer:
    # tf_keras "gelu" is also the exact erf form, but differentiated op by op.
    activation = {"fused": fused_gelu, "analytic": gelu, "autodiff": "gelu"}[impl.gelu]
    return keras.layers.Activation(activation, name=name)


def _attention(x, dim: int, prefix: str, impl: Implementation):
    """Official Attention: proj_1 -> GELU -> LKA -> proj_2, plus the attention's own shortcut."""
    shortcut = x
    x = _pointwise(dim, f"{prefix}.proj_1", impl)(x)
    x = _gelu(f"{prefix}.activation", impl)(x)
    sgu = f"{prefix}.spatial_gating_unit"
    attn = _depthwise(dim, 5, f"{sgu}.conv0", impl)(x)
    attn = _depthwise(dim, 7, f"{sgu}.conv_spatial", impl, dilation=3)(attn)
    attn = _pointwise(dim, f"{sgu}.conv1", impl)(attn)
    x = keras.layers.Multiply(name=f"{sgu}.gate")([x, attn])
    x = _pointwise(dim, f"{prefix}.proj_2", impl)(x)
    return keras.layers.Add(name=f"{prefix}.shortcut")([x, shortcut])


def _mlp(x, dim: int, hidden: int, prefix: str, impl: Implementation):
    """Official Mlp: fc1 -> 3x3 depthwise -> GELU -> fc2 (dropout 0 in every released model)."""
    x = _pointwise(hidden, f"{prefix}.fc1", impl)(x)
    fuse_gelu = impl.depthwise == "kernels"  # one pass over the widest tensor instead of two
    x = _depthwise(hidden, 3, f"{prefix}.dwconv.dwconv", impl, gelu=fuse_gelu)(x)
    if not fuse_gelu:
        x = _gelu(f"{prefix}.act", impl)(x)
    return _pointwise(dim, f"{prefix}.fc2", impl)(x)


def _residual(x, branch, prefix: str, index: int, drop_path: float):
    """x + drop_path(layer_scale * branch): one of the two residual halves of a block."""
    branch = LayerScale(name=f"{prefix}.layer_scale_{index}")(branch)
    branch = DropPath(drop_path, name=f"{prefix}.drop_path_{index}")(branch)
    return keras.layers.Add(name=f"{prefix}.add_{index}")([x, branch])


def _block(x, dim: int, mlp_ratio: int, prefix: str, drop_path: float, impl: Implementation):
    """One VAN block: BN -> attention and BN -> MLP, each layer-scaled on a residual."""
    attn = _attention(_batch_norm(f"{prefix}.norm1", impl)(x), dim, f"{prefix}.attn", impl)
    x = _residual(x, attn, prefix, 1, drop_path)
    mlp = _mlp(_batch_norm(f"{prefix}.norm2", impl)(x), dim, dim * mlp_ratio, f"{prefix}.mlp", impl)
    return _residual(x, mlp, prefix, 2, drop_path)


def _patch_embed(x, dim: int, stage: int, impl: Implementation):
    """OverlapPatchEmbed: conv k7 s4 p3 (stage 1) or k3 s2 p1, then BatchNorm.

    Explicit symmetric zero padding: Keras 'same' pads stride-2/4 convs asymmetrically
    (more at the bottom/right), which would shift every window relative to PyTorch.
    """
    kernel, stride = (7, 4) if stage == 1 else (3, 2)
    prefix = f"patch_embed{stage}"
    x = keras.layers.ZeroPadding2D(kernel // 2, name=f"{prefix}.pad")(x)
    x = keras.layers.Conv2D(
        dim,
        kernel,
        strides=stride,
        kernel_initializer=_conv_init(kernel, dim),
        name=f"{prefix}.proj",
    )(x)
    return _batch_norm(f"{prefix}.norm", impl)(x)


def drop_path_rates(depths, drop_path_rate: float) -> list[float]:
    """Stochastic-depth rate per block: linspace(0, rate, sum(depths)), as the official code."""
    total = sum(depths)
    if total == 1:
        return [0.0]
    return [drop_path_rate * i / (total - 1) for i in range(total)]


def build_van(
    variant: str = "b0",
    num_classes: int = 1000,
    input_shape=(224, 224, 3),
    drop_path_rate: float = 0.0,
    implementation: Implementation = DEFAULT_IMPLEMENTATION,
) -> keras.Model:
    """Build VAN `variant` mapping NHWC normalised images to float32 logits [batch, num_classes]."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown VAN variant {variant!r}; choose one of {sorted(VARIANTS)}")
    _check_input_shape(input_shape)
    cfg = VARIANTS[variant]
    rates = iter(drop_path_rates(cfg.depths, drop_path_rate))
    inputs = keras.Input(shape=tuple(input_shape), name="images")
    x = inputs
    for stage, (dim, depth, ratio) in enumerate(
        zip(cfg.embed_dims, cfg.depths, cfg.mlp_ratios, strict=False), 1
    ):
        x = _patch_embed(x, dim, stage, implementation)
        for j in range(depth):
            x = _block(x, dim, ratio, f"block{stage}.{j}", next(rates), implementation)
        x = keras.layers.LayerNormalization(epsilon=LN_EPSILON, name=f"norm{stage}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    # Head (and the pooled features) in float32 so mixed-precision logits stay float32.
    x = keras.layers.Activation("linear", dtype="float32", name="pool_float32")(x)
    logits = keras.layers.Dense(
        num_classes,
        kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.02),
        dtype="float32",
        name="head",
    )(x)
    return keras.Model(inputs, logits, name=f"van_{variant}")


def _check_input_shape(input_shape) -> None:
    if len(input_shape) != 3 or input_shape[-1] != 3:
        raise ValueError(f"input_shape must be (height, width, 3), got {tuple(input_shape)}")
    for side in input_shape[:2]:
        if side is not None and (side < 32 or side % 32):
            raise ValueError(f"input_shape sides must be multiples of 32, got {tuple(input_shape)}")


def count_trainable_parameters(model: keras.Model) -> int:
    """Number of trainable scalars (layer scales included, BatchNorm moving statistics not)."""
    return int(sum(math.prod(w.shape) for w in model.trainable_weights))


# ---- inference-only folding ---------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="van")
class ChannelScale(keras.layers.Layer):
    """x * scale per channel: what the attention's BatchNorm'd shortcut + residual fold into."""

    def build(self, input_shape):
        """Create the per-channel scale, initialised to ones."""
        self.scale = self.add_weight(name="scale", shape=(input_shape[-1],), initializer="ones")
        super().build(input_shape)

    def call(self, inputs):
        """Multiply each channel of `inputs` by its scale."""
        return inputs * self.scale


def _bn_affine(bn: keras.layers.BatchNormalization):
    """(scale, shift) with bn(x) == x * scale + shift in inference mode."""
    scale = bn.gamma.numpy() / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
    return scale, bn.beta.numpy() - bn.moving_mean.numpy() * scale


def _dense_kernel(layer) -> np.ndarray:
    kernel = layer.kernel.numpy()
    return kernel.reshape(kernel.shape[-2], kernel.shape[-1])  # Conv2D 1x1 or Dense -> [in, out]


def _folded_weights(model: keras.Model, prefix: str, fold_gelu_constants: bool) -> dict:
    """Weights of one block with norm1/norm2 folded into proj_1/fc1, layer scales into
    proj_2/fc2, the attention shortcut's offset into proj_2's bias (its scale stays a
    `ChannelScale` of x) and, if asked, GELU's constants into the convs around each GELU."""
    get = model.get_layer
    s1, t1 = _bn_affine(get(f"{prefix}.norm1"))
    s2, t2 = _bn_affine(get(f"{prefix}.norm2"))
    g1, g2 = (
        get(f"{prefix}.layer_scale_1").scale.numpy(),
        get(f"{prefix}.layer_scale_2").scale.numpy(),
    )
    sgu = f"{prefix}.attn.spatial_gating_unit"
    p1, p2 = get(f"{prefix}.attn.proj_1"), get(f"{prefix}.attn.proj_2")
    fc1, fc2 = get(f"{prefix}.mlp.fc1"), get(f"{prefix}.mlp.fc2")
    conv0, spatial, conv1 = (get(f"{sgu}.{name}") for name in ("conv0", "conv_spatial", "conv1"))
    dw = get(f"{prefix}.mlp.dwconv.dwconv")
    w1, w2, wf1, wf2, wc1 = (_dense_kernel(layer) for layer in (p1, p2, fc1, fc2, conv1))
    # prescaled_gelu(x / sqrt2) == sqrt2 * gelu(x): divide what feeds a GELU by sqrt2 and the
    # convs after it by sqrt2. The LKA chain is affine, so it carries the sqrt2 through on
    # scaled biases until conv1 removes it; the gate's u still has it, which proj_2 removes.
    c = _SQRT2 if fold_gelu_constants else 1.0
    # conv_spatial's bias moves into conv1's (a 1x1 conv is linear: conv1(a + b) = conv1(a) +
    # b @ W), so the dilated conv needs no BiasAdd after its BatchToSpace. conv0's can't: zero
    # padding at the borders would not see it.
    return {
        f"{prefix}.attn.proj_1": [s1[:, None] * w1 / c, (t1 @ w1 + p1.bias.numpy()) / c],
        f"{sgu}.conv0": [conv0.weights[0].numpy(), conv0.bias.numpy() * c],
        f"{sgu}.conv_spatial": [spatial.weights[0].numpy()],
        f"{sgu}.conv1": [wc1 / c, conv1.bias.numpy() + spatial.bias.numpy() @ wc1],
        f"{prefix}.attn.proj_2": [w2 * g1 / c, (p2.bias.numpy() + t1) * g1],
        f"{prefix}.residual_1": [1.0 + g1 * s1],
        f"{prefix}.mlp.fc1": [s2[:, None] * wf1, t2 @ wf1 + fc1.bias.numpy()],
        f"{prefix}.mlp.dwconv.dwconv": [dw.weights[0].numpy() / c, dw.bias.numpy() / c],
        f"{prefix}.mlp.fc2": [wf2 * g2 / c, fc2.bias.numpy() * g2],
    }


# Inference runs 1x1s as Conv2D: ~10% faster than MatMul-on-NHWC in the forward pass here,
# while the training step is as fast or slightly faster with Dense (benchmarks/bench_model.py).
# No XLA in what is exported: stock TF Serving refuses XLA:CPU unless started with a flag.
INFERENCE_IMPLEMENTATION = Implementation(pointwise="conv", gelu="analytic")


def _folded_gelu(name: str, impl: Implementation) -> keras.layers.Layer:
    if impl.fold_gelu_constants:
        return keras.layers.Activation(prescaled_gelu, name=name)
    return _gelu(name, impl)


def _folded_block(x, dim: int, mlp_ratio: int, prefix: str, impl: Implementation):
    sgu = f"{prefix}.attn.spatial_gating_unit"
    u = _pointwise(dim, f"{prefix}.attn.proj_1", impl)(x)
    u = _folded_gelu(f"{prefix}.attn.activation", impl)(u)
    attn = _depthwise(dim, 5, f"{sgu}.conv0", impl)(u)
    attn = _depthwise(dim, 7, f"{sgu}.conv_spatial", impl, dilation=3, bias=False)(attn)
    attn = _pointwise(dim, f"{sgu}.conv1", impl)(attn)
    attn = _pointwise(dim, f"{prefix}.attn.proj_2", impl)(keras.layers.Multiply()([u, attn]))
    x = keras.layers.Add()([ChannelScale(name=f"{prefix}.residual_1")(x), attn])
    h = _pointwise(dim * mlp_ratio, f"{prefix}.mlp.fc1", impl)(x)
    h = _depthwise(dim * mlp_ratio, 3, f"{prefix}.mlp.dwconv.dwconv", impl)(h)
    h = _folded_gelu(f"{prefix}.mlp.act", impl)(h)
    return keras.layers.Add()([x, _pointwise(dim, f"{prefix}.mlp.fc2", impl)(h)])


def fold_for_inference(
    model: keras.Model,
    input_shape=(None, None, 3),
    implementation: Implementation = INFERENCE_IMPLEMENTATION,
) -> keras.Model:
    """Inference-only float32 copy of a `build_van` model, BatchNorms and layer scales folded."""
    # Every BatchNorm and layer scale is folded into neighbouring convolutions: same logits up to
    # float rounding, fewer ops.
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        return _fold(model, input_shape, implementation)
    finally:
        keras.mixed_precision.set_global_policy(policy)


def _fold(model: keras.Model, input_shape, implementation: Implementation) -> keras.Model:
    variant = model.name.removeprefix("van_")
    cfg = VARIANTS[variant]
    weights: dict[str, list] = {}
    inputs = keras.Input(shape=tuple(input_shape), name="images")
    x = inputs
    for stage, (dim, depth, ratio) in enumerate(
        zip(cfg.embed_dims, cfg.depths, cfg.mlp_ratios, strict=True), 1
    ):
        kernel, stride = (7, 4) if stage == 1 else (3, 2)
        name = f"patch_embed{stage}.proj"
        x = keras.layers.ZeroPadding2D(kernel // 2)(x)
        x = keras.layers.Conv2D(dim, kernel, strides=stride, name=name)(x)
        scale, shift = _bn_affine(model.get_layer(f"patch_embed{stage}.norm"))
        proj = model.get_layer(name)
        weights[name] = [proj.kernel.numpy() * scale, proj.bias.numpy() * scale + shift]
        for j in range(depth):
            x = _folded_block(x, dim, ratio, f"block{stage}.{j}", implementation)
            weights.update(
                _folded_weights(model, f"block{stage}.{j}", implementation.fold_gelu_constants)
            )
        x = keras.layers.LayerNormalization(epsilon=LN_EPSILON, name=f"norm{stage}")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    head = model.get_layer("head")
    logits = keras.layers.Dense(head.units, name="head")(x)
    folded = keras.Model(inputs, logits, name=f"van_{variant}_folded")
    for layer in folded.layers:
        if layer.weights:
            values = weights.get(layer.name) or [
                w.numpy() for w in model.get_layer(layer.name).weights
            ]
            layer.set_weights(
                [
                    np.asarray(v, np.float32).reshape(w.shape)
                    for v, w in zip(values, layer.weights, strict=True)
                ]
            )
    return folded
