"""A small HTTP file server on 127.0.0.1 for download tests.

Unlike `SimpleHTTPRequestHandler` it answers Range requests (206), logs every request with its
Range header, and can be told to cut the connection after k body bytes, like a dropped download.
"""

from __future__ import annotations

import socket
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass(frozen=True)
class Request:
    """One GET as the server saw it."""

    name: str
    range: str | None


class FileServer(ThreadingHTTPServer):
    """Serves the files directly inside `root` (no subfolders)."""

    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.requests: list[Request] = []
        # One entry per coming response, in order: send only that many body bytes, then hang up.
        self.cut_after: list[int] = []
        self.honor_range = True
        self.lock = threading.Lock()

    def url(self, name: str) -> str:
        """The URL of `root / name`."""
        return f"http://127.0.0.1:{self.server_port}/{name}"

    def gets(self, name: str) -> list[Request]:
        """The requests made so far for `name`."""
        with self.lock:
            return [request for request in self.requests if request.name == name]


class _Handler(BaseHTTPRequestHandler):
    server: FileServer

    def do_GET(self) -> None:
        server = self.server
        name = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        range_header = self.headers.get("Range")
        with server.lock:
            server.requests.append(Request(name, range_header))
            cut = server.cut_after.pop(0) if server.cut_after else None
        path = server.root / name
        if not name or "/" in name or not path.is_file():
            self.send_error(404, "Not Found")
            return
        data = path.read_bytes()
        start = 0
        if range_header and server.honor_range:
            start = int(range_header.removeprefix("bytes=").removesuffix("-"))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if cut is not None:
            # The full length was promised: sending less, then closing, is what a dropped link does.
            body = body[:cut]
            self.close_connection = True
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep pytest output clean


@contextmanager
def serve(root: Path) -> Iterator[FileServer]:
    """Run a FileServer for `root` in a background thread for the duration of the block."""
    server = FileServer(root)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def closed_port() -> int:
    """A 127.0.0.1 port with nothing listening (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
