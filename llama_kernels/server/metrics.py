"""Server metrics in the Prometheus text exposition format (written by hand: no client library).

The engine thread records (observe_*), the HTTP thread renders (render); one lock guards both.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from dataclasses import dataclass, field

PREFIX = "llama_kernels"
# Seconds; CPU first tokens take ~0.1-10 s, GPU ones ~0.01-1 s.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)


@dataclass
class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics: bucket le=b counts observations <= b)."""

    buckets: tuple[float, ...]  # upper bounds, ascending; +Inf is implied
    counts: list[int] = field(default_factory=list)  # [len(buckets) + 1] observations per bucket (not cumulative)
    total: float = 0.0  # sum of observations
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        return out + [f"{name}_sum {self.total!r}", f"{name}_count {self.count}"]


@dataclass
class EngineGauges:
    """The engine's state as of its last step (copied by the engine thread; the HTTP thread never calls it)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    kv_blocks_cached: int = 0
    kv_blocks_cached_free: int = 0


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.gauges = EngineGauges()
        self.ttft = Histogram(TTFT_BUCKETS)  # arrival -> first token, seconds
        self.itl = Histogram(ITL_BUCKETS)  # between successive token-bearing outputs of a request, seconds
        self.finished: dict[str, int] = {}  # finish reason ("stop", "length", "abort", "error") -> requests

    def set_gauges(self, stats) -> None:
        """Copy an EngineStats (any object with EngineGauges' attributes)."""
        values = {k: int(getattr(stats, k)) for k in EngineGauges.__dataclass_fields__}
        with self._lock:
            self.gauges = EngineGauges(**values)

    def observe_ttft(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def observe_itl(self, seconds: float) -> None:
        with self._lock:
            self.itl.observe(seconds)

    def count_finished(self, reason: str) -> None:
        with self._lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1

    def render(self) -> str:
        """The Prometheus text exposition (version 0.0.4)."""
        with self._lock:
            g = self.gauges
            p = PREFIX
            lines = []

            def metric(name: str, kind: str, help_: str, samples: list[str]) -> None:
                lines.extend([f"# HELP {p}_{name} {help_}", f"# TYPE {p}_{name} {kind}", *samples])

            metric("num_requests_running", "gauge", "Requests in the running batch.",
                   [f"{p}_num_requests_running {g.num_running}"])  # fmt: skip
            metric("num_requests_waiting", "gauge", "Requests waiting to be admitted.",
                   [f"{p}_num_requests_waiting {g.num_waiting}"])  # fmt: skip
            metric("kv_blocks_used", "gauge", "KV-cache blocks held by requests.",
                   [f"{p}_kv_blocks_used {g.kv_blocks_used}"])  # fmt: skip
            metric("kv_blocks_total", "gauge", "KV-cache blocks in the pool.",
                   [f"{p}_kv_blocks_total {g.kv_blocks_total}"])  # fmt: skip
            metric("kv_blocks_cached", "gauge", "KV-cache blocks holding a cached prefix (held or free).",
                   [f"{p}_kv_blocks_cached {g.kv_blocks_cached}"])  # fmt: skip
            metric("kv_blocks_cached_free", "gauge", "Cached KV blocks no request holds (evicted LRU when needed).",
                   [f"{p}_kv_blocks_cached_free {g.kv_blocks_cached_free}"])  # fmt: skip
            metric("prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
                   [f"{p}_prefix_cache_queries_total {g.prefix_cache_queries}"])  # fmt: skip
            metric("prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache (not computed).",
                   [f"{p}_prefix_cache_hits_total {g.prefix_cache_hits}"])  # fmt: skip
            metric("num_preemptions_total", "counter", "Requests preempted (blocks given back, recomputed later).",
                   [f"{p}_num_preemptions_total {g.num_preemptions}"])  # fmt: skip
            metric("prompt_tokens_total", "counter", "Prompt tokens of admitted requests (prefix-cache hits included).",
                   [f"{p}_prompt_tokens_total {g.prompt_tokens_total}"])  # fmt: skip
            metric("generation_tokens_total", "counter", "Tokens generated.",
                   [f"{p}_generation_tokens_total {g.generation_tokens_total}"])  # fmt: skip
            metric("request_success_total", "counter", "Finished requests by finish reason.",
                   [f'{p}_request_success_total{{finished_reason="{r}"}} {n}'
                    for r, n in sorted(self.finished.items())])  # fmt: skip
            metric("time_to_first_token_seconds", "histogram", "Time from arrival to the first token.",
                   self.ttft.lines(f"{p}_time_to_first_token_seconds"))  # fmt: skip
            metric("inter_token_latency_seconds", "histogram", "Time between successive outputs of a request.",
                   self.itl.lines(f"{p}_inter_token_latency_seconds"))  # fmt: skip
        return "\n".join(lines) + "\n"


def parse(text: str) -> dict[str, float]:
    """Sample name (with labels) -> value, from an exposition: for tests and the load generator."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out
