"""`mmr1 serve`: an OpenAI-compatible HTTP server over mmr1.Engine (FastAPI + uvicorn, `pip install 'mmr1[serve]'`).

    mmr1 serve --model runs/demo/export --port 8000
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{"messages": [{"role": "user",
        "content": [{"type": "text", "text": "What color is the shape?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}], "temperature": 0}'

    app = build_app(Pipeline.from_pretrained(dir), model_name="demo")     # the ASGI app, for tests or your server

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with `stream`:
Server-Sent Events), GET /metrics (Engine.metrics() as JSON). Every request is one engine request: concurrent
requests are batched by the engine's continuous batching, and a streaming client that goes away aborts its
request. Errors have OpenAI's shape, {"error": {"message", "type", "param", "code"}} with code = the HTTP status:
400 bad input, 404 an unknown model name or route, 503 the engine's queue is full (retry later). docs/serving.md
has the details; mmr1/serve_requests.py reads the requests.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from data_pipelines.errors import InputError
from mmr1.engine import Engine, EngineConfig, QueueFullError, RequestOutput, SamplingParams
from mmr1.serve_requests import (ChatCompletionRequest, CompletionRequest, RequestError, chat_question,
                                 completion_prompt_ids, sampling_params)

log = logging.getLogger("mmr1.serve")
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the context left


class ServedModel:
    """The one model a server serves: its engine, tokenizer, name and context length, and how a request starts."""

    def __init__(self, engine: Engine, name: str):
        if engine.tokenizer is None:
            raise ValueError("mmr1 serve: the engine needs a tokenizer (Engine(model, tokenizer))")
        self.engine, self.name, self.tokenizer = engine, name, engine.tokenizer
        self.context = engine.backbone.cfg.max_seq_len
        self.modalities = list(engine.multimodal.modalities) if engine.multimodal is not None else []
        self.created = int(time.time())

    def check_name(self, requested: str | None) -> None:
        if requested is not None and requested != self.name:
            raise RequestError(f"model {requested!r} does not exist; this server serves {self.name!r}",
                               status=404, param="model")

    def check_inputs(self, inputs: dict[str, Any]) -> None:
        for modality in inputs:
            if modality not in self.modalities:
                raise RequestError(f"model {self.name!r} has no {modality} encoder; it takes "
                                   f"{self.modalities or 'text only'}", param="messages")

    def max_new_tokens(self, requested: int | None, prompt_len: int, default: int | None) -> int:
        """The requested max_tokens, checked against the context left after the prompt; by default that whole
        context (or `default` tokens of it)."""
        room = self.context - prompt_len
        if room <= 0:
            raise RequestError(f"the prompt is {prompt_len} tokens; the model's context length is {self.context}",
                               param="messages")
        if requested is None:
            return room if default is None else min(default, room)
        if requested > room:
            raise RequestError(f"prompt ({prompt_len} tokens) + max_tokens ({requested}) exceeds the model's "
                               f"context length {self.context}", param="max_tokens")
        return requested

    async def start(self, prompt_ids: list[int], params: SamplingParams, inputs: dict[str, Any]
                    ) -> tuple[AsyncIterator[RequestOutput], RequestOutput]:
        """Add the request and wait for its first output, so a bad input is still a 400 and not a broken stream:
        the engine checks files, token ids and lengths when the request is added, the encoders read the image /
        audio before the first token."""
        try:  # in a thread: add_request waits for a step running in another thread, the event loop must not
            request_id = await asyncio.to_thread(self.engine.add_request, prompt_ids, sampling=params, **inputs)
        except QueueFullError as err:
            raise RequestError(str(err), status=503, type="server_busy") from None
        except (InputError, ValueError, TypeError) as err:
            raise RequestError(str(err)) from None
        outputs = self.engine.follow(request_id)
        try:
            return outputs, await anext(outputs)
        except InputError as err:  # an unreadable image / audio (the request is gone from the engine)
            raise RequestError(str(err)) from None


def build_app(source: Any, *, model_name: str) -> FastAPI:
    """The ASGI app serving `source` (a Pipeline or an Engine with a tokenizer) as `model_name`. The caller keeps
    ownership of the engine (closing it is theirs)."""
    served = ServedModel(getattr(source, "engine", source), model_name)
    app = FastAPI(title="mmr1", description="OpenAI-compatible API of an mmr1 model")
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": served.name, "object": "model", "created": served.created, "owned_by": "mmr1",
                "max_model_len": served.context, "modalities": ["text", *served.modalities]}
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def metrics() -> dict:
        return served.engine.metrics()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        served.check_name(body.model)
        body.refuse_unsupported()
        ids = completion_prompt_ids(body.prompt, served.tokenizer)
        budget = served.max_new_tokens(body.max_tokens, len(ids), COMPLETION_DEFAULT_MAX_TOKENS)
        params = sampling_params(body, budget, body.logprobs)
        return await _respond(Reply(served, chat=False, prompt_len=len(ids), params=params), body, ids, {}, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        served.check_name(body.model)
        body.refuse_unsupported()
        question, inputs = chat_question(body.messages)
        served.check_inputs(inputs)
        ids = served.tokenizer.encode_prompt(question, [m for m in served.modalities if m in inputs])
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = sampling_params(body, served.max_new_tokens(requested, len(ids), None),
                                 body.top_logprobs if body.logprobs else None)
        return await _respond(Reply(served, chat=True, prompt_len=len(ids), params=params), body, ids, inputs,
                              request)

    return app


async def _respond(reply: "Reply", body: Any, ids: list[int], inputs: dict[str, Any], request: Request) -> Any:
    """Start the request; stream its chunks, or wait for its end and answer the whole body. A client that goes
    away before the end (a timeout, Ctrl-C) has its request aborted, streamed or not: nobody reads the answer."""
    outputs, first = await reply.served.start(ids, reply.params, inputs)
    if body.stream:
        return StreamingResponse(reply.events(first, outputs, body.include_usage), media_type="text/event-stream")
    last = first
    try:
        while last.finish_reason is None:
            if await request.is_disconnected():
                log.info("client left before %s finished: aborted", reply.id)
                return Response(status_code=499)  # nginx's "client closed request"; nobody receives it
            last = await anext(outputs)
    finally:
        await outputs.aclose()  # aborts an unfinished request, forgets a finished one
    return reply.body(last)


class Reply:
    """The response to one request, in OpenAI's shape: the whole body at the end, or its chunks as the output
    grows (chat: `chat.completion` / `chat.completion.chunk` with `delta`; completions: `text_completion`)."""

    def __init__(self, served: ServedModel, *, chat: bool, prompt_len: int, params: SamplingParams):
        self.served, self.chat, self.prompt_len, self.params = served, chat, prompt_len, params
        self.tokenizer = served.tokenizer
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def body(self, out: RequestOutput) -> dict:
        choices = []
        for index, sample in enumerate(_samples(out)):
            text, logprobs = sample.text or "", self._logprobs(sample, 0)
            choices.append({"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                            "finish_reason": sample.finish_reason} if self.chat else
                           {"index": index, "text": text, "logprobs": logprobs,
                            "finish_reason": sample.finish_reason})
        return self._envelope("chat.completion" if self.chat else "text_completion", choices, self._usage(out))

    async def events(self, first: RequestOutput, outputs: AsyncIterator[RequestOutput],
                     include_usage: bool) -> AsyncIterator[str]:
        """Server-Sent Events: one chunk per step that added text (or tokens, with logprobs), the last with the
        finish_reason, then the usage when asked for and `[DONE]`. Closing this generator (the client went away)
        closes `outputs`, which aborts the request."""
        n = len(_samples(first))
        deltas = [TextDeltas(self.tokenizer, self.params.stop) for _ in range(n)]
        sent_tokens, ended = [0] * n, [False] * n
        out = first
        try:
            if self.chat:  # OpenAI's first chunk names the role
                for index in range(n):
                    yield _sse(self._chunk(index, {"delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                                   "finish_reason": None}))
            while True:
                for index, sample in enumerate(_samples(out)):  # each choice's new text, tokens, and its end
                    if ended[index]:
                        continue
                    text = deltas[index].update(sample)
                    fresh = len(sample.token_ids) > sent_tokens[index]
                    logprobs = self._logprobs(sample, sent_tokens[index]) if fresh else None
                    sent_tokens[index] = len(sample.token_ids)
                    ended[index] = sample.finish_reason is not None
                    if text or logprobs or ended[index]:
                        piece = {"delta": {"content": text}} if self.chat else {"text": text}
                        yield _sse(self._chunk(index, {**piece, "logprobs": logprobs,
                                                       "finish_reason": sample.finish_reason}))
                if out.finish_reason is not None:
                    break
                out = await anext(outputs)
            if include_usage:
                yield _sse(self._envelope(self._chunk_object, [], self._usage(out)))
        except Exception as err:  # headers are sent: the error goes into the stream (as vLLM does)
            log.exception("request %s failed while streaming", self.id)
            yield _sse(_error_body(500, f"the request failed while streaming: {err}", "internal_server_error"))
        finally:
            await outputs.aclose()
        yield "data: [DONE]\n\n"

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _chunk(self, index: int, choice: dict) -> dict:
        return self._envelope(self._chunk_object, [{"index": index, **choice}], None)

    def _envelope(self, obj: str, choices: list[dict], usage: dict | None) -> dict:
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.served.name,
                "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body

    def _usage(self, out: RequestOutput) -> dict:
        completion = sum(len(sample.token_ids) for sample in _samples(out))
        return {"prompt_tokens": self.prompt_len, "completion_tokens": completion,
                "total_tokens": self.prompt_len + completion}

    def _logprobs(self, out: RequestOutput, start: int) -> dict | None:
        """Tokens [start:] of the output with their log-probabilities and top alternatives, in the chat format
        ({"content": [...]}) or the completions one (parallel lists, text offsets into the answer)."""
        if out.logprobs is None:
            return None
        ids, entries = out.token_ids[start:], out.logprobs[start:]
        piece = self._token_text
        top_n = self.params.logprobs or 0
        if self.chat:
            return {"content": [{**_token_entry(piece(t), lp[t]),
                                 "top_logprobs": [_token_entry(piece(i), v) for i, v in _top(lp, top_n)]}
                                for t, lp in zip(ids, entries)]}
        decode = self.tokenizer.decode
        return {"tokens": [piece(t) for t in ids], "token_logprobs": [lp[t] for t, lp in zip(ids, entries)],
                "top_logprobs": [_by_text(lp, piece) for lp in entries],
                "text_offset": [len(decode(out.token_ids[:start + k])) for k in range(len(ids))]}

    def _token_text(self, token: int) -> str:
        """One token's own text, its leading space kept (a piece of a multi-byte character shows as U+FFFD)."""
        return self.tokenizer.tok.decode([token], skip_special_tokens=False)


