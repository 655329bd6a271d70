"""Image/audio question answering from Python.

    qa = Pipeline.from_pretrained("runs/demo/export")
    qa("What color is the shape?", image="img.png")                       # -> "red"
    qa("How many beeps do you hear?", audio=(waveform, 44100))             # path, or (waveform, sample_rate)
    qa(["q1", "q2"], image=["a.png", "b.png"])                             # batch -> list[str]

Each modality's inputs are loaded, preprocessed and encoded in that modality's worker (async modality queues)
while the prompts are tokenized; generation then runs on the R1 backbone with its KV cache.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from data_pipelines.errors import InputError
from fusion.queues import EncodedInput, ModalityQueues
from mmr1.generation import generate
from mmr1.model import MultimodalR1
from mmr1.tokenizer import R1Tokenizer


def pad_encoded(items: list[EncodedInput]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-request encodings of one modality, right-padding to the longest: (N, T, D), (N, T)."""
    longest = max(e.tokens.shape[0] for e in items)
    tokens = items[0].tokens.new_zeros(len(items), longest, items[0].tokens.shape[1])
    mask = torch.zeros(len(items), longest, dtype=torch.bool, device=tokens.device)
    for i, e in enumerate(items):
        tokens[i, : e.tokens.shape[0]] = e.tokens
        mask[i, : e.mask.shape[0]] = e.mask
    return tokens, mask


class Pipeline:
    def __init__(self, model: MultimodalR1, tokenizer: R1Tokenizer, *, max_batch: int = 16):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.queues = ModalityQueues(model.processors(), model.encode_modality, max_batch=max_batch)

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, device: str = "cpu", **kwargs: Any) -> "Pipeline":
        model, tokenizer = MultimodalR1.from_pretrained(directory, map_location=device)
        return cls(model, tokenizer, **kwargs)

    def close(self) -> None:
        self.queues.close()

    def __del__(self) -> None:
        queues = getattr(self, "queues", None)
        if queues is not None:
            queues.close()

    def __call__(self, question: str | Sequence[str], *, max_new_tokens: int = 16, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None, **inputs: Any) -> str | list[str]:
        """Answer one question (-> str) or a list of questions (-> list[str]).

        Keyword inputs are modality keys of the model (`image=`, `audio=`, or a plug-in's key). For a batch each
        is a list aligned with the questions (None where an item lacks that modality).
        """
        batched = not isinstance(question, str)
        questions = list(question) if batched else [question]
        per_item = self._split_inputs(inputs, len(questions), batched)
        answers = self._answer(questions, per_item, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p, top_k=top_k, seed=seed)
        return answers if batched else answers[0]

    def _split_inputs(self, inputs: dict[str, Any], n: int, batched: bool) -> list[dict[str, Any]]:
        unknown = sorted(set(inputs) - set(self.model.modalities))
        if unknown:
            raise TypeError(f"unknown input(s) {unknown}: this model takes {self.model.modalities}")
        per_item: list[dict[str, Any]] = [{} for _ in range(n)]
        for key, value in inputs.items():
            if value is None:
                continue
            if batched:
                if not isinstance(value, (list, tuple)) or len(value) != n:
                    raise ValueError(f"{key}= must be a list with one entry per question ({n}), "
                                     f"got {type(value).__name__}")
                values = value
            else:
                values = [value]
            for i, v in enumerate(values):
                if v is not None:
                    per_item[i][key] = v
        return per_item

    @torch.inference_mode()
    def _answer(self, questions: list[str], per_item: list[dict[str, Any]], **sampling: Any) -> list[str]:
        futures = [self.queues.submit(inputs, item=i if len(questions) > 1 else None)
                   for i, inputs in enumerate(per_item)]
        order = self.model.modalities
        prompts = [self.tokenizer.encode_prompt(q, [m for m in order if m in inputs])
                   for q, inputs in zip(questions, per_item)]
        encoded: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        results = [self.queues.gather(f) for f in futures]  # raises the first bad input, naming its item
        for key in order:
            present = torch.tensor([key in r for r in results], dtype=torch.bool)
            if present.any():
                tokens, mask = pad_encoded([r[key] for r in results if key in r])
                encoded[key] = (tokens, mask, present)
        cross_states, cross_mask = self.model.fuse(encoded, len(questions))
        seed = sampling.pop("seed")
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        new_tokens = generate(self.model.backbone, prompts, cross_states=cross_states, cross_mask=cross_mask,
                              eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id, generator=generator,
                              **sampling)
        return [self.tokenizer.decode(t) for t in new_tokens]


__all__ = ["Pipeline", "InputError"]
