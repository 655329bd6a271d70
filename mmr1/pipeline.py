"""Image/audio question answering from Python.

    qa = Pipeline.from_pretrained("runs/demo/export")
    qa("What color is the shape?", image="img.png")                       # -> "red"
    qa("How many beeps do you hear?", audio=(waveform, 44100))             # path, or (waveform, sample_rate)
    qa(["q1", "q2"], image=["a.png", "b.png"])                             # batch -> list[str]

The Pipeline is a thin front over `mmr1.Engine`: each modality's inputs are loaded, preprocessed and encoded in
that modality's worker (async modality queues) and the questions are decoded together by continuous batching
over the paged KV cache. Pass `engine_config=` (e.g. `load_profile("configs/profiles/low_latency.yaml")`) to tune,
and `draft=` (an exported draft directory, e.g. `runs/demo_draft/export`) for speculative decoding.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from data_pipelines.errors import InputError
from mmr1.engine import Engine, EngineConfig, SamplingParams, SpeculativeConfig
from mmr1.model import MultimodalR1, foreign_tokens_hint
from mmr1.tokenizer import R1Tokenizer


class Pipeline:
    def __init__(self, model: MultimodalR1, tokenizer: R1Tokenizer, *, max_batch: int = 16,
                 engine_config: EngineConfig | None = None, draft: MultimodalR1 | None = None):
        """draft: a smaller model sharing the tokenizer for speculative decoding (configs/demo_draft.yaml); the
        engine drafts with it (SpeculativeConfig("draft") unless `engine_config.speculative` says otherwise)."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        config = engine_config or EngineConfig(encoder_max_batch=max_batch)
        if draft is not None and config.speculative is None:
            config = dataclasses.replace(config, speculative=SpeculativeConfig("draft"))
        self.engine = Engine(model, tokenizer, config, draft=draft)

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, device: str = "cpu", draft: str | Path | None = None,
                        **kwargs: Any) -> "Pipeline":
        """draft: an exported draft model directory (mmr1 export), loaded onto the same device."""
        model, tokenizer = MultimodalR1.from_pretrained(directory, map_location=device)
        draft_model = MultimodalR1.from_pretrained(draft, map_location=device)[0] if draft is not None else None
        return cls(model, tokenizer, draft=draft_model, **kwargs)

    def close(self) -> None:
        """Stop the engine's encoder workers now (a Pipeline dropped without it stops them when collected)."""
        self.engine.close()

    def __call__(self, question: str | Sequence[str], *, max_new_tokens: int = 16, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None, sampling: SamplingParams | None = None,
                 **inputs: Any) -> str | list[str] | list[list[str]]:
        """Answer one question (-> str) or a list of questions (-> list[str]).

        Keyword inputs are modality keys of the model (`image=`, `audio=`, or a plug-in's key). For a batch each
        is a list aligned with the questions (None where an item lacks that modality). `sampling` (a full
        SamplingParams: penalties, min_p, stop strings, ...) replaces the sampling keywords; with its `n` > 1 each
        answer is a list of n sampled strings.
        """
        batched = not isinstance(question, str)
        questions = list(question) if batched else [question]
        per_item = self._split_inputs(inputs, len(questions), batched)
        if sampling is None:
            sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                      top_k=top_k, seed=seed)
        answers = self._answer(questions, per_item, sampling)
        return answers if batched else answers[0]

    def score(self, question: str, answers: Sequence[str], **inputs: Any) -> dict[str, float]:
        """Log-probability of each candidate answer (its tokens and `<eos>`, as training formats them) given the
        question and the inputs: multiple-choice evaluation. Each candidate is one engine request that reads its
        prompt_logprobs; an input given as a file is encoded once for all of them (the engine's encoding cache)."""
        inputs = self._split_inputs(inputs, 1, batched=False)[0]
        present = [m for m in self.model.modalities if m in inputs]
        examples = [self.tokenizer.encode_example(question, answer, present) for answer in answers]
        params = SamplingParams(max_new_tokens=1, prompt_logprobs=0, ignore_eos=True)
        outputs = self._run([{"prompt": ids, **inputs} for ids, _ in examples], params)
        return {answer: sum(out.prompt_logprobs[p][ids[p]] for p, label in enumerate(labels) if label >= 0)
                for answer, (ids, labels), out in zip(answers, examples, outputs)}

    def _split_inputs(self, inputs: dict[str, Any], n: int, batched: bool) -> list[dict[str, Any]]:
        unknown = sorted(set(inputs) - set(self.model.modalities))
        if unknown:
            raise TypeError(f"unknown input(s) {unknown}: this model takes {self.model.modalities}"
                            + foreign_tokens_hint(self.model.config.backbone, self.model.modalities,
                                                 self.model.config.token_source))
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

    def _answer(self, questions: list[str], per_item: list[dict[str, Any]], params: SamplingParams) -> list[str]:
        # Each request gets its own generator seeded with params.seed: a question's sample doesn't depend on the batch.
        outputs = self._run([{"prompt": q, **inputs} for q, inputs in zip(questions, per_item)], params)
        return [out.text if out.samples is None else [s.text for s in out.samples] for out in outputs]

    def _run(self, requests: list[dict[str, Any]], params: SamplingParams) -> list:
        outputs = self.engine.generate(requests, params)
        for out in outputs:  # the first bad input, naming its batch item
            if out.error is not None:
                raise out.error
        return outputs


__all__ = ["Pipeline", "InputError"]
