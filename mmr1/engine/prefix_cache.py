"""Prefix caching keys (vLLM's automatic prefix caching, for a cross-attention model).

A full KV block is identified by a chain hash: the hash of its parent block's hash, the request's modality key and
the block's tokens. Two requests whose first n blocks hash alike have identical K/V there, so the second reuses
the first's blocks. The modality key is part of every hash because after a cross-attention layer a text token's
K/V depend on the request's image/audio tokens: the same question about two images shares nothing. The key is a
digest of the fused modality tokens themselves (what the cross-attention K/V are computed from), so the same
image sent twice hits the cache and anything that changes those tokens misses it.

SHA-256 rather than Python's hash(): a server shares this cache between users, and a crafted collision must not
hand one user's K/V to another's request.
"""
from __future__ import annotations

import hashlib
from array import array

import torch

TEXT_ONLY = b"text"  # the modality key of requests without image/audio memory


def modality_key(cross_states: torch.Tensor | None) -> bytes:
    """A digest of a request's fused modality tokens (T, dim) / (1, T, dim): equal tensors, equal keys."""
    if cross_states is None:
        return TEXT_ONLY
    t = cross_states.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{tuple(t.shape)}{t.dtype}".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.digest()


def extend_block_hashes(hashes: list[bytes], tokens: list[int], block_size: int, key: bytes,
                        max_blocks: int | None = None) -> list[bytes]:
    """Append the chain hashes of the full blocks of `tokens` (at most max_blocks in all) not hashed yet
    (committed tokens never change, so earlier hashes stay valid as a sequence grows); returns `hashes`."""
    full = len(tokens) // block_size
    for i in range(len(hashes), full if max_blocks is None else min(full, max_blocks)):
        block = array("q", tokens[i * block_size:(i + 1) * block_size]).tobytes()
        parent = hashes[i - 1] if i else key
        hashes.append(hashlib.sha256(parent + block).digest())
    return hashes
