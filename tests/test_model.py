"""Tests of backbones.py and model.py: parity with transformers, parameter counts of the paper config, gradients,
loading errors, and checkpoint.py rebuilding a trained model.

Every reference is independent of the code under test: a transformers model saved to a folder the test writes, a formula,
a planted weight, or torch.nn.functional computed here.
"""
import json
import os
import pickle
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import (CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, GenerationConfig, LlamaConfig as
                          HFLlamaConfig, LlamaForCausalLM)
from transformers.utils import logging as hf_logging

from backbones import CLIPText, Llama, LlamaConfig, ViT, ViTConfig
from checkpoint import trained_vlm
from model import FusedVLM, FusedVLMConfig, VisionTower

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

# tiny CLIP: 28 px images, 7 px patches -> 4x4 grid; text vocab of 100 with eos 99
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
              patch_size=7)
TEXT = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16, bos_token_id=98, eos_token_id=99, pad_token_id=0)
TEXT_EOS = 99
PROJECTION_DIM = 24
# tiny Llama with grouped KV heads (4 query heads share 2 KV heads)
LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def save_clip(folder, act, seed=0):
    torch.manual_seed(seed)
    clip = CLIPModel(CLIPConfig(vision_config=dict(VISION, hidden_act=act), text_config=dict(TEXT, hidden_act=act),
                                projection_dim=PROJECTION_DIM)).eval()
    clip.save_pretrained(folder, safe_serialization=True)
    return clip


def save_llama(folder, seed=0, **overrides):
    torch.manual_seed(seed)
    llama = LlamaForCausalLM(HFLlamaConfig(**dict(LLAMA, **overrides))).eval()
    # ~20 KB shards, so the folder holds several files and a model.safetensors.index.json
    llama.save_pretrained(folder, safe_serialization=True, max_shard_size="20KB")
    assert (Path(folder) / "model.safetensors.index.json").exists()
    assert len(list(Path(folder).glob("*.safetensors"))) > 1
    return llama


@pytest.fixture(scope="module", params=["gelu", "quick_gelu"])
def clip_folder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"clip_{request.param}")
    return folder, save_clip(folder, request.param)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    return folder, save_llama(folder)


def left_padded_prompts():
    # three prompts of lengths 6, 3, 5, left-padded with 0; ids avoid pad 0, bos 1 and eos 2
    g = torch.Generator().manual_seed(1)
    lengths = [6, 3, 5]
    input_ids = torch.zeros(3, 6, dtype=torch.long)
    attention_mask = torch.zeros(3, 6, dtype=torch.long)
    for row, n in enumerate(lengths):
        input_ids[row, 6 - n:] = torch.randint(3, LLAMA["vocab_size"], (n,), generator=g)
        attention_mask[row, 6 - n:] = 1
    return input_ids, attention_mask


# ---------------------------------------------------------------------------------------------------------------
# ViT


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
@pytest.mark.parametrize("kind", ["CLIPModel", "CLIPVisionModel"])
def test_vit_matches_transformers(tmp_path, kind, act):
    torch.manual_seed(0)
    if kind == "CLIPModel":
        reference = save_clip(tmp_path, act).vision_model
    else:
        reference = CLIPVisionModel(CLIPVisionConfig(**VISION, hidden_act=act)).eval()
        reference.save_pretrained(tmp_path, safe_serialization=True)
    pixel_values = torch.randn(2, 3, 28, 28)
    vit = ViT.from_hf(tmp_path).eval()
    with torch.no_grad():
        ours = vit(pixel_values)
        expected = reference(pixel_values=pixel_values).last_hidden_state
    assert ours.shape == expected.shape == (2, 1 + 16, 32)
    assert max_diff(ours, expected) <= 1e-5


