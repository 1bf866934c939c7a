"""Preflight checks shared by the checkpoint readers: each failure is one line naming the file and the fix."""

from __future__ import annotations

import json
import struct
from pathlib import Path

LFS_PREFIX = b"version https://git-lfs.github.com/spec/"


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded; the message names the file and what to do."""


def check_not_lfs_pointer(file: Path) -> None:
    """Raise if `file` is a Git LFS pointer (the repository was cloned without `git lfs`)."""
    if file.stat().st_size < 1024:
        with open(file, "rb") as f:
            if f.read(len(LFS_PREFIX)) == LFS_PREFIX:
                raise CheckpointError(
                    f"{file} is a Git LFS pointer, not the file itself: run `git lfs pull` in {file.parent} "
                    "(or download the file)"
                )


def safetensors_header(file: Path) -> dict:
    """The header of a .safetensors file {name: {dtype, shape, data_offsets}}, after checking that the
    file's size is what the header describes (8 + header length + end of the last tensor)."""
    check_not_lfs_pointer(file)
    size = file.stat().st_size
    with open(file, "rb") as f:
        start = f.read(8)
        if len(start) < 8:
            raise CheckpointError(f"{file} is truncated ({size} bytes, no safetensors header): download it again")
        (header_len,) = struct.unpack("<Q", start)
        if 8 + header_len > size:
            raise CheckpointError(
                f"{file} is truncated or not a safetensors file: its header claims {header_len} bytes but the "
                f"file has {size}: download it again"
            )
        try:
            header = json.loads(f.read(header_len))
        except ValueError as err:
            raise CheckpointError(f"{file}: unreadable safetensors header ({err}): download it again") from None
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    expected = 8 + header_len + end
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise CheckpointError(
            f"{file} is {what}: {size} bytes, its header describes {expected}: download it again"
        )
    return header
