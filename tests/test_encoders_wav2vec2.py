"""Wav2Vec2Encoder: agreement with transformers, padding invariance, local checkpoints, the audio processor."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import Wav2Vec2Config, Wav2Vec2Model

from data_pipelines import InputError
from encoders import Wav2Vec2Encoder, create_encoder

# 3 conv layers with strides 5 * 8 * 8 = 320 samples: 50 frames per second at 16 kHz, like wav2vec2-base.
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
        "conv_dim": [32, 32, 32], "conv_kernel": [10, 8, 8], "conv_stride": [5, 8, 8],
        "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 4}
RECEPTIVE_FIELD = 10 + 7 * 5 + 7 * 5 * 8  # samples behind one frame


def tiny_encoder(**kwargs) -> Wav2Vec2Encoder:
    torch.manual_seed(0)
    return Wav2Vec2Encoder(**{"config": TINY, **kwargs}).eval()


def batch_of(encoder: Wav2Vec2Encoder, lengths: list[int]) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    clips = [encoder.processor((torch.randn(n, generator=generator), 16000)) for n in lengths]
    return clips, encoder.processor.collate(clips)


def test_defaults_for_training_from_scratch():
    encoder = tiny_encoder()
    cfg = encoder.model.config
    assert cfg.feat_extract_norm == "layer" and encoder.uses_attention_mask
    assert cfg.mask_time_prob == 0.0 and cfg.layerdrop == 0.0
    assert not hasattr(encoder.model, "masked_spec_embed")  # no SpecAugment weight left without gradients
    assert encoder.output_dim == 64 and encoder.modality == "audio"
    assert encoder.processor.min_samples == RECEPTIVE_FIELD


def test_matches_transformers_wav2vec2_model():
    encoder = tiny_encoder()
    reference = Wav2Vec2Model(Wav2Vec2Config(feat_extract_norm="layer", mask_time_prob=0.0, **TINY)).eval()
    reference.load_state_dict(encoder.model.state_dict())
    _, batch = batch_of(encoder, [16000, 9000, 3210])
    with torch.no_grad():
        tokens, frame_mask = encoder(batch["values"], batch["mask"])
        expected = reference(batch["values"], attention_mask=batch["mask"].long()).last_hidden_state
    lengths = reference._get_feat_extract_output_lengths(torch.tensor([16000, 9000, 3210]))
    assert lengths.tolist() == [49, 28, 10]
    assert tokens.shape == (3, 49, 64) and frame_mask.dtype == torch.bool
    assert frame_mask.sum(-1).tolist() == lengths.tolist()
    assert frame_mask.tolist() == [[t < n for t in range(49)] for n in lengths.tolist()]  # real frames first
    torch.testing.assert_close(tokens[frame_mask], expected[frame_mask], rtol=0, atol=1e-6)
    assert bool((tokens[~frame_mask] == 0).all())  # padded frames are zero


def test_padded_batch_equals_each_clip_alone():
    encoder = tiny_encoder()
    clips, batch = batch_of(encoder, [12345, 16000, RECEPTIVE_FIELD, 4000])
    with torch.no_grad():
        tokens, frame_mask = encoder(**batch)
        for i, clip in enumerate(clips):
            alone, alone_mask = encoder(clip[None], torch.ones(1, clip.numel(), dtype=torch.bool))
            frames = int(alone_mask.sum())
            assert frames == int(frame_mask[i].sum()) and bool(alone_mask.all())
            torch.testing.assert_close(tokens[i, :frames], alone[0], rtol=0, atol=1e-5)
        no_mask, all_real = encoder(clips[1][None])  # mask=None: every sample is real
    assert bool(all_real.all())
    torch.testing.assert_close(no_mask[0], tokens[1], rtol=0, atol=1e-5)


def test_group_norm_models_get_no_attention_mask():
    encoder = tiny_encoder(config=dict(TINY, feat_extract_norm="group"))
    assert not encoder.uses_attention_mask
    _, batch = batch_of(encoder, [8000, 5000])
    with torch.no_grad():
        tokens, frame_mask = encoder(**batch)
        expected = encoder.model(batch["values"]).last_hidden_state  # zero padding, as transformers advises
    assert frame_mask.sum(-1).tolist() == [24, 15]
    torch.testing.assert_close(tokens[frame_mask], expected[frame_mask], rtol=0, atol=0)


def test_save_pretrained_round_trip(tmp_path):
    encoder = tiny_encoder()
    encoder.model.save_pretrained(tmp_path / "w2v")
    assert (tmp_path / "w2v" / "model.safetensors").is_file()
    loaded = create_encoder("wav2vec2", pretrained=str(tmp_path / "w2v")).eval()
    _, batch = batch_of(encoder, [7000, 16000])
    with torch.no_grad():
        expected, expected_mask = encoder(**batch)
        tokens, mask = loaded(**batch)
    assert torch.equal(mask, expected_mask) and torch.equal(tokens, expected)

    tuned = Wav2Vec2Encoder(pretrained=str(tmp_path / "w2v"), config={"mask_time_prob": 0.05})  # config overrides
    assert tuned.model.config.mask_time_prob == 0.05 and tuned.model.config.hidden_size == 64


def test_construction_errors(tmp_path):
    with pytest.raises(ValueError, match="needs pretrained .* or config"):
        Wav2Vec2Encoder()
    with pytest.raises(FileNotFoundError, match="not a directory"):
        Wav2Vec2Encoder(pretrained=str(tmp_path / "nowhere"))


def test_freeze():
    encoder = Wav2Vec2Encoder(config=TINY, freeze=True)
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training and not encoder.model.training


def test_processor(tmp_path):
    processor = pickle.loads(pickle.dumps(tiny_encoder(max_seconds=2.0).processor))  # weight-free, picklable
    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(8000) / 8000) + 0.1  # 1 s at 8 kHz, DC offset
    sf.write(tmp_path / "tone.wav", np.stack([tone, tone], axis=1), 8000)  # stereo file
    for source in [tmp_path / "tone.wav", str(tmp_path / "tone.wav"), (tone.astype(np.float32), 8000)]:
        clip = processor(source)
        assert clip.shape == (16000,) and clip.dtype == torch.float32  # resampled to 16 kHz, mono
        assert abs(float(clip.mean())) < 1e-5 and abs(float(clip.std(correction=0)) - 1) < 1e-4
    raw = Wav2Vec2Encoder(config=TINY, normalize=False).processor((tone.astype(np.float32), 16000))
    torch.testing.assert_close(raw, torch.from_numpy(tone.astype(np.float32)))

    batch = processor.collate([torch.ones(5), torch.ones(3)])
    assert batch["values"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["mask"].tolist() == [[True] * 5, [True, True, True, False, False]]

    with pytest.raises(InputError, match=f"<waveform tuple>: audio is 300 samples.*at least {RECEPTIVE_FIELD}"):
        processor((torch.randn(300), 16000))
    sf.write(tmp_path / "long.wav", np.zeros(3 * 16000), 16000)
    with pytest.raises(InputError, match="long.wav.*max_seconds=2"):
        processor(tmp_path / "long.wav")
