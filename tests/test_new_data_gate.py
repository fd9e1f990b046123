"""NewDataGate: its decision on real data files, real SavedModel version dirs, real artifacts."""

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from spans import write_shards, write_span
from tfx.types.experimental.simple_artifacts import File
from tfx.types.standard_artifacts import ModelBlessing
from tfx.utils import proto_utils

from components.new_data_gate import (
    GATE_ID,
    INCOMPLETE_KEY,
    MAX_RECORD_BYTES,
    NEW_DATA_KEY,
    REASON_KEY,
    REJECTIONS_DIR,
    SERVED_VERSION_KEY,
    NewDataGate,
    RecordRejection,
    TrainingDataRecordError,
    read_training_data,
    training_data_path,
    write_training_data,
)
from components.span_files import SpanFiles, SpanNamingError, incompleteness
from pipeline import ingest
from serving.manager import list_versions
from van_tfx.config import DataConfig, load_config
from van_tfx.shard_sets import IncompleteShardsError, check_shard_set, shard_sets

REPO = Path(__file__).resolve().parents[1]


def decision_of(data_root: Path, tmp_path: Path) -> File:
    """A gate decision naming the span and input fingerprint ImportExampleGen's driver computes
    for this data now (TFX's calculation, not the gate's: the tests then compare the two)."""
    from tfx.components.example_gen import utils

    splits = ingest.input_config(DataConfig()).splits
    fingerprint, span, _ = utils.calculate_splits_fingerprint_span_and_version(
        str(data_root), splits
    )
    decision = File()
    decision.uri = str(tmp_path / GATE_ID / "decision" / uuid.uuid4().hex)
    decision.set_int_custom_property("span", span)
    decision.set_string_custom_property("input_fingerprint", fingerprint)
    return decision


def push(serving: Path, version: int, decision: File | None) -> Path:
    """A real SavedModel as Pusher leaves it, with the smoke test's training-data record."""
    model_dir = serving / str(version)
    tf.saved_model.save(tf.Module(), str(model_dir))
    if decision is not None:
        write_training_data(str(model_dir), decision)
    return model_dir


def gate(
    data_root: Path,
    serving: Path,
    tmp_path: Path,
    force: bool = False,
    recipe: str = "r1",
    span: int = -1,
    data_config: DataConfig | None = None,
) -> File:
    """Run the component's function on the real data root; return its decision artifact."""
    decision = File()
    decision.uri = str(tmp_path / GATE_ID / "decision" / uuid.uuid4().hex)
    NewDataGate.test_call(
        decision=decision,
        input_base=str(data_root),
        input_config=input_config_json(data_config),
        serving_base_path=str(serving),
        force=int(force),
        recipe=recipe,
        span=span,
    )
    return decision


def input_config_json(data_config: DataConfig | None = None) -> str:
    """ImportExampleGen's input config (train and eval patterns) as the gate receives it."""
    return proto_utils.proto_to_json(ingest.input_config(data_config or DataConfig()))


def evaluate(decision: File, serving: Path, tmp_path: Path, blessed: bool) -> ModelBlessing:
    """The Evaluator's verdict on the candidate trained after `decision`, then RecordRejection."""
    blessing = ModelBlessing()
    blessing.uri = str(tmp_path / "Evaluator" / "blessing" / uuid.uuid4().hex)
    blessing.set_int_custom_property("blessed", int(blessed))
    RecordRejection.test_call(
        decision=decision, model_blessing=blessing, serving_base_path=str(serving)
    )
    return blessing


def rejections(serving: Path) -> list[Path]:
    return sorted((serving / REJECTIONS_DIR).glob("*.json"))


def new_data(decision: File) -> int:
    return decision.get_int_custom_property(NEW_DATA_KEY)


def reason(decision: File) -> str:
    return decision.get_string_custom_property(REASON_KEY)


@pytest.fixture
def data(tmp_path) -> Path:
    root = tmp_path / "data"
    write_span(root, 1)
    return root


def test_nothing_served_yet_means_train(data, tmp_path):
    decision = gate(data, tmp_path / "serving", tmp_path)
    assert new_data(decision) == 1
    assert "no model is served" in reason(decision)


def test_same_span_and_fingerprint_as_the_served_model_means_skip(data, tmp_path):
    seen = decision_of(data, tmp_path)
    push(tmp_path / "serving", 1700000000, seen)
    decision = gate(data, tmp_path / "serving", tmp_path)
    assert new_data(decision) == 0
    assert "span 1" in reason(decision) and "1700000000" in reason(decision)
    assert decision.get_string_custom_property(SERVED_VERSION_KEY) == "1700000000"
    written = json.loads(Path(decision.uri, "decision.json").read_text())
    assert written[NEW_DATA_KEY] == 0 and written[REASON_KEY] == reason(decision)
    fingerprint = seen.get_string_custom_property("input_fingerprint")
    assert written["span"] == 1 and written["input_fingerprint"] == fingerprint


