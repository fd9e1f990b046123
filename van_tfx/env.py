"""Process environment that must be in place before TensorFlow is imported."""

import os
import sys
import warnings


def require_legacy_keras() -> None:
    """Force TF_USE_LEGACY_KERAS=1 (and default oneDNN on), failing if TF already has Keras 3."""
    # Fails loudly if TensorFlow was already imported with Keras 3.
    # TFT and TFMA 1.16 only understand Keras 2 (tf_keras); TensorFlow reads this variable once, at
    # import, so setting it after `import tensorflow` would silently give us Keras 3.
    already_loaded = "tensorflow" in sys.modules and os.environ.get("TF_USE_LEGACY_KERAS") != "1"
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # TF turns oneDNN on by default only on CPUs with VNNI/BF16/AMX units; on AVX2-only CPUs
    # (e.g. AMD EPYC Zen 2/3) its Eigen kernels, compiled for AVX in the pip wheel, are what
    # run, and VAN is slower with them (docs/model.md#performance). An explicit value wins.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    if already_loaded:
        raise RuntimeError(
            "TensorFlow was imported before van-tfx could set TF_USE_LEGACY_KERAS=1; "
            "import van_tfx (or set TF_USE_LEGACY_KERAS=1) before importing tensorflow."
        )


# Warnings a user of this stack cannot act on, printed a dozen times by every command that loads
# the Google Cloud clients TFX brings: TFX 1.16 supports Python 3.10 only (so "upgrade to 3.11"
# would break it), and google-cloud-storage is held below 3 by TFX's aiplatform pin.
UNACTIONABLE_WARNINGS = (
    (FutureWarning, r"You are using a non-supported Python version"),
    (FutureWarning, r"Support for google-cloud-storage < 3\.0\.0 will be removed"),
)


def silence_unactionable_warnings() -> None:
    """Ignore the dependency warnings listed in UNACTIONABLE_WARNINGS (no others)."""
    for category, message in UNACTIONABLE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def van_tfx_home() -> str:
    """Return $VAN_TFX_HOME (default ./van_tfx_home) as an absolute path."""
    return os.path.abspath(os.path.expanduser(os.environ.get("VAN_TFX_HOME", "van_tfx_home")))
