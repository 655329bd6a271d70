"""Tokenizer (HF `tokenizers` BPE) and the one chat format of mmr1.

Prompt format (documented in the README), one sequence per example:

    <bos><user><image><audio> What color is the shape?<assistant> red<eos>

Modality markers (`<image>`, `<audio>`, or `<name>` for a plug-in modality) follow `<user>` in the order
the model's encoders are configured, one per modality the example carries. The loss covers the answer
tokens and the closing `<eos>` only. Text-only records are `<bos> text<eos>` with loss on every token
after `<bos>`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

IGNORE_INDEX = -100
BOS, EOS, PAD, USER, ASSISTANT = "<bos>", "<eos>", "<pad>", "<user>", "<assistant>"
BASE_SPECIAL_TOKENS = [PAD, BOS, EOS, USER, ASSISTANT, "<image>", "<audio>"]


def modality_marker(modality: str) -> str:
    return f"<{modality}>"


class R1Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` that knows mmr1's special tokens and chat format."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        missing = [t for t in (PAD, BOS, EOS, USER, ASSISTANT) if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks mmr1's special tokens {missing}; train one with R1Tokenizer.train "
                             "or add them with add_special_tokens")
        self.pad_id = tokenizer.token_to_id(PAD)
        self.bos_id = tokenizer.token_to_id(BOS)
        self.eos_id = tokenizer.token_to_id(EOS)
        self.user_id = tokenizer.token_to_id(USER)
        self.assistant_id = tokenizer.token_to_id(ASSISTANT)

    # ---- construction / persistence -------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 512, modalities: Sequence[str] = ()) -> "R1Tokenizer":
        """Byte-level BPE trained on `texts`, with mmr1's special tokens (plus markers for `modalities`)."""
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        specials = BASE_SPECIAL_TOKENS + [modality_marker(m) for m in modalities
                                          if modality_marker(m) not in BASE_SPECIAL_TOKENS]
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_file(cls, path: str | Path) -> "R1Tokenizer":
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path} (expected a tokenizers tokenizer.json)")
        return cls(Tokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> None:
        self.tok.save(str(path))

    def add_modalities(self, modalities: Sequence[str]) -> None:
        """Make sure every modality has its marker token (a plug-in modality adds one at the vocab's end)."""
        new = [modality_marker(m) for m in modalities if self.tok.token_to_id(modality_marker(m)) is None]
        if new:
            self.tok.add_special_tokens(new)

    # ---- basic encode / decode ------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True).strip()

    def marker_id(self, modality: str) -> int:
        tid = self.tok.token_to_id(modality_marker(modality))
        if tid is None:
            raise KeyError(f"tokenizer has no marker token for modality {modality!r}; call add_modalities first")
        return tid

    # ---- chat format ----------------------------------------------------------------------------
    def encode_prompt(self, question: str, modalities: Sequence[str] = ()) -> list[int]:
        """`<bos><user>{markers} {question}<assistant>` — what generation starts from."""
        markers = [self.marker_id(m) for m in modalities]
        return [self.bos_id, self.user_id, *markers, *self.encode(" " + question.strip()), self.assistant_id]

    def encode_example(self, question: str, answer: str, modalities: Sequence[str] = ()) -> tuple[list[int], list[int]]:
        """(input_ids, labels) for a QA example; labels are IGNORE_INDEX except on the answer and `<eos>`."""
        prompt = self.encode_prompt(question, modalities)
        answer_ids = self.encode(" " + answer.strip()) + [self.eos_id]
        return prompt + answer_ids, [IGNORE_INDEX] * len(prompt) + answer_ids

    def encode_text(self, text: str) -> tuple[list[int], list[int]]:
        """(input_ids, labels) for a text-only pre-training record: loss on every token after `<bos>`."""
        ids = [self.bos_id, *self.encode(" " + text.strip()), self.eos_id]
        return ids, [IGNORE_INDEX] + ids[1:]
