"""The model manager: watches each model's base path, loads the versions its policy aspires to
(with warmup), swaps them in without dropping requests, and unloads the rest."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import threading
import time

import grpc
from tensorflow_serving.apis import get_model_status_pb2

from serving.errors import (
    ServingError,
    from_tf_error,
    invalid_argument,
    not_found,
    servable_not_found,
)
from serving.limits import RequestLimits
from serving.protos import BatchingSettings
from serving.servable import SAVED_MODEL_FILE, WARMUP_FILE, Servable, check_regular_file
from van_tfx.tfrecords import CorruptShardError, read_records

log = logging.getLogger(__name__)
State = get_model_status_pb2.ModelVersionStatus.State
MAX_WARMUP_RECORDS = 1000
WARMUP_THREADS = 4


@dataclasses.dataclass(frozen=True)
class VersionStatus:
    """What GetModelStatus reports for one version."""

    version: int
    state: int
    error: str = ""
    error_code: int = 0


class StartupCancelled(Exception):
    """Startup was asked to stop (SIGTERM) before every model had a version AVAILABLE."""


class LoadError(RuntimeError):
    """A version that could not be loaded or warmed up, with the status code it reports."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.UNKNOWN):
        super().__init__(message)
        self.code = code


class LoadPriority:
    """While a version loads and warms up, live servables run one model call at a time."""

    # Loading is CPU work (function restoration, then graph optimisation on each signature's first
    # call) that competes with request handling for the same cores and the GIL; on a small, shared
    # box a fair share was not enough (a new version took ~40 s to go live under four clients and
    # busy neighbours). Serialising model calls for those seconds keeps every request answered, only
    # slower, and leaves the loader most of the machine.

    def __init__(self):
        self._lock = threading.Lock()
        self._loads = 0
        self._turn = threading.Semaphore(1)

    @contextlib.contextmanager
    def loading(self):
        """Mark a load in progress for the duration of the block."""
        with self._lock:
            self._loads += 1
        try:
            yield
        finally:
            with self._lock:
                self._loads -= 1

    @contextlib.contextmanager
    def model_call(self):
        """Wrap one model call of a live servable: its turn while loads run, free otherwise."""
        if not self._loads:
            yield
            return
        with self._turn:
            yield


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_C_SPACES = " \t\n\v\f\r"  # what C's isspace() skips
_ASCII_DIGITS = frozenset("0123456789")


def parse_version(name: str) -> int | None:
    """The version a directory name stands for, read as TF Serving's safe_strto64, or None."""
    # ParseVersionNumber (file_system_storage_path_source.cc) is safe_strto64: surrounding
    # whitespace, an optional '-', ASCII digits only, int64 range. str.isdigit()/int() would
    # take Unicode digits ("²", "٣") and unbounded values that no request can name.
    if name.isascii() and name.isdigit():  # the common case, without the checks below
        value = int(name)
        return value if value <= INT64_MAX else None
    text = name.strip(_C_SPACES)
    digits = text[1:] if text.startswith("-") else text
    if not digits or not set(digits) <= _ASCII_DIGITS:
        return None
    value = int(text)
    return value if INT64_MIN <= value <= INT64_MAX else None


def numbered_children(base_path: str) -> list[tuple[int, str]] | None:
    """(version, child name) of every child of `base_path` named as a version; None if missing."""
    import tensorflow as tf

    # TF Serving's own listing (PollFileSystemForServable): every child whose name parses, file
    # or directory, complete or not. Its "latest" policy aspires the highest of these whatever
    # they hold, so a push has to go above all of them (components/pusher.py).
    try:
        names = tf.io.gfile.listdir(base_path)
    except tf.errors.NotFoundError:
        return None
    children = []
    for name in sorted(name.rstrip("/") for name in names):
        version = parse_version(name)
        if version is not None:
            children.append((version, name))
    return children


