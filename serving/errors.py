"""TF Serving status codes and messages, shared by the gRPC and REST front ends."""

from __future__ import annotations

import re

import grpc

# How TF Serving's HTTP front end maps canonical codes to HTTP status codes
# (model_servers/http_server.cc, ToHTTPStatusCode).
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNKNOWN: 500,
}


# Error messages travel in the grpc-message trailer, and gRPC clients refuse metadata beyond
# 8 KiB by default (RESOURCE_EXHAUSTED instead of the real status); TF's messages can quote a
# whole request value (a parse_example failure quotes the example), so longer ones are cut here.
# gRPC percent-encodes the trailer: every byte outside printable ASCII, and "%", takes 3, so a
# 3000-character "€" name is 27000 bytes on the wire. The cap counts encoded bytes.
MAX_MESSAGE_BYTES = 4000


def _encoded_size(char: str) -> int:
    if " " <= char <= "~" and char != "%":
        return 1
    return 3 * len(char.encode("utf-8", "surrogatepass"))


def capped_message(message: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """`message`, cut so that its percent-encoded grpc-message trailer stays within `limit`."""
    if len(message) * 12 <= limit:  # 12: the most a character can take (4 UTF-8 bytes x 3)
        return message
    used, end = 0, 0
    budget = limit - 40  # room for the note saying what was cut
    for end, char in enumerate(message):  # noqa: B007 - `end` is used after the loop
        used += _encoded_size(char)
        if used > budget:
            break
    else:
        return message
    return f"{message[:end]}... ({len(message) - end} more characters)"


class ServingError(Exception):
    """A request failure carrying the canonical status code TF Serving would return."""

    def __init__(self, code: grpc.StatusCode, message: str):
        message = capped_message(message)
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        """The HTTP status the REST API answers with."""
        return HTTP_STATUS.get(self.code, 500)


def invalid_argument(message: str) -> ServingError:
    """A bad request (malformed input, undecodable image, wrong dtype)."""
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServingError:
    """An unknown model or version."""
    return ServingError(grpc.StatusCode.NOT_FOUND, message)


def failed_precondition(message: str) -> ServingError:
    """A request the servable can't answer as it is (unknown signature, unsplittable batch)."""
    return ServingError(grpc.StatusCode.FAILED_PRECONDITION, message)


def unavailable(message: str) -> ServingError:
    """A full batching queue or a server shutting down."""
    return ServingError(grpc.StatusCode.UNAVAILABLE, message)


def servable_not_found(name: str, version: int | None = None) -> ServingError:
    """The NOT_FOUND error TF Serving returns for an unknown model or version."""
    spec = f"Latest({name})" if version is None else f"Specific({name}, {version})"
    return not_found(f"Servable not found for request: {spec}")


def signature_not_found(key: str) -> ServingError:
    """The FAILED_PRECONDITION error TF Serving returns for an unknown signature key."""
    return failed_precondition(f'Serving signature key "{key}" not found.')


def missing_model_spec() -> ServingError:
    """A request without a model_spec (predict_impl.cc, classification_service.cc, ...)."""
    return invalid_argument("Missing ModelSpec")


def from_tf_error(exc: Exception) -> ServingError:
    """Map a TensorFlow runtime error to the status TF Serving would return."""
    import tensorflow as tf

    if isinstance(exc, UnicodeDecodeError) and isinstance(exc.object, bytes):
        # TF raises this instead of the op's error when the message quotes binary input (say
        # "Could not parse example input, value: '\x89PNG...'"): the message is in the bytes.
        # Ops that quote inputs fail on bad inputs: INVALID_ARGUMENT, as TF Serving answers.
        text = exc.object.decode("utf-8", "backslashreplace")
        return invalid_argument(_op_error_message(text))
    if isinstance(exc, tf.errors.OpError):
        code = grpc.StatusCode.INVALID_ARGUMENT
        for status in grpc.StatusCode:
            if status.value[0] == exc.error_code:
                code = status
        return ServingError(code, _op_error_message(exc.message or str(exc)))
    return ServingError(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")


def _op_error_message(message: str) -> str:
    # Eager function errors wrap the op's message in "Graph execution error" and Python call
    # stacks that mean nothing to a client; keep the op's own message and node, as TF Serving does.
    noise = ("Graph execution error", "Detected at node", "<stack traces", "File ", "[Op:")
    message = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", message.strip())
    lines = [line.strip() for line in message.splitlines()]
    kept = [line for line in lines if line and not line.startswith(noise)]
    return " ".join(line.split(" [Op:")[0] for line in kept) or message.strip()
