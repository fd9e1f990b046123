"""Hostile files around the model server: warmup files, config files, manifests (real files,
a real exported SavedModel, no mocks)."""

import os
import subprocess
import sys
import threading

import grpc
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from model_dirs import push, wait_for
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

from serving import protos, testing
from serving.manager import MAX_WARMUP_RECORDS, LoadError, run_warmup
from serving.servable import WARMUP_FILE, Servable
from serving.server import ModelServer, ServerOptions
from van_tfx.tfrecords import record_header, write_records

IMAGE = testing.encode_image((10, 200, 30))


@pytest.fixture(scope="module")
def servable(tmp_path_factory):
    """One loaded version whose warmup file each test rewrites (loading costs seconds)."""
    root = tmp_path_factory.mktemp("export")
    path = testing.export(testing.build_tiny_model(), str(root), 1)
    os.makedirs(os.path.join(path, "assets.extra"))
    return Servable("van", 1, path, None)


def predict_log(image: bytes) -> bytes:
    """A serialized PredictionLog asking predict_images about one image."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "van"
    request.model_spec.signature_name = "predict_images"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto([image]))
    log = prediction_log_pb2.PredictionLog(
        predict_log=prediction_log_pb2.PredictLog(request=request)
    )
    return log.SerializeToString()


GOOD, BAD_IMAGE, NOT_A_LOG = predict_log(IMAGE), predict_log(b"not an image"), b"\xff\xff\xff"


def write_warmup(servable, records, tail=b"") -> str:
    path = os.path.join(servable.path, WARMUP_FILE)
    write_records(path, records)
    with open(path, "ab") as f:
        f.write(tail)
    return path


def test_warmup_stops_reading_at_the_first_failing_record(servable):
    # Record 1 fails; a damaged header comes 20 records later. Reading the whole file up front
    # (as before: 1000 records of 2 MB were 8.8 GB resident) met the damage first: DATA_LOSS.
    path = write_warmup(servable, [BAD_IMAGE] + [GOOD] * 20, record_header(2**36) + b"\0" * 64)
    with pytest.raises(LoadError) as failure:
        run_warmup(servable)
    assert failure.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(failure.value).startswith(f"warmup record 1 of {path} failed: ")


def test_a_warmup_record_that_is_no_prediction_log_fails_with_invalid_argument(servable):
    # saved_model_warmup_util.cc: "Failed to parse warmup record" is INVALID_ARGUMENT; here the
    # protobuf DecodeError escaped and the version reported UNKNOWN.
    path = write_warmup(servable, [GOOD, NOT_A_LOG])
    with pytest.raises(LoadError) as failure:
        run_warmup(servable)
    assert failure.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(failure.value) == (
        f"Failed to parse warmup record 2 (3 bytes) from {path}: not a serialized PredictionLog"
    )


def test_more_warmup_records_than_tf_serving_allows_name_the_file(servable):
    path = write_warmup(servable, [GOOD] * (MAX_WARMUP_RECORDS + 1))
    with pytest.raises(LoadError) as failure:
        run_warmup(servable)
    assert failure.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(failure.value) == (
        f"Number of warmup records exceeds the maximum ({MAX_WARMUP_RECORDS}) at {path}"
    )


KINDS = {"good": GOOD, "bad image": BAD_IMAGE, "not a log": NOT_A_LOG}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kinds=st.lists(st.sampled_from(sorted(KINDS)), max_size=9))
def test_warmup_reports_the_first_bad_record_or_counts_them_all(servable, kinds):
    path = write_warmup(servable, [KINDS[kind] for kind in kinds])
    bad = [number for number, kind in enumerate(kinds, start=1) if kind != "good"]
    if not bad:
        assert run_warmup(servable) == len(kinds)
        return
    with pytest.raises(LoadError) as failure:
        run_warmup(servable)
    assert failure.value.code == grpc.StatusCode.INVALID_ARGUMENT
    # The first bad record is the one reported, whatever runs concurrently behind it.
    assert f"record {bad[0]} " in str(failure.value)
    assert path in str(failure.value)


NESTED_ANY = "[type.googleapis.com/google.protobuf.Any] { "


def nested_config(levels: int) -> str:
    """A ModelServerConfig whose custom_model_config nests `levels` messages in all, with braces
    in a comment and in a string that must not count as nesting."""
    braces = "{<" * 200
    inner = levels - 2  # custom_model_config and the innermost StringValue are two levels
    return (
        f"# {braces}\ncustom_model_config {{ {NESTED_ANY * inner}"
        f"[type.googleapis.com/google.protobuf.StringValue] {{ value: '{braces}' }}"
        f"{'}' * inner} }}  # {braces}\n"
    )


@settings(max_examples=30, deadline=None)
@given(levels=st.integers(2, 2 * protos.MAX_TEXT_PROTO_DEPTH))
@example(levels=protos.MAX_TEXT_PROTO_DEPTH)
@example(levels=protos.MAX_TEXT_PROTO_DEPTH + 1)
def test_config_nesting_is_refused_past_protobufs_depth_limit(tmp_path_factory, levels):
    path = tmp_path_factory.mktemp("nested") / "models.config"
    path.write_text(nested_config(levels))
    if levels <= protos.MAX_TEXT_PROTO_DEPTH:
        assert protos.parse_text_proto(path, protos.ModelServerConfig).custom_model_config
        return
    with pytest.raises(protos.ConfigFileError) as failure:
        protos.parse_text_proto(path, protos.ModelServerConfig)
    message = str(failure.value)
    assert message.startswith(f"{path} is not a valid ModelServerConfig text proto: ")
    assert message.endswith(
        f"Message is too deep: more than {protos.MAX_TEXT_PROTO_DEPTH} nested levels"
    )


def test_a_config_nested_ten_thousand_deep_is_a_config_error_not_a_recursion_error(tmp_path):
    # Python's text parser recursed per level: RecursionError, a traceback from `van-tfx serve`.
    path = tmp_path / "batching.config"
    path.write_text(nested_config(10_000))
    with pytest.raises(protos.ConfigFileError, match="Message is too deep") as failure:
        protos.parse_model_config_file(path)
    assert len(str(failure.value)) < 1000  # the 440 KB line it quotes is shortened


def test_a_huge_config_file_is_refused_by_its_size_unread(tmp_path):
    path = tmp_path / "models.config"
    with open(path, "wb") as f:  # sparse: 64 MiB of NULs that take no disk
        f.truncate(64 << 20)
    with pytest.raises(protos.ConfigFileError) as failure:
        protos.parse_model_config_file(path)
    assert str(failure.value) == (
        f"config file {path} is {64 << 20} bytes, more than the "
        f"{protos.MAX_CONFIG_FILE_BYTES} bytes this server reads from it"
    )


def test_a_config_that_is_not_utf8_names_the_file_and_byte(tmp_path):
    path = tmp_path / "monitoring.config"
    path.write_bytes(b"prometheus_config { path: '\xff' }")
    with pytest.raises(protos.ConfigFileError) as failure:
        protos.parse_monitoring_file(path)
    assert str(failure.value) == (
        f"{path} is not a valid MonitoringConfig text proto: byte 27 is not UTF-8"
    )


def test_read_bounded_stops_at_the_limit_of_an_endless_file():
    from serving.files import FileTooLargeError, read_bounded

    with pytest.raises(FileTooLargeError, match="/dev/zero is over 4096 bytes"):
        read_bounded("/dev/zero", 4096, "config file")


def serve_with_model_config(path):
    """`van-tfx serve` with `path` as --model_config_file, run to its exit."""
    return subprocess.run(
        [sys.executable, "-m", "van_tfx.cli", "serve", "--port=0", "--rest_api_port=0",
         f"--model_config_file={path}"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def test_serve_refuses_a_huge_config_file_with_one_line(tmp_path):
    # The whole file was read (1.5 GB of NULs: 3.6 GB resident, then a MemoryError traceback).
    path = tmp_path / "models.config"
    with open(path, "wb") as f:
        f.truncate(1 << 30)
    result = serve_with_model_config(path)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"error: config file {path} is {1 << 30} bytes, more than the "
        f"{protos.MAX_CONFIG_FILE_BYTES} bytes this server reads from it"
    )
    assert "Traceback" not in result.stderr


def test_manifests_check_finds_huge_and_binary_manifests_stale_without_reading_them(tmp_path):
    # A 2 GB file in place of a manifest was read whole (4.2 GB resident); one that is not
    # UTF-8 was a UnicodeDecodeError traceback. Under a 1 GiB address-space limit the whole
    # read cannot happen: the check must compare a prefix.
    out = tmp_path / "deploy"
    command = [sys.executable, "-m", "serving.manifests", "--out", str(out)]
    subprocess.run(command, capture_output=True, check=True, timeout=120)
    with open(out / "configmap.yaml", "r+b") as f:
        f.truncate(2 << 30)  # sparse
    (out / "service.yaml").write_bytes(b"\xff\xfe")

    def limited():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    result = subprocess.run(
        [*command, "--check"], capture_output=True, text=True, timeout=120, check=False,
        preexec_fn=limited,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert result.stdout == (
        f"stale manifests in {out}: configmap.yaml, service.yaml; "
        f"run `van-tfx serving-manifests --out {out}`\n"
    )
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("meanwhile", ["another config", "a broken config"])
def test_a_config_edited_while_the_models_load_is_applied_once_serving(tmp_path, meanwhile):
    # The watcher took its baseline from a second read after startup: an edit made while the
    # models loaded became that baseline and was never applied, and a broken file there ended
    # the watcher (no edit applied again).
    exported = testing.export(testing.build_tiny_model(), str(tmp_path / "export"), 1)
    (tmp_path / "van").mkdir()
    push(tmp_path / "other", exported, 1)
    config = tmp_path / "models.config"
    config.write_text(protos.render_model_config([("van", str(tmp_path / "van"))]))
    both = protos.render_model_config(
        [("van", str(tmp_path / "van")), ("other", str(tmp_path / "other"))]
    )
    server = ModelServer(
        ServerOptions(
            model_config_file=str(config), model_config_file_poll_wait_seconds=0.05,
            file_system_poll_wait_seconds=0.05, port=0, rest_api_port=0,
        )
    )  # fmt: skip
    starting = threading.Thread(target=server.start)
    starting.start()  # waits for a version of "van"
    try:
        wait_for(lambda: server.manager is not None)  # the config file has been read
        config.write_text(both if meanwhile == "another config" else "model_config_list {")
        push(tmp_path / "van", exported, 1)  # now startup can finish
        starting.join()
        config.write_text(both)  # (for the broken file: fixed once serving)
        wait_for(lambda: server.manager.is_available("other"))
    finally:
        starting.join()
        server.stop()


def _waiting(thread: threading.Thread) -> bool:
    """Whether `thread` ended or is blocked in Condition.wait (where a batch worker waits)."""
    frame = sys._current_frames().get(thread.ident)
    return not thread.is_alive() or (frame is not None and frame.f_code.co_name == "wait")


def test_an_int64_max_batch_timeout_waits_for_a_full_batch_and_keeps_its_worker(tmp_path):
    # TF Serving reads batch_timeout_micros as an int64 and waits for a full batch. Here
    # Condition.wait(2**63 µs) raised OverflowError: the worker thread died at each request,
    # and with none left every request waited out its deadline.
    import numpy as np

    from serving.batching import Batcher

    path = tmp_path / "batching.config"
    path.write_text(
        "max_batch_size { value: 2 }\nbatch_timeout_micros { value: 9223372036854775807 }\n"
        "num_batch_threads { value: 1 }\n"
    )
    batcher = Batcher(lambda feed: feed, protos.parse_batching_file(path), "timeout")
    (worker,) = batcher._threads
    try:
        for round_ in range(2):
            first: dict = {}
            alone = threading.Thread(
                target=lambda answers: answers.update(
                    batcher.submit({"x": np.array([1.0])}, timeout=60)
                ),
                args=(first,),
            )
            alone.start()  # one row of two: its worker waits for a second
            wait_for(lambda: batcher._queued_rows == 1 and _waiting(worker))
            assert worker.is_alive(), f"round {round_}: the batch worker died"
            second = batcher.submit({"x": np.array([2.0])}, timeout=60)  # fills the batch
            alone.join()
            assert (first["x"].tolist(), second["x"].tolist()) == ([1.0], [2.0])
        assert batcher.batches_run == 2
    finally:
        batcher.stop()


@pytest.mark.parametrize(
    ("fields", "last", "expected"),
    [
        ("max_batch_size { value: 32 } allowed_batch_sizes: [8, 16]", 16, 32),
        ("allowed_batch_sizes: 64", 64, 1000),  # TF Serving's default max_batch_size
    ],
)
def test_allowed_batch_sizes_must_end_at_max_batch_size_as_in_tf_serving(
    tmp_path, fields, last, expected
):
    # TF Serving fails each version's load (INVALID_ARGUMENT); the field was ignored here and
    # the model served as if the file were fine.
    path = tmp_path / "batching.config"
    path.write_text(fields)
    with pytest.raises(protos.ConfigFileError) as failure:
        protos.parse_batching_file(path)
    assert str(failure.value) == (
        f"{path}: Last entry in allowed_batch_sizes must match max_batch_size; last entry was "
        f"{last}; expected {expected}"
    )
    path.write_text(f"max_batch_size {{ value: {last} }} allowed_batch_sizes: [2, {last}]")
    assert protos.parse_batching_file(path).max_batch_size == last


MANAGER_SCRIPT = """
import json, sys
from serving.manager import ModelManager
from serving.protos import ModelConfig
config = ModelConfig(name="van", base_path=sys.argv[1], model_platform="tensorflow")
config.model_version_policy.all.SetInParent()
manager = ModelManager([config], max_num_load_retries=0)
manager.poll_once()
print(json.dumps([[s.version, s.state, s.error_code, s.error] for s in manager.status("van")]))
"""


def test_a_saved_model_pb_larger_than_a_proto_fails_its_version_not_the_server(tmp_path):
    # tf.saved_model.load read it whole: a 20 GB (sparse) saved_model.pb in a new version dir
    # ended the whole server with SIGSEGV under an 8 GB address-space limit.
    import json
    import shutil

    from serving.servable import MAX_SAVED_MODEL_BYTES

    exported = testing.export(testing.build_tiny_model(), str(tmp_path / "export"), 1)
    shutil.copytree(exported, tmp_path / "base" / "1")
    shutil.copytree(exported, tmp_path / "base" / "2")
    huge = tmp_path / "base" / "2" / "saved_model.pb"
    with open(huge, "r+b") as f:
        f.truncate(20 << 30)

    def limited():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))

    result = subprocess.run(
        [sys.executable, "-c", MANAGER_SCRIPT, str(tmp_path / "base")], capture_output=True,
        text=True, timeout=300, check=False, preexec_fn=limited,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    statuses = json.loads(result.stdout.splitlines()[-1])
    assert statuses == [
        [
            2, 50, grpc.StatusCode.DATA_LOSS.value[0],
            f"Can't parse {huge} as binary proto: it is {20 << 30} bytes, more than the "
            f"{MAX_SAVED_MODEL_BYTES} a protocol buffer may hold",
        ],
        [1, 30, 0, ""],  # version 1 still AVAILABLE
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("file", "make", "kind"),
    [
        ("saved_model.pb", os.mkfifo, "a FIFO"),
        (WARMUP_FILE, os.mkfifo, "a FIFO"),
        (WARMUP_FILE, os.mkdir, "a directory"),
    ],
)
def test_a_version_file_that_is_no_regular_file_fails_its_version_unopened(
    tmp_path, file, make, kind
):
    # Opening a FIFO blocks until someone writes: the poll thread hung for good, so no version
    # of any model loaded again (here the script never ended); a warmup directory was UNKNOWN.
    import json
    import shutil

    exported = testing.export(testing.build_tiny_model(), str(tmp_path / "export"), 1)
    shutil.copytree(exported, tmp_path / "base" / "1")
    shutil.copytree(exported, tmp_path / "base" / "2")
    target = tmp_path / "base" / "2" / file
    target.parent.mkdir(exist_ok=True)
    if target.exists():
        target.unlink()
    make(target)
    result = subprocess.run(
        [sys.executable, "-c", MANAGER_SCRIPT, str(tmp_path / "base")], capture_output=True,
        text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.splitlines()[-1]) == [
        [2, 50, grpc.StatusCode.FAILED_PRECONDITION.value[0], f"{target} is {kind}, not a regular file"],
        [1, 30, 0, ""],
    ]  # fmt: skip


ASPIRED_SCRIPT = """
from serving.manager import aspired_versions
from serving.protos import ModelConfig
config = ModelConfig(name="m", base_path="/m", model_platform="tensorflow")
config.model_version_policy.specific.versions.extend(range(1, 200_001))
available = list(range(190_001, 210_001))
print(len(aspired_versions(config, available)))
"""


def test_a_long_specific_version_list_costs_one_pass_not_one_per_available_version():
    # The set of specific versions was rebuilt for every available version: 200k x 20k here,
    # minutes of CPU (25 s for 200k x 2000). A CPU-time limit (not a clock) makes that a failure.
    def limited():
        import resource

        resource.setrlimit(resource.RLIMIT_CPU, (120, 120))

    result = subprocess.run(
        [sys.executable, "-c", ASPIRED_SCRIPT], capture_output=True, text=True, timeout=600,
        check=False, preexec_fn=limited,
    )  # fmt: skip
    assert result.returncode == 0, f"killed by the CPU limit: {result.returncode}"
    assert result.stdout.splitlines()[-1] == "10000"


def _retagged(saved_model_pb: bytes, tags: list[str]) -> bytes:
    """The SavedModel `saved_model_pb` with its MetaGraph's tags replaced by `tags`."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel.FromString(saved_model_pb)
    del saved_model.meta_graphs[0].meta_info_def.tags[:]
    saved_model.meta_graphs[0].meta_info_def.tags.extend(tags)
    return saved_model.SerializeToString()


