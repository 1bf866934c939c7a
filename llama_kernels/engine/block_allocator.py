"""The KV-cache block pool, with automatic prefix caching.

Blocks are reference-counted: a block may be held by several sequences that share a prefix. Once a
sequence has computed the k/v of a full block, the block is registered in the prefix cache under a
chained digest, sha256(parent digest || its token ids as int64), the first block's parent being
sha256(namespace || cache_salt) (namespace: what else changes a block's contents, the KV dtype).
Python's hash() is never the key: its collisions are easy to construct. A block nobody holds any
more stays cached (free, but reusable by a later prompt with that prefix) and is evicted, least
recently freed first, only when grow() has no never-cached free block left.

A lookup does not trust the digest alone: the registration records the block's token ids and the
identity (serial) of its parent's registration, and a hit needs both to equal the asking
sequence's, so even a digest collision cannot hand a sequence another prefix's k/v.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


def block_digest(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The chained digest of a full block: sha256(parent digest || token ids as int64)."""
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


@dataclass
class Registration:
    """A full block's entry in the prefix cache."""

    block: int  # block id
    digest: bytes  # its chained digest (the key of the table)
    tokens: tuple[int, ...]  # [block_size] its token ids
    parent: int | bytes  # the serial of the previous block's registration; the first block's: the root key
    serial: int  # unique for ever (a block id is reused after eviction, a serial never)