def aspired_children(base_path: str, config=None) -> dict[int, str] | None:
    """{version: child name} a poll aspires under `base_path`, by name only; None if missing."""
    # PollFileSystemForServable: IndexChildrenByVersion, then AspireLatestVersions (the
    # num_versions highest), AspireAllVersions or AspireSpecificVersions, from the names alone.
    # Nothing inside a child is looked at: one without saved_model.pb (a push in progress) is
    # aspired, its load fails NOT_FOUND and is retried (LoaderHarness) while the version before
    # keeps serving. Stat'ing saved_model.pb to skip such children cost a stat per child every
    # poll: 100k model-less children took 1.26 s a poll (every second by default).
    children = numbered_children(base_path)
    if children is None:
        return None
    by_version: dict[int, str] = {}
    for version, name in children:  # in name order: the later child wins, with a warning
        if version in by_version:
            log.warning(
                "Duplicate version directories detected. Version %d will be loaded from %s, "
                "%s will be ignored.", version, name, by_version[version],
            )  # fmt: skip
        by_version[version] = name
    versions = sorted(by_version)
    if config is not None:
        versions = aspired_versions(config, versions)
    return {version: by_version[version] for version in versions}


def version_dirs(base_path: str) -> dict[int, str] | None:
    """{version: child dir name} of the complete versions under `base_path`; None if missing."""
    # Complete: holding saved_model.pb, which exporters and pushers write last. For callers that
    # want a model to copy or compare (the NewDataGate, the demo); polls use aspired_children.
    children = aspired_children(base_path)
    if children is None:
        return None
    return {version: name for version, name in children.items() if _is_live(base_path, name)}


def _is_live(base_path: str, name: str) -> bool:
    """Whether child `name` holds saved_model.pb (the exporter writes it, the Pusher copies it
    last); one unreadable entry must not hide the others."""
    import tensorflow as tf

    try:
        return tf.io.gfile.exists(os.path.join(base_path, name, SAVED_MODEL_FILE))
    except Exception as exc:
        log.warning("skipping %s: %s", os.path.join(base_path, name), exc)
        return False


def list_versions(base_path: str) -> list[int]:
    """Versions under `base_path` that hold a saved_model.pb, ascending (as TF Serving reads them)."""
    return list(version_dirs(base_path) or {})


def aspired_versions(config, available: list[int]) -> list[int]:
    """The versions a ModelConfig's model_version_policy wants served."""
    policy = config.model_version_policy
    which = policy.WhichOneof("policy_choice")
    if which == "all":
        return list(available)
    if which == "specific":
        # One set, not one per available version: that was versions x available work, 25 s per
        # call for 200k specific versions and 2000 live ones, partly under the manager's lock.
        wanted = set(policy.specific.versions)
        return [v for v in available if v in wanted]
    count = policy.latest.num_versions if which == "latest" else 1
    return list(available[-max(count, 1) :])


@dataclasses.dataclass
class _Failure:
    """Failed load attempts of one version directory (LoaderHarness's retry bookkeeping)."""

    dirname: str
    attempts: int = 0
    retry_at: float = 0.0
    gave_up: bool = False
    error: ServingError | None = None  # the last attempt's
    awaiting_model: bool = False  # the last attempt found no saved_model.pb


class _Model:
    def __init__(self, config):
        self.config = config
        self.servables: dict[int, Servable] = {}
        self.states: dict[int, VersionStatus] = {}
        self.failures: dict[int, _Failure] = {}
        self.listing: dict[int, str] | None = None  # the last aspired_children() of the base path


