"""Kubeflow: compile to a KFP v2 PipelineSpec, submit/schedule requests, the container image."""

from __future__ import annotations

import json
import re
import shlex
import socket
from pathlib import Path

import pytest
import yaml

from van_tfx.cli import main
from van_tfx.config import load_config, save_config

REPO = Path(__file__).resolve().parents[1]
IMAGE = "registry.example.com/van-tfx:test"
PIPELINE_ROOT = "gs://test-bucket/van-tfx/root"
OVERRIDES = [
    "--set",
    f"kubeflow.pipeline_root={PIPELINE_ROOT}",
    "--set",
    "kubeflow.data_root=gs://test-bucket/van-tfx/data",
    "--set",
    "kubeflow.beam_args=[--runner=DataflowRunner, --project=test-project, --region=europe-west4]",
    "--set",
    "kubeflow.trainer_cpu=6",
    "--set",
    "kubeflow.trainer_memory_gb=24",
    "--set",
    "kubeflow.accelerator_type=NVIDIA_TESLA_T4",
]
EXPECTED_TASKS = {
    "NewDataGate",
    "ImportExampleGen",
    "EvalExampleGen",
    "StatisticsGen",
    "CuratedSchema",
    "ExampleValidator",
    "AnomaliesGate",
    "Transform",
    "ServedModel",
    "Trainer",
    "Evaluator",
    "ServingSmokeTest",
    "Pusher",
    "RecordRejection",
}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A fresh VAN_TFX_HOME for the module, its config.yaml holding OVERRIDES (what submit and
    schedule read when no --config is given)."""
    path = tmp_path_factory.mktemp("kf-home")
    save_config(load_config(overrides=OVERRIDES[1::2]), path / "config.yaml")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VAN_TFX_HOME", str(path))
        yield path


def compile_to(path: Path, *extra: str) -> dict:
    """Run `van-tfx compile` in-process and load the YAML it wrote."""
    assert main(["compile", "--output", str(path), "--image", IMAGE, *OVERRIDES, *extra]) == 0
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compiled(home, tmp_path_factory):
    """The pipeline compiled with 2 GPUs for the Trainer."""
    path = tmp_path_factory.mktemp("kf") / "pipeline.yaml"
    return path, compile_to(path, "--gpus", "2")


def constant(spec: dict, task: str, parameter: str):
    """A parameter the compiled spec passes to a task (`runtimeValue.constant`, spec 2.1)."""
    value = spec["root"]["dag"]["tasks"][task]["inputs"]["parameters"][parameter]
    return value["runtimeValue"]["constant"]


def executor(spec: dict, task: str) -> dict:
    """The container spec behind a task of the root DAG."""
    component = spec["root"]["dag"]["tasks"][task]["componentRef"]["name"]
    label = spec["components"][component]["executorLabel"]
    return spec["deploymentSpec"]["executors"][label]["container"]


# ------------------------------------------------------------------------------------- compile


def test_compiled_yaml_loads_with_kfp_pipeline_spec_proto(compiled):
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    path, spec = compiled
    proto = json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec())
    assert proto.pipeline_info.name == "van-tfx"
    assert "pipelineSpec" not in spec  # bare PipelineSpec, not the Vertex job wrapper
    assert path.read_text().startswith("# PIPELINE DEFINITION")


def test_compiled_dag_has_every_stage_in_order(compiled):
    _, spec = compiled
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == EXPECTED_TASKS
    assert "Transform" in tasks["Trainer"]["dependentTasks"]
    assert "Trainer" in tasks["Evaluator"]["dependentTasks"]
    assert {"Evaluator", "ServingSmokeTest"} <= set(tasks["Pusher"]["dependentTasks"])
    assert "Evaluator" in tasks["RecordRejection"]["dependentTasks"]


def test_every_trigger_condition_reads_an_input_of_its_own_task(compiled):
    # TFX's step builder named the decision '_NewDataGate.decision' in the first gated task's
    # condition even where that task takes it as 'decision'; the driver then fails the task.
    import re

    _, spec = compiled
    gated = 0
    for name, task in spec["root"]["dag"]["tasks"].items():
        condition = task.get("triggerPolicy", {}).get("condition", "")
        for key in re.findall(r"inputs\.artifacts\['([^']+)'\]", condition):
            assert key in task["inputs"]["artifacts"], (name, condition)
            gated += 1
    assert gated == len(EXPECTED_TASKS) - 1  # all but the gate


def test_only_the_steps_that_read_the_data_take_the_examples_artifact(compiled):
    # The open-source launcher downloads every input artifact into the pod: an Examples input is
    # a copy of the whole dataset, so only the steps that read every record may take it.
    _, spec = compiled

    def readers_of(producer: str) -> set[str]:
        return {
            name
            for name, task in spec["root"]["dag"]["tasks"].items()
            for source in task.get("inputs", {}).get("artifacts", {}).values()
            if source.get("taskOutputArtifact", {}).get("producerTask") == producer
        }

    assert readers_of("ImportExampleGen") == {"StatisticsGen", "Transform"}
    # The Evaluator reads only the eval split: it takes an Examples artifact holding only that.
    assert readers_of("EvalExampleGen") == {"Evaluator"}
    splits = spec["root"]["dag"]["tasks"]["EvalExampleGen"]["inputs"]["parameters"]
    assert '"name": "eval"' in splits["input_config"]["runtimeValue"]["constant"]
    assert '"name": "train"' not in splits["input_config"]["runtimeValue"]["constant"]


def test_spec_is_in_the_form_the_open_source_backend_reads(compiled):
    from pipeline.kfp_spec import load_pipeline_spec, resolver_tasks

    path, spec = compiled
    text = path.read_text()
    assert "constantValue" not in text, "the OSS driver accepts only runtimeValue.constant"
    assert spec["schemaVersion"] == "2.1.0"
    assert resolver_tasks(load_pipeline_spec(path)) == []
    for name, component in spec["components"].items():
        for parameter in component.get("inputDefinitions", {}).get("parameters", {}).values():
            assert "parameterType" in parameter and "type" not in parameter, name
    for label, executor in spec["deploymentSpec"]["executors"].items():
        container = executor["container"]
        assert container["command"] == ["python", "-m", "pipeline.kfp_entrypoint"], label
        assert "--json_serialized_inputs_spec_args" in container["args"], label


def test_spec_loads_with_kfps_and_vertex_ais_own_parsers(compiled):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import aiplatform
    from kfp.components import load_component_from_file

    path, _ = compiled
    assert load_component_from_file(str(path)).name == "van-tfx"
    job = aiplatform.PipelineJob(
        display_name="van-tfx",
        template_path=str(path),
        pipeline_root=PIPELINE_ROOT,
        project="test-project",
        location="us-central1",
        credentials=AnonymousCredentials(),
        enable_caching=False,
    )
    assert set(job.to_dict()["pipelineSpec"]["root"]["dag"]["tasks"]) == EXPECTED_TASKS


# What KubeflowV2DagRunner compiles `Cond(gate.outputs["decision"].future()[0]
# .custom_property("new_data") == 1)` into: a CEL expression over the task's inputs.
NEW_DATA_CONDITION = (
    "(inputs.artifacts['_NewDataGate.decision'].artifacts[0].metadata['new_data'] == 1.0)"
)


def test_every_step_after_the_gate_runs_only_when_it_saw_new_data(compiled):
    _, spec = compiled
    tasks = dict(spec["root"]["dag"]["tasks"])
    gate = tasks.pop("NewDataGate")
    assert "dependentTasks" not in gate and "triggerPolicy" not in gate
    assert "artifacts" not in gate["inputs"], "the gate reads the data root, not Examples"
    for name, task in tasks.items():
        condition = task["triggerPolicy"]["condition"]
        assert condition.endswith("artifacts[0].metadata['new_data'] == 1.0)"), name
        assert "NewDataGate" in task["dependentTasks"]
    assert tasks["Trainer"]["triggerPolicy"]["condition"] == NEW_DATA_CONDITION


def test_gate_is_never_cached_and_compares_with_the_serving_path(compiled):
    _, spec = compiled
    gate = spec["root"]["dag"]["tasks"]["NewDataGate"]
    assert gate["cachingOptions"] == {"enableCache": False}
    assert spec["root"]["dag"]["tasks"]["Trainer"]["cachingOptions"] == {"enableCache": True}
    serving = constant(spec, "NewDataGate", "serving_base_path")
    assert serving == load_config().kubeflow.serving_base_path
    assert constant(spec, "NewDataGate", "input_base") == "gs://test-bucket/van-tfx/data"
    assert constant(spec, "NewDataGate", "force") == 0


def test_retrain_on_same_data_forces_the_gate_open(home, tmp_path):
    spec = compile_to(tmp_path / "p.yaml", "--set", "retrain_on_same_data=true")
    assert constant(spec, "NewDataGate", "force") == 1


def test_every_container_runs_our_image(compiled):
    _, spec = compiled
    containers = [
        e["container"] for e in spec["deploymentSpec"]["executors"].values() if "container" in e
    ]
    assert len(containers) >= len(EXPECTED_TASKS)
    assert {c["image"] for c in containers} == {IMAGE}


def test_trainer_requests_gpus_cpu_and_memory(compiled):
    _, spec = compiled
    resources = executor(spec, "Trainer")["resources"]
    assert resources["accelerator"] == {"type": "NVIDIA_TESLA_T4", "count": "2"}
    assert resources["cpuLimit"] == 6 and resources["cpuRequest"] == 6
    assert resources["memoryLimit"] == 24 and resources["memoryRequest"] == 24
    assert "resources" not in executor(spec, "Transform")  # only the Trainer asks for GPUs


@pytest.mark.parametrize("task", ["Transform", "StatisticsGen", "Evaluator"])
def test_beam_steps_carry_the_beam_args(compiled, task):
    _, spec = compiled
    args = executor(spec, task)["args"]
    for expected in ("--runner=DataflowRunner", "--project=test-project", "--region=europe-west4"):
        assert expected in args
    assert "--direct_running_mode=multi_processing" not in args  # the local args stay local
    # Dataflow's workers run our image (TFX and our code, Beam's boot), not a staged TFX sdist.
    assert [a for a in args if a.startswith("--sdk_container_image")] == [
        f"--sdk_container_image={IMAGE}"
    ]


def test_pipeline_root_is_the_spec_default(compiled):
    _, spec = compiled
    assert spec["defaultPipelineRoot"] == PIPELINE_ROOT


def test_schema_comes_from_the_image_and_the_ingested_span(compiled):
    _, spec = compiled
    assert constant(spec, "CuratedSchema", "schema_file") == ""  # the one shipped in the image
    assert constant(spec, "CuratedSchema", "input_base") == "gs://test-bucket/van-tfx/data"
    assert constant(spec, "CuratedSchema", "split_pattern") == "span-{SPAN}/train-*"
    assert str(REPO) not in json.dumps(spec)


def test_a_local_schema_file_is_refused_for_the_cluster(home, tmp_path, capsys):
    schema = tmp_path / "schema.pbtxt"
    schema.write_text("")
    code = main(
        ["compile", "--output", str(tmp_path / "p.yaml"), "--set", f"data.schema_path={schema}"]
    )
    assert code == 2
    assert f"data.schema_path {schema} is a file on this machine the cluster cannot see" in (
        capsys.readouterr().err
    )


def test_compiling_with_placeholders_left_warns_naming_the_settings(home, tmp_path, capsys):
    # Before: the default config's gs://YOUR_BUCKET paths and --project=YOUR_PROJECT were
    # compiled without a word, to fail only in the cluster's pods.
    path = tmp_path / "p.yaml"
    assert main(["compile", "--output", str(path), *OVERRIDES]) == 0
    err = capsys.readouterr().err
    assert "YOUR_BUCKET" in path.read_text()
    assert f"warning: {path} holds placeholders no cluster can use" in err
    assert "from kubeflow.serving_base_path: set them in your --config" in err
    root = "--set=kubeflow.serving_base_path=gs://test-bucket/serving/van"
    assert main(["compile", "--output", str(path), *OVERRIDES, root]) == 0
    assert "YOUR_" not in path.read_text()
    assert "warning" not in capsys.readouterr().err
    assert main(["compile", "--output", str(path), *OVERRIDES, root, "--vertex-training"]) == 0
    assert "from kubeflow.vertex_project:" in capsys.readouterr().err
    # What submit would send, compiled here or given, is checked the same way.
    assert main(["submit", "--config", str(home / "config.yaml"), "--dry-run"]) == 0
    assert "holds placeholders no cluster can use (YOUR_BUCKET)" in capsys.readouterr().err
    assert main(["submit", "--pipeline", str(path), "--dry-run"]) == 0  # the Vertex one above
    assert "holds placeholders no cluster can use (YOUR_PROJECT)" in capsys.readouterr().err


def test_compiling_reads_and_writes_no_data_root(home, tmp_path, monkeypatch):
    # A data root that holds spans and a synsets.txt, readable and writable from here: the
    # compiled spec must not depend on it, and nothing may be written into it.
    data = tmp_path / "data"
    (data / "span-1").mkdir(parents=True)
    (data / "span-1" / "synsets.txt").write_text("a\nb\n")
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    monkeypatch.chdir(tmp_path)
    spec = compile_to(tmp_path / "p.yaml", "--set", f"kubeflow.data_root={data}")
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before
    assert constant(spec, "CuratedSchema", "num_classes") == 0  # counted in the pod, per span


def test_zero_gpus_means_no_accelerator(home, tmp_path):
    spec = compile_to(tmp_path / "cpu.yaml", "--gpus", "0")
    resources = executor(spec, "Trainer")["resources"]
    assert "accelerator" not in resources
    assert resources["cpuLimit"] == 6


def test_vertex_training_carries_the_worker_pool_spec(home, tmp_path):
    spec = compile_to(
        tmp_path / "vertex.yaml",
        "--gpus",
        "1",
        "--vertex-training",
        "--set",
        "kubeflow.training_workers=3",
        "--set",
        "kubeflow.vertex_project=test-project",
    )
    trainer = executor(spec, "Trainer")
    assert (
        "tfx.extensions.google_cloud_ai_platform.trainer.executor.GenericExecutor"
        in trainer["args"]
    )
    assert "accelerator" not in trainer.get("resources", {})  # the launcher pod needs no GPU
    custom = json.loads(constant(spec, "Trainer", "custom_config"))
    assert custom["ai_platform_enable_vertex"] is True
    job = custom["ai_platform_training_args"]
    assert job["project"] == "test-project"
    chief, workers = job["job_spec"]["worker_pool_specs"]
    assert chief["replica_count"] == 1 and workers["replica_count"] == 2
    for pool in (chief, workers):
        assert pool["container_spec"]["image_uri"] == IMAGE
        assert pool["machine_spec"]["accelerator_type"] == "NVIDIA_TESLA_T4"
        assert pool["machine_spec"]["accelerator_count"] == 1
    assert custom["model"]["variant"] == "b0"  # the stage config still reaches run_fn


def thresholds(spec: dict) -> list[dict]:
    """The Evaluator's top-1 threshold(s) as compiled into its eval_config."""
    eval_config = json.loads(constant(spec, "Evaluator", "eval_config"))
    return [
        per_slice["threshold"]
        for metrics_spec in eval_config["metrics_specs"]
        for metric in metrics_spec["metrics"]
        for per_slice in metric.get("per_slice_thresholds", [])
    ]


