"""`van-tfx serve | predict | loadtest | serving-manifests` (TensorFlow is imported lazily)."""

from __future__ import annotations

import argparse
import re
import sys
from functools import partial

from serving.limits import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_REST_THREADS,
    DEFAULT_STALL_SECONDS,
    checked_grpc_max_threads,
    checked_in_range,
    checked_load_retries,
    checked_max_image_pixels,
    checked_max_message_bytes,
    checked_poll_wait_seconds,
    checked_port,
    checked_positive_seconds,
    checked_rest_threads,
    checked_rest_timeout_ms,
    checked_retry_interval_micros,
    checked_saved_model_dir,
    checked_stall_seconds,
)


def add_parser(subparsers) -> None:
    """Register the serving subcommands."""
    _add_serve(subparsers)
    _add_predict(subparsers)
    _add_loadtest(subparsers)
    manifests = subparsers.add_parser(
        "serving-manifests", help="write serving/deploy/*.yaml for tensorflow/serving on Kubernetes"
    )
    from serving.manifests import add_arguments, run

    add_arguments(manifests)
    manifests.set_defaults(func=run)


def _flag_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _checked(parse, check):
    """An argparse type: `parse` the text, then `check` the value (serving.limits), its
    ValueError shown as argparse's error for the flag."""

    def flag_type(text: str):
        try:
            return check(parse(text))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return flag_type


def _serving_defaults():
    from van_tfx.config import ServingConfig

    return ServingConfig()


SHUTDOWN_SECONDS = 10.0  # after SIGTERM: in-flight calls get 2 s, unloading the rest
WATCHDOG_SECONDS = 5.0  # past SHUTDOWN_SECONDS: the process is ended from C (stacks printed)


