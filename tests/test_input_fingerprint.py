"""The input fingerprint with concurrent stats: TFX's string byte for byte, and used everywhere
the pipeline resolves a span (gate, local pre-check, ExampleGen's executor and driver)."""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import pytest
from filesystems import SCHEME, LaggedFilesystem
from hypothesis import given, settings
from hypothesis import strategies as st
from spans import write_shards, write_span
from tfx.components.example_gen import driver as tfx_driver
from tfx.components.example_gen import utils as tfx_utils
from tfx.proto import example_gen_pb2, range_config_pb2
from tfx.types.standard_artifacts import Examples
from tfx.utils import proto_utils

from components import input_fingerprint
from components.example_gen import resolve_like_the_driver
from components.new_data_gate import data_to_ingest
from pipeline import ingest
from van_tfx.config import DataConfig
from van_tfx.storage import CONCURRENT_CALLS

NS = 1_000_000_000
SPLITS = (("train", "train"), ("eval", "validation"), ("test", "test"))
# Pattern layouts: how a span (and version) is spelled in the directories, and the pattern.
LAYOUTS = {
    "span": ("span-{SPAN}/{P}-*", lambda span, version: f"span-{span}"),
    "width": ("span-{SPAN:2}/{P}-*", lambda span, version: f"span-{span:02d}"),
    "version": ("span-{SPAN}/v{VERSION}/{P}-*", lambda span, version: f"span-{span}/v{version}"),
    "date": ("{YYYY}-{MM}-{DD}/{P}-*", lambda span, version: date_dir(span)),
    "plain": ("{P}-*", lambda span, version: ""),
}


def date_dir(span: int) -> str:
    year, month, day = tfx_utils.span_number_to_date(span)
    return f"{year:04d}-{month:02d}-{day:02d}"


# mtimes in nanoseconds: a small pool (so files share mtimes) and any; fractions just below a
# whole second are where int(ns / 1e9) and ns // 1e9 differ.
MTIMES = st.one_of(
    st.sampled_from([1_700_000_000 * NS, 1_700_000_000 * NS + 999_999_999, 1_699_999_999_999_999_999]),
    st.builds(
        lambda seconds, fraction: seconds * NS + fraction,
        st.integers(1_000_000_000, 2_000_000_000),
        st.sampled_from([0, 1, 999_999_999]) | st.integers(0, NS - 1),
    ),
)  # fmt: skip
FILES = st.lists(st.tuples(st.integers(0, 300), MTIMES), max_size=4) | st.lists(
    st.tuples(st.integers(0, 40), MTIMES), min_size=17, max_size=40
)  # more than CONCURRENT_CALLS files in a split, now and then


@st.composite
def file_sets(draw):
    """(layout, split protos, {relative path: (size, mtime ns)}, range config or None)."""
    layout = draw(st.sampled_from(sorted(LAYOUTS)))
    template, directory = LAYOUTS[layout]
    splits = draw(st.lists(st.sampled_from(SPLITS), min_size=1, max_size=3, unique=True))
    spans = [0] if layout == "plain" else draw(st.sets(st.integers(0, 12), min_size=1, max_size=3))
    versions = (
        draw(st.sets(st.integers(0, 3), min_size=1, max_size=2)) if layout == "version" else [None]
    )
    files = {}
    for _name, prefix in splits:
        for span in sorted(spans):
            for version in sorted(versions):
                for index, entry in enumerate(draw(FILES)):
                    files[os.path.join(directory(span, version), f"{prefix}-{index:05d}")] = entry
    protos = [
        example_gen_pb2.Input.Split(name=name, pattern=template.replace("{P}", prefix))
        for name, prefix in splits
    ]
    pinned = None
    if layout != "plain" and draw(st.booleans()):
        span = draw(st.sampled_from(sorted(spans)) | st.integers(0, 12))
        pinned = range_config_pb2.RangeConfig(
            static_range=range_config_pb2.StaticRange(start_span_number=span, end_span_number=span)
        )
    return layout, protos, files, pinned


def outcome(function, root: str, splits, range_config):
    """What `function` returns (and how it fills the patterns in), or the error it raises."""
    splits = [copy.deepcopy(split) for split in splits]
    try:
        result = function(root, splits, range_config)
    except Exception as exc:  # noqa: BLE001  (the same error is part of the contract)
        return "raised", type(exc), str(exc)
    return result, [split.pattern for split in splits]


@settings(max_examples=120, deadline=None)
@given(case=file_sets())
def test_the_fingerprint_is_tfxs_byte_for_byte_on_random_file_sets(case):
    layout, splits, files, range_config = case
    with tempfile.TemporaryDirectory() as directory:
        for relative, (size, mtime) in files.items():
            path = Path(directory, relative)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"\0" * size)
            os.utime(path, ns=(mtime, mtime))
        # TF's local file system (whole-second mtimes) and one reporting nanoseconds, as object
        # stores report sub-second times.
        LaggedFilesystem.reset()
        for root in (directory, SCHEME + directory):
            ours = outcome(
                input_fingerprint.calculate_splits_fingerprint_span_and_version,
                root,
                splits,
                range_config,
            )
            theirs = outcome(
                tfx_utils.calculate_splits_fingerprint_span_and_version, root, splits, range_config
            )
            assert ours == theirs


