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
The same holds for a served model trained on another class list: each model labels the records
through its own list, so its top-1 measures another task (and its labelling refuses the new
synsets); the candidate is then judged by eval.min_top1 alone, and the evaluation says why.
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
from van_trainer.export import ClassListFileError, read_class_list

SERVED_MODEL_ID = "ServedModel"
SERVED_PATH_KEY = "served_path"
# On the ModelEvaluation artifact: why the served model was not the baseline ("" when it was).
BASELINE_DROPPED_KEY = "baseline_dropped"


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

    # So does one trained on another class list.

    def Do(self, input_dict, output_dict, exec_properties):  # noqa: N802  (TFX's name)
        """Drop a baseline that holds no model or another class list, then evaluate as TFX does."""
        key = standard_component_specs.BASELINE_MODEL_KEY
        baselines = input_dict.get(key) or []
        version = served_version(baselines[0]) if baselines else ""
        why = "no model is served yet, so there is no baseline" if baselines else ""
        if version:
            why = class_list_change(
                model_dir(input_dict[standard_component_specs.MODEL_KEY][0]),
                model_dir(baselines[0]),
                version,
            )
            for evaluation in output_dict.get(standard_component_specs.EVALUATION_KEY) or []:
                evaluation.set_string_custom_property(BASELINE_DROPPED_KEY, why)
        if why:
            print(f"Evaluator: {why}", file=sys.stderr)
            input_dict = {name: value for name, value in input_dict.items() if name != key}
        super().Do(input_dict, output_dict, exec_properties)


def model_dir(model) -> str:
    """The SavedModel directory of a Model artifact, where TFX's Evaluator looks for it."""
    return path_utils.serving_model_path(model.uri, path_utils.is_old_model_artifact(model))


def class_list_change(candidate_dir: str, baseline_dir: str, version: str) -> str:
    """Why the served model can't be the baseline for this candidate ("" when it can)."""
    # Each model labels the evaluation records through its own class list (its transform_features
    # signature), which refuses a synset it doesn't know: a baseline trained on another list made
    # the Evaluator fail after training, and every later run train again. Their top-1 figures would
    # not measure the same task anyway (another number of classes, other label ids).
    candidate = read_class_list(candidate_dir)  # this run's own: damage is an error
    try:
        baseline = read_class_list(baseline_dir)
    except ClassListFileError as exc:
        return (
            f"served version {version}'s class list is unusable ({exc}), so its top-1 can't be "
            "compared with the candidate's: the candidate is judged by eval.min_top1 alone"
        )
    if baseline is None:
        return (
            f"served version {version} keeps no class list (assets.extra/van.classes.txt), so "
            "its top-1 can't be compared with the candidate's: the candidate is judged by "
            "eval.min_top1 alone"
        )
    if candidate == baseline:
        return ""
    added = sorted(set(candidate or ()) - set(baseline))
    removed = sorted(set(baseline) - set(candidate or ()))
    change = "; ".join(
        part
        for part in (
            f"added {_some(added)}" if added else "",
            f"removed {_some(removed)}" if removed else "",
            "" if added or removed else "the same classes in another order",
        )
        if part
    )
    return (
        f"served version {version} was trained on another class list ({len(baseline)} "
        f"classes, the candidate {len(candidate or ())}: {change}), so its top-1 is not "
        "comparable: the candidate is judged by eval.min_top1 alone"
    )


def _some(names: list[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
