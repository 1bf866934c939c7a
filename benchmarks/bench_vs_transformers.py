"""Our runner against transformers `generate`, side by side on the CPU: the default model (SmolLM2-135M-Instruct)
in float32, one prompt, --new-tokens greedy tokens (no early stop), the same weights in both.

The transformers model is a LlamaForCausalLM built from our loaded weights and config (transformers' own GGUF
loading needs `accelerate`, which the project does not depend on; the weights are the same dequantized tensors).
Runs alternate (ours, transformers, ours, ...) so load from other processes on the machine hits both alike;
each side reports the median tokens/s (new tokens / wall time of the whole generate, prefill included) and the
min-max spread over --repeat runs:

    OMP_NUM_THREADS=1 python benchmarks/bench_vs_transformers.py --threads 1 --out vs-transformers.json
    python benchmarks/bench_vs_transformers.py --smoke     # 1 run of 4 tokens (checks the script works)

Needs transformers (in the `test` extra).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402,F401  (sets TRITON_INTERPRET=1 without a GPU)
from optional import require  # noqa: E402

from llama_kernels.llm import LLM  # noqa: E402

PROMPT = "Explain in a few sentences why the sky is blue."


def hf_model(llm: LLM):
    """A transformers LlamaForCausalLM holding the weights of llm's model (float32, CPU, eval)."""
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    c, m = llm.config, llm.model
    hf = LlamaForCausalLM(HFConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim, rope_theta=c.rope_theta, rope_scaling=c.rope_scaling, rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.tie_word_embeddings, max_position_embeddings=c.max_position_embeddings,
        torch_dtype=torch.float32,
    )).eval()  # fmt: skip
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    state = {"model.embed_tokens.weight": m.tok_embeddings.weight, "model.norm.weight": m.norm.weight}
    if m.output is not None:
        state["lm_head.weight"] = m.output.weight
    for i, layer in enumerate(m.layers):
        p = f"model.layers.{i}."
        wq, wk, wv = layer.attention.wqkv.weight.split([q, kv, kv])
        gate, up = layer.feed_forward.w13.weight.chunk(2)
        state |= {p + "self_attn.q_proj.weight": wq, p + "self_attn.k_proj.weight": wk,
                  p + "self_attn.v_proj.weight": wv, p + "self_attn.o_proj.weight": layer.attention.wo.weight,
                  p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                  p + "mlp.down_proj.weight": layer.feed_forward.w2.weight,
                  p + "input_layernorm.weight": layer.attention_norm.weight,
                  p + "post_attention_layernorm.weight": layer.ffn_norm.weight}  # fmt: skip
    missing, unexpected = hf.load_state_dict({k: v.float().contiguous() for k, v in state.items()}, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"weight mapping: missing {missing}, unexpected {unexpected}")
    if c.tie_word_embeddings:
        hf.tie_weights()
    return hf


def run_ours(llm: LLM, ids: list[int], n: int) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    out = llm.generate_ids([ids], max_new_tokens=n, stop_ids=())[0]  # stop_ids=(): exactly n tokens
    return time.perf_counter() - t0, out


@torch.inference_mode()
def run_hf(hf, ids: list[int], n: int) -> tuple[float, list[int]]:
    x = torch.tensor([ids])
    t0 = time.perf_counter()
    out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      pad_token_id=0)  # fmt: skip
    return time.perf_counter() - t0, out[0, len(ids) :].tolist()


def main(argv: list[str] | None = None) -> dict:
    """Print the side-by-side figures; return {"new_tokens", "agree" (leading tokens both generated alike),
    "ours", "transformers" (tokens/s of each run)}."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--new-tokens", type=int, default=None, help="greedy tokens per generate (default 64; smoke 4)")
    p.add_argument("--repeat", type=int, default=None, help="timed runs of each side (default 7; smoke 1)")
    p.add_argument("--smoke", action="store_true", help="one short run of each (CI)")
    p.add_argument("--out", default=None, help="write the results as JSON to this file")
    args = p.parse_args(argv)
    require("transformers", "test", "bench_vs_transformers.py")
    n = args.new_tokens or (4 if args.smoke else 64)
    repeat = args.repeat or (1 if args.smoke else 7)
    if args.threads:
        torch.set_num_threads(args.threads)
    # no prefix caching: every run prefills the prompt, as transformers does
    llm = LLM.from_pretrained(dtype="float32", device="cpu", progress=False, max_context=512, max_batch=1,
                              prefix_caching=False)
    hf = hf_model(llm)
    ids = llm.encode_prompt(PROMPT, chat=True)
    run_ours(llm, ids, 2), run_hf(hf, ids, 2)  # warm-up
    times: dict[str, list[float]] = {"ours": [], "transformers": []}
    outs = {}
    for _ in range(repeat):
        for name, fn, model in (("ours", run_ours, llm), ("transformers", run_hf, hf)):
            seconds, outs[name] = fn(model, ids, n)
            times[name].append(seconds)
    same = next((i for i, (a, b) in enumerate(zip(outs["ours"], outs["transformers"])) if a != b), n)
    print(f"SmolLM2-135M-Instruct fp32 CPU, {torch.get_num_threads()} thread(s), prompt {len(ids)} tokens, "
          f"{n} new tokens greedy, {repeat} interleaved runs each; tokens agree for the first {same}/{n}")  # fmt: skip
    for name, ts in times.items():
        rates = sorted(n / t for t in ts)
        print(f"  {name:13s} {statistics.median(rates):6.1f} tok/s  (min {rates[0]:.1f}, max {rates[-1]:.1f})")
    result = {"new_tokens": n, "agree": same} | {name: [n / t for t in ts] for name, ts in times.items()}
    if args.out:
        meta = {"benchmark": "vs_transformers", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"), "device": platform.processor() or "cpu", "threads": torch.get_num_threads(),
                "torch": torch.__version__, "transformers": common._version("transformers"), "prompt_tokens": len(ids),
                "repeat": repeat, "smoke": args.smoke}  # fmt: skip
        Path(args.out).write_text(json.dumps({"meta": meta, **result}, indent=1))
        print(f"# wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
