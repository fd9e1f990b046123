"""The Beam args that tell TFX's Beam executors what their workers already run."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.beam_workers import (
    DATAFLOW_RUNNERS,
    DEPENDENCY_OPTIONS,
    DIRECT_RUNNERS,
    runner_class_name,
    with_worker_image,
)
from pipeline.kubeflow import beam_args_for_cluster

IMAGE = "registry.example.com/van-tfx:1"
# --runner spellings Beam's create_runner accepts, and the class each selects.
SPELLINGS = {
    None: "DirectRunner",
    "direct": "DirectRunner",
    "DirectRunner": "DirectRunner",
    "DIRECTRUNNER": "DirectRunner",
    "SwitchingDirectRunner": "SwitchingDirectRunner",
    "dataflow": "DataflowRunner",
    "DataflowRunner": "DataflowRunner",
    "flink": "FlinkRunner",
    "PortableRunner": "PortableRunner",
    "spark": "SparkRunner",
}


@pytest.mark.parametrize("spelling, runner", SPELLINGS.items())
def test_runner_names_resolve_as_beam_resolves_them(spelling, runner):
    assert runner_class_name(spelling) == runner


def runner_args(spelling: str | None) -> list[str]:
    return [] if spelling is None else [f"--runner={spelling}"]


@settings(max_examples=200, deadline=None)
@given(
    spelling=st.sampled_from(list(SPELLINGS)),
    dependency=st.one_of(st.none(), st.sampled_from(DEPENDENCY_OPTIONS)),
    others=st.lists(st.sampled_from(["--project=p", "--region=r", "--direct_num_workers=2"])),
)
def test_the_image_is_named_only_for_our_runners_and_only_when_no_dependency_is(
    spelling, dependency, others
):
    args = [*runner_args(spelling), *others]
    if dependency:
        args.append(f"--{dependency}=given-by-the-user")
    result = with_worker_image(args, IMAGE, DIRECT_RUNNERS | DATAFLOW_RUNNERS)
    ours = SPELLINGS[spelling] in DIRECT_RUNNERS | DATAFLOW_RUNNERS
    if ours and not dependency:
        assert result == [*args, f"--sdk_container_image={IMAGE}"]
    else:
        assert result == args  # nothing dropped, reordered or added


def test_tfx_builds_no_sdist_for_the_compiled_dataflow_args():
    from tfx.utils import dependency_utils

    args = beam_args_for_cluster(["--runner=DataflowRunner", "--project=p"], IMAGE)
    # TFX's own check, as its Beam executors call it: the workers are named, nothing to build.
    assert dependency_utils.make_beam_dependency_flags(args) == args


def test_a_portable_runner_keeps_the_environment_the_user_chose():
    args = ["--runner=PortableRunner", "--environment_type=DOCKER", f"--environment_config={IMAGE}"]
    assert beam_args_for_cluster(args, IMAGE) == args
