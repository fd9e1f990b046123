"""`van-tfx kfp-local`: the open-source KFP backend's rules, replayed on real compiled specs.

The small specs here are compiled by TFX's own KubeflowV2DagRunner from real components (the
NewDataGate on a real data root, the ServedModel that reads its decision), in the variants a user
could produce: TFX's defaults (legacy `constantValue` parameters), pipeline spec 2.1 with TFX's
stock container entrypoint, a spec with a resolver, and ours. Each runs through the CLI; where a
task starts, it is a real subprocess of TFX's entrypoint.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2
from spans import write_span

from pipeline import kfp_entrypoint
from pipeline.kfp_backend import TaskFailed, driver, expression, metadata
from pipeline.kfp_spec import write_pipeline_spec
from van_tfx.cli import main

IMAGE = "registry.example.com/van-tfx:test"
TFX_COMMAND = ["python", "-m", "tfx.orchestration.kubeflow.v2.container.kubeflow_v2_run_executor"]


def small_pipeline(tmp_path: Path, *, with_resolver: bool = False):
    """The gate on a real data root, and the ServedModel task that consumes its decision."""
    from tfx import v1 as tfx

    from components.served_model import ServedModel
    from pipeline import ingest
    from van_tfx.config import DataConfig

    write_span(tmp_path / "data", 1)
    serving = str(tmp_path / "serving")
    gate = ingest.new_data_gate(DataConfig(), str(tmp_path / "data"), serving, force=False)
    served = ServedModel(decision=gate.outputs["decision"], serving_base_path=serving)
    components = [gate, served]
    if with_resolver:
        components.append(
            tfx.dsl.Resolver(
                strategy_class=tfx.dsl.experimental.LatestArtifactStrategy,
                model=tfx.dsl.Channel(type=tfx.types.standard_artifacts.Model),
            ).with_id("latest_model")
        )
    return tfx.dsl.Pipeline(
        pipeline_name="small", pipeline_root=str(tmp_path / "root"), components=components
    )


def compile_small(tmp_path: Path, *, spec_2_1=True, command=None, with_resolver=False) -> Path:
    """Compile the small pipeline with TFX's KubeflowV2DagRunner into a bare PipelineSpec YAML."""
    from tfx.orchestration.kubeflow.v2 import kubeflow_v2_dag_runner as v2

    from pipeline.kubeflow import ENTRYPOINT_COMMAND

    config = v2.KubeflowV2DagRunnerConfig(
        default_image=IMAGE,
        default_commands=command or ENTRYPOINT_COMMAND,
        use_pipeline_spec_2_1=spec_2_1,
    )
    job = v2.KubeflowV2DagRunner(config=config).run(
        small_pipeline(tmp_path, with_resolver=with_resolver), write_out=False
    )
    spec = job["pipelineSpec"]
    spec["defaultPipelineRoot"] = str(tmp_path / "root")
    path = tmp_path / f"small-{uuid.uuid4().hex[:6]}.yaml"
    write_pipeline_spec(spec, path)
    return path


def kfp_local_json(path: Path, *extra: str, capsys) -> tuple[int, dict, str]:
    """Run `van-tfx kfp-local --json` in-process: exit code, outcome JSON, stderr."""
    code = main(["kfp-local", str(path), "--json", *extra])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if out.out.strip() else {}), out.err


def run_record(tmp_path: Path) -> dict:
    """The kfp_local_run.json of the single run under the small pipeline's root."""
    [record] = (tmp_path / "root" / "small").glob("*/kfp_local_run.json")
    return json.loads(record.read_text())


# ---------------------------------------------------------------- what the backend refuses


def test_a_spec_with_a_resolver_is_refused_with_the_compilers_message(tmp_path, capsys):
    path = compile_small(tmp_path, with_resolver=True)
    code, _, err = kfp_local_json(path, capsys=capsys)
    assert code == 2
    # compiler/visitor.go dfs, wrapped by apiserver/template/v2_template.go.
    assert (
        'van-tfx kfp-local: Failed to compile job: error processing component name="latest_model": '
        'executor(label="latest_model_executor"): non-container and non-importer executor not '
        "implemented"
    ) in err
    assert not (tmp_path / "root" / "small").exists(), "no task may start"


