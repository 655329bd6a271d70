"""What one forward's logits do to the requests of a step: record prompt log-probabilities, sample a token or
verify the drafts, commit the new tokens (stop rules, detokenizing, log-probabilities), publish the request's
full KV blocks for reuse, and retire it when it ends. mmr1.Engine.step calls `advance` for every row it ran."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mmr1.engine.scheduler import ScheduledRow
from mmr1.engine.sampling import greedy_tokens, plain_greedy, sample_row, token_logprobs
from mmr1.engine.speculative import verify
from mmr1.engine.stopping import commit_token, end_ids

if TYPE_CHECKING:
    from mmr1.engine.engine import Engine


def sampled_tail(row: ScheduledRow) -> int:
    """How many of a row's last fed tokens need logits: its last token and each draft once the row's tokens are
    all in, none for a prompt chunk that doesn't finish the prompt -- or every fed token while a request that asks
    for prompt_logprobs computes its prompt."""
    if row.seq.params.prompt_logprobs is not None and row.seq.num_cached < len(row.seq.prompt):
        return row.num_new + len(row.drafts)
    return 1 + len(row.drafts) if row.completes else 0


def greedy_batch(rows: list[ScheduledRow], per_row: list[torch.Tensor]) -> list[int | None]:
    """The next token of every row that samples plain greedy this step, all in one argmax (None for the others,
    which sample_row handles)."""
    plain = [i for i, row in enumerate(rows) if row.completes and not row.drafts and not row.seq.finished
             and plain_greedy(row.seq.params, len(row.seq.output))]
    tokens: list[int | None] = [None] * len(rows)
    if len(plain) > 1:
        for i, token in zip(plain, greedy_tokens(per_row[i][-1] for i in plain)):
            tokens[i] = token
    return tokens


def record_prompt_logprobs(row: ScheduledRow, logits: torch.Tensor) -> None:
    """Fed prompt token p predicts prompt token p + 1 (logits hold every fed token here, see sampled_tail); each
    is recorded once, also when a preempted request's prompt is computed again."""
    seq, top = row.seq, row.seq.params.prompt_logprobs
    for i in range(row.num_new):
        target = seq.num_cached + i + 1
        if target < len(seq.prompt) and target == len(seq.prompt_logprobs):
            seq.prompt_logprobs.append(token_logprobs(logits[i], seq.prompt[target], top))


def advance(engine: "Engine", row: ScheduledRow, logits: torch.Tensor, in_pool: bool = True,
            greedy_token: int | None = None) -> bool:
    """Book this step's forward for one row, given the logits of its last sampled_tail(row) fed tokens; when its
    tokens are all in, sample / verify from the last 1 + len(drafts) of them. `in_pool`: the forward wrote its K/V
    to the pool (not only to the batch-1 fast path's copy), so full blocks can be published for reuse.
    `greedy_token`: this row's token when greedy_batch already took it. Returns whether the request produced
    tokens or finished."""
    seq, scheduler, stats = row.seq, engine.scheduler, engine.stats
    if seq.finished:
        return False
    if seq.params.prompt_logprobs is not None:
        record_prompt_logprobs(row, logits)
    complete = row.completes  # read before num_cached moves: it is computed from it
    seq.num_cached += row.num_new
    if not complete:
        if in_pool:
            scheduler.register_cached(seq, seq.num_cached)
        return False  # a prompt chunk: nothing to sample yet
    logits = logits[len(logits) - 1 - len(row.drafts):]  # (1 + len(drafts), V)
    ends = end_ids(seq.params, engine.eos_id)
    if row.drafts:
        context = seq.tokens
        new, accepted = verify(logits, row.drafts, seq.params,
                               context, seq.generator, row.draft_probs, len(seq.prompt), ends)
        stats["drafted"] += len(row.drafts)
        if seq.draft_length is not None:
            seq.draft_length.record(len(row.drafts), accepted)
        seq.num_cached += accepted  # the accepted drafts' K/V are already in the cache
        if engine.draft is not None:
            engine.draft.rollback(seq, len(context) + min(accepted, len(row.drafts) - 1))
    else:
        new = [greedy_token if greedy_token is not None
               else sample_row(logits[0], seq.params, seq.tokens, seq.generator, len(seq.prompt), ends)]
    used = len(new)
    for j, token in enumerate(new):  # token j was chosen from logits[j]
        before = len(seq.output)
        done = commit_token(seq, token, ends, engine.tokenizer)
        if len(seq.output) > before:  # returned (a stop token is not, nor its logprobs)
            stats["generated_tokens"] += 1
            if seq.params.logprobs is not None:
                seq.logprobs.append(token_logprobs(logits[j], token, seq.params.logprobs))
        if done:
            used = j + 1
            break
    if row.drafts:  # drafts verified after a token that ended the request were never used
        stats["accepted"] += min(accepted, used)
    # A stop token verified together with accepted drafts has K/V in the cache but is not one of seq's tokens:
    # num_cached counts tokens of prompt + output only (Sequence), or publishing would hash tokens seq lacks.
    seq.num_cached = min(seq.num_cached, len(seq.prompt) + len(seq.output))
    if seq.finished:
        engine._retire(seq, in_pool)
    else:
        scheduler.trim(seq)
        if in_pool:
            scheduler.register_cached(seq, seq.num_cached)
    return True
