"""The van-tfx TFX pipeline: assembles components only (model code lives in van_trainer/)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tfx import v1 as tfx
from tfx.dsl.components.base import executor_spec

from components.new_data_gate import RecordRejection, has_new_data, recipe_fingerprint
from components.pusher import NewVersionPusher
from components.served_model import ServedBaselineEvaluator, ServedModel
from components.serving_smoke_test import ServingSmokeTest
from pipeline import ingest
from pipeline.evaluation import build_eval_config
from van_tfx.config import Config
from van_trainer.train import custom_config_for

RUN_FN = "van_trainer.train.run_fn"


@dataclass(frozen=True)
class PipelineLocation:
    """Where one deployment of the pipeline keeps its inputs, artifacts and pushed models."""

    data_root: str
    pipeline_root: str
    serving_base_path: str
    beam_args: list[str] = field(default_factory=list)
    metadata_path: str | None = None  # SQLite file locally; None on Kubeflow (cluster MLMD)


def create_pipeline(
    config: Config, location: PipelineLocation, span: int | None = None
) -> tfx.dsl.Pipeline:
    """Assemble the gate, then ExampleGen → validation → Transform → Trainer → Evaluator → push."""
    # `span` pins the gate and both ExampleGens to one span (LocalDagRunner: run_locally resolved
    # it); without it each resolves the newest itself, and on open-source KFP the ExampleGens take
    # the gate's from its decision.
    span = ingest.pinned_span(config.data, span)  # None where the patterns name no span
    gate = ingest.new_data_gate(
        config.data,
        location.data_root,
        location.serving_base_path,
        config.retrain_on_same_data,
        recipe=recipe_fingerprint(custom_config_for(config)),
        span=span,
    )
    # Data the served model was already trained on: ingest, train and push nothing. The gate
    # comes first so that an idle scheduled run does not copy the dataset (ImportExampleGen),
    # compute its statistics or transform it just to find that out.
    with tfx.dsl.Cond(has_new_data(gate)):
        steps = ingest_train_evaluate_push(config, location, gate, span)
    metadata = (
        tfx.orchestration.metadata.sqlite_metadata_connection_config(location.metadata_path)
        if location.metadata_path
        else None
    )
    return tfx.dsl.Pipeline(
        pipeline_name=config.pipeline_name,
        pipeline_root=location.pipeline_root,
        components=[gate, *steps],
        enable_cache=True,
        metadata_connection_config=metadata,
        beam_pipeline_args=list(location.beam_args),
    )


def ingest_train_evaluate_push(
    config: Config, location: PipelineLocation, gate, span: int | None = None
) -> list:
    """Every step after the gate, in order."""
    example_gen = ingest.example_gen(config.data, location.data_root, span=span)
    schema = ingest.curated_schema(config.data, location.data_root, gate)
    statistics_gen = ingest.statistics_gen(example_gen, schema)
    example_validator = ingest.example_validator(statistics_gen, schema)
    anomalies_gate = ingest.anomalies_gate(example_validator, statistics_gen)

    transform = ingest.transform(
        config.data, example_gen.outputs["examples"], schema.outputs["schema"]
    )
    # Anomalies stop the run before Transform spends time on bad data.
    transform.add_upstream_node(anomalies_gate)

    served = ServedModel(
        decision=gate.outputs["decision"], serving_base_path=location.serving_base_path
    )
    trainer = tfx.components.Trainer(
        run_fn=RUN_FN,
        examples=transform.outputs["transformed_examples"],
        transform_graph=transform.outputs["transform_graph"],
        schema=schema.outputs["schema"],
        base_model=served.outputs["model"],  # warm start from what production serves
        custom_config=custom_config_for(config),
    )
    eval_examples = ingest.eval_example_gen(config.data, location.data_root, span)
    evaluator = tfx.components.Evaluator(
        examples=eval_examples.outputs["examples"],
        model=trainer.outputs["model"],
        baseline_model=served.outputs["model"],
        eval_config=build_eval_config(config.eval),
        example_splits=["eval"],
    )
    # TFX's executor, except that an empty ServedModel (nothing served yet) means no baseline.
    evaluator.executor_spec = executor_spec.BeamExecutorSpec(ServedBaselineEvaluator)

    # Its records come from the data root, not from ExampleGen's output: on open-source KFP an
    # Examples input is downloaded whole into the pod, to read four records.
    smoke_test = ServingSmokeTest(
        model=trainer.outputs["model"],
        decision=gate.outputs["decision"],
        input_base=str(location.data_root),
        split_pattern=ingest.split_patterns(config.data)[ingest.EVAL_SPLIT],
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
    # TFX's executor names the version by the clock: below a higher version already there it is
    # never served, and on a version pushed the same second it records the other run's model.
    pusher.executor_spec = executor_spec.ExecutorClassSpec(NewVersionPusher)
    # A rejected candidate is never pushed; without this record every later run would retrain
    # on the same span for the same verdict (the gate only sees what is served).
    rejection = RecordRejection(
        decision=gate.outputs["decision"],
        model_blessing=evaluator.outputs["blessing"],
        serving_base_path=str(location.serving_base_path),
    )
    return [
        example_gen,
        schema,
        statistics_gen,
        example_validator,
        anomalies_gate,
        transform,
        served,
        trainer,
        eval_examples,
        evaluator,
        smoke_test,
        pusher,
        rejection,
    ]
