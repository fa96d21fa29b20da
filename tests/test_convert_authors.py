"""
convert_authors.py on a tiny model in the authors' parameter layout: the names and shapes their classes produce
(transformers' CLIPVisionModel under imgque_backbone.clip_model.vision_model plus pos_layrnorm, vision_embed_merge
and token_LF; a LlamaModel as imgque_backbone.imgque_model whose embed_tokens holds the placeholder rows;
fusion_backbone.imgque_proj; a LlamaForCausalLM as llm_backbone), random values, their config.json layout and a
CLIP tokenizer made the way their parser makes it (placeholder tokens added, then save_pretrained).

After conversion our FusedVLM, fed by fusion.py, must give the fused tokens and LLM logits of their forward pass,
which is re-computed here from their documented steps with transformers modules and plain torch ops.
"""
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import sentencepiece
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTokenizer, CLIPVisionConfig, CLIPVisionModel, LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM, LlamaModel
from transformers.utils import logging as hf_logging

import convert_authors
from backbones import Llama
from checkpoint import load_checkpoint, load_trainable
from configurator import InputError
from fusion import DEFAULT_SYSTEM_PROMPT, TokenSpace, TokenSpaceConfig, collate
from model import FusedVLM, FusedVLMConfig

hf_logging.set_verbosity_error()

_spec = importlib.util.spec_from_file_location("prepare", Path(__file__).parents[1] / "data/synthetic/prepare.py")
prepare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prepare)

WIDTH, VIT_HEADS, VIT_MLP, IMAGE, PATCH = 128, 4, 256, 56, 14  # 4x4 patches -> 2x2 merged + separator = 5 per crop
N_L, N_S, N_PLACEHOLDERS, NUM_CROPS = 6, 3, 8, 2  # more placeholders than n_l - 1, like a model fine-tuned down
SPARE_ROWS = 2  # embedding rows with no token, as a table padded beyond the tokenizer would have
LLM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
           rms_norm_eps=1e-5, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
TEXTS = [f"{q} {c} {s} in row {r}, column {k}?" for q in ("Is there a", "What colour is the", "Where is the")
         for c in ("red", "green", "blue", "yellow", "purple", "orange") for s in ("circle", "square", "triangle")
         for r, k in ((1, 2), (3, 4))] + ["A chat between a curious user and an artificial intelligence assistant.",
                                         "[INST] <<SYS>> <</SYS>> [/INST] Yes No It is red."]
TURNS = [("What colour is the circle in row 1, column 2?", "It is red."), ("Is there a blue square?", "No")]