def test_baseline_and_warm_start_are_the_served_model_without_a_resolver(compiled):
    _, spec = compiled
    tasks = spec["root"]["dag"]["tasks"]
    served = {"taskOutputArtifact": {"outputArtifactKey": "model", "producerTask": "ServedModel"}}
    assert tasks["Trainer"]["inputs"]["artifacts"]["base_model"] == served
    assert tasks["Evaluator"]["inputs"]["artifacts"]["baseline_model"] == served
    assert (
        constant(spec, "ServedModel", "serving_base_path")
        == load_config().kubeflow.serving_base_path
    )
    [threshold] = thresholds(spec)
    assert threshold["value_threshold"]["lower_bound"] == 0.5  # eval.min_top1
    assert threshold["change_threshold"]["absolute"] == -0.01  # eval.max_top1_drop
    evaluator = executor(spec, "Evaluator")
    assert "components.served_model.ServedBaselineEvaluator" in evaluator["args"]


def test_pusher_pushes_above_every_existing_version(compiled):
    # TFX's own executor names the version by the clock (never served below a higher version).
    _, spec = compiled
    assert "components.pusher.NewVersionPusher" in executor(spec, "Pusher")["args"]


def test_compile_rejects_a_json_output(home, tmp_path, capsys):
    assert main(["compile", "--output", str(tmp_path / "p.json")]) == 2
    assert "must end in .yaml" in capsys.readouterr().err


