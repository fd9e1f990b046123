"""kfp-local against the open-source backend's Go source, one rule at a time, on hand-made specs.

Each spec here is the smallest one that shows a rule: its tasks are real subprocesses (`python -c`
scripts) run by `van-tfx kfp-local`, so what is checked is what the replay does end to end, not a
helper in isolation. The Go file each rule comes from is named beside its test
(kubeflow/pipelines `backend/src/v2` at the commit docs/kubeflow.md names).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.kfp_backend import metadata
from pipeline.kfp_spec import write_pipeline_spec
from van_tfx.cli import main

# Writes its ExecutorInput (the JSON after `--executor-input`) and its argv to <cwd>/seen.json.
RECORD_SCRIPT = (
    "import json, sys; args = sys.argv[1:]; "
    "open('seen.json', 'w').write(json.dumps({'argv': args}))"
)


def container_task(
    name: str, script: str, *, args=None, inputs=None, deps=None, outputs=None, params=None
):
    """One task, its component and its executor: `python -c script args...`."""
    component = {"executorLabel": f"exec-{name}"}
    if outputs:
        component["outputDefinitions"] = outputs
    if params:
        component["inputDefinitions"] = {"parameters": params}
    task = {"taskInfo": {"name": name}, "componentRef": {"name": f"comp-{name}"}}
    if inputs:
        task["inputs"] = inputs
    if deps:
        task["dependentTasks"] = deps
    executor = {"container": {"image": "python:3.10", "command": ["python", "-c", script]}}
    if args:
        executor["container"]["args"] = args
    return task, component, executor


def write_spec(tmp_path: Path, tasks: dict[str, tuple], root_inputs=None) -> Path:
    """A bare PipelineSpec YAML of the given container tasks, rooted under tmp_path/root."""
    spec = {
        "pipelineInfo": {"name": "rules"},
        "schemaVersion": "2.1.0",
        "sdkVersion": "hand-made",
        "defaultPipelineRoot": str(tmp_path / "root"),
        "root": {
            "dag": {"tasks": {}},
            **({"inputDefinitions": root_inputs} if root_inputs else {}),
        },
        "components": {},
        "deploymentSpec": {"executors": {}},
    }
    for name, (task, component, executor) in tasks.items():
        spec["root"]["dag"]["tasks"][name] = task
        spec["components"][f"comp-{name}"] = component
        spec["deploymentSpec"]["executors"][f"exec-{name}"] = executor
    path = tmp_path / "rules.yaml"
    write_pipeline_spec(spec, path)
    return path


def replay(path: Path, capsys, *extra: str) -> tuple[int, dict, str]:
    """`van-tfx kfp-local PATH --json --parallelism 1`: exit code, the run record, stderr."""
    code = main(["kfp-local", str(path), "--json", "--parallelism", "1", *extra])
    err = capsys.readouterr().err
    records = list((path.parent / "root" / "rules").glob("*/kfp_local_run.json"))
    record = json.loads(records[0].read_text()) if records else {}
    return code, record, err


def states(record: dict) -> dict[str, str]:
    """Each task's final state in a run record."""
    return {task["name"]: task["state"] for task in record["tasks"]}


ARTIFACT_OUT = {"artifacts": {"out": {"artifactType": {"schemaTitle": "system.Artifact"}}}}


# ------------------------------------------- apiserver/template: what the run request refuses


def test_a_spec_whose_schema_version_is_not_2_1_0_is_refused_before_any_task(tmp_path, capsys):
    path = write_spec(tmp_path, {"a": container_task("a", "pass")})
    path.write_text(path.read_text().replace("schemaVersion: 2.1.0", "schemaVersion: 2.0.0"))
    code, record, err = replay(path, capsys)
    assert code == 2 and not record
    assert (
        "InvalidInputError: KFP only supports schema version 2.1.0, but the pipeline spec has "
        "version 2.0.0: pipeline spec is invalid"
    ) in err


def test_a_pipeline_name_without_a_lower_case_alphanumeric_is_refused(tmp_path, capsys):
    # v2_template.go matches the name pattern unanchored: "Rules_1" passes (it has "ules"),
    # "__" does not.
    path = write_spec(tmp_path, {"a": container_task("a", "pass")})
    text = path.read_text()
    path.write_text(text.replace("name: rules", "name: Rules_1"))
    assert replay(path, capsys)[0] == 0
    path.write_text(text.replace("name: rules", "name: __"))
    code, _, err = replay(path, capsys)
    assert code == 2 and "name should consist of lower case alphanumeric characters" in err