def perturbed(module, scale):
    """Every parameter random (norm weights around 1, biases around 0), so no swapped tensor goes unnoticed."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module.eval()


def build_theirs(folder):
    """Their save_pretrained folder, tiny; returns the pieces the reference forward needs."""
    torch.manual_seed(0)
    prepare.build_clip_vocab(TEXTS, folder / "clip_base", num_merges=120)
    clip_tok = CLIPTokenizer(vocab=str(folder / "clip_base/vocab.json"), merges=str(folder / "clip_base/merges.txt"))
    base_vocab = len(clip_tok)
    clip_tok.add_tokens([f"<|placeholder_qed_{j}|>" for j in range(N_PLACEHOLDERS)], special_tokens=False)
    clip_tok.save_pretrained(folder / "clip")  # what their ChatQEDParserBase + trainer leave behind
    shutil.rmtree(folder / "clip_base")
    prepare.train_llama_tokenizer(TEXTS, folder, vocab_size=300)
    llm_vocab = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).vocab_size()

    vit = perturbed(CLIPVisionModel(CLIPVisionConfig(
        image_size=IMAGE, patch_size=PATCH, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=VIT_HEADS,
        intermediate_size=VIT_MLP, hidden_act="quick_gelu", layer_norm_eps=1e-5)), 0.05)
    fused_config = dict(vocab_size=base_vocab + N_PLACEHOLDERS + SPARE_ROWS, hidden_size=WIDTH,
                        intermediate_size=VIT_MLP, num_hidden_layers=2, num_attention_heads=WIDTH // 64,
                        rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048)
    fused = perturbed(LlamaModel(HFLlamaConfig(**fused_config)), 0.05)
    llm = perturbed(LlamaForCausalLM(HFLlamaConfig(vocab_size=llm_vocab, **LLM)), 0.05)
    extra = {"pos_layrnorm.weight": 1 + 0.1 * torch.randn(WIDTH), "pos_layrnorm.bias": 0.1 * torch.randn(WIDTH),
             "vision_embed_merge.weight": 0.02 * torch.randn(WIDTH, WIDTH, 3, 3), "token_LF": torch.randn(1, 1, WIDTH)}
    proj = 0.05 * torch.randn(LLM["hidden_size"], WIDTH)

    state = {convert_authors.VISION + k: v for k, v in vit.state_dict().items() if not k.startswith("post_layernorm")}
    state.update({convert_authors.VISION + k: v for k, v in extra.items()})
    state.update({convert_authors.FUSED + k: v for k, v in fused.state_dict().items()})
    state[convert_authors.BRIDGE] = proj
    state.update({convert_authors.LLM + k: v for k, v in llm.state_dict().items()})
    save_sharded(state, folder)

    vision_config = dict(vit.config.to_dict(), model_type="clip_vision_hd", enable_local_merge=True,
                         enable_token_crlf=True, vembed_merge_kernel_size=3, vembed_merge_stride=2)
    config = {
        "model_type": "modeling_query_adapt_clip_llm", "architectures": ["ImageMultiQueryCLIPLLMModel"],
        "fusion_name": "img_multi_que_clip_fusion_linear", "append_special_padding": True,
        "length_que_end": N_L, "length_que_end_short": N_S, "hidden_size": LLM["hidden_size"],
        "imgque_model_name_or_path": "./checkpoints/stale", "llm_model_name_or_path": "./llama_hf_mirror/stale",
        "imgque_config": {"model_type": "modeling_image_hd_multi_query_clip", "num_hidden_layers": 2,
                          "vocab_size": fused_config["vocab_size"], "length_que_end": 16, "length_que_end_short": 8,
                          "vision_config": vision_config, "text_config": {"num_hidden_layers": 12},
                          "imgque_config": fused_config},
        "llm_config": llm.config.to_dict(),
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "Phi3VImageProcessor",
                                                                 "num_crops": NUM_CROPS}))
    return dict(vit=vit, fused=fused, llm=llm, proj=proj, clip_tok=CLIPTokenizer.from_pretrained(folder / "clip"),
                sp=sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")), **extra)


def save_sharded(state, folder, shards=2):
    """Like save_pretrained's sharding: several files and model.safetensors.index.json."""
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[i::shards]}
        save_file(part, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def read_state(folder):
    with open(folder / "model.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    state = {}
    for k, name in weight_map.items():
        with safe_open(folder / name, "pt") as f:
            state[k] = f.get_tensor(k)
    return state


@torch.no_grad()
def their_forward(ref, pixel_values, turns):
    """Their forward for one conversation, from their documented steps -> (fused tokens (n, llm dim), logits (L, V))."""
    # vision (CLIPVisionHDTransformer): last ViT layer -> pos_layrnorm -> drop CLS -> 3x3/s2 conv + nearest -> + LF
    h = ref["vit"](pixel_values=pixel_values).last_hidden_state
    h = F.layer_norm(h, (WIDTH,), ref["pos_layrnorm.weight"], ref["pos_layrnorm.bias"], eps=1e-5)[:, 1:]
    K, P, D = h.shape
    grid = h.reshape(K, int(P ** 0.5), int(P ** 0.5), D).permute(0, 3, 1, 2)
    merged = F.conv2d(grid, ref["vision_embed_merge.weight"], stride=2, padding=1)
    merged = merged + F.interpolate(grid, size=merged.shape[-2:], mode="nearest")
    vision = torch.cat([merged.reshape(K, D, -1).permute(0, 2, 1), ref["token_LF"].expand(K, 1, D)], dim=1)
    vision = vision.reshape(1, -1, D)  # the sample's crops one after the other
    # query side (ChatQEDQueryParser, their CLIP tokenizer): question, n - 1 placeholder tokens, EOS per question
    tok = ref["clip_tok"]
    ids, is_output = [], []
    for i, (question, _) in enumerate(turns):
        n = N_L if i == 0 else N_S
        text = tok(question, add_special_tokens=False).input_ids
        ids += text + tok.convert_tokens_to_ids([f"<|placeholder_qed_{j}|>" for j in range(n - 1)]) + [tok.eos_token_id]
        is_output += [False] * len(text) + [True] * n
    x = torch.cat([vision, ref["fused"].embed_tokens(torch.tensor([ids]))], dim=1)
    out = ref["fused"](inputs_embeds=x).last_hidden_state[0, vision.shape[1]:]  # causal over the whole sequence
    fused_tokens = out[torch.tensor(is_output)] @ ref["proj"].T  # QED|EOS outputs, projected
    # LLM side (ChatQEDParser, llama-2-vision): pieces encoded one by one; QED slots (id 2) right before each question
    sp = ref["sp"]
    llm_ids, slots = [], []
    for i, (question, answer) in enumerate(turns):
        head = [1] + sp.encode(f"[INST] <<SYS>>\n{DEFAULT_SYSTEM_PROMPT}\n<</SYS>>\n\n" if i == 0 else "[INST]")
        n = N_L if i == 0 else N_S
        tail = sp.encode(question) + sp.encode("[/INST]") + ([] if answer is None else sp.encode(answer + " ") + [2])
        llm_ids += head + [2] * n + tail
        slots += [False] * len(head) + [True] * n + [False] * len(tail)
    embeds = ref["llm"].get_input_embeddings()(torch.tensor([llm_ids]))
    embeds[0, torch.tensor(slots)] = fused_tokens
    return fused_tokens, ref["llm"](inputs_embeds=embeds).logits[0]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("authors")
    src, out = root / "theirs", root / "ours"
    src.mkdir()
    ref = build_theirs(src)
    convert_authors.main([f"--src={src}", f"--out={out}"])
    return src, out, ref


def load_ours(out):
    tensors, meta = load_checkpoint(os.path.join(out, "ckpt.safetensors"), prefix="model.")
    vlm = FusedVLM(FusedVLMConfig.from_dict(meta["model_config"]))
    load_trainable(vlm, {k[len("model."):]: v for k, v in tensors.items()}, out)
    vlm.llm = Llama.from_hf(meta["llama_path"]).requires_grad_(False)
    return vlm.eval(), meta


def test_converted_model_matches_their_forward(converted):
    src, out, ref = converted
    vlm, meta = load_ours(out)
    token_space = TokenSpace(TokenSpaceConfig(clip_path=meta["clip_path"], llama_path=meta["llama_path"],
                                              **meta["token_space"]))
    images = [Image.new("RGB", (90, 50), (200, 30, 30)), Image.new("RGB", (40, 70), (20, 90, 200))]
    conversations = [TURNS, TURNS[1:]]  # two turns (n_l then n_s outputs) and one turn
    torch.manual_seed(1)
    for image in images:  # texture, so that crops differ
        image.putdata([tuple(int(v) for v in torch.randint(0, 256, (3,))) for _ in range(image.width * image.height)])
    samples = [token_space.make_sample(image, turns) for image, turns in zip(images, conversations)]
    batch = collate(samples)
    with torch.no_grad():
        ours_fused = vlm.fused_tokens(batch)
        ours_logits, _ = vlm(batch)

    refs = [their_forward(ref, s["pixel_values"], turns) for s, turns in zip(samples, conversations)]
    theirs_fused = torch.cat([f for f, _ in refs])
    assert ours_fused.shape == theirs_fused.shape == (N_L + N_S + N_L, LLM["hidden_size"])
    assert (ours_fused - theirs_fused).abs().max() < 1e-4 * theirs_fused.abs().max()
    for b, (_, logits) in enumerate(refs):
        assert int(batch["attention_mask"][b].sum()) == len(logits)
        assert (ours_logits[b, :len(logits)] - logits).abs().max() < 1e-4 * logits.abs().max()


def test_config_and_meta_read_from_their_config(converted):
    src, out, ref = converted
    _, meta = load_checkpoint(os.path.join(out, "ckpt.safetensors"))
    cfg = FusedVLMConfig.from_dict(meta["model_config"])
    assert meta["stage"] == "gen"
    assert meta["token_space"]["n_l"] == N_L and meta["token_space"]["n_s"] == N_S  # top level, not imgque_config's
    assert meta["token_space"]["num_crops"] == NUM_CROPS and meta["token_space"]["image_size"] == IMAGE
    assert cfg.vit.act == "quick_gelu" and cfg.fused_eps == 1e-6 and cfg.llm.eps == 1e-5
    assert cfg.fused_heads == WIDTH // 64 and cfg.fused_mlp == VIT_MLP and cfg.fused_layers == 2
    base_vocab = len(json.loads((out / "clip/vocab.json").read_text()))
    assert cfg.fused_vocab_size == base_vocab == ref["clip_tok"].convert_tokens_to_ids("<|placeholder_qed_0|>")
    assert cfg.n_queries == N_PLACEHOLDERS
    assert meta["llama_path"] == os.path.abspath(out / "llama") and (out / "llama/tokenizer.model").is_file()
    # the planted rows: query j is the embedding row of <|placeholder_qed_j|>
    tensors, _ = load_checkpoint(os.path.join(out, "ckpt.safetensors"), prefix="model.compressor.queries")
    table = ref["fused"].embed_tokens.weight
    row = ref["clip_tok"].convert_tokens_to_ids("<|placeholder_qed_5|>")
    assert torch.equal(tensors["model.compressor.queries"][5], table[row])


def test_reads_transformers4_tokenizer_layout(converted, tmp_path):
    """transformers 4.44 (theirs) saves vocab.json, merges.txt and added_tokens.json too; both layouts agree."""
    src, out, _ = converted
    vocab, merges, placeholders, _ = convert_authors.read_clip_vocabulary(str(src / "clip"))
    old = tmp_path / "clip"
    old.mkdir()
    shutil.copyfile(out / "clip/vocab.json", old / "vocab.json")
    shutil.copyfile(out / "clip/merges.txt", old / "merges.txt")
    added = {f"<|placeholder_qed_{j}|>": i for j, i in enumerate(placeholders)}
    (old / "added_tokens.json").write_text(json.dumps(added))
    assert convert_authors.read_clip_vocabulary(str(old)) == (vocab, merges, placeholders, {})
    decoder = {str(placeholders[0] + 1): {"content": "<|placeholder_qed_0|>"}}  # disagrees with added_tokens.json
    (old / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}))
    with pytest.raises(ValueError, match="placeholder_qed_0"):
        convert_authors.read_clip_vocabulary(str(old))


