"""What one request may make the server do: bytes it may expand to, pixels it may decode.

TF Serving bounds request bytes (gRPC max message size) and leaves the rest to the graph. A Python
server that shares two cores with its neighbours cannot: a few-byte TensorProto may declare a
gigabyte shape, a 1 MB image may decode to 400 M pixels. Both are refused before any work.
"""

from __future__ import annotations

import dataclasses
import math
import os

from van_tfx.config import ServingConfig

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = ServingConfig.model_fields["max_image_pixels"].default
# A REST request or answer that stops moving this long drops its connection (it holds a thread).
DEFAULT_STALL_SECONDS = 30.0
MAX_STALL_SECONDS = 86_400.0  # a socket timeout must be finite (settimeout(inf) overflows)
# Threads reading and answering REST requests (TF Serving's --rest_api_num_threads, 4 x cores
# there, only runs handlers: libevent reads). Connections beyond it wait their turn.
DEFAULT_REST_THREADS = 64
# Beyond the stall time, a REST body or answer gets one more second per this many bytes moved
# (Apache's mod_reqtimeout MinRate): a client trickling a byte per pause can't hold a thread for
# as long as it likes, and holding all of them costs an attacker this rate per thread.
MIN_BYTES_PER_SECOND = 64 << 10


# tensorflow_model_server's numeric flags are int32 (int64 for load_retry_interval_micros); gRPC's
# message size option is an int too.
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
MAX_PORT = 65535
# What --rest_api_timeout_in_ms <= 0 means: TF Serving sets no timeout; here the longest int32 one
# (24.8 days), which threads and timers can wait for.
NO_REST_TIMEOUT_SECONDS = INT32_MAX / 1000


def checked_in_range(name: str, value, low, high):
    """`value` if a finite number within [low, high] (None: unbounded), else a ValueError."""
    # The ValueError names the option `name`.
    bounds = [f">= {low}" if low is not None else "", f"<= {high}" if high is not None else ""]
    wanted = " and ".join(b for b in bounds if b)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number {wanted}, got {value}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be {wanted}, got {value}")
    return value


def checked_positive_seconds(name: str, seconds: float) -> float:
    """`seconds` if a finite number of seconds > 0 (a timeout, a duration), else a ValueError."""
    # The ValueError names the option `name`.
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{name} must be a finite number of seconds > 0, got {seconds}")
    return seconds


def checked_saved_model_dir(path: str) -> str:
    """`path` if it is a SavedModel dir (holds saved_model.pb), else a ValueError naming it."""
    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        raise ValueError(f"{path} holds no saved_model.pb")
    return path


def checked_port(port: int, name: str = "port") -> int:
    """`port` if a TCP port number (0 picks a free one, or disables REST), else a ValueError."""
    return checked_in_range(name, port, 0, MAX_PORT)


def checked_grpc_max_threads(threads: int) -> int:
    """`threads` if usable as --grpc_max_threads, else a ValueError saying why."""
    return checked_in_range("grpc_max_threads", threads, 1, INT32_MAX)


def checked_max_message_bytes(limit: int) -> int:
    """`limit` if usable as --max_message_bytes (gRPC takes an int32), else a ValueError."""
    return checked_in_range("max_message_bytes", limit, 1, INT32_MAX)


def checked_max_image_pixels(pixels: int) -> int:
    """`pixels` if usable as --max_image_pixels, else a ValueError saying why."""
    return checked_in_range("max_image_pixels", pixels, 1, None)


def checked_poll_wait_seconds(seconds: float, name: str = "file_system_poll_wait_seconds"):
    """`seconds` if usable as a poll interval, else a ValueError."""
    # 0 or negative: no periodic poll, as in TF Serving; NaN and inf are not numbers of seconds.
    return checked_in_range(name, seconds, -INT32_MAX - 1, INT32_MAX)


def checked_rest_timeout_ms(ms: int) -> int:
    """`ms` if usable as --rest_api_timeout_in_ms, else a ValueError."""
    # 0 or negative: no timeout, as in TF Serving.
    return checked_in_range("rest_api_timeout_in_ms", ms, -INT32_MAX - 1, INT32_MAX)


def checked_load_retries(retries: int) -> int:
    """`retries` if usable as --max_num_load_retries, else a ValueError saying why."""
    return checked_in_range("max_num_load_retries", retries, 0, INT32_MAX)


def checked_retry_interval_micros(micros: int) -> int:
    """`micros` if usable as --load_retry_interval_micros (negative: no wait), else a ValueError."""
    return checked_in_range("load_retry_interval_micros", micros, -INT64_MAX - 1, INT64_MAX)


def checked_stall_seconds(seconds: float) -> float:
    """`seconds` if usable as --rest_api_stall_seconds, else a ValueError saying why."""
    if not 0 < seconds <= MAX_STALL_SECONDS:  # NaN too: 0 would make sockets non-blocking
        raise ValueError(
            f"rest_api_stall_seconds must be > 0 and <= {MAX_STALL_SECONDS:.0f}, got {seconds}"
        )
    return seconds


def checked_rest_threads(threads: int) -> int:
    """`threads` if usable as --rest_api_num_threads, else a ValueError saying why."""
    return checked_in_range("rest_api_num_threads", threads, 1, INT32_MAX)


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """The per-request budget: decoded tensor bytes and decoded pixels per image."""

    max_tensor_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
