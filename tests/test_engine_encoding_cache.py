"""Image/audio files shared between engine requests are encoded once: requests naming the same file (at once or
later) reuse its encoding, a file rewritten on disk is encoded again, and aborting one request never cancels an
encoding another waits for."""
from __future__ import annotations

import os

import numpy as np
import soundfile as sf
from PIL import Image

from mmr1.engine import Engine, EngineConfig, SamplingParams
from test_engine import multimodal_model, multimodal_reference, raw_inputs

PROMPT = [1, 4, 9, 16, 25, 36]


def write_files(directory, seed):
    raw = raw_inputs(seed)
    image, audio = directory / f"img{seed}.png", directory / f"clip{seed}.wav"
    Image.fromarray(raw["image"]).save(image)
    sf.write(audio, *raw["audio"])
    return str(image), str(audio)


def counting_engine(monkeypatch, model):
    eng = Engine(model, config=EngineConfig(block_size=4))
    submitted = []
    real = eng.queues.submit
    monkeypatch.setattr(eng.queues, "submit", lambda inputs, **kw: submitted.extend(inputs) or real(inputs, **kw))
    return eng, submitted


def test_requests_naming_the_same_file_encode_it_once(monkeypatch, tmp_path):
    model = multimodal_model()
    eng, submitted = counting_engine(monkeypatch, model)
    image, audio = write_files(tmp_path, 0)
    other_image, _ = write_files(tmp_path, 1)
    requests = [{"prompt": PROMPT, "image": image}, {"prompt": PROMPT[:3], "image": image, "audio": audio},
                {"prompt": PROMPT, "image": other_image}, {"prompt": PROMPT[:4], "audio": audio}]
    outs = eng.generate(requests, SamplingParams(max_new_tokens=4))
    later = eng.generate([{"prompt": PROMPT[:5], "image": image}], SamplingParams(max_new_tokens=4))[0]
    assert sorted(submitted) == ["audio", "image", "image"] and eng.encodings.hits == 3  # 2 files once each + 1
    for out, req in zip(outs + [later], requests + [{"prompt": PROMPT[:5], "image": image}]):
        inputs = {k: v for k, v in req.items() if k != "prompt"}
        assert out.token_ids == multimodal_reference(model, req["prompt"], inputs, 4)
    eng.close()


def test_a_rewritten_file_is_encoded_again(monkeypatch, tmp_path):
    model = multimodal_model()
    eng, submitted = counting_engine(monkeypatch, model)
    image, _ = write_files(tmp_path, 0)
    first = eng.generate([{"prompt": PROMPT, "image": image}], SamplingParams(max_new_tokens=4))[0]
    Image.fromarray(raw_inputs(2)["image"]).save(image)  # new content under the same name
    stat = os.stat(image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a later mtime even on coarse clocks
    second = eng.generate([{"prompt": PROMPT, "image": image}], SamplingParams(max_new_tokens=4))[0]
    assert submitted == ["image", "image"]
    assert second.token_ids == multimodal_reference(model, PROMPT, {"image": image}, 4)
    assert first.token_ids == multimodal_reference(model, PROMPT, {"image": raw_inputs(0)["image"]}, 4)
    eng.close()


def test_aborting_one_request_keeps_the_shared_encoding_for_the_other(tmp_path):
    model = multimodal_model()
    eng = Engine(model, config=EngineConfig(block_size=4))
    image, audio = write_files(tmp_path, 3)
    doomed = eng.add_request(PROMPT, image=image, audio=audio, sampling=SamplingParams(max_new_tokens=4))
    kept = eng.add_request(PROMPT[:4], image=image, sampling=SamplingParams(max_new_tokens=4))
    assert eng.abort(doomed)
    while eng.has_unfinished():
        eng.step()
    out = eng.output(kept)
    assert out.finish_reason == "length" and out.error is None
    assert out.token_ids == multimodal_reference(model, PROMPT[:4], {"image": image}, 4)
    eng.check_no_leaks()
    eng.close()


def test_in_memory_inputs_are_not_shared(monkeypatch):
    model = multimodal_model()
    eng, submitted = counting_engine(monkeypatch, model)
    array = raw_inputs(0)["image"]
    eng.generate([{"prompt": PROMPT, "image": array}, {"prompt": PROMPT, "image": np.array(array)}],
                 SamplingParams(max_new_tokens=2))
    assert submitted == ["image", "image"] and eng.encodings.hits == 0
    eng.close()


def test_inline_encoding_keys_the_prefix_cache_by_file(tmp_path):
    """With async_encoding off the inputs are encoded at admission, after the prefix lookup: requests whose inputs
    are the same unchanged files still share their prompt blocks; other files or in-memory inputs don't."""
    model = multimodal_model()
    eng = Engine(model, config=EngineConfig(block_size=4, async_encoding=False))
    image, audio = write_files(tmp_path, 0)
    other, _ = write_files(tmp_path, 1)
    prompt = PROMPT + [7, 8, 9]  # two full blocks
    runs = [{"image": image, "audio": audio}, {"image": image, "audio": audio}, {"image": other, "audio": audio},
            {"image": raw_inputs(0)["image"], "audio": audio}]
    for inputs in runs:
        out = eng.generate([{"prompt": prompt, **inputs}], SamplingParams(max_new_tokens=4))[0]
        assert out.token_ids == multimodal_reference(model, prompt, inputs, 4)
    assert eng.scheduler.prefix_hit_tokens == 8  # only the second request, same files
    eng.check_no_leaks()
