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
# configs/profiles/*.yaml are either engine profiles (a top-level `engine:` block, read by
# mmr1.engine.load_profile) or training overlays (`--config configs/demo.yaml --config <profile>`);
# every other YAML is a stand-alone `mmr1 fit` config.
ALL_PROFILES = sorted((CONFIG_DIR / "profiles").rglob("*.yaml"))
ENGINE_PROFILES = [p for p in ALL_PROFILES if "engine" in (yaml.safe_load(p.read_text()) or {})]
PROFILES = [p for p in ALL_PROFILES if p not in ENGINE_PROFILES]
CONFIGS = sorted(set(CONFIG_DIR.rglob("*.yaml")) - set(ALL_PROFILES))


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


@pytest.mark.parametrize("path", ENGINE_PROFILES, ids=lambda p: p.name)
def test_engine_profile_parses(path):
    from mmr1.engine import EngineConfig, load_profile
    cfg = load_profile(path)
    assert isinstance(cfg, EngineConfig)
    assert config_from_dict(EngineConfig, config_to_dict(cfg)) == cfg


def test_engine_profiles_exist_and_refuse_typos(tmp_path):
    from mmr1.engine import EngineConfig, load_profile
    assert {"low_latency.yaml", "default.yaml"} <= {p.name for p in ENGINE_PROFILES}
    assert {"long_context.yaml", "demo_hybrid.yaml"} <= {p.name for p in PROFILES}
    assert load_profile(CONFIG_DIR / "profiles" / "default.yaml") == EngineConfig()
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine:\n  max_bach: 3\n")
    with pytest.raises(ValueError, match="max_bach"):
        load_profile(bad)
    bad.write_text("max_batch: 3\n")
    with pytest.raises(ValueError, match="'engine'"):
        load_profile(bad)


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