# ------------------------------------------------------------ argocompiler/dag.go: dependencies


def test_a_task_waits_for_the_producer_of_its_input_even_if_dependent_tasks_omits_it(
    tmp_path, capsys
):
    # argocompiler/dag.go addImplicitDependencies (called first in DAG()): every producer of a
    # taskOutputArtifact/taskOutputParameter input becomes a dependency, whatever dependentTasks
    # says. Named so that a replay going by dependentTasks alone starts the consumer first.
    consume = {
        "artifacts": {
            "x": {"taskOutputArtifact": {"producerTask": "z-producer", "outputArtifactKey": "out"}}
        }
    }
    path = write_spec(
        tmp_path,
        {
            "a-consumer": container_task("a-consumer", "pass", inputs=consume),
            "z-producer": container_task("z-producer", "pass", outputs=ARTIFACT_OUT),
        },
    )
    code, record, err = replay(path, capsys)
    assert code == 0, err
    assert [t["name"] for t in record["tasks"]] == ["z-producer", "a-consumer"]
    assert states(record) == {"z-producer": "succeeded", "a-consumer": "succeeded"}


def test_an_input_from_a_task_that_is_not_in_the_dag_is_refused_when_the_run_is_created(
    tmp_path, capsys
):
    consume = {
        "artifacts": {
            "x": {"taskOutputArtifact": {"producerTask": "nowhere", "outputArtifactKey": "out"}}
        }
    }
    path = write_spec(tmp_path, {"a": container_task("a", "pass", inputs=consume)})
    code, record, err = replay(path, capsys)
    assert code == 2 and not record
    assert (
        'Failed to compile job: compiling DAG "root": failed to add implicit deps: unknown '
        'producer task "nowhere" in DAG'
    ) in err


# ------------------------------------------------- launcher_v2.go: output parameters from files

# Writes argv[2k+2] into the file argv[2k+1] with a plain open(): no directory is created.
WRITE_FILES = (
    "import sys; a = sys.argv[1:]\n"
    "for path, text in zip(a[::2], a[1::2]): open(path, 'w').write(text)"
)


def parameter_producer(values: dict[str, tuple[str, str]]):
    """A task declaring output parameters {name: (type, text its file gets)}."""
    args = []
    for name, (_kind, text) in values.items():
        args += [f"{{{{$.outputs.parameters['{name}'].output_file}}}}", text]
    outputs = {"parameters": {name: {"parameterType": k} for name, (k, _t) in values.items()}}
    return container_task("producer", WRITE_FILES, args=args, outputs=outputs)


def seen_by(tmp_path: Path, task: str) -> dict:
    """What a RECORD_SCRIPT task wrote about its invocation."""
    [seen] = (tmp_path / "root" / "rules").glob(f"*/{task}/*/seen.json")
    return json.loads(seen.read_text())


def test_output_parameter_files_are_read_with_gos_strconv_into_a_made_directory(tmp_path, capsys):
    # launcher_v2.go prepareOutputFolders makes each output file's directory before the command
    # runs; collectOutputParameters reads each file with metadata.TextToPbValue: ParseBool takes
    # "1" as true, ParseInt the trimmed " 7\n".
    producer = parameter_producer({"b": ("BOOLEAN", "1"), "n": ("NUMBER_INTEGER", " 7\n")})
    consume = {
        "parameters": {
            name: {"taskOutputParameter": {"producerTask": "producer", "outputParameterKey": name}}
            for name in ("b", "n")
        }
    }
    consumer = container_task(
        "consumer",
        RECORD_SCRIPT,
        args=["{{$.inputs.parameters['b']}}", "{{$.inputs.parameters['n']}}"],
        inputs=consume,
        deps=["producer"],
        params={"b": {"parameterType": "BOOLEAN"}, "n": {"parameterType": "NUMBER_INTEGER"}},
    )
    path = write_spec(tmp_path, {"producer": producer, "consumer": consumer})
    code, record, err = replay(path, capsys)
    assert code == 0, err
    assert seen_by(tmp_path, "consumer")["argv"] == ["true", "7"]


def test_an_integer_parameter_file_holding_a_float_fails_the_task(tmp_path, capsys):
    path = write_spec(tmp_path, {"producer": parameter_producer({"n": ("NUMBER_INTEGER", "1.0")})})
    code, record, err = replay(path, capsys)
    assert code == 1 and states(record) == {"producer": "failed"}
    assert 'failed to read output parameter name="n" type="NUMBER_INTEGER"' in err
    assert 'strconv.ParseInt: parsing "1.0": invalid syntax' in err


