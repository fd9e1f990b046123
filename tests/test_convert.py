"""Official-checkpoint conversion, proved against an independent NumPy VAN (NCHW, no torch)."""

from __future__ import annotations

import argparse
import os
import pickle
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import erf
from torch_format import save_raw_pickle_zip, save_torch_zip

from van_trainer import convert
from van_trainer.model import build_van

# Written from the paper / official models/van.py, independent of van_trainer.model.
TINY = {"dims": (16, 32, 64, 128), "depths": (1, 1, 1, 1), "mlp_ratios": (8, 8, 4, 4)}
NUM_CLASSES = 10


def official_shapes(dims, depths, mlp_ratios, num_classes):
    """Official state-dict key -> PyTorch shape (incl. num_batches_tracked)."""
    shapes, in_ch = {}, 3
    bn = ("weight", "bias", "running_mean", "running_var")
    for i, (dim, depth, ratio) in enumerate(zip(dims, depths, mlp_ratios, strict=False), 1):
        k = 7 if i == 1 else 3
        shapes[f"patch_embed{i}.proj.weight"] = (dim, in_ch, k, k)
        shapes[f"patch_embed{i}.proj.bias"] = (dim,)
        shapes.update({f"patch_embed{i}.norm.{n}": (dim,) for n in bn})
        shapes[f"patch_embed{i}.norm.num_batches_tracked"] = ()
        for j in range(depth):
            p, hidden = f"block{i}.{j}", dim * ratio
            for norm in ("norm1", "norm2"):
                shapes.update({f"{p}.{norm}.{n}": (dim,) for n in bn})
                shapes[f"{p}.{norm}.num_batches_tracked"] = ()
            convs = {
                "attn.proj_1": (dim, dim, 1, 1),
                "attn.spatial_gating_unit.conv0": (dim, 1, 5, 5),
                "attn.spatial_gating_unit.conv_spatial": (dim, 1, 7, 7),
                "attn.spatial_gating_unit.conv1": (dim, dim, 1, 1),
                "attn.proj_2": (dim, dim, 1, 1),
                "mlp.fc1": (hidden, dim, 1, 1),
                "mlp.dwconv.dwconv": (hidden, 1, 3, 3),
                "mlp.fc2": (dim, hidden, 1, 1),
            }
            for name, shape in convs.items():
                shapes[f"{p}.{name}.weight"] = shape
                shapes[f"{p}.{name}.bias"] = (shape[0],)
            shapes[f"{p}.layer_scale_1"] = (dim,)
            shapes[f"{p}.layer_scale_2"] = (dim,)
        shapes[f"norm{i}.weight"] = (dim,)
        shapes[f"norm{i}.bias"] = (dim,)
        in_ch = dim
    shapes["head.weight"] = (num_classes, dims[-1])
    shapes["head.bias"] = (num_classes,)
    return shapes


