"""Tensor parallel on the CPU: gloo process groups of 2 and 3 spawned processes give the logits and
greedy tokens of the single-process model (tiny random models saved as safetensors, unquantized
and as a Meta FP8 checkpoint; SmolLM2 at TP=3), each rank reads only its slices, and a tp that
does not split the heads is one clear error."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import assert_rel_close, needs_smollm2, rel_err
from safetensors.torch import save_file

from llama_kernels.export import quantize_checkpoint
from llama_kernels.llm import LLM

# name: (query heads, KV heads, tied embeddings). TP=2 and TP=3 split the KV heads of "split" and
# replicate the single KV head of "mqa".
MODELS = {"split": (6, 6, True), "mqa": (6, 1, False)}
HEAD_DIM, HIDDEN, FFN, LAYERS, VOCAB = 16, 96, 192, 2, 128  # VOCAB: 43 + 43 + 42 rows at TP=3
PROMPTS = [[5, 17, 99, 3, 42, 8, 77, 12], [9, 1, 100]]
LOGIT_IDS = list(range(3, 23))
NEW_TOKENS = 6


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small models on 2 shared cores: one thread each (the spawned ranks pin themselves too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_model(path: Path, heads: int, kv_heads: int, tie: bool, seed: int = 0, layers: int = LAYERS) -> Path:
    """A random Llama as a Hugging Face directory (config.json + model.safetensors). With fewer layers and
    the same seed and heads, it is the first layers of the model of more (a draft that often agrees)."""
    path.mkdir()
    g = torch.Generator().manual_seed(seed)

    def w(n: int, k: int) -> torch.Tensor:
        return torch.randn(n, k, generator=g) / math.sqrt(k)

    t = {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=g),
         "model.norm.weight": 1 + 0.1 * torch.randn(HIDDEN, generator=g)}  # fmt: skip
    if not tie:
        t["lm_head.weight"] = w(VOCAB, HIDDEN) * 8
    for i in range(layers):
        p = f"model.layers.{i}."
        t |= {p + "self_attn.q_proj.weight": w(heads * HEAD_DIM, HIDDEN),
              p + "self_attn.k_proj.weight": w(kv_heads * HEAD_DIM, HIDDEN),
              p + "self_attn.v_proj.weight": w(kv_heads * HEAD_DIM, HIDDEN),
              p + "self_attn.o_proj.weight": w(HIDDEN, heads * HEAD_DIM),
              p + "mlp.gate_proj.weight": w(FFN, HIDDEN), p + "mlp.up_proj.weight": w(FFN, HIDDEN),
              p + "mlp.down_proj.weight": w(HIDDEN, FFN),
              p + "input_layernorm.weight": 1 + 0.1 * torch.randn(HIDDEN, generator=g),
              p + "post_attention_layernorm.weight": 1 + 0.1 * torch.randn(HIDDEN, generator=g)}  # fmt: skip
    save_file(t, str(path / "model.safetensors"))
    config = dict(model_type="llama", vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  head_dim=HEAD_DIM, max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5,
                  tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    return path


def run_cases(cases: dict[str, Path | None], tp: int) -> dict:
    """{case: (logits [T, V] of LOGIT_IDS, greedy tokens of PROMPTS)} with this process's rank of tp."""
    out = {}
    for name, path in cases.items():
        llm = LLM.from_pretrained(path, max_context=64, max_batch=2, progress=False, tp=tp)
        out[name] = (llm.logits(LOGIT_IDS), llm.generate_ids(PROMPTS, NEW_TOKENS, stop_ids=()))
    return out


class CountingOpen:
    """safetensors.safe_open that counts the bytes of every tensor and slice it returns."""

    read = 0

    def __init__(self, real, *args, **kwargs) -> None:
        self.f = real(*args, **kwargs)

    def __enter__(self):
        self.f.__enter__()
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)

    def get_tensor(self, name):
        t = self.f.get_tensor(name)
        CountingOpen.read += t.nbytes
        return t

    def get_slice(self, name):
        rows = self.f.get_slice(name)

        class Slice:
            def __getitem__(self, index):
                t = rows[index]
                CountingOpen.read += t.nbytes
                return t

        return Slice()


