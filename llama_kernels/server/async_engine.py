"""AsyncEngine: the synchronous Engine driven by one background thread, for asyncio callers.

The thread owns the Engine (nothing else calls it): it takes new requests and aborts from locked
queues, runs step() while any request is unfinished, and sleeps on a condition when idle. Each
request's outputs reach its coroutine through an asyncio.Queue fed with loop.call_soon_threadsafe.
A request whose consumer goes away (a client disconnect cancels the coroutine) is aborted, so its
KV blocks are freed at the thread's next turn. A request the engine fails (finish_reason "error")
gets an EngineError; an exception out of the engine itself fails the requests it concerns and the
thread keeps serving the others. Every request is counted in the finish metrics exactly once, when
its stream is removed (finished, failed, aborted at any stage, or cut by shutdown).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import traceback
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ..distributed import TensorParallelError
from .metrics import Metrics

log = logging.getLogger(__name__)
request_log = logging.getLogger("llama_kernels.requests")  # one line per finished request (serve --log-requests)


class EngineError(RuntimeError):
    """The engine failed while serving this request (the server itself keeps running)."""


class EngineUnavailable(EngineError):
    """The engine takes no requests now (shutting down, stalled or broken): 503."""


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
    the engine's gauges are recorded (a new Metrics by default); step_timeout: seconds a step may run
    before the watchdog declares the engine stalled (a hung tensor-parallel rank): it then fails every
    request in flight and reports unhealthy until the step returns (None: no watchdog). Call start()
    before generate()."""

    def __init__(self, engine, metrics: Metrics | None = None, step_timeout: float | None = None,
                 log_requests: bool = False) -> None:  # fmt: skip
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
        self.draining = False  # shutting down: new requests are refused (set by the launcher)
        self.step_timeout = step_timeout
        self.log_requests = log_requests  # one INFO line per finished request on the llama_kernels.requests logger
        self._step_started: float | None = None  # monotonic start of the step in progress (None between steps)
        self._broken: str | None = None  # why the engine can serve no more (a tensor-parallel collective failed)
        self._stopped = threading.Event()  # set by shutdown(): ends the watchdog
        self._watchdog = threading.Thread(target=self._watch, name="llama-kernels-watchdog", daemon=True)
        self.metrics.set_gauges(engine.stats())

    def start(self) -> None:
        self._thread.start()
        if self.step_timeout is not None:
            self._watchdog.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def num_requests(self) -> int:
        """Requests in flight (from generate() to their last output)."""
        return len(self._streams)

    def unavailable(self) -> str | None:
        """Why the engine takes no requests now (for /health's 503), or None when it does."""
        if not self._thread.is_alive():
            return "the engine thread has stopped"
        if self.draining:
            return "the server is shutting down"
        return self._broken or self._stalled(self._step_started)

    def _stalled(self, started: float | None) -> str | None:
        """What is wrong if the step that started at `started` has run over step_timeout, else None."""
        if self.step_timeout is None or started is None or time.monotonic() - started <= self.step_timeout:
            return None
        return (f"the engine's step has run for {time.monotonic() - started:.1f} s, over the {self.step_timeout:g} s "
                "bound (a tensor-parallel rank may have stopped)")  # fmt: skip

    def fail_all(self, message: str, reason: str = "abort") -> int:
        """End every request in flight with EngineUnavailable(message) (streams get an error event), abort
        them in the engine, count them as `reason`; how many there were."""
        with self._cv:
            streams, self._streams = self._streams, {}
            self._aborts.extend(streams)
            self._cv.notify()
        for stream in streams.values():
            self.metrics.count_finished(reason)
            stream.put(EngineUnavailable(message))
        return len(streams)

    def _watch(self) -> None:
        """The step watchdog: once a step runs over step_timeout, fail the requests in flight (once per step)."""
        failed_step = None
        while not self._stopped.wait(min(1.0, self.step_timeout / 4)):
            started = self._step_started
            problem = self._stalled(started)
            if problem is not None and started != failed_step:
                failed_step = started
                log.error("watchdog: %s; failing %d request(s)", problem, self.num_requests)
                self.fail_all(problem, "error")

    async def generate(self, request_id: str, prompt_ids: list[int], params,
                       cache_salt: str | None = None) -> AsyncIterator:  # fmt: skip
        """The request's RequestOutputs as the engine produces them, the last one finished
        (cache_salt: see Engine.add_request).

        params.validate() runs here (ValueError at once); errors inside the engine raise EngineError.
        Closing or cancelling the iterator before the end aborts the request."""
        params.validate()
        problem = self.unavailable()
        if problem is not None and self._thread.is_alive():
            raise EngineUnavailable(problem)
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
        finished, last, status = False, None, "aborted"
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, Exception):
                    finished, status = True, f"error ({item})"  # the thread has forgotten it already
                    raise item
                finished, last = item.finished, item
                if finished:
                    status = f"finished ({item.finish_reason})"
                yield item
        finally:
            if not finished:
                self.abort(request_id)
            if self.log_requests:
                request_log.info("request %s %s: prompt %d tokens, completion %d tokens, %.3f s", request_id, status,
                                 len(prompt_ids), last.completion_tokens if last is not None else 0,
                                 time.perf_counter() - stream.arrival)  # fmt: skip

    def compile_grammar(self, grammar) -> None:
        """Compile (and cache) a request's grammar on the calling thread (a worker, not the engine thread,
        whose steps every stream waits for); ValueError if it does not compile."""
        self.engine.compile_grammar(grammar)

    def abort(self, request_id: str) -> None:
        """Stop a request (no-op once it finished): its blocks are freed at the thread's next turn."""
        with self._cv:
            if self._streams.pop(request_id, None) is None:
                return
            self._aborts.append(request_id)
            self._cv.notify()
        self.metrics.count_finished("abort")

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
                self.metrics.count_finished("abort" if self._stop else "error")
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
            for rid in aborts:  # counted by abort()
                if rid in live:
                    self._call(live, [rid], self.engine.abort, rid)
                    live.discard(rid)
                else:  # aborted before the thread added it
                    adds = [a for a in adds if a[0] != rid]
            for rid, ids, params, extra in adds:
                if self._call(live, [rid], self.engine.add_request, rid, ids, params, **extra)[0]:
                    live.add(rid)
            if live:
                self._step_started = time.monotonic()
                _, outputs = self._call(live, list(live), self.engine.step)
                self._step_started = None
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
        if out.finish_reason == "error":  # the engine failed this request alone
            stream.put(EngineError(out.error))
            return
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
            if isinstance(err, TensorParallelError):  # the ranks are out of step for good
                self._broken = str(err)
                failure = EngineUnavailable(self._broken)
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
