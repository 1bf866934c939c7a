"""Tensor parallelism over torch.distributed (NCCL on CUDA, gloo on the CPU), within one node.

Launch one process per GPU with torchrun and load with ``LLM.from_pretrained(..., tp=N)``:

    torchrun --nproc-per-node 8 -m llama_kernels generate "..." --model DIR --tp 8

How the model is split (Megatron style, gpt-fast's tp.py), by :class:`TensorParallel`:
- q/k/v and gate/up (the fused wqkv and w13) are column-parallel: each rank holds its rows of
  every part, fused as usual; o and down are row-parallel (its columns of K) and end in one
  all-reduce each.
- Query heads are split evenly; KV heads too, or replicated when tp is a multiple of their
  number (each rank then holds the one KV head its query heads read). The KV cache holds the
  rank's KV heads only.
- The embedding and the lm_head are vocab-parallel: each rank holds ceil(V / tp) rows; the
  embedding all-reduces its masked lookups, the lm_head all-gathers the logits.
"""

from __future__ import annotations

import atexit
import os
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .int4 import Int4Weight


TIMEOUT_S = 600.0  # default seconds a collective may wait for the other ranks before it fails


class TensorParallelError(RuntimeError):
    """A collective failed: another rank stopped, hung past the timeout or is unreachable (the group is
    out of step for good)."""


