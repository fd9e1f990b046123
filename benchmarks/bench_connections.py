"""What idle REST keep-alive connections cost the server: threads and RSS, measured in one run
for the standard library's ThreadingHTTPServer (the baseline, what serving/ used before) and for
serving.http_connections.KeepAliveHTTPServer, each in its own process with the same handler.

    python benchmarks/bench_connections.py --connections 2000
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.machine import describe_machine  # noqa: E402
from serving.http_connections import KeepAliveHandler, KeepAliveHTTPServer  # noqa: E402

SERVERS = ("threading", "keep-alive")


class AnswerOk:
    """The same small 200 answer, one write, for both servers' handlers (mixed in first)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_GET(self):  # noqa: N802 (http.server naming)
        """Answer every GET with the same small 200 JSON body, in one write."""
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self._headers_buffer.append(b"\r\n" + body)  # one write, as serving/rest_api.py does
        self.flush_headers()

    def log_message(self, *args):
        """Log nothing (BaseHTTPRequestHandler would write a line per request to stderr)."""
        pass


class ThreadingOk(AnswerOk, BaseHTTPRequestHandler):
    """The baseline: the standard library's handler."""


class KeepAliveOk(AnswerOk, KeepAliveHandler):
    """Ours."""


def process_usage() -> tuple[int, float]:
    """(threads, RSS in MiB) of this process, from /proc."""
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return int(fields["Threads"]), int(fields["VmRSS"].split()[0]) / 1024


def measure(server_kind: str, connections: int) -> dict:
    """Open `connections` keep-alive connections, one request each, and what they cost idle."""
    server = (
        ThreadingHTTPServer(("127.0.0.1", 0), ThreadingOk)
        if server_kind == "threading"
        else KeepAliveHTTPServer(("127.0.0.1", 0), KeepAliveOk)
    )
    server.daemon_threads = True
    import threading

    threading.Thread(target=server.serve_forever, daemon=True).start()
    threads_before, rss_before = process_usage()
    port = server.server_address[1]
    clients = []
    started = time.perf_counter()
    for _ in range(connections):
        client = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        client.request("GET", "/")
        response = client.getresponse()
        assert response.status == 200 and response.read() == b'{"ok": true}'
        clients.append(client)
    opened = time.perf_counter() - started
    time.sleep(1.0)
    threads, rss = process_usage()
    probe = time.perf_counter()
    fresh = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    fresh.request("GET", "/")
    fresh.getresponse().read()
    probe = time.perf_counter() - probe
    return {
        "server": server_kind,
        "threads": threads - threads_before,
        "rss_mib": rss - rss_before,
        "open_seconds": opened,
        "probe_ms": probe * 1000,
        "sequential_per_second": sequential_requests_per_second(fresh, 2000),
    }


def sequential_requests_per_second(client: http.client.HTTPConnection, count: int) -> float:
    """Requests per second one keep-alive client gets, each sent after the last answer."""
    started = time.perf_counter()
    for _ in range(count):
        client.request("GET", "/")
        client.getresponse().read()
    return count / (time.perf_counter() - started)


def main() -> int:
    """Measure both servers, each in a fresh process, and print the ratios."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--server", choices=SERVERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.server:
        print(json.dumps(measure(args.server, args.connections)))
        return 0
    print(describe_machine())
    print(f"{args.connections} idle keep-alive connections (client and server in one process)")
    results = {}
    for kind in SERVERS:
        out = subprocess.run(
            [sys.executable, __file__, "--server", kind, f"--connections={args.connections}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        results[kind] = json.loads(out.strip().splitlines()[-1])
        r = results[kind]
        print(
            f"  {kind:>10}: +{r['threads']} threads, +{r['rss_mib']:.1f} MiB RSS, "
            f"opened in {r['open_seconds']:.2f} s, a new request then {r['probe_ms']:.1f} ms, "
            f"then {r['sequential_per_second']:.0f} sequential requests/s on that connection"
        )
    base, ours = results["threading"], results["keep-alive"]
    print(
        f"  keep-alive vs threading: threads {base['threads']} -> {ours['threads']}, "
        f"RSS x{base['rss_mib'] / max(ours['rss_mib'], 0.1):.1f} less, sequential requests "
        f"x{ours['sequential_per_second'] / base['sequential_per_second']:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
