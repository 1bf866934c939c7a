"""Checkpoint loading: preflight errors of Hugging Face directories and GGUF files, and the embedded
SmolLM2 GGUF (dequantization, Q/K un-permutation, tokenizer) against transformers' own GGUF reader
and LlamaForCausalLM."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_rel_close, default_model_missing, needs_smollm2
from safetensors.torch import save_file

from llama_kernels.llm import LLM
from llama_kernels.loader import CheckpointError, default_model_path, open_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one thread (see conftest)

transformers = pytest.importorskip("transformers")

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


# --- preflight of Hugging Face directories ------------------------------------------------------


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sharded")
    transformers.LlamaForCausalLM(config).save_pretrained(path, max_shard_size="20KB")
    return path


@pytest.fixture
def copy(sharded, tmp_path) -> Path:
    return Path(shutil.copytree(sharded, tmp_path / "model"))


def shards(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def test_sharded_checkpoint_loads(copy):
    assert len(shards(copy)) > 2
    llm = LLM.from_pretrained(copy, max_context=64, progress=False)
    assert llm.logits([1, 2, 3]).shape == (3, 64)


def test_missing_shard(copy):
    gone = shards(copy)[1]
    gone.unlink()
    with pytest.raises(CheckpointError, match=rf"model.safetensors.index.json names 1 shard\(s\) that are missing "
                                              rf"from .*: {gone.name}; download them"):  # fmt: skip
        LLM.from_pretrained(copy, progress=False)


def test_truncated_shard(copy):
    shard = shards(copy)[0]
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match=rf"{shard.name} is truncated: {size - 100} bytes, its header "
                                              rf"describes {size}: download it again"):  # fmt: skip
        LLM.from_pretrained(copy, progress=False)


def test_lfs_pointer(copy):
    shard = shards(copy)[-1]
    shard.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 123456\n")
    with pytest.raises(CheckpointError, match=rf"{shard.name} is a Git LFS pointer, not the file itself: "
                                              r"run `git lfs pull`"):  # fmt: skip
        LLM.from_pretrained(copy, progress=False)


def test_missing_config_weights_and_tensors(copy, tmp_path):
    with pytest.raises(CheckpointError, match="no config.json; point at a Hugging Face model directory"):
        open_checkpoint(tmp_path)
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(copy / "config.json", single)
    with pytest.raises(CheckpointError, match=r"no \*.safetensors weights"):
        open_checkpoint(single)
    save_file({"model.embed_tokens.weight": torch.zeros(64, 32)}, single / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"weights missing from the checkpoint, e.g. \['layers.0"):
        LLM.from_pretrained(single, progress=False)
    save_file({"model.embed_tokens.weight": torch.zeros(64, 32), "model.extra.weight": torch.zeros(1)},
              single / "model.safetensors")  # fmt: skip
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.extra.weight' for a Llama model"):
        LLM.from_pretrained(single, progress=False)
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(tmp_path / "nowhere")


def test_quantized_or_unsupported_checkpoints(copy):
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "bitsandbytes"}}))
    with pytest.raises(CheckpointError, match="quantization_config 'bitsandbytes' is not supported"):
        open_checkpoint(copy)
    (copy / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral"}))
    with pytest.raises(CheckpointError, match="config.json: LlamaConfig: model_type='mistral'; only 'llama'"):
        open_checkpoint(copy)


# --- GGUF: the embedded SmolLM2 -------------------------------------------------------------------


@needs_smollm2
def test_truncated_gguf(tmp_path):
    src = default_model_path()
    bad = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(src.stat().st_size // 2))
    with pytest.raises(CheckpointError, match=r"cut.gguf is truncated: tensor \S+ ends at byte \d+ but the file has"):
        open_checkpoint(bad)
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="is not a GGUF file"):
        open_checkpoint(bad)


@pytest.fixture(scope="module")
def smollm2():
    """Our checkpoint of the embedded GGUF, its tensors in Hugging Face order, and the equivalent
    transformers LlamaConfig."""
    if default_model_missing():
        pytest.skip(default_model_missing())
    ckpt = open_checkpoint(None)
    c = ckpt.config
    config = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim, rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=True,
        max_position_embeddings=c.max_position_embeddings, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return ckpt, {name: t for name, t, _ in ckpt.tensors()}, config


def test_gguf_tensors_equal_transformers_conversion(smollm2):
    """Dequantization and the Q/K un-permutation agree bit for bit with transformers' own GGUF reader."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    ckpt, ours, config = smollm2
    c = ckpt.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 576, 9, 3, 64)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0 and c.eos_token_ids == (2,)
    with torch.device("meta"):
        shell = transformers.LlamaForCausalLM(config)
    theirs = load_gguf_checkpoint(str(ckpt.path), return_tensors=True, model_to_load=shell)["tensors"]
    assert sorted(ours) == sorted(theirs)
    for name, t in ours.items():
        assert torch.equal(t, theirs[name].float()), name