NO_SERVE_GRAPH = (
    "Could not find meta graph def matching supplied tags: { serve }. To inspect available "
    "tag-sets in the SavedModel, please use the SavedModel CLI: `saved_model_cli`"
)
NO_SAVED_MODEL = (  # reader.cc ReadSavedModel
    "Could not find SavedModel .pb or .pbtxt at supplied export directory path: {dir}. Check "
    "that the directory exists and that you have the right permissions for accessing it."
)


@pytest.mark.parametrize(
    ("damage", "code", "message"),
    [
        ("one empty MetaGraph", grpc.StatusCode.NOT_FOUND, NO_SERVE_GRAPH),
        ("no MetaGraph", grpc.StatusCode.NOT_FOUND, NO_SERVE_GRAPH),
        ("tagged train", grpc.StatusCode.NOT_FOUND, NO_SERVE_GRAPH),
        ("tagged serve and gpu", grpc.StatusCode.NOT_FOUND, NO_SERVE_GRAPH),
        ("not a proto", grpc.StatusCode.DATA_LOSS, "Can't parse {pb} as binary proto"),
        ("no variables", grpc.StatusCode.NOT_FOUND, "Unsuccessful TensorSliceReader constructor"),
        ("no saved_model.pb", grpc.StatusCode.NOT_FOUND, NO_SAVED_MODEL),
    ],
)
def test_a_new_version_tf_serving_cannot_load_fails_with_its_code_and_the_old_one_serves(
    tmp_path, damage, code, message
):
    # tf.saved_model.load without tags loads a lone MetaGraph whatever its tags: a version with
    # an empty one (or one tagged train) went AVAILABLE and replaced the version serving, where
    # TF Serving (tags {serve}) fails it with NOT_FOUND. Others were UNKNOWN.
    import shutil

    from serving.manager import ModelManager

    exported = testing.export(testing.build_tiny_model(), str(tmp_path / "export"), 1)
    shutil.copytree(exported, tmp_path / "base" / "1")
    config = protos.ModelConfig(name="van", base_path=str(tmp_path / "base"))
    config.model_platform = "tensorflow"
    manager = ModelManager([config], max_num_load_retries=0, enable_warmup=False)
    manager.poll_once()  # version 1 serves
    shutil.copytree(exported, tmp_path / "staging")
    pb = tmp_path / "staging" / "saved_model.pb"
    original = pb.read_bytes()
    contents = {
        "one empty MetaGraph": b"\x12\x00",
        "no MetaGraph": b"",
        "tagged train": _retagged(original, ["train"]),
        "tagged serve and gpu": _retagged(original, ["serve", "gpu"]),
        "not a proto": b"\x0a\x05hello\xff",
    }
    if damage == "no variables":
        shutil.rmtree(tmp_path / "staging" / "variables")
    elif damage == "no saved_model.pb":  # aspired by its name alone, as TF Serving does
        pb.unlink()
    else:
        pb.write_bytes(contents[damage])
    os.rename(tmp_path / "staging", tmp_path / "base" / "2")
    pb = tmp_path / "base" / "2" / "saved_model.pb"
    try:
        manager.poll_once()
        status = manager.status("van", 2)[0]
        assert (status.state, status.error_code) == (50, code.value[0]), status.error
        assert status.error.startswith(
            message.replace("{pb}", str(pb)).replace("{dir}", str(pb.parent))
        )
        assert manager.resolve("van").version == 1
    finally:
        manager.stop()


