"""Config dataclasses of the inference engine: per-request sampling and the engine itself (plus YAML profiles).

Each is plain data (config_to_dict / config_from_dict); `load_profile("configs/profiles/low_latency.yaml")`
builds an EngineConfig from a YAML file whose top-level key is `engine`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from mmr1.config import config_from_dict


@dataclass
class SamplingParams:
    """How one request decodes. temperature 0 = greedy (top_k/top_p ignored)."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one (0 = off)
    repetition_penalty: float = 1.0  # CTRL-style: logits of already-seen tokens are divided (>0) / multiplied (<0)
    presence_penalty: float = 0.0  # OpenAI-style, over generated tokens: logit -= presence if the token occurred
    frequency_penalty: float = 0.0  # ... and -= frequency x its count
    min_tokens: int = 0  # eos, stop tokens and stop strings cannot end the request before this many tokens
    logprobs: Optional[int] = None  # per token: its log-probability and the top-N alternatives' (0 = only its own)
    prompt_logprobs: Optional[int] = None  # the same for each prompt token after the first (scoring a text)
    seed: Optional[int] = None  # per-request generator: same seed -> same sample, whatever else is batched
    stop_token_ids: list[int] = field(default_factory=list)  # finish when one is produced (it is not returned)
    stop: list[str] = field(default_factory=list)  # finish when the decoded text contains one (text is cut there)
    ignore_eos: bool = False
    n: int = 1  # samples of this prompt (their prompt KV computed once); seed s -> samples seeded s, s+1, ...

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"SamplingParams: n={self.n} must be >= 1")
        if self.max_new_tokens < 0:
            raise ValueError(f"SamplingParams: max_new_tokens={self.max_new_tokens} must be >= 0")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or not 0 <= self.min_p <= 1:
            raise ValueError(f"SamplingParams: need temperature >= 0, 0 < top_p <= 1, top_k >= 0, 0 <= min_p <= 1; "
                             f"got temperature={self.temperature}, top_p={self.top_p}, top_k={self.top_k}, "
                             f"min_p={self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"SamplingParams: repetition_penalty={self.repetition_penalty} must be > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"SamplingParams: {name}={getattr(self, name)} must be in [-2, 2] (OpenAI's range)")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise ValueError(f"SamplingParams: min_tokens={self.min_tokens} must be in [0, max_new_tokens="
                             f"{self.max_new_tokens}]")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"SamplingParams: {name}={getattr(self, name)} must be >= 0 (or None)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class SpeculativeConfig:
    """Speculative decoding: a draft proposes up to `num_draft_tokens` per request each step, the target verifies them
    in the same forward as the rest of the batch; a request's first drafts ride on its prompt's (last) forward."""

    method: str = "ngram"  # "ngram" (prompt lookup, no model) | "draft" (a smaller mmr1 model, Engine(draft=...))
    num_draft_tokens: int = 4
    ngram_max: int = 3  # prompt lookup: longest suffix n-gram searched for in the request's own tokens
    ngram_min: int = 1
    # Each request's draft length follows its acceptance (mmr1.engine.speculative.DraftLength): it grows back to
    # num_draft_tokens while every draft is accepted, shrinks after rejections, and drafting pauses (for 4, 8, ...
    # up to 64 steps) while even one-token drafts are rejected -- drafts nobody accepts cost a forward each.
    # False: always num_draft_tokens (room permitting).
    adaptive: bool = True

    def __post_init__(self) -> None:
        if self.method not in ("ngram", "draft"):
            raise ValueError(f"SpeculativeConfig: method must be 'ngram' or 'draft', got {self.method!r}")
        if self.num_draft_tokens < 1 or not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"SpeculativeConfig: need num_draft_tokens >= 1 and 1 <= ngram_min <= ngram_max, got "
                             f"{self.num_draft_tokens}, {self.ngram_min}, {self.ngram_max}")