class ModelManager:
    """Serves the models of a model_config_list; thread-safe."""

    def __init__(
        self,
        configs: list,
        batching: BatchingSettings | None = None,
        enable_warmup: bool = True,
        poll_wait_seconds: float = 1.0,
        limits: RequestLimits | None = None,
        method_name_check: bool = False,
        tensor_content: bool = False,
        max_num_load_retries: int = 5,
        load_retry_interval_seconds: float = 60.0,
        allow_version_labels_for_unavailable_models: bool = False,
    ):
        self._allow_unavailable_labels = allow_version_labels_for_unavailable_models
        self._batching = batching
        self._max_retries = max(max_num_load_retries, 0)
        self._retry_interval = max(load_retry_interval_seconds, 0.0)  # negative: no wait
        self.limits = limits or RequestLimits()  # every servable's, and REST parsing's
        self._method_name_check = method_name_check
        self._tensor_content = tensor_content
        self._enable_warmup = enable_warmup
        self._poll_wait = poll_wait_seconds
        self._lock = threading.Lock()
        self._poll_lock = threading.Lock()
        self._models: dict[str, _Model] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.priority = LoadPriority()
        self.reload(configs, poll=False)

    # Lookups used by every request.
    def resolve(self, name: str, version: int | None = None, label: str | None = None) -> Servable:
        """The servable for a request: latest available, a version, or a label's version."""
        with self._lock:
            model = self._models.get(name)
            if label is not None:  # ServerCore::GetModelVersionForLabel, even for unknown models
                version = self._label_version(model, label)
            if model is None:
                raise servable_not_found(name, version)
            if version is None:
                if not model.servables:
                    raise servable_not_found(name)
                return model.servables[max(model.servables)]
            servable = model.servables.get(version)
            if servable is None:
                raise servable_not_found(name, version)
            return servable

    @staticmethod
    def _label_version(model: _Model | None, label: str) -> int:
        labels = model.config.version_labels if model is not None else {}
        if label not in labels:
            raise invalid_argument(f"Unrecognized servable version label: {label}")
        return labels[label]

    def status(self, name: str, version: int | None = None) -> list[VersionStatus]:
        """Version states of a model, newest first (NOT_FOUND when none are known)."""
        with self._lock:
            model = self._models.get(name)
            states = dict(model.states) if model else {}
        if not states:
            raise not_found(f"Could not find any versions of model {name}")
        if version is not None:
            if version not in states:
                raise not_found(f"Could not find version {version} of model {name}")
            return [states[version]]
        return [states[v] for v in sorted(states, reverse=True)]

    def model_names(self) -> list[str]:
        """Names of the configured models."""
        with self._lock:
            return sorted(self._models)

    def is_available(self, name: str) -> bool:
        """True once a model has at least one AVAILABLE version."""
        with self._lock:
            model = self._models.get(name)
            return bool(model and model.servables)

    # Configuration and polling.
    def reload(self, configs: list, poll: bool = True) -> None:
        """Replace the served model list (HandleReloadConfigRequest); drops models not listed."""
        _check_configs(configs)
        with self._lock:
            self._check_labels(configs)
            added = [c.name for c in configs if c.name not in self._models]
            removed = [m for n, m in self._models.items() if n not in {c.name for c in configs}]
            for config in configs:
                if config.name in self._models:
                    self._models[config.name].config = config
                else:
                    self._models[config.name] = _Model(config)
            for model in removed:
                del self._models[model.config.name]
        for model in removed:
            self._unload(model, list(model.servables.values()))
        if poll:
            self.poll_once()
            self._wait_for_new_models(added)

    def _check_labels(self, configs: list) -> None:
        # ServerCore::UpdateModelVersionLabelMap: a label may only name an AVAILABLE version,
        # unless the flag allows it for a label that is new or keeps its version.
        for config in configs:
            model = self._models.get(config.name)
            old_labels = model.config.version_labels if model is not None else {}
            for label, version in config.version_labels.items():
                allowed = (
                    self._allow_unavailable_labels and old_labels.get(label, version) == version
                )
                if not allowed and (model is None or version not in model.servables):
                    raise ServingError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"Request to assign label to version {version} of model {config.name}, "
                        "which is not currently available for inference",
                    )

    def _wait_for_new_models(self, names: list[str]) -> None:
        """ServerCore::WaitUntilModelsAvailable for a reload: new models load (retries too)."""
        while True:
            with self._lock:
                models = [self._models[n] for n in names if n in self._models]
                waiting = [m for m in models if not m.servables and self._loading(m)]
                failed = [m for m in models if not m.servables and not self._loading(m)]
            if not waiting:
                break
            if self._stop.wait(_wait_step(self._poll_wait)):
                return
            self.poll_once()
        # A model with no version at all is not waited for (TF Serving would block the RPC
        # until one appears); one whose versions all failed is an UNKNOWN error, as there.
        failures = []
        for model in failed:
            with self._lock:
                ended = [s for v, s in model.states.items() if s.error and v in model.failures]
            if ended:
                last = max(ended, key=lambda s: s.version)
                code = _code_name(last.error_code)
                failures.append(
                    f"{{{{name: {model.config.name} version: {last.version}}} due to error: "
                    f"{code}: {last.error}}}, "
                )
        if failures:
            raise ServingError(
                grpc.StatusCode.UNKNOWN,
                f"{len(failures)} model(s) did not become available: {{{''.join(failures)}}}",
            )

    @staticmethod
    def _loading(model: _Model) -> bool:
        """True while an aspired version of `model` may still become AVAILABLE."""
        listing = model.listing or {}
        aspired = aspired_versions(model.config, list(listing))
        return any(
            v not in model.failures
            or model.failures[v].dirname != listing[v]
            or not model.failures[v].gave_up
            for v in aspired
            if v not in model.servables
        )

    def poll_once(self, relist: bool = True) -> None:
        """Sync every model with its base path (relist=False: the last listing) and policy."""
        with self._poll_lock:
            with self._lock:
                models = list(self._models.values())
            for model in models:
                try:
                    self._sync(model, relist)
                except Exception:  # one model's file system trouble must not stall the others
                    log.exception("polling model %s failed", model.config.name)

    def wait_until_available(
        self, timeout: float | None = None, cancel: threading.Event | None = None
    ) -> None:
        """Poll until every model has its aspired versions AVAILABLE (startup, like TF Serving)."""
        # StartupCancelled once `cancel` is set.
        deadline = None if timeout is None else time.monotonic() + timeout
        cancel = cancel or threading.Event()
        warned = False
        while True:
            if cancel.is_set():
                raise StartupCancelled("stopped while waiting for models to load")
            self.poll_once()
            missing = [n for n in self.model_names() if not self.is_available(n)]
            if not missing:
                return
            self._raise_on_failed_loads(missing)
            if not warned:  # TF Serving waits too; say what for, once
                log.warning("waiting for a servable version of %s", ", ".join(missing))
                warned = True
            if deadline is not None and time.monotonic() > deadline:
                raise LoadError(f"no servable version found for model(s) {', '.join(missing)}")
            cancel.wait(_wait_step(self._poll_wait))

    def _raise_on_failed_loads(self, names: list[str]) -> None:
        # Like tensorflow_model_server, refuse to start when a model's only versions are broken
        # (once their load retries are exhausted).
        with self._lock:
            failures = [
                f"{name} version {s.version}: {s.error}"
                for name in names
                if not self._loading(self._models[name])
                for s in self._models[name].states.values()
                if s.error
            ]
        if failures:
            raise LoadError("; ".join(failures))

    def start_polling(self) -> None:
        """Poll the file system every file_system_poll_wait_seconds in a background thread."""
        # Without file system polling the thread still retries failed loads (LoaderHarness).
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._poll_loop, name="fs-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling, cancel the model calls still running, and unload every version."""
        self._stop.set()
        with self._lock:
            models, self._models = list(self._models.values()), {}
        for model in models:
            for servable in model.servables.values():
                servable.cancel_running()
        if self._thread is not None:
            self._thread.join(timeout=60)
        for model in models:
            self._unload(model, list(model.servables.values()))

    def _poll_loop(self) -> None:
        relist = self._poll_wait > 0
        interval = self._poll_wait if relist else _wait_step(self._retry_interval)
        while not self._stop.wait(interval):
            try:
                self.poll_once(relist)
            except Exception:  # a flaky file system must not kill polling
                log.exception("file system poll failed")

    def _sync(self, model: _Model, relist: bool = True) -> None:
        name = model.config.name
        if relist or model.listing is None:
            listing = aspired_children(model.config.base_path, model.config)
            if listing is None:  # a missing base path changes nothing (the source reports an error)
                log.warning("base path %s of model %s not found", model.config.base_path, name)
                return
            model.listing = listing
        listing = model.listing
        aspired = aspired_versions(model.config, list(listing))
        self._forget_unaspired_failures(model, {v: listing[v] for v in aspired})
        loaded = {}
        now = time.monotonic()
        for version in aspired:
            failure = model.failures.get(version)
            if version in model.servables or (
                failure and (failure.gave_up or not self._retry_due(model, failure, now))
            ):
                continue
            servable = self._load(model, version, listing[version])
            if servable is not None:
                loaded[version] = servable
        # Availability-preserving: new versions join before the old ones leave.
        with self._lock:
            if self._models.get(name) is not model:
                stale = list(loaded.values())
            else:
                model.servables.update(loaded)
                stale = []
                # Keep the old versions until an aspired one is AVAILABLE: a broken push (failed
                # load or warmup) must not leave the model with nothing to serve. With nothing
                # aspired (every version dir deleted), everything unloads, as in TF Serving.
                if not aspired or any(v in model.servables for v in aspired):
                    stale = [s for v, s in model.servables.items() if v not in aspired]
                    model.servables = {v: s for v, s in model.servables.items() if v in aspired}
        self._unload(model, stale)

    @staticmethod
    def _retry_due(model: _Model, failure: _Failure, now: float) -> bool:
        """Whether a failed version's next load attempt is due."""
        # After load_retry_interval, as in TF Serving; sooner for a version that had no
        # saved_model.pb (a push caught mid-copy) once it has one: pushers copy it last, and
        # TF Serving's 60 s default wait would hold a complete push back for up to a minute.
        # One stat per aspired version waiting so, not per child.
        if now >= failure.retry_at:
            return True
        return failure.awaiting_model and _is_live(model.config.base_path, failure.dirname)

    def _forget_unaspired_failures(self, model: _Model, aspired: dict[int, str]) -> None:
        # A failed version no longer aspired (its directory went away or was replaced by another
        # naming the same version, or the policy or base path moved on) is forgotten: aspired
        # again, it loads fresh, with its own retries. One still retrying ENDs with its last
        # error, as CancelLoadServableRetry ends TF Serving's; it stayed LOADING for good.
        for version, failure in list(model.failures.items()):
            if aspired.get(version) == failure.dirname:
                continue
            del model.failures[version]
            if not failure.gave_up and failure.error is not None:
                error = failure.error
                self._set_state(
                    model, VersionStatus(version, State.END, error.message, error.code.value[0])
                )

    def _load(self, model: _Model, version: int, dirname: str) -> Servable | None:
        name = model.config.name
        # TF Serving loads from the child dir as listed (AspireVersion), so "007" is read there.
        path = os.path.join(model.config.base_path, dirname)
        self._set_state(model, VersionStatus(version, State.LOADING))
        start = time.monotonic()
        try:
            with self.priority.loading():
                servable = Servable(
                    name, version, path, self._batching, self.limits, self._method_name_check,
                    self._tensor_content,
                )  # fmt: skip
                restored = time.monotonic()
                if self._enable_warmup:
                    servable.warmup_records = run_warmup(servable)
            servable.priority = self.priority  # live from here on: it yields to later loads
        except Exception as exc:  # a broken version is reported, never served
            self._failed(model, version, dirname, exc)
            return None
        model.failures.pop(version, None)
        self._set_state(model, VersionStatus(version, State.AVAILABLE))
        log.info(
            "serving %s version %d from %s (restored in %.1f s, %d warmup records in %.1f s)",
            name, version, path, restored - start, servable.warmup_records,
            time.monotonic() - restored,
        )  # fmt: skip
        return servable

    def _failed(self, model: _Model, version: int, dirname: str, exc: Exception) -> None:
        # LoaderHarness: retry up to max_num_load_retries times, load_retry_interval apart (a
        # poll can catch a push mid-copy); meanwhile the version stays LOADING, as there.
        failure = model.failures.setdefault(version, _Failure(dirname))
        failure.attempts += 1
        failure.error = load_error(exc)
        failure.awaiting_model = not _is_live(model.config.base_path, dirname)
        name = model.config.name
        if failure.attempts <= self._max_retries:
            failure.retry_at = time.monotonic() + self._retry_interval
            log.error(
                "failed to load %s version %d (retry %d of %d in %g s): %s",
                name, version, failure.attempts, self._max_retries, self._retry_interval, exc,
            )  # fmt: skip
            return
        failure.gave_up = True
        log.error("failed to load %s version %d: %s", name, version, exc)
        error = failure.error
        self._set_state(
            model, VersionStatus(version, State.END, error.message, error.code.value[0])
        )

    def _unload(self, model: _Model, servables: list[Servable]) -> None:
        for servable in servables:
            self._set_state(model, VersionStatus(servable.version, State.UNLOADING))
            servable.unload()
            self._set_state(model, VersionStatus(servable.version, State.END))

    def _set_state(self, model: _Model, status: VersionStatus) -> None:
        with self._lock:
            model.states[status.version] = status