def test_vit_interpolates_position_embedding_bicubic(clip_folder):
    folder, clip = clip_folder
    old_grid, new_grid, width = 4, 6, VISION["hidden_size"]
    table = clip.vision_model.embeddings.position_embedding.weight.detach()  # (1 + 16, D)
    grid = table[1:].reshape(1, old_grid, old_grid, width).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    expected_table = torch.cat([table[:1], grid.permute(0, 2, 3, 1).reshape(new_grid * new_grid, width)])

    # transformers at 42 px with the interpolated table is the reference
    config = CLIPVisionConfig(**dict(VISION, image_size=42, hidden_act=clip.config.vision_config.hidden_act))
    reference = CLIPVisionModel(config).eval()
    state = {k.removeprefix("vision_model."): v for k, v in clip.state_dict().items() if k.startswith("vision_model.")}
    state["embeddings.position_embedding.weight"] = expected_table
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)

    vit = ViT.from_hf(folder, image_size=42).eval()
    pixel_values = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        ours = vit(pixel_values)
        expected = reference(pixel_values=pixel_values).last_hidden_state
    assert ours.shape == (2, 1 + 36, width)
    assert max_diff(ours, expected) <= 1e-5


# ---------------------------------------------------------------------------------------------------------------
# CLIP text tower


