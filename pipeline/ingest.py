"""Ingestion, validation and Transform: gate, ExampleGen, StatisticsGen, schema, validator, Transform.

Split names are 'train' and 'eval' everywhere downstream. The curated schema ships with
components/curated_schema.py, which fills in the label's class count from the ingested span's
synsets.txt at run time, so no class count is hard-coded and building the pipeline writes nothing.
"""

from __future__ import annotations

from tfx import v1 as tfx
from tfx.components.example_gen import utils
from tfx.dsl.components.base import executor_spec
from tfx.proto import example_gen_pb2, transform_pb2
from tfx.types import standard_component_specs
from tfx.utils import proto_utils

from components.curated_schema import CuratedSchema
from components.example_gen import SpanResolvingImportExecutor, schema_path_config
from components.input_fingerprint import FileBasedDriver
from components.new_data_gate import NewDataGate, span_range
from components.transform_executor import ShardingTransformExecutor
from van_tfx.config import DataConfig

TRAIN_SPLIT = "train"
EVAL_SPLIT = "eval"
PREPROCESSING_FN = "van_trainer.preprocessing.preprocessing_fn"
_SPAN_DIR = "span-{SPAN}/"


def split_patterns(config: DataConfig) -> dict[str, str]:
    """File patterns of the train and eval splits, relative to the data root."""
    # The plain layout drops the `span-{SPAN}/` directory from the configured patterns, so
    # `data.layout=plain` alone reads <root>/train-* and <root>/validation-*.
    patterns = {TRAIN_SPLIT: config.train_pattern, EVAL_SPLIT: config.eval_pattern}
    if config.layout == "plain":
        patterns = {k: p.replace(_SPAN_DIR, "") for k, p in patterns.items()}
        for name, pattern in patterns.items():
            if "{SPAN}" in pattern:
                raise ValueError(
                    f"data.layout=plain but the {name} pattern {pattern!r} uses {{SPAN}}"
                )
    return patterns


def input_config(config: DataConfig, splits=(TRAIN_SPLIT, EVAL_SPLIT)) -> example_gen_pb2.Input:
    """ImportExampleGen's input config: splits 'train' and 'eval' (latest span by default)."""
    return example_gen_pb2.Input(
        splits=[
            example_gen_pb2.Input.Split(name=name, pattern=pattern)
            for name, pattern in split_patterns(config).items()
            if name in splits
        ]
    )


def pinned_span(config: DataConfig, span: int | None) -> int | None:
    """`span`, when given and the split patterns name spans ({SPAN} or a date); else None."""
    if span is None:
        return None
    specs = [utils.verify_split_pattern_specs(split) for split in input_config(config).splits]
    return span if any(is_span or is_date for is_span, is_date, _ in specs) else None


def new_data_gate(
    config: DataConfig,
    data_root: str,
    serving_base_path: str,
    force: bool,
    recipe: str = "",
    span: int | None = None,
) -> NewDataGate:
    """The gate comparing the span ExampleGen would ingest with the served model's record."""
    # The span: `span`, a pinned_span, else the newest. It is also compared with the candidates
    # rejected on it under the same `recipe` fingerprint.
    return NewDataGate(
        input_base=str(data_root),
        input_config=proto_utils.proto_to_json(input_config(config)),
        serving_base_path=str(serving_base_path),
        force=int(force),
        recipe=recipe,
        span=-1 if span is None else span,
    )


def example_gen(
    config: DataConfig,
    data_root: str,
    splits=(TRAIN_SPLIT, EVAL_SPLIT),
    span: int | None = None,
) -> tfx.components.ImportExampleGen:
    """ImportExampleGen over the data root's TFRecords, splits 'train' and 'eval' by default."""
    # Of `span` (a pinned_span) if given, else the newest.
    component = tfx.components.ImportExampleGen(
        input_base=str(data_root),
        input_config=input_config(config, splits),
        # Each split as the input holds it. Left unset, TFX gives a one-split input its default
        # output, hash buckets train:2 / eval:1: EvalExampleGen's 'eval' held a third of the
        # validation images (122 of 360 in the demo), the only ones the Evaluator gated on.
        output_config=example_gen_pb2.Output(),
        range_config=None if span is None else span_range(span),
    )
    # Same executor, plus the span resolution a driver does where no driver runs (open-source
    # KFP); the component stays a FileBasedExampleGen, so Vertex still gets its driver hook.
    component.executor_spec = executor_spec.BeamExecutorSpec(SpanResolvingImportExecutor)
    # LocalDagRunner runs the component's driver first: ours is TFX's with the input
    # fingerprint's stats made concurrently. (Vertex runs TFX's driver module as a lifecycle
    # hook whatever the class says; open-source KFP runs none, and the executor resolves.)
    component.driver_class = FileBasedDriver
    # The executor checks every record's features against the curated schema's types while it
    # copies (a wrong kind in one record otherwise crashes StatisticsGen naming nothing).
    component.exec_properties[standard_component_specs.CUSTOM_CONFIG_KEY] = schema_path_config(
        config.schema_path
    )
    return component