def init(timeout: float = TIMEOUT_S) -> None:
    """Initialize the default process group from torchrun's environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR/PORT): NCCL with this rank's GPU when CUDA is available, else gloo; a
    collective waits `timeout` seconds for the other ranks, then fails. Does nothing if it is already
    initialized."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("tensor parallel needs a torchrun job: torchrun --nproc-per-node N -m llama_kernels ...")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(seconds=timeout))
    atexit.register(dist.destroy_process_group)


_SOURCE_PATH = re.compile(r"\[[^\]]*\.(?:cc|cpp|cu|h|hpp):\d+\]\s*|(?:[\w.+-]*/)+[\w.+-]+\.(?:cc|cpp|cu|h|hpp|py)(?::\d+)?")


def describe_failure(err: BaseException) -> TensorParallelError:
    """A collective's error as one line naming this rank, without the collective library's source paths
    (gloo's "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer ...")."""
    first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
    detail = " ".join(_SOURCE_PATH.sub("", first).split())
    size = dist.get_world_size() if dist.is_initialized() else 1
    return TensorParallelError(f"tensor parallel: rank {rank()} of {size}: a collective with the other ranks failed "
                               f"(a rank stopped, hung or is unreachable): {detail}")  # fmt: skip


def rank() -> int:
    """This process's rank (0 outside a distributed job)."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process prints: rank 0, or the only process."""
    return rank() == 0


def broadcast_object(obj=None):
    """Rank 0's `obj` (any picklable value) on every rank; the other ranks' argument is ignored."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def valid_tp(num_heads: int, num_kv_heads: int, intermediate_size: int) -> list[int]:
    """Every tp that splits the model evenly."""
    return [t for t in range(1, num_heads + 1)
            if num_heads % t == 0 and intermediate_size % t == 0
            and (num_kv_heads % t == 0 or t % num_kv_heads == 0)]  # fmt: skip


def check_tp(config, tp) -> None:
    """Raise ValueError (the same on every rank) unless tp splits the model's heads evenly."""
    ok = valid_tp(config.num_heads, config.num_kv_heads, config.intermediate_size)
    if isinstance(tp, bool) or not isinstance(tp, int) or tp not in ok:
        raise ValueError(
            f"tp={tp!r} cannot split this model ({config.num_heads} query heads, {config.num_kv_heads} KV heads, "
            f"intermediate_size {config.intermediate_size}): tp must divide the query heads and the "
            f"intermediate size, and divide the KV heads or be a multiple of them; valid tp: {ok}"
        )


@dataclass(frozen=True)
class TensorParallel:
    """This rank's share of a model: head, feed-forward and vocabulary ranges, and the collectives.

    Ranges are in the full model's coordinates: query heads [q_start, q_start + num_heads), KV
    heads [kv_start, kv_start + num_kv_heads), feed-forward rows [f_start, f_start + ffn),
    vocabulary rows [vocab_start, vocab_stop) (the last ranks may hold fewer than vocab_rows).
    """

    rank: int
    size: int
    config: object  # the full model's LlamaConfig

    @classmethod
    def current(cls, config, tp: int) -> TensorParallel:
        """This process's share for tp ranks (the process group must have tp ranks)."""
        check_tp(config, tp)
        if dist.get_world_size() != tp:
            raise ValueError(f"tp={tp} but the torchrun job has {dist.get_world_size()} processes; they must match")
        return cls(dist.get_rank(), tp, config)

    @property
    def num_heads(self) -> int:
        return self.config.num_heads // self.size

    @property
    def num_kv_heads(self) -> int:
        return max(1, self.config.num_kv_heads // self.size)

    @property
    def q_start(self) -> int:
        return self.rank * self.num_heads

    @property
    def kv_start(self) -> int:
        return self.rank * self.config.num_kv_heads // self.size  # replicated: the KV head of q_start

    @property
    def ffn(self) -> int:
        return self.config.intermediate_size // self.size

    @property
    def vocab_rows(self) -> int:
        return -(-self.config.vocab_size // self.size)

    @property
    def vocab_start(self) -> int:
        return min(self.rank * self.vocab_rows, self.config.vocab_size)

    @property
    def vocab_stop(self) -> int:
        return min(self.vocab_start + self.vocab_rows, self.config.vocab_size)

    def split(self, path: str, part: int) -> tuple[int, int, int] | None:
        """(dim, start, stop) of this rank's slice of a weight [N, K] of our module `path` (part
        `part` of a fused linear), or None when every rank holds all of it (norms)."""
        d = self.config.head_dim
        name = path.rpartition(".")[2]
        if name == "wqkv":
            start, heads = (self.q_start, self.num_heads) if part == 0 else (self.kv_start, self.num_kv_heads)
            return 0, start * d, (start + heads) * d
        if name == "wo":
            return 1, self.q_start * d, (self.q_start + self.num_heads) * d
        if name in ("w13", "w2"):
            return (0 if name == "w13" else 1), self.rank * self.ffn, (self.rank + 1) * self.ffn
        if name in ("tok_embeddings", "output"):
            return 0, self.vocab_start, self.vocab_stop
        return None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the ranks, in place."""
        dist.all_reduce(x)
        return x

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Every rank's logits [T, rows] -> the full [T, V] (short last shards padded, then cut)."""
        pad = self.vocab_rows - logits.shape[-1]
        if pad:
            logits = torch.nn.functional.pad(logits, (0, pad))
        parts = [torch.empty_like(logits) for _ in range(self.size)]
        dist.all_gather(parts, logits.contiguous())
        return torch.cat(parts, dim=-1)[..., : self.config.vocab_size]


def shard_weight(w, spec: tuple[int, int, int] | None, what: str):
    """This rank's slice (spec from TensorParallel.split) of a whole weight: a tensor, an Fp8Weight
    (row scales follow their rows; per-tensor and input scales are replicated) or an Int4Weight
    (scales and zero points follow their groups; a K split must fall on group boundaries)."""
    from .model.linear import Fp8Weight

    if spec is None:
        return w
    dim, start, stop = spec
    if isinstance(w, torch.Tensor):
        return w.narrow(dim, start, stop - start).contiguous()
    if isinstance(w, Fp8Weight):
        scale = w.scale[start:stop] if dim == 0 and w.scale.dim() == 1 else w.scale
        return Fp8Weight(w.weight.narrow(dim, start, stop - start).contiguous(), scale.contiguous(), w.input_scale)
    if dim == 0:
        zeros = None if w.zeros is None else w.zeros[start:stop]
        return Int4Weight(w.qweight[start:stop], w.scales[start:stop], zeros, w.group_size, w.perm)
    g = w.group_size
    if start % g or stop % g or w.perm is not None:
        raise ValueError(f"{what}: this INT4 weight (group size {g}{', act-order' if w.perm is not None else ''}) "
                         f"cannot be split along K at [{start}, {stop}) on group boundaries; use another tp")
    zeros = None if w.zeros is None else w.zeros[:, start // g : stop // g].contiguous()
    qweight = w.qweight[:, start // 8 : stop // 8].contiguous()
    return Int4Weight(qweight, w.scales[:, start // g : stop // g].contiguous(), zeros, g)