def test_record_travels_with_the_model(data, tmp_path):
    decision = decision_of(data, tmp_path)
    model_dir = push(tmp_path / "serving", 1700000000, decision)
    record = json.loads(Path(training_data_path(str(model_dir))).read_text())
    assert record["span"] == 1
    assert record["input_fingerprint"] == decision.get_string_custom_property("input_fingerprint")
    assert record["decision_uri"] == decision.uri
    assert Path(model_dir, "assets.extra", "van_training_data.json").exists()


def test_new_span_means_train(data, tmp_path):
    push(tmp_path / "serving", 1700000000, decision_of(data, tmp_path))
    write_span(data, 2)
    decision = gate(data, tmp_path / "serving", tmp_path)
    assert new_data(decision) == 1
    assert "span 2" in reason(decision) and "span 1" in reason(decision)


def test_rewritten_files_of_the_same_span_mean_train(data, tmp_path):
    push(tmp_path / "serving", 1700000000, decision_of(data, tmp_path))
    shard = data / "span-1" / "train-00000-of-00001"
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # re-uploaded
    decision = gate(data, tmp_path / "serving", tmp_path)
    assert new_data(decision) == 1
    assert "changed" in reason(decision)


def test_force_trains_on_the_same_data(data, tmp_path):
    push(tmp_path / "serving", 1700000000, decision_of(data, tmp_path))
    decision = gate(data, tmp_path / "serving", tmp_path, force=True)
    assert new_data(decision) == 1
    assert "forced" in reason(decision)


def test_model_pushed_without_a_record_means_train(data, tmp_path):
    push(tmp_path / "serving", 1700000000, None)
    decision = gate(data, tmp_path / "serving", tmp_path)
    assert new_data(decision) == 1
    assert "van_training_data.json" in reason(decision)


def test_only_the_newest_complete_version_counts(data, tmp_path):
    serving = tmp_path / "serving"
    push(serving, 1700000000, decision_of(data, tmp_path))
    # A newer version still being pushed (saved_model.pb is copied last) and a non-version dir.
    (serving / "1800000000" / "variables").mkdir(parents=True)
    (serving / "tmp-push").mkdir()
    decision = gate(data, serving, tmp_path)
    assert new_data(decision) == 0
    assert "1700000000" in reason(decision)
    # A newer complete version trained on other data wins.
    write_span(data, 2)
    push(serving, 1900000000, decision_of(data, tmp_path))
    (data / "span-2" / "train-00000-of-00001").unlink()  # the data now resolves to span 1 again
    (data / "span-2" / "validation-00000-of-00001").unlink()
    (data / "span-2").rmdir()
    decision = gate(data, serving, tmp_path)
    assert new_data(decision) == 1
    assert "1900000000" in reason(decision)


def test_a_version_directory_with_leading_zeros_is_read_where_it_is(data, tmp_path):
    # TF Serving reads `007` as version 7 and serves it from `007`; so do the gate and the copy.
    serving = tmp_path / "serving"
    model_dir = push(serving, 5, decision_of(data, tmp_path))
    model_dir.rename(serving / "007")
    decision = gate(data, serving, tmp_path)
    assert new_data(decision) == 0, reason(decision)
    assert decision.get_string_custom_property(SERVED_VERSION_KEY) == "007"
    assert "served version 007" in reason(decision)


def test_unreadable_record_is_an_error_naming_the_file(data, tmp_path):
    model_dir = push(tmp_path / "serving", 1700000000, decision_of(data, tmp_path))
    Path(training_data_path(str(model_dir))).write_text("{not json")
    with pytest.raises(TrainingDataRecordError, match="van_training_data.json is not valid JSON"):
        gate(data, tmp_path / "serving", tmp_path)


@settings(max_examples=20, deadline=None)
@given(
    st.lists(st.sampled_from(["[", '{"k": ']), min_size=1, max_size=4),
    st.sampled_from([1, 200, 1000, 50_000]),
)
def test_a_record_nested_at_any_depth_is_an_error_naming_the_file(tmp_path_factory, unit, repeat):
    # A served model's record nested ~1,000 deep escaped as a bare RecursionError (json's
    # scanner), naming no file; now it is a TrainingDataRecordError like any malformed record.
    model_dir = tmp_path_factory.mktemp("served") / "1"
    path = Path(training_data_path(str(model_dir)))
    path.parent.mkdir(parents=True)
    opening = "".join(unit) * repeat
    closing = "".join("]" if u == "[" else "}" for u in reversed(unit)) * repeat
    path.write_text(f'{{"span": {opening}{closing}, "input_fingerprint": "f"}}')
    with pytest.raises(TrainingDataRecordError, match=re.escape(str(path))):
        read_training_data(str(model_dir))