def test_tfx_default_spec_is_refused_by_the_api_server_for_its_schema_version(tmp_path, capsys):
    path = compile_small(tmp_path, spec_2_1=False)
    code, _, err = kfp_local_json(path, capsys=capsys)
    assert code == 2
    # apiserver/template/v2_template.go NewV2SpecTemplate, when the run is created.
    assert (
        "InvalidInputError: KFP only supports schema version 2.1.0, but the pipeline spec has "
        "version 2.0.0"
    ) in err
    assert not (tmp_path / "root" / "small").exists(), "no task may start"


def test_tfx_default_parameters_fail_at_the_first_driver_on_constant_value(tmp_path, capsys):
    # Even with the schema version the server wants, TFX's legacy `constantValue` parameters
    # fail at the driver: what use_pipeline_spec_2_1 changes besides the version.
    path = compile_small(tmp_path, spec_2_1=False)
    text = path.read_text()
    assert "constantValue" in text and "schemaVersion: 2.0.0" in text
    path.write_text(text.replace("schemaVersion: 2.0.0", "schemaVersion: 2.1.0"))
    code, outcome, err = kfp_local_json(path, capsys=capsys)
    assert code == 1
    assert (
        "param runtime value spec of type *pipelinespec.ValueOrRuntimeParameter_ConstantValue"
        in err
    )
    assert "not implemented" in err and 'taskName="NewDataGate"' in err
    record = run_record(tmp_path)
    assert [t["state"] for t in record["tasks"]] == ["failed", "omitted"]
    assert record["tasks"][0]["log"] is None, "the driver failed: no container started"
    assert outcome["reasons"][0] == "the run failed at NewDataGate"


@pytest.mark.slow
def test_stock_tfx_entrypoint_fails_on_the_launchers_executor_logs_output(tmp_path, capsys):
    path = compile_small(tmp_path, command=TFX_COMMAND)
    code, _, err = kfp_local_json(path, capsys=capsys)
    assert code == 1
    assert "Could not import system.Artifact" in err


@pytest.mark.slow
def test_stock_tfx_entrypoint_fails_on_the_untyped_inputs_the_driver_hands_it(tmp_path, capsys):
    path = compile_small(tmp_path, command=TFX_COMMAND)
    code, _, err = kfp_local_json(path, "--no-publish-logs", capsys=capsys)
    assert code == 1
    record = run_record(tmp_path)
    assert [t["state"] for t in record["tasks"]] == ["succeeded", "failed"]
    assert "task ServedModel failed" in err
    assert "AttributeError" in Path(record["tasks"][1]["log"]).read_text()
    assert "AttributeError: 'NoneType' object has no attribute 'get'" in err  # yaml of ""


@pytest.mark.slow
def test_our_entrypoint_runs_both_tasks_and_the_decision_arrives_as_metadata(tmp_path, capsys):
    path = compile_small(tmp_path)
    code, _, err = kfp_local_json(path, capsys=capsys)
    assert code == 0, err
    gate, served = run_record(tmp_path)["tasks"]
    assert gate["state"] == served["state"] == "succeeded"
    decision = gate["outputs"]["decision"]
    assert decision["schema_title"] == "tfx.File"
    properties = decision["custom_properties"]
    assert properties["new_data"] == 1.0 and properties["span"] == 1.0  # MLMD doubles
    assert properties["display_name"] == "decision"  # added by the launcher's RecordArtifact
    assert gate["outputs"]["executor-logs"]["schema_title"] == "system.Artifact"
    assert Path(gate["log"]).read_text(), "the executor's output is teed into executor-logs"
    model = served["outputs"]["model"]
    assert model["custom_properties"]["served_version"] == ""  # nothing served yet


# --------------------------------------------------------------------- driver and launcher rules


