"""NewDataGate: a run ingests and trains only when its data differs from what the served model learned.

The gate is the first task of the pipeline. It resolves the span ImportExampleGen would ingest
(TFX's FileBasedInputProcessor: newest `{SPAN}`, and the input fingerprint of its files: names,
sizes, mtimes; components/input_fingerprint.py, TFX's string with the stats made concurrently) and
compares it with the record the served model carries,
`<serving_base_path>/<newest version>/assets.extra/van_training_data.json`, which ServingSmokeTest
writes into the copy Pusher pushes. Every other task runs under `Cond(new_data == 1)`, so an idle
scheduled run costs the gate's look: three listings per split (two by TFX's resolution, one of
the gate's own), a stat of each of the span's files (the fingerprint; ~1,301 at ImageNet-1k, 16
at a time, each a round trip on object storage) and a few reads in the serving directory. Not a
copy of the dataset, its statistics and a Transform pass (what ImportExampleGen, StatisticsGen
and Transform would spend on unchanged data).

TFX caching cannot do this job: after a push the baseline (the served model) is a new Trainer input,
so an idle night would retrain and usually push again, night after night. The decision carries
`new_data` (1/0), a readable `reason`, the span and fingerprint it saw, and `served_version`, the
version the ServedModel baseline then copies (so the comparison and the baseline refer to one model).

A candidate the Evaluator rejects is never pushed, so the served record alone would send every later
run back to the same span: at ImageNet-1k, days of training each night for the same verdict.
RecordRejection (after the Evaluator) therefore writes `<serving_base_path>/.van_tfx_rejected/
span-<N>-<key>.json`, keyed by span, input fingerprint and the training recipe's fingerprint (the
Trainer's custom_config, thresholds included), and the gate skips what was already rejected
against the model served now. New data, a changed recipe, another served model (a push by hand, a
rollback) or `retrain_on_same_data` trains again. TF Serving (and `serving/`) skip the
directory: its name is not a version number.

A scheduled run may start while the newest span is still being uploaded. Ingest refuses an
incomplete shard set (IncompleteShardsError), which made that normal situation a failed run, and
TFX itself refuses a span that one split does not have yet ("Latest span should be the same for
each split"). The gate therefore lists the span's files (components/span_files.py; names only, one
listing per split) and, when shards or a split are missing, decides 0 with `incomplete` = 1 and a
reason naming the span, each split and what it lacks: the run is a no-op and the next one looks
again. Ingest keeps its own check, since a span can change between the gate and ingestion. It
does not fall back to an older complete span: a run trains on the newest span only, an older one
was normally what the served model learned already (so falling back would decide 0 anyway), and
where it was not (its run failed, its candidate was rejected) training on it now would spend a
whole training run on data the span being uploaded replaces by the next night. A span directory
spelled two ways (`span-1` beside `span-01`), which TFX ingests from one and fingerprints from
either, is refused naming both (SpanNamingError).

The gate reads state outside its inputs (the data root and the serving directory), so it must never
be served from a cache: the local runner and the Kubeflow compiler both switch caching off for it.
"""

import datetime
import hashlib
import json
import os
import sys

import tensorflow as tf
from tfx.dsl.component.experimental.annotations import InputArtifact, OutputArtifact, Parameter
from tfx.dsl.component.experimental.decorators import component
from tfx.types.experimental.simple_artifacts import File
from tfx.types.standard_artifacts import ModelBlessing

from components.input_fingerprint import InputProcessor
from components.span_files import (
    TFX_NO_MATCH,
    TFX_UNFIT_NAME,
    SpanNamingError,
    check_spelling,
    incompleteness,
    span_files,
    unfit_span_names,
)
from serving.manager import version_dirs
from van_tfx import storage

