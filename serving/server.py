"""`ModelServer`: TF Serving's gRPC + REST model server in-process, configured like
tensorflow_model_server (the same flags, as `ServerOptions`).

    with ModelServer(ServerOptions(model_name="van", model_base_path=path, port=0,
                                   rest_api_port=ANY_PORT)) as server:
        stub = PredictionServiceStub(grpc.insecure_channel(server.grpc_target))
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import tempfile
import threading
from concurrent import futures

from serving.limits import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_REST_THREADS,
    DEFAULT_STALL_SECONDS,
    NO_REST_TIMEOUT_SECONDS,
    RequestLimits,
    checked_grpc_max_threads,
    checked_load_retries,
    checked_max_image_pixels,
    checked_max_message_bytes,
    checked_poll_wait_seconds,
    checked_port,
    checked_rest_threads,
    checked_rest_timeout_ms,
    checked_retry_interval_micros,
    checked_stall_seconds,
)
from serving.manager import ModelManager
from serving.metrics import Metrics
from serving.protos import (
    BatchingSettings,
    ConfigFileError,
    ModelConfig,
    parse_batching_file,
    parse_model_config_file,
    parse_monitoring_file,
)

log = logging.getLogger(__name__)
ANY_PORT = -1  # rest_api_port value that picks a free port (0 disables REST, as in TF Serving)


@dataclasses.dataclass
class ServerOptions:
    """tensorflow_model_server's flags (those van-tfx supports), with its defaults, plus ours."""

    # Ours: grpc_host, rest_api_host, max_message_bytes, max_image_pixels, startup_timeout_seconds,
    # rest_api_stall_seconds, rest_api_num_threads (threads reading and answering REST).

    port: int = 8500  # gRPC; 0 picks a free port
    grpc_host: str = "127.0.0.1"
    rest_api_port: int = 8501  # 0 disables REST; ANY_PORT picks a free port
    rest_api_host: str = "127.0.0.1"
    model_name: str = "default"
    model_base_path: str = ""
    model_config_file: str = ""
    model_config_file_poll_wait_seconds: float = 0.0  # 0: read the config file once
    file_system_poll_wait_seconds: float = 1.0  # 0 or negative: list the versions once
    enable_batching: bool = False
    batching_parameters_file: str = ""
    monitoring_config_file: str = ""
    rest_api_timeout_in_ms: int = 30000  # 0 or negative: no timeout, as in TF Serving
    enable_model_warmup: bool = True
    max_num_load_retries: int = 5  # retries after a failed load (LoaderHarness)
    load_retry_interval_micros: int = 60_000_000  # between them; negative: no wait
    allow_version_labels_for_unavailable_models: bool = False
    # Ours: gRPC receive/send, REST body, and what a request's tensors may decode to. TF Serving
    # accepts gRPC messages up to 2 GiB - 1 (server.cc SetMaxMessageSize(kint32max)).
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # ours: per image, checked before decoding
    enable_signature_method_name_check: bool = False
    # Predict outputs in tensor_content; TF Serving's default fills float_val, int_val, ...
    enable_serialization_as_tensor_content: bool = False
    grpc_max_threads: int = 64  # threads running unbatched model calls (off the event loop)
    # Ours: a REST request or answer that stops moving this long drops its connection (TF
    # Serving keeps it open; here it holds a thread). Idle keep-alive connections have no limit.
    rest_api_stall_seconds: float = DEFAULT_STALL_SECONDS
    rest_api_num_threads: int = DEFAULT_REST_THREADS  # TF Serving: 4 x cores (handlers only)
    startup_timeout_seconds: float | None = None  # None waits for models forever, like TF Serving

    def __post_init__(self):
        checked_port(self.port)
        if self.rest_api_port != ANY_PORT:
            checked_port(self.rest_api_port, "rest_api_port")
        checked_poll_wait_seconds(
            self.model_config_file_poll_wait_seconds, "model_config_file_poll_wait_seconds"
        )
        checked_poll_wait_seconds(self.file_system_poll_wait_seconds)
        checked_rest_timeout_ms(self.rest_api_timeout_in_ms)
        checked_load_retries(self.max_num_load_retries)
        checked_retry_interval_micros(self.load_retry_interval_micros)
        checked_max_message_bytes(self.max_message_bytes)
        checked_max_image_pixels(self.max_image_pixels)
        checked_grpc_max_threads(self.grpc_max_threads)
        checked_stall_seconds(self.rest_api_stall_seconds)
        checked_rest_threads(self.rest_api_num_threads)

    def model_configs(self) -> list:
        """The ModelConfig list: from --model_config_file or --model_name/--model_base_path."""
        if self.model_config_file:
            if self.model_base_path:
                raise ConfigFileError(
                    "use either --model_config_file or --model_base_path, not both"
                )
            return parse_model_config_file(self.model_config_file)
        if not self.model_base_path:
            raise ConfigFileError(
                "give --model_base_path (with --model_name) or --model_config_file"
            )
        config = ModelConfig(
            name=self.model_name,
            base_path=os.path.abspath(self.model_base_path)
            if "://" not in self.model_base_path
            else self.model_base_path,
            model_platform="tensorflow",
        )
        config.model_version_policy.latest.num_versions = 1
        return [config]

    def batching_settings(self) -> BatchingSettings | None:
        """The batching parameters when --enable_batching, else None."""
        if not self.enable_batching:
            return None
        if self.batching_parameters_file:
            return parse_batching_file(self.batching_parameters_file)
        return BatchingSettings.tf_serving_defaults()

    def prometheus_path(self) -> str | None:
        """Where Prometheus metrics are exposed on the REST port, if enabled."""
        # server.cc reads --monitoring_config_file only when there is a REST port to serve it:
        # without one, a missing or broken file must not stop the server.
        if not self.monitoring_config_file or self.rest_api_port == 0:
            return None
        return parse_monitoring_file(self.monitoring_config_file)