class TextDeltas:
    """The new text of a growing output. The output is decoded as a whole each time and the new suffix handed
    out (a token's text depends on its neighbours: the bytes of one character, the leading space the answer
    drops). Held back until they are certain: a partial character at the end, and with stop strings the last
    len(longest) - 1 characters, which a stop string completed later would cut from the answer."""

    def __init__(self, tokenizer: Any, stop: list[str]):
        self.tokenizer = tokenizer
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.sent = ""

    def update(self, out: RequestOutput) -> str:
        if out.finish_reason is not None:
            text = out.text if out.text is not None else self.tokenizer.decode(out.token_ids)
        else:
            text = self.tokenizer.decode(out.token_ids).rstrip("\ufffd")
            text = text[:len(text) - self.hold] if self.hold else text
        if not text.startswith(self.sent):  # the decode rules above keep it a prefix; never send a contradiction
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


def _samples(out: RequestOutput) -> list[RequestOutput]:
    """The choices of a reply: each sample of an n > 1 request, or the request's one output."""
    return out.samples if out.samples is not None else [out]


def _top(logprobs: dict[int, float], n: int) -> list[tuple[int, float]]:
    return sorted(logprobs.items(), key=lambda kv: -kv[1])[:n]


def _by_text(logprobs: dict[int, float], piece: Any) -> dict[str, float]:
    """The completions format: {token text: log-probability} over the top alternatives and the chosen token. Two
    tokens with one text (pieces of characters all show as U+FFFD) share a key: the more likely one keeps it."""
    by_text: dict[str, float] = {}
    for token, logprob in _top(logprobs, len(logprobs)):
        by_text.setdefault(piece(token), logprob)
    return by_text