def _policy(kind: str, count: int, specific: list[int]):
    config = protos.ModelConfig(name="m", base_path="/m", model_platform="tensorflow")
    if kind == "latest":
        config.model_version_policy.latest.num_versions = count
    elif kind == "all":
        config.model_version_policy.all.SetInParent()
    elif kind == "specific":
        config.model_version_policy.specific.versions.extend(specific)
    return config  # "default": no policy, latest 1


@settings(max_examples=60, deadline=None)
@given(
    children=st.lists(
        st.tuples(st.integers(0, 12), st.sampled_from(["", "0", "00", " "]), st.booleans()),
        max_size=12,
    ),
    kind=st.sampled_from(["latest", "all", "specific", "default"]),
    count=st.integers(0, 4),
    specific=st.lists(st.integers(0, 14), max_size=5),
)
def test_a_poll_aspires_children_by_name_as_tf_serving(
    tmp_path_factory, children, kind, count, specific
):
    # PollFileSystemForServable from the names alone: the later of "7", "07", "7 " (name order)
    # stands for 7; latest: the max(num_versions, 1) highest; whether a child holds
    # saved_model.pb does not matter (its load fails and is retried).
    from serving.manager import aspired_children

    base = tmp_path_factory.mktemp("base")
    for version, prefix, live in children:
        child = base / f"{prefix}{version}" if prefix != " " else base / f"{version} "
        child.mkdir(exist_ok=True)
        if live:
            (child / "saved_model.pb").touch()
    by_version = {}
    for name in sorted(os.listdir(base)):
        by_version[int(name)] = name
    if kind in ("latest", "default"):
        wanted = sorted(by_version)[-max(count if kind == "latest" else 1, 1) :]
    elif kind == "all":
        wanted = sorted(by_version)
    else:
        wanted = sorted(set(specific) & set(by_version))
    expected = {version: by_version[version] for version in wanted}
    assert aspired_children(str(base), _policy(kind, count, specific)) == expected


