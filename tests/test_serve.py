"""`mmr1 serve`: the OpenAI-compatible API on a tiny random exported model, answers checked against the Pipeline
and the engine on the same inputs (in-process TestClient, and one real uvicorn socket)."""
from __future__ import annotations

import base64
import dataclasses
import json
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch
from fastapi.testclient import TestClient
from PIL import Image

from mmr1.cli import main
from mmr1.engine import Engine, EngineConfig, SamplingParams
from mmr1.model import MultimodalConfig, MultimodalR1
from mmr1.pipeline import Pipeline
from mmr1.serve import build_app
from mmr1.tokenizer import R1Tokenizer
from test_model import TINY_W2V, tiny_config

QUESTION = "What color is the shape?"
TEXTS = ["what color is the shape red blue green", "how many beeps do you hear one two three",
         "are there as many shapes as beeps yes no"] * 4


def open_gates(model: MultimodalR1) -> MultimodalR1:
    """A fresh model ignores its modality tokens (gates start at 0): open them so the image / audio count."""
    torch.manual_seed(0)
    model.backbone.init_weights(std=0.3)  # peaked, varied logits: greedy answers don't repeat one token
    with torch.no_grad():
        for layer in model.backbone.layers:
            layer.cross_attn.gate.fill_(0.8)
    return model.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    tokenizer = R1Tokenizer.train(TEXTS, vocab_size=96, modalities=["image", "audio"])
    cfg = tiny_config()
    cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, vocab_size=tokenizer.vocab_size,
                                                                max_seq_len=48))
    torch.manual_seed(0)
    open_gates(MultimodalR1(cfg)).save_pretrained(tmp / "tiny-mmr1", tokenizer)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp / "shape.png")
    sf.write(tmp / "beeps.wav", np.sin(np.arange(6000) / 3.0).astype(np.float32) * 0.5, 16000)
    return tmp


@pytest.fixture(scope="module")
def qa(files):
    pipeline = Pipeline.from_pretrained(files / "tiny-mmr1")
    yield pipeline
    pipeline.close()


@pytest.fixture(scope="module")
def client(qa):
    with TestClient(build_app(qa, model_name="tiny")) as test_client:
        yield test_client


def data_url(path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def chat(content, **fields) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": 6, **fields}


def ask_about(url: str) -> list[dict]:
    return [{"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": url}}]


def sse_events(response) -> list[str]:
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_health_models_and_metrics(client):
    assert client.get("/health").status_code == 200
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"] and models["data"][0]["object"] == "model"
    assert models["data"][0]["modalities"] == ["text", "image", "audio"]
    assert client.get("/metrics").json()["kv_blocks_total"] > 0
    assert error_of(client.get("/v1/nothing"), 404)["code"] == 404


def test_chat_with_an_image_answers_like_the_pipeline(client, qa, files):
    image = files / "shape.png"
    expected = qa(QUESTION, image=str(image), max_new_tokens=6)
    reply = client.post("/v1/chat/completions", json=chat(ask_about(data_url(image, "image/png"))))
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected}
    assert choice["finish_reason"] in ("stop", "length") and choice["logprobs"] is None
    prompt_len = len(qa.tokenizer.encode_prompt(QUESTION, ["image"]))  # the <image> marker is in the prompt
    usage = body["usage"]
    assert usage["prompt_tokens"] == prompt_len and usage["total_tokens"] == prompt_len + usage["completion_tokens"]
    assert expected != qa(QUESTION, max_new_tokens=6)  # the image did reach the model
    for local in (f"file://{image}", str(image)):  # the same file named by path
        assert client.post("/v1/chat/completions", json=chat(ask_about(local))).json() \
            ["choices"][0]["message"]["content"] == expected


def test_chat_with_audio_answers_like_the_pipeline(client, qa, files):
    wav = files / "beeps.wav"
    expected = qa("How many beeps?", audio=str(wav), max_new_tokens=6)
    inline = [{"type": "text", "text": "How many beeps?"},
              {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav.read_bytes()).decode(),
                                                      "format": "wav"}}]
    as_url = [inline[0], {"type": "audio_url", "audio_url": {"url": data_url(wav, "audio/wav")}}]
    for content in (inline, as_url):
        reply = client.post("/v1/chat/completions", json=chat(content))
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == expected


