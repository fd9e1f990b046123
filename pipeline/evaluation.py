"""The Evaluator's TFMA config: top-1/top-5/loss, per-class slices, confusion matrix, the gate."""

from __future__ import annotations

import tensorflow_model_analysis as tfma

from van_tfx import features
from van_tfx.config import EvalConfig

# The label TFMA compares against is the Transform output (0-based class id), produced by the
# model's `transform_features` signature, so the gate sees exactly the ids the model predicts.
LABEL_KEY = features.TRANSFORMED_LABEL
SLICE_FEATURE = features.SYNSET


def build_eval_config(config: EvalConfig) -> tfma.EvalConfig:
    """Build the EvalConfig that blesses a candidate only if it clears the thresholds."""
    metrics = [
        # Gate on the overall slice only: per-class slices are reported, not gated (a class of
        # 30 validation images moves by 3% per image).
        tfma.MetricConfig(
            class_name="SparseCategoricalAccuracy",
            per_slice_thresholds=[
                tfma.PerSliceMetricThreshold(
                    slicing_specs=[tfma.SlicingSpec()],
                    threshold=top1_threshold(config),
                )
            ],
        ),
        tfma.MetricConfig(
            class_name="SparseTopKCategoricalAccuracy",
            config=f'{{"k": {config.top_k}, "name": "top_{config.top_k}_accuracy"}}',
        ),
        tfma.MetricConfig(class_name="SparseCategoricalCrossentropy", config='{"name": "loss"}'),
        tfma.MetricConfig(class_name="ExampleCount"),
        tfma.MetricConfig(class_name="MultiClassConfusionMatrixPlot"),
    ]
    return tfma.EvalConfig(
        model_specs=[
            tfma.ModelSpec(
                signature_name=features.SERVING_EXAMPLES_SIGNATURE,
                label_key=LABEL_KEY,
                preprocessing_function_names=[features.TRANSFORM_FEATURES_SIGNATURE],
            )
        ],
        slicing_specs=[tfma.SlicingSpec(), tfma.SlicingSpec(feature_keys=[SLICE_FEATURE])],
        metrics_specs=[tfma.MetricsSpec(metrics=metrics)],
    )


def top1_threshold(config: EvalConfig) -> tfma.MetricThreshold:
    """Top-1 >= eval.min_top1, and at most eval.max_top1_drop below the baseline (served model)."""
    # When nothing is served yet there is no baseline; TFX's Evaluator then passes
    # rubber_stamp=True and TFMA drops the change threshold for that first run.
    return tfma.MetricThreshold(
        value_threshold=tfma.GenericValueThreshold(lower_bound={"value": config.min_top1}),
        change_threshold=tfma.GenericChangeThreshold(
            direction=tfma.MetricDirection.HIGHER_IS_BETTER,
            absolute={"value": -config.max_top1_drop},
        ),
    )
