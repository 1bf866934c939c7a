"""Generation throughput of the runner: prefill and decode tokens/s at batch 1, 8 and 64, and decode's
percent of the bandwidth roofline (weight + KV bytes each decode step reads, over the copy bandwidth
measured at the start of the run).

Runs on a checkpoint (--model; "embedded" is the default model, SmolLM2-135M-Instruct) or on random weights at the
exact per-GPU shapes of a preset (--preset, --tp for one GPU's shard under tensor parallel: heads, KV
heads, FFN and vocabulary split tp ways; no all-reduce is timed), so tokens/s can be measured without
downloading anything:

    python benchmarks/bench_generate.py --preset llama-3.1-8b --quant fp8 --out benchmarks/results/gen-8b-fp8.json
    python benchmarks/bench_generate.py --preset llama-3.1-405b --tp 8 --quant fp8
    python benchmarks/bench_generate.py --model /models/Llama-3.1-8B-Instruct --quant int4
    python benchmarks/bench_generate.py --smoke      # a tiny random model on the CPU (CI)
    python benchmarks/bench_generate.py --model embedded --quant bf16,fp8,int4 --batch-sizes 1 --repeat 9
    python benchmarks/bench_generate.py --model embedded --speculative ngram --threads 1 --out spec.json

With --speculative, single-stream greedy generation of a workload that quotes its input (rewrite,
code-edit and summarize prompts, through the chat template) with and without speculative decoding,
runs interleaved: tokens/s of each, the speedup, the acceptance rate, the accepted length, and whether
the outputs are token-identical (they must be).

Each figure is the median of --repeat timed runs (default 3), with the min-max spread of tokens/s; a bar
shows the runs on a terminal. On the CPU a warning first gives a lower bound of the run's time. Several
--quant formats load one model each and interleave their timed runs (format 1, 2, 3, 1, 2, 3, ...), so
that on a shared, noisy machine every format sees the same conditions.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402  (sets TRITON_INTERPRET=1 without a GPU)

from llama_kernels import backends, plan  # noqa: E402
from llama_kernels.llm import LLM  # noqa: E402
from llama_kernels.model import LlamaConfig  # noqa: E402

PRESETS = [name for name in plan.PRESETS if name.startswith("llama-3")]
QUANTS = ("bf16", "fp8", "int4")  # bf16: unquantized, in the model's dtype (float32 on the CPU)
SMOKE = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=64, max_position_embeddings=256)  # fmt: skip


def shard_config(name: str, tp: int) -> LlamaConfig:
    """One GPU's shapes of preset `name` at tensor parallel `tp`: Hq / tp query heads, max(1, Hkv / tp) KV
    heads (replicated past Hkv), F / tp FFN columns, ceil(V / tp) vocabulary rows (vocab-parallel)."""
    c = plan.PRESETS[name]
    heads, kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
    if heads % tp or c["intermediate_size"] % tp or (kv_heads % tp and tp % kv_heads):
        raise SystemExit(f"--tp {tp} does not divide {name}'s heads ({heads} / {kv_heads} KV) and FFN")
    return LlamaConfig(
        vocab_size=-(-c["vocab_size"] // tp), hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"] // tp,
        num_layers=c["num_hidden_layers"], num_heads=heads // tp, num_kv_heads=max(1, kv_heads // tp),
        head_dim=c.get("head_dim") or c["hidden_size"] // heads, rope_theta=500000.0,
        tie_word_embeddings=c["tie_word_embeddings"], max_position_embeddings=c["max_position_embeddings"],
    )  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help='a Hugging Face directory or .gguf file, or "embedded" (SmolLM2-135M)')
    src.add_argument("--preset", choices=PRESETS, help="random weights at this model's shapes (default llama-3.1-8b)")
    p.add_argument("--tp", type=int, default=1, help="with --preset: time one GPU's shard at this tensor parallel")
    p.add_argument("--quant", default="bf16", help="weight format: bf16 (unquantized, in the model's dtype: "
                   "float32 on the CPU), fp8 or int4; several, comma-separated (bf16,fp8,int4), interleave "
                   "their runs")  # fmt: skip
    p.add_argument("--policy", choices=("all", "meta"), default="all", help="FP8 policy")
    p.add_argument("--kv-dtype", choices=("auto", "fp8"), default="auto", help="KV cache: the model dtype, or FP8")
    p.add_argument("--batch-sizes", default="1,8,64", help="comma-separated")
    p.add_argument("--prompt-len", type=int, default=None, help="tokens per prompt (default 512; smoke 16)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per prompt (default 128; smoke 4)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default=None, help=f"force one backend for every op ({backends.ENV_VAR})")
    p.add_argument("--eager", action="store_true", help="no CUDA graphs for decode")
    p.add_argument("--repeat", type=int, default=None, help="timed runs per batch size: the median is reported, "
                   "with the min-max spread of tokens/s (default 3; smoke 1)")  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="a tiny random model, few tokens (CI)")
    p.add_argument("--speculative", choices=("ngram",), default=None, help="compare single-stream greedy "
                   "decoding with and without speculation on a quoting workload (needs a tokenizer: --model)")
    p.add_argument("--num-speculative-tokens", type=int, default=5, help="k of --speculative")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="write the results as JSON to this file")
    args = p.parse_args(argv)
    bad = [q for q in args.quant.split(",") if q not in QUANTS]
    if bad:
        p.error(f"--quant {args.quant}: {bad[0]!r} is not a weight format; expected {', '.join(QUANTS)}, or several "
                "of them comma-separated")  # fmt: skip
    if args.repeat is not None and args.repeat < 1:
        p.error(f"--repeat {args.repeat}: expected an int >= 1")
    if args.speculative and "," in args.quant:
        p.error(f"--speculative --quant {args.quant}: expected one weight format")
    if args.speculative and not (args.model or args.smoke):
        p.error("--speculative needs a model with a tokenizer: --model PATH or --model embedded")
    if args.num_speculative_tokens < 1:
        p.error(f"--num-speculative-tokens {args.num_speculative_tokens}: expected an int >= 1")
    return args


def load(args: argparse.Namespace, quant: str, max_context: int, max_batch: int) -> tuple[LLM, str]:
    """(the LLM with weights in format `quant`, its name) for --model / --preset / --smoke."""
    quant = None if quant == "bf16" else quant
    # no prefix caching: the timed runs repeat the warm-up's prompts, and must prefill them in full
    kw = dict(quant=quant, device=args.device, max_context=max_context, policy=args.policy, max_batch=max_batch,
              kv_cache_dtype="fp8" if args.kv_dtype == "fp8" else None, cuda_graphs=not args.eager,
              prefix_caching=False)  # fmt: skip
    if args.model:
        path = None if args.model == "embedded" else args.model
        return LLM.from_pretrained(path, progress=False, **kw), args.model
    if args.smoke:
        return LLM.from_config(SMOKE, **kw), "smoke (random)"
    name = args.preset or "llama-3.1-8b"
    label = f"{name} (random{f', one GPU of TP {args.tp}' if args.tp > 1 else ''})"
    return LLM.from_config(shard_config(name, args.tp), dtype=torch.bfloat16, **kw), label


def copy_bandwidth(device: torch.device, smoke: bool) -> float:
    """Bytes/s (read + write) of a large copy: 2 GiB on a GPU, 256 MiB on the CPU (8 MiB in smoke runs)."""
    n = (8 << 20) if smoke else (2 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * n / common.time_call(device, lambda: dst.copy_(src), *((3, 1) if smoke else (20, 5)))


def prompts_for(llm: LLM, batch: int, prompt_len: int) -> list[list[int]]:
    rng = random.Random(batch)
    return [[rng.randrange(llm.config.vocab_size) for _ in range(prompt_len)] for _ in range(batch)]


def measure(llms: dict[str, LLM], batch: int, prompt_len: int, new_tokens: int, copy_bps: float, repeat: int = 1,
            bar: tqdm | None = None) -> list[dict]:  # fmt: skip
    """Per model (weight format -> LLM, same prompts): one warm-up generate (Triton compiles, the batch's CUDA
    graph is captured), then `repeat` timed ones, the models taking turns; a row per model with the median of
    each figure, and the min and max of the tokens/s (the spread between runs)."""
    prompts = prompts_for(next(iter(llms.values())), batch, prompt_len)
    for llm in llms.values():
        llm.generate_ids(prompts, max_new_tokens=2, stop_ids=())
    runs: dict[str, list[dict]] = {quant: [] for quant in llms}
    for _ in range(repeat):
        for quant, llm in llms.items():
            cpu = time.process_time()
            llm.generate_ids(prompts, max_new_tokens=new_tokens, stop_ids=())
            cpu = time.process_time() - cpu  # this process's CPU seconds: less sensitive to other processes' load
            s = llm.last_stats
            runs[quant].append({"prefill_tok_s": s.prefill_tokens_per_s, "decode_tok_s": s.decode_tokens_per_s,
                                "step_ms": 1e3 * s.decode_s / s.decode_steps, "decode_GBps": s.decode_gb_per_s,
                                "bytes_per_step": s.decode_bytes / s.decode_steps, "cpu_s": cpu,
                                "wall_s": s.prefill_s + s.decode_s})  # fmt: skip
            if bar is not None:
                bar.update()
    rows = []
    for quant, got in runs.items():
        row = {"quant": quant, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "repeat": repeat}
        for key in got[0]:
            row[key] = statistics.median(r[key] for r in got)
        for key in ("prefill_tok_s", "decode_tok_s"):
            row[key + "_min"], row[key + "_max"] = min(r[key] for r in got), max(r[key] for r in got)
        row["pct_roofline"] = 100 * row["decode_GBps"] * 1e9 / copy_bps
        rows.append(row)
    return rows


PARAGRAPH = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after "
    "the engineer Gustave Eiffel, whose company desigend and built the tower from 1887 to 1889. Locally "
    "nicknamed \"La dame de fer\", it was constructed as the centerpiece of the 1889 World's Fair, and to crown "
    "the centennial anniversary of the French Revolution. Although initially criticised by some of France's "
    "leading artists and intellectuals for its design, it has since become a global cultural icon of France."
)
CODE = """def mean(xs):
    total = 0
    for x in xs:
        total = total + x
    return total / len(xs)