def executor_input_with(values: dict):
    """An ExecutorInput whose input artifact `d` carries `values`, as MLMD hands it back."""
    properties = {k: metadata.struct_value_to_mlmd(k, v) for k, v in _values(values).items()}
    stored = metadata.StoredArtifact(7, "decision", "/x", "title: tfx.File", properties)
    executor_input = pipeline_spec_pb2.ExecutorInput()
    executor_input.inputs.artifacts["d"].artifacts.append(metadata.runtime_artifact_of(stored))
    return executor_input


def _values(values: dict) -> dict:
    struct = json_format.ParseDict(values, pipeline_spec_pb2.RuntimeArtifact().metadata)
    return dict(struct.fields)


@pytest.mark.parametrize(("value", "expected"), [(1, True), (0, False)])
def test_condition_is_cel_over_the_executor_input_with_numbers_as_doubles(value, expected):
    executor_input = executor_input_with({"new_data": value})
    condition = "(inputs.artifacts['d'].artifacts[0].metadata['new_data'] == 1.0)"
    assert expression.evaluate_condition(executor_input, condition) is expected


def test_condition_errors_fail_the_task_like_the_driver():
    executor_input = executor_input_with({"new_data": 1})
    with pytest.raises(TaskFailed, match="evaluation error"):
        expression.evaluate_condition(executor_input, "inputs.artifacts['missing'].artifacts[0]")
    with pytest.raises(TaskFailed, match="return type is not bool"):
        expression.evaluate_condition(executor_input, "inputs.artifacts['d'].artifacts[0].uri")


def test_condition_may_parse_json_like_the_backends_cel_environment():
    executor_input = executor_input_with({"config": '{"k": [1, 2]}'})
    condition = "size(parseJson(inputs.artifacts['d'].artifacts[0].metadata['config']).k) == 2"
    assert expression.evaluate_condition(executor_input, condition)


def test_artifacts_come_back_from_mlmd_untyped_with_doubles_and_launcher_properties():
    stored = metadata.StoredArtifact(
        5,
        "examples",
        "/u",
        "title: tfx.Examples",
        {
            "span": metadata.struct_value_to_mlmd("span", _values({"span": 3})["span"]),
            "ok": metadata.struct_value_to_mlmd("ok", _values({"ok": True})["ok"]),
            "splits": metadata.struct_value_to_mlmd("splits", _values({"splits": ["a"]})["splits"]),
        },
    )
    artifact = json_format.MessageToDict(metadata.runtime_artifact_of(stored))
    assert artifact["name"] == "5" and artifact["type"] == {"instanceSchema": ""}
    assert artifact["metadata"] == {"span": 3.0, "ok": 1.0, "splits": {"list": ["a"]}}


def test_null_metadata_cannot_be_recorded_like_the_launcher():
    with pytest.raises(
        Exception, match=r"unknown/unsupported value type \*structpb.Value_NullValue"
    ):
        metadata.struct_value_to_mlmd("x", _values({"x": None})["x"])


def test_string_parameters_take_any_value_as_text_and_others_must_match():
    component = pipeline_spec_pb2.ComponentSpec()
    component.input_definitions.parameters["s"].parameter_type = 3  # STRING
    component.input_definitions.parameters["n"].parameter_type = 2  # NUMBER_INTEGER
    inputs = pipeline_spec_pb2.ExecutorInput.Inputs()
    inputs.parameter_values["s"].number_value = 1e-6
    inputs.parameter_values["n"].number_value = 6
    driver.validate_parameter_types(inputs, component)
    assert inputs.parameter_values["s"].string_value == "0.000001"  # strconv 'f', -1
    inputs.parameter_values["n"].string_value = "6"
    with pytest.raises(TaskFailed, match="type mismatch: expect NUMBER_INTEGER, got string"):
        driver.validate_parameter_types(inputs, component)


# ------------------------------------------------------------------- the entrypoint's repairs


