"""A bandwidth-capped HTTP origin on 127.0.0.1, for tests and benchmarks.

It simulates a contended shared filesystem: every byte of every file body,
whatever the number of concurrent readers, goes through one global token
bucket (``bandwidth`` bytes per second). It serves a local directory with the
standard library's :mod:`http.server`, adds ``Range`` requests (fsspec's
``http`` filesystem reads files in ranges) and counts the bytes it served.
Directories are listed as the standard HTML index page, which is what
fsspec's ``HTTPFileSystem.ls`` parses, so ``http://127.0.0.1:PORT/model/``
works as a context ``source``.

Examples
--------
>>> with HTTPOrigin("/data/models", bandwidth=50e6) as origin:  # doctest: +SKIP
...     source = origin.url("model/")
...     ...
...     origin.bytes_served
"""

from __future__ import annotations

import functools
import os
import re
import threading
import time
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_BLOCK = 256 * 2**10


class TokenBucket:
    """One global byte-rate limit shared by all threads (``None``: unlimited).

    Senders reserve consecutive time slots. Up to ``burst`` seconds of unused
    slots are kept, so that oversleeping (timer slack, the GIL) does not push
    the average rate below ``rate``; it never exceeds it by more than that.
    """

    def __init__(self, rate: float | None, burst: float = 0.05) -> None:
        self.rate = rate
        self.burst = burst
        self._lock = threading.Lock()
        self._next = time.monotonic()

    def take(self, n: int) -> None:
        """Block until ``n`` bytes may be sent."""
        if not self.rate:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now - self.burst, self._next)
            self._next = start + n / self.rate
            wait = self._next - now
        if wait > 0:
            time.sleep(wait)


class _Handler(SimpleHTTPRequestHandler):
    server: _Server

    def log_message(self, format, *args):
        pass

    def send_head(self):
        self._range = None
        path = self.translate_path(self.path)
        if os.path.isdir(path):
            return super().send_head()  # redirect to "dir/" or the HTML index
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed by the caller (stdlib protocol)
        except OSError:
            self.send_error(HTTPStatus.NOT_FOUND, "File not found")
            return None
        size = os.fstat(f.fileno()).st_size
        start, end = 0, size - 1
        header = self.headers.get("Range")
        status = HTTPStatus.OK
        if header:
            m = _RANGE.match(header.strip())
            if m is None or (not m.group(1) and not m.group(2)):
                f.close()
                self.send_error(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                return None
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            else:  # "bytes=-N": the last N bytes
                start = max(0, size - int(m.group(2)))
            if start >= size or end < start:
                f.close()
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.end_headers()
                return None
            status = HTTPStatus.PARTIAL_CONTENT
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if status == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        self._range = (start, end)
        return f

    def copyfile(self, source, outputfile):
        if self._range is None:  # an HTML index page: not counted, not throttled
            return super().copyfile(source, outputfile)
        start, end = self._range
        source.seek(start)
        remaining = end - start + 1
        rel = self.path.split("?")[0].lstrip("/")
        while remaining > 0:
            block = source.read(min(_BLOCK, remaining))
            if not block:
                break
            self.server.bucket.take(len(block))
            outputfile.write(block)
            remaining -= len(block)
            self.server.count(rel, len(block))


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, directory: str, bandwidth: float | None) -> None:
        super().__init__(("127.0.0.1", 0), functools.partial(_Handler, directory=directory))
        self.bucket = TokenBucket(bandwidth)
        self.lock = threading.Lock()
        self.per_path: dict[str, int] = {}

    def count(self, rel: str, n: int) -> None:
        with self.lock:
            self.per_path[rel] = self.per_path.get(rel, 0) + n


class HTTPOrigin:
    """Serve ``directory`` on ``http://127.0.0.1:<port>/`` from a daemon thread.

    Parameters
    ----------
    directory
        What to serve.
    bandwidth
        Global cap in bytes per second over all concurrent readers
        (``None``: unlimited).
    """

    def __init__(self, directory: str | os.PathLike, bandwidth: float | None = None) -> None:
        self.directory = os.fspath(directory)
        self._server = _Server(self.directory, bandwidth)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def bandwidth(self) -> float | None:
        return self._server.bucket.rate

    @bandwidth.setter
    def bandwidth(self, value: float | None) -> None:
        self._server.bucket.rate = value

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    @property
    def bytes_served(self) -> int:
        """File-body bytes sent so far (index pages excluded)."""
        with self._server.lock:
            return sum(self._server.per_path.values())

    def bytes_per_path(self) -> dict[str, int]:
        with self._server.lock:
            return dict(self._server.per_path)

    def reset_counters(self) -> None:
        with self._server.lock:
            self._server.per_path.clear()

    def start(self) -> HTTPOrigin:
        self._thread = threading.Thread(target=self._server.serve_forever, name="http-origin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving (idempotent); later requests are refused."""
        if self._thread is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
