"""CLIP ViT image encoder: open_clip's VisionTransformer as a patch-token encoder.

The tokens are exactly what open_clip returns with `output_tokens=True`: the final-layer patch tokens after
`ln_post`, one per patch in row-major order, WITHOUT the CLS token -- `(B, grid_h * grid_w, width)`. The CLS
token is a pooled summary trained for the contrastive loss; the language model attends over the patch grid,
which carries the same information spatially. The contrastive projection (`proj`) is removed: it is unused
here and would leave weights without gradients (a DDP error).

Weights come from an open_clip pretrained tag (downloaded by open_clip), or from a local checkpoint file: a
.safetensors file or a torch file loaded with `weights_only=True`, holding a full CLIP state dict ("visual.*"
keys, the text tower is ignored) or a vision-tower-only one.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path
from typing import Any, Sequence

import open_clip
import torch
import torchvision.transforms.functional as TF
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIPVisionCfg, _build_vision_tower
from open_clip.transformer import VisionTransformer
from PIL import Image
from safetensors.torch import load_file
from torchvision.transforms import InterpolationMode

from data_pipelines.image import DEFAULT_MAX_PIXELS, load_image
from encoders.base import ModalityEncoder, ModalityProcessor
from encoders.registry import register_encoder

_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


class ImageProcessor(ModalityProcessor):
    """Image -> `(3, H, W)` float tensor: bicubic resize to cover `image_size`, center crop, CLIP normalisation.

    Holds no weights (picklable). Every image becomes the same size, so `collate` stacks and gives no mask.
    """

    def __init__(self, image_size: int | Sequence[int], mean: Sequence[float] = OPENAI_DATASET_MEAN,
                 std: Sequence[float] = OPENAI_DATASET_STD, max_pixels: int = DEFAULT_MAX_PIXELS,
                 modality: str = "image"):
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        self.image_size = (int(height), int(width))
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.max_pixels = max_pixels
        self.modality = modality

    def load(self, source: Any) -> Image.Image:
        return load_image(source, max_pixels=self.max_pixels)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        height, width = self.image_size
        # Scale so the image covers the target box (the shorter side fits for a square box), then crop the centre.
        scale = max(height / image.height, width / image.width)
        covering = [max(height, round(image.height * scale)), max(width, round(image.width * scale))]
        image = TF.resize(image, covering, interpolation=InterpolationMode.BICUBIC)
        image = TF.center_crop(image, [height, width])
        pixels = TF.to_tensor(image)  # (3, H, W) in [0, 1]
        return TF.normalize(pixels, self.mean, self.std)

    def collate(self, items: list[torch.Tensor]) -> dict[str, torch.Tensor | None]:
        return {"values": torch.stack(items), "mask": None}  # (N, 3, H, W)

    def dummy_input(self) -> torch.Tensor:
        return torch.zeros(3, *self.image_size)  # (3, H, W): the mean image after normalisation


@register_encoder("clip_vit")
class ClipViTEncoder(ModalityEncoder):
    """open_clip ViT vision tower -> patch tokens `(B, grid_h * grid_w, width)` and an all-True mask.

    model_name: an open_clip model name ("ViT-B-32", "ViT-L-14", ...), used unless `vision_cfg` is given.
    pretrained: an open_clip pretrained tag for `model_name` ("openai", "laion2b_s34b_b79k", ...) or a local
        checkpoint file (.safetensors, or a torch file loadable with weights_only=True).
    vision_cfg: a custom tower, open_clip `CLIPVisionCfg` keys; `heads` may replace `head_width`, e.g.
        {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "heads": 2, "mlp_ratio": 2.0}.
    image_mean / image_std: normalisation override (defaults: the pretrained tag's, else OpenAI CLIP's).
    """

    def __init__(self, model_name: str | None = "ViT-B-32", pretrained: str | None = None,
                 vision_cfg: dict | None = None, modality: str = "image", freeze: bool = False,
                 max_pixels: int = DEFAULT_MAX_PIXELS, image_mean: list[float] | None = None,
                 image_std: list[float] | None = None):
        super().__init__()
        checkpoint = _as_checkpoint_path(pretrained)
        mean, std = OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
        if vision_cfg is not None:
            if pretrained is not None and checkpoint is None:
                raise ValueError(f"pretrained tag {pretrained!r} needs an open_clip model_name, not a custom "
                                 "vision_cfg; give a local checkpoint file or drop vision_cfg")
            visual, source = _build_custom_tower(vision_cfg), "custom vision_cfg"
        elif model_name is None:
            raise ValueError("ClipViTEncoder needs model_name (an open_clip model) or vision_cfg (a custom tower)")
        elif pretrained is not None and checkpoint is None:
            visual, mean, std = _pretrained_tower(model_name, pretrained)
            source = f"open_clip model {model_name!r} ({pretrained})"
        else:
            visual, source = _named_tower(model_name), f"open_clip model {model_name!r}"
        if not isinstance(visual, VisionTransformer):
            raise ValueError(f"ClipViTEncoder needs a ViT vision tower, but {source} builds a "
                             f"{type(visual).__name__}")
        visual.output_tokens = True
        visual.proj = None  # only the pooled embedding uses it; see the module docstring
        if checkpoint is not None:
            _load_vision_weights(visual, checkpoint, source)

        self.visual = visual
        self.modality = modality
        self._arch = {"model_name": model_name, "vision_cfg": vision_cfg, "max_pixels": max_pixels,
                      "quick_gelu": _uses_quick_gelu(visual)}
        self.output_dim = visual.ln_post.normalized_shape[0]  # the width of the tokens ln_post normalises
        self.processor = ImageProcessor(visual.image_size, image_mean or mean, image_std or std, max_pixels,
                                        modality)
        self.set_frozen(freeze)

    def architecture_kwargs(self) -> dict:
        """Arguments that rebuild this tower without its pretrained source (an export loads the weights)."""
        vision_cfg = self._arch["vision_cfg"]
        if vision_cfg is None:  # a named model: its open_clip config, pinned so a tag's QuickGELU survives
            model_cfg = open_clip.get_model_config(self._arch["model_name"])
            vision_cfg = dict(model_cfg["vision_cfg"])
        vision_cfg = {**vision_cfg, "quick_gelu": self._arch["quick_gelu"]}
        return {"model_name": None, "pretrained": None, "vision_cfg": vision_cfg, "modality": self.modality,
                "max_pixels": self._arch["max_pixels"], "image_mean": list(self.processor.mean),
                "image_std": list(self.processor.std)}

    def forward(self, values: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # values: (B, 3, H, W) from ImageProcessor.collate; mask is None (all images have the same size).
        _, tokens = self.visual(values.to(self.visual.conv1.weight.dtype))  # (B, T, width)
        token_mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)  # (B, T)
        return tokens, token_mask


def _uses_quick_gelu(visual: torch.nn.Module) -> bool:
    return any(type(m).__name__ == "QuickGELU" for m in visual.modules())


def _build_custom_tower(vision_cfg: dict) -> torch.nn.Module:
    cfg = dict(vision_cfg)
    quick_gelu = bool(cfg.pop("quick_gelu", False))
    if "heads" in cfg:
        heads = cfg.pop("heads")
        width = cfg.get("width", CLIPVisionCfg.width)
        if width % heads:
            raise ValueError(f"vision_cfg: width {width} is not divisible by heads {heads}")
        cfg["head_width"] = width // heads
    known = {f.name for f in dataclasses.fields(CLIPVisionCfg)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"vision_cfg has unknown keys {unknown}; expected open_clip CLIPVisionCfg keys "
                         f"{sorted(known | {'heads', 'quick_gelu'})}")
    # embed_dim only sizes the contrastive projection, which is dropped.
    return _build_vision_tower(cfg.get("width", CLIPVisionCfg.width), CLIPVisionCfg(**cfg), quick_gelu=quick_gelu)


def _named_tower(model_name: str) -> torch.nn.Module:
    model_cfg = open_clip.get_model_config(model_name)
    if model_cfg is None:
        raise ValueError(f"unknown open_clip model_name {model_name!r}; see open_clip.list_models() for the names")
    # Build the vision tower alone: constructing the whole CLIP model would also build a text tower we discard.
    return _build_vision_tower(model_cfg["embed_dim"], model_cfg["vision_cfg"],
                               quick_gelu=model_cfg.get("quick_gelu", False))


def _pretrained_tower(model_name: str, tag: str) -> tuple[torch.nn.Module, Sequence[float], Sequence[float]]:
    tag_cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name) or "(none)"
        raise ValueError(f"pretrained={tag!r} is neither a local checkpoint file nor an open_clip pretrained tag "
                         f"of model {model_name!r} (its tags: {tags})")
    # OpenAI's weights were trained with QuickGELU; building them with nn.GELU would silently degrade them.
    model = open_clip.create_model(model_name, pretrained=tag, force_quick_gelu=tag_cfg.get("quick_gelu", False))
    visual = model.visual
    return visual, visual.preprocess_cfg["mean"], visual.preprocess_cfg["std"]


def _as_checkpoint_path(pretrained: str | None) -> Path | None:
    """`pretrained` as a local file, None if it is a tag; a path-looking value that does not exist is an error."""
    if pretrained is None:
        return None
    path = Path(os.path.expanduser(str(pretrained)))
    if path.is_file():
        return path
    if path.suffix in _CHECKPOINT_SUFFIXES or os.sep in str(pretrained) or path.exists():
        raise FileNotFoundError(f"pretrained checkpoint {str(pretrained)!r} is not a file (expected a "
                                ".safetensors file or a torch checkpoint, or an open_clip pretrained tag)")
    return None


def _load_vision_weights(visual: torch.nn.Module, path: Path, source: str) -> None:
    state_dict = _read_state_dict(path)
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}  # DDP-saved checkpoints
    if any(k.startswith("visual.") for k in state_dict):  # a full CLIP state dict: keep the vision tower
        state_dict = {k.removeprefix("visual."): v for k, v in state_dict.items() if k.startswith("visual.")}
    state_dict.pop("proj", None)
    try:
        visual.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path} does not match the vision tower of {source}: {e}") from e


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise ValueError(f"cannot load checkpoint {path} with torch.load(weights_only=True) ({e}); only plain "
                         "tensor state dicts are accepted: convert it to .safetensors") from e
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]  # training checkpoints wrap the weights
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f"checkpoint {path} does not hold a state dict (name -> tensor)")
    return checkpoint