def random_state_dict(seed=0, **cfg):
    """Non-trivial random weights: BN stats away from 0/1, layer scales away from 1e-2."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in official_shapes(**cfg, num_classes=NUM_CLASSES).items():
        if key.endswith("num_batches_tracked"):
            state[key] = np.array(123, np.int64)
        elif key.endswith("running_var"):
            state[key] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        elif key.endswith(("norm.weight", "norm1.weight", "norm2.weight")) or "layer_scale" in key:
            state[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 4
            state[key] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    return state


# ---- independent NumPy VAN forward (NCHW, float64) --------------------------------------------


def conv2d(x, w, b, stride=1, padding=0, dilation=1, groups=1):
    """PyTorch-semantics conv2d by summing shifted slices (groups 1 or depthwise)."""
    n, c, h, wd = x.shape
    out_ch, _, kh, kw = w.shape
    x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    oh = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    ow = (wd + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    out = np.zeros((n, out_ch, oh, ow))
    for i in range(kh):
        for j in range(kw):
            patch = x[
                :,
                :,
                i * dilation : i * dilation + stride * (oh - 1) + 1 : stride,
                j * dilation : j * dilation + stride * (ow - 1) + 1 : stride,
            ]
            if groups == 1:
                out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
            else:
                assert groups == c == out_ch
                out += patch * w[:, 0, i, j][None, :, None, None]
    return out + b[None, :, None, None]


def batch_norm(x, sd, p):
    scale = sd[f"{p}.weight"] / np.sqrt(sd[f"{p}.running_var"] + 1e-5)
    shift = sd[f"{p}.bias"] - sd[f"{p}.running_mean"] * scale
    return x * scale[None, :, None, None] + shift[None, :, None, None]


def gelu(x):
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def reference_van(images_nchw, sd, dims, depths, mlp_ratios):
    """VAN eval-mode forward as in the official models/van.py."""
    sd = {k: v.astype(np.float64) for k, v in sd.items()}

    def conv(x, p, **kw):
        return conv2d(x, sd[f"{p}.weight"], sd[f"{p}.bias"], **kw)

    x = images_nchw.astype(np.float64)
    for i, (dim, depth) in enumerate(zip(dims, depths, strict=False), 1):
        k, s = (7, 4) if i == 1 else (3, 2)
        x = batch_norm(
            conv(x, f"patch_embed{i}.proj", stride=s, padding=k // 2), sd, f"patch_embed{i}.norm"
        )
        for j in range(depth):
            p = f"block{i}.{j}"
            h = batch_norm(x, sd, f"{p}.norm1")
            a = gelu(conv(h, f"{p}.attn.proj_1"))
            sgu = f"{p}.attn.spatial_gating_unit"
            attn = conv(a, f"{sgu}.conv0", padding=2, groups=dim)
            attn = conv(attn, f"{sgu}.conv_spatial", padding=9, dilation=3, groups=dim)
            attn = conv(attn, f"{sgu}.conv1")
            a = conv(a * attn, f"{p}.attn.proj_2") + h
            x = x + sd[f"{p}.layer_scale_1"][None, :, None, None] * a
            m = conv(batch_norm(x, sd, f"{p}.norm2"), f"{p}.mlp.fc1")
            hidden = m.shape[1]
            m = gelu(conv(m, f"{p}.mlp.dwconv.dwconv", padding=1, groups=hidden))
            m = conv(m, f"{p}.mlp.fc2")
            x = x + sd[f"{p}.layer_scale_2"][None, :, None, None] * m
        tokens = x.reshape(x.shape[0], dim, -1).transpose(0, 2, 1)  # B, N, C
        mean = tokens.mean(-1, keepdims=True)
        var = tokens.var(-1, keepdims=True)
        tokens = (tokens - mean) / np.sqrt(var + 1e-6) * sd[f"norm{i}.weight"] + sd[f"norm{i}.bias"]
        x = tokens.transpose(0, 2, 1).reshape(x.shape)
    pooled = x.reshape(x.shape[0], x.shape[1], -1).mean(-1)
    return pooled @ sd["head.weight"].T + sd["head.bias"]


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_state():
    return random_state_dict(**TINY)


@pytest.fixture(scope="session")
def tiny_images():
    return np.random.default_rng(1).standard_normal((2, 64, 96, 3)).astype(np.float32)


@pytest.fixture(scope="session")
def reference_logits(tiny_state, tiny_images):
    return reference_van(tiny_images.transpose(0, 3, 1, 2), tiny_state, **TINY)


def relative_error(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


# ---- numerical equivalence --------------------------------------------------------------------


def test_converted_keras_model_matches_numpy_reference(tiny_state, tiny_images, reference_logits):
    model = convert.convert_state_dict(tiny_state, "tiny")
    logits = model(tiny_images, training=False).numpy()
    assert logits.shape == (2, NUM_CLASSES)
    assert relative_error(logits, reference_logits) <= 1e-4


def test_pth_tar_round_trip_through_weights_file(
    tmp_path, tiny_state, tiny_images, reference_logits
):
    # timm-style .pth.tar: state_dict next to epoch, arch, argparse args and optimizer state.
    checkpoint = {
        "epoch": 310,
        "arch": "van_b0",
        "args": argparse.Namespace(model="van_b0", lr=1e-3, drop_path=0.1),
        "state_dict": tiny_state,
        "optimizer": {"state": {0: {"exp_avg": np.zeros(3, np.float32)}}, "param_groups": []},
    }
    path = tmp_path / "checkpoint.pth.tar"
    save_torch_zip(checkpoint, path, parameters=True)
    output = convert.convert_checkpoint("tiny", path, tmp_path / "out" / "van.weights.h5")
    # Weights load into a model of another (static) input size: 64x96 here, built for 32x32.
    model = build_van("tiny", num_classes=NUM_CLASSES, input_shape=(32, 32, 3))
    model.load_weights(str(output))
    dynamic = build_van("tiny", num_classes=NUM_CLASSES, input_shape=(None, None, 3))
    dynamic.load_weights(str(output))
    assert relative_error(dynamic(tiny_images).numpy(), reference_logits) <= 1e-4
    small = tiny_images[:, :32, :32]
    np.testing.assert_allclose(model(small).numpy(), dynamic(small).numpy(), rtol=1e-5, atol=1e-5)


def test_bare_state_dict_pth_and_npz_load_identically(tmp_path, tiny_state):
    save_torch_zip(tiny_state, tmp_path / "bare.pth", archive_name="bare")
    np.savez(tmp_path / "weights.npz", **tiny_state)
    from_pth = convert.load_state_dict(tmp_path / "bare.pth")
    from_npz = convert.load_state_dict(tmp_path / "weights.npz")
    assert set(from_pth) == set(from_npz) == set(tiny_state)
    for key, value in tiny_state.items():
        np.testing.assert_array_equal(from_pth[key], value)
        np.testing.assert_array_equal(from_npz[key], value)


def test_placeholder_args_are_inert_data(tmp_path, tiny_state):
    path = tmp_path / "c.pth.tar"
    save_torch_zip({"state_dict": tiny_state, "args": argparse.Namespace(lr=0.5)}, path)
    with convert.zipfile.ZipFile(path) as archive:
        obj = convert._RestrictedUnpickler(archive.read("archive/data.pkl")).load()
    assert isinstance(obj["args"], convert.Placeholder)
    assert obj["args"].lr == 0.5
    assert type(obj["args"]).__module__ == "argparse"


# ---- refusals and clear errors ----------------------------------------------------------------


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_malicious_pickle_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    save_raw_pickle_zip(pickle.dumps({"state_dict": _Evil(marker)}, protocol=2), path)
    with pytest.raises(convert.UnsafeCheckpointError, match=r"refusing to call (posix|os)\.system"):
        convert.load_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("target", [("builtins", "eval"), ("subprocess", "check_output")])
def test_other_code_execution_globals_are_refused(tmp_path, target):
    module, name = target
    payload = (
        pickle.PROTO
        + b"\x02"
        + pickle.GLOBAL
        + f"{module}\n{name}\n".encode()
        + pickle.BINUNICODE
        + len(b"1+1").to_bytes(4, "little")
        + b"1+1"
        + pickle.TUPLE1
        + pickle.REDUCE
        + pickle.STOP
    )
    path = tmp_path / "evil.pth"
    save_raw_pickle_zip(payload, path)
    with pytest.raises(convert.UnsafeCheckpointError, match=f"{module}.{name}"):
        convert.load_state_dict(path)


def test_legacy_non_zip_checkpoint_gets_clear_error(tmp_path):
    path = tmp_path / "old.pth"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="not a zip-format torch checkpoint"):
        convert.load_state_dict(path)


def test_missing_key_is_named(tiny_state):
    state = dict(tiny_state)
    del state["block2.0.attn.spatial_gating_unit.conv_spatial.weight"]
    with pytest.raises(convert.CheckpointMismatchError, match=r"missing key.*conv_spatial\.weight"):
        convert.convert_state_dict(state, "tiny")


def test_unexpected_key_is_named(tiny_state):
    state = {**tiny_state, "block1.0.attn.extra.weight": np.zeros(3, np.float32)}
    with pytest.raises(
        convert.CheckpointMismatchError, match=r"unexpected key.*attn\.extra\.weight"
    ):
        convert.convert_state_dict(state, "tiny")


def test_shape_mismatch_is_named(tiny_state):
    state = {**tiny_state, "block3.0.mlp.fc1.weight": np.zeros((7, 64, 1, 1), np.float32)}
    with pytest.raises(
        convert.CheckpointMismatchError, match=r"block3\.0\.mlp\.fc1\.weight.*\(7, 64, 1, 1\)"
    ):
        convert.convert_state_dict(state, "tiny")


def test_wrong_variant_is_reported(tiny_state):
    with pytest.raises(convert.CheckpointMismatchError, match="VAN-b0"):
        convert.convert_state_dict(tiny_state, "b0")


@pytest.mark.parametrize(
    ("variant", "config"),
    [("b0", ((32, 64, 160, 256), (3, 3, 5, 2))), ("b1", ((64, 128, 320, 512), (2, 2, 4, 2)))],
)
def test_official_key_set_and_shapes_match_the_model(variant, config):
    dims, depths = config
    shapes = official_shapes(dims, depths, (8, 8, 4, 4), 1000)
    mapping = convert.official_weight_map(build_van(variant))
    expected = {k: v for k, v in shapes.items() if not k.endswith("num_batches_tracked")}
    assert set(mapping) == set(expected)
    for key, (layer, variable, short) in mapping.items():
        assert convert._keras_to_torch_shape(variable.shape, layer, short) == expected[key], key


def convert_with_cli(checkpoint, output, *options) -> int:
    """`van-tfx convert-weights --variant tiny` in this process; returns its exit code."""
    from van_tfx.cli import main

    argv = ["convert-weights", "--variant", "tiny", "--checkpoint", str(checkpoint)]
    return main([*argv, "--output", str(output), *options])


def test_cli_convert_weights(tmp_path, tiny_state):
    np.savez(tmp_path / "w.npz", **tiny_state)
    out = tmp_path / "w.weights.h5"
    assert convert_with_cli(tmp_path / "w.npz", out) == 0
    assert out.is_file()


def test_converted_weights_fine_tune_into_another_class_count(tmp_path, tiny_state):
    # What the Trainer does with model.pretrained_weights: keep the body, leave the head fresh.
    np.savez(tmp_path / "w.npz", **tiny_state)
    output = convert.convert_checkpoint("tiny", tmp_path / "w.npz", tmp_path / "w.weights.h5")
    model = build_van("tiny", num_classes=3, input_shape=(32, 32, 3))
    model.load_weights(str(output), skip_mismatch=True)
    fc1 = model.get_layer("block2.0.mlp.fc1").kernel.numpy()
    np.testing.assert_array_equal(fc1, tiny_state["block2.0.mlp.fc1.weight"][:, :, 0, 0].T)
    assert model.get_layer("head").kernel.shape == (128, 3)


@pytest.mark.parametrize("content", [None, b"not a zip", "npz without head"])
def test_cli_errors_name_the_checkpoint_once(tmp_path, capsys, content):
    # Before: "van-tfx convert-weights: F: checkpoint not found: F", the path said twice.
    checkpoint = tmp_path / ("w.npz" if content == "npz without head" else "w.pth")
    if content == "npz without head":
        np.savez(checkpoint, a=np.zeros(3))
    elif content is not None:
        checkpoint.write_bytes(content)
    assert convert_with_cli(checkpoint, tmp_path / "w.weights.h5") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("van-tfx convert-weights: ") and line.count(str(checkpoint)) == 1, line


def test_cli_reports_bad_checkpoint_without_traceback(tmp_path, capsys, tiny_state):
    state = dict(tiny_state)
    del state["norm3.bias"]
    np.savez(tmp_path / "w.npz", **state)
    code = convert_with_cli(tmp_path / "w.npz", tmp_path / "w.weights.h5")
    assert code == 2
    assert "norm3.bias" in capsys.readouterr().err


# ---- weight values, the head and the class count ------------------------------------------------

WEIGHT_KEYS = sorted(
    k for k in official_shapes(**TINY, num_classes=NUM_CLASSES) if "batches" not in k
)


@settings(max_examples=30, deadline=None)
@given(
    key=st.sampled_from(WEIGHT_KEYS),
    spots=st.lists(
        st.tuples(st.integers(0, 10**6), st.sampled_from([np.nan, np.inf, -np.inf])), min_size=1
    ),
)
def test_non_finite_weights_are_refused_with_key_and_count(tiny_state, key, spots):
    array = tiny_state[key].copy()
    for position, value in spots:
        array.reshape(-1)[position % array.size] = value
    bad = int(np.count_nonzero(~np.isfinite(array)))
    with pytest.raises(
        convert.CheckpointMismatchError, match=rf"^'{re.escape(key)}' has {bad} non-finite"
    ):
        convert.convert_state_dict({**tiny_state, key: array}, "tiny")


@settings(max_examples=30, deadline=None)
@given(
    key=st.sampled_from(["block1.0.mlp.fc1.weight", "head.bias", "norm4.weight"]),
    spots=st.lists(
        st.tuples(st.integers(0, 10**6), st.floats(3.5e38, 1e308) | st.floats(-1e308, -3.5e38)),
        min_size=1,
    ),
)
def test_float64_weights_beyond_float32s_range_are_refused_with_key_and_count(
    tiny_state, key, spots
):
    # Before: finite in float64, they were cast to float32 and loaded as Inf without a word.
    array = tiny_state[key].astype(np.float64)
    for position, value in spots:
        array.reshape(-1)[position % array.size] = value
    over = int(np.count_nonzero(np.abs(array) > np.finfo(np.float32).max))
    with pytest.raises(
        convert.CheckpointMismatchError,
        match=rf"^'{re.escape(key)}' has {over} value\(s\) beyond float32's range",
    ):
        convert.convert_state_dict({**tiny_state, key: array}, "tiny")


@pytest.mark.parametrize(
    "dtype", [np.int64, np.int32, np.uint8, np.bool_, np.complex64, "<U3", object]
)
def test_non_floating_weights_are_refused_with_key_and_dtype(tiny_state, dtype):
    # Before, int64 weights were silently cast; strings failed without naming the key.
    key = "block2.0.mlp.fc1.weight"
    state = {**tiny_state, key: tiny_state[key].astype(dtype)}
    expected = re.escape(f"'{key}' has dtype {np.dtype(dtype)}")
    with pytest.raises(convert.CheckpointMismatchError, match=expected):
        convert.convert_state_dict(state, "tiny")


def test_float16_and_float64_weights_convert(tiny_state):
    state = {
        k: v.astype(np.float16 if "block" in k else np.float64) if v.dtype.kind == "f" else v
        for k, v in tiny_state.items()
    }
    model = convert.convert_state_dict(state, "tiny")
    np.testing.assert_array_equal(
        model.get_layer("block1.0.mlp.fc1").kernel.numpy(),
        state["block1.0.mlp.fc1.weight"][:, :, 0, 0].T.astype(np.float32),
    )
    np.testing.assert_array_equal(
        model.get_layer("head").kernel.numpy(), state["head.weight"].T.astype(np.float32)
    )


BAD_HEADS = {
    "0-d (was an IndexError)": np.float32(1.0),
    "1-d": np.zeros(10, np.float32),
    "3-d": np.zeros((10, 128, 1), np.float32),
    "width of another variant": np.zeros((10, 256), np.float32),
    "no classes": np.zeros((0, 128), np.float32),
    # 2 M classes backed by no data: building the model would allocate a 1 GB head.
    "empty with 2 M rows": np.empty((2_000_000, 0), np.float32),
    # A zero-copy view: a real array this size would be 51 MB.
    "too many classes": np.broadcast_to(np.float32(0), (convert.MAX_NUM_CLASSES + 1, 128)),
}


@pytest.mark.parametrize("head", BAD_HEADS.values(), ids=BAD_HEADS.keys())
@pytest.mark.parametrize("only_the_head", [False, True])
def test_bad_head_is_refused_before_a_model_is_built(tiny_state, head, only_the_head):
    # Before, the model was built from head.weight.shape[0] before anything was checked.
    state = {"head.weight": head} if only_the_head else {**tiny_state, "head.weight": head}
    shape = re.escape(str(np.shape(head)))
    with pytest.raises(
        convert.CheckpointMismatchError, match=rf"^shape mismatch for 'head\.weight'.* {shape}"
    ):
        convert.convert_state_dict(state, "tiny")


def test_head_must_match_an_explicit_class_count(tiny_state):
    with pytest.raises(
        convert.CheckpointMismatchError, match=r"'head\.weight'.*\(10, 128\).*num_classes 3"
    ):
        convert.convert_state_dict(tiny_state, "tiny", num_classes=3)


@pytest.mark.parametrize("num_classes", [0, -3, convert.MAX_NUM_CLASSES + 1, True, 2.5, "10"])
def test_class_count_out_of_range_is_refused(tmp_path, tiny_state, num_classes):
    with pytest.raises(ValueError, match="num_classes must be an integer from 1 to 100000"):
        convert.convert_state_dict(tiny_state, "tiny", num_classes)
    with pytest.raises(ValueError, match="num_classes must be an integer"):  # before reading
        convert.convert_checkpoint("tiny", tmp_path / "absent.npz", tmp_path / "w.h5", num_classes)


def _with(state, key, value):
    return {**state, key: value}


CLI_REFUSALS = {  # checkpoint contents, CLI options, what the one-line error must name
    "0-d head": (
        lambda s: _with(s, "head.weight", np.array(1.0, np.float32)),
        (),
        "'head.weight': checkpoint has ()",
    ),
    "NaN weight": (
        lambda s: _with(s, "norm2.bias", np.full(32, np.nan, np.float32)),
        (),
        "'norm2.bias' has 32 non-finite",
    ),
    "int64 head": (
        lambda s: _with(s, "head.weight", s["head.weight"].astype(np.int64)),
        (),
        "'head.weight' has dtype int64",
    ),
    "strings": (lambda s: _with(s, "head.bias", np.array(["a"] * 10)), (), "'head.bias'"),
    "--num-classes 0": (lambda s: s, ("--num-classes", "0"), "num_classes must be"),
}


CLI_CASES = [
    pytest.param(make, options, named, suffix, id=f"{name} {suffix}")
    for name, (make, options, named) in CLI_REFUSALS.items()
    for suffix in ((".npz",) if name == "strings" else (".pth", ".npz"))  # no string tensors
]


@pytest.mark.parametrize(("make", "options", "named", "suffix"), CLI_CASES)
def test_cli_refuses_bad_weights_in_one_line_with_exit_2(
    tmp_path, capsys, tiny_state, make, options, named, suffix
):
    state = make(tiny_state)
    if suffix == ".npz":
        np.savez(tmp_path / "w.npz", **state)
    else:
        save_torch_zip({"state_dict": state}, tmp_path / "w.pth")
    out = tmp_path / "w.weights.h5"
    assert convert_with_cli(tmp_path / f"w{suffix}", out, *options) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1, error
    assert named in error and str(tmp_path / f"w{suffix}") in error
    assert not out.exists()