GATE_ID = "NewDataGate"
DECISION_OUTPUT = "decision"
# A first-party TFX type: KFP v2 maps it to `tfx.File`; a custom type would need its import path
# as a one-dot schema title.
DECISION_TYPE_NAME = File.TYPE_NAME
NEW_DATA_KEY = "new_data"  # int custom property of the decision: 1 train, 0 skip
REASON_KEY = "reason"
SPAN_KEY = "span"
FINGERPRINT_KEY = "input_fingerprint"  # the name ImportExampleGen's driver uses
SERVED_VERSION_KEY = "served_version"  # "" when nothing is served
RECIPE_KEY = "recipe_fingerprint"  # sha256 of the Trainer's custom_config
VERSION_KEY = "version"  # int custom property, absent when the patterns have no {VERSION}
# int custom property: 1 when new_data is 0 because the span is still incomplete (an upload in
# progress); the reason names the split and what is missing.
INCOMPLETE_KEY = "incomplete"
DECISION_FILE = "decision.json"
TRAINING_DATA_FILE = "van_training_data.json"  # next to TF Serving's warmup file
_ASSETS_EXTRA = "assets.extra"
# Inside the serving base path, so the gate's whole state lives in one place; not a version name.
REJECTIONS_DIR = ".van_tfx_rejected"
_BLESSED_KEY = "blessed"  # the Evaluator's verdict on its ModelBlessing, as Pusher reads it


# The largest record read: the gate's records (training data, rejections) are a few hundred bytes.
MAX_RECORD_BYTES = 1 << 20


class TrainingDataRecordError(ValueError):
    """A served model's training-data record is unreadable; the message names the file."""


def span_range(span: int):
    """The RangeConfig of one span alone, as ExampleGen's driver and input processor read it."""
    from tfx.proto import range_config_pb2

    return range_config_pb2.RangeConfig(
        static_range=range_config_pb2.StaticRange(start_span_number=span, end_span_number=span)
    )


def _resolve(
    input_base: str, splits, only, fingerprint: bool = True
) -> tuple[int, int | None, str | None]:
    """(span, version, input fingerprint or None) as TFX's FileBasedInputProcessor resolves them."""
    # TFX's resolution, its fingerprint's stats made concurrently (components/input_fingerprint).
    # TFX's nameless error for a span directory of the wrong {SPAN:w} width becomes a
    # SpanNamingError naming the directories.
    processor = InputProcessor(input_base, splits, only)
    try:
        span, version = processor.resolve_span_and_version(fingerprint)
    except ValueError as exc:
        why = unfit_span_names(input_base, splits) if str(exc) == TFX_UNFIT_NAME else None
        if why is None:
            raise
        raise SpanNamingError(why) from None
    return span, version, processor.get_input_fingerprint(span, version) if fingerprint else None


def _newest_of_each_split(input_base: str, splits, only) -> dict[str, tuple[int, int | None]]:
    """{split name: (span, version)} each split resolves to alone; splits with no span left out."""
    newest = {}
    for split in splits:
        try:
            # Span and version only: this split's fingerprint would be thrown away.
            span, version, _ = _resolve(input_base, [split], only, fingerprint=False)
        except SpanNamingError:
            raise
        except ValueError as exc:
            if not str(exc).startswith(TFX_NO_MATCH):
                raise
            continue
        newest[split.name] = (span, version)
    return newest


def data_to_ingest(input_base: str, input_config_json: str, span: int | None = None) -> dict:
    """Span, version, fingerprint and completeness of what ImportExampleGen would ingest now."""
    # TFX's own resolution: of `span` when the run pinned one, else of the newest.
    from tfx.components.example_gen import utils
    from tfx.proto import example_gen_pb2
    from tfx.utils import proto_utils

    config = proto_utils.json_to_proto(input_config_json, example_gen_pb2.Input())
    only = None if span is None else span_range(span)
    lacking: set[str] = set()
    try:
        span, version, fingerprint = _resolve(input_base, config.splits, only)
    except SpanNamingError:
        raise
    except ValueError:
        # TFX refuses a span that not every split has ("Latest span should be the same for each
        # split"; pinned: "Cannot find matching for split"), which is what an upload in
        # progress looks like until its last split lands: then the newest span is incomplete.
        newest = _newest_of_each_split(input_base, config.splits, only)
        if not newest or (len(newest) == len(config.splits) and len(set(newest.values())) == 1):
            raise  # no data at all, or TFX refused something else
        span, version = max(newest.values(), key=lambda sv: (sv[0], -1 if sv[1] is None else sv[1]))
        lacking = {
            split.name for split in config.splits if newest.get(split.name) != (span, version)
        }
        fingerprint = ""  # TFX fingerprints a span only when every split has it
    # One listing per split, names only: at ImageNet-1k ~1,300 shards, none of them opened.
    listed = [span_files(input_base, split, span, version) for split in config.splits]
    check_spelling(span, listed, {split.name: split.pattern for split in config.splits})
    spans = any(any(utils.verify_split_pattern_specs(split)) for split in config.splits)
    what = f"span {span}" if spans else f"the data in {input_base}"
    what += "" if version is None else f" version {version}"
    return {
        "span": span,
        VERSION_KEY: version,
        "input_fingerprint": fingerprint,
        INCOMPLETE_KEY: incompleteness(what, listed, lacking),
    }