class FileCalls:
    """Counts the file system calls made through tf.io.gfile and os.stat (all still real)."""

    NAMES = ("listdir", "exists", "stat", "isdir", "glob", "walk", "GFile")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            monkeypatch.setattr(tf.io.gfile, name, self._counting(getattr(tf.io.gfile, name)))
        monkeypatch.setattr(os, "stat", self._counting(os.stat))

    def _counting(self, call):
        def counted(*args, **kwargs):
            self.count += 1
            return call(*args, **kwargs)

        return counted


def test_a_poll_costs_the_same_whatever_the_number_of_versions_without_a_model(
    tmp_path, monkeypatch
):
    # Every numbered child without saved_model.pb was stat'ed each poll, to skip it: 100k of
    # them took 1.26 s a poll (every second by default). TF Serving aspires the highest child
    # by its name; its load fails NOT_FOUND and is retried, so a poll is one listing and one
    # check of that child.
    from serving.manager import ModelManager, State

    calls = FileCalls(monkeypatch)
    counts = []
    for children in (3, 3000):
        base = tmp_path / str(children)
        for version in range(1, children + 1):
            os.makedirs(base / str(version))
        config = protos.ModelConfig(name="m", base_path=str(base), model_platform="tensorflow")
        manager = ModelManager([config], enable_warmup=False, load_retry_interval_seconds=60)
        try:
            manager.poll_once()  # aspires the highest; its load fails, a retry is due in 60 s
            calls.count = 0
            manager.poll_once()
            counts.append(calls.count)
            (status,) = manager.status("m")
            assert (status.version, status.state) == (children, State.LOADING)  # while retried
        finally:
            manager.stop()
    assert counts == [2, 2]  # the listing, and whether the top child has its model yet