def _served_record(model_dir: Path, data: bytes | None) -> Path:
    path = Path(training_data_path(str(model_dir)))
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is None:
        path.mkdir()
    else:
        path.write_bytes(data)
    return path


VALID = b'{"span": 1, "input_fingerprint": "f"}'


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b'{"span": 1, "input_fingerprint": "\xff"}', "is not valid JSON: not UTF-8 text"),
        (b'{"span": ' + b"9" * 5000 + b', "input_fingerprint": "f"}', "integer string"),
        (VALID + b" " * MAX_RECORD_BYTES, f"is over {MAX_RECORD_BYTES} bytes"),
        (None, "is unreadable"),
    ],
    ids=["not UTF-8", "5000-digit span", "over the size limit", "a directory"],
)
def test_a_record_that_is_not_json_text_of_a_record_size_is_an_error_naming_the_file(
    tmp_path, data, says
):
    # Before: UnicodeDecodeError, "ValueError: Exceeds the limit (4300) for integer string
    # conversion", a TF error, all naming no file; and any size was read whole and parsed
    # (a 100 MB record held 490 MB).
    path = _served_record(tmp_path / "1", data)
    with pytest.raises(TrainingDataRecordError, match=re.escape(says)) as failure:
        read_training_data(str(tmp_path / "1"))
    assert str(path) in str(failure.value)


@settings(max_examples=200, deadline=None)
@given(
    st.binary(max_size=80)
    | st.builds(
        lambda at, junk: VALID[:at] + junk + VALID[at:],
        st.integers(0, len(VALID)),
        st.binary(max_size=6),
    )
)
def test_any_bytes_are_a_typed_record_or_an_error_naming_the_file(tmp_path_factory, data):
    model_dir = tmp_path_factory.mktemp("served") / "1"
    path = _served_record(model_dir, data)
    try:
        record = read_training_data(str(model_dir))
    except TrainingDataRecordError as exc:
        assert str(path) in str(exc)
        return
    assert type(record["span"]) is int and isinstance(record["input_fingerprint"], str)


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        ({"span": "2"}, "'span' must be an integer, got \"2\""),
        ({"span": None}, "'span' must be an integer, got null"),
        ({"span": True}, "'span' must be an integer, got true"),
        ({"input_fingerprint": [1]}, "'input_fingerprint' must be a string, got [1]"),
    ],
)
def test_a_record_with_a_wrongly_typed_value_is_an_error_naming_the_file_and_key(
    data, tmp_path, edit, says
):
    # Before: a bare TypeError ("'>' not supported between instances of 'int' and 'str'").
    model_dir = push(tmp_path / "serving", 1700000000, decision_of(data, tmp_path))
    path = Path(training_data_path(str(model_dir)))
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(TrainingDataRecordError) as failure:
        gate(data, tmp_path / "serving", tmp_path)
    assert str(path) in str(failure.value) and says in str(failure.value)


def test_a_rejected_candidate_is_not_retrained_on_the_same_data_and_recipe(data, tmp_path):
    serving = tmp_path / "serving"
    push(serving, 1700000000, decision_of(data, tmp_path))
    write_span(data, 2)
    first = gate(data, serving, tmp_path)
    assert new_data(first) == 1
    blessing = evaluate(first, serving, tmp_path, blessed=False)
    [record] = rejections(serving)
    written = json.loads(record.read_text())
    assert written["span"] == 2 and written["model_blessing"] == blessing.uri
    assert written["recipe_fingerprint"] == "r1"
    again = gate(data, serving, tmp_path)
    assert new_data(again) == 0
    assert "span 2" in reason(again) and "not blessed" in reason(again)
    assert str(record) in reason(again) and "served version 1700000000 stays" in reason(again)
    # What can change the verdict trains again: the recipe, the files, or the user forcing it.
    assert new_data(gate(data, serving, tmp_path, recipe="r2")) == 1
    assert new_data(gate(data, serving, tmp_path, force=True)) == 1
    shard = data / "span-2" / "train-00000-of-00001"
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert new_data(gate(data, serving, tmp_path)) == 1
    # The rejection directory is invisible to the model server's version listing.
    assert list_versions(str(serving)) == [1700000000]


def test_a_rejection_holds_only_against_the_baseline_it_lost_to(data, tmp_path):
    serving = tmp_path / "serving"
    push(serving, 1700000000, decision_of(data, tmp_path))
    write_span(data, 2)
    evaluate(gate(data, serving, tmp_path), serving, tmp_path, blessed=False)
    [record] = rejections(serving)
    assert json.loads(record.read_text())["served_version"] == "1700000000"
    assert new_data(gate(data, serving, tmp_path)) == 0
    # Another model is served now (a push by hand, a rollback): span 2 gets another attempt.
    push(serving, 1800000000, None)
    decision = gate(data, serving, tmp_path)
    assert new_data(decision) == 1
    assert "rejected against 1700000000, which is no longer served" in reason(decision)


