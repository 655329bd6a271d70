"""Fixed-size KV blocks: a free list plus per-sequence ownership, so leaks are detectable."""
from __future__ import annotations


class OutOfBlocks(RuntimeError):
    """allocate() asked for more blocks than are free: a scheduler bug, since it checks can_allocate first."""


class BlockAllocator:
    """Hands out block ids in [0, num_blocks). Every block belongs to exactly one owner (a sequence id) or is free."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"BlockAllocator: num_blocks={num_blocks} must be >= 1")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._owner: dict[int, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, owner: int, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} KV blocks, {len(self._free)} free of {self.num_blocks}")
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self._owner[b] = owner
        return blocks

    def grow(self, owner: int, blocks: list[int], num_tokens: int, block_size: int) -> bool:
        """Extend `blocks` in place to hold num_tokens, from free memory only (never by preempting anyone); False,
        taking nothing, when too few blocks are free."""
        need = blocks_for(num_tokens, block_size) - len(blocks)
        if need <= 0:
            return True
        if not self.can_allocate(need):
            return False
        blocks += self.allocate(owner, need)
        return True

    def free(self, owner: int, blocks: list[int]) -> None:
        for b in blocks:
            if self._owner.get(b) != owner:
                raise RuntimeError(f"block {b} freed by {owner} but owned by {self._owner.get(b)}")
            del self._owner[b]
            self._free.append(b)

    def owners(self) -> set[int]:
        return set(self._owner.values())

    def check_no_leaks(self, live: set[int] = frozenset()) -> None:
        """Raise if a block is held by anyone outside `live`, or the free list and owner map disagree."""
        stray = self.owners() - set(live)
        if stray:
            raise RuntimeError(f"KV blocks leaked: held by finished/unknown sequences {sorted(stray)}")
        if len(self._free) + len(self._owner) != self.num_blocks or len(set(self._free)) != len(self._free):
            raise RuntimeError(f"block accounting broken: {len(self._free)} free + {len(self._owner)} owned "
                               f"!= {self.num_blocks}")


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)