def load_error(exc: Exception) -> ServingError:
    """The status a failed load reports (TF Serving reports the loader's own status)."""
    if isinstance(exc, ServingError):
        return exc
    if isinstance(exc, LoadError):
        return ServingError(exc.code, str(exc))
    if isinstance(exc, OSError):
        # tf.saved_model.load raises OSError where TF Serving's C++ reader returns DATA_LOSS
        # ("Can't parse ... as binary proto") or NOT_FOUND (no saved_model.pb).
        text = str(exc)
        if text.startswith("Cannot parse file"):
            return ServingError(grpc.StatusCode.DATA_LOSS, text)
        # FileNotFoundError: a missing variables/ file, NOT_FOUND from TF Serving's restore op.
        if "does not exist" in text or isinstance(exc, FileNotFoundError):
            return ServingError(grpc.StatusCode.NOT_FOUND, text)
    error = from_tf_error(exc)
    if error.code == grpc.StatusCode.INTERNAL:  # not a TensorFlow status: no code to report
        return ServingError(grpc.StatusCode.UNKNOWN, str(exc))
    return error


def _code_name(code: int) -> str:
    """absl::StatusCodeToString of a canonical code number."""
    return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")


def _check_configs(configs: list) -> None:
    # server_core.cc ValidateModelConfigList first, with its messages: unique names, then
    # absolute base paths (or URIs); then what van-tfx needs on top.
    names: set[str] = set()
    for config in configs:
        if config.name in names:
            raise invalid_argument(
                f"Illegal to list model {config.name} multiple times in config list"
            )
        names.add(config.name)
    for config in configs:
        if "://" not in config.base_path and not os.path.isabs(config.base_path):
            raise invalid_argument(
                f"Expected model {config.name} to have an absolute path or URI; "
                f"got base_path()={config.base_path}"
            )
    for config in configs:
        if not config.name or not config.base_path:
            raise invalid_argument("every model config needs a name and a base_path")
        if not config.model_platform:  # server_core.cc GetPlatform
            raise invalid_argument(
                "Illegal setting neither ModelServerConfig::model_type (deprecated) nor "
                f"ModelServerConfig::model_platform, model name is {config.name}"
            )
        if config.model_platform != "tensorflow":
            raise invalid_argument(
                f"model {config.name}: unsupported platform {config.model_platform}"
            )