def test_a_rejected_first_candidate_is_not_retrained_either(data, tmp_path):
    serving = tmp_path / "serving"
    evaluate(gate(data, serving, tmp_path), serving, tmp_path, blessed=False)
    decision = gate(data, serving, tmp_path)
    assert new_data(decision) == 0
    assert "nothing is served" in reason(decision)
    assert decision.get_string_custom_property("recipe_fingerprint") == "r1"


def test_a_blessed_candidate_records_nothing(data, tmp_path):
    serving = tmp_path / "serving"
    evaluate(gate(data, serving, tmp_path), serving, tmp_path, blessed=True)
    assert rejections(serving) == []
    assert new_data(gate(data, serving, tmp_path)) == 1  # not pushed yet: still train


def test_unreadable_rejection_record_is_an_error_naming_the_file(data, tmp_path):
    serving = tmp_path / "serving"
    evaluate(gate(data, serving, tmp_path), serving, tmp_path, blessed=False)
    [record] = rejections(serving)
    record.write_text("[1, 2")
    with pytest.raises(TrainingDataRecordError, match=f"{record.name} is not valid JSON"):
        gate(data, serving, tmp_path)


def test_the_recipe_fingerprint_follows_the_trainers_config_only(tmp_path):
    from pipeline.local import local_location
    from pipeline.pipeline import create_pipeline

    def recipe(*overrides: str) -> str:
        config = load_config(overrides=[f"home={tmp_path}", *overrides])
        components = create_pipeline(config, local_location(config)).components
        [gate_component] = [c for c in components if c.id == GATE_ID]
        return gate_component.exec_properties["recipe"]

    base = recipe()
    assert len(base) == 64
    assert recipe("train.epochs=7") != base
    assert recipe("eval.min_top1=0.9") != base
    assert recipe("retrain_on_same_data=true") == base
    assert recipe("kubeflow.gpus=2") == base


def test_record_rejection_follows_the_evaluator(tmp_path):
    from pipeline.local import local_location
    from pipeline.pipeline import create_pipeline

    config = load_config(overrides=[f"home={tmp_path}"])
    components = {c.id: c for c in create_pipeline(config, local_location(config)).components}
    record = components["RecordRejection"]
    assert record.inputs["model_blessing"] is components["Evaluator"].outputs["blessing"]
    assert record.inputs["decision"] is components[GATE_ID].outputs["decision"]
    assert record.exec_properties["serving_base_path"] == str(config.serving_base_path)


def test_a_pinned_span_is_what_the_gate_decides_on_though_a_newer_one_landed(tmp_path):
    data, serving = tmp_path / "data", tmp_path / "serving"
    write_span(data, 1)
    write_span(data, 2)  # landed after the run resolved span 1
    decision = gate(data, serving, tmp_path, span=1)
    assert decision.get_int_custom_property("span") == 1
    assert gate(data, serving, tmp_path).get_int_custom_property("span") == 2


def test_a_local_run_pins_the_gate_and_both_example_gens_to_its_span(tmp_path):
    from pipeline.local import local_location
    from pipeline.pipeline import create_pipeline

    def spans_of(config, span):
        components = {
            c.id: c for c in create_pipeline(config, local_location(config), span).components
        }
        ranges = [
            components[name].exec_properties["range_config"]
            for name in ("ImportExampleGen", "EvalExampleGen")
        ]
        return components[GATE_ID].exec_properties["span"], ranges

    config = load_config(overrides=[f"home={tmp_path}"])
    gate_span, ranges = spans_of(config, 3)
    assert gate_span == 3
    for text in ranges:
        assert '"start_span_number": 3' in text and '"end_span_number": 3' in text
    assert spans_of(config, None) == (-1, [None, None])  # KFP: the executors take the decision's
    plain = load_config(overrides=[f"home={tmp_path}", "data.layout=plain"])
    assert spans_of(plain, 0) == (-1, [None, None])  # no {SPAN} in the patterns: nothing to pin