def test_entrypoint_restores_input_types_and_hides_only_the_launchers_logs():
    stored = metadata.StoredArtifact(3, "decision", "/d", "title: tfx.File", {})
    executor_input = pipeline_spec_pb2.ExecutorInput()
    executor_input.inputs.artifacts["decision"].artifacts.append(
        metadata.runtime_artifact_of(stored)
    )
    logs = executor_input.outputs.artifacts["executor-logs"].artifacts.add(name="executor-logs")
    logs.type.schema_title = "system.Artifact"
    model = executor_input.outputs.artifacts["model"].artifacts.add(name="model")
    model.type.instance_schema = "title: tfx.Model\ntype: object\n"
    spec = {"artifacts": {"decision": {"artifactType": {"instanceSchema": "title: tfx.File\n"}}}}
    argv = [
        "--executor_class_path",
        "x.Y",
        "--json_serialized_invocation_args",
        json_format.MessageToJson(executor_input),
        "--json_serialized_inputs_spec_args",
        json.dumps(spec),
        "--runner=DirectRunner",
    ]
    repaired = kfp_entrypoint.repaired_argv(argv)
    result = json.loads(repaired[3])
    assert result["inputs"]["artifacts"]["decision"]["artifacts"][0]["type"] == {
        "instanceSchema": "title: tfx.File\n"
    }
    assert list(result["outputs"]["artifacts"]) == ["model"]
    assert repaired[:3] == argv[:3] and repaired[4:] == argv[4:]


def test_entrypoint_leaves_a_typed_vertex_style_input_alone():
    executor_input = {
        "inputs": {"artifacts": {"d": {"artifacts": [{"type": {"schemaTitle": "tfx.File"}}]}}},
        "outputs": {"artifacts": {}},
    }
    spec = {"artifacts": {"d": {"artifactType": {"instanceSchema": "title: tfx.Other\n"}}}}
    assert kfp_entrypoint.restore_input_types(executor_input, spec) == []
    assert not kfp_entrypoint.drop_launcher_logs_output(executor_input)


def test_compiled_spec_round_trips_as_yaml(tmp_path):
    path = compile_small(tmp_path)
    spec = yaml.safe_load(path.read_text())
    assert spec["schemaVersion"] == "2.1.0"
    assert "constantValue" not in path.read_text()


def spec_with_parameters(**types: int):
    """A PipelineSpec whose root declares parameters of the given ParameterType numbers."""
    spec = pipeline_spec_pb2.PipelineSpec()
    for name, parameter_type in types.items():
        spec.root.input_definitions.parameters[name].parameter_type = parameter_type
    return spec


def test_param_values_are_typed_as_the_spec_declares_them():
    from pipeline.kfp_backend.state import root_parameter_values

    spec = spec_with_parameters(s=3, f=1, i=2, b=4, l=5, d=6)
    given = {"s": "007", "f": "1e-3", "i": "12", "b": "True", "l": '[1, "a"]', "d": '{"k": 2}'}
    values = {
        name: json_format.MessageToDict(value)
        for name, value in root_parameter_values(spec, given).items()
    }
    assert values == {"s": "007", "f": 0.001, "i": 12.0, "b": True, "l": [1, "a"], "d": {"k": 2}}


@pytest.mark.parametrize(
    "name, text, says",
    [
        ("i", "1.5", "i is a NUMBER_INTEGER parameter; give a whole number"),
        ("i", "9" * 400, "give a whole number between"),
        ("i", "9007199254740993", "give a whole number between"),
        ("i", "1_000", "give a whole number between"),
        ("f", "1_000.5", "give a number"),
        ("f", "nan", "give a finite number"),
        ("f", "ten", "give a number"),
        ("b", "yes", "give true or false"),
        ("l", "{}", "give a JSON list"),
        ("d", "{oops", "give JSON"),
    ],
)
def test_a_param_that_is_not_of_its_declared_type_is_refused_naming_it(name, text, says):
    from pipeline.kfp_backend import KubeflowError
    from pipeline.kfp_backend.state import root_parameter_values

    types = {"f": 1, "i": 2, "b": 4, "l": 5, "d": 6}
    spec = spec_with_parameters(**{name: types[name]})
    with pytest.raises(KubeflowError, match=f"--param {name}=") as refused:
        root_parameter_values(spec, {name: text})
    assert says in str(refused.value)
