"""A local HTTP server speaking the two GCS JSON API calls a ranged read makes, for tests.

No bucket is reachable from here, so google-cloud-storage (the real client, pointed here by its
own STORAGE_EMULATOR_HOST setting) reads objects from this server: an object's metadata
(`GET /storage/v1/b/<bucket>/o/<name>`) and its bytes (`GET /download/storage/v1/b/<bucket>/o/
<name>?alt=media`, honouring `Range: bytes=a-b` as GCS does, 416 past the end). Every request is
recorded with the bytes it was sent, so a test can see what a read fetched.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class FakeGcs:
    """The objects served ({(bucket, name): bytes}) and the requests made: (kind, name, bytes)."""

    url: str = ""
    objects: dict[tuple[str, str], bytes] = field(default_factory=dict)
    requests: list[tuple[str, str, int]] = field(default_factory=list)

    def put(self, path: str, data: bytes) -> None:
        """Store `data` as the object gs://bucket/name `path`."""
        bucket, _, name = path[len("gs://") :].partition("/")
        self.objects[bucket, name] = data

    def served(self, path: str) -> tuple[int, int]:
        """(requests, bytes sent) for the object gs://bucket/name `path`."""
        name = path[len("gs://") :].partition("/")[2]
        sent = [size for _, requested, size in self.requests if requested == name]
        return len(sent), sum(sent)


_OBJECT = re.compile(r"^(/download)?/storage/v1/b/([^/]+)/o/([^?]+)")


def _handler(gcs: FakeGcs):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server naming)
            """An object's metadata, or its bytes (a range of them when asked)."""
            found = _OBJECT.match(self.path)
            if not found:
                return self._answer(404, b"{}", "metadata", "")
            media, bucket, name = (
                found.group(1),
                found.group(2),
                urllib.parse.unquote(found.group(3)),
            )
            data = gcs.objects.get((bucket, name))
            if data is None:
                return self._answer(404, b'{"error": {"code": 404}}', "metadata", name)
            if not media:
                body = {"bucket": bucket, "name": name, "size": str(len(data)), "generation": "1"}
                return self._answer(200, json.dumps(body).encode(), "metadata", name)
            ranged = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if not ranged:
                return self._answer(200, data, "media", name)
            start = int(ranged.group(1))
            end = min(int(ranged.group(2) or len(data) - 1), len(data) - 1)
            if start >= len(data):
                return self._answer(416, b"", "media", name)
            extra = {"Content-Range": f"bytes {start}-{end}/{len(data)}"}
            return self._answer(206, data[start : end + 1], "media", name, extra)

        def _answer(self, status, body, kind, name, headers=None):
            gcs.requests.append((kind, name, len(body)))
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            content = "application/json" if kind == "metadata" else "application/octet-stream"
            self.send_header("Content-Type", content)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            """Nothing: the requests are recorded, not logged."""

    return Handler


@contextlib.contextmanager
def fake_gcs():
    """A running FakeGcs on a free local port."""
    gcs = FakeGcs()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(gcs))
    gcs.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield gcs
    finally:
        server.shutdown()
        server.server_close()
