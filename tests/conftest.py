"""Shared pytest setup: Keras 2 before TensorFlow loads, and quiet logs."""

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import van_tfx  # noqa: E402,F401