@pytest.mark.parametrize("force", [False, True])
def test_force_reaches_the_gate_and_the_local_gate_is_never_cached(tmp_path, force):
    from tfx.dsl.compiler import compiler

    from pipeline.local import local_location, never_cache, with_force
    from pipeline.pipeline import create_pipeline

    config = with_force(load_config(overrides=[f"home={tmp_path}"]), force)
    ir = compiler.Compiler().compile(create_pipeline(config, local_location(config)))
    never_cache(ir, GATE_ID)
    nodes = {n.pipeline_node.node_info.id: n.pipeline_node for n in ir.nodes}
    gate_node = nodes[GATE_ID]
    assert gate_node.parameters.parameters["force"].field_value.int_value == int(force)
    assert not gate_node.execution_options.caching_options.enable_cache
    assert nodes["Transform"].execution_options.caching_options.enable_cache
    assert not gate_node.inputs.inputs, "the gate reads the data root itself, before ingestion"
    for name, node in nodes.items():
        if name != GATE_ID:
            assert node.inputs.conditionals, f"{name} runs whatever the gate decided"


# --- A span still being uploaded: the gate waits instead of ingest failing the run ---


def incomplete(decision: File) -> int:
    return decision.get_int_custom_property(INCOMPLETE_KEY)


@pytest.fixture
def served_span_1(data, tmp_path) -> Path:
    """The serving directory of a model trained on span 1 (the data fixture)."""
    serving = tmp_path / "serving"
    push(serving, 1700000000, decision_of(data, tmp_path))
    return serving


def test_a_span_with_shards_still_missing_is_no_new_data_naming_split_and_shards(
    data, served_span_1, tmp_path
):
    # Before: new data, then ImportExampleGen's IncompleteShardsError failed the run.
    write_shards(data / "span-7", "train", 16, range(3))
    write_shards(data / "span-7", "validation", 1)
    decision = gate(data, served_span_1, tmp_path)
    assert new_data(decision) == 0 and incomplete(decision) == 1
    assert reason(decision).startswith(
        "span 7 is still incomplete: train has 3 of 16 shards (missing train-00003-of-00016, "
        "train-00004-of-00016, train-00005-of-00016, train-00006-of-00016, "
        "train-00007-of-00016 and 8 more); nothing is ingested until it is complete"
    )
    assert decision.get_int_custom_property("span") == 7
    written = json.loads(Path(decision.uri, "decision.json").read_text())
    assert written[INCOMPLETE_KEY] == 1 and written[NEW_DATA_KEY] == 0 and written["span"] == 7
    # The upload completes: the next scheduled run trains on it.
    write_shards(data / "span-7", "train", 16, range(3, 16))
    decision = gate(data, served_span_1, tmp_path)
    assert new_data(decision) == 1 and incomplete(decision) == 0
    assert reason(decision).startswith("new data: span 7")


@pytest.mark.parametrize("pinned", [-1, 7], ids=["newest", "pinned"])
def test_a_split_with_no_file_of_the_new_span_yet_is_no_new_data(
    data, served_span_1, tmp_path, pinned
):
    # Before: TFX's "Latest span should be the same for each split" (pinned, as `van-tfx run`
    # pins it: "Cannot find matching for split eval") failed the gate itself.
    write_shards(data / "span-7", "train", 2)
    decision = gate(data, served_span_1, tmp_path, span=pinned)
    assert new_data(decision) == 0 and incomplete(decision) == 1
    assert reason(decision).startswith(
        f"span 7 is still incomplete: eval has no files of it yet ({data}/span-7/validation-*)"
    )


def test_forcing_a_retrain_does_not_ingest_an_incomplete_span(data, served_span_1, tmp_path):
    write_shards(data / "span-7", "train", 4, [0, 1, 3])
    write_shards(data / "span-7", "validation", 1)
    decision = gate(data, served_span_1, tmp_path, force=True)
    assert new_data(decision) == 0 and incomplete(decision) == 1
    assert reason(decision).startswith(
        "retraining is forced (retrain_on_same_data), but span 7 is still incomplete: "
        "train has 3 of 4 shards (missing train-00002-of-00004)"
    )


def test_shards_wrong_in_a_way_waiting_cannot_mend_are_refused_by_the_gate_as_by_ingest(
    data, served_span_1, tmp_path
):
    # Nothing missing, so no upload in progress: two sets of train shards (every record twice).
    write_shards(data / "span-7", "train", 2)
    write_shards(data / "span-7", "train", 1)
    write_shards(data / "span-7", "validation", 1)
    with pytest.raises(IncompleteShardsError) as failure:
        gate(data, served_span_1, tmp_path)
    paths = [str(p) for p in sorted((data / "span-7").glob("train-*"))]
    with pytest.raises(IncompleteShardsError) as ingest_refusal:
        check_shard_set("train", f"{data}/span-7/train-*", paths)
    assert str(failure.value) == str(ingest_refusal.value)
    assert "more than one set of shards: train-*-of-00001, train-*-of-00002" in str(failure.value)


