"""Version discovery and load retries like TF Serving: safe_strto64 names, the child dir as listed,
LoaderHarness retries, unloading when no version is left, and reload/status errors."""

import os
import shutil

import grpc
import pytest
from model_dirs import push, wait_for
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
)

from serving import testing
from serving.errors import ServingError
from serving.manager import INT64_MAX, INT64_MIN, ModelManager, parse_version
from serving.protos import ModelConfig
from serving.server import ModelServer, ServerOptions

LOADING, AVAILABLE, END = 20, 30, 50
DATA_LOSS, INVALID_ARGUMENT = 15, 3


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One exported version dir to copy around (export costs seconds; copying is instant)."""
    root = tmp_path_factory.mktemp("export")
    return testing.export(testing.build_tiny_model(), str(root), 1)


def push_half(base, exported, name):
    """A push caught mid-copy: every file there, but saved_model.pb only half written."""
    target = os.path.join(base, name)
    shutil.copytree(exported, target)
    with open(os.path.join(exported, "saved_model.pb"), "rb") as f:
        data = f.read()
    with open(os.path.join(target, "saved_model.pb"), "wb") as f:
        f.write(data[: len(data) // 2])


def config(name, base):
    entry = ModelConfig(name=name, base_path=str(base), model_platform="tensorflow")
    entry.model_version_policy.latest.num_versions = 1
    return entry


def manager(*configs, **kwargs):
    options = dict(poll_wait_seconds=0.05, enable_warmup=True)
    options.update(kwargs)
    return ModelManager(list(configs), **options)


@pytest.mark.parametrize(
    "name, version",
    [
        ("7", 7),
        ("007", 7),
        (" 7\t", 7),  # safe_strto64 skips surrounding whitespace
        ("-3", -3),  # and takes a leading '-'
        (str(INT64_MAX), INT64_MAX),
        (str(INT64_MIN), INT64_MIN),
        (str(INT64_MAX + 1), None),
        ("99999999999999999999", None),
        ("+3", None),
        ("²", None),  # Unicode digits are not ASCII digits
        ("٣", None),
        ("", None),
        ("-", None),
        ("7a", None),
        ("1 2", None),
    ],
)
def test_version_names_are_read_as_safe_strto64(name, version):
    assert parse_version(name) == version


def test_the_demo_and_loadtest_read_version_names_as_the_server_does(tmp_path):
    # Both had their own str.isdigit listing: "²" passes it and then int("²") raised.
    from pipeline.demo import latest_version
    from serving.loadtest import next_version

    for name in ("²", "٣", "99999999999999999999", "0012", "9", "notes"):
        (tmp_path / name).mkdir()
    (tmp_path / "0012" / "saved_model.pb").write_bytes(b"")
    assert latest_version(tmp_path) == 12  # 9 holds no saved_model.pb: not loadable yet
    assert next_version(str(tmp_path)) == 13
    assert latest_version(tmp_path / "missing") is None
    assert next_version(str(tmp_path / "missing")) == 1


def test_odd_dir_names_never_stop_discovery_and_leading_zeros_load_from_the_dir(tmp_path, exported):
    for name in ("99999999999999999999", "²"):  # out of int64 range; a Unicode digit
        push(tmp_path / "van", exported, name)
    push(tmp_path / "van", exported, "007")
    push(tmp_path / "other", exported, "1")
    models = manager(config("van", tmp_path / "van"), config("other", tmp_path / "other"))
    try:
        models.poll_once()
        served = models.resolve("van")
        assert served.version == 7 and served.path.endswith(os.sep + "007")
        assert [(s.version, s.state) for s in models.status("van")] == [(7, AVAILABLE)]
        assert models.resolve("other").version == 1  # the other model is discovered too
        push(tmp_path / "van", exported, "8")  # later pushes are still aspired
        models.poll_once()
        assert models.resolve("van").version == 8
    finally:
        models.stop()


def test_a_push_caught_mid_copy_is_retried_and_loads_once_complete(tmp_path, exported):
    push(tmp_path, exported, "1")
    models = manager(
        config("van", tmp_path), max_num_load_retries=5, load_retry_interval_seconds=0.3
    )
    try:
        models.poll_once()
        push_half(tmp_path, exported, "2")
        models.poll_once()
        assert models.status("van", 2)[0].state == LOADING  # retrying, as LoaderHarness does
        assert models.resolve("van").version == 1
        shutil.copy(os.path.join(exported, "saved_model.pb"), tmp_path / "2")  # the copy ends
        models.start_polling()
        wait_for(lambda: models.resolve("van").version == 2)
        assert models.status("van", 2)[0].state == AVAILABLE
    finally:
        models.stop()


def test_retries_run_without_file_system_polling(tmp_path, exported):
    push_half(tmp_path, exported, "1")
    models = manager(config("van", tmp_path), poll_wait_seconds=0, load_retry_interval_seconds=0.2)
    try:
        models.poll_once()
        models.start_polling()
        shutil.copy(os.path.join(exported, "saved_model.pb"), tmp_path / "1")
        wait_for(lambda: models.resolve("van").version == 1)
    finally:
        models.stop()


def test_a_version_that_gave_up_reports_its_status_and_a_re_push_loads_fresh(tmp_path, exported):
    push(tmp_path, exported, "1")
    models = manager(config("van", tmp_path), max_num_load_retries=1, load_retry_interval_seconds=0)
    try:
        models.poll_once()
        push_half(tmp_path, exported, "2")
        models.poll_once()  # first attempt
        assert models.status("van", 2)[0].state == LOADING
        models.poll_once()  # the one retry
        failure = models.status("van", 2)[0]
        assert (failure.state, failure.error_code) == (END, DATA_LOSS)  # the loader's status
        assert "saved_model.pb" in failure.error
        shutil.copy(os.path.join(exported, "saved_model.pb"), tmp_path / "2")
        models.poll_once()  # retries exhausted: the fixed files alone are not picked up
        assert models.resolve("van").version == 1
        shutil.rmtree(tmp_path / "2")  # the version dir disappears: the failure is forgotten
        models.poll_once()
        push(tmp_path, exported, "2")
        models.poll_once()
        assert models.resolve("van").version == 2
    finally:
        models.stop()


def test_deleting_every_version_unloads_the_model(tmp_path, exported):
    push(tmp_path, exported, "1")
    models = manager(config("van", tmp_path))
    try:
        models.poll_once()
        shutil.rmtree(tmp_path / "1")  # the base path stays, empty
        models.poll_once()
        with pytest.raises(ServingError) as err:
            models.resolve("van")
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        assert models.status("van", 1)[0].state == END
    finally:
        models.stop()


def test_a_missing_base_path_keeps_what_is_served(tmp_path, exported):
    push(tmp_path / "van", exported, "1")
    models = manager(config("van", tmp_path / "van"))
    try:
        models.poll_once()
        shutil.rmtree(tmp_path / "van")  # the source reports an error and aspires nothing new
        models.poll_once()
        assert models.resolve("van").version == 1
    finally:
        models.stop()


def test_reload_with_a_new_model_that_fails_is_unknown_with_server_core_message(tmp_path, exported):
    push(tmp_path / "van", exported, "1")
    push(tmp_path / "other", exported, "7", warmup=[b"not an image"])
    options = ServerOptions(
        model_name="van", model_base_path=str(tmp_path / "van"), port=0, rest_api_port=0,
        file_system_poll_wait_seconds=0.05, max_num_load_retries=1,
        load_retry_interval_micros=100_000,
    )  # fmt: skip
    with ModelServer(options) as server:
        stub = model_service_pb2_grpc.ModelServiceStub(grpc.insecure_channel(server.grpc_target))
        reload = model_management_pb2.ReloadConfigRequest()
        models = reload.config.model_config_list
        models.config.add().CopyFrom(config("van", tmp_path / "van"))
        models.config.add().CopyFrom(config("other", tmp_path / "other"))
        with pytest.raises(grpc.RpcError) as err:
            stub.HandleReloadConfigRequest(reload, timeout=60)
        assert err.value.code() == grpc.StatusCode.UNKNOWN
        details = err.value.details()
        prefix = (
            "1 model(s) did not become available: {{{name: other version: 7} due to error: "
            "INVALID_ARGUMENT: warmup record 1 of "
        )
        assert details.startswith(prefix) and details.endswith("}, }")
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "other"
        status = stub.GetModelStatus(request, timeout=10).model_version_status[0]
        assert (status.version, status.state) == (7, END)
        assert status.status.error_code == INVALID_ARGUMENT


def test_labels_must_name_available_versions_unless_the_flag_allows_it(tmp_path, exported):
    push(tmp_path, exported, "1")
    labelled = config("van", tmp_path)
    labelled.version_labels["stable"] = 1
    with pytest.raises(ServingError) as err:  # at startup no version is available yet
        manager(labelled)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.message == (
        "Request to assign label to version 1 of model van, "
        "which is not currently available for inference"
    )
    models = manager(labelled, allow_version_labels_for_unavailable_models=True)
    try:
        models.poll_once()
        assert models.resolve("van", label="stable").version == 1
        moved = config("van", tmp_path)
        moved.version_labels["stable"] = 42  # moving a label needs 42 available, flag or not
        with pytest.raises(ServingError) as err:
            models.reload([moved])
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "version 42 of model van" in err.value.message
        assert models.resolve("van", label="stable").version == 1  # nothing applied
        added = config("van", tmp_path)
        added.version_labels.update({"stable": 1, "canary": 42})  # a new label: allowed
        models.reload([added])
    finally:
        models.stop()


def test_a_config_without_model_platform_is_refused(tmp_path, exported):
    push(tmp_path, exported, "1")
    entry = config("van", tmp_path)
    entry.ClearField("model_platform")
    with pytest.raises(ServingError) as err:
        manager(entry)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.message == (
        "Illegal setting neither ModelServerConfig::model_type (deprecated) nor "
        "ModelServerConfig::model_platform, model name is van"
    )
