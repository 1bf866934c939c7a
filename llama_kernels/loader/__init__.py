"""Checkpoint loading: Hugging Face directories and GGUF files, preflighted, then streamed into the model.

    ckpt = open_checkpoint(path)          # preflight: config, tokenizer, file checks; nothing allocated
    model = load_model(ckpt, dtype, device, quant=None | "fp8" | "int4", policy="all" | "meta")
"""

from __future__ import annotations

from pathlib import Path

from .checkpoint import Checkpoint, load_model
from .default_model import default_model_path
from .errors import CheckpointError
from .tokenizer import Tokenizer

__all__ = ["Checkpoint", "CheckpointError", "Tokenizer", "default_model_path", "load_model", "open_checkpoint"]


def open_checkpoint(path: str | Path | None) -> Checkpoint:
    """Preflight a Hugging Face directory or a .gguf file (None: the default model)."""
    path = default_model_path() if path is None else Path(path)
    if path.is_dir():
        from .hf import open_hf_dir

        return open_hf_dir(path)
    if path.suffix == ".gguf" and path.is_file():
        from .gguf_file import open_gguf

        return open_gguf(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: pass a Hugging Face model directory or a .gguf file")
    raise CheckpointError(
        f"{path} is neither a directory nor a .gguf file: pass a Hugging Face model directory or a .gguf file"
    )