def test_a_version_retrying_its_load_ends_with_its_error_once_no_longer_aspired(tmp_path):
    # A push in progress (no saved_model.pb yet) is aspired and retried; pulled before it
    # completes, it stayed LOADING in GetModelStatus for good. TF Serving cancels the retries of
    # a version no longer aspired (CancelLoadServableRetry): END, with the last load error.
    import shutil

    from serving.manager import ModelManager, State

    exported = testing.export(testing.build_tiny_model(), str(tmp_path / "export"), 1)
    shutil.copytree(exported, tmp_path / "base" / "1")
    config = protos.ModelConfig(name="van", base_path=str(tmp_path / "base"))
    config.model_platform = "tensorflow"
    manager = ModelManager([config], enable_warmup=False, load_retry_interval_seconds=60)
    try:
        manager.poll_once()  # version 1 serves
        os.makedirs(tmp_path / "base" / "2")
        manager.poll_once()
        assert [(s.version, s.state) for s in manager.status("van")] == [
            (2, State.LOADING),
            (1, State.AVAILABLE),
        ]
        os.rmdir(tmp_path / "base" / "2")
        manager.poll_once()
        (status,) = manager.status("van", 2)
        assert (status.state, status.error_code) == (State.END, grpc.StatusCode.NOT_FOUND.value[0])
        assert status.error == NO_SAVED_MODEL.format(dir=tmp_path / "base" / "2")
        assert manager.resolve("van").version == 1
    finally:
        manager.stop()


