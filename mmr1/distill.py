"""Knowledge distillation from a trained mmr1 model: train a (smaller) student on the teacher's next-token
distributions as well as on the data.

The use this is made for: a speculative-decoding draft is only as good as its agreement with the target. Trained on
the data alone, a draft learns the data's distribution, and where the data is ambiguous (a count or a colour the
prompt does not determine) its argmax is a coin flip against the target's. Trained towards the target's own
distributions, it learns which choice the target makes there (DistillSpec, Zhou et al. 2023: token-level KL to the
target raises acceptance). The loss per supervised token is

    (1 - weight) * cross_entropy(student, data) + weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))

(Hinton et al.'s T^2 keeps the gradient scale independent of the temperature).

    model:
      distill: {teacher: runs/demo/export, weight: 0.5}    # configs/demo_draft.yaml

The teacher is an exported model directory (`mmr1 export`); it must share the student's tokenizer and read the same
image/audio inputs (equal processor settings), since both see the same batches. It is loaded when fitting starts,
frozen, kept out of the student's modules (so it is neither optimized nor saved in checkpoints or exports), and run
without gradients on every training batch; validation reports the student's own loss and accuracy.

With `modality_tokens: teacher` the student has no encoders: its cross-attention reads the teacher's modality
tokens (`backbone.cross_attn_memory_dim`: the teacher's dim), in training and, as a draft, in the engine, which
hands it the target's tokens instead of encoding each request's images and audio a second time (EAGLE's drafts
read their target's features likewise). Such a student runs only beside that teacher (or target): its export
records the teacher (`token_source`: its directory and the fingerprint of its encoders, projectors and modality
embeddings), and the engine warns when a draft's recorded fingerprint is not its target's.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mmr1.tokenizer import IGNORE_INDEX


@dataclasses.dataclass
class DistillConfig:
    teacher: str = ""  # an exported mmr1 model directory (config.json, model.safetensors, tokenizer.json)
    weight: float = 0.5  # share of the distillation term in the language-model loss, in [0, 1]
    temperature: float = 1.0
    # "own": the student encodes images/audio with its own encoders. "teacher": the student has no encoders and
    # its cross-attention reads the teacher's modality tokens (backbone.cross_attn_memory_dim = the teacher's dim),
    # so a speculative draft costs no second encoding of a request's inputs: the engine hands it the target's.
    modality_tokens: str = "own"

    def __post_init__(self) -> None:
        if self.modality_tokens not in ("own", "teacher"):
            raise ValueError(f"DistillConfig.modality_tokens must be 'own' or 'teacher', got {self.modality_tokens!r}")
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"DistillConfig.weight must be in [0, 1], got {self.weight}")
        if self.temperature <= 0:
            raise ValueError(f"DistillConfig.temperature must be > 0, got {self.temperature}")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      temperature: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """Mean (or with reduction="sum", the sum) over the supervised tokens (targets != IGNORE_INDEX) of
    T^2 * KL(p_teacher || p_student) at temperature T. logits (B, L, V), targets (B, L) aligned with them (the
    next-token targets). The sum lets data-parallel training divide by the global token count, as for the LM loss."""
    keep = targets != IGNORE_INDEX  # (B, L)
    if not keep.any():
        return student_logits.sum() * 0.0  # no supervised token: a zero that still belongs to the graph
    student = F.log_softmax(student_logits[keep].float() / temperature, dim=-1)  # (N, V)
    teacher = F.log_softmax(teacher_logits[keep].float() / temperature, dim=-1)
    kl = F.kl_div(student, teacher, reduction="sum", log_target=True)
    if reduction == "mean":
        kl = kl / keep.sum()
    elif reduction != "sum":
        raise ValueError(f"distillation_loss: reduction must be 'mean' or 'sum', got {reduction!r}")
    return kl * temperature ** 2


def teacher_config(cfg: DistillConfig) -> Any:
    """The teacher's MultimodalConfig, read from its exported config.json without loading its weights."""
    from mmr1.model import CONFIG_NAME, MultimodalConfig

    path = Path(cfg.teacher) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"distill.teacher: {path} is missing; the teacher must be an exported model "
                                f"directory (export it first: mmr1 export ...)")
    return MultimodalConfig.from_dict(json.loads(path.read_text()))