class ModelServer:
    """A running model server: start() loads every model, then opens the gRPC and REST ports."""

    def __init__(self, options: ServerOptions):
        self.options = options
        self.manager: ModelManager | None = None
        self.metrics = Metrics()
        self.grpc_port: int | None = None
        self.rest_port: int | None = None
        self._grpc_server = None
        self._grpc_loop: asyncio.AbstractEventLoop | None = None
        self._grpc_thread: threading.Thread | None = None
        self._grpc_stop: asyncio.Future | None = None  # resolved with the grace period by stop()
        self._executor: futures.ThreadPoolExecutor | None = None
        self._http_server = None
        self._http_thread: threading.Thread | None = None
        self._rest_app = None
        self._stopping = threading.Event()
        self._private_base: str | None = None

    @property
    def grpc_target(self) -> str:
        """host:port for grpc.insecure_channel."""
        return f"{self.options.grpc_host}:{self.grpc_port}"

    @property
    def rest_url(self) -> str | None:
        """http://host:port of the REST API, or None when it is disabled."""
        return f"http://{self.options.rest_api_host}:{self.rest_port}" if self.rest_port else None

    def start(self, cancel: threading.Event | None = None) -> ModelServer:
        """Load all models (ports stay closed until they are AVAILABLE), then serve."""
        # Setting `cancel` meanwhile stops waiting for them (StartupCancelled).
        options = self.options
        configs = options.model_configs()
        batching = options.batching_settings()
        metrics_path = options.prometheus_path()
        self.manager = ModelManager(
            configs,
            batching=batching,
            enable_warmup=options.enable_model_warmup,
            poll_wait_seconds=options.file_system_poll_wait_seconds,
            limits=RequestLimits(options.max_message_bytes, options.max_image_pixels),
            method_name_check=options.enable_signature_method_name_check,
            tensor_content=options.enable_serialization_as_tensor_content,
            max_num_load_retries=options.max_num_load_retries,
            load_retry_interval_seconds=options.load_retry_interval_micros / 1e6,
            allow_version_labels_for_unavailable_models=(
                options.allow_version_labels_for_unavailable_models
            ),
        )
        try:
            self.manager.wait_until_available(options.startup_timeout_seconds, cancel)
            self._start_grpc()
            if options.rest_api_port != 0:
                self._start_rest(metrics_path)
        except BaseException:
            self.stop()
            raise
        self.manager.start_polling()
        if options.model_config_file and options.model_config_file_poll_wait_seconds > 0:
            threading.Thread(
                target=self._watch_config_file, args=(configs,), name="config-poll", daemon=True
            ).start()
        log.info("gRPC on %s, REST on %s", self.grpc_target, self.rest_url)
        return self

    def stop(self, grace: float = 2.0) -> None:
        """Close the ports (in-flight calls get `grace` seconds), then unload every model."""
        self._stopping.set()
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
            self._http_server = None
            self._rest_app.close()
        self._stop_grpc(grace)
        if self.manager is not None:
            self.manager.stop()
            self.manager = None
        if self._private_base:
            shutil.rmtree(self._private_base, ignore_errors=True)
            self._private_base = None

    def is_serving(self) -> bool:
        """True while the gRPC server runs."""
        thread = self._grpc_thread
        return thread is not None and thread.is_alive()

    def wait(self) -> None:
        """Block until the gRPC server terminates (Ctrl-C to stop)."""
        thread = self._grpc_thread
        while thread is not None and thread.is_alive():
            thread.join(0.5)  # short joins keep the main thread responsive to signals

    @classmethod
    def for_saved_model(cls, saved_model_dir: str, model_name: str = "van", **options):
        """A server (not started) for one SavedModel dir, e.g. a pipeline's candidate model."""
        # The dir is linked in as version 1 of a private base path; gRPC and REST take free ports on
        # 127.0.0.1 unless `options` say otherwise.
        if not os.path.isfile(os.path.join(saved_model_dir, "saved_model.pb")):
            raise FileNotFoundError(f"{saved_model_dir} holds no saved_model.pb")
        base = tempfile.mkdtemp(prefix=f"van-tfx-serve-{model_name}-")
        os.symlink(os.path.abspath(saved_model_dir), os.path.join(base, "1"))
        # A finished export, not a push in progress: retrying a failed load cannot help.
        defaults = dict(model_name=model_name, model_base_path=base, port=0, rest_api_port=ANY_PORT,
                        file_system_poll_wait_seconds=0, max_num_load_retries=0)  # fmt: skip
        server = cls(ServerOptions(**{**defaults, **options}))
        server._private_base = base
        return server

    def __enter__(self) -> ModelServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _watch_config_file(self, seen: list) -> None:
        # --model_config_file_poll_wait_seconds: apply edits of the config file like a reload RPC.
        # `seen` is what start() loaded, not a second read: an edit made while the models loaded
        # would have become the baseline, never applied, and a bad file then ended this thread.
        while not self._stopping.wait(self.options.model_config_file_poll_wait_seconds):
            try:
                configs = parse_model_config_file(self.options.model_config_file)
                if configs != seen and self.manager is not None:
                    self.manager.reload(configs)
                    seen = configs
            except Exception:  # keep serving the last good config
                log.exception("cannot apply %s", self.options.model_config_file)

    def _start_grpc(self) -> None:
        # grpc.aio on an event loop thread of its own: one thread does all per-request Python
        # work, instead of a thread per request contending for the GIL (docs/serving.md).
        loop = self._grpc_loop = asyncio.new_event_loop()
        self._executor = futures.ThreadPoolExecutor(
            max_workers=self.options.grpc_max_threads, thread_name_prefix="grpc-model"
        )
        started: futures.Future = futures.Future()
        self._grpc_thread = threading.Thread(
            target=self._run_grpc_loop, args=(loop, started), name="grpc", daemon=True
        )
        self._grpc_thread.start()
        self._grpc_server, self.grpc_port = started.result()

    def _run_grpc_loop(self, loop: asyncio.AbstractEventLoop, started: futures.Future) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve_grpc(started))
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve_grpc(self, started: futures.Future) -> None:
        import grpc

        from serving.grpc_api import add_services

        limit = self.options.max_message_bytes
        try:
            server = grpc.aio.server(
                options=[
                    ("grpc.max_receive_message_length", limit),
                    ("grpc.max_send_message_length", limit),
                    ("grpc.so_reuseport", 0),
                ],
            )
            add_services(server, self.manager, self.metrics, self._executor)
            address = f"{self.options.grpc_host}:{self.options.port}"
            try:
                port = server.add_insecure_port(address)
            except RuntimeError as exc:  # grpc.aio raises where grpc.server returned 0
                raise OSError(f"cannot bind gRPC to {address}: {exc}") from None
            if port == 0:
                raise OSError(f"cannot bind gRPC to {address}")
            await server.start()
        except BaseException as exc:
            started.set_exception(exc)
            return
        self._grpc_stop = asyncio.get_running_loop().create_future()
        started.set_result((server, port))
        grace = await self._grpc_stop
        # Stopped here, not from another thread: the loop must outlive the server's shutdown.
        await server.stop(grace)

    def _stop_grpc(self, grace: float) -> None:
        server, loop, thread = self._grpc_server, self._grpc_loop, self._grpc_thread
        self._grpc_server = self._grpc_loop = self._grpc_thread = None
        if server is not None and loop is not None:
            try:
                loop.call_soon_threadsafe(self._grpc_stop.set_result, grace)
            except RuntimeError:  # the loop already ended
                pass
        if thread is not None:
            thread.join(timeout=grace + 30)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def _start_rest(self, metrics_path: str | None) -> None:
        from serving.rest_api import RestApp, make_http_server

        timeout_ms = self.options.rest_api_timeout_in_ms
        timeout = timeout_ms / 1000 if timeout_ms > 0 else NO_REST_TIMEOUT_SECONDS
        app = self._rest_app = RestApp(self.manager, self.metrics, timeout, metrics_path)
        port = 0 if self.options.rest_api_port == ANY_PORT else self.options.rest_api_port
        try:
            self._http_server = make_http_server(
                app,
                self.options.rest_api_host,
                port,
                self.options.max_message_bytes,
                self.options.rest_api_stall_seconds,
                self.options.rest_api_num_threads,
            )
        except OSError as exc:  # in use (by gRPC too, with the same port), or no such address
            app.close()
            address = f"{self.options.rest_api_host}:{port}"
            raise OSError(f"cannot bind REST to {address}: {exc.strerror or exc}") from None
        self.rest_port = self._http_server.server_address[1]
        self._http_thread = threading.Thread(
            target=self._http_server.serve_forever, name="rest", daemon=True
        )
        self._http_thread.start()