def eval_example_gen(
    config: DataConfig, data_root: str, span: int | None = None
) -> tfx.components.ImportExampleGen:
    """ImportExampleGen of the 'eval' split alone (of `span` if pinned), for the Evaluator."""
    # Open-source KFP downloads each input artifact whole into the pod: given ExampleGen's
    # examples, the Evaluator's pod would copy the training split too (~140 GB at ImageNet-1k)
    # to read the 6.4 GB it evaluates. A second copy of the eval split costs 1/20 of that.
    return example_gen(config, data_root, (EVAL_SPLIT,), span).with_id("EvalExampleGen")


def statistics_gen(example_gen_component, schema_component) -> tfx.components.StatisticsGen:
    """Per-split statistics of the raw examples, computed with the curated schema."""
    # The schema marks image/encoded as an image, so TFDV counts no top-k / unique values of
    # the image bytes (without it every image would be shuffled as a grouping key).
    return tfx.components.StatisticsGen(
        examples=example_gen_component.outputs["examples"],
        schema=schema_component.outputs["schema"],
    )


def curated_schema(config: DataConfig, data_root: str, gate) -> CuratedSchema:
    """The curated schema with the label max of the gate's span (or data.num_classes)."""
    # The decision, not ExampleGen's examples: an Examples input would be downloaded whole into
    # the pod on open-source KFP, to read one synsets.txt.
    return CuratedSchema(
        decision=gate.outputs["decision"],
        input_base=str(data_root),
        split_pattern=split_patterns(config)[TRAIN_SPLIT],
        schema_file=config.schema_path,
        num_classes=config.num_classes,
    )


def example_validator(
    statistics_gen_component, schema_component
) -> tfx.components.ExampleValidator:
    """Validate each split's statistics against the curated schema."""
    return tfx.components.ExampleValidator(
        statistics=statistics_gen_component.outputs["statistics"],
        schema=schema_component.outputs["schema"],
    )


def anomalies_gate(example_validator_component, statistics_gen_component):
    """The gate failing the run, with a readable summary, if any split is empty or has anomalies."""
    from components.anomalies_gate import AnomaliesGate

    return AnomaliesGate(
        anomalies=example_validator_component.outputs["anomalies"],
        statistics=statistics_gen_component.outputs["statistics"],
    )


def transform(
    config: DataConfig, examples, schema, statistics: bool = False
) -> tfx.components.Transform:
    """Transform with our preprocessing_fn: analyze 'train', transform both splits, sharded."""
    component = tfx.components.Transform(
        examples=examples,
        schema=schema,
        preprocessing_fn=PREPROCESSING_FN,
        # TFX's default also runs TFDV over the raw and the transformed data: the raw half is
        # StatisticsGen's work again, the transformed half describes JPEG bytes and a label, and
        # nothing reads either. Off unless asked (benchmarks/bench_scale.py measures both).
        disable_statistics=not statistics,
        # Vocabulary and other analyzers see only training data; both splits are transformed.
        splits_config=transform_pb2.SplitsConfig(
            analyze=[TRAIN_SPLIT], transform=[TRAIN_SPLIT, EVAL_SPLIT]
        ),
        # The data section only: a change to the training recipe must not redo Transform (hours
        # on ImageNet), and the data section is all preprocessing_fn and the executor read.
        custom_config={"data": config.model_dump(mode="json")},
    )
    # TFX's executor, writing each split in files of data.examples_per_shard records (each
    # training worker reads its own) and recording their counts for the Trainer's step plan.
    component.executor_spec = executor_spec.BeamExecutorSpec(ShardingTransformExecutor)
    return component