def test_the_fingerprint_keeps_tfxs_rounding_of_nanosecond_mtimes(tmp_path):
    # int(ns / 1e9) is 1700000000 for this mtime, ns // 1e9 is 1699999999: TFX's is the first.
    (tmp_path / "train-0").write_bytes(b"x")
    os.utime(tmp_path / "train-0", ns=(1_699_999_999_999_999_999,) * 2)
    fingerprint = input_fingerprint.generate_fingerprint("train", f"{SCHEME}{tmp_path}/train-*")
    assert fingerprint == (
        "split:train,num_files:1,total_bytes:1,xor_checksum:1700000000,sum_checksum:1700000000"
    )


@pytest.fixture
def imagenet_like(tmp_path) -> Path:
    """Span 1, then span 2 of 40 train and 8 validation shards, each file its own mtime."""
    data = tmp_path / "data"
    write_span(data, 1)
    paths = write_shards(data / "span-2", "train", 40) + write_shards(
        data / "span-2", "validation", 8
    )
    for number, path in enumerate(paths):
        os.utime(path, ns=((1_700_000_000 + 37 * number) * NS + 123_456_789,) * 2)
    return data


def splits_of(config: DataConfig | None = None):
    return ingest.input_config(config or DataConfig()).splits


def tfx_fingerprint(root: str) -> str:
    """TFX's own fingerprint of the newest span, with its stats one after another."""
    LaggedFilesystem.reset(delay=0.02)
    fingerprint, span, _ = tfx_utils.calculate_splits_fingerprint_span_and_version(
        root, splits_of()
    )
    assert span == 2 and LaggedFilesystem.max_in_flight == 1 and LaggedFilesystem.stats == 48
    return fingerprint


def test_the_gate_stats_a_span_concurrently_and_fingerprints_it_as_tfx(imagenet_like):
    root = SCHEME + str(imagenet_like)
    expected = tfx_fingerprint(root)
    LaggedFilesystem.reset(delay=0.02)
    config = proto_utils.proto_to_json(ingest.input_config(DataConfig()))
    seen = data_to_ingest(root, config)
    assert seen["input_fingerprint"] == expected
    assert "num_files:40" in expected and "xor_checksum:0," not in expected
    assert LaggedFilesystem.stats == 48
    assert LaggedFilesystem.max_in_flight == CONCURRENT_CALLS


def test_an_incomplete_span_costs_the_gate_no_stat_of_its_files(imagenet_like):
    # TFX fingerprints a span while resolving it; the gate's fallback for a span one split does
    # not have yet resolved each split alone, and threw each fingerprint away.
    for path in (imagenet_like / "span-2").glob("validation-*"):
        path.unlink()
    LaggedFilesystem.reset()
    config = proto_utils.proto_to_json(ingest.input_config(DataConfig()))
    seen = data_to_ingest(SCHEME + str(imagenet_like), config)
    assert seen["span"] == 2 and seen["incomplete"]
    assert LaggedFilesystem.stats == 0


def test_executor_resolution_stats_concurrently_and_records_tfxs_fingerprint(
    imagenet_like, tmp_path
):
    root = SCHEME + str(imagenet_like)
    expected = tfx_fingerprint(root)
    examples = Examples()
    examples.uri = str(tmp_path / "examples")
    properties = {
        "input_base": root,
        "input_config": proto_utils.proto_to_json(ingest.input_config(DataConfig())),
    }
    LaggedFilesystem.reset(delay=0.02)
    resolved = resolve_like_the_driver(properties, examples)
    assert resolved["input_fingerprint"] == expected
    assert examples.get_string_custom_property("input_fingerprint") == expected
    assert LaggedFilesystem.max_in_flight == CONCURRENT_CALLS


def test_our_driver_resolves_what_tfxs_driver_resolves_with_concurrent_stats(imagenet_like):
    root = SCHEME + str(imagenet_like)
    properties = {
        "input_base": root,
        "input_config": proto_utils.proto_to_json(ingest.input_config(DataConfig())),
    }
    LaggedFilesystem.reset(delay=0.02)
    theirs = tfx_driver.FileBasedDriver(None).resolve_exec_properties(dict(properties), None, None)
    assert LaggedFilesystem.max_in_flight == 1
    LaggedFilesystem.reset(delay=0.02)
    ours = input_fingerprint.FileBasedDriver(None).resolve_exec_properties(
        dict(properties), None, None
    )
    assert ours == theirs and "span-2/train-*" in ours["input_config"]
    assert LaggedFilesystem.max_in_flight == CONCURRENT_CALLS


def test_the_local_runner_runs_our_driver_for_both_example_gens(tmp_path):
    from tfx.dsl.compiler import compiler
    from tfx.proto.orchestration import executable_spec_pb2, pipeline_pb2

    from pipeline.local import local_location
    from pipeline.pipeline import create_pipeline
    from van_tfx.config import load_config

    config = load_config(overrides=[f"home={tmp_path}"])
    ir = compiler.Compiler().compile(create_pipeline(config, local_location(config)))
    deployment = pipeline_pb2.IntermediateDeploymentConfig()
    ir.deployment_config.Unpack(deployment)
    for node in ("ImportExampleGen", "EvalExampleGen"):
        spec = executable_spec_pb2.PythonClassExecutableSpec()
        deployment.custom_driver_specs[node].Unpack(spec)
        assert spec.class_path == "components.input_fingerprint.FileBasedDriver"