def run_warmup(servable: Servable) -> int:
    """Replay <version>/assets.extra/tf_serving_warmup_requests; returns the records replayed."""
    # Records run concurrently (up to WARMUP_THREADS): most of warmup is each signature's first call
    # optimising its graph, single-threaded work that parallelises across signatures.
    import tensorflow as tf

    path = os.path.join(servable.path, WARMUP_FILE)
    if not tf.io.gfile.exists(path):
        return 0
    check_regular_file(path)  # a FIFO would block this (the poll) thread until written to
    # Streamed, as saved_model_warmup_util.cc reads them: a record is read when a thread is free
    # for it, so memory holds WARMUP_THREADS records, not the file (1000 records of 2 MB were
    # 8.8 GB resident before the first one ran), and a failure stops the reading.
    pending: collections.deque = collections.deque()
    replayed = 0
    pool = concurrent.futures.ThreadPoolExecutor(WARMUP_THREADS, "warmup")
    with pool, contextlib.closing(_warmup_logs(path)) as logs:
        try:
            unreadable = None
            while True:
                try:
                    number, entry = next(logs, (None, None))
                except LoadError as exc:  # reported after the records before it
                    unreadable = exc
                    break
                if entry is None:
                    break
                pending.append((number, pool.submit(_replay, servable, entry)))
                if len(pending) >= WARMUP_THREADS:
                    _raise_on_failure(path, *pending.popleft())
                    replayed += 1
            while pending:
                _raise_on_failure(path, *pending.popleft())
                replayed += 1
            if unreadable is not None:
                raise unreadable
        finally:  # a failure: the records queued behind it do not run
            for _, future in pending:
                future.cancel()
    return replayed


