"""Iteration-level scheduling (continuous batching) over paged KV memory.

Every step: admit waiting requests while sequences and KV blocks allow; give each running sequence that is
decoding one token and the prefilling ones chunks of their prompt within the token budget (a speculating engine
adds drafts to the rows whose tokens are then all in); when a sequence needs a block and none is free, preempt the
newest running sequence (free its blocks, put it back at the head of the queue to be recomputed later: never
dropped).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from mmr1.engine.block_manager import BlockAllocator, blocks_for
from mmr1.engine.config import EngineConfig
from mmr1.engine.prefix_cache import extend_block_hashes
from mmr1.engine.sequence import Sequence, Status


class QueueFullError(RuntimeError):
    """The engine's waiting queue is full: the caller should retry later (HTTP 503 / back-pressure)."""


@dataclass
class ScheduledRow:
    seq: Sequence
    num_new: int  # committed tokens fed this step: tokens[num_cached : num_cached + num_new]
    drafts: list[int] = field(default_factory=list)  # speculative tokens fed after them (rows that complete)
    draft_probs: list | None = None  # the draft model's distribution for each draft (None: prompt lookup)

    @property
    def completes(self) -> bool:
        """After this step every committed token is cached, so its last logits give the next token."""
        return self.seq.num_cached + self.num_new == len(self.seq.prompt) + len(self.seq.output)


