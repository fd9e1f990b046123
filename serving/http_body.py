"""Reading an HTTP/1.1 request body within --max_message_bytes, by Content-Length or chunked,
and gunzipped (Content-Encoding: gzip) within the same limit.

http.server reads neither for us. Everything a client declares is checked before a byte of the
body is read: one Content-Length of digits, or exactly `Transfer-Encoding: chunked` (RFC 9112
§6), never both, because two ways to frame one body is how requests get smuggled.
"""

from __future__ import annotations

import re
import socket
import time
import zlib
from email.message import Message
from typing import BinaryIO

# A refused body is read and dropped before the connection closes, up to these bounds: closing a
# socket with unread bytes makes the kernel send a reset, which destroys the refusal (a 413) before
# the client, still sending, reads it. Past the bounds the client gets the reset, as from nginx.
LINGER_BYTES = 64 << 20
LINGER_SECONDS = 5.0

# http.client's own bounds on a header line and on the number of headers (here: trailers).
MAX_LINE_BYTES = 65536
MAX_TRAILERS = 100

_DIGITS = re.compile(rb"[0-9]{1,18}")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")


class BodyRefused(Exception):
    """A request body this server will not read: the HTTP status and message to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def declared_length(headers: Message, limit: int) -> int | None:
    """The body length `headers` declare (None: chunked); BodyRefused if it is malformed or over `limit`."""
    codings = headers.get_all("Transfer-Encoding") or []
    lengths = [value.strip() for value in headers.get_all("Content-Length") or []]
    if codings:
        if lengths:
            raise BodyRefused(400, "Request has both Content-Length and Transfer-Encoding")
        named = [coding.strip().lower() for coding in ",".join(codings).split(",")]
        if named != ["chunked"]:
            raise BodyRefused(501, f"Transfer-Encoding {', '.join(codings)!r} is not supported")
        return None
    if not lengths:
        return 0
    if len(set(lengths)) != 1 or not _DIGITS.fullmatch(lengths[0].encode()):
        raise BodyRefused(400, f"Invalid Content-Length: {', '.join(lengths)!r}")
    length = int(lengths[0])
    if length > limit:
        raise BodyRefused(413, too_long_message(limit))
    return length


def too_long_message(limit: int) -> str:
    """The refusal of a body over `limit` bytes, naming the flag that sets it."""
    return f"Request body must be 0..{limit} bytes (--max_message_bytes)"


def read_chunked(rfile: BinaryIO, limit: int) -> bytes:
    """The body of a chunked request from `rfile`, at most `limit` bytes; BodyRefused if malformed or longer."""
    body = bytearray()
    while size := _chunk_size(_line(rfile, "chunk size")):
        if len(body) + size > limit:
            raise BodyRefused(413, too_long_message(limit))
        chunk = rfile.read(size)
        if len(chunk) != size or rfile.read(2) != b"\r\n":
            raise BodyRefused(400, "Chunked body ended inside a chunk")
        body += chunk
    for _ in range(MAX_TRAILERS + 1):
        if _line(rfile, "trailer") == b"\r\n":
            return bytes(body)
    raise BodyRefused(400, f"Chunked body has more than {MAX_TRAILERS} trailer lines")


def _line(rfile: BinaryIO, what: str) -> bytes:
    line = rfile.readline(MAX_LINE_BYTES + 1)
    if len(line) > MAX_LINE_BYTES or not line.endswith(b"\r\n"):
        raise BodyRefused(400, f"Chunked body has a malformed {what} line")
    return line


def _chunk_size(line: bytes) -> int:
    size = (
        line[:-2].split(b";", 1)[0].strip(b" \t")
    )  # chunk extensions are ignored (RFC 9112 §7.1.1)
    if not _HEX.fullmatch(size):
        raise BodyRefused(400, f"Chunked body has an invalid chunk size: {size[:32]!r}")
    return int(size, 16)


def drop_unread_request_bytes(connection: socket.socket, limit: int) -> None:
    """Half-close `connection` and read up to `limit` bytes or LINGER_SECONDS of what is still coming."""
    deadline = time.monotonic() + LINGER_SECONDS
    try:
        connection.shutdown(socket.SHUT_WR)
        while limit > 0 and (left := deadline - time.monotonic()) > 0:
            connection.settimeout(left)
            chunk = connection.recv(min(limit, 1 << 20))
            if not chunk:
                return
            limit -= len(chunk)
    except OSError:  # the client reset or went quiet: nothing left to protect
        pass


def is_gzip(headers: Message) -> bool:
    """Whether the body is to be gunzipped: EvHTTPRequest::NeedUncompressGzipContent."""
    # TF Serving decompresses by default when Content-Encoding contains "gzip".
    return any("gzip" in value for value in headers.get_all("Content-Encoding") or [])


def gunzip(body: bytes, limit: int) -> bytes:
    """`body` decompressed; BodyRefused (413) past `limit` bytes, checked as it inflates."""
    # Checked as it inflates: a small zip bomb must not allocate gigabytes. Not gzip: b"", as TF
    # Serving reads an undecompressable body as empty (then "The document is empty").
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error:
        return b""
    if len(data) > limit:
        raise BodyRefused(413, too_long_message(limit) + " once decompressed")
    if not inflater.eof:
        return b""  # truncated
    return data
