"""mmr1: multimodal Mixture-of-Experts language models — build, train, serve.

Heavy submodules load lazily so that `import fusion` / `import encoders` never drags in the whole stack.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "R1Config": "mmr1.config",
    "MoEConfig": "mmr1.config",
    "R1Tokenizer": "mmr1.tokenizer",
    "R1Model": "mmr1.backbone",
    "MultimodalR1": "mmr1.model",
    "MultimodalConfig": "mmr1.model",
    "Pipeline": "mmr1.pipeline",
    "Engine": "mmr1.engine",
    "EngineConfig": "mmr1.engine",
    "SamplingParams": "mmr1.engine",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmr1' has no attribute {name!r}")


__all__ = sorted(_LAZY)