def test_an_upload_temporary_file_is_named_while_the_span_waits(data, served_span_1, tmp_path):
    # `hadoop fs -put` writes each file as NAME._COPYING_ and renames it when done.
    write_shards(data / "span-7", "train", 4, range(3))
    (data / "span-7" / "train-00003-of-00004._COPYING_").write_bytes(b"half a shard")
    write_shards(data / "span-7", "validation", 1)
    decision = gate(data, served_span_1, tmp_path)
    assert new_data(decision) == 0 and incomplete(decision) == 1
    assert (
        "train has 3 of 4 shards (missing train-00003-of-00004), and "
        f"{data}/span-7/train-00003-of-00004._COPYING_ is not named" in reason(decision)
    )


@settings(max_examples=40, deadline=None)
@given(
    train_total=st.integers(1, 7),
    train_present=st.sets(st.integers(0, 6)),
    eval_present=st.sets(st.integers(0, 1)),
    copying=st.booleans(),
)
def test_the_gates_verdict_on_a_new_span_follows_the_shard_rule(
    train_total, train_present, eval_present, copying
):
    train_present = sorted(i for i in train_present if i < train_total)
    eval_present = sorted(eval_present)
    train_missing = [i for i in range(train_total) if i not in train_present]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        write_span(data, 1)
        write_shards(data / "span-2", "train", train_total, train_present)
        write_shards(data / "span-2", "validation", 2, eval_present)
        if copying and train_present and train_missing:
            name = f"train-{train_missing[0]:05d}-of-{train_total:05d}._COPYING_"
            (data / "span-2" / name).write_bytes(b"")
        decision = gate(data, tmp / "serving", tmp)
    arrived = bool(train_present or eval_present)  # else span 2 has no file: span 1 is newest
    complete = not train_missing and len(eval_present) == 2
    assert incomplete(decision) == int(arrived and not complete)
    assert new_data(decision) == int(not incomplete(decision))  # nothing is served yet
    assert decision.get_int_custom_property("span") == (2 if arrived else 1)
    if not incomplete(decision):
        return
    said = reason(decision)
    assert said.startswith("span 2 is still incomplete: ")
    for split, stem, shards, present, total in (
        ("train", "train", "shards", train_present, train_total),
        ("eval", "validation", "validation shards", eval_present, 2),
    ):
        if not present:
            assert f"{split} has no files of it yet" in said
        elif len(present) < total:
            first = min(set(range(total)) - set(present))
            assert (
                f"{split} has {len(present)} of {total} {shards} "
                f"(missing {stem}-{first:05d}-of-{total:05d}"
            ) in said
        else:
            assert f"{split} has" not in said


@given(
    total=st.integers(1, 6),
    present=st.lists(st.tuples(st.integers(0, 7), st.booleans()), max_size=9),
    extra=st.sampled_from(["", "train-00000-of-00009", "notes.txt", "train-00001-of-00006._COPYING_"]),
)  # fmt: skip
def test_the_gate_waits_exactly_when_ingest_would_refuse_for_missing_shards(total, present, extra):
    # One rule: the gate's verdict on a split's names agrees with ingest's check_shard_set.
    names = [f"train-{i:05d}-of-{total:05d}" + (".gz" if gz else "") for i, gz in present]
    paths = [f"/d/span-2/{name}" for name in names + ([extra] if extra else [])]
    files = SpanFiles("train", "/d/span-2/train-*", paths, "/d/span-2")
    try:
        check_shard_set("train", files.pattern, paths)
        ingest_refuses = False
    except IncompleteShardsError:
        ingest_refuses = True
    missing = bool(shard_sets("train", files.pattern, paths).missing)
    try:
        waits = incompleteness("span 2", [files]) is not None
        gate_refuses = False
    except IncompleteShardsError:
        waits, gate_refuses = False, True
    assert waits == missing  # wait only for shards still to come
    assert ingest_refuses == (waits or gate_refuses)  # what the gate passes, ingest takes


def test_the_gate_lists_an_imagenet_sized_span_without_opening_a_shard(tmp_path):
    # Every shard a FIFO: listing and stat (the fingerprint) work, opening one would block until
    # the subprocess's timeout. ImageNet-1k: 1,024 train shards, 128 validation shards.
    data = tmp_path / "data"
    write_span(data, 1)
    span = data / "span-2"
    span.mkdir()
    for name in [f"train-{i:05d}-of-01024" for i in range(1023)] + [
        f"validation-{i:05d}-of-00128" for i in range(128)
    ]:
        os.mkfifo(span / name)
    config = input_config_json()
    code = (
        "import json, sys, time; from components.new_data_gate import data_to_ingest; "
        "start = time.monotonic(); seen = data_to_ingest(sys.argv[1], sys.argv[2]); "
        "print(json.dumps({**seen, 'seconds': time.monotonic() - start}))"
    )
    run = [sys.executable, "-c", code, str(data), config]
    found = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert found.returncode == 0, found.stderr[-3000:]
    seen = json.loads(found.stdout.strip().splitlines()[-1])
    assert seen["span"] == 2
    assert seen[INCOMPLETE_KEY].startswith(
        "span 2 is still incomplete: train has 1023 of 1024 shards (missing train-01023-of-01024)"
    )
    assert seen["seconds"] < 30, seen["seconds"]
    os.mkfifo(span / "train-01023-of-01024")
    start = time.monotonic()
    found = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert found.returncode == 0, found.stderr[-3000:]
    seen = json.loads(found.stdout.strip().splitlines()[-1])
    assert seen["span"] == 2 and seen[INCOMPLETE_KEY] is None
    assert "num_files:1024" in seen["input_fingerprint"], time.monotonic() - start


