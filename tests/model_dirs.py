"""Model version directories for serving tests: pushed complete, and waited on."""

from __future__ import annotations

import os
import shutil
import time

from serving import testing
from serving.errors import ServingError


def push(base, exported, name, warmup=None) -> str:
    """Copy a version in under the child name `name`, complete before it becomes visible."""
    staging = os.path.join(base, f"staging-{name}")
    shutil.copytree(exported, staging)
    if warmup is not None:
        testing.write_warmup(staging, warmup)
    target = os.path.join(base, str(name))
    os.rename(staging, target)
    return target


def wait_for(condition, timeout=30.0) -> None:
    """Poll `condition` until true (a ServingError counts as not yet); fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except ServingError:
            pass  # not there yet
        time.sleep(0.05)
    raise AssertionError("condition not met in time")