def variance(xs):
    m = mean(xs)
    total = 0
    for x in xs:
        total = total + (x - m) ** 2
    return total / len(xs)
"""
# A workload whose answers quote their input: what prompt lookup is for.
QUOTING_PROMPTS = [
    "Rewrite the following paragraph, fixing the spelling mistakes and keeping everything else the same:\n\n"
    + PARAGRAPH,
    "Add a docstring to each function in this Python code and return the complete code:\n\n" + CODE,
    "Rename the function `mean` to `average` everywhere in this code and show the full result:\n\n" + CODE,
    "Summarize the following text in two sentences, quoting its key facts:\n\n" + PARAGRAPH,
]


def measure_speculative(llm: LLM, args: argparse.Namespace, new_tokens: int, repeat: int) -> dict:
    """Single-stream greedy generation of QUOTING_PROMPTS (chat template), with and without speculation:
    `repeat` rounds, each running every prompt once per mode, the modes interleaved prompt by prompt (so
    load from other processes hits both alike), after a warm-up round. Per mode the median over rounds of
    the round's tokens/s (new tokens / seconds of its generates; decode tokens/s likewise over decode steps)."""
    from llama_kernels.engine import Engine
    from llama_kernels.engine.speculative import SpeculativeConfig

    if llm.tokenizer is None:  # --smoke: repeated random ids
        prompts = [[(7 * i + j) % 50 + 3 for j in range(12)] * 2 for i in range(2)]
    else:
        prompts = [llm.encode_prompt(p, chat=True) for p in QUOTING_PROMPTS]
    config = SpeculativeConfig(args.speculative, args.num_speculative_tokens)
    engines = {"plain": llm.engine, "speculative": Engine(llm.loaded, max_num_seqs=1, speculative=config)}
    outputs: dict[str, list[list[int]]] = {mode: [] for mode in engines}
    rounds: dict[str, list[dict]] = {mode: [] for mode in engines}
    keys = ("new", "seconds", "decode_tokens", "decode_s", "decode_steps", "proposed", "accepted", "verifications")
    for r in range(repeat + 1):  # round 0 warms up (not reported)
        totals = {mode: dict.fromkeys(keys, 0) for mode in engines}
        for prompt in prompts:
            for mode, engine in engines.items():
                llm.engine = engine
                outputs[mode].append(llm.generate_ids([prompt], max_new_tokens=new_tokens)[0])
                s, t = llm.last_stats, totals[mode]
                for key, value in zip(keys, (s.new_tokens, s.prefill_s + s.decode_s, s.decode_tokens, s.decode_s,
                                             s.decode_steps, s.spec.proposed, s.spec.accepted, s.spec.verifications)):
                    t[key] += value
        llm.engine = engines["plain"]
        if r:
            for mode, t in totals.items():
                rounds[mode].append(t)
        tqdm.write(f"round {r}{' (warm-up)' if not r else ''}: " + ", ".join(
            f"{mode} {t['new'] / t['seconds']:.2f} tok/s" for mode, t in totals.items()), file=sys.stdout)  # fmt: skip
        sys.stdout.flush()
    identical = [a == b for a, b in zip(outputs["plain"], outputs["speculative"])]
    result = {"method": args.speculative, "k": args.num_speculative_tokens, "prompts": len(prompts),
              "prompt_tokens": [len(p) for p in prompts], "new_tokens": new_tokens, "repeat": repeat,
              "greedy_identical": all(identical), "identical_generates": f"{sum(identical)}/{len(identical)}"}
    for mode, rs in rounds.items():
        tok_s = [t["new"] / t["seconds"] for t in rs]
        dec_s = [t["decode_tokens"] / t["decode_s"] for t in rs]
        result[mode] = {
            "tok_s": statistics.median(tok_s), "tok_s_min": min(tok_s), "tok_s_max": max(tok_s),
            "decode_tok_s": statistics.median(dec_s), "decode_tok_s_min": min(dec_s), "decode_tok_s_max": max(dec_s),
            "step_ms": statistics.median(1e3 * t["decode_s"] / t["decode_steps"] for t in rs),
            "new_tokens_per_round": rs[0]["new"], "rounds": rs,
        }  # fmt: skip
    t = rounds["speculative"][0]
    result["speculative"].update(acceptance_rate=t["accepted"] / max(t["proposed"], 1),
                                 mean_accepted_length=(t["accepted"] + t["verifications"]) / max(t["verifications"], 1))
    result["speedup"] = result["speculative"]["tok_s"] / result["plain"]["tok_s"]
    result["decode_speedup"] = result["speculative"]["decode_tok_s"] / result["plain"]["decode_tok_s"]
    sizes = (1, 2, 4, 8) if args.smoke else (1, 2, 4, 6, 8, 16, 32, 64)
    result["verify_cost_ms"] = verify_cost_ms(llm, sizes, 8 if args.smoke else 256, repeat)
    return result