def test_streamed_chat_deltas_add_up_to_the_answer(client, files):
    request = chat(ask_about(data_url(files / "shape.png", "image/png")), max_tokens=10,
                   stream_options={"include_usage": True})
    whole = client.post("/v1/chat/completions", json=request).json()
    with client.stream("POST", "/v1/chat/completions", json={**request, "stream": True}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    pieces = [c for c in chunks if c["choices"]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in pieces) == \
        whole["choices"][0]["message"]["content"]
    assert len(pieces) > 2  # it did come piece by piece
    assert pieces[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in pieces[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_completions_with_logprobs_match_the_engine(client, qa):
    prompt = "<user> how many shapes<assistant>"  # raw text: mmr1's prompt format written out, <bos> added
    ids = [qa.tokenizer.bos_id, *qa.tokenizer.encode(prompt)]
    expected = qa.engine.generate([ids], SamplingParams(max_new_tokens=5, logprobs=2))[0]
    reply = client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 5,
                                                 "temperature": 0, "logprobs": 2})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    choice = body["choices"][0]
    assert body["object"] == "text_completion" and choice["text"] == expected.text
    logprobs = choice["logprobs"]
    chosen = [lp[t] for t, lp in zip(expected.token_ids, expected.logprobs)]
    assert logprobs["token_logprobs"] == pytest.approx(chosen)
    assert logprobs["tokens"] == [qa.tokenizer.tok.decode([t]) for t in expected.token_ids]
    for top, engine_top, logprob in zip(logprobs["top_logprobs"], expected.logprobs, logprobs["token_logprobs"]):
        assert max(top.values()) == pytest.approx(max(engine_top.values()))
        assert max(top.values()) >= logprob  # the reply's own chosen token: never above its best alternative
        # keys are texts: same-text tokens share one (approx: the engine's prefix cache may have served the
        # prompt's K/V to one of the two runs, which rounds the last bits differently)
        assert all(any(v == pytest.approx(e, abs=1e-5) for e in engine_top.values()) for v in top.values())
    assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"] == sorted(logprobs["text_offset"])
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(expected.token_ids),
                             "total_tokens": len(ids) + len(expected.token_ids)}


def test_chat_logprobs_list_the_top_alternatives(client, qa):
    ids = qa.tokenizer.encode_prompt(QUESTION)
    expected = qa.engine.generate([ids], SamplingParams(max_new_tokens=4, logprobs=2))[0]
    reply = client.post("/v1/chat/completions", json=chat(QUESTION, max_tokens=4, logprobs=True, top_logprobs=2))
    content = reply.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == len(expected.token_ids)
    for entry, token, engine_top in zip(content, expected.token_ids, expected.logprobs):
        assert entry["logprob"] == pytest.approx(engine_top[token])
        assert entry["bytes"] == list(entry["token"].encode())
        best = sorted(engine_top.values(), reverse=True)[:2]
        assert [alt["logprob"] for alt in entry["top_logprobs"]] == pytest.approx(best)


