"""components package of van-tfx."""

import van_tfx  # noqa: F401  (sets TF_USE_LEGACY_KERAS=1 before TensorFlow can load)
