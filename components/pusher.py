"""NewVersionPusher: TFX's Pusher, pushing each model as a new version above every existing one.

TFX's Pusher (tfx/components/pusher/executor.py `Executor.Do`, TFX 1.16) names the version
`str(int(time.time()))` and then:

- if a higher number is already there (a hand push or rollback named in milliseconds, a machine
  whose clock runs ahead), TF Serving keeps serving that one (its "latest" policy is the highest
  number, `AspireLatestVersions`), so no push of ours is ever served; the NewDataGate compares the
  data with that version too, finds no training record there and retrains every run;
- if `<base>/<now>` already exists (two pushes in one second: a manual submit during a scheduled
  run, two pipelines sharing a base path), it logs "skipping current push" and still records that
  path and version as pushed: the run's outcome names a version holding another run's model.

This executor pushes as version max(now, highest existing version + 1), counting every child TF
Serving would count (`serving.manager.numbered_children`: files and incomplete versions too), and
logs why when that is above the clock. A version must fit TF Serving's int64 (a larger name is
not a version to it, so the push would never be served); with int64's maximum taken the push is
refused, naming that version.

Two pushers may pick the same number. Neither `os.mkdir` (local only) nor a rename (a copy and a
delete per object on gs://) makes the directory exclusive on object storage, so a pusher claims
the version instead: it writes `<version>/.van_tfx_push-<id>` and lists the directory. It owns
the version only when its claim is the only entry; otherwise it removes its claim and picks
again. With read-after-write consistent listing (local disks, GCS, S3) at most one of two
claimants sees only its own claim: each wrote before it listed, so the later lister sees both.
The owner copies the model (saved_model.pb last: TF Serving, `serving/` and the gate take a
version as complete only once it is there) and then removes its claim. A push by a pusher that
does not claim (TFX's own, a `gsutil cp`) is not protected against.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
import uuid

import tensorflow as tf
from absl import logging
from tfx.components.pusher import executor as pusher_executor
from tfx.proto import pusher_pb2
from tfx.types import artifact_utils, standard_component_specs
from tfx.utils import proto_utils

from serving.manager import INT64_MAX, numbered_children
from serving.servable import SAVED_MODEL_FILE
from van_tfx import storage

CLAIM_PREFIX = ".van_tfx_push-"  # hidden, and not a number: no model server reads it
CLAIM_ATTEMPTS = 8  # versions tried before giving up; each lost claim means another push won


class NoVersionLeftError(RuntimeError):
    """No int64 version is left above the highest one under the base path; names it."""


class VersionClaimError(RuntimeError):
    """Every version this push picked was taken by another push at the same time."""


def choose_version(children: list[tuple[int, str]], now: int) -> tuple[int, str | None]:
    """(version to push, name of the existing child that forced it above `now`, or None)."""
    if not children:
        return now, None
    highest, name = max(children)
    if highest < now:
        return now, None
    if highest >= INT64_MAX:
        raise NoVersionLeftError(
            f"version {name!r} is int64's maximum ({INT64_MAX}), the highest version TF Serving "
            "can read: no version is left above it for this push. Remove or renumber it."
        )
    return highest + 1, name


def claim_version(version_dir: str) -> str | None:
    """Claim the empty version directory `version_dir`; the claim's path, or None when taken."""
    tf.io.gfile.makedirs(version_dir)
    claim = os.path.join(version_dir, f"{CLAIM_PREFIX}{uuid.uuid4().hex}")
    with tf.io.gfile.GFile(claim, "w") as handle:
        handle.write(f"pushing since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}, pid {os.getpid()}\n")
    if entries(version_dir) == [os.path.basename(claim)]:
        return claim
    tf.io.gfile.remove(claim)  # taken: another claim, or files someone else is writing
    return None


def entries(directory: str) -> list[str]:
    """The names directly in `directory` (files and directories) that exist."""
    names = (name.rstrip("/") for name in tf.io.gfile.listdir(directory))
    # ram:// (the tests' bucket) lists by bare prefix: `<base>/5` also yields what is under
    # `<base>/50/`. Only what exists under this directory counts.
    return sorted(name for name in names if tf.io.gfile.exists(os.path.join(directory, name)))


