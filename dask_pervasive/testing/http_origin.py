"""A bandwidth-capped HTTP origin on 127.0.0.1, for tests and benchmarks (:class:`HTTPOrigin`).

It simulates a contended shared filesystem: every byte of every file body,
whatever the number of concurrent readers, goes through one global token
bucket (``bandwidth`` bytes per second). It serves a local directory with the
standard library's :mod:`http.server`, adds ``Range`` requests (fsspec's
``http`` filesystem reads files in ranges) and counts the bytes it served.
Directories are listed as the standard HTML index page, which is what
fsspec's ``HTTPFileSystem.ls`` parses, so ``http://127.0.0.1:PORT/model/``
works as a context ``source``.

For fault-injection tests, :meth:`HTTPOrigin.inject` makes chosen requests
misbehave the way a flaky storage service does: stall, stop mid-body, cut the
body short, flip bytes, drop the connection or answer 503. :meth:`HTTPOrigin.stop`
then :meth:`HTTPOrigin.start` takes the origin down (connections refused) and
back up on the same port.

Examples
--------
>>> with HTTPOrigin("/data/models", bandwidth=50e6) as origin:  # doctest: +SKIP
...     source = origin.url("model/")
...     origin.inject("truncate", path="model/w0.bin", times=2)  # the next two reads of w0.bin
...     ...
...     origin.bytes_served
"""

from __future__ import annotations

import functools
import os
import re
import select
import socket
import struct
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_BLOCK = 256 * 2**10
#: What a client going away mid-response raises on the serving thread: not worth a traceback.
_CLIENT_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)

#: Fault kinds :meth:`HTTPOrigin.inject` knows.
FAULTS = ("stall", "stall-body", "truncate", "corrupt", "reset", "error")


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


@dataclass
class Fault:
    """One injected misbehaviour (see :meth:`HTTPOrigin.inject`)."""

    kind: str
    path: str | None = None  #: only requests for this path (relative, e.g. ``"model/w0.bin"``); ``None``: any
    times: int | None = 1  #: how many matching requests misbehave; ``None``: all of them
    skip: int = 0  #: matching requests let through first (fail "the Nth request")
    on: str = "get"  #: ``"get"``: file body requests only; ``"any"``: also HEAD and directory listings
    seconds: float = 60.0  #: how long a stall lasts at most (it ends earlier when the client hangs up)
    hits: int = 0  #: requests it hit so far

    def matches(self, rel: str, body: bool) -> bool:
        """Whether a request for ``rel`` (a file body when ``body``) is one this fault aims at."""
        if self.path is not None and rel != self.path.lstrip("/"):
            return False
        return body or self.on == "any"


class _State:
    """What outlives a restart of the server: limits, counters, faults."""

    def __init__(self, bandwidth: float | None, quiet: bool = False) -> None:
        self.bucket = TokenBucket(bandwidth)
        self.quiet = quiet
        self.lock = threading.Lock()
        self.per_path: dict[str, int] = {}
        self.requests: dict[str, int] = {}
        self.faults: list[Fault] = []
        self.stopping = threading.Event()

    def count(self, rel: str, n: int) -> None:
        with self.lock:
            self.per_path[rel] = self.per_path.get(rel, 0) + n

    def take_fault(self, rel: str, body: bool) -> Fault | None:
        """Count a request; the fault it triggers, if any."""
        with self.lock:
            self.requests[rel] = self.requests.get(rel, 0) + 1
            for fault in self.faults:
                if fault.times is not None and fault.times <= 0 or not fault.matches(rel, body):
                    continue
                if fault.skip > 0:
                    fault.skip -= 1
                    continue
                if fault.times is not None:
                    fault.times -= 1
                fault.hits += 1
                return fault
        return None


class _Handler(SimpleHTTPRequestHandler):
    server: _Server

    def log_message(self, format, *args):
        pass

    # -- fault injection -------------------------------------------------------------------
    def _serve(self, body: bool):
        rel = urllib.parse.unquote(self.path.split("?")[0]).lstrip("/")
        is_file = os.path.isfile(self.translate_path(self.path))
        self._fault = self.server.state.take_fault(rel, body and is_file)
        kind = self._fault.kind if self._fault is not None else None
        if kind == "stall":  # accept the request, then say nothing
            self._hold(self._fault.seconds)
            self.close_connection = True
            return None
        if kind == "reset":  # drop the connection without an answer (RST)
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return None
        if kind == "error":
            self.send_error(HTTPStatus.SERVICE_UNAVAILABLE, "injected fault")
            return None
        return super().do_GET() if body else super().do_HEAD()

    def do_GET(self):
        return self._serve(body=True)

    def do_HEAD(self):
        return self._serve(body=False)

    def _hold(self, seconds: float) -> None:
        """Send nothing for ``seconds``, or until the client hangs up or the origin stops."""
        with _suppress_gone():
            self.wfile.flush()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.server.state.stopping.is_set():
            readable, _, _ = select.select([self.connection], [], [], 0.05)
            if readable:
                try:
                    if not self.connection.recv(1, socket.MSG_PEEK):
                        return  # the client closed the connection
                except OSError:
                    return
                time.sleep(0.05)

    # -- files, ranges, bandwidth ----------------------------------------------------------
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
        # as the stdlib server and real stores do: how a client tells a file was replaced
        self.send_header("Last-Modified", self.date_time_string(int(os.fstat(f.fileno()).st_mtime)))
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
        kind = self._fault.kind if self._fault is not None else None
        stop_at = remaining // 2 if kind in ("truncate", "stall-body") else None
        rel = self.path.split("?")[0].lstrip("/")
        sent = 0
        while remaining > 0:
            n = min(_BLOCK, remaining)
            if stop_at is not None:
                n = min(n, stop_at - sent)
                if n <= 0:
                    break
            block = source.read(n)
            if not block:
                break
            if kind == "corrupt" and sent == 0:
                block = bytes([block[0] ^ 0xFF]) + block[1:]
            self.server.state.bucket.take(len(block))
            outputfile.write(block)
            sent += len(block)
            remaining -= len(block)
            self.server.state.count(rel, len(block))
        if stop_at is not None:  # less than Content-Length promised
            if kind == "stall-body":
                self._hold(self._fault.seconds)
            self.close_connection = True


