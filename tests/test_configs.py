"""Every shipped YAML parses through the `mmr1` CLI, and configs round-trip through plain data."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mmr1.cli import main
from mmr1.config import MoEConfig, R1Config, config_from_dict, config_to_dict
from mmr1.model import EncoderConfig, MultimodalConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
# configs/profiles/*.yaml are overlays (`--config configs/demo.yaml --config <profile>`); the others stand alone.
PROFILES = sorted((CONFIG_DIR / "profiles").rglob("*.yaml"))
CONFIGS = sorted(p for p in CONFIG_DIR.rglob("*.yaml") if p not in PROFILES)


def test_there_are_configs():
    assert any(p.name == "demo.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_yaml_parses_through_cli(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["backbone"]["dim"] > 0
    assert printed["data"]["train_manifest"]


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_profile_overlays_parse_on_the_demo_config(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIG_DIR / "demo.yaml"), "--config", str(path), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)["model"]["backbone"]
    overlay = yaml.safe_load(path.read_text())["model"]["backbone"]
    for key, value in overlay.items():  # every field of the profile took effect (nested ones: defaults filled in)
        got = printed[key]
        assert ({k: got[k] for k in value} if isinstance(value, dict) else got) == value, key
    R1Config(**{**printed, "moe": None, "rope_scaling": None})  # and the merged backbone is a valid config


def test_bad_yaml_key_is_named(tmp_path, capsys):
    bad = yaml.safe_load(CONFIGS[0].read_text())
    bad["model"]["backbone"]["dimm"] = 3
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code != 0
    assert "dimm" in capsys.readouterr().err


def test_config_roundtrip_json():
    cfg = MultimodalConfig(
        backbone=R1Config(dim=64, n_heads=4, n_kv_heads=2, cross_attn_layers=[1], moe=MoEConfig(num_experts=8,
                                                                                               num_groups=4, topk_groups=2)),
        encoders={"image": EncoderConfig(name="clip_vit", kwargs={"vision_cfg": {"width": 32}}, freeze=True)})
    data = json.loads(json.dumps(cfg.to_dict()))
    assert MultimodalConfig.from_dict(data) == cfg
    assert config_from_dict(R1Config, config_to_dict(cfg.backbone)) == cfg.backbone
    with pytest.raises(ValueError, match="unknown field"):
        config_from_dict(R1Config, {"dimm": 3})
    with pytest.raises(ValueError, match="num_groups"):
        MoEConfig(num_experts=10, num_groups=4)