class PrefixChain:
    """One sequence's view of the prefix cache: the digests of its full blocks (computed as its
    tokens arrive) and the registrations equal to its leading blocks."""

    def __init__(self, root: bytes) -> None:
        self.root = root  # root key (namespace and cache_salt): the parent of the first block
        self.digests: list[bytes] = []  # chained digest of each full block of its tokens so far
        self.serials: list[int] = []  # serial of the registration equal to each leading computed block

    def extend(self, ids: list[int], block_size: int, digest) -> None:
        """Digests of every full block of ids (only the new ones are computed)."""
        for i in range(len(self.digests), len(ids) // block_size):
            parent = self.digests[i - 1] if i else hashlib.sha256(self.root).digest()
            self.digests.append(digest(parent, ids[i * block_size : (i + 1) * block_size]))

    def parent(self, i: int) -> int | bytes:
        """The parent identity block i's registration must carry."""
        return self.serials[i - 1] if i else self.root


class BlockAllocator:
    """Hands out the ids of num_blocks cache blocks of block_size tokens.

    Never-cached free blocks are taken lowest id first (a freshly started engine fills the pool from
    block 0); then cached free blocks, least recently freed first (evicting them). `used` counts the
    blocks some holder references; used + num_cached_free + num_uncached_free == num_blocks.

    Args:
        num_blocks, block_size: the pool.
        prefix_caching: register computed full blocks and reuse them across sequences.
        namespace: what besides the token ids determines a block's contents (e.g. the KV dtype); part
            of every digest.
    """

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True, namespace: str = "") -> None:
        self.num_blocks = num_blocks  # blocks in the pool
        self.block_size = block_size  # tokens per block
        self.prefix_caching = prefix_caching  # whether computed full blocks are registered and reused
        self.namespace = namespace  # hashed into every root key
        self.digest = block_digest  # (parent digest, token ids) -> digest; a test may swap it to force collisions
        self._free = list(range(num_blocks - 1, -1, -1))  # never-cached free ids; pop() takes the lowest first
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached free ids, least recently freed first
        self._ref = [0] * num_blocks  # holders of each block
        self._by_block: dict[int, Registration] = {}  # registered blocks (held or cached free)
        self._by_digest: dict[bytes, Registration] = {}  # the same registrations by digest
        self._serials = 0  # registrations made so far

    @property
    def num_free(self) -> int:
        """Blocks grow() can take: never-cached ones and cached ones it may evict."""
        return len(self._free) + len(self._lru)

    @property
    def num_uncached_free(self) -> int:
        return len(self._free)

    @property
    def num_cached_free(self) -> int:
        """Free blocks still holding a registered prefix (evicted LRU when the pool needs them)."""
        return len(self._lru)

    @property
    def num_cached(self) -> int:
        """Registered blocks, held or free."""
        return len(self._by_block)

    @property
    def used(self) -> int:
        """Blocks referenced by at least one holder."""
        return self.num_blocks - len(self._free) - len(self._lru)

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold `tokens` tokens."""
        return -(-tokens // self.block_size)

    def root_key(self, cache_salt: str | None) -> bytes:
        """The root of a sequence's chain: namespace and salt, length-prefixed so no two pairs run together."""
        parts = [self.namespace.encode(), (cache_salt or "").encode(), b"1" if cache_salt is not None else b"0"]
        return b"".join(len(p).to_bytes(8, "little") + p for p in parts)

    # --- allocation -----------------------------------------------------------------------------

    def grow(self, blocks: list[int], tokens: int) -> bool:
        """Append fresh blocks to `blocks` (a holder's block list) until it holds `tokens` tokens; False
        (and `blocks` untouched) when the pool has too few free blocks."""
        need = self.blocks_for(tokens) - len(blocks)
        if need > self.num_free:
            return False
        for _ in range(max(need, 0)):
            if self._free:
                block = self._free.pop()
            else:  # evict the least recently freed cached block
                block, _ = self._lru.popitem(last=False)
                self._unregister(self._by_block[block])
            self._ref[block] = 1
            blocks.append(block)
        return True

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to every block of `blocks` and empty it. A block nobody holds any more
        stays cached if registered; a sequence's blocks are released tail first, so its tail is
        evicted before the head that other prompts are likelier to share."""
        for block in reversed(blocks):
            self._ref[block] -= 1
            if self._ref[block] == 0:
                if block in self._by_block:
                    self._lru[block] = None
                else:
                    self._free.append(block)
        blocks.clear()

    def shrink(self, blocks: list[int], tokens: int) -> None:
        """Give back the blocks of `blocks` past those that hold `tokens` tokens (a speculative rollback)."""
        keep = self.blocks_for(tokens)
        if len(blocks) > keep:
            tail = blocks[keep:]
            del blocks[keep:]
            self.free(tail)

    # --- the prefix cache -----------------------------------------------------------------------

    def match(self, chain: PrefixChain, ids: list[int], max_blocks: int) -> list[Registration]:
        """The registrations of the longest cached prefix of ids, at most max_blocks whole blocks
        (changes nothing). Each hit is verified: its token ids and its parent's registration."""
        if not self.prefix_caching:
            return []
        bs = self.block_size
        chain.extend(ids[: max_blocks * bs], bs, self.digest)
        hits: list[Registration] = []
        for i in range(min(max_blocks, len(chain.digests))):
            reg = self._by_digest.get(chain.digests[i])
            parent = hits[-1].serial if hits else chain.root
            if reg is None or reg.parent != parent or reg.tokens != tuple(ids[i * bs : (i + 1) * bs]):
                break
            hits.append(reg)
        return hits

    def can_take(self, hits: list[Registration], more: int) -> bool:
        """Whether take(hits) and then `more` fresh blocks fit (hits that are cached free stop being free)."""
        return more <= self.num_free - sum(1 for h in hits if self._ref[h.block] == 0)

    def take(self, hits: list[Registration], chain: PrefixChain) -> list[int]:
        """Reference the blocks of `hits` (from match) for a sequence; they become its first blocks."""
        for h in hits:
            if self._ref[h.block] == 0:
                del self._lru[h.block]
            self._ref[h.block] += 1
        chain.serials = [h.serial for h in hits]
        return [h.block for h in hits]

    def register(self, chain: PrefixChain, ids: list[int], blocks: list[int], computed: int) -> None:
        """Register a sequence's full blocks whose k/v are now computed (the first `computed` tokens of
        ids, in `blocks`). A block equal to one already registered stays private (the sequence's chain
        points at the registered one); a stale or colliding entry under the same digest is replaced."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        full = computed // bs
        if len(chain.serials) >= full:
            return
        chain.extend(ids[: full * bs], bs, self.digest)
        for i in range(len(chain.serials), full):
            tokens, parent = tuple(ids[i * bs : (i + 1) * bs]), chain.parent(i)
            reg = self._by_digest.get(chain.digests[i])
            if reg is None or reg.tokens != tokens or reg.parent != parent:
                if reg is not None:
                    self._unregister(reg)
                self._serials += 1
                reg = Registration(blocks[i], chain.digests[i], tokens, parent, self._serials)
                self._by_digest[reg.digest] = reg
                self._by_block[reg.block] = reg
            chain.serials.append(reg.serial)

    def _unregister(self, reg: Registration) -> None:
        """Forget a registration; its block, if free, becomes a never-cached free block."""
        del self._by_block[reg.block]
        if self._by_digest.get(reg.digest) is reg:
            del self._by_digest[reg.digest]
        if reg.block in self._lru:
            del self._lru[reg.block]
            self._free.append(reg.block)