def _warmup_logs(path: str):
    """(record number, PredictionLog) of each warmup record, read one at a time; LoadError with
    TF Serving's code for a damaged file, a record that is no PredictionLog, or too many."""
    from google.protobuf.message import DecodeError
    from tensorflow_serving.apis import prediction_log_pb2

    try:
        for number, record in enumerate(read_records(path), start=1):
            if number > MAX_WARMUP_RECORDS:
                raise LoadError(
                    f"Number of warmup records exceeds the maximum ({MAX_WARMUP_RECORDS}) at "
                    f"{path}",
                    grpc.StatusCode.INVALID_ARGUMENT,
                )
            try:
                entry = prediction_log_pb2.PredictionLog.FromString(record)
            except DecodeError:  # saved_model_warmup_util.cc: INVALID_ARGUMENT, not UNKNOWN
                raise LoadError(
                    f"Failed to parse warmup record {number} ({len(record)} bytes) from {path}: "
                    "not a serialized PredictionLog",
                    grpc.StatusCode.INVALID_ARGUMENT,
                ) from None
            yield number, entry
    except CorruptShardError as exc:  # TF's reader would allocate a damaged header's length
        # TF Serving's RecordReader fails the load with DATA_LOSS ("corrupted record at N").
        raise LoadError(str(exc), grpc.StatusCode.DATA_LOSS) from None


def _raise_on_failure(path: str, number: int, outcome: concurrent.futures.Future) -> None:
    """Raise the failing request's own code, as saved_model_warmup.cc returns it."""
    problem = outcome.result()
    if problem:
        raise LoadError(f"warmup record {number} of {path} failed: {problem.message}", problem.code)


def _replay(servable: Servable, entry) -> ServingError | None:
    """Run one warmup PredictionLog; the failure, or None."""
    from serving import handlers

    kind = entry.WhichOneof("log_type")
    try:
        if kind == "predict_log":
            handlers.predict_on(servable, entry.predict_log.request)
        elif kind == "classify_log":
            handlers.classify_on(servable, entry.classify_log.request)
        elif kind == "regress_log":
            handlers.regress_on(servable, entry.regress_log.request)
        else:
            return ServingError(
                grpc.StatusCode.UNIMPLEMENTED, f"Unsupported log_type for warmup: {kind}"
            )
    except ServingError as exc:
        return exc
    return None


def _wait_step(seconds: float) -> float:
    """A wait between checks while something loads: the poll interval, within 0.05 to 1 s."""
    return min(max(seconds, 0.05), 1.0)
