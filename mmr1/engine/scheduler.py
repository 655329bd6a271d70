"""Iteration-level scheduling (continuous batching) over paged KV memory.

Every step: admit waiting requests while sequences and KV blocks allow; give each running sequence that is
decoding one token (plus its draft tokens when speculating) and the prefilling ones chunks of their prompt within
the token budget; when a sequence needs a block and none is free, preempt the newest running sequence (free its
blocks, put it back at the head of the queue to be recomputed later: never dropped).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from mmr1.engine.block_manager import BlockAllocator, blocks_for
from mmr1.engine.config import EngineConfig
from mmr1.engine.sequence import Sequence, Status


class QueueFullError(RuntimeError):
    """The engine's waiting queue is full: the caller should retry later (HTTP 503 / back-pressure)."""


@dataclass
class ScheduledRow:
    seq: Sequence
    num_new: int  # committed tokens fed this step: tokens[num_cached : num_cached + num_new]
    drafts: list[int] = field(default_factory=list)  # speculative tokens fed after them (decode rows only)
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
        while self.waiting and len(self.running) < self.cfg.max_batch:
            seq = self.waiting[0]
            need = blocks_for(len(seq.tokens) + 1, self.cfg.block_size) - len(seq.blocks)
            if not self.allocator.can_allocate(need):
                break  # FIFO: don't let later, smaller requests starve the head of the queue
            self.waiting.popleft()
            seq.blocks += self.allocator.allocate(seq.id, blocks_for(len(seq.tokens), self.cfg.block_size)
                                                  - len(seq.blocks))
            seq.status = Status.RUNNING
            self.running.append(seq)
            admitted.append(seq)
        return admitted

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