def test_streamed_completion_with_a_stop_string_sends_only_the_cut_text(client):
    request = {"prompt": "<user> what color<assistant>", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    full = client.post("/v1/completions", json=request).json()["choices"][0]["text"]
    stop = full[len(full) // 2:len(full) // 2 + 2]  # a stop string the answer reaches half-way
    assert len(stop) == 2 and full.index(stop) > 0
    cut = client.post("/v1/completions", json={**request, "stop": [stop]}).json()["choices"][0]
    assert cut["text"] == full[:full.index(stop)] and cut["finish_reason"] == "stop"
    with client.stream("POST", "/v1/completions", json={**request, "stop": stop, "stream": True}) as response:
        chunks = [json.loads(e) for e in sse_events(response)[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == cut["text"]  # never a piece of the stop string
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_n_samples_are_the_choices_whole_and_streamed(client, qa):
    request = chat("q", max_tokens=6, temperature=1.0, seed=11, n=3)
    body = client.post("/v1/chat/completions", json=request).json()
    texts = [c["message"]["content"] for c in body["choices"]]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    ids = qa.tokenizer.encode_prompt("q")
    tokens = 0
    for i, text in enumerate(texts):  # choice i is the sample seeded seed + i
        alone = qa.engine.generate([ids], SamplingParams(max_new_tokens=6, temperature=1.0, seed=11 + i))[0]
        assert text == alone.text
        tokens += len(alone.token_ids)
    assert len(set(texts)) > 1 and body["usage"]["completion_tokens"] == tokens
    assert qa("q", sampling=SamplingParams(max_new_tokens=6, temperature=1.0, seed=11, n=3)) == texts  # Pipeline
    with client.stream("POST", "/v1/chat/completions", json={**request, "stream": True}) as response:
        chunks = [json.loads(e) for e in sse_events(response)[:-1]]
    streamed = ["", "", ""]
    finished = []
    for chunk in chunks:
        for choice in chunk["choices"]:
            streamed[choice["index"]] += choice["delta"].get("content", "")
            if choice["finish_reason"] is not None:
                finished.append(choice["index"])
    assert streamed == texts and sorted(finished) == [0, 1, 2]


def test_bad_requests_are_openai_errors_naming_the_field(client, files):
    def refused(body: dict, status: int = 400, path: str = "/v1/chat/completions") -> dict:
        return error_of(client.post(path, json=body), status)

    error = refused(chat(ask_about("data:image/png;base64,not*base64")))
    assert error["type"] == "invalid_request_error" and error["code"] == 400
    assert error["param"] == "messages[0].content[1].image_url.url" and "invalid base64" in error["message"]
    assert "not an image" in refused(chat(ask_about(data_url(files / "beeps.wav", "image/png"))))["message"]
    assert "http(s) URLs are not supported" in refused(chat(ask_about("https://example.com/a.png")))["message"]
    missing = refused(chat(ask_about(str(files / "gone.png"))))["message"]
    assert "gone.png" in missing and "not found" in missing
    tiny = files / "dot.png"
    Image.new("RGB", (1, 1)).save(tiny)  # readable, but too small: refused by the encoder, before any token
    assert "dot.png" in refused(chat(ask_about(str(tiny))))["message"]
    video = [{"type": "text", "text": "q"}, {"type": "video_url", "video_url": {"url": "x"}}]
    assert "'video_url' is not supported" in refused(chat(video))["message"]
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert "exactly one user message" in refused({**chat("q"), "messages": turns})["message"]
    assert refused(chat("q", model="gpt-4"), 404)["param"] == "model"
    assert refused(chat("q", n=0))["param"] == "n"
    assert "context length 48" in refused(chat("q", max_tokens=99))["message"]
    typed = refused(chat("q", temperature="hot"))
    assert typed["param"] == "temperature" and "valid number" in typed["message"]
    assert "top_p" in refused({"prompt": "q", "top_p": 0}, path="/v1/completions")["message"]
    assert "token ids must be in" in refused({"prompt": [1, 999]}, path="/v1/completions")["message"]
    # a system message is ignored: the same answer as without it
    system = {**chat("q"), "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}]}
    assert client.post("/v1/chat/completions", json=system).json()["choices"][0]["message"] == \
        client.post("/v1/chat/completions", json=chat("q")).json()["choices"][0]["message"]


def test_an_image_for_a_model_without_an_image_encoder_is_a_400(qa, files):
    cfg = tiny_config()
    audio_only = MultimodalConfig.from_dict({"backbone": dataclasses.replace(
        cfg.backbone, vocab_size=qa.tokenizer.vocab_size, max_seq_len=48), "encoders": {
        "audio": {"name": "wav2vec2", "kwargs": TINY_W2V, "projector": {"kind": "mlp"}}}})
    engine = Engine(MultimodalR1(audio_only).eval(), qa.tokenizer)
    try:
        with TestClient(build_app(engine, model_name="audio-only")) as client:
            reply = client.post("/v1/chat/completions", json=chat(ask_about(str(files / "shape.png")),
                                                                    model="audio-only"))
            assert "has no image encoder" in error_of(reply, 400)["message"]
    finally:
        engine.close()


def test_a_full_queue_is_a_503(qa):
    engine = Engine(qa.model, qa.tokenizer, EngineConfig(max_waiting=1))
    try:
        with TestClient(build_app(engine, model_name="tiny")) as client:
            waiting = engine.add_request("q")  # never stepped: it fills the queue
            error = error_of(client.post("/v1/completions", json={"prompt": "q", "max_tokens": 2}), 503)
            assert "queue is full" in error["message"]
            engine.abort(waiting)
            engine.release(waiting)
            assert client.post("/v1/completions", json={"prompt": "q", "max_tokens": 2}).status_code == 200
    finally:
        engine.close()


def test_real_socket_and_a_client_leaving_early_aborts(qa, monkeypatch):
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(build_app(qa, model_name="tiny"), host="127.0.0.1", port=0,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        base = "http://127.0.0.1:%d" % server.servers[0].sockets[0].getsockname()[1]
        assert httpx.get(f"{base}/health").status_code == 200
        answer = httpx.post(f"{base}/v1/chat/completions", json=chat("q")).json()["choices"][0]["message"]
        assert answer["content"] == qa("q", max_new_tokens=6)
        engine = qa.engine
        slow_step = engine.step
        monkeypatch.setattr(engine, "step", lambda: time.sleep(0.05) or slow_step())  # a long answer: ~2 s
        before = engine.stats["generated_tokens"]
        long = {"prompt": "q", "max_tokens": 40, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=long) as response:
            next(response.iter_lines())  # the first token arrived; then the client hangs up
        deadline = time.time() + 5
        while engine.has_unfinished() and time.time() < deadline:
            time.sleep(0.02)
        assert not engine.has_unfinished() and not engine._seqs  # aborted and forgotten
        assert engine.stats["generated_tokens"] - before < 20
        # not streamed: a client that times out before the answer is complete has its request aborted too
        before = engine.stats["generated_tokens"]
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/v1/completions", json={**long, "stream": False}, timeout=0.5)
        deadline = time.time() + 5
        while (engine.has_unfinished() or engine._seqs) and time.time() < deadline:
            time.sleep(0.02)
        assert not engine.has_unfinished() and not engine._seqs
        assert engine.stats["generated_tokens"] - before < 30
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_serve_command_errors_are_one_line(tmp_path, capsys, monkeypatch):
    assert main(["serve", "--model", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmr1 serve: ") and "config.json is missing" in err and err.count("\n") == 1
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if FastAPI were not installed
    assert main(["serve", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "pip install 'mmr1[serve]'" in err and err.count("\n") == 1
    assert main(["--help"]) == 0 and "\n  serve " in capsys.readouterr().out
