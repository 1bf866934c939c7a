"""Chunked prefill over the paged cache: prompts prefilled in chunks give the logits and greedy tokens
of a one-shot prefill (tiny random Llama and SmolLM2; fp32, FP8 KV cache; the triton backend under
the interpreter); a batch of mixed lengths shares chunks; a >4K-token prompt through the CLI; and
peak memory of an 8K-token prefill does not grow with the prompt beyond the KV cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_rel_close, needs_smollm2 as smollm2

from llama_kernels import backends
from llama_kernels.llm import LLM
from llama_kernels.model import LlamaConfig
from llama_kernels.engine import Engine, SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
CONFIG = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=6,
                     num_kv_heads=2, head_dim=64, max_position_embeddings=2048)  # fmt: skip


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(llm: LLM, prompts: list[list[int]], chunk: int, new: int = 6, **kw) -> list[list[int]]:
    """Greedy tokens of each prompt, all in one engine that prefills in chunks of `chunk`."""
    engine = Engine(llm.loaded, max_num_seqs=len(prompts), prefill_chunk=chunk, **kw)
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    out: list[list[int]] = [[] for _ in prompts]
    while engine.has_unfinished():
        for o in engine.step():
            out[int(o.request_id)] += o.new_token_ids
    assert engine.allocator.used == 0
    return out


@pytest.mark.parametrize("kv", [None, "fp8"])
def test_chunked_logits_equal_one_shot_tiny(kv):
    # no prefix caching: each greedy() below must prefill the whole prompt in its own chunks
    llm = LLM.from_config(CONFIG, device="cpu", max_context=256, max_batch=2, seed=1, kv_cache_dtype=kv,
                          prefix_caching=False)
    ids = prompt(150, seed=2)
    one_shot = Engine(llm.loaded, prefill_chunk=256).logits(ids)
    assert one_shot.shape == (150, CONFIG.vocab_size)
    for chunk in (1, 7, 64):
        assert_rel_close(Engine(llm.loaded, prefill_chunk=chunk).logits(ids), one_shot, 1e-5, f"chunk {chunk} logits")
    tokens = greedy(llm, [ids], chunk=256)
    for chunk in (1, 7, 64):
        assert greedy(llm, [ids], chunk) == tokens, f"chunk {chunk} greedy tokens"


@smollm2
def test_chunked_logits_equal_one_shot_smollm2():
    llm = LLM.from_pretrained(None, max_context=128, max_batch=1, progress=False, prefix_caching=False)
    ids = llm.encode_prompt("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris. It "
                            "is named after the engineer Gustave Eiffel, whose company designed and built it.")
    one_shot = Engine(llm.loaded, prefill_chunk=128).logits(ids)
    for chunk in (1, 7, 64):
        assert_rel_close(Engine(llm.loaded, prefill_chunk=chunk).logits(ids), one_shot, 1e-5, f"chunk {chunk} logits")
    tokens = greedy(llm, [ids], chunk=128, new=8)
    assert greedy(llm, [ids], chunk=7, new=8) == tokens


def test_a_batch_of_5_300_1000_tokens_in_chunks_of_128():
    llm = LLM.from_config(CONFIG, device="cpu", max_context=1024 + 16, max_batch=3, seed=4, prefix_caching=False)
    prompts = [prompt(n, seed=n) for n in (5, 300, 1000)]
    steps = []
    engine_run = Engine.__init__

    def record(self, *a, **kw):  # every engine of this test records its steps' chunk lengths
        engine_run(self, *a, **kw)
        run = self.runner.run
        self.runner.run = lambda chunks, **k: steps.append([len(c.tokens) for c in chunks]) or run(chunks, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Engine, "__init__", record)
        together = greedy(llm, prompts, chunk=128)
    assert all(sum(s) <= 128 for s in steps) and max(max(s) for s in steps) == 128
    assert [5, 123] in steps, "one step holds all of the first prompt and the head of the second"
    assert any(len(s) == 3 and s[1] > 1 and s[2] > 1 for s in steps), "the tail of one prompt, the head of the next"
    for p, got in zip(prompts, together):
        assert [got] == greedy(llm, [p], chunk=1024), f"{len(p)}-token prompt"


def test_triton_backend_agrees_with_torch_in_chunks(monkeypatch):
    pytest.importorskip("triton")
    llm = LLM.from_config(CONFIG, device="cpu", max_context=64, max_batch=2, seed=5, prefix_caching=False)
    prompts = [prompt(37, seed=6), prompt(9, seed=7)]
    ref = Engine(llm.loaded, prefill_chunk=16).logits(prompts[0])
    ref_tokens = greedy(llm, prompts, chunk=16, new=3)
    monkeypatch.setenv(backends.ENV_VAR, "triton")
    used = set()
    select = backends.select
    monkeypatch.setattr(backends, "select", lambda op, dev, be=None: used.add(select(op, dev, be)[0])
                        or select(op, dev, be))  # fmt: skip
    assert_rel_close(Engine(llm.loaded, prefill_chunk=16).logits(prompts[0]), ref, 1e-4, "triton logits")  # measured
    assert greedy(llm, prompts, chunk=16, new=3) == ref_tokens
    assert used == {"triton"}


@smollm2
def test_cli_answers_a_prompt_of_more_than_4k_tokens():
    from test_generate import TEXT

    question = "\n\n".join([TEXT] * 32) + "\n\nThat was the text. Now a question: what is the capital of France?"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "llama_kernels", "generate", question, "--prefill-chunk",
                           "512", "--max-context", "4200", "--max-new-tokens", "8"], capture_output=True, text=True,
                          timeout=600, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    answer = done.stdout.strip()  # stdout holds only the answer; the throughput lines go to stderr
    prefill = next(line for line in done.stderr.splitlines() if line.startswith("prefill: "))
    assert int(prefill.split()[1]) > 4096, prefill
    assert "Eiffel" in answer or "Paris" in answer, answer  # measured: "The text suggests that the Eiffel Tower"


PEAK_RSS = """
import json, sys, torch
from llama_kernels.llm import LLM
from llama_kernels.model import LlamaConfig

