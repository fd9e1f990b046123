"""ImportExampleGen's executor, resolving `{SPAN}` itself when no driver did.

TFX resolves ImportExampleGen's `span-{SPAN}` patterns in a driver: LocalDagRunner runs it before
the executor, Vertex AI Pipelines runs it as the container's `lifecycle.preCacheCheck` hook. The
open-source Kubeflow Pipelines backend runs no lifecycle hooks (nothing in its `backend/src/v2`
reads them), so there the executor would get the raw pattern and fail with "No files found based
on the file pattern .../span-{SPAN}/train-*". This executor then does what the driver would have
done, with the driver's own pieces (tfx/orchestration/kubeflow/v2/file_based_example_gen/driver.py):
resolve the newest span (and version), compute the input fingerprint, record span, version and
fingerprint on the Examples artifact (`driver.update_output_artifact`), and ingest that span.
Where a driver ran, the patterns arrive resolved and this is TFX's executor unchanged.
"""

from __future__ import annotations

from absl import logging
from tfx.components.example_gen import driver, input_processor, utils
from tfx.components.example_gen.import_example_gen import executor as import_executor
from tfx.proto import example_gen_pb2, range_config_pb2
from tfx.types import artifact_utils, standard_component_specs
from tfx.utils import proto_utils

_INPUT_CONFIG = standard_component_specs.INPUT_CONFIG_KEY
_RANGE_CONFIG = standard_component_specs.RANGE_CONFIG_KEY


def has_unresolved_specs(input_config_json: str) -> bool:
    """Whether any split pattern still holds a {SPAN}, {VERSION} or date spec."""
    config = proto_utils.json_to_proto(input_config_json, example_gen_pb2.Input())
    return any(any(utils.verify_split_pattern_specs(split)) for split in config.splits)


def resolve_like_the_driver(exec_properties: dict, examples_artifact) -> dict:
    """Exec properties with span, version, fingerprint and resolved patterns, as TFX's driver sets."""
    resolved = dict(exec_properties)
    config = proto_utils.json_to_proto(resolved[_INPUT_CONFIG], example_gen_pb2.Input())
    range_config = None
    if resolved.get(_RANGE_CONFIG):
        range_config = proto_utils.json_to_proto(
            resolved[_RANGE_CONFIG], range_config_pb2.RangeConfig()
        )
    processor = input_processor.FileBasedInputProcessor(
        resolved[standard_component_specs.INPUT_BASE_KEY], config.splits, range_config
    )
    span, version = processor.resolve_span_and_version()
    resolved[utils.SPAN_PROPERTY_NAME] = span
    resolved[utils.VERSION_PROPERTY_NAME] = version
    resolved[utils.FINGERPRINT_PROPERTY_NAME] = processor.get_input_fingerprint(span, version)
    for split in config.splits:
        split.pattern = processor.get_pattern_for_span_version(split.pattern, span, version)
    resolved[_INPUT_CONFIG] = proto_utils.proto_to_json(config)
    driver.update_output_artifact(resolved, examples_artifact.mlmd_artifact)
    logging.info("No ExampleGen driver ran: resolved span %s, version %s itself", span, version)
    return resolved


class SpanResolvingImportExecutor(import_executor.Executor):
    """TFX's ImportExampleGen executor that resolves span specs left unresolved by the runner."""

    def Do(self, input_dict, output_dict, exec_properties):  # noqa: N802  (TFX's name)
        """Resolve {SPAN} like TFX's driver when no driver did, then ingest as TFX does."""
        if has_unresolved_specs(exec_properties[_INPUT_CONFIG]):
            examples = artifact_utils.get_single_instance(
                output_dict[standard_component_specs.EXAMPLES_KEY]
            )
            exec_properties = resolve_like_the_driver(exec_properties, examples)
        super().Do(input_dict, output_dict, exec_properties)