@pytest.mark.parametrize(
    ("kind", "text", "expected"),
    [
        ("NUMBER_INTEGER", "-12", -12.0),
        ("NUMBER_INTEGER", "1.0", 'strconv.ParseInt: parsing "1.0": invalid syntax'),
        ("NUMBER_INTEGER", "1_000", "invalid syntax"),
        ("NUMBER_INTEGER", str(2**63), "value out of range"),
        ("NUMBER_DOUBLE", " 2.5e3\n", 2500.0),
        ("NUMBER_DOUBLE", "0x1p-2", 0.25),
        ("NUMBER_DOUBLE", "1_000", 'strconv.ParseFloat: parsing "1_000": invalid syntax'),
        ("NUMBER_DOUBLE", "1e400", "value out of range"),
        ("BOOLEAN", "T", True),
        ("BOOLEAN", "0", False),
        ("BOOLEAN", "yes", 'strconv.ParseBool: parsing "yes": invalid syntax'),
        ("LIST", '[1, "a"]', [1.0, "a"]),
        ("LIST", '{"a": 1}', "unexpected type"),
        ("STRUCT", '{"a": 1, "a": 2}', "duplicate map key"),
        ("STRUCT", '{"a": NaN}', "invalid value NaN"),
        ("STRING", " as is\n", " as is\n"),
    ],
)
def test_text_to_value_follows_gos_strconv_and_protojson(kind, text, expected):
    from google.protobuf import json_format

    number = {"NUMBER_DOUBLE": 1, "NUMBER_INTEGER": 2, "STRING": 3, "BOOLEAN": 4, "LIST": 5,
              "STRUCT": 6}[kind]  # fmt: skip
    if isinstance(expected, str) and kind != "STRING":
        with pytest.raises(metadata.TextConversionError, match=re.escape(expected)):
            metadata.text_as_value(text, number)
    else:
        value = json_format.MessageToDict(metadata.text_as_value(text, number))
        assert value == expected


# ------------------------------------- driver/util.go + launcher_v2.go: command and args placeholders


def constant(value) -> dict:
    """A task input parameter given as `runtimeValue.constant`."""
    return {"runtimeValue": {"constant": value}}


def test_the_driver_fills_input_parameters_with_its_own_formatting_before_the_launcher(
    tmp_path, capsys
):
    # driver/util.go resolveContainerArgs (pbValueToString: %d for whole numbers, %g else, JSON
    # of a struct as encoding/json writes it) runs first; an arg naming `$.outputs` is left to
    # the launcher's getPlaceholders, which writes numbers with strconv 'f'.
    params = {"x": "NUMBER_DOUBLE", "big": "NUMBER_DOUBLE", "n": "NUMBER_INTEGER", "s": "STRUCT"}
    task = container_task(
        "a",
        RECORD_SCRIPT,
        args=[
            "{{$.inputs.parameters['x']}}",
            "{{$.inputs.parameters['big']}}",
            "n={{$.inputs.parameters['n']}}",
            "{{$.inputs.parameters['s']}}",
            "{{$.outputs.artifacts['out'].uri}} x={{$.inputs.parameters['x']}}",
        ],
        inputs={
            "parameters": {
                "x": constant(1e-05),
                "big": constant(1234567.5),
                "n": constant(3.0),
                "s": constant({"b": 1.0, "a": "<é>"}),
            }
        },
        outputs=ARTIFACT_OUT,
        params={name: {"parameterType": kind} for name, kind in params.items()},
    )
    path = write_spec(tmp_path, {"a": task})
    code, record, err = replay(path, capsys)
    assert code == 0, err
    out = record["tasks"][0]["outputs"]["out"]["uri"]
    assert seen_by(tmp_path, "a")["argv"] == [
        "1e-05",
        "1.2345675e+06",
        "n=3",
        '{"a":"\\u003cé\\u003e","b":1}',
        f"{out} x=0.00001",
    ]


