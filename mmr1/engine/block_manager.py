"""Fixed-size KV blocks: a free list plus per-sequence ownership, so leaks are detectable.

With prefix caching a full block whose K/V are in the pool can be registered under the hash of the tokens that led
to it (mmr1/engine/prefix_cache.py). Several sequences may then hold it at once (a shared prompt prefix), and when
the last one lets go it is kept, still registered, among the free blocks: a later request with the same prefix
takes it back instead of recomputing, and allocation evicts such blocks (least recently freed first) only when no
never-registered block is left.
"""
from __future__ import annotations

from collections import OrderedDict


class OutOfBlocks(RuntimeError):
    """allocate() asked for more blocks than are free: a scheduler bug, since it checks can_allocate first."""


class BlockAllocator:
    """Hands out block ids in [0, num_blocks). A block is held by one or more owners (sequence ids) or is free;
    a free block may still hold a registered prefix (evictable)."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"BlockAllocator: num_blocks={num_blocks} must be >= 1")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._owners: dict[int, set[int]] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free but registered; first = evicted first
        self._block_of: dict[bytes, int] = {}  # prefix hash -> block holding it
        self._hash_of: dict[int, bytes] = {}

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Registered blocks (held or evictable)."""
        return len(self._hash_of)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, owner: int, n: int) -> list[int]:
        if n > self.num_free:
            raise OutOfBlocks(f"need {n} KV blocks, {self.num_free} free of {self.num_blocks}")
        blocks = [self._take_free() for _ in range(n)]
        for b in blocks:
            self._owners[b] = {owner}
        return blocks

    def _take_free(self) -> int:
        if self._free:
            return self._free.pop()
        block, _ = self._evictable.popitem(last=False)  # its old prefix is overwritten: forget it
        del self._block_of[self._hash_of.pop(block)]
        return block

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
        # Reversed, so a sequence's later blocks are evicted before the prefix blocks more requests can share.
        for b in reversed(blocks):
            holders = self._owners.get(b)
            if holders is None or owner not in holders:
                raise RuntimeError(f"block {b} freed by {owner} but held by {sorted(holders or ())}")
            holders.remove(owner)
            if holders:
                continue
            del self._owners[b]
            if b in self._hash_of:
                self._evictable[b] = None
            else:
                self._free.append(b)

    # ---- prefix caching --------------------------------------------------------------------------------
    def register(self, block: int, prefix_hash: bytes) -> None:
        """Publish a held, full block's K/V under its prefix hash. A prefix already published (two requests
        computed it at once) keeps its first block; this one stays private and is freed as usual."""
        if prefix_hash in self._block_of or block in self._hash_of:
            return
        self._block_of[prefix_hash] = block
        self._hash_of[block] = prefix_hash

    def is_registered(self, block: int) -> bool:
        return block in self._hash_of

    def cached_prefix(self, hashes: list[bytes]) -> list[int]:
        """The blocks holding the longest run of `hashes` (a sequence's block hashes, in order) that is cached."""
        blocks = []
        for h in hashes:
            block = self._block_of.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def num_evictable(self, blocks: list[int]) -> int:
        """How many of these cached blocks are free now (sharing them takes them out of the free count)."""
        return sum(b in self._evictable for b in blocks)

    def share(self, owner: int, blocks: list[int]) -> None:
        """Hold cached blocks (from cached_prefix) for owner too; they must not be written by it."""
        for b in blocks:
            self._evictable.pop(b, None)
            self._owners.setdefault(b, set()).add(owner)

    # ---- checks --------------------------------------------------------------------------------------------
    def owners(self) -> set[int]:
        return set().union(*self._owners.values())

    def check_no_leaks(self, live: set[int] = frozenset()) -> None:
        """Raise if a block is held by anyone outside `live`, or the free lists and owner map disagree."""
        stray = self.owners() - set(live)
        if stray:
            raise RuntimeError(f"KV blocks leaked: held by finished/unknown sequences {sorted(stray)}")
        free = self._free + list(self._evictable)
        if (len(free) + len(self._owners) != self.num_blocks or len(set(free)) != len(free)
                or set(free) & set(self._owners) or any(not h for h in self._owners.values())):
            raise RuntimeError(f"block accounting broken: {len(self._free)} free + {len(self._evictable)} "
                               f"evictable + {len(self._owners)} held != {self.num_blocks}")


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)
