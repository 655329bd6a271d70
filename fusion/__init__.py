from fusion.cross_attention import GatedCrossAttention
from fusion.projector import MLPProjector, PerceiverResampler, ProjectorConfig, build_projector
from fusion.queues import EncodedInput, ModalityQueues

__all__ = ["GatedCrossAttention", "MLPProjector", "PerceiverResampler", "ProjectorConfig", "build_projector",
           "EncodedInput", "ModalityQueues"]