class Scheduler:
    def __init__(self, cfg: EngineConfig, allocator: BlockAllocator, draft_allocator: BlockAllocator | None = None):
        self.cfg = cfg
        self.allocator = allocator
        self.draft_allocator = draft_allocator  # the draft model's KV blocks (speculative decoding), if any
        self.waiting: deque[Sequence] = deque()  # ready for admission (encodings done), FIFO
        self.encoding: list[Sequence] = []  # modality inputs still in the encoder workers
        self.running: list[Sequence] = []  # admission order: the last is the newest (preempted first)
        self.num_preemptions = 0
        self.prefix_queried_tokens = self.prefix_hit_tokens = 0  # tokens admitted / found in the prefix cache

    @property
    def num_queued(self) -> int:
        return len(self.waiting) + len(self.encoding)

    def has_work(self) -> bool:
        return bool(self.waiting or self.encoding or self.running)

    def check_room(self, extra: int = 1) -> None:
        if self.num_queued + extra > self.cfg.max_waiting:
            raise QueueFullError(f"engine queue is full: {self.num_queued} requests waiting "
                                 f"(EngineConfig.max_waiting={self.cfg.max_waiting}); retry later")

    # ---- admission -----------------------------------------------------------------------------
    def admit(self) -> list[Sequence]:
        """Move waiting sequences to running while there is room; allocate the blocks of their known tokens."""
        if self.cfg.scheduling == "static" and self.running:
            return []  # static batching: the next batch starts when the whole current one is done
        admitted = []
        in_flight = self._blocks_in_flight() if self.waiting and self.cfg.enable_prefix_caching else set()
        while self.waiting and len(self.running) < self.cfg.max_batch:
            seq = self.waiting[0]
            hit = self._cached_prefix(seq)
            if self._waits_for(seq, hit, in_flight):
                break  # a running request is computing its next blocks: start from them a step or two later
            held = len(seq.blocks) + len(hit)
            need = blocks_for(len(seq.tokens) + 1, self.cfg.block_size) - held
            if not self.allocator.can_allocate(need + self.allocator.num_evictable(hit)):
                break  # FIFO: don't let later, smaller requests starve the head of the queue
            self.waiting.popleft()
            if hit:
                self.allocator.share(seq.id, hit)
                seq.blocks, seq.num_cached = hit, len(hit) * self.cfg.block_size
            seq.blocks += self.allocator.allocate(seq.id, blocks_for(len(seq.tokens), self.cfg.block_size) - held)
            self.prefix_queried_tokens += len(seq.tokens)
            self.prefix_hit_tokens += seq.num_cached
            in_flight |= self._pending_blocks(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks seq can start from: whole blocks of its tokens, leaving at least its last token to
        compute (its logits give the next token, and a shared block is never written). None while a request that
        asks for prompt_logprobs still needs them (they come from computing the prompt)."""
        if not self._may_reuse(seq):
            return []
        tokens, bs = seq.tokens, self.cfg.block_size
        hashes = extend_block_hashes(seq.block_hashes, tokens, bs, seq.cache_key)
        return self.allocator.cached_prefix(hashes[:(len(tokens) - 1) // bs])

    def _may_reuse(self, seq: Sequence) -> bool:
        if seq.cache_key is None or not self.cfg.enable_prefix_caching or seq.blocks:
            return False
        return seq.params.prompt_logprobs is None or len(seq.prompt_logprobs) == len(seq.prompt)

    def _pending_blocks(self, seq: Sequence) -> set[bytes]:
        """Hashes of the full blocks of seq's known tokens whose K/V it has yet to compute."""
        if seq.cache_key is None or seq.num_cached >= len(seq.tokens):
            return set()
        bs = self.cfg.block_size
        hashes = extend_block_hashes(seq.block_hashes, seq.tokens, bs, seq.cache_key)
        return set(hashes[seq.num_cached // bs:len(seq.tokens) // bs])

    def _blocks_in_flight(self) -> set[bytes]:
        return set().union(*(self._pending_blocks(seq) for seq in self.running))

    def _waits_for(self, seq: Sequence, hit: list[int], in_flight: set[bytes]) -> bool:
        """Whether seq's next uncached block is one a running request is computing right now (requests with a
        common prompt arriving together: the first computes the prefix, the others reuse it instead of each
        computing it again in the same step)."""
        if not in_flight or not self._may_reuse(seq):
            return False
        usable = (len(seq.tokens) - 1) // self.cfg.block_size
        return len(hit) < usable and seq.block_hashes[len(hit)] in in_flight

    def register_cached(self, seq: Sequence, num_in_pool: int) -> None:
        """Publish seq's full blocks whose K/V are in the pool (tokens [0, num_in_pool)) for later requests."""
        if seq.cache_key is None or not self.cfg.enable_prefix_caching:
            return
        bs = self.cfg.block_size
        full = min(num_in_pool, seq.num_cached) // bs
        if len(seq.block_hashes) < full:  # called every step: hash (and build seq.tokens) only for new blocks
            extend_block_hashes(seq.block_hashes, seq.tokens, bs, seq.cache_key, max_blocks=full)
        # From the newest full block back to the first one already published: the ones before it were published
        # (or found their prefix published by another block) in an earlier call, so a step costs only its new blocks.
        for i in range(full - 1, -1, -1):
            if self.allocator.is_registered(seq.blocks[i]):
                break
            self.allocator.register(seq.blocks[i], seq.block_hashes[i])

    # ---- one step's batch ------------------------------------------------------------------------
    def schedule(self) -> list[ScheduledRow]:
        """Decode rows first (one token each), then prefill chunks, within max_num_batched_tokens."""
        budget = self.cfg.max_num_batched_tokens
        rows: list[ScheduledRow] = []
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or seq.pending != 1:
                continue
            if not self._grow(seq, seq.num_cached + 1, rows):
                continue  # seq itself was preempted
            rows.append(ScheduledRow(seq, 1))
            budget -= 1
        for seq in self.running:
            if budget <= 0:
                break
            if seq.pending > 1:
                n = min(seq.pending, self.cfg.prefill_chunk, budget)
                rows.append(ScheduledRow(seq, n))
                budget -= n
        return rows

    def _grow(self, seq: Sequence, num_tokens: int, rows: list[ScheduledRow]) -> bool:
        """Make seq's blocks hold num_tokens, preempting the newest running sequences if needed."""
        need = blocks_for(num_tokens, self.cfg.block_size) - len(seq.blocks)
        while need > 0 and not self.allocator.can_allocate(need):
            victim = self.running[-1]
            self.preempt(victim)
            rows[:] = [r for r in rows if r.seq is not victim]
            if victim is seq:
                return False
        if need > 0:
            seq.blocks += self.allocator.allocate(seq.id, need)
        return True

    def try_reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Blocks for speculative tokens: only from free memory, never by preempting someone."""
        return self.allocator.grow(seq.id, seq.blocks, num_tokens, self.cfg.block_size)

    def trim(self, seq: Sequence) -> None:
        """Return blocks beyond what seq's cached tokens (+ the next one) need, e.g. after rejected drafts."""
        keep = blocks_for(seq.num_cached + 1, self.cfg.block_size)
        if len(seq.blocks) > keep:
            self.allocator.free(seq.id, seq.blocks[keep:])
            del seq.blocks[keep:]

    # ---- leaving the batch -----------------------------------------------------------------------
    def preempt(self, seq: Sequence) -> None:
        """Free seq's KV memory and queue it first for recomputation (its output so far is kept)."""
        self.running.remove(seq)
        self.release(seq)
        seq.num_cached = 0
        seq.draft_cached = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def release(self, seq: Sequence) -> None:
        if seq.blocks:
            self.allocator.free(seq.id, seq.blocks)
            seq.blocks = []
        if seq.draft_blocks and self.draft_allocator is not None:
            self.draft_allocator.free(seq.id, seq.draft_blocks)
            seq.draft_blocks = []

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of whichever queue holds it and free its memory (finish / abort)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.encoding:
            self.encoding.remove(seq)
        self.release(seq)
