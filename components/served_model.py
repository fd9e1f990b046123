"""ServedModel: the model production serves now, as the warm start and the Evaluator's baseline.

TFX's usual baseline is a Resolver of the latest blessed model. Resolvers are ML Metadata queries
that open-source Kubeflow Pipelines cannot run (its workflow compiler refuses them), so on the
cluster our users run there would be no warm start and no baseline. The model TF Serving serves is
the better baseline anyway: it is what a candidate must beat to replace, it is found the same way
on every runner (the newest complete version under `serving_base_path`, which the NewDataGate
already looked up), and a rollback in the serving directory moves the baseline with it.

The component copies that version (through tf.io.gfile, gs:// included) into its Model artifact
at `<uri>/Format-Serving`, where TFX's Trainer (`base_model`) and Evaluator (`baseline_model`)
look for a model. A copy, not a reference: retention may delete the served version while this run
still evaluates against it. When nothing is served yet the artifact is empty
(`served_version == ""`): the Trainer then starts from scratch and `ServedBaselineEvaluator`
evaluates without a baseline, which TFX treats as a first run (change thresholds not applied).
"""

import os
import sys

from tfx.components.evaluator import executor as evaluator_executor
from tfx.dsl.component.experimental.annotations import InputArtifact, OutputArtifact, Parameter
from tfx.dsl.component.experimental.decorators import component
from tfx.types import standard_component_specs
from tfx.types.experimental.simple_artifacts import File
from tfx.types.standard_artifacts import Model
from tfx.utils import path_utils

from components.new_data_gate import SERVED_VERSION_KEY
from serving.manager import version_dirs
from van_tfx import storage

SERVED_MODEL_ID = "ServedModel"
SERVED_PATH_KEY = "served_path"


class ServedModelError(RuntimeError):
    """The version the gate saw served is no longer there to copy; the message names it."""


def served_version(model) -> str:
    """The serving version a ServedModel artifact holds ("" when nothing was served)."""
    return model.get_string_custom_property(SERVED_VERSION_KEY)


def copy_served_version(serving_base_path: str, version: str, model_uri: str) -> str:
    """Copy `<serving_base_path>/<version>` to where TFX looks for the model of `model_uri`."""
    if version not in (version_dirs(serving_base_path) or {}).values():
        raise ServedModelError(
            f"served version {version} is no longer complete under {serving_base_path} "
            "(removed or being replaced since the NewDataGate looked); rerun the pipeline"
        )
    source = os.path.join(serving_base_path, version)
    storage.copy_tree(source, path_utils.serving_model_dir(model_uri, False))
    return source


@component
def ServedModel(  # noqa: N802  (TFX component names are class-like)
    decision: InputArtifact[File],
    model: OutputArtifact[Model],
    serving_base_path: Parameter[str],
) -> None:
    """Copy the version the NewDataGate saw served into a Model artifact (empty if none)."""
    version = decision.get_string_custom_property(SERVED_VERSION_KEY)
    model.set_string_custom_property(SERVED_VERSION_KEY, version)
    if not version:
        print(
            "ServedModel: nothing is served yet: no warm start, no Evaluator baseline",
            file=sys.stderr,
        )
        return
    source = copy_served_version(serving_base_path, version, model.uri)
    model.set_string_custom_property(SERVED_PATH_KEY, source)
    print(f"ServedModel: baseline and warm start = served version {version}", file=sys.stderr)


class ServedBaselineEvaluator(evaluator_executor.Executor):
    """TFX's Evaluator executor; an empty ServedModel baseline counts as no baseline at all."""

    def Do(self, input_dict, output_dict, exec_properties):  # noqa: N802  (TFX's name)
        """Drop a baseline that holds no model, then evaluate as TFX does."""
        key = standard_component_specs.BASELINE_MODEL_KEY
        baselines = input_dict.get(key) or []
        if baselines and not served_version(baselines[0]):
            print("Evaluator: no model is served yet, so there is no baseline", file=sys.stderr)
            input_dict = {name: value for name, value in input_dict.items() if name != key}
        super().Do(input_dict, output_dict, exec_properties)
