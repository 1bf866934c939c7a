"""AsyncEngine: the synchronous Engine driven by one background thread, for asyncio callers.

The thread owns the Engine (nothing else calls it): it takes new requests and aborts from locked
queues, runs step() while any request is unfinished, and sleeps on a condition when idle. Each
request's outputs reach its coroutine through an asyncio.Queue fed with loop.call_soon_threadsafe.
A request whose consumer goes away (a client disconnect cancels the coroutine) is aborted, so its
KV blocks are freed at the thread's next turn. An exception in the engine fails the requests it
concerns (all of a failed step's requests) and the thread keeps serving the others.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import traceback
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from .metrics import Metrics

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The engine failed while serving this request (the server itself keeps running)."""


@dataclass
class _Stream:
    """One request's channel from the engine thread to its coroutine, and its latency bookkeeping."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # RequestOutput, then nothing after a finished one; or an EngineError
    arrival: float = field(default_factory=time.perf_counter)  # seconds (perf_counter)
    last_token: float | None = None  # when the previous token-bearing output left the engine

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
            pass


class AsyncEngine:
    """Args: engine: a serve.Engine (or an object with its interface); metrics: where latencies and
    the engine's gauges are recorded (a new Metrics by default). Call start() before generate()."""

    def __init__(self, engine, metrics: Metrics | None = None) -> None:
        self.engine = engine  # serve.Engine, called only by the thread
        self.tokenizer = engine.tokenizer
        self.max_context: int = engine.max_context  # tokens per request: prompt + output
        self.metrics = metrics or Metrics()
        self._cv = threading.Condition()  # guards the fields below; notified on new work and on stop
        self._adds: list[tuple[str, list[int], object, dict]] = []  # (request id, prompt ids, SamplingParams, extra)
        self._aborts: list[str] = []  # request ids
        self._streams: dict[str, _Stream] = {}  # request id -> stream, from generate() until finished/aborted
        self._stop = False
        self._closed = False  # the thread has ended: generate() refuses new requests
        self._thread = threading.Thread(target=self._run, name="llama-kernels-engine", daemon=True)
        self.metrics.set_gauges(engine.stats())

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    async def generate(self, request_id: str, prompt_ids: list[int], params,
                       cache_salt: str | None = None) -> AsyncIterator:  # fmt: skip
        """The request's RequestOutputs as the engine produces them, the last one finished
        (cache_salt: see Engine.add_request).

        params.validate() runs here (ValueError at once); errors inside the engine raise EngineError.
        Closing or cancelling the iterator before the end aborts the request."""
        params.validate()
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._cv:
            if self._closed or self._stop or not self._thread.is_alive():
                raise EngineError("the engine thread is not running")
            if request_id in self._streams:
                raise ValueError(f"request_id={request_id!r} is already running")
            self._streams[request_id] = stream
            extra = {"cache_salt": cache_salt} if cache_salt is not None else {}
            self._adds.append((request_id, list(prompt_ids), params, extra))
            self._cv.notify()
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, Exception):
                    finished = True  # the thread has forgotten it already
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request (no-op once it finished): its blocks are freed at the thread's next turn."""
        with self._cv:
            if self._streams.pop(request_id, None) is not None:
                self._aborts.append(request_id)
                self._cv.notify()

    # --- the engine thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:  # noqa: BLE001  (a bug here: say so, and answer everyone still waiting)
            log.critical("the engine thread died:\n%s", traceback.format_exc())
        finally:
            with self._cv:
                self._closed = True
                streams, self._streams = self._streams, {}
            for stream in streams.values():
                stream.put(EngineError("the server is shutting down" if self._stop else "the engine thread died"))

    def _loop(self) -> None:
        live: set[str] = set()  # ids added to the engine and not yet finished there
        while True:
            with self._cv:
                while not (self._adds or self._aborts or self._stop or live):
                    self._cv.wait()
                if self._stop:
                    self._call(live, list(live), self.engine.stop_followers)  # tensor parallel: release the other ranks
                    break
                adds, self._adds = self._adds, []
                aborts, self._aborts = self._aborts, []
            for rid in aborts:
                if rid in live:
                    self._call(live, [rid], self.engine.abort, rid)
                    live.discard(rid)
                    self.metrics.count_finished("abort")
                else:  # aborted before the thread added it
                    adds = [a for a in adds if a[0] != rid]
            for rid, ids, params, extra in adds:
                if self._call(live, [rid], self.engine.add_request, rid, ids, params, **extra)[0]:
                    live.add(rid)
            if live:
                _, outputs = self._call(live, list(live), self.engine.step)
                now = time.perf_counter()
                for out in outputs or ():
                    self._deliver(out, now, live)
            self._call(live, [], lambda: self.metrics.set_gauges(self.engine.stats()))

    def _deliver(self, out, now: float, live: set[str]) -> None:
        if out.finished:
            live.discard(out.request_id)
        with self._cv:
            stream = self._streams.get(out.request_id)
            if stream is not None and out.finished:
                del self._streams[out.request_id]
        if stream is None:  # aborted meanwhile (its final "abort" output lands here too)
            return
        if out.new_token_ids:
            if stream.last_token is None:
                self.metrics.observe_ttft(now - stream.arrival)
            else:
                self.metrics.observe_itl(now - stream.last_token)
            stream.last_token = now
        if out.finished:
            self.metrics.count_finished(out.finish_reason or "stop")
        stream.put(out)

    def _call(self, live: set[str], affected: list[str], fn, *args, **kwargs):
        """(True, fn(*args, **kwargs)); on an exception, fail the affected requests (and abort them in the engine
        so their blocks come back), log it, and return (False, None)."""
        try:
            return True, fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001  (the thread must survive anything the engine raises)
            log.error("engine error in %s for %d request(s):\n%s", getattr(fn, "__name__", fn), len(affected),
                      traceback.format_exc())  # fmt: skip
            failure = err if isinstance(err, ValueError) else EngineError(f"{type(err).__name__}: {err}")
            for rid in affected:
                if rid in live and fn is not self.engine.abort:
                    try:
                        self.engine.abort(rid)
                    except Exception:  # noqa: BLE001
                        log.error("engine.abort(%r) failed too:\n%s", rid, traceback.format_exc())
                live.discard(rid)
                with self._cv:
                    stream = self._streams.pop(rid, None)
                if stream is not None:
                    self.metrics.count_finished("error")
                    stream.put(failure)
            return False, None