def text_batch():
    # right-padded: row 0 pads with the eos id (as CLIP's tokenizer does), so pooling must take the FIRST eos
    input_ids = torch.tensor([[5, 6, 7, TEXT_EOS, TEXT_EOS, TEXT_EOS], [8, 9, 10, 11, 12, TEXT_EOS]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    return input_ids, attention_mask


def test_clip_text_matches_transformers(clip_folder):
    folder, clip = clip_folder
    input_ids, attention_mask = text_batch()
    text = CLIPText.from_hf(folder).eval()
    with torch.no_grad():
        hidden, embeds = text(input_ids, attention_mask=attention_mask)
        expected_hidden = clip.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        features = clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    # transformers 5 returns an output object whose pooler_output is the projected embedding
    expected_embeds = features if torch.is_tensor(features) else features.pooler_output
    assert hidden.shape == expected_hidden.shape and embeds.shape == (2, PROJECTION_DIM)
    real = attention_mask.bool()
    assert max_diff(hidden[real], expected_hidden[real]) <= 1e-5
    assert max_diff(embeds, expected_embeds) <= 1e-5



def test_clip_text_legacy_eos_config_pools_at_endoftext(tmp_path):
    # configs written before transformers#24773 say eos_token_id=2; transformers then pools at the largest id,
    # which is <|endoftext|> (the last id of the vocabulary) wherever it occurs
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(vision_config=VISION, text_config=dict(TEXT, eos_token_id=2),
                                projection_dim=PROJECTION_DIM)).eval()
    clip.save_pretrained(tmp_path, safe_serialization=True)
    input_ids = torch.tensor([[5, 2, 7, TEXT_EOS, 0, 0], [8, 9, 10, 11, 12, TEXT_EOS]])  # a literal id 2 in row 0
    attention_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        _, embeds = CLIPText.from_hf(tmp_path).eval()(input_ids, attention_mask)
        features = clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    expected = features if torch.is_tensor(features) else features.pooler_output
    assert max_diff(embeds, expected) <= 1e-5

def test_clip_text_extends_position_table(tmp_path):
    clip = save_clip(tmp_path, "gelu")
    # plant an old table with a mean and spread that a default init would not give
    old = torch.randn(16, 32, generator=torch.Generator().manual_seed(3)) * 0.05 + 0.3
    state = load_file(tmp_path / "model.safetensors")
    state["text_model.embeddings.position_embedding.weight"] = old
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    clip.text_model.embeddings.position_embedding.weight.data.copy_(old)

    n = 200
    torch.manual_seed(4)
    text = CLIPText.from_hf(tmp_path, max_positions=n).eval()
    tables = [v.reshape(n, 32) for v in text.state_dict().values() if v.numel() == n * 32 and v.shape[-1] == 32]
    assert len(tables) == 1, "expected exactly one (max_positions, width) table in CLIPText"
    table = tables[0]
    assert torch.equal(table[:16], old)
    new = table[16:]
    assert abs(new.mean().item() - old.mean().item()) < 0.1 * old.std().item()
    assert abs(new.std().item() / old.std().item() - 1) < 0.1
    # new rows are drawn independently, not copies of one row: each column spreads like the old table
    assert abs(new.std(dim=0).mean().item() / old.std().item() - 1) < 0.2

    input_ids = torch.randint(1, 98, (1, n), generator=torch.Generator().manual_seed(5))
    input_ids[0, -1] = TEXT_EOS
    with torch.no_grad():
        hidden, embeds = text(input_ids)
        # causal attention: the first 16 positions see only the old rows, so they equal transformers
        expected = clip.text_model(input_ids=input_ids[:, :16]).last_hidden_state
    assert hidden.shape == (1, n, 32) and embeds.shape == (1, PROJECTION_DIM)
    assert torch.isfinite(hidden).all() and torch.isfinite(embeds).all()
    assert max_diff(hidden[:, :16], expected) <= 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Llama


def test_llama_logits_match_transformers_sharded(llama_folder):
    folder, reference = llama_folder
    llama = Llama.from_hf(folder, dtype=torch.float32).eval()
    input_ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = llama(input_ids=input_ids)
        expected = reference(input_ids=input_ids).logits
    assert ours.shape == (2, 9, 128)
    assert max_diff(ours, expected) <= 1e-5


def test_llama_left_padded_batch_matches_transformers(llama_folder):
    folder, reference = llama_folder
    llama = Llama.from_hf(folder, dtype=torch.float32).eval()
    input_ids, attention_mask = left_padded_prompts()
    # positions counted from each row's first real token, as transformers' generate does
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = llama(input_ids=input_ids, attention_mask=attention_mask)
        expected = reference(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        alone = reference(input_ids=input_ids[1:2, -3:]).logits  # row 1 without its padding
    real = attention_mask.bool()
    assert max_diff(ours[real], expected[real]) <= 1e-5
    assert max_diff(ours[1, -3:], alone[0]) <= 1e-5


def test_llama_inputs_embeds_equal_input_ids(llama_folder):
    folder, reference = llama_folder
    llama = Llama.from_hf(folder, dtype=torch.float32).eval()
    input_ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(2))
    embeds = reference.model.embed_tokens(input_ids).detach()
    with torch.no_grad():
        ours = llama(inputs_embeds=embeds)
        expected = reference(input_ids=input_ids).logits
    assert max_diff(ours, expected) <= 1e-5


def test_llama_hidden_states_match_transformers(llama_folder):
    folder, reference = llama_folder
    llama = Llama.from_hf(folder, dtype=torch.float32).eval()
    input_ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ours = llama.hidden_states(input_ids=input_ids)
        expected = reference(input_ids=input_ids, output_hidden_states=True).hidden_states
    assert len(ours) == len(expected) == LLAMA["num_hidden_layers"] + 1
    for layer, (a, b) in enumerate(zip(ours, expected)):
        assert a.shape == b.shape, f"layer {layer}"
        assert max_diff(a, b) <= 1e-5, f"layer {layer}"


def test_llama_reads_rope_theta_of_a_transformers5_config(tmp_path):
    # transformers 5 writes rope_theta inside "rope_parameters"; a loader reading only the top-level key would
    # silently fall back to 1e4
    reference = save_llama(tmp_path, rope_theta=5e5)
    assert "rope_theta" not in json.loads((tmp_path / "config.json").read_text())
    llama = Llama.from_hf(tmp_path, dtype=torch.float32).eval()
    input_ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert max_diff(llama(input_ids=input_ids), reference(input_ids=input_ids).logits) <= 1e-5


def hf_greedy(reference, input_ids, attention_mask, max_new_tokens, eos_token_id, min_new_tokens=0):
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                              eos_token_id=eos_token_id, pad_token_id=0 if eos_token_id is None else eos_token_id,
                              bos_token_id=1)
    with torch.no_grad():
        out = reference.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    new = out[:, input_ids.shape[1]:]
    # transformers stops once every row is done; pad its rows to full length with eos like ours
    if eos_token_id is not None and new.shape[1] < max_new_tokens:
        new = F.pad(new, (0, max_new_tokens - new.shape[1]), value=eos_token_id)
    return new


def pad_to(tokens, length, value):
    return F.pad(tokens, (0, length - tokens.shape[1]), value=value)