def edited_copy(src, dst, edit):
    shutil.copytree(src, dst)
    state = read_state(dst)
    for f in dst.glob("model*.safetensors*"):
        f.unlink()
    edit(state)
    save_sharded(state, dst)
    return dst


def test_missing_and_unknown_keys_stop_with_their_names(converted, tmp_path):
    src, _, _ = converted
    missing = convert_authors.VISION + "pos_layrnorm.weight"
    broken = edited_copy(src, tmp_path / "missing", lambda s: s.pop(missing))
    with pytest.raises(InputError, match="pos_layrnorm.weight"):
        convert_authors.main([f"--src={broken}", f"--out={tmp_path / 'out1'}"])

    unknown = convert_authors.VISION + "post_layernorm.weight"
    extra = edited_copy(src, tmp_path / "extra", lambda s: s.update({unknown: torch.ones(WIDTH)}))
    with pytest.raises(InputError, match="post_layernorm.weight"):
        convert_authors.main([f"--src={extra}", f"--out={tmp_path / 'out2'}"])
    assert not (tmp_path / "out2/ckpt.safetensors").exists()


def test_pickle_weights_are_refused(converted, tmp_path):
    src, _, _ = converted
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copyfile(src / "config.json", folder / "config.json")
    shutil.copytree(src / "clip", folder / "clip")
    (folder / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(ValueError, match="safetensors"):
        convert_authors.main([f"--src={folder}", f"--out={tmp_path / 'out'}"])


def test_llama_path_must_hold_their_llm(converted, tmp_path):
    src, out, _ = converted
    convert_authors.main([f"--src={src}", f"--out={tmp_path / 'shared'}", f"--llama_path={out / 'llama'}"])
    _, meta = load_checkpoint(str(tmp_path / "shared/ckpt.safetensors"))
    assert meta["llama_path"] == os.path.abspath(out / "llama") and not (tmp_path / "shared/llama").exists()

    other = tmp_path / "other_llama"
    shutil.copytree(out / "llama", other)
    shard = sorted(other.glob("model-*.safetensors"))[0]
    with safe_open(shard, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=name):
        convert_authors.main([f"--src={src}", f"--out={tmp_path / 'bad'}", f"--llama_path={other}"])