def test_van_tfx_run_reports_an_incomplete_span_without_starting_the_pipeline(tmp_path):
    from pipeline.local import STATE_FILE, run_locally

    config = load_config(overrides=[f"home={tmp_path}"])
    write_span(config.data_dir, 1)
    write_shards(config.data_dir / "span-2", "train", 4, [0, 2])
    messages = []
    outcome = run_locally(config, echo=messages.append)
    assert not outcome.trained and outcome.span == 2
    assert outcome.reasons == [
        "nothing new to train on yet: span 2 is still incomplete: train has 2 of 4 shards "
        "(missing train-00001-of-00004, train-00003-of-00004); eval has no files of it yet "
        f"({config.data_dir}/span-2/validation-*); nothing was trained or pushed. Run again "
        "once the upload is complete."
    ]
    # No run was recorded, so the next `van-tfx run` looks again; no pipeline started.
    assert not (tmp_path / STATE_FILE).exists() and messages == []
    assert not Path(config.pipeline_root).exists()
    assert run_locally(config, force=True).reasons == outcome.reasons


def test_a_run_closed_by_an_incomplete_span_reads_as_waiting_in_outcome_and_report(
    data, served_span_1, tmp_path
):
    from pipeline.local import mlmd_properties
    from pipeline.outcome import RunArtifact, print_outcome, summarize
    from pipeline.report import write_report

    write_shards(data / "span-7", "train", 16, range(3))
    write_shards(data / "span-7", "validation", 1)
    decision = gate(data, served_span_1, tmp_path)
    outputs = {"File": [RunArtifact("File", decision.uri, mlmd_properties(decision.mlmd_artifact))]}
    outcome = summarize(outputs, 7, "run-1")
    [said] = outcome.reasons
    assert said.startswith(
        "nothing new to train on yet: trained nothing (span 7 is still incomplete: train has 3 "
        "of 16 shards (missing train-00003-of-00016"
    )
    assert said.endswith("If every run says this of the same span, its upload has stopped.")
    assert "--force" not in said  # forcing cannot ingest an incomplete span
    report = Path(write_report(tmp_path / "report.html", outputs, outcome)).read_text()
    assert "Trained nothing, pushed nothing." in report and "span 7 is still incomplete" in report
    printed = tempfile.TemporaryFile("w+")
    print_outcome(outcome, printed)
    printed.seek(0)
    assert printed.read().startswith("nothing new to train on yet: trained nothing (span 7")


# --- span-1 beside span-01: TFX ingests one, fingerprints either; the gate refuses ---


def tfx_driver_patterns(data: Path, data_config: DataConfig | None = None) -> list[str]:
    """The split patterns TFX 1.16's own ExampleGen driver resolves for this data root."""
    from tfx.components.example_gen import driver
    from tfx.proto import example_gen_pb2

    properties = {"input_base": str(data), "input_config": input_config_json(data_config)}
    resolved = driver.FileBasedDriver(None).resolve_exec_properties(properties, None, None)
    config = proto_utils.json_to_proto(resolved["input_config"], example_gen_pb2.Input())
    return [split.pattern for split in config.splits]


def test_span_1_beside_span_01_is_refused_naming_both_directories(tmp_path):
    data = tmp_path / "data"
    write_span(data, 1)
    (data / "span-1").rename(data / "span-01")
    write_span(data, 1)
    # TFX's own driver ingests span-1 and never reads span-01 (its fingerprint, of the
    # directory its unordered glob lists first, may be of either).
    assert tfx_driver_patterns(data) == ["span-1/train-*", "span-1/validation-*"]
    for pinned in (-1, 1):  # KFP's gate resolves the newest; `van-tfx run` pins it
        with pytest.raises(SpanNamingError) as failure:
            gate(data, tmp_path / "serving", tmp_path, span=pinned)
        message = str(failure.value)
        assert message.startswith(
            f"span 1 is in more than one directory: {data}/span-1 and {data}/span-01 (the "
            "train split's pattern span-{SPAN}/train-* matches each as span 1). TFX's "
            f"ExampleGen ingests only {data}/span-1"
        )
        assert f"never reads {data}/span-01" in message
    # Only the span a run ingests matters: an older one spelled twice does not stop a newer one.
    write_span(data, 2)
    assert new_data(gate(data, tmp_path / "serving", tmp_path)) == 1