def decided_data(decision) -> dict:
    """Span, version (None without {VERSION}) and input fingerprint a gate decision names."""
    version = None
    if decision.has_custom_property(VERSION_KEY):
        version = decision.get_int_custom_property(VERSION_KEY)
    return {
        "span": decision.get_int_custom_property(SPAN_KEY),
        VERSION_KEY: version,
        "input_fingerprint": decision.get_string_custom_property(FINGERPRINT_KEY),
    }


def span_pattern(input_base: str, split_pattern: str, span: int, version: int | None) -> str:
    """A split pattern with `{SPAN}` / `{VERSION}` filled in, under `input_base` (TFX's rules)."""
    from tfx.components.example_gen import utils
    from tfx.proto import example_gen_pb2

    split = example_gen_pb2.Input.Split(name="split", pattern=split_pattern)
    is_span, is_date, is_version = utils.verify_split_pattern_specs(split)
    pattern = utils.get_pattern_for_span_version(
        split_pattern, is_span, is_date, is_version, span, version
    )
    return os.path.join(input_base, pattern)


def training_data_path(model_dir: str) -> str:
    """Where a pushed model keeps the record of the data it was trained on."""
    return os.path.join(model_dir, _ASSETS_EXTRA, TRAINING_DATA_FILE)


def write_training_data(model_dir: str, decision) -> None:
    """Record in `model_dir` which data (span, fingerprint) the gate opened this run for."""
    data = decided_data(decision)
    record = {
        "span": data["span"],
        "input_fingerprint": data["input_fingerprint"],
        "decision_uri": decision.uri,
    }
    storage.write_text(training_data_path(model_dir), json.dumps(record, indent=2))


def newest_served_version(serving_base_path: str) -> str | None:
    """The directory of the version TF Serving would serve: the highest integer dir with a model."""
    # The dir must hold saved_model.pb; it is named as it is on disk (`007` stays `007`).
    # The model server's own listing: a version still being pushed (no saved_model.pb yet, the
    # Pusher copies it last) is not served, so it is not what the data is compared with.
    dirs = version_dirs(serving_base_path) or {}
    return dirs[max(dirs)] if dirs else None


def read_training_data(model_dir: str) -> dict | None:
    """The training-data record of a pushed model; None for a model pushed without one."""
    return read_record(training_data_path(model_dir), ("span", "input_fingerprint"))


# The types the gate compares and formats these keys as (a span of "2" was a TypeError).
_RECORD_TYPES = {SPAN_KEY: int, FINGERPRINT_KEY: str, VERSION_KEY: (int, type(None))}
_KIND_NAMES = {int: "an integer", str: "a string", (int, type(None)): "an integer or null"}


def read_record(path: str, required: tuple[str, ...] = ()) -> dict | None:
    """A JSON object file holding the `required` keys; None when there is no such file."""
    # A TrainingDataRecordError names the file when it is not one.
    if not tf.io.gfile.exists(path):
        return None
    try:
        with tf.io.gfile.GFile(path, "rb") as handle:
            # No more than a record can be: json held ~5x a file's size (a 100 MB one, 490 MB).
            data = handle.read(MAX_RECORD_BYTES + 1)
    except tf.errors.OpError as exc:
        raise TrainingDataRecordError(f"{path} is unreadable: {exc.message}") from None
    if len(data) > MAX_RECORD_BYTES:
        raise TrainingDataRecordError(
            f"{path} is over {MAX_RECORD_BYTES} bytes: not a record (they hold a few hundred)"
        )
    try:
        text = data.decode("utf-8")
        record = json.loads(text)
    except UnicodeDecodeError as exc:
        raise TrainingDataRecordError(f"{path} is not valid JSON: not UTF-8 text ({exc})") from None
    except ValueError as exc:  # JSONDecodeError, or an integer of more than 4,300 digits
        raise TrainingDataRecordError(f"{path} is not valid JSON: {exc}") from None
    except RecursionError:  # json's scanner recurses per level: `[[[...]]]` ~1,000 deep
        raise TrainingDataRecordError(
            f"{path} is not valid JSON: arrays or objects nested too deep for its parser"
        ) from None
    if not isinstance(record, dict) or not set(required) <= set(record):
        keys = " and ".join(f"'{key}'" for key in required)
        raise TrainingDataRecordError(
            f"{path} must hold a JSON object{' with ' + keys if keys else ''}, got {text[:200]!r}"
        )
    for key, kind in _RECORD_TYPES.items():
        value = record.get(key)
        # bool is an int in Python; a span of true is not a span.
        if key in record and (not isinstance(value, kind) or isinstance(value, bool)):
            raise TrainingDataRecordError(
                f"{path}: '{key}' must be {_KIND_NAMES[kind]}, got {json.dumps(value)[:100]}"
            )
    return record


