"""The model manager: watches each model's base path, loads the versions its policy aspires to
(with warmup), swaps them in without dropping requests, and unloads the rest."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import threading
import time

from tensorflow_serving.apis import get_model_status_pb2

from serving.errors import ServingError, invalid_argument, not_found, servable_not_found
from serving.limits import RequestLimits
from serving.protos import BatchingSettings
from serving.servable import SAVED_MODEL_FILE, WARMUP_FILE, Servable

log = logging.getLogger(__name__)
State = get_model_status_pb2.ModelVersionStatus.State
MAX_WARMUP_RECORDS = 1000
WARMUP_THREADS = 4
UNKNOWN_ERROR_CODE = 2  # tensorflow.error.Code.UNKNOWN


@dataclasses.dataclass(frozen=True)
class VersionStatus:
    """What GetModelStatus reports for one version."""

    version: int
    state: int
    error: str = ""
    error_code: int = 0


class LoadError(RuntimeError):
    """A version that could not be loaded or warmed up."""


class LoadPriority:
    """While a version loads and warms up, live servables run one model call at a time.

    Loading is CPU work (function restoration, then graph optimisation on each signature's first
    call) that competes with request handling for the same cores and the GIL; on a small, shared
    box a fair share was not enough (a new version took ~40 s to go live under four clients and
    busy neighbours). Serialising model calls for those seconds keeps every request answered,
    only slower, and leaves the loader most of the machine.
    """

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


def list_versions(base_path: str) -> list[int]:
    """Integer-named version dirs under `base_path` that hold a saved_model.pb, ascending."""
    import tensorflow as tf

    try:
        names = tf.io.gfile.listdir(base_path)
    except tf.errors.NotFoundError:
        return []
    versions = []
    for name in names:
        name = name.rstrip("/")
        # TF Serving only counts non-negative integer dir names; a version is live once the
        # exporter has written saved_model.pb (the Pusher copies it last).
        if name.isdigit() and tf.io.gfile.exists(os.path.join(base_path, name, SAVED_MODEL_FILE)):
            versions.append(int(name))
    return sorted(versions)


def aspired_versions(config, available: list[int]) -> list[int]:
    """The versions a ModelConfig's model_version_policy wants served."""
    policy = config.model_version_policy
    which = policy.WhichOneof("policy_choice")
    if which == "all":
        return list(available)
    if which == "specific":
        return [v for v in available if v in set(policy.specific.versions)]
    count = policy.latest.num_versions if which == "latest" else 1
    return list(available[-max(count, 1) :])


class _Model:
    def __init__(self, config):
        self.config = config
        self.servables: dict[int, Servable] = {}
        self.states: dict[int, VersionStatus] = {}
        self.failed: set[int] = set()


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
    ):
        self._batching = batching
        self._limits = limits or RequestLimits()
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

    def poll_once(self) -> None:
        """Bring every model in line with its base path and policy."""
        with self._poll_lock:
            with self._lock:
                models = list(self._models.values())
            for model in models:
                self._sync(model)

    def wait_until_available(self, timeout: float | None = None) -> None:
        """Poll until every model has its aspired versions AVAILABLE (startup, like TF Serving)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        warned = False
        while True:
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
            time.sleep(min(max(self._poll_wait, 0.05), 1.0))

    def _raise_on_failed_loads(self, names: list[str]) -> None:
        # Like tensorflow_model_server, refuse to start when a model's only versions are broken.
        with self._lock:
            failures = [
                f"{name} version {s.version}: {s.error}"
                for name in names
                for s in self._models[name].states.values()
                if s.error
            ]
        if failures:
            raise LoadError("; ".join(failures))

    def start_polling(self) -> None:
        """Poll the file system every file_system_poll_wait_seconds in a background thread."""
        if self._poll_wait <= 0 or self._thread is not None:
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
        while not self._stop.wait(self._poll_wait):
            try:
                self.poll_once()
            except Exception:  # a flaky file system must not kill polling
                log.exception("file system poll failed")

    def _sync(self, model: _Model) -> None:
        name = model.config.name
        aspired = aspired_versions(model.config, list_versions(model.config.base_path))
        loaded = {}
        for version in aspired:
            if version not in model.servables and version not in model.failed:
                servable = self._load(model, version)
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
                # load or warmup) must not leave the model with nothing to serve.
                if any(v in model.servables for v in aspired):
                    stale = [s for v, s in model.servables.items() if v not in aspired]
                    model.servables = {v: s for v, s in model.servables.items() if v in aspired}
        self._unload(model, stale)

    def _load(self, model: _Model, version: int) -> Servable | None:
        name = model.config.name
        path = os.path.join(model.config.base_path, str(version))
        self._set_state(model, VersionStatus(version, State.LOADING))
        start = time.monotonic()
        try:
            with self.priority.loading():
                servable = Servable(
                    name, version, path, self._batching, self._limits, self._method_name_check,
                    self._tensor_content,
                )  # fmt: skip
                restored = time.monotonic()
                if self._enable_warmup:
                    servable.warmup_records = run_warmup(servable)
            servable.priority = self.priority  # live from here on: it yields to later loads
        except Exception as exc:  # a broken version is reported, never served
            log.error("failed to load %s version %d: %s", name, version, exc)
            model.failed.add(version)
            self._set_state(model, VersionStatus(version, State.END, str(exc), UNKNOWN_ERROR_CODE))
            return None
        self._set_state(model, VersionStatus(version, State.AVAILABLE))
        log.info(
            "serving %s version %d from %s (restored in %.1f s, %d warmup records in %.1f s)",
            name, version, path, restored - start, servable.warmup_records,
            time.monotonic() - restored,
        )  # fmt: skip
        return servable

    def _unload(self, model: _Model, servables: list[Servable]) -> None:
        for servable in servables:
            self._set_state(model, VersionStatus(servable.version, State.UNLOADING))
            servable.unload()
            self._set_state(model, VersionStatus(servable.version, State.END))

    def _set_state(self, model: _Model, status: VersionStatus) -> None:
        with self._lock:
            model.states[status.version] = status


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
        if config.model_platform not in ("", "tensorflow"):
            raise invalid_argument(
                f"model {config.name}: unsupported platform {config.model_platform}"
            )


def run_warmup(servable: Servable) -> int:
    """Replay <version>/assets.extra/tf_serving_warmup_requests; returns the records replayed.

    Records run concurrently (up to WARMUP_THREADS): most of warmup is each signature's first
    call optimising its graph, single-threaded work that parallelises across signatures.
    """
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    path = os.path.join(servable.path, WARMUP_FILE)
    if not tf.io.gfile.exists(path):
        return 0
    records = []
    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
        if len(records) == MAX_WARMUP_RECORDS:
            raise LoadError(f"Number of warmup records exceeds the maximum ({MAX_WARMUP_RECORDS})")
        records.append(prediction_log_pb2.PredictionLog.FromString(record))
    with concurrent.futures.ThreadPoolExecutor(WARMUP_THREADS, "warmup") as pool:
        outcomes = list(pool.map(lambda entry: _replay(servable, entry), records))
    for number, problem in enumerate(outcomes, start=1):
        if problem:
            raise LoadError(f"warmup record {number} of {path} failed: {problem}")
    return len(records)


def _replay(servable: Servable, entry) -> str | None:
    """Run one warmup PredictionLog; the failure message, or None."""
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
            return f"Unsupported log_type for warmup: {kind}"
    except ServingError as exc:
        return exc.message
    return None