def test_llama_generate_matches_transformers_greedy(llama_folder):
    folder, reference = llama_folder
    llama = Llama.from_hf(folder, dtype=torch.float32).eval()
    input_ids, attention_mask = left_padded_prompts()
    with torch.no_grad():
        ours = llama.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=10)
    expected = hf_greedy(reference, input_ids, attention_mask, 10, eos_token_id=None)
    assert ours.shape == (3, 10)
    assert torch.equal(ours, expected)

    # an eos that row 0 first emits mid-way: that row stops there and is padded with eos afterwards
    row = expected[0].tolist()
    eos = next(token for step, token in enumerate(row) if step >= 2 and token not in row[:step])
    with torch.no_grad():
        ours = llama.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=10,
                              eos_token_id=eos)
    expected_eos = hf_greedy(reference, input_ids, attention_mask, 10, eos_token_id=eos)
    assert torch.equal(pad_to(ours, 10, eos), expected_eos)


def test_llama_generate_min_new_tokens_bans_eos_first(llama_folder):
    folder, reference = llama_folder
    llama = Llama.from_hf(folder, dtype=torch.float32).eval()
    input_ids, attention_mask = left_padded_prompts()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        last = reference(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits[:, -1]
    # plant: call row 0's greedy first token "eos", so eos would win the first step there
    eos = int(last[0].argmax())
    second_best = int(last[0].masked_fill(torch.arange(128) == eos, float("-inf")).argmax())
    with torch.no_grad():
        free = llama.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=6,
                              eos_token_id=eos, min_new_tokens=0)
        banned = llama.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=6,
                                eos_token_id=eos, min_new_tokens=1)
    assert free[0, 0] == eos and (free[0] == eos).all()  # the plant works, and a finished row is padded with eos
    assert banned[0, 0] == second_best
    assert (banned[:, 0] != eos).all()
    expected = hf_greedy(reference, input_ids, attention_mask, 6, eos_token_id=eos, min_new_tokens=1)
    assert torch.equal(pad_to(banned, 6, eos), expected)


# ---------------------------------------------------------------------------------------------------------------
# vision tower


def test_vision_tower_merges_and_appends_separator():
    torch.manual_seed(0)
    vision = VisionTower(ViTConfig(image_size=28, patch_size=7, width=32, layers=2, heads=4, mlp=64))
    assert torch.equal(vision.norm.weight, torch.ones(32)) and torch.equal(vision.norm.bias, torch.zeros(32))
    with torch.no_grad():
        for p in vision.parameters():  # plant non-trivial weights everywhere, the new LayerNorm included
            p.normal_(std=0.1)
        pixel_values = torch.randn(3, 3, 28, 28)
        out = vision(pixel_values)
        patches = F.layer_norm(vision.vit(pixel_values)[:, 1:], (32,), vision.norm.weight, vision.norm.bias, 1e-5)
        grid = patches.transpose(1, 2).reshape(3, 32, 4, 4)
        merged = (F.conv2d(grid, vision.merge.weight, stride=2, padding=1)
                  + F.interpolate(grid, size=(2, 2), mode="nearest"))
        expected = torch.cat([merged.flatten(2).transpose(1, 2), vision.separator.reshape(1, 1, 32).expand(3, 1, 32)],
                             dim=1)
    assert out.shape == (3, 2 * 2 + 1, 32)
    assert max_diff(out, expected) <= 1e-5


# ---------------------------------------------------------------------------------------------------------------
# the paper configuration, built on the meta device (no memory, no init time)