def recipe_fingerprint(custom_config: dict) -> str:
    """sha256 of the Trainer's custom_config: what, besides the data, decides a candidate."""
    text = json.dumps(custom_config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def rejection_path(serving_base_path: str, current: dict) -> str:
    """Where the rejection of a candidate trained on `current` (span, fingerprints) is recorded."""
    identity = [current["span"], current["input_fingerprint"], current.get(RECIPE_KEY, "")]
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:32]
    return os.path.join(serving_base_path, REJECTIONS_DIR, f"span-{current['span']}-{key}.json")


def write_rejection(serving_base_path: str, current: dict, blessing_uri: str) -> str:
    """Record that a candidate trained on `current` was not blessed; returns the record's path."""
    path = rejection_path(serving_base_path, current)
    record = {
        "span": current["span"],
        "input_fingerprint": current["input_fingerprint"],
        RECIPE_KEY: current.get(RECIPE_KEY, ""),
        SERVED_VERSION_KEY: current.get(SERVED_VERSION_KEY, ""),  # the baseline it lost to
        "model_blessing": blessing_uri,
        "recorded_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    storage.write_text(path, json.dumps(record, indent=2))
    return path


def read_rejection(serving_base_path: str, current: dict) -> dict | None:
    """The rejection record of a candidate trained on `current`, or None when there is none."""
    path = rejection_path(serving_base_path, current)
    record = read_record(path)
    return None if record is None else {**record, "path": path}


def compare_with_served(current: dict, serving_base_path: str, version: str | None):
    """(train?, why): the data `current` against the record of served version `version`."""
    span = current["span"]
    if version is None:
        return True, f"no model is served from {serving_base_path} yet: train on span {span}"
    record = read_training_data(os.path.join(serving_base_path, version))
    if record is None:
        why = (
            f"served version {version} has no {_ASSETS_EXTRA}/{TRAINING_DATA_FILE}, so what it "
            f"was trained on is unknown: train on span {span}"
        )
        return True, why
    if record["span"] != span:
        newer = "new data" if span > record["span"] else "other data"
        return (
            True,
            f"{newer}: span {span}; served version {version} was trained on span {record['span']}",
        )
    if record["input_fingerprint"] != current["input_fingerprint"]:
        why = (
            f"span {span} changed (different files, sizes or mtimes) since served version "
            f"{version} was trained on it"
        )
        return True, why
    why = (
        f"span {span} with the same input fingerprint is what served version {version} was "
        "trained on"
    )
    return False, why


def decide(current: dict, serving_base_path: str, force: bool = False) -> tuple[bool, str, str]:
    """(train?, why, served version or "") for data `current` against the served model's record."""
    # Compared with the newest served model and the candidates already rejected on the same data and
    # recipe.
    span = current["span"]
    version = newest_served_version(serving_base_path)
    served = version or ""
    if current.get(INCOMPLETE_KEY):
        # Not an older complete span instead: the newest span is the only one a run trains on,
        # and an older one was, normally, what the served model learned (see the docstring).
        why = (
            f"{current[INCOMPLETE_KEY]}; nothing is ingested until it is complete, the next run "
            "looks again"
        )
        if force:
            why = f"retraining is forced (retrain_on_same_data), but {why}"
        return False, why, served
    if force:
        return True, f"retraining forced (retrain_on_same_data) on span {span}", served
    train, why = compare_with_served(current, serving_base_path, version)
    if not train:
        return False, why, served
    rejected = read_rejection(serving_base_path, current)
    if rejected is None:
        return True, why, served
    if rejected.get(SERVED_VERSION_KEY, "") != served:
        # Judged against another baseline (a push by hand, a rollback): worth another attempt.
        judged = rejected.get(SERVED_VERSION_KEY) or "no served model"
        why += f" (a candidate on it was rejected against {judged}, which is no longer served)"
        return True, why, served
    stays = f"served version {version} stays" if version else "nothing is served"
    why = (
        f"a candidate trained on span {span} (same input fingerprint, same training recipe) "
        f"was not blessed on {rejected.get('recorded_at', '?')} ({rejected['path']}); "
        f"{stays}. New data, a changed recipe or retrain_on_same_data trains again"
    )
    return False, why, served


def has_new_data(gate):
    """The predicate for tfx.dsl.Cond: the gate decided this run has data worth training on."""
    return gate.outputs[DECISION_OUTPUT].future()[0].custom_property(NEW_DATA_KEY) == 1


@component
def NewDataGate(  # noqa: N802  (TFX component names are class-like)
    decision: OutputArtifact[File],
    input_base: Parameter[str],
    input_config: Parameter[str],
    serving_base_path: Parameter[str],
    force: Parameter[int] = 0,  # an int, not a bool: the local and KFP compilers encode it alike
    recipe: Parameter[str] = "",  # recipe_fingerprint of the Trainer's custom_config
    span: Parameter[int] = -1,  # the span the run pinned every ExampleGen to; -1: the newest
) -> None:
    """Set decision.new_data to 1 when the span is complete, new and not rejected, else 0."""
    # new_data 1: the span differs from the served model's and was not rejected against it with
    # the same recipe. 0 with incomplete 1: the span is still being uploaded.
    pinned = None if span < 0 else span
    current = {**data_to_ingest(input_base, input_config, pinned), RECIPE_KEY: recipe}
    new_data, reason, served_version = decide(current, serving_base_path, bool(force))
    incomplete = int(bool(current[INCOMPLETE_KEY]))
    decision.set_int_custom_property(NEW_DATA_KEY, int(new_data))
    decision.set_int_custom_property(INCOMPLETE_KEY, incomplete)
    decision.set_string_custom_property(REASON_KEY, reason)
    decision.set_int_custom_property(SPAN_KEY, current["span"])
    decision.set_string_custom_property(FINGERPRINT_KEY, current["input_fingerprint"])
    decision.set_string_custom_property(SERVED_VERSION_KEY, served_version)
    decision.set_string_custom_property(RECIPE_KEY, recipe)
    if current[VERSION_KEY] is not None:
        decision.set_int_custom_property(VERSION_KEY, current[VERSION_KEY])
    summary = {NEW_DATA_KEY: int(new_data), REASON_KEY: reason, **current}
    summary[INCOMPLETE_KEY] = incomplete  # the property's value; the reason says why
    summary[SERVED_VERSION_KEY] = served_version
    storage.write_text(os.path.join(decision.uri, DECISION_FILE), json.dumps(summary, indent=2))
    skipped = "" if new_data else "; every later step is skipped"
    print(f"NewDataGate: {reason}{skipped}", file=sys.stderr)


@component
def RecordRejection(  # noqa: N802  (TFX component names are class-like)
    decision: InputArtifact[File],
    model_blessing: InputArtifact[ModelBlessing],
    serving_base_path: Parameter[str],
) -> None:
    """Record the gate's span, fingerprint and recipe as rejected when the Evaluator did not bless."""
    if model_blessing.get_int_custom_property(_BLESSED_KEY) == 1:
        print(
            "RecordRejection: the Evaluator blessed the candidate; nothing to record",
            file=sys.stderr,
        )
        return
    current = {
        **decided_data(decision),
        RECIPE_KEY: decision.get_string_custom_property(RECIPE_KEY),
        SERVED_VERSION_KEY: decision.get_string_custom_property(SERVED_VERSION_KEY),
    }
    path = write_rejection(serving_base_path, current, model_blessing.uri)
    print(
        f"RecordRejection: the Evaluator did not bless the candidate trained on span "
        f"{current['span']}; recorded in {path}, so later runs skip this span and recipe",
        file=sys.stderr,
    )
