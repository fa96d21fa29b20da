"""config/authors_*.py: the model of the authors' code and released checkpoints (CLIP ViT-L/14 at 336 px, the fused
model by their width rule, their stage-1 n_l / n_s and text positions), built on the meta device and counted against
transformers' own modules built from openai/clip-vit-large-patch14-336's published configuration."""
import runpy
import sys
from pathlib import Path

import pytest
import torch
from transformers import CLIPTextConfig as HFCLIPTextConfig
from transformers import CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModel
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaModel

from backbones import CLIPTextConfig, LlamaConfig, ViTConfig
from configurator import InputError
from model import AlignModel, FusedVLM, FusedVLMConfig

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"authors_align": "train_align.py", "authors_gen": "train_gen.py", "authors_finetune": "train_gen.py"}

# openai/clip-vit-large-patch14-336, config.json (vision_config, text_config, projection_dim)
VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
              patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)
TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768)


def count(module):
    return sum(p.numel() for p in module.parameters())


def settings(name):
    return {k: v for k, v in runpy.run_path(str(ROOT / "config" / f"{name}.py")).items() if not k.startswith("_")}


def our_configs(cfg):
    """What the trainers build from clip_path's config.json (ViT.from_hf, CLIPText.from_hf) and the config file."""
    vit = ViTConfig(image_size=VISION["image_size"], patch_size=VISION["patch_size"], width=VISION["hidden_size"],
                    layers=VISION["num_hidden_layers"], heads=VISION["num_attention_heads"],
                    mlp=VISION["intermediate_size"], act=VISION["hidden_act"], eps=VISION["layer_norm_eps"])
    text = CLIPTextConfig(vocab_size=TEXT["vocab_size"], max_positions=cfg.get("text_max_positions", 77),
                          width=TEXT["hidden_size"], layers=TEXT["num_hidden_layers"],
                          heads=TEXT["num_attention_heads"], mlp=TEXT["intermediate_size"], act=TEXT["hidden_act"],
                          eps=TEXT["layer_norm_eps"], projection_dim=TEXT["projection_dim"])
    return FusedVLMConfig(vit=vit, llm=LlamaConfig(), text=text, fused_layers=cfg["fused_layers"],
                          fused_heads=cfg["fused_heads"], fused_mlp=cfg["fused_mlp"])


@pytest.mark.parametrize("name", CONFIGS)
def test_authors_config_follows_their_rules(name):
    cfg = settings(name)
    assert "clip-vit-large-patch14-336" in cfg["clip_path"]
    assert cfg["image_size"] == VISION["image_size"]  # native resolution: no position interpolation
    # their fused model: heads = vision width // 64, MLP = the ViT's, depth = the CLIP text tower's
    assert cfg["fused_heads"] == VISION["hidden_size"] // 64 == 16
    assert cfg["fused_mlp"] == VISION["intermediate_size"]
    assert cfg["fused_layers"] == TEXT["num_hidden_layers"]
    if name == "authors_align":  # their stage-1 checkpoints
        assert (cfg["n_l"], cfg["n_s"], cfg["text_max_positions"]) == (128, 8, 1024)
    else:
        assert (cfg["n_l"], cfg["n_s"]) == (256, 8)


def test_authors_stage_one_builds_on_meta_with_vit_l_336_counts():
    cfg = settings("authors_align")
    with torch.device("meta"):
        ours = AlignModel(our_configs(cfg))
        hf_vision = CLIPVisionModel(CLIPVisionConfig(**VISION))
        hf_text = CLIPTextModelWithProjection(HFCLIPTextConfig(**TEXT, max_position_embeddings=1024))
        hf_fused = LlamaModel(HFLlamaConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096,
                                            num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=16,
                                            rms_norm_eps=1e-6))
    # CLIP ViT-L/14-336's vision tower less its post-LayerNorm, which the authors' model never loads
    assert count(ours.vision.vit) == count(hf_vision) - 2 * 1024
    assert 303e6 < count(ours.vision.vit) < 304e6
    assert ours.vision.vit.position_embedding.shape == (577, 1024)
    # vision tower = trunk + new LayerNorm + merge conv 3x3 + separator
    assert count(ours.vision) == count(ours.vision.vit) + 2 * 1024 + 1024 * 1024 * 9 + 1024
    # the answer encoder: that CLIP's text tower with 1024 positions and its projection
    assert count(ours.text) == count(hf_text)
    assert ours.text.position_embedding.shape == (1024, 768)
    # the fused model: a Llama of 12 x (width 1024, 16 heads, MLP 4096) over CLIP's vocabulary, plus our query table
    assert count(ours.compressor) == count(hf_fused) + 767 * 1024
    assert count(ours.align_head) == 1024 * 768


@pytest.mark.parametrize("name", ["authors_gen", "authors_finetune"])
def test_authors_generation_stages_build_on_meta(name):
    with torch.device("meta"):
        vlm = FusedVLM(our_configs(settings(name)))
        vision_tokens = vlm.vision(torch.empty(2, 3, 336, 336))
    assert vision_tokens.shape == (2, 145, 1024)  # 24 x 24 patches -> 12 x 12 merged + separator
    assert count(vlm.bridge) == 1024 * 4096
    assert count(vlm.llm) == 6_738_415_616  # Llama-2-7B
    assert not any(p.requires_grad for p in vlm.llm.parameters())


@pytest.mark.parametrize("name", CONFIGS)
def test_authors_config_files_parse(name, monkeypatch, tmp_path):
    # parse_config raises on any key the script does not have; the first thing after parsing is the path check
    script = CONFIGS[name]
    monkeypatch.setattr(sys, "argv", [script, str(ROOT / "config" / f"{name}.py"), f"--clip_path={tmp_path}/none"])
    monkeypatch.chdir(ROOT)
    with pytest.raises(InputError, match="none: clip_path does not exist \\(download a CLIP checkpoint folder"):
        runpy.run_path(str(ROOT / script), run_name="__main__")
