"""The request side of `mmr1 serve`: OpenAI request bodies, their sampling fields -> SamplingParams, and a chat
request's messages -> one question plus its image / audio, decoded in memory.

mmr1 models answer one question about their inputs, so a chat request carries exactly one user message (system
and developer messages are accepted and ignored: the models were never trained with one). Its content is a string
or a list of parts: text (joined with spaces), image_url and input_audio / audio_url, at most one per modality.
Media come as base64 (data: URLs or input_audio.data) or as local files (file:// URLs or absolute paths, read by
the server process); http(s) URLs are refused: the server fetches nothing from the network.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import warnings
from typing import Any
from urllib.parse import unquote, urlparse

import soundfile as sf
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mmr1.engine import SamplingParams

MAX_LOGPROBS = 20  # alternatives per token (vLLM's default cap)


class RequestError(Exception):
    """A request the server refuses: the HTTP status and OpenAI's error type; `param` names the field."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None):
        super().__init__(message)
        self.status, self.type, self.param = status, type, param


# ---- request bodies ----------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: bool = False


class _Body(BaseModel):
    """What completions and chat completions share: the model and the sampling fields (OpenAI's, plus vLLM's
    top_k / min_p / repetition_penalty / stop_token_ids / min_tokens / ignore_eos). Unknown fields are ignored,
    as vLLM does; null means "not given"."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = 1.0  # OpenAI's default: pass 0 for greedy decoding
    top_p: float = 1.0
    top_k: int = Field(0, ge=-1)  # 0 or -1 = off
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] = []
    stop_token_ids: list[int] = []
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)  # samples of the prompt: choices[0..n-1]
    logit_bias: dict[str, float] = {}

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    def refuse_unsupported(self) -> None:
        """Fields mmr1 accepts only at their neutral value: better a clear 400 than silently ignoring them."""
        for name, neutral in self._neutral().items():
            if getattr(self, name) != neutral:
                raise RequestError(f"{name}={getattr(self, name)!r} is not supported by mmr1 serve "
                                   f"(only {neutral!r})", param=name)

    def _neutral(self) -> dict[str, Any]:
        return {"logit_bias": {}}

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Body):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int = 1

    def _neutral(self) -> dict[str, Any]:
        return {**super()._neutral(), "echo": False, "suffix": None, "best_of": 1}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] = []
    response_format: dict[str, Any] = {"type": "text"}

    def _neutral(self) -> dict[str, Any]:
        return {**super()._neutral(), "tools": [], "response_format": {"type": "text"}}


# ---- sampling ------------------------------------------------------------------------------------------------
def sampling_params(body: _Body, max_new_tokens: int, logprobs: int | None) -> SamplingParams:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop)
    try:
        return SamplingParams(max_new_tokens=max_new_tokens, temperature=body.temperature, top_p=body.top_p,
                              top_k=max(body.top_k, 0), min_p=body.min_p, seed=body.seed, stop=stop,
                              stop_token_ids=list(body.stop_token_ids), presence_penalty=body.presence_penalty,
                              frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty,
                              min_tokens=body.min_tokens, ignore_eos=body.ignore_eos,
                              logprobs=logprobs, n=body.n)
    except ValueError as err:
        raise RequestError(str(err)) from None


# ---- completions: the prompt ----------------------------------------------------------------------------------
def completion_prompt_ids(prompt: Any, tokenizer: Any) -> list[int]:
    """Raw text continuation (no chat format), `<bos>` first: special tokens written in the text (`<user>`,
    `<assistant>`, ...) are recognised, so a client can write mmr1's prompt format itself. Token ids pass as they
    are. One prompt per request."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise RequestError(f"prompt: {len(prompt)} prompts given; mmr1 serve takes one prompt per request",
                               param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, list):
        if not prompt:
            raise RequestError("prompt: the token list is empty", param="prompt")
        return [int(t) for t in prompt]
    ids = tokenizer.encode(prompt)
    return ids if ids[:1] == [tokenizer.bos_id] else [tokenizer.bos_id, *ids]


