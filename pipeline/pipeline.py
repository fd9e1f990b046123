"""The van-tfx TFX pipeline: assembles components only (model code lives in van_trainer/)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tfx import v1 as tfx
from tfx.proto import transform_pb2

from components.new_data_gate import NewDataGate, has_new_data
from components.serving_smoke_test import ServingSmokeTest
from pipeline import ingest
from pipeline.evaluation import build_eval_config
from van_tfx.config import Config
from van_trainer.train import custom_config_for

PREPROCESSING_FN = "van_trainer.preprocessing.preprocessing_fn"
RUN_FN = "van_trainer.train.run_fn"


@dataclass(frozen=True)
class PipelineLocation:
    """Where one deployment of the pipeline keeps its inputs, artifacts and pushed models."""

    data_root: str
    pipeline_root: str
    serving_base_path: str
    beam_args: list[str] = field(default_factory=list)
    metadata_path: str | None = None  # SQLite file locally; None on Kubeflow (cluster MLMD)
    # The latest blessed model (warm start + Evaluator baseline) comes from a TFX Resolver, which
    # open-source KFP 2.x cannot run; False builds the pipeline without it.
    resolve_baseline: bool = True


def latest_blessed_model() -> tfx.dsl.Resolver:
    """The Resolver of the latest model the Evaluator blessed (warm start and baseline)."""
    return tfx.dsl.Resolver(
        strategy_class=tfx.dsl.experimental.LatestBlessedModelStrategy,
        model=tfx.dsl.Channel(type=tfx.types.standard_artifacts.Model),
        model_blessing=tfx.dsl.Channel(type=tfx.types.standard_artifacts.ModelBlessing),
    ).with_id("latest_blessed_model_resolver")


def create_pipeline(config: Config, location: PipelineLocation) -> tfx.dsl.Pipeline:
    """Assemble ExampleGen → validation → Transform → Trainer → Evaluator → smoke test → Pusher."""
    example_gen = ingest.example_gen(config.data, location.data_root)
    new_data_gate = NewDataGate(
        examples=example_gen.outputs["examples"],
        serving_base_path=location.serving_base_path,
        force=int(config.retrain_on_same_data),
    )
    statistics_gen = ingest.statistics_gen(example_gen)
    schema_importer = ingest.schema_importer(config.data, location.data_root)
    example_validator = ingest.example_validator(statistics_gen, schema_importer)
    anomalies_gate = ingest.anomalies_gate(example_validator)

    transform = tfx.components.Transform(
        examples=example_gen.outputs["examples"],
        schema=schema_importer.outputs["schema"],
        preprocessing_fn=PREPROCESSING_FN,
        # Vocabulary and other analyzers see only training data; both splits are transformed.
        splits_config=transform_pb2.SplitsConfig(analyze=["train"], transform=["train", "eval"]),
        custom_config=custom_config_for(config),
    )
    # Anomalies stop the run before Transform spends time on bad data.
    transform.add_upstream_node(anomalies_gate)

    latest_blessed = latest_blessed_model() if location.resolve_baseline else None
    # Data the served model was already trained on: train, evaluate and push nothing (an idle
    # scheduled run would otherwise retrain after every push, see components/new_data_gate.py).
    with tfx.dsl.Cond(has_new_data(new_data_gate)):
        trained_and_pushed = train_evaluate_push(
            config, location, example_gen, schema_importer, transform, latest_blessed
        )

    components = [
        example_gen,
        new_data_gate,
        statistics_gen,
        schema_importer,
        example_validator,
        anomalies_gate,
        transform,
        *([latest_blessed] if latest_blessed else []),
        *trained_and_pushed,
    ]
    metadata = (
        tfx.orchestration.metadata.sqlite_metadata_connection_config(location.metadata_path)
        if location.metadata_path
        else None
    )
    return tfx.dsl.Pipeline(
        pipeline_name=config.pipeline_name,
        pipeline_root=location.pipeline_root,
        components=components,
        enable_cache=True,
        metadata_connection_config=metadata,
        beam_pipeline_args=list(location.beam_args),
    )


def train_evaluate_push(
    config: Config, location: PipelineLocation, example_gen, schema_importer, transform, resolver
) -> list:
    """Trainer, Evaluator, ServingSmokeTest and Pusher; warm start and baseline from `resolver`."""
    base_model = resolver.outputs["model"] if resolver else None
    trainer = tfx.components.Trainer(
        run_fn=RUN_FN,
        examples=transform.outputs["transformed_examples"],
        transform_graph=transform.outputs["transform_graph"],
        schema=schema_importer.outputs["schema"],
        base_model=base_model,
        custom_config=custom_config_for(config),
    )

    evaluator = tfx.components.Evaluator(
        examples=example_gen.outputs["examples"],
        model=trainer.outputs["model"],
        baseline_model=base_model,
        eval_config=build_eval_config(config.eval, with_baseline=base_model is not None),
        example_splits=["eval"],
    )

    smoke_test = ServingSmokeTest(
        model=trainer.outputs["model"], examples=example_gen.outputs["examples"]
    )

    # Pushes the smoke-tested copy (it carries TF Serving warmup requests and the record of its
    # training data) only when both the Evaluator and the smoke test blessed it.
    pusher = tfx.components.Pusher(
        model_blessing=evaluator.outputs["blessing"],
        infra_blessing=smoke_test.outputs["blessing"],
        push_destination=tfx.proto.PushDestination(
            filesystem=tfx.proto.PushDestination.Filesystem(
                base_directory=location.serving_base_path
            )
        ),
    )
    return [trainer, evaluator, smoke_test, pusher]