def _add_serve(subparsers) -> None:
    defaults = _serving_defaults()
    p = subparsers.add_parser(
        "serve",
        help="serve SavedModels over TF Serving's gRPC and REST APIs (tensorflow_model_server flags)",
    )
    p.add_argument(
        "--port", type=_checked(int, checked_port), default=defaults.grpc_port, help="gRPC port"
    )
    p.add_argument("--grpc_host", default="127.0.0.1", help="gRPC bind address (ours)")
    p.add_argument(
        "--rest_api_port",
        type=_checked(int, partial(checked_port, name="rest_api_port")),
        default=defaults.rest_port,
        help="0 disables REST (TF Serving's default is 0)",
    )
    p.add_argument("--rest_api_host", default="127.0.0.1", help="REST bind address (ours)")
    p.add_argument(
        "--model_name", default=defaults.model_name, help="TF Serving's default is 'default'"
    )
    p.add_argument("--model_base_path", default="", help="default: the config's serving base path")
    p.add_argument("--model_config_file", default="", help="ModelServerConfig text proto")
    p.add_argument(
        "--model_config_file_poll_wait_seconds",
        type=_checked(
            float, partial(checked_poll_wait_seconds, name="model_config_file_poll_wait_seconds")
        ),
        default=0.0,
        help="0 or negative: read the config file once",
    )
    p.add_argument(
        "--file_system_poll_wait_seconds",
        type=_checked(float, checked_poll_wait_seconds),
        default=1.0,
        help="0 or negative: list the versions once",
    )
    p.add_argument("--enable_batching", type=_flag_bool, nargs="?", const=True, default=False)
    p.add_argument("--batching_parameters_file", default="")
    p.add_argument("--monitoring_config_file", default="")
    p.add_argument(
        "--rest_api_timeout_in_ms",
        type=_checked(int, checked_rest_timeout_ms),
        default=30000,
        help="0 or negative: no timeout",
    )
    p.add_argument("--enable_model_warmup", type=_flag_bool, nargs="?", const=True, default=True)
    p.add_argument("--max_num_load_retries", type=_checked(int, checked_load_retries), default=5)
    p.add_argument(
        "--load_retry_interval_micros",
        type=_checked(int, checked_retry_interval_micros),
        default=60_000_000,
        help="negative: no wait",
    )
    p.add_argument(
        "--allow_version_labels_for_unavailable_models", type=_flag_bool, nargs="?", const=True,
        default=False,
    )  # fmt: skip
    p.add_argument(
        "--enable_signature_method_name_check", type=_flag_bool, nargs="?", const=True,
        default=False,
    )  # fmt: skip
    p.add_argument(
        "--enable_serialization_as_tensor_content", type=_flag_bool, nargs="?", const=True,
        default=False, help="Predict outputs in tensor_content instead of float_val, int_val, ...",
    )  # fmt: skip
    p.add_argument("--grpc_max_threads", type=_checked(int, checked_grpc_max_threads), default=64)
    p.add_argument(
        "--max_message_bytes",
        type=_checked(int, checked_max_message_bytes),
        default=DEFAULT_MAX_MESSAGE_BYTES,
        help="ours: largest gRPC message and REST body, and what a request's tensors may decode "
        "to (TF Serving: 2 GiB messages, no decode limit)",
    )
    p.add_argument(
        "--max_image_pixels",
        type=_checked(int, checked_max_image_pixels),
        default=defaults.max_image_pixels,
        help="ours: largest image (width x height x frames) a request may send; larger ones are "
        "refused before decoding",
    )
    p.add_argument(
        "--rest_api_stall_seconds",
        type=_checked(float, checked_stall_seconds),
        default=DEFAULT_STALL_SECONDS,
        help="ours: a REST request or answer that stops moving this long drops its connection "
        "(idle keep-alive connections are kept, without a thread)",
    )
    p.add_argument(
        "--rest_api_num_threads",
        type=_checked(int, checked_rest_threads),
        default=DEFAULT_REST_THREADS,
        help="threads reading and answering REST requests; more connections wait their turn "
        "(TF Serving: 4 x cores, running handlers only)",
    )
    p.add_argument("--config", help="van-tfx config YAML (for the default base path)")
    p.set_defaults(func=_serve)
    show_defaults(p)


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append '(default: X)' to the help of each flag whose default is a value."""
    # As `tensorflow_model_server --help` lists every flag's default: without them a user could
    # not tell that --rest_api_port is 8501 here (0 in TF Serving) or what --timeout waits.
    for action in parser._actions:
        if not action.option_strings or action.default in (None, "", [], argparse.SUPPRESS):
            continue
        if isinstance(action, argparse._StoreTrueAction):
            continue  # an on/off switch: its default is being off
        action.help = (
            f"{action.help} (default: %(default)s)" if action.help else "default: %(default)s"
        )


def _serve(args) -> int:
    import faulthandler
    import logging
    import signal
    import threading

    from serving.errors import ServingError
    from serving.manager import LoadError, StartupCancelled
    from serving.protos import ConfigFileError
    from serving.server import ModelServer, ServerOptions

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    base_path = args.model_base_path
    if not base_path and not args.model_config_file:
        from van_tfx.config import load_config

        base_path = str(load_config(args.config).serving_base_path)
    options = ServerOptions(
        port=args.port,
        grpc_host=args.grpc_host,
        rest_api_port=args.rest_api_port,
        rest_api_host=args.rest_api_host,
        model_name=args.model_name,
        model_base_path=base_path,
        model_config_file=args.model_config_file,
        model_config_file_poll_wait_seconds=args.model_config_file_poll_wait_seconds,
        file_system_poll_wait_seconds=args.file_system_poll_wait_seconds,
        enable_batching=args.enable_batching,
        batching_parameters_file=args.batching_parameters_file,
        monitoring_config_file=args.monitoring_config_file,
        rest_api_timeout_in_ms=args.rest_api_timeout_in_ms,
        enable_model_warmup=args.enable_model_warmup,
        max_num_load_retries=args.max_num_load_retries,
        load_retry_interval_micros=args.load_retry_interval_micros,
        allow_version_labels_for_unavailable_models=args.allow_version_labels_for_unavailable_models,
        max_message_bytes=args.max_message_bytes,
        max_image_pixels=args.max_image_pixels,
        enable_signature_method_name_check=args.enable_signature_method_name_check,
        grpc_max_threads=args.grpc_max_threads,
        enable_serialization_as_tensor_content=args.enable_serialization_as_tensor_content,
        rest_api_stall_seconds=args.rest_api_stall_seconds,
        rest_api_num_threads=args.rest_api_num_threads,
    )
    server = ModelServer(options)
    stop_requested = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop_requested.set())
    # `kill -USR1 <pid>` prints every thread's stack to stderr, from C (no GIL needed): what a
    # server that does not stop or answer is doing.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        # Waiting for a model may last forever (as in TF Serving); SIGTERM ends the wait.
        server.start(cancel=stop_requested)
    except (ConfigFileError, LoadError, OSError, ServingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (StartupCancelled, KeyboardInterrupt):
        logging.getLogger(__name__).info("stopped before every model was available")
        _exit_after_stop(server)
    print(f"Running gRPC ModelServer at {server.grpc_target} ...", flush=True)
    if server.rest_url:
        print(f"Exporting HTTP/REST API at {server.rest_url} ...", flush=True)
    try:
        while server.is_serving() and not stop_requested.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    _exit_after_stop(server)
    return 0


def _exit_after_stop(server) -> None:
    """Stop the server, then end the process even if a model call is still running.

    A TensorFlow call cannot be interrupted, and Python waits for busy worker threads at exit:
    without os._exit a SIGTERM would leave the process alive until that call ends.
    """
    import faulthandler
    import os
    import threading

    # os._exit below needs the GIL; a C call that holds it (and never lets this thread run)
    # would keep the process alive. faulthandler's watchdog is a C thread that needs no GIL:
    # WATCHDOG_SECONDS later it prints every thread's stack and exits with status 1.
    faulthandler.dump_traceback_later(SHUTDOWN_SECONDS + WATCHDOG_SECONDS, exit=True)
    stopper = threading.Thread(target=server.stop, name="shutdown", daemon=True)
    stopper.start()
    stopper.join(SHUTDOWN_SECONDS)
    if stopper.is_alive():
        print(f"error: shutdown took over {SHUTDOWN_SECONDS:.0f} s; exiting", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _add_predict(subparsers) -> None:
    defaults = _serving_defaults()
    p = subparsers.add_parser("predict", help="classify image files through a model server")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--server", default=None, help="host:port (default 127.0.0.1:8500, REST 8501)")
    p.add_argument("--rest", action="store_true", help="use the REST API instead of gRPC")
    p.add_argument("--model-name", default=defaults.model_name)
    p.add_argument("--signature", default="predict_images")
    p.add_argument(
        "--timeout",
        type=_checked(float, partial(checked_positive_seconds, "timeout")),
        default=30.0,
        help="seconds",
    )
    p.add_argument(
        "--max-message-bytes",
        type=_checked(int, checked_max_message_bytes),
        default=DEFAULT_MAX_MESSAGE_BYTES,
        help="largest request to send and answer to take (the server's --max_message_bytes; "
        "TF Serving: 2 GiB - 1)",
    )
    p.add_argument(
        "--apply-exif-orientation",
        action="store_true",
        help="send images whose EXIF orientation is 2-8 upright, re-encoded as JPEG, as "
        "`van-tfx data build --apply-exif-orientation` stores them (default: the file's bytes, "
        "which the server decodes with EXIF ignored, as TF Serving does)",
    )
    p.set_defaults(func=_predict)
    show_defaults(p)


# A request's envelope beyond its images' bytes (names, tensor shape, JSON or proto framing).
REQUEST_OVERHEAD_BYTES = 4096


def _read_images(paths: list[str], limit: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[bytes]:
    """The bytes of each image file; exits naming the file when it is not a regular file or
    larger than `limit` (what a request may carry), without reading it."""
    import os
    import stat

    images = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                info = os.fstat(f.fileno())
                if not stat.S_ISREG(info.st_mode):
                    raise SystemExit(f"error: image {path} is not a regular file")
                if info.st_size > limit:
                    raise SystemExit(_too_large(f"image {path}", info.st_size, limit))
                data = f.read(limit + 1)  # a file growing meanwhile is still bounded
        except OSError as exc:
            raise SystemExit(f"error: cannot read image {path}: {exc.strerror}") from None
        if len(data) > limit:
            raise SystemExit(_too_large(f"image {path}", len(data), limit))
        images.append(data)
    return images


def _upright(images: list[bytes], paths: list[str]) -> list[bytes]:
    """Each image turned upright by its EXIF orientation, as the converter's flag stores it."""
    from van_tfx.data.records import InvalidImageError, upright_image_bytes

    try:
        return [upright_image_bytes(image, path) for image, path in zip(images, paths, strict=True)]
    except InvalidImageError as exc:  # too large, or damaged past its header
        raise SystemExit(f"error: image {exc}") from None