def worker(rank: int, tp: int, port: int, cases: dict, out: Path) -> None:
    """One rank: join the gloo group, run the cases (counting the bytes read), rank 0 saves the results."""
    import functools

    import safetensors

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=tp)
    safetensors.safe_open = functools.partial(CountingOpen, safetensors.safe_open)
    results = run_cases(cases, tp)
    CountingOpen.read = 0
    LLM.from_pretrained(cases["split"], max_context=16, max_batch=1, progress=False, tp=tp)
    results["bytes_read"] = CountingOpen.read
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tp")
    paths = {name: write_model(root / name, *spec) for name, spec in MODELS.items()}
    paths["fp8"] = quantize_checkpoint(paths["split"], root / "fp8", "fp8", progress=False)
    return paths


@pytest.fixture(scope="module")
def reference(cases) -> dict:
    return run_cases(cases, tp=1)


def spawn(tp: int, cases: dict, tmp_path: Path) -> dict:
    out = tmp_path / f"tp{tp}.pt"
    mp.spawn(worker, args=(tp, free_port(), cases, out), nprocs=tp)
    return torch.load(out)


@pytest.mark.parametrize("tp", [2, 3])
def test_tp_matches_one_process(tp, cases, reference, tmp_path):
    got = spawn(tp, cases, tmp_path)
    for name in ("split", "mqa"):  # fp32: only the order of the all-reduce sums differs
        logits, tokens = got[name]
        assert_rel_close(logits, reference[name][0], 1e-5, f"{name} logits at tp={tp}")
        assert tokens == reference[name][1], f"{name} greedy tokens at tp={tp}"
    # FP8 (the Meta FP8 export of "split"): each rank quantizes the activations of its K slice of
    # o/down per token, so the scales differ: TP must move the logits less than FP8 itself does
    fp8_error = rel_err(reference["fp8"][0].double(), reference["split"][0].double())
    assert rel_err(got["fp8"][0].double(), reference["fp8"][0].double()) < fp8_error
    assert got["fp8"][1] == reference["fp8"][1], f"FP8 greedy tokens at tp={tp}"
    # each rank reads its slices: 1/tp of everything but the norms (vocabulary rows rounded up)
    header = {n: t.numel() * t.element_size() for n, t in _tensors(cases["split"]).items()}
    norms = sum(b for n, b in header.items() if "norm" in n)
    sharded = sum(header.values()) - norms
    assert got["bytes_read"] == pytest.approx(sharded / tp + norms, rel=0.02), (got["bytes_read"], sharded, norms)


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@needs_smollm2
def test_smollm2_tp3(tmp_path):
    """SmolLM2 (9 query heads, 3 KV heads; GGUF: read whole, then sliced) at TP=3."""
    cases = {"smollm2": None}
    ref_logits, ref_tokens = run_cases(cases, tp=1)["smollm2"]
    out = tmp_path / "smollm2.pt"
    mp.spawn(_smollm2_worker, args=(3, free_port(), out), nprocs=3)
    logits, tokens = torch.load(out)
    assert_rel_close(logits, ref_logits, 1e-4, "SmolLM2 logits at tp=3")
    assert tokens == ref_tokens


def _smollm2_worker(rank: int, tp: int, port: int, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=tp)
    result = run_cases({"smollm2": None}, tp)["smollm2"]
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()


def test_tp_that_does_not_split_the_heads(cases):
    """Raised before any process group or weight is touched, so every rank fails alike."""
    with pytest.raises(ValueError) as err:
        LLM.from_pretrained(cases["split"], progress=False, tp=4)
    msg = str(err.value)
    assert "tp=4" in msg and "6 query heads, 6 KV heads" in msg and "valid tp: [1, 2, 3, 6]" in msg, msg
    with pytest.raises(ValueError, match=r"tp=5 .*valid tp: \[1, 2, 3, 6\]"):
        LLM.from_pretrained(cases["mqa"], progress=False, tp=5)