@pytest.fixture(scope="module")
def hf_dir(smollm2, tmp_path_factory):
    """The GGUF's weights (HF order) written as a Hugging Face directory, with its tokenizer and chat
    template; returns (transformers model, directory)."""
    ckpt, tensors, config = smollm2
    tok = ckpt.tokenizer
    model = transformers.LlamaForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    path = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(path)
    tok.tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": tok.chat_template, "bos_token": tok.bos_token, "eos_token": tok.eos_token,
         "add_bos_token": False}))  # fmt: skip
    return model, path


@pytest.fixture(scope="module")
def ours():
    return LLM.from_pretrained(None, max_context=512, progress=False)


def test_smollm2_logits_match_transformers(hf_dir, ours):
    model, path = hf_dir
    ids = ours.tokenizer.apply_chat_template(CHAT)
    ids += ours.tokenizer.encode(" The capital of France is Paris, and the capital of Germany is Berlin.")
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    got = ours.logits(ids)
    assert_rel_close(got, ref, 1e-4, "SmolLM2 logits")
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.99
    from_dir = LLM.from_pretrained(path, max_context=512, progress=False)
    assert torch.equal(from_dir.logits(ids), got), "the HF directory of the same weights gives other logits"
    assert from_dir.tokenizer.apply_chat_template(CHAT) == ours.tokenizer.apply_chat_template(CHAT)


def test_gguf_tokenizer(ours):
    """Byte-level BPE with SmolLM's single-digit split; agrees with transformers' GGUF tokenizer on text
    without digits (transformers does not split digits for the 'smollm' pre-tokenizer)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

    tok = ours.tokenizer
    arch, tokenizer_dict, _ = get_gguf_tokenizer(str(default_model_path()))
    theirs, _ = convert_gguf_tokenizer(arch, tokenizer_dict)
    text = "Hello world! Ça va? <|im_start|>user\n  indented\tcode(x) -> y; naïve café\n"
    assert tok.encode(text) == theirs.encode(text, add_special_tokens=False).ids
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    assert [tok.decode([i]) for i in tok.encode("2024")] == ["2", "0", "2", "4"]
    chat = tok.apply_chat_template(CHAT)
    assert chat[0] == tok.tokenizer.token_to_id("<|im_start|>") and tok.bos_id == 1 and not tok.add_bos
    assert tok.decode(chat, skip_special_tokens=False).endswith("<|im_start|>assistant\n")


def test_bos_once_with_a_template_that_writes_bos(ours, tmp_path):
    """Llama 3 style: tokenizer.json's post-processor adds BOS and the chat template writes it too;
    the encoded chat still has exactly one BOS, and plain prompts get one."""
    from tokenizers.processors import TemplateProcessing

    from llama_kernels.loader import Tokenizer

    tok = ours.tokenizer.tokenizer
    bos = "<|endoftext|>"
    tok.post_processor = TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, 0)])
    tok.save(str(tmp_path / "tokenizer.json"))
    tok.post_processor = None
    template = "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    config = {"bos_token": {"content": bos}, "chat_template": template}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    llama3 = Tokenizer.from_hf_dir(tmp_path, bos_token_id=None)
    assert llama3.add_bos and llama3.bos_id == 0
    chat = llama3.apply_chat_template(CHAT)
    assert chat[0] == 0 and chat.count(0) == 1 and chat[1] == 1
    assert llama3.encode("Hello")[0] == 0 and llama3.encode(f"{bos}Hello").count(0) == 1


def test_generation_config_eos_ids(copy):
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2]}))
    assert open_checkpoint(copy).config.eos_token_ids == (7, 2)