def check_student_reads_teacher_tokens(cfg: DistillConfig, student_config: Any) -> list[str]:
    """For modality_tokens="teacher": raise unless the student (a MultimodalConfig) can read the teacher's modality
    tokens; return the teacher's modality keys (the student's tokenizer needs their markers)."""
    teacher = teacher_config(cfg)
    backbone = student_config.backbone
    if student_config.encoders:
        raise ValueError(f"model.distill.modality_tokens=teacher: the student reads the teacher's modality tokens, so "
                         f"it has no encoders of its own; remove model.encoders ({sorted(student_config.encoders)})")
    if teacher.encoders and not backbone.cross_attn_layers:
        raise ValueError("model.distill.modality_tokens=teacher: the student has no cross_attn_layers to read the "
                         "teacher's modality tokens with; set model.backbone.cross_attn_layers")
    if teacher.encoders and backbone.memory_width != teacher.backbone.dim:
        raise ValueError(f"model.distill.modality_tokens=teacher: the teacher's modality tokens have width "
                         f"{teacher.backbone.dim} but the student's cross-attention reads width "
                         f"{backbone.memory_width}; set "
                         f"model.backbone.cross_attn_memory_dim: {teacher.backbone.dim}")
    return list(teacher.encoders)


class Teacher:
    """The frozen teacher of a distillation run. The LightningModule keeps it outside its module tree, so it is
    never optimized, moved by Lightning, or saved with the student; `placed_like` follows the student instead."""

    def __init__(self, cfg: DistillConfig, student: Any, student_tokenizer: Any):
        self.cfg = cfg
        self.model = load_teacher(cfg, student, student_tokenizer)

    def placed_like(self, student: torch.nn.Module) -> None:
        """Move the teacher to the student's device and its parameters' dtype (bf16-true: bf16)."""
        weight, own = next(self.model.parameters()), next(student.parameters())
        if weight.device != own.device or weight.dtype != own.dtype:
            self.model.to(device=own.device, dtype=own.dtype)

    def memory(self, batch: dict[str, Any], encode_absent: bool = False
               ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The teacher's modality tokens and mask for a batch, (B, T, teacher dim) and (B, T), without gradient."""
        with torch.no_grad():
            return self.model.encode_batch(batch.get("modalities") or {}, batch["input_ids"].shape[0],
                                           encode_absent=encode_absent)

    def logits(self, batch: dict[str, Any], memory: tuple | None = None) -> torch.Tensor:
        """(B, L, V) without gradient; `memory`: the teacher's modality tokens and mask when already computed."""
        with torch.no_grad():
            if memory is None:
                return self.model(batch["input_ids"], batch["attention_mask"], batch.get("modalities")).logits
            return self.model.backbone(batch["input_ids"], attention_mask=batch["attention_mask"],
                                       cross_states=memory[0], cross_mask=memory[1]).logits

    def token_source(self) -> Any:
        """What a student that reads this teacher's modality tokens records in its config."""
        from mmr1.model import TokenSource
        return TokenSource(model=str(self.cfg.teacher), fingerprint=self.model.modality_fingerprint())


def load_teacher(cfg: DistillConfig, student: Any, student_tokenizer: Any) -> torch.nn.Module:
    """The frozen teacher for `student` (a MultimodalR1), after checking that it can read the student's batches:
    the same tokenizer vocabulary and, for every modality the student encodes, equal processor settings."""
    from mmr1.model import MultimodalR1

    try:
        teacher, tokenizer = MultimodalR1.from_pretrained(Path(cfg.teacher))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"distill.teacher: {err} (export the teacher first: mmr1 export ...)") from None
    vocab = tokenizer.tok.get_vocab(with_added_tokens=True)
    if vocab != student_tokenizer.tok.get_vocab(with_added_tokens=True):
        raise ValueError(f"distill.teacher={cfg.teacher}: its tokenizer ({len(vocab)} tokens) differs from the "
                         f"student's ({student_tokenizer.vocab_size} tokens); a teacher must share the tokenizer")
    theirs = teacher.processors()
    for key, processor in student.processors().items():
        if key not in theirs:
            raise ValueError(f"distill.teacher={cfg.teacher}: the student encodes '{key}' but the teacher has no "
                             f"'{key}' encoder (it has {sorted(theirs)})")
        if type(theirs[key]) is not type(processor) or vars(theirs[key]) != vars(processor):
            raise ValueError(f"distill.teacher={cfg.teacher}: its '{key}' inputs are prepared differently "
                             f"({vars(theirs[key])}) from the student's ({vars(processor)}); both read the same "
                             f"batches, so their processor settings must be equal")
    teacher.eval().requires_grad_(False)
    return teacher