def test_paper_config_parameter_counts_and_shapes():
    with torch.device("meta"):
        vlm = FusedVLM(FusedVLMConfig(ViTConfig(), LlamaConfig()))

    def count(module):
        return sum(p.numel() for p in module.parameters())

    # ViT-H/14 at 336 px: patch conv (no bias), class embedding, 577 positions, pre-LN, 32 blocks; no post-LN
    # (the paper uses a new LayerNorm after the trunk, CLIP's post-LN is unused)
    d, mlp, layers, positions = 1280, 5120, 32, (336 // 14) ** 2 + 1
    assert positions == 577
    block = 2 * d + 4 * (d * d + d) + 2 * d + (d * mlp + mlp) + (mlp * d + d)
    vit_expected = 3 * 14 * 14 * d + d + positions * d + 2 * d + layers * block
    vits = [m for m in vlm.vision.modules() if isinstance(m, ViT)]
    assert len(vits) == 1
    assert count(vits[0]) == vit_expected
    assert 630e6 < vit_expected < 633e6

    # vision tower = trunk + new LayerNorm + merge conv 3x3 (no bias) + one separator token
    assert count(vlm.vision) == vit_expected + 2 * d + d * d * 9 + d
    assert any(p.shape == (d, d, 3, 3) for p in vlm.vision.parameters())

    # fused model: 12 Llama blocks at width 1280 (20 heads, SwiGLU 5120), RMSNorm, CLIP BPE embedding, query table
    fused_block = 4 * d * d + 3 * d * 5120 + 2 * d
    fused_expected = 49408 * d + 767 * d + 12 * fused_block + d
    assert count(vlm.compressor) == fused_expected
    assert any(p.shape == (767, d) for p in vlm.compressor.parameters())

    assert count(vlm.bridge) == d * 4096

    llm_expected = 32000 * 4096 * 2 + 32 * (4 * 4096 ** 2 + 3 * 4096 * 11008 + 2 * 4096) + 4096
    assert llm_expected == 6_738_415_616
    assert count(vlm.llm) == llm_expected
    assert not any(p.requires_grad for p in vlm.llm.parameters())

    # 24x24 patches -> 12x12 merged + separator = 145 tokens per crop
    vision_tokens = vlm.vision(torch.empty(2, 3, 336, 336, device="meta"))
    assert vision_tokens.shape == (2, 145, d)


# ---------------------------------------------------------------------------------------------------------------
# tiny FusedVLM: a batch built by hand to the batch contract of fusion.py


FUSED_EOS = 63  # last id of the tiny fused vocabulary plays CLIP's <|endoftext|>
SLOT = 0  # placeholder id at LLM slot positions


def tiny_vlm_config():
    return FusedVLMConfig(ViTConfig(image_size=28, patch_size=7, width=32, layers=2, heads=4, mlp=64),
                          LlamaConfig(vocab_size=128, dim=48, layers=2, heads=4, kv_heads=2, mlp=96),
                          fused_layers=2, fused_heads=4, fused_mlp=64, fused_vocab_size=64, n_queries=7)


def question(tokens, n):
    """Fused-model pieces of one question with n outputs: its tokens, n-1 query slots (rows 0..n-2), its EOS."""
    return [(t, False, False) for t in tokens] + [(row, True, True) for row in range(n - 1)] + [(FUSED_EOS, False, True)]


def llm_turn(first, n_slots, q, answer):
    """Llama pieces of one turn: (id, is_slot, is_label); answer tokens and their </s> are labels."""
    head = [(1, False, False), (20, False, False)] + ([(21, False, False)] if first else [])
    return (head + [(SLOT, True, False)] * n_slots + [(t, False, False) for t in q] +
            [(t, False, True) for t in answer] + [(2, False, True)])


# sample 0: 2 crops, two questions (n_l = 3, n_s = 2); sample 1: 3 crops, one question (n_l = 3)
SAMPLES = [
    dict(crops=2, fused=question([5, 6, 7], 3) + question([8, 9], 2),
         llm=llm_turn(True, 3, [30, 31], [40, 41]) + llm_turn(False, 2, [32], [42]),
         answers=[[10, 11], [12]]),
    dict(crops=3, fused=question([13, 14], 3), llm=llm_turn(True, 3, [33, 34, 35], [43, 44, 45]),
         answers=[[15, 16, 17]]),
]


def collate(samples):
    """Right-padded batch per the contract; pixel values are fixed per sample (seeded by its index in SAMPLES)."""
    def pad(rows, value, dtype):
        width = max(len(r) for r in rows)
        return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=dtype)

    pixels = [torch.randn(s["crops"], 3, 28, 28, generator=torch.Generator().manual_seed(SAMPLES.index(s)))
              for s in samples]
    answers = [a + [FUSED_EOS] for s in samples for a in s["answers"]]
    return dict(
        pixel_values=torch.cat(pixels),
        crop_to_sample=torch.cat([torch.full((s["crops"],), b, dtype=torch.long) for b, s in enumerate(samples)]),
        fused_ids=pad([[t for t, _, _ in s["fused"]] for s in samples], 0, torch.long),
        query_mask=pad([[q for _, q, _ in s["fused"]] for s in samples], False, torch.bool),
        output_mask=pad([[o for _, _, o in s["fused"]] for s in samples], False, torch.bool),
        fused_real_mask=pad([[True] * len(s["fused"]) for s in samples], False, torch.bool),
        input_ids=pad([[t for t, _, _ in s["llm"]] for s in samples], 0, torch.long),
        slot_mask=pad([[slot for _, slot, _ in s["llm"]] for s in samples], False, torch.bool),
        labels=pad([[t if label else -100 for t, _, label in s["llm"]] for s in samples], -100, torch.long),
        attention_mask=pad([[True] * len(s["llm"]) for s in samples], False, torch.bool),
        answer_ids=pad(answers, 0, torch.long),
        answer_attention_mask=pad([[True] * len(a) for a in answers], False, torch.bool),
    )