def test_a_span_only_in_a_zero_padded_directory_is_refused_naming_it(tmp_path):
    # TFX finds span 1 in span-01, fingerprints it, and its driver then points ingestion at
    # span-1, which holds nothing: the run failed at ingestion.
    data = tmp_path / "data"
    write_span(data, 1)
    (data / "span-1").rename(data / "span-01")
    assert tfx_driver_patterns(data) == ["span-1/train-*", "span-1/validation-*"]
    with pytest.raises(SpanNamingError) as failure:
        gate(data, tmp_path / "serving", tmp_path)
    assert str(failure.value).startswith(
        f"span 1 is in {data}/span-01, but the train split's pattern span-{{SPAN}}/train-* "
        f"spells span 1 as {data}/span-1, where TFX's ExampleGen would look for it and find "
        "nothing. Rename "
    )


def test_with_a_span_width_tfxs_nameless_error_becomes_one_naming_the_directories(tmp_path):
    data = tmp_path / "data"
    write_span(data, 1)
    (data / "span-1").rename(data / "span-01")
    write_span(data, 1)
    width = DataConfig(
        train_pattern="span-{SPAN:2}/train-*", eval_pattern="span-{SPAN:2}/validation-*"
    )
    with pytest.raises(ValueError, match="^Glob pattern does not match regex pattern$"):
        tfx_driver_patterns(data, width)  # what TFX says, naming nothing
    with pytest.raises(SpanNamingError) as failure:
        gate(data, tmp_path / "serving", tmp_path, data_config=width)
    assert str(failure.value).startswith(
        "the train split's pattern span-{SPAN:2}/train-* takes span numbers written with 2 "
        f"digits, and {data}/span-1 (span 1, which is also in {data}/span-01) is not"
    )
    # Pinned to span 1, TFX reads span-01 and ignores span-1: refused as well, naming both.
    with pytest.raises(SpanNamingError, match=f"never reads {data}/span-1;"):
        gate(data, tmp_path / "serving", tmp_path, span=1, data_config=width)


def test_a_span_directory_of_no_number_under_a_width_is_named_too(tmp_path):
    # "²" passes str.isdigit, not int(): the explanation of TFX's nameless error crashed on it.
    data = tmp_path / "data"
    write_span(data, 1)
    (data / "span-1").rename(data / "span-01")
    write_span(data, 1)
    (data / "span-1").rename(data / "span-\u00b2")
    width = DataConfig(
        train_pattern="span-{SPAN:2}/train-*", eval_pattern="span-{SPAN:2}/validation-*"
    )
    with pytest.raises(SpanNamingError) as failure:
        gate(data, tmp_path / "serving", tmp_path, data_config=width)
    assert f"and {data}/span-\u00b2 (no span number) is not" in str(failure.value)


def test_van_tfx_run_skips_the_data_of_its_last_run_only_when_the_gate_would(tmp_path):
    # The local check compared the data with last_run.json alone: after a run whose smoke test
    # failed (nothing pushed), or a rollback to a version trained on other data, it said "no new
    # data" until --force, where the pipeline's gate would have trained.
    import shutil

    from pipeline.local import current_data, local_location, same_data_as_last_run

    config = load_config(overrides=[f"home={tmp_path}"])
    write_span(config.data_dir, 1)
    current = current_data(config, local_location(config))
    last = {"run_id": "20261206-010203", "fingerprint": current["input_fingerprint"]}
    serving = config.serving_base_path
    assert same_data_as_last_run(config, current, last) is None  # nothing pushed: train

    push(serving, 1700000000, decision_of(config.data_dir, tmp_path))  # trained on this data
    assert same_data_as_last_run(config, current, last) == (
        "no new data: span 1 with the same input fingerprint is what served version 1700000000 "
        "was trained on (last run 20261206-010203); nothing was trained or pushed. Add data "
        "(e.g. `van-tfx data sample --new-span`) or retrain anyway with `van-tfx run --force`."
    )
    # `van-tfx demo` prints it too, and has no --force (it said "pass --force"): the command
    # named is one the CLI takes.
    from van_tfx.cli import build_parser

    assert build_parser().parse_args(["run", "--force"]).force is True
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--force"])
    other = {**last, "fingerprint": "another"}
    assert same_data_as_last_run(config, current, other) is None  # the data changed
    assert same_data_as_last_run(config, current, None) is None

    push(serving, 1700000001, None)  # a hand push or rollback, trained on who knows what
    assert same_data_as_last_run(config, current, last) is None
    shutil.rmtree(serving / "1700000001")
    assert same_data_as_last_run(config, current, last) is not None
