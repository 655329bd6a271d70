"""The mmr1 inference engine: continuous batching, paged (INT8) KV cache, speculative decoding, async encoders."""
from mmr1.engine.config import EngineConfig, SamplingParams, SpeculativeConfig, load_profile
from mmr1.engine.engine import Engine
from mmr1.engine.scheduler import QueueFullError
from mmr1.engine.sequence import RequestOutput

__all__ = ["Engine", "EngineConfig", "SamplingParams", "SpeculativeConfig", "QueueFullError", "RequestOutput",
           "load_profile"]
