"""Server metrics through prometheus-client: one registry per server, every metric declared here.

The engine's state is copied from its EngineStats after every step (ENGINE_METRICS: add a row to
export another of its fields); the request latencies and finish counts are recorded by the engine
thread as they happen. The HTTP thread renders the registry (render).
"""

from __future__ import annotations

import threading

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.parser import text_string_to_metric_families

prometheus_client.disable_created_metrics()  # no *_created series: the exposition keeps today's names only

PREFIX = "llama_kernels"
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # the text exposition format, version 0.0.4
# Seconds; CPU first tokens take ~0.1-10 s, GPU ones ~0.01-1 s.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)

# The engine's state as of its last step: (metric name without the prefix, "gauge" | "counter", help, the
# EngineStats attribute it copies). A counter's name ends in _total.
ENGINE_METRICS = (
    ("num_requests_running", "gauge", "Requests in the running batch.", "num_running"),
    ("num_requests_waiting", "gauge", "Requests waiting to be admitted.", "num_waiting"),
    ("kv_blocks_used", "gauge", "KV-cache blocks held by requests.", "kv_blocks_used"),
    ("kv_blocks_total", "gauge", "KV-cache blocks in the pool.", "kv_blocks_total"),
    ("num_preemptions_total", "counter", "Requests preempted (blocks given back, recomputed later).",
     "num_preemptions"),
    ("prompt_tokens_total", "counter", "Prompt tokens of admitted requests (prefix-cache hits included).",
     "prompt_tokens_total"),
    ("generation_tokens_total", "counter", "Tokens generated.", "generation_tokens_total"),
    ("prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.", "prefix_cache_queries"),
    ("prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache (not computed).",
     "prefix_cache_hits"),
    ("kv_blocks_cached", "gauge", "KV-cache blocks holding a cached prefix (held or free).", "kv_blocks_cached"),
    ("kv_blocks_cached_free", "gauge", "Cached KV blocks no request holds (evicted LRU when needed).",
     "kv_blocks_cached_free"),
    ("spec_decode_num_draft_tokens_total", "counter", "Speculative draft tokens verified.", "spec_proposed_total"),
    ("spec_decode_num_accepted_tokens_total", "counter", "Speculative draft tokens accepted.", "spec_accepted_total"),
    ("spec_decode_num_verifications_total", "counter", "Requests' steps that verified a speculative draft.",
     "spec_verifications_total"),
    ("spec_decode_mean_accepted_length", "gauge", "Tokens per speculative verification (accepted drafts + the "
     "target's own token; 0 before any).", "spec_mean_accepted_length"),
)  # fmt: skip


class _EngineCollector:
    """Yields ENGINE_METRICS from the last copied EngineStats."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self):
        values = self.metrics.engine_values()
        for name, kind, help_, attr in ENGINE_METRICS:
            family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            yield family(f"{PREFIX}_{name}", help_, value=values[attr])


class Metrics:
    """The server's metrics on their own registry (so several servers in one process never clash)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()  # guards _engine (written by the engine thread, read by render)
        self._engine = {attr: 0 for *_, attr in ENGINE_METRICS}
        self.registry.register(_EngineCollector(self))
        r = self.registry
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Time from arrival to the first token.",
                              buckets=TTFT_BUCKETS, registry=r)  # fmt: skip
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds", "Time between successive outputs of a request.",
                             buckets=ITL_BUCKETS, registry=r)  # fmt: skip
        self.finished = Counter(f"{PREFIX}_request_success", "Finished requests by finish reason.",
                                ["finished_reason"], registry=r)  # fmt: skip

    def set_gauges(self, stats) -> None:
        """Copy an EngineStats (any object with ENGINE_METRICS' attributes; a missing one reads 0)."""
        values = {attr: (float if attr == "spec_mean_accepted_length" else int)(getattr(stats, attr, 0))
                  for *_, attr in ENGINE_METRICS}  # fmt: skip
        with self._lock:
            self._engine = values

    def engine_values(self) -> dict[str, float]:
        with self._lock:
            return self._engine

    def observe_ttft(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def observe_itl(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def count_finished(self, reason: str) -> None:
        """One finished request ("stop", "length", "abort", "error"): called exactly once per request."""
        self.finished.labels(finished_reason=reason).inc()

    def render(self) -> str:
        """The Prometheus text exposition (version 0.0.4)."""
        return generate_latest(self.registry).decode()


def parse(text: str) -> dict[str, float]:
    """Sample name (with labels) -> value, from an exposition: for tests and the load generator."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in s.labels.items())
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out
