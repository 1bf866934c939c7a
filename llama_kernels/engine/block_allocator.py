"""The KV-cache block pool: a free list of block ids, taken as sequences grow and given back when they end."""

from __future__ import annotations


class BlockAllocator:
    """Hands out the ids of num_blocks cache blocks of block_size tokens.

    Blocks are taken lowest id first (a freshly started engine fills the pool from block 0) and
    returned in any order; `used` counts the blocks currently handed out.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks  # blocks in the pool
        self.block_size = block_size  # tokens per block
        self._free = list(range(num_blocks - 1, -1, -1))  # free block ids; pop() takes the lowest first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold `tokens` tokens."""
        return -(-tokens // self.block_size)

    def grow(self, blocks: list[int], tokens: int) -> bool:
        """Append to `blocks` (a sequence's block list) until it holds `tokens` tokens; False (and
        `blocks` untouched) when the pool has too few free blocks."""
        need = self.blocks_for(tokens) - len(blocks)
        if need > len(self._free):
            return False
        blocks.extend(self._free.pop() for _ in range(max(need, 0)))
        return True

    def free(self, blocks: list[int]) -> None:
        """Give back every block of `blocks` and empty it."""
        self._free.extend(reversed(blocks))
        blocks.clear()

    def shrink(self, blocks: list[int], tokens: int) -> None:
        """Give back the blocks of `blocks` past those that hold `tokens` tokens (a speculative rollback)."""
        keep = self.blocks_for(tokens)
        if len(blocks) > keep:
            tail = blocks[keep:]
            del blocks[keep:]
            self.free(tail)