# ---- chat: the question and its media -------------------------------------------------------------------------
def chat_question(messages: list[ChatMessage]) -> tuple[str, dict[str, Any]]:
    """The one user message -> (its text, {"image": PIL image or path, "audio": (waveform, rate) or path})."""
    turns = [(i, m) for i, m in enumerate(messages) if m.role not in ("system", "developer")]
    if len(turns) != 1 or turns[0][1].role != "user":
        roles = [m.role for m in messages]
        raise RequestError(f"messages: mmr1 models answer a single question, so send exactly one user message "
                           f"(system messages are ignored, earlier turns are not supported); got roles {roles}",
                           param="messages")
    index, message = turns[0]
    where = f"messages[{index}].content"
    if isinstance(message.content, str):
        return message.content, {}
    texts: list[str] = []
    inputs: dict[str, Any] = {}
    for j, part in enumerate(message.content or []):
        _read_part(part, f"{where}[{j}]", texts, inputs)
    if not texts:
        raise RequestError(f"{where}: the user message has no text; ask a question", param=where)
    return " ".join(texts), inputs


def _read_part(part: dict[str, Any], where: str, texts: list[str], inputs: dict[str, Any]) -> None:
    kind = part.get("type")
    if kind == "text":
        texts.append(_field(part, "text", where, str))
        return
    if kind == "image_url":
        modality, source = "image", _media_url(part, "image_url", where, _image_from_bytes)
    elif kind == "audio_url":
        modality, source = "audio", _media_url(part, "audio_url", where, _audio_from_bytes)
    elif kind == "input_audio":
        audio = _field(part, "input_audio", where, dict)
        data = _field(audio, "data", f"{where}.input_audio", str)
        modality, source = "audio", _audio_from_bytes(_base64(data, f"{where}.input_audio.data"),
                                                      f"{where}.input_audio.data")
    else:
        raise RequestError(f"{where}.type={kind!r} is not supported (text, image_url, input_audio, audio_url)",
                           param=f"{where}.type")
    if modality in inputs:
        raise RequestError(f"{where}: a second {modality}; mmr1 models take one {modality} per question",
                           param=where)
    inputs[modality] = source


def _field(obj: dict[str, Any], name: str, where: str, kind: type) -> Any:
    value = obj.get(name)
    if not isinstance(value, kind):
        raise RequestError(f"{where}.{name}: expected a {kind.__name__}, got {type(value).__name__}",
                           param=f"{where}.{name}")
    return value


def _media_url(part: dict[str, Any], key: str, where: str, from_bytes: Any) -> Any:
    """{"url": ...} (or the URL itself as a string) -> an in-memory image / waveform, or a local path."""
    value = part.get(key)
    url = value.get("url") if isinstance(value, dict) else value
    where = f"{where}.{key}.url" if isinstance(value, dict) else f"{where}.{key}"
    if not isinstance(url, str):
        raise RequestError(f"{where}: expected a URL string, got {type(url).__name__}", param=where)
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise RequestError(f"{where}: expected a base64 data URL (data:<type>;base64,<data>)", param=where)
        return from_bytes(_base64(payload, where), where)
    if url.startswith(("http://", "https://")):
        raise RequestError(f"{where}: http(s) URLs are not supported (mmr1 serve fetches nothing from the "
                           f"network); send the file inline as a base64 data: URL", param=where)
    path = unquote(urlparse(url).path) if url.startswith("file://") else url
    if not os.path.isabs(path):
        raise RequestError(f"{where}: expected a data: URL, a file:// URL or an absolute path, got {url[:60]!r}",
                           param=where)
    return path  # the engine checks that it exists (-> 400 naming the file)


def _base64(text: str, where: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{where}: invalid base64 data", param=where) from None


def _image_from_bytes(data: bytes, where: str) -> Image.Image:
    """Opened lazily: the image processor checks the size from the header before decoding the pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the processor's own cap decides
            return Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as err:
        raise RequestError(f"{where}: not an image Pillow can read (PNG, JPEG, WebP, ...): {err}",
                           param=where) from None


def _audio_from_bytes(data: bytes, where: str) -> tuple[Any, int]:
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)  # (frames, channels)
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        raise RequestError(f"{where}: not audio soundfile can read (WAV, FLAC, OGG, MP3, ...): {err}",
                           param=where) from None
    return samples.T, rate