@dataclass
class EngineConfig:
    block_size: int = 16  # tokens per KV block
    num_blocks: Optional[int] = None  # KV blocks in the pool; None = enough for max_batch full-length sequences
    kv_cache_dtype: str = "model"  # "model" (the model's dtype) | "int8" (per-token per-head scales)
    max_batch: int = 32  # running sequences per step
    max_num_batched_tokens: int = 512  # tokens per forward (decode tokens + prefill chunks)
    prefill_chunk: int = 256  # longest piece of one prompt per step (chunked prefill)
    max_waiting: int = 1024  # waiting + encoding requests; add_request raises QueueFullError beyond
    scheduling: str = "continuous"  # "continuous" | "static" (admit a new batch only when the last one is done)
    async_encoding: bool = True  # image/audio load -> preprocess -> encode in ModalityQueues workers
    encoder_max_batch: int = 16
    # PyTorch threads of each async encoder worker. None: an equal share of this process's cores for the decoder
    # and each worker, at least 1. The workers encode beside the decoder: with PyTorch's default (every core each),
    # a 2-core machine ran 6 busy threads and answered the demo's image/audio questions 1.9x slower.
    encoder_threads: Optional[int] = None
    # CPU: while the workers have inputs to encode, a step runs on the threads they leave (the caller's PyTorch
    # thread count minus theirs, at least 1), then on all again (mmr1/engine/cores.py, encoder_threads.md). An engine
    # shares the cores as if it were alone in its process.
    share_cores_with_encoders: bool = True
    # PyTorch threads of the decoder's steps. None: the count of the thread that builds the engine (PyTorch's default
    # unless torch.set_num_threads changed it before), and one fewer (at least 1) on the asyncio fronts' step thread,
    # beside which the event loop runs. Steps take it whichever thread runs them (a web framework's worker thread,
    # say) and restore that thread's own count after: PyTorch starts a new thread on the count last set in any thread
    # (an encoder worker's, 1 of 2 cores here).
    decoder_threads: Optional[int] = None
    speculative: Optional[SpeculativeConfig] = None
    # torch.compile the batch-1 decode step (gpt-fast style; full-attention models in model-dtype KV). The first
    # decode step compiles (seconds to tens of seconds on CPU); later ones run the fused graph. With `speculative`,
    # verification steps and the draft model's steps are compiled too (models whose MoE layers allow it).
    compile_decode: bool = False
    # One forward per step over every row's tokens packed end to end (mmr1/engine/packed.py) where the model allows
    # it (all self-attention layers full causal); False runs padded groups, the path sliding/hybrid models take.
    packed_steps: bool = True
    # Reuse the KV blocks of a prompt prefix another request computed (same tokens, same image/audio): vLLM's
    # automatic prefix caching (mmr1/engine/prefix_cache.py). Finished requests' blocks stay cached until evicted.
    enable_prefix_caching: bool = True
    # CPU, bf16: run the backbone's (and draft's) nn.Linear products on weights reordered once into oneDNN's blocked
    # layout (mmr1/engine/prepack.py) instead of in every call. Costs a copy of those weights; 1.16-1.25x on the
    # development machine (benchmarks/results/prepack.md). Products of a few rows still take the few-row loop when
    # cpu_few_row_linears is on. Not with compile_decode (inductor packs its own).
    cpu_prepacked_weights: bool = False
    # CPU, fp32: nn.Linear products of up to 8 rows (batch-1 decode, speculative verification, small batches) run
    # on an AVX-512 loop that streams each weight once (mmr1/engine/cpu_linear.py) instead of MKL's sgemm: all of
    # them for a model larger than the last-level cache, only those of 2-8 rows (large weights) for one that fits;
    # 2x for one row read from memory on the development machine (benchmarks/results/cpu_linear.md). bf16 (CPUs
    # with AVX512_BF16): products of up to 4 rows, on vdpbf16ps instead of oneDNN. Off, or without AVX-512: torch's.
    cpu_few_row_linears: bool = True

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in ("model", "int8"):
            raise ValueError(f"EngineConfig: kv_cache_dtype must be 'model' or 'int8', got {self.kv_cache_dtype!r}")
        if self.scheduling not in ("continuous", "static"):
            raise ValueError(f"EngineConfig: scheduling must be 'continuous' or 'static', got {self.scheduling!r}")
        for name in ("block_size", "max_batch", "max_num_batched_tokens", "prefill_chunk", "max_waiting",
                     "encoder_max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig: {name}={getattr(self, name)} must be >= 1")
        for name in ("encoder_threads", "decoder_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"EngineConfig: {name}={getattr(self, name)} must be >= 1 (or None)")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"EngineConfig: num_blocks={self.num_blocks} must be >= 1 (or None)")
        if self.cpu_prepacked_weights and self.compile_decode:
            raise ValueError("EngineConfig: cpu_prepacked_weights and compile_decode exclude each other (a compiled "
                             "decode step packs its weights itself); choose one")
        if self.max_num_batched_tokens < self.max_batch:
            raise ValueError(f"EngineConfig: max_num_batched_tokens={self.max_num_batched_tokens} must be >= "
                             f"max_batch={self.max_batch} so every running sequence can decode each step")


def load_profile(path: str | Path) -> EngineConfig:
    """An engine profile YAML (`engine: {...}`) -> EngineConfig; unknown keys are an error naming them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"engine profile not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or set(data) != {"engine"}:
        raise ValueError(f"{path}: an engine profile has exactly one top-level key 'engine', got {sorted(data)}")
    return config_from_dict(EngineConfig, data["engine"] or {})