def test_a_placeholder_of_a_parameter_that_only_has_a_default_fails_at_the_driver(tmp_path, capsys):
    # The launcher adds component defaults (addDefaultParams), but the driver's
    # resolveInputParameterPlaceholders runs before it, on the inputs the task was given.
    task = container_task(
        "a",
        RECORD_SCRIPT,
        args=["{{$.inputs.parameters['d']}}"],
        params={"d": {"parameterType": "STRING", "defaultValue": "fallback"}},
    )
    code, record, err = replay(write_spec(tmp_path, {"a": task}), capsys)
    assert code == 1 and states(record) == {"a": "failed"}
    assert (
        "failed to resolve container args: failed to resolve input parameters: "
        'parameter "d" not found in executor input'
    ) in err
    assert record["tasks"][0]["log"] is None, "the driver failed: no container started"


def test_if_present_takes_then_for_a_given_parameter_and_else_for_a_missing_one(tmp_path, capsys):
    # driver/util.go resolveCondition: only parameters count as present, a null one does not.
    task = container_task(
        "a",
        RECORD_SCRIPT,
        args=[
            json.dumps(
                {"IfPresent": {"InputName": "x", "Then": ["--x", "{{$.inputs.parameters['x']}}"]}}
            ),
            json.dumps({"IfPresent": {"InputName": "y", "Then": "--y", "Else": "--no-y"}}),
            json.dumps({"IfPresent": {"InputName": "y", "Then": "--y"}}),
        ],
        inputs={"parameters": {"x": constant("given")}},
        params={
            "x": {"parameterType": "STRING"},
            "y": {"parameterType": "STRING", "isOptional": True},
        },
    )
    code, record, err = replay(write_spec(tmp_path, {"a": task}), capsys)
    assert code == 0, err
    assert seen_by(tmp_path, "a")["argv"] == ["--x", "given", "--no-y"]


def test_the_launcher_fills_only_the_executor_input_into_the_first_element():
    # launcher_v2.go compileCmdAndArgs writes its placeholder loop's result for the command
    # into `cmd`, which it never uses: only `{{$}}` reaches the command itself.
    from kfp.pipeline_spec import pipeline_spec_pb2

    from pipeline.kfp_backend import launcher

    executor_input = pipeline_spec_pb2.ExecutorInput()
    executor_input.outputs.artifacts["o"].artifacts.add(uri="/bucket/o")
    uri = "{{$.outputs.artifacts['o'].uri}}"
    command = launcher.compiled_command([f"{uri}|{{{{$}}}}", uri], executor_input)
    assert command[0].startswith(f"{uri}|{{") and command[1] == "/bucket/o"


def test_a_struct_given_to_a_string_parameter_becomes_gos_json_of_it():
    # driver resolveInputs converts with metadata.PbValueToText: json.Marshal of the Struct.
    from kfp.pipeline_spec import pipeline_spec_pb2

    from pipeline.kfp_backend import driver

    component = pipeline_spec_pb2.ComponentSpec()
    component.input_definitions.parameters["s"].parameter_type = 3  # STRING
    inputs = pipeline_spec_pb2.ExecutorInput.Inputs()
    inputs.parameter_values["s"].struct_value.update({"z": [1.0, 0.5], "a": "x&y"})
    driver.validate_parameter_types(inputs, component)
    assert inputs.parameter_values["s"].string_value == '{"a":"x\\u0026y","z":[1,0.5]}'


# ------------------------------------------ driver/resolve.go: an optional root input left out


OPTIONAL_ROOT_INPUT = {"parameters": {"opt": {"parameterType": "STRING", "isOptional": True}}}
FROM_ROOT = {"parameters": {"opt": {"componentInputParameter": "opt"}}}


def test_an_optional_root_input_left_out_leaves_an_optional_parameter_to_its_default(
    tmp_path, capsys
):
    # argocompiler.Compile makes the left-out input null; resolveInputParameter answers
    # ErrResolvedParameterNull and resolveInputs skips the optional parameter, so the launcher's
    # addDefaultParams gives the component's default.
    task = container_task(
        "a",
        RECORD_SCRIPT,
        args=["{{$}}"],
        inputs=FROM_ROOT,
        params={"opt": {"parameterType": "STRING", "isOptional": True, "defaultValue": "dflt"}},
    )
    path = write_spec(tmp_path, {"a": task}, root_inputs=OPTIONAL_ROOT_INPUT)
    code, record, err = replay(path, capsys)
    assert code == 0, err
    [executor_input] = seen_by(tmp_path, "a")["argv"]
    assert json.loads(executor_input)["inputs"]["parameterValues"] == {"opt": "dflt"}