def verify_cost_ms(llm: LLM, sizes: tuple[int, ...], prefix: int, repeat: int) -> dict[int, float]:
    """Median ms of one forward pass of T new tokens (logits of all T, as a verification wants) over a
    cached prefix of `prefix` tokens, for each T in sizes: what SpeculativeConfig.max_verify_tokens weighs."""
    from llama_kernels.engine.runner import Chunk

    ids = [(7 * i) % 97 + 3 for i in range(prefix + max(sizes))]
    blocks: list[int] = []
    llm.allocator.grow(blocks, len(ids))
    try:
        llm.engine.runner.run([Chunk(ids[:prefix], 0, blocks, False)])
        out = {}
        for t in sizes:
            times = []
            for _ in range(repeat + 1):
                t0 = time.perf_counter()
                llm.engine.runner.run([Chunk(ids[prefix : prefix + t], prefix, blocks, True, t - 1)])
                times.append(time.perf_counter() - t0)
            out[t] = 1e3 * statistics.median(times[1:])
        return out
    finally:
        llm.allocator.free(blocks)


def cpu_estimate_s(llm: LLM, batches: list[int], prompt_len: int, new_tokens: int, repeat: int) -> float:
    """A lower bound of the run's seconds on the CPU, from one small batch-1 generate: every prompt token at
    batch 1's prefill rate, every decode step at batch 1's step time (larger batches only take longer)."""
    llm.generate_ids(prompts_for(llm, 1, prompt_len), max_new_tokens=3, stop_ids=())
    s = llm.last_stats
    step_s = s.decode_s / max(s.decode_steps, 1)
    runs = repeat + 1  # the warm-up generates 2 tokens: counted as a full run, roughly
    return sum(runs * (b * prompt_len / max(s.prefill_tokens_per_s, 1e-9) + new_tokens * step_s) for b in batches)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.backend:
        os.environ[backends.ENV_VAR] = args.backend
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    prompt_len = args.prompt_len or (16 if args.smoke else 512)
    new_tokens = args.new_tokens or (4 if args.smoke else 128)
    copy_bps = copy_bandwidth(device, args.smoke)
    llms: dict[str, LLM] = {}
    for quant in args.quant.split(","):
        if args.speculative:  # one sequence; its context fits every prompt of the workload + the new tokens
            llms[quant], name = load(args, quant, 64 if args.smoke else 1024, 1)
        else:
            llms[quant], name = load(args, quant, prompt_len + new_tokens, max(batches))
    first = next(iter(llms.values()))
    meta = {
        "benchmark": "generate", "model": name, "quant": args.quant, "dtype": str(first.model.dtype)[6:],
        "policy": args.policy,
        "kv_dtype": str(first.cache.dtype).removeprefix("torch."), "cuda_graphs": first.graphs is not None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "driver": common._driver(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": common._version("triton"), "backends": {op: backends.select(op, device)[0] for op in backends.ops()},
        "smoke": args.smoke, "copy_Bps": copy_bps,
        "load_average_at_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }  # fmt: skip
    repeat = args.repeat or (1 if args.smoke else 3)
    if args.speculative:
        spec = measure_speculative(first, args, args.new_tokens or (8 if args.smoke else 128), repeat)
        p, s = spec["plain"], spec["speculative"]
        print(f"# speculative {spec['method']} k={spec['k']}: {name}, {spec['prompts']} quoting prompts, batch 1, "
              f"greedy, {spec['new_tokens']} new tokens each, {repeat} interleaved rounds (medians)")  # fmt: skip
        print(f"plain       {p['tok_s']:7.2f} tok/s  decode {p['decode_tok_s']:7.2f} tok/s  step {p['step_ms']:.1f} ms")
        print(f"speculative {s['tok_s']:7.2f} tok/s  decode {s['decode_tok_s']:7.2f} tok/s  step {s['step_ms']:.1f} ms"
              f"  acceptance {100 * s['acceptance_rate']:.0f}%, {s['mean_accepted_length']:.2f} tokens per "
              "verification")  # fmt: skip
        print(f"speedup {spec['speedup']:.2f}x (decode {spec['decode_speedup']:.2f}x); greedy outputs identical: "
              f"{spec['greedy_identical']} ({spec['identical_generates']} generates)")  # fmt: skip
        one = spec["verify_cost_ms"][1]
        print("forward pass of T tokens (ms, x the 1-token pass): " + ", ".join(
            f"T={t} {ms:.1f} ({ms / one:.2f}x)" for t, ms in spec["verify_cost_ms"].items()))  # fmt: skip
        meta["load_average_at_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        if args.out:
            common.write_json(args.out, {"meta": meta, "speculative": spec})
            print(f"# wrote {args.out}")
        return [spec]
    weights = ", ".join(meta["dtype"] if q == "bf16" else q for q in llms)
    graphs = "on" if meta["cuda_graphs"] else "off"
    print(f"# generate: {name} {weights}, KV {meta['kv_dtype']}, CUDA graphs {graphs}  {meta['device']}  torch "
          f"{meta['torch']}  {meta['threads']} threads  copy {common.num(copy_bps / 1e9)} GB/s")  # fmt: skip
    print(f"{'weights':<8} {'batch':>5} {'prompt':>6} {'new':>4} {'prefill tok/s':>13} {'decode tok/s':>12} "
          f"{'step ms':>8} {'GB/s':>8} {'%roofline':>9} {'CPU s':>7} {'wall s':>7}  (medians; CPU s: this process's "
          "CPU time per generate)", flush=True)  # fmt: skip
    if device.type == "cpu" and not args.smoke:
        est = len(llms) * cpu_estimate_s(first, batches, prompt_len, new_tokens, repeat)
        shorter = [flag for flag, given in (("--batch-sizes 1", batches == [1]), ("--prompt-len", args.prompt_len),
                                            ("--new-tokens", args.new_tokens), ("--repeat 1", repeat == 1)) if not given]
        print(f"warning: on the CPU this run takes at least ~{est / 60:.1f} min ({len(llms)} x {len(batches)} batch "
              f"sizes x {repeat + 1} generates of {prompt_len} + {new_tokens} tokens)"
              + (f"; {', '.join(shorter)} would shorten it" if shorter else ""), file=sys.stderr, flush=True)  # fmt: skip
    rows = []
    # a bar on a terminal only (each row below is the progress in a log); one tick per timed generate
    bar = tqdm(total=len(batches) * repeat * len(llms), desc="generate", unit="run", file=sys.stderr, leave=False,
               disable=not sys.stderr.isatty())  # fmt: skip
    for b in batches:
        bar.set_description(f"batch {b}")
        for row in measure(llms, b, prompt_len, new_tokens, copy_bps, repeat, bar):
            rows.append(row)
            label = meta["dtype"] if row["quant"] == "bf16" else row["quant"]
            spread = (f"  (decode {row['decode_tok_s_min']:.1f}-{row['decode_tok_s_max']:.1f}, prefill "
                      f"{row['prefill_tok_s_min']:.1f}-{row['prefill_tok_s_max']:.1f} over {repeat} runs)"
                      if repeat > 1 else "")  # fmt: skip
            num = common.num  # 3 significant digits: a smoke run's GB/s is not 0.00
            tqdm.write(f"{label:<8} {b:>5} {prompt_len:>6} {new_tokens:>4} {num(row['prefill_tok_s']):>13} "
                       f"{num(row['decode_tok_s']):>12} {num(row['step_ms']):>8} {num(row['decode_GBps']):>8} "
                       f"{num(row['pct_roofline']):>9} {num(row['cpu_s']):>7} {num(row['wall_s']):>7}{spread}",
                       file=sys.stdout)  # fmt: skip
            sys.stdout.flush()
            if args.out:  # after every row: a run cut short keeps what it measured
                common.write_json(args.out, {"meta": meta, "rows": rows})
    bar.close()
    if args.out:
        print(f"# wrote {args.out}")
    return rows


def peak_bytes(preset: str, quant: str, batch: int, context: int, tp: int = 1) -> int:
    """The most GPU memory a --preset run holds: the memory planner's total for one GPU (weights, KV
    cache, activations, CUDA-graph pool, reserve) plus what random_model holds beside the weights
    while filling one module: the float32 randn of the largest linear or the embedding, and for a
    quantized linear the quantizer's float32 temporaries (4 of it, as bench_gemm.peak_bytes)."""
    p = plan.plan(preset, quant=quant, batch=batch, max_context=context, gpus=tp)
    c = shard_config(preset, tp)
    largest = max(2 * c.intermediate_size, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim, c.hidden_size) * c.hidden_size
    init = max(4 * c.vocab_size * c.hidden_size, (16 if quant != "bf16" else 4) * largest)
    return p.total_bytes + init


if __name__ == "__main__":
    main()
