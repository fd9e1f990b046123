"""NewDataGate: its decision on real data files, real SavedModel version dirs, real artifacts."""

import json
import os
import uuid
from pathlib import Path

import pytest
import tensorflow as tf
from spans import write_span
from tfx.types.experimental.simple_artifacts import File
from tfx.types.standard_artifacts import ModelBlessing
from tfx.utils import proto_utils

from components.new_data_gate import (
    GATE_ID,
    NEW_DATA_KEY,
    REASON_KEY,
    REJECTIONS_DIR,
    SERVED_VERSION_KEY,
    NewDataGate,
    RecordRejection,
    TrainingDataRecordError,
    training_data_path,
    write_training_data,
)
from pipeline import ingest
from serving.manager import list_versions
from van_tfx.config import DataConfig, load_config


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
) -> File:
    """Run the component's function on the real data root; return its decision artifact."""
    decision = File()
    decision.uri = str(tmp_path / GATE_ID / "decision" / uuid.uuid4().hex)
    NewDataGate.test_call(
        decision=decision,
        input_base=str(data_root),
        input_config=proto_utils.proto_to_json(ingest.input_config(DataConfig())),
        serving_base_path=str(serving),
        force=int(force),
        recipe=recipe,
        span=span,
    )
    return decision


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
