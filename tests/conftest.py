"""Shared fixtures.

Plug-in fixtures "install" a distribution the way pip would, as far as discovery is concerned: a
`<name>-<version>.dist-info` directory with METADATA and entry_points.txt inside a site directory that is put
on sys.path (this process) and PYTHONPATH (subprocesses, e.g. `mmr1 fit`). Everything is undone afterwards:
sys.path, PYTHONPATH, the encoder registry and the plug-in modules imported during the test.
"""
from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

PLUGINS_DIR = Path(__file__).resolve().parent / "plugins"  # importable third-party test packages
DEPTH_ENCODER = "depth_cnn"
DEPTH_ENTRY_POINT = "mmr1_depth_plugin:DepthEncoder"


def write_distribution(site_dir: Path, dist_name: str, entry_points: dict[str, dict[str, str]],
                       version: str = "0.1.0") -> Path:
    """Write `<dist_name>-<version>.dist-info` with `entry_points` ({group: {name: "module:attr"}})."""
    dist_info = site_dir / f"{dist_name.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: {version}\n")
    sections = []
    for group, names in entry_points.items():
        sections.append(f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in names.items()))
    (dist_info / "entry_points.txt").write_text("\n".join(sections))
    return dist_info


@pytest.fixture(autouse=True, scope="session")
def cli_argv_of_its_own():
    """Tests call the CLI with explicit args; pytest's own flags (`-q`) must not be in sys.argv then, or
    LightningCLI warns that it got both. Session-wide, so module fixtures that train see it too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", sys.argv[:1])
        yield


@pytest.fixture
def isolated_registry(monkeypatch):
    """The encoder registry as it is now; whatever the test registers is forgotten afterwards."""
    from encoders import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    return registry


@dataclass
class PluginSite:
    path: Path  # on sys.path and PYTHONPATH for the duration of the test
    add_distribution: Callable[..., Path]  # (dist_name, {group: {name: target}}) -> the .dist-info directory


@pytest.fixture
def plugin_site(tmp_path, monkeypatch, isolated_registry):
    """An empty site directory on sys.path and PYTHONPATH; also makes `tests/plugins` packages importable."""
    site = tmp_path / "site-packages"
    site.mkdir()
    monkeypatch.syspath_prepend(str(PLUGINS_DIR))
    monkeypatch.syspath_prepend(str(site))  # also invalidates importlib's (metadata) path caches
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), str(PLUGINS_DIR), *inherited]))
    modules_before = set(sys.modules)

    def add_distribution(dist_name: str, entry_points: dict[str, dict[str, str]]) -> Path:
        dist_info = write_distribution(site, dist_name, entry_points)
        importlib.invalidate_caches()
        return dist_info

    yield PluginSite(site, add_distribution)
    # Plug-in modules imported by the test (from the site dir or tests/plugins) must not outlive it.
    for name in set(sys.modules) - modules_before:
        module_file = getattr(sys.modules[name], "__file__", None) or ""
        if module_file.startswith((str(site), str(PLUGINS_DIR))):
            del sys.modules[name]


@pytest.fixture
def depth_plugin(plugin_site) -> str:
    """Make the `mmr1-depth-plugin` distribution visible (in-process and in subprocesses); returns its name."""
    plugin_site.add_distribution("mmr1-depth-plugin", {"mmr1.encoders": {DEPTH_ENCODER: DEPTH_ENTRY_POINT}})
    return DEPTH_ENCODER