def peak_mib():  # VmHWM: this process's peak RSS (ru_maxrss would include the parent's, from before the exec)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024

torch.set_num_threads(1)
config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=8192, num_layers=2, num_heads=4,
                     num_kv_heads=1, head_dim=64, max_position_embeddings=8192 + 16)
llm = LLM.from_config(config, device="cpu", max_context=8192 + 16, max_batch=1, prefill_chunk=int(sys.argv[1]))
before = peak_mib()
llm.generate_ids([torch.randint(3, 250, (8192,), generator=torch.Generator().manual_seed(0)).tolist()], 1)
print(json.dumps({"loaded_mib": before, "peak_mib": peak_mib(), "kv_mib": llm.cache.bytes_per_token
                  * llm.cache.num_blocks * llm.cache.block_size / 2**20}))
"""


def test_peak_memory_of_an_8k_prefill_does_not_grow_with_the_chunk():
    """Peak RSS (a fresh process each) of an 8192-token prompt. One 8192-token chunk needs the MLP's
    activations for all of them (gate/up [8192, 16384] float32 alone is 512 MiB); chunks of 256 stay
    near the loaded model and its KV cache: their largest temporaries are the torch backend's attention
    logits of 256 query rows over the 8K prefix (4 heads x 256 x 8192 float32 = 32 MiB, a few copies)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    mib = {}
    for chunk in (256, 8192):
        done = subprocess.run([sys.executable, "-c", PEAK_RSS, str(chunk)], capture_output=True, text=True,
                              timeout=600, env=env)  # fmt: skip
        assert done.returncode == 0, done.stderr
        mib[chunk] = json.loads(done.stdout.splitlines()[-1])
    print(f"peak RSS, 8192-token prompt: {mib}")
    small, large = mib[256], mib[8192]
    assert small["peak_mib"] - small["loaded_mib"] < 400, small
    assert large["peak_mib"] - small["peak_mib"] > 600, mib
