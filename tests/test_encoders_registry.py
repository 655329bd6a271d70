"""The encoder registry: built-ins, decorator registration, entry-point discovery and its error messages."""
from __future__ import annotations

import sys

import pytest
import torch

import encoders
from encoders import ClipViTEncoder, ModalityEncoder, Wav2Vec2Encoder, create_encoder, list_encoders, register_encoder

TINY_VISION = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "heads": 2, "mlp_ratio": 2.0}


def test_builtins_are_listed_and_created_by_name():
    names = list_encoders()
    assert names == sorted(names)
    assert {"clip_vit", "wav2vec2"} <= set(names)
    encoder = create_encoder("clip_vit", vision_cfg=TINY_VISION)
    assert type(encoder) is ClipViTEncoder and encoder.output_dim == 64
    audio = create_encoder("wav2vec2", config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                               "intermediate_size": 64, "conv_dim": (16,), "conv_kernel": (400,),
                                               "conv_stride": (320,), "num_conv_pos_embeddings": 8,
                                               "num_conv_pos_embedding_groups": 2})
    assert type(audio) is Wav2Vec2Encoder and audio.output_dim == 32


def test_public_exports():
    for name in ["ModalityEncoder", "ModalityProcessor", "register_encoder", "create_encoder", "list_encoders",
                 "ClipViTEncoder", "Wav2Vec2Encoder"]:
        assert name in encoders.__all__ and hasattr(encoders, name)


def test_unknown_name_lists_the_available_encoders():
    with pytest.raises(ValueError) as err:
        create_encoder("no_such_encoder")
    message = str(err.value)
    assert "'no_such_encoder'" in message and "clip_vit" in message and "wav2vec2" in message
    assert "mmr1.encoders" in message


class _TinyEncoder(ModalityEncoder):
    def __init__(self, width: int = 4):
        super().__init__()
        self.output_dim = width
        self.linear = torch.nn.Linear(width, width)


def test_register_class_and_factory(isolated_registry):
    register_encoder("tiny")(_TinyEncoder)
    assert "tiny" in list_encoders()
    assert create_encoder("tiny", width=3).output_dim == 3

    @register_encoder("tiny_factory")
    def make_tiny(width: int = 5) -> ModalityEncoder:
        return _TinyEncoder(width * 2)

    assert make_tiny(1).output_dim == 2  # the decorator returns the factory unchanged
    assert create_encoder("tiny_factory", width=4).output_dim == 8


def test_registering_a_name_twice(isolated_registry):
    register_encoder("tiny")(_TinyEncoder)
    register_encoder("tiny")(_TinyEncoder)  # the same object again: fine
    with pytest.raises(ValueError, match=r"'tiny' is already registered to .*_TinyEncoder.*make_other"):
        @register_encoder("tiny")
        def make_other() -> ModalityEncoder:
            return _TinyEncoder()
    with pytest.raises(ValueError, match="already registered"):
        register_encoder("clip_vit")(_TinyEncoder)
    assert create_encoder("tiny").output_dim == 4  # the first registration survived


def test_bad_registrations(isolated_registry):
    with pytest.raises(ValueError, match="non-empty string"):
        register_encoder("")
    with pytest.raises(TypeError, match="not callable"):
        register_encoder("thing")(42)
    register_encoder("not_an_encoder")(lambda: torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="'not_an_encoder'.*returned Linear, expected a ModalityEncoder"):
        create_encoder("not_an_encoder")


