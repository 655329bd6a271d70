"""ClipViTEncoder: open_clip ViT patch tokens, local checkpoints, freezing and the image processor."""
from __future__ import annotations

import argparse
import pickle

import numpy as np
import open_clip
import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from PIL import Image
from safetensors.torch import save_file

from data_pipelines import InputError
from encoders import ClipViTEncoder, create_encoder

TINY = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "heads": 2, "mlp_ratio": 2.0}


def tiny_clip() -> open_clip.CLIP:
    """A full (vision + text) open_clip CLIP with the TINY vision tower, as a pretrained checkpoint would hold."""
    torch.manual_seed(1)
    vision = CLIPVisionCfg(image_size=32, patch_size=8, width=64, layers=2, head_width=32, mlp_ratio=2.0)
    text = CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
    return open_clip.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).eval()


def reference_patch_tokens(visual: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The documented token semantics, spelled out: final-layer tokens after ln_post, CLS token dropped."""
    x = visual.conv1(images).flatten(2).transpose(1, 2)  # (B, grid*grid, width)
    cls = visual.class_embedding.expand(x.shape[0], 1, -1)
    x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding)
    return visual.ln_post(visual.transformer(x))[:, 1:]


def test_tiny_forward_shapes_and_token_semantics():
    torch.manual_seed(0)
    encoder = ClipViTEncoder(vision_cfg=TINY).eval()
    images = torch.randn(2, 3, 32, 32)
    tokens, mask = encoder(images)
    assert tokens.shape == (2, 16, 64) and encoder.output_dim == 64 and encoder.modality == "image"
    assert mask.dtype == torch.bool and mask.shape == (2, 16) and bool(mask.all())
    torch.testing.assert_close(tokens, reference_patch_tokens(encoder.visual, images), rtol=1e-5, atol=1e-5)
    assert encoder.visual.proj is None  # the contrastive projection is unused and dropped
    assert encoder.processor.image_size == (32, 32)
    tokens.sum().backward()
    assert all(p.grad is not None for p in encoder.parameters())  # no parameter left out of the graph (DDP)


@pytest.mark.parametrize("layout", ["full_safetensors", "visual_safetensors", "torch_weights_only"])
def test_local_checkpoint_reproduces_the_saved_model(tmp_path, layout):
    clip = tiny_clip()
    if layout == "full_safetensors":
        path = tmp_path / "clip.safetensors"
        save_file(clip.state_dict(), str(path))
    elif layout == "visual_safetensors":
        path = tmp_path / "visual.safetensors"
        save_file(clip.visual.state_dict(), str(path))
    else:  # an open_clip training checkpoint: weights wrapped in "state_dict", DDP "module." prefixes
        path = tmp_path / "epoch_1.pt"
        torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in clip.state_dict().items()}}, path)

    images = torch.randn(3, 3, 32, 32)
    clip.visual.output_tokens = True
    with torch.no_grad():
        _, expected = clip.visual(images)  # open_clip's own patch tokens
        random_init = ClipViTEncoder(vision_cfg=TINY).eval()(images)[0]
        loaded = create_encoder("clip_vit", vision_cfg=TINY, pretrained=str(path)).eval()(images)[0]
    assert not torch.allclose(random_init, expected)
    assert torch.equal(loaded, expected)


def test_checkpoint_errors(tmp_path):
    pickled = tmp_path / "pickled.pt"
    torch.save({"w": torch.zeros(1), "args": argparse.Namespace(lr=0.1)}, pickled)  # needs a real unpickler
    with pytest.raises(ValueError, match="weights_only=True"):
        ClipViTEncoder(vision_cfg=TINY, pretrained=str(pickled))  # never unpickled

    wider = dict(TINY, width=32)
    path = tmp_path / "narrow.safetensors"
    save_file(ClipViTEncoder(vision_cfg=wider).state_dict(), str(path))
    with pytest.raises(ValueError, match=r"narrow.safetensors does not match the vision tower of custom vision_cfg"):
        ClipViTEncoder(vision_cfg=TINY, pretrained=str(path))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        ClipViTEncoder(vision_cfg=TINY, pretrained=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"'no_such_tag'.*ViT-B-32.*openai"):
        ClipViTEncoder("ViT-B-32", pretrained="no_such_tag")  # lists the real tags, downloads nothing
    with pytest.raises(ValueError, match="unknown open_clip model_name 'ViT-Q-99'"):
        ClipViTEncoder("ViT-Q-99")
    with pytest.raises(ValueError, match="unknown keys \\['depth'\\]"):
        ClipViTEncoder(vision_cfg=dict(TINY, depth=3))
    with pytest.raises(ValueError, match="model_name .* or vision_cfg"):
        ClipViTEncoder(model_name=None)


def test_open_clip_model_name():
    encoder = ClipViTEncoder("ViT-B-32").eval()  # random init, vision tower only
    assert encoder.output_dim == 768 and encoder.processor.image_size == (224, 224)
    assert encoder.processor.mean == OPENAI_DATASET_MEAN and encoder.processor.std == OPENAI_DATASET_STD
    with torch.no_grad():
        tokens, mask = encoder(torch.randn(1, 3, 224, 224))
    assert tokens.shape == (1, 49, 768) and mask.shape == (1, 49)


def test_non_vit_tower_is_rejected():
    with pytest.raises(ValueError, match="needs a ViT vision tower.*'RN50'.*ModifiedResNet"):
        ClipViTEncoder("RN50")


def test_freeze():
    encoder = ClipViTEncoder(vision_cfg=TINY, freeze=True)
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training and not any(m.training for m in encoder.modules())
    trainable = ClipViTEncoder(vision_cfg=TINY).train()
    assert all(p.requires_grad for p in trainable.parameters()) and trainable.training


def _normalised(rgb: tuple[int, int, int]) -> torch.Tensor:
    return (torch.tensor(rgb) / 255.0 - torch.tensor(OPENAI_DATASET_MEAN)) / torch.tensor(OPENAI_DATASET_STD)


def test_processor_inputs_resize_and_crop(tmp_path):
    processor = pickle.loads(pickle.dumps(ClipViTEncoder(vision_cfg=TINY).processor))  # weight-free, picklable
    red, blue = (255, 0, 0), (0, 0, 255)
    # 96x24, thirds red | blue | red: resizing to height 32 and cropping the centre keeps only the blue third.
    wide = np.zeros((24, 96, 3), dtype=np.uint8)
    wide[:, :32], wide[:, 32:64], wide[:, 64:] = red, blue, red
    Image.fromarray(wide).save(tmp_path / "wide.png")
    for source in [Image.fromarray(wide), wide, tmp_path / "wide.png", str(tmp_path / "wide.png")]:
        pixels = processor(source)
        assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
        torch.testing.assert_close(pixels, _normalised(blue)[:, None, None].expand(3, 32, 32), rtol=0, atol=1e-5)

    tall = Image.new("RGB", (20, 50), (10, 200, 30))  # upscaled to 32 wide, centre-cropped in height
    torch.testing.assert_close(processor(tall), _normalised((10, 200, 30))[:, None, None].expand(3, 32, 32),
                               rtol=0, atol=1e-5)
    gray = Image.new("L", (40, 40), 128)  # any mode becomes RGB
    assert processor(gray).shape == (3, 32, 32)

    batch = processor.collate([processor(tall), processor(wide)])
    assert batch["values"].shape == (2, 3, 32, 32) and batch["mask"] is None


def test_processor_errors_name_the_file(tmp_path):
    processor = ClipViTEncoder(vision_cfg=TINY, max_pixels=64 * 64).processor
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(InputError, match="broken.png"):
        processor(broken)
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    with pytest.raises(InputError, match="big.png.*over the limit of 4096"):
        processor(tmp_path / "big.png")