@pytest.fixture(scope="module")
def tiny_vlm():
    torch.manual_seed(0)
    return FusedVLM(tiny_vlm_config())


def test_tiny_batch_is_consistent():
    batch = collate(SAMPLES)
    assert batch["output_mask"].sum() == batch["slot_mask"].sum() == 8
    assert (batch["output_mask"].sum(1) == batch["slot_mask"].sum(1)).all()


def test_fused_vlm_gradients_and_loss(tiny_vlm):
    vlm = tiny_vlm
    batch = collate(SAMPLES)
    vlm.zero_grad(set_to_none=True)
    logits, loss_sum = vlm(batch)
    assert logits.shape == (*batch["input_ids"].shape, 128)
    loss_sum.backward()

    for name, p in vlm.llm.named_parameters():
        assert not p.requires_grad and p.grad is None, f"frozen LLM parameter {name} has a gradient"
    trainable = {f"{part}.{name}": p for part in ("vision", "compressor", "bridge")
                 for name, p in getattr(vlm, part).named_parameters()}
    assert trainable
    for name, p in trainable.items():
        assert p.requires_grad, f"{name} is frozen"
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} gets no gradient"

    # independent cross entropy: predict token t+1 from position t, summed over labelled tokens
    labels = batch["labels"]
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 128).detach(), labels[:, 1:].reshape(-1),
                               ignore_index=-100, reduction="sum")
    assert torch.allclose(loss_sum.detach(), expected, rtol=1e-5, atol=1e-5)


def test_fused_tokens_fill_the_llm_slots(tiny_vlm):
    vlm = tiny_vlm
    batch = collate(SAMPLES)
    with torch.no_grad():
        tokens = vlm.fused_tokens(batch)
        assert tokens.shape == (int(batch["output_mask"].sum()), 48)
        logits, _ = vlm(batch)
        # the LLM fed by hand: its own token embeddings ([0] of hidden_states), slot rows overwritten in order
        embeds = vlm.llm.hidden_states(input_ids=batch["input_ids"])[0].clone()
        embeds[batch["slot_mask"]] = tokens
        expected = vlm.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
        real = batch["attention_mask"]
        assert max_diff(logits[real], expected[real]) <= 1e-5
        # and the slots matter: with the slot rows left as placeholder embeddings the logits differ
        plain = vlm.llm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        assert max_diff(logits[real], plain[real]) > 1e-4


def test_fused_tokens_are_per_sample_and_causal(tiny_vlm):
    vlm = tiny_vlm
    batch = collate(SAMPLES)
    with torch.no_grad():
        tokens = vlm.fused_tokens(batch)  # rows 0-2: sample 0 question 1, rows 3-4: question 2, rows 5-7: sample 1
        # sample 1 alone (no padding, no other sample) gives its rows of the batch
        alone = vlm.fused_tokens(collate(SAMPLES[1:]))
        assert max_diff(tokens[5:], alone) <= 1e-5
        # changing sample 0's images changes only sample 0's rows
        other = collate(SAMPLES)
        other["pixel_values"][:2] = torch.randn(2, 3, 28, 28)
        changed = vlm.fused_tokens(other)
        assert max_diff(changed[5:], tokens[5:]) <= 1e-5 and max_diff(changed[:5], tokens[:5]) > 1e-6
        # changing sample 0's second question changes only that question's rows (causal, row-major order)
        other = collate(SAMPLES)
        other["fused_ids"][0, 6:8] = torch.tensor([50, 51])
        changed = vlm.fused_tokens(other)
        assert max_diff(changed[:3], tokens[:3]) <= 1e-5 and max_diff(changed[5:], tokens[5:]) <= 1e-5
        assert max_diff(changed[3:5], tokens[3:5]) > 1e-6