def log_above_clock(version: int, now: int, taken: str) -> None:
    """Say why the push's version is not the clock's: `taken` holds that number or a higher one."""
    if version - 1 == now:
        why = "already exists (another push in the same second)"
    else:
        why = (
            "is a higher version (a push named in milliseconds, a rollback, or a clock running "
            "ahead); TF Serving serves the highest number, so a push named by the clock would "
            "never be served"
        )
    logging.warning("Pushing as version %d, above the clock (%d): %s %s.", version, now, taken, why)


def push_new_version(model_path: str, base_directory: str) -> tuple[int, str]:
    """Copy `model_path` in as a new version above every existing one: (version, its dir)."""
    for attempt in range(CLAIM_ATTEMPTS):
        now = int(time.time())
        try:
            version, higher = choose_version(numbered_children(base_directory) or [], now)
        except NoVersionLeftError as exc:
            raise NoVersionLeftError(f"{base_directory}: {exc}") from None
        if higher is not None:
            log_above_clock(version, now, os.path.join(base_directory, higher))
        version_dir = os.path.join(base_directory, str(version))
        claim = claim_version(version_dir)
        if claim is None:
            logging.warning(
                "Version %s is being pushed by another pusher at the same time; picking again.",
                version_dir,
            )
            # Two losers of one claim would otherwise pick the next number together again.
            time.sleep(random.uniform(0.05, 0.5) * (attempt + 1))
            continue
        try:
            storage.copy_tree(model_path, version_dir, last=(SAVED_MODEL_FILE,))
        except BaseException:
            # The version is ours alone: leave no half model as the highest number (TF Serving
            # would keep trying to load it).
            with contextlib.suppress(Exception):
                tf.io.gfile.rmtree(version_dir)
            raise
        tf.io.gfile.remove(claim)  # after saved_model.pb: the directory is never empty meanwhile
        logging.info("Model written to serving path %s.", version_dir)
        return version, version_dir
    raise VersionClaimError(
        f"no version under {base_directory} could be claimed in {CLAIM_ATTEMPTS} attempts: "
        "other pushes took each one"
    )


class NewVersionPusher(pusher_executor.Executor):
    """TFX's Pusher executor; each push is a new version above every one under the base path."""

    def Do(self, input_dict, output_dict, exec_properties):  # noqa: N802  (TFX's name)
        """Push a blessed model as a new version and record the version actually written."""
        self._log_startup(input_dict, output_dict, exec_properties)
        model_push = artifact_utils.get_single_instance(
            output_dict[standard_component_specs.PUSHED_MODEL_KEY]
        )
        if not self.CheckBlessing(input_dict):
            self._MarkNotPushed(model_push)
            return
        model_path = self.GetModelPath(input_dict)
        destination = proto_utils.json_to_proto(
            exec_properties[standard_component_specs.PUSH_DESTINATION_KEY],
            pusher_pb2.PushDestination(),
        )
        kind = destination.WhichOneof("destination")
        if kind != "filesystem":
            raise NotImplementedError(f"Invalid push destination {kind}")
        versioning = destination.filesystem.versioning
        # AUTO is UNIX_TIMESTAMP in TFX; the clock is where the version starts from here too.
        if versioning not in (pusher_pb2.Versioning.AUTO, pusher_pb2.Versioning.UNIX_TIMESTAMP):
            raise NotImplementedError(f"Invalid Versioning {versioning}")
        version, version_dir = push_new_version(model_path, destination.filesystem.base_directory)
        # TFX's archive copy in the artifact; through storage.copy_tree, which ram:// (the
        # tests' bucket) also gets through (io_utils.copy_dir trips on its listing).
        storage.copy_tree(model_path, model_push.uri)
        self._MarkPushed(model_push, pushed_destination=version_dir, pushed_version=str(version))
        logging.info("Model pushed to %s.", model_push.uri)
