"""One request's state inside the engine, and what callers get back."""
from __future__ import annotations

import dataclasses
import enum
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from mmr1.engine.config import SamplingParams


class Status(enum.Enum):
    ENCODING = "encoding"  # modality inputs are in the encoder workers
    WAITING = "waiting"  # ready to be admitted (new, or preempted and to be recomputed)
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestOutput:
    id: int
    prompt_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str | None  # "length" | "stop" | "abort" | "error" (None while running)
    error: BaseException | None = None
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
    # SamplingParams.logprobs: per returned token {token id: log-probability} (it and the top-N alternatives)
    logprobs: list[dict[int, float]] | None = None
    # SamplingParams.prompt_logprobs: the same per prompt token; None for the first (nothing predicts it)
    prompt_logprobs: list[dict[int, float] | None] | None = None
    # SamplingParams.n > 1: every sample (each with its own id); the fields above are the first sample's
    samples: list["RequestOutput"] | None = None

    @property
    def latency(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time


@dataclass
class Sequence:
    id: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    status: Status = Status.WAITING
    output: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)  # one per output token, when asked for
    prompt_logprobs: list[dict[int, float] | None] = field(default_factory=lambda: [None])  # one per prompt token
    text: str | None = None
    finish_reason: str | None = None
    error: BaseException | None = None
    # KV state: tokens [0, num_cached) of prompt + output have K/V in `blocks`.
    blocks: list[int] = field(default_factory=list)
    num_cached: int = 0
    draft_blocks: list[int] = field(default_factory=list)
    # Prefix caching: None = not cacheable; else the modality key (mmr1.engine.prefix_cache) and the chain hashes
    # of the full blocks of `tokens` computed so far.
    cache_key: bytes | None = None
    block_hashes: list[bytes] = field(default_factory=list)
    draft_cached: int = 0
    draft_length: Any = None  # mmr1.engine.speculative.DraftLength under SpeculativeConfig.adaptive
    # Modality memory: fused tokens (1, T, dim) until admission, then per-layer cross-attention K/V.
    futures: dict[str, Future] | None = None
    draft_futures: dict[str, Future] | None = None
    cross_states: torch.Tensor | None = None
    draft_cross_states: torch.Tensor | None = None
    cross_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    draft_cross_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    raw_inputs: dict[str, Any] | None = None  # inline encoding: sources kept until admission
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None
    read: int = 0  # tokens already handed to a streaming reader
    num_preemptions: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def pending(self) -> int:
        """Tokens whose K/V are not cached yet: the whole prompt at first, one (the last sampled) when decoding."""
        return len(self.prompt) + len(self.output) - self.num_cached

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def finish(self, reason: str, error: BaseException | None = None) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.error = error
        self.finish_time = time.perf_counter()

    def result(self) -> RequestOutput:
        return RequestOutput(self.id, list(self.prompt), list(self.output), self.text, self.finish_reason,
                             self.error, self.arrival_time, self.first_token_time, self.finish_time,
                             list(self.logprobs) if self.params.logprobs is not None else None,
                             list(self.prompt_logprobs) if self.params.prompt_logprobs is not None else None)


def merge_samples(request_id: int, samples: list[RequestOutput]) -> RequestOutput:
    """The output of an n > 1 request: the first sample's fields under the request's id, every sample in
    `samples`; finished (finish_reason, finish_time) only once all are, the first error if any failed."""
    done = all(s.finish_reason is not None for s in samples)
    started = [s.first_token_time for s in samples if s.first_token_time is not None]
    return dataclasses.replace(
        samples[0], id=request_id, finish_reason=samples[0].finish_reason if done else None,
        error=next((s.error for s in samples if s.error is not None), None),
        first_token_time=min(started, default=None),
        finish_time=max(s.finish_time for s in samples) if done else None, samples=samples)