# ---------------------------------------------------------------------------------------------------------------
# bad checkpoints fail with a message that names the problem


def rewrite(path, edit):
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


def test_missing_key_is_named(tmp_path):
    save_clip(tmp_path / "clip", "gelu")
    key = "vision_model.encoder.layers.1.mlp.fc1.weight"
    rewrite(tmp_path / "clip" / "model.safetensors", lambda state: state.pop(key))
    with pytest.raises(Exception, match=r"encoder\.layers\.1\.mlp\.fc1\.weight"):
        ViT.from_hf(tmp_path / "clip")

    save_llama(tmp_path / "llama")
    key = "model.layers.1.mlp.up_proj.weight"
    index_path = tmp_path / "llama" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    rewrite(tmp_path / "llama" / index["weight_map"].pop(key), lambda state: state.pop(key))
    index_path.write_text(json.dumps(index))
    with pytest.raises(Exception, match=r"layers\.1\.mlp\.up_proj\.weight"):
        Llama.from_hf(tmp_path / "llama", dtype=torch.float32)


def test_wrong_shape_is_named(tmp_path):
    save_clip(tmp_path, "gelu")
    key = "text_model.encoder.layers.0.mlp.fc2.weight"
    rewrite(tmp_path / "model.safetensors", lambda state: state.update({key: torch.zeros(32, 65)}))
    with pytest.raises(Exception, match=r"encoder\.layers\.0\.mlp\.fc2\.weight"):
        CLIPText.from_hf(tmp_path)


class Planted:
    """Unpickling this creates a marker file: proof that a loader unpickled the user's file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


@pytest.mark.parametrize("loader", ["vit", "text", "llama"])
def test_pickle_only_folder_is_refused_unopened(tmp_path, monkeypatch, loader):
    folder = tmp_path / "ckpt"
    if loader == "llama":
        save_llama(folder)
    else:
        save_clip(folder, "gelu")
    for f in folder.glob("*.safetensors*"):
        f.unlink()
    marker = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Planted(marker)))

    def refuse(*args, **kwargs):
        raise AssertionError("a user's pickle file was opened")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    load = dict(vit=ViT.from_hf, text=CLIPText.from_hf, llama=Llama.from_hf)[loader]
    with pytest.raises(Exception) as error:
        load(folder)
    assert not isinstance(error.value, AssertionError), error.value
    assert not marker.exists()
    assert str(folder) in str(error.value) and "safetensors" in str(error.value)


@pytest.mark.parametrize("loader", ["vit", "text", "llama"])
def test_missing_folder_is_named(tmp_path, loader):
    folder = tmp_path / "no_such_checkpoint"
    load = dict(vit=ViT.from_hf, text=CLIPText.from_hf, llama=Llama.from_hf)[loader]
    with pytest.raises(Exception) as error:
        load(folder)
    assert str(folder) in str(error.value)


def test_from_pretrained_rebuilds_the_trained_model_and_refuses_another_llm(tiny_vlm):
    batch = collate(SAMPLES)
    weights = {k: v.clone() for k, v in tiny_vlm.trainable_state_dict().items()}
    rebuilt = trained_vlm(tiny_vlm.cfg, weights, tiny_vlm.llm, "ckpt.safetensors")
    with torch.no_grad():
        assert max_diff(rebuilt(batch)[0], tiny_vlm(batch)[0]) == 0.0
    other = Llama(LlamaConfig(vocab_size=128, dim=48, layers=1, heads=4, kv_heads=2, mlp=96))
    with pytest.raises(ValueError, match="ckpt.safetensors: trained with the LLM"):
        trained_vlm(tiny_vlm.cfg, weights, other, "ckpt.safetensors")
