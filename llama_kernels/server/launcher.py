"""Running the app under uvicorn so that no client can exhaust the server, and stopping it gracefully.

- Connections: a request's headers must arrive within header_timeout seconds of its first byte (or of
  the connection, for the first request), else the connection is closed (slowloris); idle keep-alive
  connections close after KEEP_ALIVE s. The request limit (503 past --max-concurrency) and the body
  deadline (408) are the app's: uvicorn's limit_concurrency counts connections, so idle slow ones would
  make it refuse every request.
- The open-file limit is raised to its hard limit at start-up, and the event loop's repeated
  "socket.accept() out of system resource" errors are logged once per ACCEPT_LOG_INTERVAL, not per event.
- SIGTERM / SIGINT: new requests get 503 (the port stays open), running ones have shutdown_timeout
  seconds to finish, then every one still running ends with an error event (and `[DONE]` when
  streamed); then the server stops and `serve` returns 0. A second signal skips the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import time

import uvicorn
from uvicorn.config import Config

from .async_engine import AsyncEngine

log = logging.getLogger(__name__)

HEADER_TIMEOUT = 10.0  # seconds from a request's first byte to the end of its headers
KEEP_ALIVE = 5  # seconds an idle keep-alive connection stays open
SHUTDOWN_TIMEOUT = 5.0  # seconds running requests may take to finish after SIGTERM
ACCEPT_LOG_INTERVAL = 10.0  # seconds between two logs of repeated accept() errors


def raise_open_file_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (each connection is a file); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def with_header_deadline(protocol: type, header_timeout: float) -> type:
    """A subclass of uvicorn's HTTP protocol class that closes a connection whose request headers are not
    complete header_timeout seconds after the connection opened or the request's first byte arrived."""

    class HeaderDeadline(protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._deadline is None and self._between_requests():
                self._arm()  # the first bytes of the next request on a kept-alive connection
            super().data_received(data)
            if not self._between_requests():  # its headers are in: the request runs (the body has its own deadline)
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(header_timeout, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if self._between_requests() and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadline


class _AcceptErrorLog:
    """An event-loop exception handler: accept() errors (out of file descriptors) logged once per interval
    with how many happened; everything else goes to the default handler."""

    def __init__(self, interval: float = ACCEPT_LOG_INTERVAL) -> None:
        self.interval = interval
        self.last = -float("inf")  # monotonic time of the last log
        self.count = 0  # errors since then

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        if not str(context.get("message", "")).startswith("socket.accept() out of system resource"):
            loop.default_exception_handler(context)
            return
        self.count += 1
        now = time.monotonic()
        if now - self.last >= self.interval:
            log.error("accept() failed %d time(s) in the last %.0f s: %s (open-file limit %d)", self.count,
                      min(now - self.last, 1e9), context.get("exception"),
                      resource.getrlimit(resource.RLIMIT_NOFILE)[0])  # fmt: skip
            self.last, self.count = now, 0


class Server(uvicorn.Server):
    """uvicorn's Server with the limits above and a graceful shutdown on SIGTERM / SIGINT."""

    def __init__(self, app, engine: AsyncEngine, *, host: str, port: int, header_timeout: float = HEADER_TIMEOUT,
                 shutdown_timeout: float = SHUTDOWN_TIMEOUT) -> None:  # fmt: skip
        config = Config(app, host=host, port=port, log_level="warning", access_log=False,
                        timeout_keep_alive=KEEP_ALIVE, timeout_graceful_shutdown=max(shutdown_timeout, 1.0) + 5)
        config.load()
        config.http_protocol_class = with_header_deadline(config.http_protocol_class, header_timeout)
        super().__init__(config)
        self.engine = engine
        self.shutdown_timeout = shutdown_timeout
        self.draining: asyncio.Task | None = None  # the graceful shutdown, once a signal came
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.set_exception_handler(_AcceptErrorLog())
        await super().serve(sockets)

    @contextlib.contextmanager
    def capture_signals(self):
        """SIGTERM / SIGINT start the graceful shutdown (uvicorn's own handling would refuse connections at
        once, cut streams after its timeout and re-raise the signal, so the process died by it)."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig, frame) -> None:
        self._loop.call_soon_threadsafe(self._begin_shutdown, signal.Signals(sig).name)

    def _begin_shutdown(self, name: str) -> None:
        if self.draining is None:
            log.warning("%s: draining (new requests get 503; %g s for the running ones)", name, self.shutdown_timeout)
            self.draining = asyncio.ensure_future(self._drain(self.shutdown_timeout))
        else:  # a second signal: no more waiting
            self.draining.cancel()
            self.draining = asyncio.ensure_future(self._drain(0))

    async def _drain(self, timeout: float) -> None:
        self.engine.draining = True
        deadline = time.monotonic() + timeout
        while self.engine.num_requests and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = self.engine.fail_all("the server is shutting down")
        if left:
            log.warning("shutdown: %d request(s) still running after %g s were ended with an error", left, timeout)
        for _ in range(100):  # their responses write the error event; then stop (uvicorn waits for the rest)
            if len(self.server_state.tasks) == 0:
                break
            await asyncio.sleep(0.02)
        self.should_exit = True
