"""Version lifecycle like TF Serving: polling, policies, labels, reload, warmup, hot swap."""

import os
import shutil
import threading

import grpc
import pytest
import tensorflow as tf
from model_dirs import push, wait_for
from tensorflow_serving.apis import (
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from serving import testing
from serving.manager import LoadError, State
from serving.protos import render_model_config
from serving.server import ModelServer, ServerOptions
from van_tfx.tfrecords import record_header

IMAGE = testing.encode_image((10, 200, 30))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One exported version dir to copy around (export costs seconds; copying is instant)."""
    root = tmp_path_factory.mktemp("export")
    return testing.export(testing.build_tiny_model(), str(root), 1)


def predict(stub, name="van", version=None, label=None):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = "predict_images"
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    request.inputs["images"].CopyFrom(tf.make_tensor_proto([IMAGE]))
    return stub.Predict(request, timeout=30)


def serve(base, **kwargs):
    options = dict(model_name="van", model_base_path=str(base), port=0, rest_api_port=0)
    options.update(kwargs)
    return ModelServer(ServerOptions(**options))


def test_integer_dirs_count_by_name_and_a_version_without_a_model_is_retried(tmp_path, exported):
    # TF Serving aspires the highest numbered child whatever it holds: a push in progress (no
    # saved_model.pb yet) fails to load with NOT_FOUND and is retried while the version before
    # keeps serving (availability preserving). Its retry comes once saved_model.pb is there, not
    # after the 60 s default --load_retry_interval_micros.
    push(tmp_path, exported, 1)
    push(tmp_path, exported, 3)
    shutil.copytree(exported, tmp_path / "temp-4")  # not an integer name: ignored
    with serve(tmp_path, file_system_poll_wait_seconds=0.1) as server:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(
            grpc.insecure_channel(server.grpc_target)
        )
        assert predict(stub).model_spec.version.value == 3
        with pytest.raises(grpc.RpcError) as err:
            predict(stub, version=1)  # latest{num_versions: 1} serves only 3
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        last = shutil.ignore_patterns("saved_model.pb")
        shutil.copytree(exported, tmp_path / "5", ignore=last)  # a push in progress
        wait_for(lambda: server.manager.status("van", 5)[0].state == State.LOADING)  # retried
        assert predict(stub).model_spec.version.value == 3
        shutil.copy(os.path.join(exported, "saved_model.pb"), tmp_path / "5")  # it finishes
        wait_for(lambda: predict(stub).model_spec.version.value == 5, timeout=20)
        shutil.rmtree(tmp_path / "5")  # removed versions are unloaded; 3 comes back
        wait_for(lambda: predict(stub).model_spec.version.value == 3)


def test_config_file_policies_labels_and_reload(tmp_path, exported):
    for version in (1, 2, 3):
        push(tmp_path / "van", exported, version)
    push(tmp_path / "other", exported, 7)
    config = tmp_path / "models.config"
    config.write_text(
        render_model_config(
            [("van", str(tmp_path / "van"))], num_versions=2, labels={"stable": 2, "canary": 3}
        )
    )
    options = dict(model_config_file=str(config), file_system_poll_wait_seconds=0)
    # Labels at startup name versions not loaded yet: TF Serving needs this flag for that.
    options["allow_version_labels_for_unavailable_models"] = True
    with serve("", **options) as server:
        channel = grpc.insecure_channel(server.grpc_target)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        assert predict(stub, label="stable").model_spec.version.value == 2
        assert predict(stub, label="canary").model_spec.version.value == 3
        with pytest.raises(grpc.RpcError) as err:
            predict(stub, version=1)  # latest{2} keeps 2 and 3 only
        assert err.value.details() == "Servable not found for request: Specific(van, 1)"
        with pytest.raises(grpc.RpcError) as err:
            predict(stub, label="beta")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        reload = model_management_pb2.ReloadConfigRequest()
        entry = reload.config.model_config_list.config.add(
            name="other", base_path=str(tmp_path / "other"), model_platform="tensorflow"
        )
        entry.model_version_policy.specific.versions.append(7)
        model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(
            reload, timeout=60
        )
        assert predict(stub, name="other").model_spec.version.value == 7
        with pytest.raises(grpc.RpcError) as err:
            predict(stub)  # "van" left the config list
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_warmup_requests_are_replayed_and_a_bad_warmup_fails_the_version(tmp_path, exported):
    push(tmp_path, exported, 1, warmup=[IMAGE, IMAGE, IMAGE])
    with serve(tmp_path, file_system_poll_wait_seconds=0.1, max_num_load_retries=0) as server:
        assert server.manager.resolve("van").warmup_records == 3
        push(tmp_path, exported, 2, warmup=[b"not an image"])
        wait_for(lambda: server.manager.status("van", 2)[0].state == 50)  # END
        failure = server.manager.status("van", 2)[0]
        assert "warmup record 1" in failure.error
        assert failure.error_code == 3  # the failing request's INVALID_ARGUMENT, not UNKNOWN
        assert server.manager.resolve("van").version == 1  # the old version keeps serving


def test_a_warmup_file_declaring_a_huge_record_fails_the_version_with_data_loss(tmp_path, exported):
    # TensorFlow's record reader would allocate the declared 64 GiB (the process died).
    push(tmp_path, exported, 1)
    with serve(tmp_path, file_system_poll_wait_seconds=0.1, max_num_load_retries=0) as server:
        staging = tmp_path / "staging-2"
        shutil.copytree(tmp_path / "1", staging)
        warmup = staging / "assets.extra" / "tf_serving_warmup_requests"
        warmup.parent.mkdir(exist_ok=True)
        warmup.write_bytes(record_header(2**36) + b"\0" * 64)
        os.rename(staging, tmp_path / "2")
        wait_for(lambda: server.manager.status("van", 2)[0].state == 50)  # END
        failure = server.manager.status("van", 2)[0]
        assert failure.error_code == grpc.StatusCode.DATA_LOSS.value[0]
        assert str(warmup.relative_to(tmp_path / "staging-2")) in failure.error
        assert "declares 68719476736 bytes" in failure.error
        assert server.manager.resolve("van").version == 1


@pytest.mark.parametrize(
    "option, value",
    [("port", 70000), ("rest_api_port", -2), ("grpc_max_threads", 0), ("max_message_bytes", 0),
     ("max_image_pixels", -1), ("file_system_poll_wait_seconds", float("nan")),
     ("model_config_file_poll_wait_seconds", float("inf")), ("max_num_load_retries", -1)],
)  # fmt: skip
def test_server_options_check_the_flags_bounds(tmp_path, option, value):
    with pytest.raises(ValueError, match=f"^{option} must be"):
        serve(tmp_path, **{option: value})


def test_negative_poll_wait_and_retry_interval_are_accepted_as_in_tf_serving(tmp_path, exported):
    push(tmp_path, exported, 1)
    with serve(tmp_path, file_system_poll_wait_seconds=-1, load_retry_interval_micros=-1,
               rest_api_timeout_in_ms=-5) as server:  # fmt: skip
        stub = prediction_service_pb2_grpc.PredictionServiceStub(
            grpc.insecure_channel(server.grpc_target)
        )
        assert predict(stub).model_spec.version.value == 1


def test_ports_stay_closed_until_a_version_is_available(tmp_path):
    server = serve(tmp_path / "empty", startup_timeout_seconds=0.3)
    with pytest.raises(LoadError, match="van"):
        server.start()
    assert server.grpc_port is None


def test_hot_swap_under_load_has_zero_failed_requests(tmp_path, exported):
    push(tmp_path, exported, 1)
    with serve(tmp_path, file_system_poll_wait_seconds=0.05) as server:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(
            grpc.insecure_channel(server.grpc_target)
        )
        stop = threading.Event()
        versions, errors = [], []

        def client():
            while not stop.is_set():
                try:
                    versions.append(predict(stub).model_spec.version.value)
                except grpc.RpcError as err:
                    errors.append(err)

        threads = [threading.Thread(target=client) for _ in range(4)]
        for thread in threads:
            thread.start()
        try:
            wait_for(lambda: len(versions) > 20)
            push(tmp_path, exported, 2)
            wait_for(lambda: versions[-1] == 2 and server.manager.status("van", 1)[0].state == 50)
            n = len(versions)
            wait_for(lambda: len(versions) > n + 20)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        assert errors == []
        assert versions[0] == 1 and versions[-1] == 2
        assert versions.index(2) > 0 and 1 not in versions[versions.index(2) + 8 :]


def test_edited_config_file_is_applied_when_polled(tmp_path, exported):
    for version in (1, 2):
        push(tmp_path / "van", exported, version)
    config = tmp_path / "models.config"
    config.write_text(render_model_config([("van", str(tmp_path / "van"))], 2, {"stable": 1}))
    options = dict(model_config_file=str(config), model_config_file_poll_wait_seconds=0.1)
    options["allow_version_labels_for_unavailable_models"] = True  # labels at startup
    with serve("", **options) as server:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(
            grpc.insecure_channel(server.grpc_target)
        )
        assert predict(stub, label="stable").model_spec.version.value == 1
        config.write_text(render_model_config([("van", str(tmp_path / "van"))], 2, {"stable": 2}))
        wait_for(lambda: predict(stub, label="stable").model_spec.version.value == 2)


def test_for_saved_model_serves_a_bare_saved_model_dir_on_free_ports(exported):
    with ModelServer.for_saved_model(exported, model_name="candidate") as server:
        assert server.grpc_target.startswith("127.0.0.1:") and server.rest_url
        stub = prediction_service_pb2_grpc.PredictionServiceStub(
            grpc.insecure_channel(server.grpc_target)
        )
        assert predict(stub, name="candidate").model_spec.version.value == 1
        base = server.options.model_base_path
    assert not os.path.exists(base) and os.path.isdir(exported)  # only the private link is removed


def test_startup_fails_clearly_when_the_only_version_is_broken(tmp_path, exported):
    push(tmp_path, exported, 1, warmup=[b"not an image"])
    with pytest.raises(LoadError, match="van version 1: warmup record 1"):
        serve(tmp_path, max_num_load_retries=0).start()
