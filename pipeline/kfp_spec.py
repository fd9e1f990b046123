"""KFP v2 PipelineSpec files: parse, load, write, and what open-source KFP refuses in them.

Shared by the compiler (`pipeline/kubeflow.py`), the KFP client commands (`pipeline/kfp_client.py`)
and the local replay runner (`pipeline/kfp_local.py`); every reader parses with kfp's own proto, so
a field KFP would not accept fails here, not on the cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class KubeflowError(RuntimeError):
    """A Kubeflow request or spec that cannot be made or was refused; the message is one line."""


def parse_pipeline_spec(spec: dict[str, Any]):
    """Parse a PipelineSpec dict with kfp's own proto (raises on unknown or mistyped fields)."""
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    return json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec())


def read_pipeline_spec(path: str | Path) -> dict[str, Any]:
    """The PipelineSpec dict in a compiled YAML file (a clear error for anything else)."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise KubeflowError(f"pipeline package not found: {path}") from None
    except yaml.YAMLError as exc:
        raise KubeflowError(f"pipeline package {path} is not valid YAML: {exc}") from None
    if not isinstance(spec, dict) or "pipelineInfo" not in spec:
        raise KubeflowError(f"{path} is not a KFP PipelineSpec (no pipelineInfo)")
    return spec


def load_pipeline_spec(path: str | Path):
    """Load a compiled PipelineSpec YAML into kfp's proto."""
    spec = read_pipeline_spec(path)
    try:
        return parse_pipeline_spec(spec)
    except Exception as exc:  # protobuf's ParseError and friends: say which file
        raise KubeflowError(f"{path} does not parse as a KFP PipelineSpec: {exc}") from None


def write_pipeline_spec(spec: dict[str, Any], output: Path) -> None:
    """Write a PipelineSpec dict as YAML with a short header saying where it came from."""
    output.parent.mkdir(parents=True, exist_ok=True)
    header = (
        "# PIPELINE DEFINITION\n"
        f"# Name: {spec['pipelineInfo']['name']}\n"
        "# Compiled by `van-tfx compile` (TFX KubeflowV2DagRunner); edit the config, not this file.\n"
    )
    output.write_text(header + yaml.safe_dump(spec, sort_keys=True))


def resolver_tasks(spec) -> list[str]:
    """Labels of executors that are TFX resolvers (open-source KFP 2.x cannot run those)."""
    return sorted(
        label
        for label, executor in spec.deployment_spec["executors"].items()
        if "resolver" in executor
    )
