"""Hugging Face model directories: config.json, generation_config.json, tokenizer files and
one or many *.safetensors (with or without model.safetensors.index.json), bf16/fp16/fp32 or
quantized as config.json's quantization_config says (loader.quantized)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch

from ..model.config import LlamaConfig, id_tuple
from ..distributed import shard_weight
from .checkpoint import Checkpoint, split_of, target
from .errors import CheckpointError, check_not_lfs_pointer, safetensors_header
from .kv_scales import kv_scale_of
from .quantized import linear_schemes, quant_format, split_linear
from .tokenizer import Tokenizer

SUPPORTED_DTYPES = {"F32": 4, "F16": 2, "BF16": 2}  # safetensors dtype: bytes per element


def _read_json(file: Path) -> dict:
    check_not_lfs_pointer(file)
    try:
        return json.loads(file.read_text())
    except ValueError as err:
        raise CheckpointError(f"{file}: not valid JSON ({err}): download it again") from None


def _shards(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map'; download it again")
        shards = [path / name for name in dict.fromkeys(weight_map.values())]
        missing = [s.name for s in shards if not s.exists()]
        if missing:
            raise CheckpointError(
                f"{index} names {len(missing)} shard(s) that are missing from {path}: {', '.join(missing)}; "
                "download them"
            )
        return shards
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{path}: no *.safetensors weights: download the model's safetensors files")
    return shards


def open_hf_dir(path: Path) -> Checkpoint:
    """Preflight a Hugging Face directory and return its Checkpoint; nothing is allocated."""
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(
            f"{path}: no config.json; point at a Hugging Face model directory or a .gguf file"
        )
    raw = _read_json(config_file)
    fmt = quant_format(raw.get("quantization_config"), config_file)
    try:
        config = LlamaConfig.from_hf(raw)
    except ValueError as err:
        raise CheckpointError(f"{config_file}: {err}") from None
    gen_file = path / "generation_config.json"
    if gen_file.exists():
        gen_eos = id_tuple(_read_json(gen_file).get("eos_token_id"))
        config = replace(config, eos_token_ids=tuple(dict.fromkeys(gen_eos + config.eos_token_ids)))
    shards = _shards(path)
    headers = {}
    nbytes = 0
    linears: dict[str, dict[str, tuple[Path, dict]]] = {}  # quantized checkpoints: prefix -> suffix -> (shard, info)
    kv_scales: dict[str, Path] = {}  # FP8 KV-cache scale name -> shard
    for shard in shards:
        header = safetensors_header(shard)
        for name, info in header.items():
            nbytes += info["data_offsets"][1] - info["data_offsets"][0]
            split = split_linear(name) if fmt is not None else None
            if split is not None:
                linears.setdefault(split[0], {})[split[1]] = (shard, info)
                continue
            if info["dtype"] not in SUPPORTED_DTYPES:
                raise CheckpointError(
                    f"{shard}: tensor {name} has dtype {info['dtype']}; expected BF16, F16 or F32 (a quantized "
                    "checkpoint needs its quantization_config in config.json)"
                )
            try:
                target(name)
            except KeyError:
                raise CheckpointError(f"{shard}: unexpected tensor {name!r} for a Llama model") from None
            if kv_scale_of(name) is not None:
                kv_scales[name] = shard
        headers[shard] = header
    quantized = {}
    if fmt is not None:
        for prefix, found in linears.items():
            fmt.check(prefix, found)
        quantized = linear_schemes(fmt, config.num_layers)
    tokenizer = Tokenizer.from_hf_dir(path, config.bos_token_id)

    def tensors(tp=None) -> Iterator[tuple[str, torch.Tensor, int]]:
        """With tp, each rank reads only its slices (safe_open(...).get_slice), INT4 linears excepted:
        their packed tensors are read whole, converted, then sliced."""
        from safetensors import safe_open

        pending: dict[str, dict[str, torch.Tensor]] = {}  # a quantized checkpoint's linears, until complete
        held = 0  # bytes read into pending, reported with the next complete linear
        for file, header in headers.items():
            with safe_open(str(file), framework="pt") as f:
                for name, info in header.items():
                    split = split_linear(name) if fmt is not None else None
                    if split is None:
                        tensor = _read(f, name, info["shape"], split_of(name, tp))
                        yield name, tensor, tensor.nbytes
                        continue
                    prefix, suffix = split
                    spec = split_of(prefix + ".weight", tp)
                    scheme = fmt.scheme(prefix)
                    whole = scheme is not None and scheme.kind == "int4"
                    tensor = _read(f, name, info["shape"], None if whole else spec)
                    got = pending.setdefault(prefix, {})
                    got[suffix] = tensor
                    held += tensor.nbytes
                    if len(got) == len(linears[prefix]):
                        del pending[prefix]
                        weight = _convert(fmt, file, prefix, got)
                        if whole:
                            try:
                                weight = shard_weight(weight, spec, f"{file}: {prefix}")
                            except ValueError as err:
                                raise CheckpointError(str(err)) from None
                        yield prefix + ".weight", weight, held
                        held = 0

    method = None if fmt is None else fmt.method
    return Checkpoint(path, config, tokenizer, nbytes, tensors, method, quantized, kv_scales)


def _read(f, name: str, shape: list[int], spec: tuple[int, int, int] | None) -> torch.Tensor:
    """Tensor `name` of an open safetensors file, or only its slice spec = (dim, start, stop) when
    it spans that dim (a [N, 1] row scale split along K, or a per-tensor scale, is read whole)."""
    if spec is None or len(shape) <= spec[0] or shape[spec[0]] == 1:
        return f.get_tensor(name)
    dim, start, stop = spec
    rows = f.get_slice(name)
    return (rows[start:stop] if dim == 0 else rows[:, start:stop]).contiguous()


def _convert(fmt, shard: Path, prefix: str, tensors: dict[str, torch.Tensor]):
    """One linear's tensors {suffix: tensor} as what its module loads (the weight if unquantized)."""
    scheme = fmt.scheme(prefix)
    if scheme is None:
        return tensors["weight"]
    try:
        return fmt.convert(prefix, scheme, tensors)
    except ValueError as err:
        raise CheckpointError(
            f"{shard}: {err} ({fmt.method}); fix config.json or download the checkpoint again"
        ) from None