def _too_large(what: str, size: int, limit: int) -> str:
    return (
        f"error: {what} is {size} bytes, more than the {limit} bytes a request may carry "
        "(--max-message-bytes)"
    )


def _request_bytes(images: list[bytes], rest: bool) -> int:
    """About how many bytes a request sending `images` takes (REST: base64 in JSON)."""
    sizes = [4 * -(-len(image) // 3) if rest else len(image) for image in images]
    return sum(sizes) + REQUEST_OVERHEAD_BYTES + 32 * len(images)


def _naming_images(error, paths: list[str]) -> str:
    """The server's error message with `images[i]` replaced by the i-th path, or, when it names
    none and says the input is invalid, naming the paths sent."""

    def path_of(match: re.Match) -> str:
        index = int(match[1])
        return paths[index] if index < len(paths) else match[0]

    message = model_assertion(error.message)
    named = re.sub(r"\bimages\[(\d+)\]", path_of, message)
    if named != message or error.code not in ("INVALID_ARGUMENT", "400"):
        return named
    if len(paths) == 1:
        return f"{message} (image {paths[0]})"
    return f"{message} (one of the images {', '.join(paths)})"


# TensorFlow's Assert failure: "assertion failed: [<the model's message>] [Condition x == y did
# not hold element-wise:] [x (All_1:0) = ] [0] ... [[{{node assert_equal_1/...}}]]". Only the first
# bracket was written for the caller; TF prints it with quotes escaped (\').
_ASSERTION = re.compile(r"assertion failed: \[((?:[^\]\\]|\\.)*)\].*", re.DOTALL)


def model_assertion(message: str) -> str:
    """A server error with a TF assertion's graph details cut down to the model's own message."""
    return _ASSERTION.sub(lambda m: re.sub(r"\\(.)", r"\1", m[1]), message)


# gRPC read an http:// URL as a host name: "cannot resolve the host: Misformatted domain name".
_GRPC_URL_ERROR = "error: --server {server} is a URL; gRPC takes host:port (URLs are for --rest)"


def _is_http_url(server: str) -> bool:
    """Whether a gRPC --server was given as an http(s) URL (gRPC's own unix:// etc. are not)."""
    return server.lower().startswith(("http://", "https://"))


def _predict(args) -> int:
    from serving import client

    defaults = _serving_defaults()
    images = _read_images(args.images, args.max_message_bytes)
    if args.apply_exif_orientation:
        images = _upright(images, args.images)
    size = _request_bytes(images, args.rest)
    if size > args.max_message_bytes:
        what = f"a request with the images {', '.join(args.images)}"
        if args.rest:
            what += " (base64 in JSON)"
        print(_too_large(what, size, args.max_message_bytes), file=sys.stderr)
        return 1
    port = defaults.rest_port if args.rest else defaults.grpc_port
    server = args.server or f"127.0.0.1:{port}"
    try:
        if args.rest:
            url = server if server.startswith(("http://", "https://")) else f"http://{server}"
            try:
                client.checked_rest_url(url)
            except ValueError as exc:
                print(f"error: --server {exc}", file=sys.stderr)
                return 2
            rows = client.predict_images_rest(
                url, images, args.model_name, args.signature, args.timeout, args.max_message_bytes
            )
        else:
            if _is_http_url(server):
                print(_GRPC_URL_ERROR.format(server=server), file=sys.stderr)
                return 2
            rows = client.predict_images(
                server,
                images,
                args.model_name,
                args.signature,
                args.timeout,
                args.max_message_bytes,
            )
    except client.WrongProtocol as exc:
        # A server is there, on the other API's port: "start one" would send users astray.
        other = (
            f"drop --rest, or give the REST port (default {defaults.rest_port})"
            if args.rest
            else f"pass --rest for a REST port, or give the gRPC port (default {defaults.grpc_port})"
        )
        print(f"error: no model server at {server} ({exc}); {other}", file=sys.stderr)
        return 2
    except client.ServerUnavailable as exc:
        print(
            f"error: no model server at {server} ({exc}); start one with `van-tfx serve`",
            file=sys.stderr,
        )
        return 2
    except client.AnswerTooLarge as exc:
        print(
            f"error: the server at {server} answered, but {exc}; raise --max-message-bytes to "
            "take it",
            file=sys.stderr,
        )
        return 1
    except client.PredictionError as exc:
        message = f"{exc.code}: {_naming_images(exc, args.images)}"
        print(f"error: the server at {server} rejected the request: {message}", file=sys.stderr)
        return 1
    for path, row in zip(args.images, rows, strict=True):
        print(path)
        for rank, entry in enumerate(row, start=1):
            text = f"  {entry.text}" if entry.text else ""
            print(f"  {rank}. {entry.synset:<12} {entry.score:.4f}  (class {entry.index}){text}")
    return 0


def _add_loadtest(subparsers) -> None:
    defaults = _serving_defaults()
    p = subparsers.add_parser("loadtest", help="concurrent gRPC load with QPS and p50/p95/p99")
    p.add_argument("--server", default=f"127.0.0.1:{defaults.grpc_port}", help="gRPC host:port")
    p.add_argument(
        "--duration",
        type=_checked(float, partial(checked_positive_seconds, "duration")),
        default=10.0,
        help="seconds",
    )
    p.add_argument(
        "--concurrency",
        type=_checked(int, partial(checked_in_range, "concurrency", low=1, high=None)),
        default=8,
    )
    p.add_argument("--model-name", default=defaults.model_name)
    p.add_argument("--signature", default="predict_images")
    p.add_argument(
        "--timeout",
        type=_checked(float, partial(checked_positive_seconds, "timeout")),
        default=30.0,
        help="seconds each request may take (the first, which checks the server, at most 10)",
    )
    p.add_argument("--image", action="append", default=[], help="image file(s) to send")
    p.add_argument(
        "--swap-to",
        type=_checked(str, checked_saved_model_dir),
        help="SavedModel dir to push as the next version mid-run",
    )
    p.add_argument("--base-path", help="the served model base path (for --swap-to)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_loadtest)
    show_defaults(p)


LOADTEST_FIRST_TIMEOUT = 10.0  # seconds for loadtest's first request, which checks the server


def _loadtest(args) -> int:
    from serving import client
    from serving.loadtest import run_loadtest

    if args.swap_to and not args.base_path:
        from van_tfx.config import load_config

        args.base_path = str(load_config().serving_base_path)
    if _is_http_url(args.server):
        print(_GRPC_URL_ERROR.format(server=args.server), file=sys.stderr)
        return 2
    images = _read_images(args.image) if args.image else [_sample_image()]
    # Each image once, up front: nothing listening fails fast, and an image the server refuses
    # is named here (in the run it would only be counted among the errors).
    sent = 0
    try:
        first_timeout = min(args.timeout, LOADTEST_FIRST_TIMEOUT)
        for index, image in enumerate(images):
            sent = index  # named below if the server refuses it
            client.predict_images(
                args.server, [image], args.model_name, args.signature, first_timeout
            )
    except client.ServerUnavailable as exc:
        print(f"error: no model server at {args.server} ({exc})", file=sys.stderr)
        return 2
    except client.PredictionError as exc:
        # As `predict`: the server's "images[0]" or a bare "invalid" becomes the file sent.
        path = args.image[sent : sent + 1]
        message = f"{exc.code}: {_naming_images(exc, path)}" if args.image else exc
        print(
            f"error: the server at {args.server} rejected the request: {message}", file=sys.stderr
        )
        return 1
    except client.AnswerTooLarge as exc:
        print(f"error: the server at {args.server} answered, but {exc}", file=sys.stderr)
        return 1
    try:
        report = run_loadtest(
            args.server,
            images,
            args.duration,
            args.concurrency,
            args.model_name,
            args.signature,
            swap_to=args.swap_to,
            base_path=args.base_path,
            progress=not args.no_progress,
            timeout=args.timeout,
        )
    except OSError as exc:  # pushing --swap-to into --base-path failed
        print(
            f"error: cannot push --swap-to {args.swap_to} into --base-path {args.base_path}: "
            f"{exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    print(report.summary())
    for error in report.error_examples:
        print(f"  error: {error}", file=sys.stderr)
    # The exit statuses of `predict`: 2 when requests went unanswered (the server went away,
    # hung or timed out: serving.client.grpc_failure), else 1 when the server refused some.
    if report.unanswered:
        print(
            f"error: {report.unanswered} of {report.requests} requests got no answer from the "
            f"model server at {args.server}",
            file=sys.stderr,
        )
        return 2
    if report.errors:
        print(
            f"error: {report.errors} of {report.requests} requests failed at {args.server}",
            file=sys.stderr,
        )
        return 1
    return 0


def _sample_image() -> bytes:
    from serving.testing import encode_image

    return encode_image((180, 120, 60), size=64, fmt="JPEG")