def test_entry_point_is_listed_without_import_and_loaded_on_first_use(plugin_site):
    (plugin_site.path / "mmr1_lazy_plugin.py").write_text(
        "from encoders import ModalityEncoder\n"
        "class LazyEncoder(ModalityEncoder):\n"
        "    def __init__(self, width=6):\n"
        "        super().__init__()\n"
        "        self.output_dim = width\n")
    plugin_site.add_distribution("mmr1-lazy-plugin", {"mmr1.encoders": {"lazy": "mmr1_lazy_plugin:LazyEncoder"},
                                                      "some.other.group": {"ignored": "nowhere:Nothing"}})
    assert "lazy" in list_encoders() and "ignored" not in list_encoders()
    assert "mmr1_lazy_plugin" not in sys.modules  # listing does not import plug-ins
    encoder = create_encoder("lazy", width=7)
    assert type(encoder).__name__ == "LazyEncoder" and encoder.output_dim == 7
    assert encoder.__class__.__module__ == "mmr1_lazy_plugin"
    assert create_encoder("lazy").output_dim == 6  # now registered: a second lookup reuses it


def test_entry_point_that_cannot_be_imported(plugin_site):
    plugin_site.add_distribution("mmr1-broken", {"mmr1.encoders": {"broken": "mmr1_missing_module_xyz:Encoder"}})
    assert "broken" in list_encoders()  # a broken plug-in does not break listing
    with pytest.raises(ImportError) as err:
        create_encoder("broken")
    message = str(err.value)
    assert "'broken'" in message and "'mmr1_missing_module_xyz:Encoder'" in message
    assert "ModuleNotFoundError" in message and "mmr1_missing_module_xyz" in message
    assert isinstance(err.value.__cause__, ModuleNotFoundError)
    assert create_encoder("clip_vit", vision_cfg=TINY_VISION).output_dim == 64  # the others still work


def test_entry_point_whose_import_raises(plugin_site):
    (plugin_site.path / "mmr1_exploding_plugin.py").write_text("raise RuntimeError('needs a GPU driver')\n")
    plugin_site.add_distribution("mmr1-exploding", {"mmr1.encoders": {"exploding": "mmr1_exploding_plugin:Enc"}})
    with pytest.raises(ImportError, match=r"'exploding' = 'mmr1_exploding_plugin:Enc'.*RuntimeError: needs a GPU"):
        create_encoder("exploding")


def test_entry_point_with_a_missing_attribute_and_a_non_callable(plugin_site):
    (plugin_site.path / "mmr1_partial_plugin.py").write_text("NOT_A_FACTORY = 3\n")
    plugin_site.add_distribution("mmr1-partial", {"mmr1.encoders": {
        "missing_attr": "mmr1_partial_plugin:Encoder", "constant": "mmr1_partial_plugin:NOT_A_FACTORY"}})
    with pytest.raises(ImportError, match=r"'missing_attr' = 'mmr1_partial_plugin:Encoder'.*AttributeError"):
        create_encoder("missing_attr")
    with pytest.raises(TypeError, match=r"'constant' = 'mmr1_partial_plugin:NOT_A_FACTORY' is a int"):
        create_encoder("constant")


def test_one_name_declared_by_two_packages(plugin_site):
    plugin_site.add_distribution("mmr1-one", {"mmr1.encoders": {"clash": "pkg_one:Encoder"}})
    plugin_site.add_distribution("mmr1-two", {"mmr1.encoders": {"clash": "pkg_two:Encoder"}})
    assert list_encoders().count("clash") == 1
    with pytest.raises(ImportError, match=r"'clash'.*more than one.*'pkg_(one|two):Encoder' and 'pkg_(one|two)"):
        create_encoder("clash")


def test_entry_point_cannot_shadow_a_different_registered_encoder(plugin_site):
    (plugin_site.path / "mmr1_shadow_plugin.py").write_text(
        "from encoders import ModalityEncoder\nclass Shadow(ModalityEncoder):\n    pass\n")
    plugin_site.add_distribution("mmr1-shadow", {"mmr1.encoders": {"shadow": "mmr1_shadow_plugin:Shadow"}})
    register_encoder("shadow")(_TinyEncoder)  # registered in-process first: it wins, the entry point is not loaded
    assert type(create_encoder("shadow")) is _TinyEncoder
    assert "mmr1_shadow_plugin" not in sys.modules
