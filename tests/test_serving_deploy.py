"""Production manifests: generated from the config code, valid Kubernetes objects, and in sync."""

import json
import shlex

import pytest
import yaml
from google.protobuf import text_format
from kubernetes import client as k8s

from serving import manifests, protos
from van_tfx.config import Config

KINDS = {
    "Deployment": "V1Deployment",
    "Service": "V1Service",
    "ConfigMap": "V1ConfigMap",
    "PersistentVolumeClaim": "V1PersistentVolumeClaim",
}


class _JsonResponse:
    """ApiClient.deserialize reads `.data` of an HTTP response; hand it the manifest as JSON."""

    def __init__(self, obj):
        self.data = json.dumps(obj)


def load(name):
    obj = yaml.safe_load((manifests.DEPLOY_DIR / name).read_text())
    return k8s.ApiClient().deserialize(_JsonResponse(obj), KINDS[obj["kind"]])


def test_committed_manifests_equal_a_fresh_rendering():
    assert manifests.stale_manifests(Config()) == []
    assert sorted(p.name for p in manifests.DEPLOY_DIR.glob("*.yaml")) == sorted(
        manifests.render_manifests(Config())
    )


@pytest.mark.parametrize(
    ("file", "image", "gpus"),
    [
        ("deployment.yaml", "tensorflow/serving:2.16.1", None),
        ("deployment-gpu.yaml", "tensorflow/serving:2.16.1-gpu", "1"),
        ("deployment-pvc.yaml", "tensorflow/serving:2.16.1", None),
    ],
)
def test_deployments_are_valid_and_hardened(file, image, gpus):
    deployment = load(file)
    assert isinstance(deployment, k8s.V1Deployment)
    pod = deployment.spec.template.spec
    (container,) = pod.containers
    assert container.image == image
    assert "--port=8500" in container.args and "--rest_api_port=8501" in container.args
    assert any(a.startswith("--model_config_file=") for a in container.args)
    assert "--enable_batching=true" in container.args
    for probe in (container.readiness_probe, container.liveness_probe):
        assert probe.http_get.path == "/v1/models/van" and probe.http_get.port == 8501
    assert container.security_context.run_as_non_root is True
    assert container.security_context.read_only_root_filesystem is True
    assert (container.resources.limits or {}).get("nvidia.com/gpu") == gpus
    mounts = {m.mount_path: m.name for m in container.volume_mounts}
    volumes = {v.name: v for v in pod.volumes}
    assert volumes[mounts["/tmp"]].empty_dir is not None
    config_map = volumes[mounts[manifests.CONFIG_DIR]].config_map.name
    assert f"{config_map}.yaml".replace(
        "van-serving-config", "configmap"
    ) in manifests.render_manifests(Config())
    assert (
        deployment.spec.selector.match_labels.items()
        <= deployment.spec.template.metadata.labels.items()
    )


def test_cpu_deployments_take_the_configured_serving_image():
    # A oneDNN build of TF Serving (docs/serving.md) replaces the stock image on CPU nodes only.
    config = Config.model_validate({"serving": {"cpu_image": "registry.example/tf-serving:onednn"}})
    rendered = {f: yaml.safe_load(text) for f, text in manifests.render_manifests(config).items()}
    images = {
        f: obj["spec"]["template"]["spec"]["containers"][0]["image"]
        for f, obj in rendered.items()
        if obj["kind"] == "Deployment"
    }
    assert images == {
        "deployment.yaml": "registry.example/tf-serving:onednn",
        "deployment-pvc.yaml": "registry.example/tf-serving:onednn",
        "deployment-gpu.yaml": manifests.GPU_IMAGE,
    }


def test_config_maps_hold_text_protos_the_server_parses(tmp_path):
    config_map = load("configmap.yaml")
    models = text_format.Parse(config_map.data["models.config"], protos.ModelServerConfig())
    (entry,) = models.model_config_list.config
    assert entry.name == "van" and entry.base_path == Config().kubeflow.serving_base_path
    assert entry.model_version_policy.latest.num_versions == 1
    (tmp_path / "batching.config").write_text(config_map.data["batching.config"])
    assert protos.parse_batching_file(tmp_path / "batching.config") == manifests.PRODUCTION_BATCHING
    (tmp_path / "monitoring.config").write_text(config_map.data["monitoring.config"])
    assert (
        protos.parse_monitoring_file(tmp_path / "monitoring.config")
        == protos.DEFAULT_PROMETHEUS_PATH
    )
    pvc_models = text_format.Parse(
        load("configmap-pvc.yaml").data["models.config"], protos.ModelServerConfig()
    )
    assert pvc_models.model_config_list.config[0].base_path == "/models/van"


def test_service_exposes_grpc_and_http_to_every_variant():
    service = load("service.yaml")
    assert {(p.name, p.port) for p in service.spec.ports} == {("grpc", 8500), ("http", 8501)}
    for file in ("deployment.yaml", "deployment-gpu.yaml", "deployment-pvc.yaml"):
        labels = load(file).spec.template.metadata.labels
        assert service.spec.selector.items() <= labels.items()
    assert isinstance(load("pvc.yaml"), k8s.V1PersistentVolumeClaim)


def test_bad_config_files_name_the_file(tmp_path):
    bad = tmp_path / "models.config"
    bad.write_text("model_config_list { config { nme: 'x' } }")
    with pytest.raises(protos.ConfigFileError, match="models.config"):
        protos.parse_model_config_file(bad)
    with pytest.raises(protos.ConfigFileError, match="cannot read"):
        protos.parse_batching_file(tmp_path / "missing.config")


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (
            ["--set", "serving.top_k=0"],
            2,
            "van-tfx serving-manifests: invalid config: serving.top_k",
        ),
        (
            ["--out", "{blocker}/deploy"],
            1,
            "van-tfx serving-manifests: cannot write {blocker}/deploy: ",
        ),
    ],
    ids=["bad-config", "unwritable-out"],
)
def test_serving_manifests_fail_in_one_line(tmp_path, capsys, args, code, says):
    # Both were tracebacks.
    from van_tfx.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = [arg.format(blocker=blocker) for arg in args]
    assert main(["serving-manifests", *args]) == code
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(says.format(blocker=blocker))


def test_serving_manifests_check_names_the_command_that_rewrites_those_files(tmp_path, capsys):
    # Before: it said `van-tfx serving-manifests`, which rewrites serving/deploy instead.
    from van_tfx.cli import main

    out = tmp_path / "deploy dir"
    assert main(["serving-manifests", "--out", str(out)]) == 0
    check = ["serving-manifests", "--set", "serving.model_name=cats", "--out", str(out)]
    capsys.readouterr()
    assert main([*check, "--check"]) == 1
    hint = capsys.readouterr().out.strip().split("; run `")[1].rstrip("`")
    assert shlex.split(hint)[:2] == ["van-tfx", "serving-manifests"]
    assert main(shlex.split(hint)[1:]) == 0
    assert main([*check, "--check"]) == 0