class _suppress_gone:
    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        return typ is not None and issubclass(typ, _CLIENT_GONE)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, directory: str, state: _State, port: int = 0) -> None:
        self.state = state
        super().__init__(("127.0.0.1", port), functools.partial(_Handler, directory=directory))

    def handle_error(self, request, client_address):
        import sys

        if self.state.quiet or isinstance(sys.exc_info()[1], _CLIENT_GONE):
            return  # a reader that timed out or was killed: nothing to report
        super().handle_error(request, client_address)


class HTTPOrigin:
    """Serve ``directory`` on ``http://127.0.0.1:<port>/`` from a daemon thread.

    Parameters
    ----------
    directory
        What to serve.
    bandwidth
        Global cap in bytes per second over all concurrent readers
        (``None``: unlimited); settable later through :attr:`bandwidth`.
    quiet
        Print no traceback for any request that fails on the server side
        (a benchmark kills workers mid-read on purpose). Readers that go away
        mid-response are never reported, quiet or not.

    Examples
    --------
    >>> with HTTPOrigin(tmp_path, bandwidth=20e6) as origin:  # doctest: +SKIP
    ...     ctx = dp.Context("model", load=..., source=origin.url("model/"))
    """

    def __init__(self, directory: str | os.PathLike, bandwidth: float | None = None, *, quiet: bool = False) -> None:
        self.directory = os.fspath(directory)
        self._state = _State(bandwidth, quiet)
        self._server = _Server(self.directory, self._state)
        self._port = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The TCP port, kept across :meth:`stop` and :meth:`start`."""
        return self._port

    @property
    def bandwidth(self) -> float | None:
        """The global cap in bytes per second (``None``: unlimited); applies to bytes sent from now on."""
        return self._state.bucket.rate

    @bandwidth.setter
    def bandwidth(self, value: float | None) -> None:
        self._state.bucket.rate = value

    def url(self, path: str = "") -> str:
        """``http://127.0.0.1:<port>/<path>``; a ``path`` ending in ``/`` names a directory source."""
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    @property
    def bytes_served(self) -> int:
        """File-body bytes sent so far (index pages excluded)."""
        with self._state.lock:
            return sum(self._state.per_path.values())

    def bytes_per_path(self) -> dict[str, int]:
        """File-body bytes sent so far, per path relative to the served directory."""
        with self._state.lock:
            return dict(self._state.per_path)

    def requests(self, path: str | None = None) -> int:
        """Requests received so far (GET and HEAD, index pages included), for ``path`` or in all."""
        with self._state.lock:
            if path is not None:
                return self._state.requests.get(path.lstrip("/"), 0)
            return sum(self._state.requests.values())

    def reset_counters(self) -> None:
        """Zero :attr:`bytes_served`, :meth:`bytes_per_path` and :meth:`requests` (faults stay)."""
        with self._state.lock:
            self._state.per_path.clear()
            self._state.requests.clear()

    # -- faults ------------------------------------------------------------------------------
    def inject(
        self,
        kind: str,
        *,
        path: str | None = None,
        times: int | None = 1,
        skip: int = 0,
        on: str | None = None,
        seconds: float = 60.0,
    ) -> Fault:
        """Make the next matching requests misbehave; returns the :class:`Fault` (``.hits`` counts).

        ``kind``:

        * ``"stall"`` — accept the request and send nothing (until the client
          hangs up, ``seconds`` pass or the origin stops);
        * ``"stall-body"`` — send the headers and half the body, then nothing;
        * ``"truncate"`` — promise the full ``Content-Length``, send half, close;
        * ``"corrupt"`` — flip the first byte of the body sent;
        * ``"reset"`` — close the connection without an answer (TCP reset);
        * ``"error"`` — answer ``503 Service Unavailable``.

        ``path`` limits it to one file (relative to the served directory),
        ``skip`` lets that many matching requests through first, ``times``
        is how many requests misbehave (``None``: every one). ``on="get"``
        (the default for body faults) matches only requests for file
        bodies; ``on="any"`` (the default for ``stall``, ``reset`` and
        ``error``) also HEAD requests and directory listings.
        """
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}; one of {', '.join(FAULTS)}")
        if on is None:
            on = "any" if kind in ("stall", "reset", "error") else "get"
        if on not in ("get", "any"):
            raise ValueError(f"on must be 'get' or 'any', got {on!r}")
        fault = Fault(kind, path=path, times=times, skip=skip, on=on, seconds=seconds)
        with self._state.lock:
            self._state.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        """Forget injected faults (requests already stalling keep stalling until their client leaves)."""
        with self._state.lock:
            self._state.faults.clear()

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> HTTPOrigin:
        """Serve (again, on the same port, after :meth:`stop`)."""
        if self._thread is not None:
            return self
        if self._server is None:
            self._server = _Server(self.directory, self._state, self._port)
        self._state.stopping.clear()
        self._thread = threading.Thread(target=self._server.serve_forever, name="http-origin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving (idempotent); later connections are refused until :meth:`start`."""
        self._state.stopping.set()  # ends stalls in progress
        if self._thread is None:
            if self._server is not None:
                self._server.server_close()
                self._server = None
            return
        self._server.shutdown()
        self._server.server_close()
        self._server = None
        self._thread.join()
        self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