def test_a_broken_monitoring_file_is_not_read_without_a_rest_port(tmp_path):
    # server.cc parses --monitoring_config_file only when the HTTP port is set; this server
    # refused to start over a file it would never use.
    monitoring = tmp_path / "monitoring.config"
    monitoring.write_text("prometheus_config { enable: tru")
    exported = testing.export(testing.build_tiny_model(), str(tmp_path / "base"), 1)
    options = dict(
        model_name="van", model_base_path=os.path.dirname(exported), port=0,
        monitoring_config_file=str(monitoring),
    )  # fmt: skip
    with ModelServer(ServerOptions(rest_api_port=0, **options)) as server:
        assert server.manager.is_available("van") and server.rest_url is None
    with pytest.raises(protos.ConfigFileError, match="monitoring.config is not a valid"):
        ModelServer(ServerOptions(rest_api_port=-1, **options)).start()


def test_serve_with_a_fifo_config_and_no_writer_exits_instead_of_hanging(tmp_path):
    # open() of a FIFO without a writer blocked for good, and SIGTERM did not end it (Python
    # retries the interrupted open). Now it reads as empty, at once.
    fifo = tmp_path / "models.config"
    os.mkfifo(fifo)
    result = serve_with_model_config(fifo)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == f"error: {fifo} must hold a model_config_list"