def _token_entry(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# ---- errors ------------------------------------------------------------------------------------------------
def _error_body(status: int, message: str, type: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": status}}


def _error(status: int, message: str, type: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(_error_body(status, message, type, param), status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    async def refused(request: Any, err: RequestError) -> JSONResponse:
        return _error(err.status, str(err), err.type, err.param)

    async def invalid(request: Any, err: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
                    for e in err.errors()]
        first = err.errors()[0]["loc"] if err.errors() else ()
        return _error(400, "; ".join(dict.fromkeys(problems)), "invalid_request_error",
                      ".".join(str(p) for p in first if p != "body") or None)

    async def http(request: Any, err: HTTPException) -> JSONResponse:
        return _error(err.status_code, str(err.detail), "invalid_request_error")

    async def failed(request: Any, err: Exception) -> JSONResponse:
        log.exception("request failed")
        return _error(500, f"internal server error: {type(err).__name__}: {err}", "internal_server_error")

    app.add_exception_handler(RequestError, refused)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http)
    app.add_exception_handler(Exception, failed)


# ---- running it --------------------------------------------------------------------------------------------
def serve(model_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, served_model_name: str | None = None,
          engine_config: EngineConfig | None = None, device: str = "cpu", log_level: str = "info",
          draft: str | Path | None = None) -> None:
    """Load an exported model (mmr1 export; `draft`: an exported draft for speculative decoding) and serve it with
    uvicorn until interrupted."""
    import uvicorn

    from mmr1.pipeline import Pipeline

    pipeline = Pipeline.from_pretrained(model_dir, device=device, engine_config=engine_config, draft=draft)
    try:
        app = build_app(pipeline, model_name=served_model_name or Path(model_dir).resolve().name)
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        pipeline.close()


__all__ = ["build_app", "serve", "ServedModel", "TextDeltas"]
