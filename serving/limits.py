"""What one request may make the server do: bytes it may expand to, pixels it may decode.

TF Serving bounds request bytes (gRPC max message size) and leaves the rest to the graph. A Python
server that shares two cores with its neighbours cannot: a few-byte TensorProto may declare a
gigabyte shape, a 1 MB image may decode to 400 M pixels. Both are refused before any work.
"""

from __future__ import annotations

import dataclasses

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


def checked_stall_seconds(seconds: float) -> float:
    """`seconds` if usable as --rest_api_stall_seconds, else a ValueError saying why."""
    if not 0 < seconds <= MAX_STALL_SECONDS:  # NaN too: 0 would make sockets non-blocking
        raise ValueError(
            f"rest_api_stall_seconds must be > 0 and <= {MAX_STALL_SECONDS:.0f}, got {seconds}"
        )
    return seconds


def checked_rest_threads(threads: int) -> int:
    """`threads` if usable as --rest_api_num_threads, else a ValueError saying why."""
    if threads < 1:
        raise ValueError(f"rest_api_num_threads must be >= 1, got {threads}")
    return threads


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """The per-request budget: decoded tensor bytes and decoded pixels per image."""

    max_tensor_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