def test_an_optional_root_input_left_out_fails_a_task_that_requires_it(tmp_path, capsys):
    task = container_task(
        "a", RECORD_SCRIPT, inputs=FROM_ROOT, params={"opt": {"parameterType": "STRING"}}
    )
    path = write_spec(tmp_path, {"a": task}, root_inputs=OPTIONAL_ROOT_INPUT)
    code, record, err = replay(path, capsys)
    assert code == 1 and states(record) == {"a": "failed"}
    assert "failed to resolve inputs: the resolved input parameter is null: opt" in err


def test_create_and_schedule_time_placeholders_are_the_runs_creation_in_utc(tmp_path, capsys):
    # driver/resolve.go resolveInputParameter's switch; cmd/driver/main.go: a manual run's
    # schedule time falls back to its create time, RFC 3339 in UTC.
    names = ("create", "schedule")
    task = container_task(
        "a",
        RECORD_SCRIPT,
        args=[f"{{{{$.inputs.parameters['{name}']}}}}" for name in names],
        inputs={
            "parameters": {
                name: constant(f"{{{{$.pipeline_job_{name}_time_utc}}}}") for name in names
            }
        },
        params={name: {"parameterType": "STRING"} for name in names},
    )
    code, record, err = replay(write_spec(tmp_path, {"a": task}), capsys)
    assert code == 0, err
    created, scheduled = seen_by(tmp_path, "a")["argv"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", created) and scheduled == created


# -------------------------------------------------------------- driver: what a task is handed


def test_the_executor_input_json_has_gos_numbers(tmp_path, capsys):
    # The driver and launcher write `{{$}}` with protojson.Marshal: a whole number is `6`, so a
    # component that json.loads it gets an int, as on the cluster (json_format wrote 6.0).
    task = container_task(
        "a",
        RECORD_SCRIPT,
        args=["{{$}}"],
        inputs={"parameters": {"n": constant(6.0)}},
        params={"n": {"parameterType": "NUMBER_INTEGER"}},
    )
    code, record, err = replay(write_spec(tmp_path, {"a": task}), capsys)
    assert code == 0, err
    [executor_input] = seen_by(tmp_path, "a")["argv"]
    assert '"parameterValues":{"n":6}' in executor_input
    assert json.loads(executor_input)["inputs"]["parameterValues"]["n"] == 6


def test_a_task_without_a_task_info_name_fails_at_its_driver(tmp_path, capsys):
    # driver.go validateNonRoot, via container.go validateContainer.
    task, component, executor = container_task("a", RECORD_SCRIPT)
    del task["taskInfo"]
    code, record, err = replay(write_spec(tmp_path, {"a": (task, component, executor)}), capsys)
    assert code == 1 and states(record) == {"a": "failed"}
    assert "failed: invalid container driver args: task spec is required" in err


def test_the_log_artifact_is_qualified_with_the_retry_index_before_the_task_sees_it(
    tmp_path, capsys
):
    # launcher_v2.go qualifyExecutorLogsForRetry (PUBLISH_LOGS=true): `executor-logs-0` without
    # a retry, in the ExecutorInput the command gets and in what is recorded.
    task = container_task("a", RECORD_SCRIPT, args=["{{$}}"])
    code, record, err = replay(write_spec(tmp_path, {"a": task}), capsys)
    assert code == 0, err
    logs = record["tasks"][0]["outputs"]["executor-logs"]["uri"]
    assert logs.endswith("/executor-logs-0") and record["tasks"][0]["log"] == logs
    [executor_input] = seen_by(tmp_path, "a")["argv"]
    seen = json.loads(executor_input)["outputs"]["artifacts"]["executor-logs"]["artifacts"]
    assert seen[0]["uri"] == logs


def test_the_executor_sees_the_pods_name_and_uid_and_the_specs_env_over_them(tmp_path, capsys):
    # argocompiler/common.go commonEnvs (KFP_POD_NAME, KFP_POD_UID from field refs), under the
    # driver's podSpecPatch env (the container spec's `env`).
    script = (
        "import json, os; open('seen.json', 'w').write(json.dumps({k: os.environ.get(k) "
        "for k in ('KFP_POD_NAME', 'KFP_POD_UID', 'MINE')}))"
    )
    task, component, executor = container_task("a", script)
    executor["container"]["env"] = [{"name": "MINE", "value": "x"}]
    code, _, err = replay(write_spec(tmp_path, {"a": (task, component, executor)}), capsys)
    assert code == 0, err
    seen = seen_by(tmp_path, "a")
    assert seen["KFP_POD_NAME"] and seen["KFP_POD_UID"] and seen["MINE"] == "x"