# -------------------------------------------------------------------------------------- submit


def closed_port() -> int:
    """A 127.0.0.1 port nothing listens on (bound once, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_submit_dry_run_prints_the_call_and_contacts_nothing(compiled, capsys):
    path, _ = compiled
    host = f"http://127.0.0.1:{closed_port()}"  # would fail if contacted
    code = main(
        ["submit", "--pipeline", str(path), "--host", host, "--run-name", "nightly-1", "--dry-run"]
    )
    assert code == 0
    out = capsys.readouterr()
    request = json.loads(out.out)
    assert request["host"] == host
    (call,) = request["calls"]
    assert call["method"] == "create_run_from_pipeline_package"
    assert call["kwargs"]["pipeline_file"] == str(path)
    assert call["kwargs"]["run_name"] == "nightly-1"
    assert call["kwargs"]["experiment_name"] == "van-tfx"
    assert call["kwargs"]["pipeline_root"] == PIPELINE_ROOT
    # kfp's client writes a non-None enable_caching into every task (_override_caching_options):
    # True would cache the gate, whose inputs never change, and replay its first decision.
    assert call["kwargs"]["enable_caching"] is None
    assert "resolver" not in out.err  # no resolver: nothing open-source KFP would refuse


def test_submit_warns_about_a_spec_the_open_source_api_server_refuses(compiled, tmp_path, capsys):
    # TFX's own KubeflowV2DagRunner writes schemaVersion 2.0.0, which Vertex runs and the
    # open-source API server refuses when the run is created (v2_template.go).
    path, spec = compiled
    old = tmp_path / "schema-2.0.0.yaml"
    old.write_text(yaml.safe_dump({**spec, "schemaVersion": "2.0.0"}))
    host = f"http://127.0.0.1:{closed_port()}"
    assert main(["submit", "--pipeline", str(old), "--host", host, "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert f"warning: open-source KFP's API server refuses {old} when the run is created" in err
    assert "KFP only supports schema version 2.1.0, but the pipeline spec has version 2.0.0" in err
    assert main(["submit", "--pipeline", str(path), "--host", host, "--dry-run"]) == 0
    assert "API server refuses" not in capsys.readouterr().err


@pytest.mark.parametrize("command", ["submit", "schedule"])
def test_a_given_package_runs_under_its_own_pipeline_root(home, tmp_path, capsys, command):
    # Before: the config's root was sent, overriding the package's (gs://YOUR_BUCKET/... when
    # the home config was not the one compiled with).
    path = tmp_path / "other.yaml"
    compile_to(path, "--set", "kubeflow.pipeline_root=gs://other-bucket/root")
    trigger = ["--cron", "0 0 3 * * *"] if command == "schedule" else []
    capsys.readouterr()  # compile's own lines
    assert main([command, "--pipeline", str(path), *trigger, "--dry-run"]) == 0
    call = json.loads(capsys.readouterr().out)["calls"][-1]
    assert call["kwargs"]["pipeline_root"] == "gs://other-bucket/root"


def test_submit_to_an_unreachable_host_fails_in_one_line(compiled, capsys):
    path, _ = compiled
    host = f"http://127.0.0.1:{closed_port()}"
    code = main(["submit", "--pipeline", str(path), "--host", host, "--timeout", "2"])
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("van-tfx")]
    assert errors == [
        f"van-tfx submit: cannot reach Kubeflow Pipelines at {host}: Connection refused"
    ]


def test_submit_without_host_says_how_to_give_one(compiled, capsys, monkeypatch):
    monkeypatch.delenv("KFP_HOST", raising=False)
    path, _ = compiled
    assert main(["submit", "--pipeline", str(path)]) == 2
    assert "pass --host URL or set KFP_HOST" in capsys.readouterr().err


def test_submit_refuses_a_file_that_is_not_a_pipeline_spec(home, tmp_path, capsys):
    bogus = tmp_path / "bogus.yaml"
    bogus.write_text("hello: world\n")
    assert main(["submit", "--pipeline", str(bogus), "--dry-run"]) == 2
    assert "not a KFP PipelineSpec" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ schedule


def test_schedule_dry_run_requests_one_run_at_a_time_without_catchup(compiled, capsys):
    path, _ = compiled
    code = main(["schedule", "--pipeline", str(path), "--cron", "0 0 3 * * *", "--dry-run"])
    assert code == 0
    experiment, recurring = json.loads(capsys.readouterr().out)["calls"]
    assert experiment == {
        "method": "create_experiment",
        "kwargs": {"name": "van-tfx", "namespace": None},
    }
    assert recurring["method"] == "create_recurring_run"
    kwargs = recurring["kwargs"]
    assert kwargs["cron_expression"] == "0 0 3 * * *"
    assert "interval_second" not in kwargs
    assert kwargs["max_concurrency"] == 1 and kwargs["no_catchup"] is True
    assert kwargs["pipeline_package_path"] == str(path)
    assert kwargs["job_name"] == "van-tfx-retrain"
    assert kwargs["enable_caching"] is None  # the gate keeps its enableCache: false


def test_schedule_by_interval(compiled, capsys):
    path, _ = compiled
    assert main(["schedule", "--pipeline", str(path), "--interval", "3600", "--dry-run"]) == 0
    kwargs = json.loads(capsys.readouterr().out)["calls"][1]["kwargs"]
    assert kwargs["interval_second"] == 3600 and "cron_expression" not in kwargs


@pytest.mark.parametrize(
    ("cron", "message"),
    [
        ("0 3 * * *", "has 5 fields; KFP needs 6"),
        ("0 0 3 * *", "did you mean '0 0 0 3 * *'?"),
        ("0 0 3 * * * *", "has 7 fields"),
        ("0 0 3 * * mon;", "day-of-week field 'mon;' is not valid cron"),
    ],
)
def test_schedule_rejects_bad_cron_clearly(compiled, capsys, cron, message):
    path, _ = compiled
    assert main(["schedule", "--pipeline", str(path), "--cron", cron, "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_schedule_needs_a_trigger(compiled, capsys):
    path, _ = compiled
    assert main(["schedule", "--pipeline", str(path), "--dry-run"]) == 2
    assert "--cron" in capsys.readouterr().err


@pytest.mark.parametrize("action", [["list"], ["disable", "job-123"]])
def test_schedule_helpers_fail_clearly_on_unreachable_host(home, capsys, action):
    host = f"http://127.0.0.1:{closed_port()}"
    assert main(["schedule", *action, "--host", host, "--timeout", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith(f"cannot reach Kubeflow Pipelines at {host}: Connection refused")


# ---------------------------------------------------------------------------- image and configs


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def test_dockerfile_uses_python_310_the_lock_and_legacy_keras():
    instructions = dockerfile_instructions()
    args = " ".join(a for i, a in instructions if i == "ARG")
    assert "PYTHON_IMAGE=python:3.10" in args
    runs = [a for i, a in instructions if i == "RUN"]
    assert any("uv sync --frozen --no-dev" in r for r in runs)
    env = " ".join(a for i, a in instructions if i == "ENV")
    assert "TF_USE_LEGACY_KERAS=1" in env
    assert "UV_PROJECT_ENVIRONMENT=/opt/venv" in env  # where kubeflow.IMAGE_SITE_PACKAGES points
    users = [a for i, a in instructions if i == "USER"]
    assert users and users[-1] not in ("root", "0")


def test_dockerfile_copies_only_files_that_exist_and_every_package():
    copied = []
    for instruction, arguments in dockerfile_instructions():
        if instruction == "COPY" and "--from" not in arguments:
            copied += shlex.split(arguments)[:-1]
    for source in copied:
        assert (REPO / source).exists(), source
    pyproject = (REPO / "pyproject.toml").read_text()
    packages = re.search(r"packages = \[(.*?)\]", pyproject).group(1)
    for package in re.findall(r'"(\w+)"', packages):
        assert package in copied, f"{package} is packaged but not copied into the image"
    assert "uv.lock" in copied


def test_dockerfile_cuda_pins_match_tensorflow_and_cuda_extra():
    from importlib.metadata import requires

    pins = {
        r.split(";")[0].replace(" ", "")
        for r in requires("tensorflow")
        if "and-cuda" in r and r.startswith("nvidia-")
    }
    text = (REPO / "Dockerfile").read_text()
    assert pins and all(pin in text for pin in pins)


def test_dockerfile_ships_the_tensorflow_model_server_production_serves():
    from importlib.metadata import version

    from serving.manifests import CPU_IMAGE, TF_SERVING_VERSION

    instructions = dockerfile_instructions()
    args = dict(a.split("=", 1) for i, a in instructions if i == "ARG" and "=" in a)
    stages = [a.split() for i, a in instructions if i == "FROM"]
    # The first stage is the tensorflow/serving image of the serving version (TF 2.16 -> 2.16.1).
    assert stages[0][0] == "${TF_SERVING_IMAGE}" and stages[0][1:] == ["AS", "tf_serving"]
    assert args["TF_SERVING_IMAGE"] == CPU_IMAGE == f"tensorflow/serving:{TF_SERVING_VERSION}"
    assert TF_SERVING_VERSION == version("tensorflow-serving-api")
    copies = [shlex.split(a) for i, a in instructions if i == "COPY" and "--from=tf_serving" in a]
    assert copies == [
        ["--from=tf_serving", "/usr/bin/tensorflow_model_server", "/usr/local/bin/"
         "tensorflow_model_server"]
    ]  # fmt: skip
    copied_at = instructions.index(("COPY", " ".join(copies[0])))
    assert ("RUN", "tensorflow_model_server --version") in instructions[copied_at:]
    # Copied into the final stage (after its FROM), before the image drops root.
    final_from = max(n for n, (i, _) in enumerate(instructions) if i == "FROM")
    user_at = max(n for n, (i, _) in enumerate(instructions) if i == "USER")
    assert final_from < copied_at < user_at


def test_dockerfile_is_a_beam_worker_image_for_the_locked_beam_and_python():
    from importlib.metadata import version

    instructions = dockerfile_instructions()
    args = dict(a.split("=", 1) for i, a in instructions if i == "ARG" and "=" in a)
    beam = version("apache-beam")
    assert args["BEAM_SDK_IMAGE"] == f"apache/beam_python3.10_sdk:{beam}"
    assert ["${BEAM_SDK_IMAGE}", "AS", "beam_sdk"] in [
        a.split() for i, a in instructions if i == "FROM"
    ]
    final_from = max(n for n, (i, _) in enumerate(instructions) if i == "FROM")
    copied_at = instructions.index(("COPY", "--from=beam_sdk /opt/apache/beam /opt/apache/beam"))
    assert copied_at > final_from
    # Dataflow starts workers through the image's entrypoint; KFP, Vertex and TFJobs set a command.
    assert [a for i, a in instructions if i == "ENTRYPOINT"] == ['["/opt/apache/beam/boot"]']
    assert not [a for i, a in instructions if i == "CMD"]
    env = " ".join(a for i, a in instructions if i == "ENV")
    assert "RUN_PYTHON_SDK_IN_DEFAULT_ENVIRONMENT=1" in env  # else boot's venv hides /opt/venv
    tfjob = (REPO / "configs" / "tfjob-trainer.example.yaml").read_text()
    assert "command:" in tfjob


def test_dockerignore_keeps_local_state_out():
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", "van_tfx_home", ".git"} <= set(ignored)


def test_example_config_validates():
    config = load_config(REPO / "configs" / "kubeflow.example.yaml")
    assert config.kubeflow.gpus == 1
    assert config.kubeflow.training_workers == 4


def test_tfjob_example_has_one_chief_and_workers_on_our_image():
    docs = list(yaml.safe_load_all((REPO / "configs" / "tfjob-trainer.example.yaml").read_text()))
    tfjob = next(d for d in docs if d and d.get("kind") == "TFJob")
    replicas = tfjob["spec"]["tfReplicaSpecs"]
    assert replicas["Chief"]["replicas"] == 1 and replicas["Worker"]["replicas"] >= 1
    for spec in replicas.values():
        container = spec["template"]["spec"]["containers"][0]
        assert container["name"] == "tensorflow"  # the training operator injects TF_CONFIG here
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["TF_USE_LEGACY_KERAS"] == "1"


def test_compiling_leaves_a_new_home_without_a_config(tmp_path, monkeypatch):
    # It saved the Kubeflow config (gs:// paths, b0 for 30 epochs) as the home's config.yaml,
    # which the next local `van-tfx demo` then ran instead of the demo profile.
    monkeypatch.setenv("VAN_TFX_HOME", str(tmp_path / "home"))
    compile_to(tmp_path / "p.yaml")
    assert not (tmp_path / "home" / "config.yaml").exists()


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_kfp_local_refuses_a_parallelism_below_one_naming_it(tmp_path, capsys, value):
    # Before: 0 ran with the CPU count and -2 with one task at a time, unannounced.
    with pytest.raises(SystemExit) as exited:
        main(["kfp-local", str(tmp_path / "p.yaml"), "--parallelism", value])
    assert exited.value.code == 2
    assert "argument --parallelism: " in capsys.readouterr().err


@pytest.mark.parametrize("command", [["submit"], ["schedule", "list"]])
@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_kfp_host_timeouts_must_be_positive_seconds(capsys, command, value):
    # Before: 0 reported the host unreachable ("Operation now in progress").
    with pytest.raises(SystemExit) as exited:
        main([*command, "--host", "http://127.0.0.1:1", "--timeout", value])
    assert exited.value.code == 2
    assert "argument --timeout: " in capsys.readouterr().err
