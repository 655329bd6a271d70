"""What a request needs besides KV memory before it runs: its image/audio encodings -- collected from the async
workers (fusion.queues.ModalityQueues) or, without them, encoded inline when it is admitted -- fused into modality
tokens, and those tokens' cross-attention K/V, computed once per request for the target and for a draft model."""
from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, wait
from typing import Any

from fusion.queues import ModalityQueues
from mmr1.backbone import R1Model
from mmr1.engine.prefix_cache import modality_key
from mmr1.engine.runner import cross_kv_for, encode_inline, fuse_one
from mmr1.engine.scheduler import Scheduler
from mmr1.engine.sequence import Sequence, Status


def collect_encoded(scheduler: Scheduler, multimodal: Any, draft_multimodal: Any) -> None:
    """Queue for admission every encoding request whose encodings (and its draft's) are all done, fused into its
    modality tokens; one whose inputs failed to encode finishes with that error (the others go on)."""
    for seq in list(scheduler.encoding):
        futures = list(seq.futures.values()) + list((seq.draft_futures or {}).values())
        if not all(f.done() for f in futures):
            continue
        scheduler.encoding.remove(seq)
        try:
            seq.cross_states = fuse_one(multimodal.modalities, ModalityQueues.gather(seq.futures))
            if seq.draft_futures:
                seq.draft_cross_states = fuse_one(draft_multimodal.modalities, ModalityQueues.gather(seq.draft_futures))
        except Exception as err:  # a bad input fails its own request only
            seq.finish("error", err)
            continue
        seq.futures = seq.draft_futures = None
        seq.cache_key = modality_key(seq.cross_states)
        seq.status = Status.WAITING
        scheduler.waiting.append(seq)


def wait_for_encoders(scheduler: Scheduler, timeout: float = 0.05) -> None:
    """Block until one pending encoding finishes (or `timeout` s): a step with nothing to run waits here."""
    pending = [f for s in scheduler.encoding for f in s.futures.values() if not f.done()]
    if pending:
        wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)


def prepare_admitted(seq: Sequence, scheduler: Scheduler, backbone: R1Model, multimodal: Any,
                     draft_backbone: R1Model | None, draft_multimodal: Any) -> None:
    """Modality memory once per request, when it is admitted: inline encoding (if the workers did not encode it)
    and the cross-attention K/V. A request whose inputs fail to encode leaves the batch with that error."""
    if seq.raw_inputs is not None:
        inputs, item = seq.raw_inputs
        seq.raw_inputs = None
        try:
            seq.cross_states = fuse_one(multimodal.modalities, encode_inline(multimodal, inputs, item))
            if draft_multimodal is not None:
                seq.draft_cross_states = fuse_one(draft_multimodal.modalities,
                                                  encode_inline(draft_multimodal, inputs, item))
        except Exception as err:
            scheduler.remove(seq)
            seq.finish("error", err)
            return
    if seq.cross_kv is None:
        seq.cross_kv = cross_kv_for(backbone, seq.cross_states)
        if draft_backbone is not None:
            memory = seq.draft_cross_states if draft_multimodal is not None else seq.cross_states
            seq.draft_cross_kv = cross_kv_for(draft_backbone, memory)
