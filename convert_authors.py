"""
Convert one of the authors' released checkpoints (tenghuilee/ScalingCapFusedVisionLM: a `save_pretrained` folder of
their ImageMultiQueryCLIPLLMModel) into a tokenspace checkpoint, so evaluate.py runs their models:

    python convert_authors.py --src=THEIR_DIR --out=OUR_DIR                     # writes OUR_DIR/llama too
    python convert_authors.py --src=THEIR_DIR --out=OUR_DIR --llama_path=DIR    # points at an equal Llama folder

Their parameters -> ours (prefixes V = imgque_backbone.clip_model.vision_model., F = imgque_backbone.imgque_model.)
    V embeddings.*, pre_layrnorm, encoder.layers.*     -> vision.vit.*        CLIP ViT; activation from their config
    V pos_layrnorm (their new LN, not CLIP's post-LN)   -> vision.norm
    V vision_embed_merge (3x3 stride-2 conv, no bias)   -> vision.merge
    V token_LF (1, 1, D)                                -> vision.separator (D,)
    F layers.*, norm                                    -> compressor.layers.*, compressor.norm
    F embed_tokens rows of the base CLIP vocabulary     -> compressor.embed_tokens  (fused_vocab_size = base CLIP
                                                           vocabulary)
    F embed_tokens row of <|placeholder_qed_j|>         -> compressor.queries[j]  (the learned queries; n_queries = how
                                                           many placeholders clip/ holds, which can exceed n_l - 1)
    fusion_backbone.imgque_proj                         -> bridge
    llm_backbone.*                                      -> OUR_DIR/llama, a plain HF LlamaForCausalLM folder (their
                                                           llm_config, tokenizer.model), unless --llama_path names an
                                                           existing folder, which is then checked tensor by tensor
Their config.json is read directly (no class of theirs is needed, and none of its stale paths is followed):
n_l / n_s are the top-level length_que_end / length_que_end_short (imgque_config's are the alignment stage's);
the fused model's shape is what their config class derives at load time: heads = vision width // 64, MLP = vision
intermediate size, RMSNorm eps 1e-6 and RoPE theta 1e4 (LlamaConfig defaults it never overrides). num_crops comes
from preprocessor_config.json (16 if absent). Every tensor of theirs lands somewhere or is printed as deliberately
unused; every tensor of ours is filled; anything else stops the conversion with the key names.
"""
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from configurator import InputError, parse_config, report_input_errors
from fusion import DEFAULT_SYSTEM_PROMPT
from backbones import ViTConfig, llama_config, weight_files
from checkpoint import save_checkpoint
from model import FusedVLM, FusedVLMConfig


@dataclass
class Config:
    src: str = ""                # their save_pretrained folder: config.json, *.safetensors, clip/, tokenizer.model
    out: str = ""                # our checkpoint folder: ckpt.safetensors, clip/ and (without llama_path) llama/
    llama_path: str = ""         # an HF Llama-2 folder to use instead of writing OUR_DIR/llama (must equal theirs)
    drop_question: bool = False  # a VQ-ft checkpoint (fine-tuned without the question); their config does not say


VISION = "imgque_backbone.clip_model.vision_model."
FUSED = "imgque_backbone.imgque_model."
BRIDGE = "fusion_backbone.imgque_proj.weight"
LLM = "llm_backbone."
EMBED = FUSED + "embed_tokens.weight"
PLACEHOLDER = "<|placeholder_qed_{}|>"
# buffers that some transformers versions save although they are recomputed from the config
DERIVED_BUFFERS = ("embeddings.position_ids", "rotary_emb.inv_freq")


def their_key(ours):
    """Our FusedVLM parameter name -> theirs (the vision trunk is transformers' CLIP, the fused model a LlamaModel)."""
    if ours.startswith("vision.vit."):
        k = ours[len("vision.vit."):]
        k = {"class_embedding": "embeddings.class_embedding",
             "patch_embedding.weight": "embeddings.patch_embedding.weight",
             "position_embedding": "embeddings.position_embedding.weight"}.get(k, k)
        k = k.replace("layers.", "encoder.layers.").replace(".fc1.", ".mlp.fc1.").replace(".fc2.", ".mlp.fc2.")
        return VISION + k
    if ours.startswith("vision."):
        k = ours[len("vision."):]
        return VISION + {"norm.weight": "pos_layrnorm.weight", "norm.bias": "pos_layrnorm.bias",
                         "merge.weight": "vision_embed_merge.weight", "separator": "token_LF"}[k]
    if ours in ("compressor.embed_tokens.weight", "compressor.queries"):
        return EMBED
    if ours.startswith("compressor."):
        return FUSED + hf_llama_block_key(ours[len("compressor."):])
    if ours == "bridge.weight":
        return BRIDGE
    raise KeyError(f"no rule maps our parameter {ours} to the authors' checkpoint")


def hf_llama_block_key(k):
    """Our Llama names -> transformers' (the SwiGLU projections live under mlp.)."""
    for p in ("gate_proj", "up_proj", "down_proj"):
        k = k.replace(f".{p}.", f".mlp.{p}.")
    return k


def read_json(path, what):
    if not os.path.isfile(path):
        raise InputError(f"{path} not found ({what})")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_their_config(src):
    """-> (FusedVLMConfig without the vocabulary sizes, n_l, n_s, llm_config dict), after checking it is their
    generation-stage HD model, the only kind the mapping above describes."""
    path = os.path.join(src, "config.json")
    c = read_json(path, "their save_pretrained folder must hold it")
    ic = c.get("imgque_config") or {}
    expected = {"model_type": (c.get("model_type"), "modeling_query_adapt_clip_llm"),
                "fusion_name": (c.get("fusion_name"), "img_multi_que_clip_fusion_linear"),
                "imgque_config.model_type": (ic.get("model_type"), "modeling_image_hd_multi_query_clip"),
                "append_special_padding": (c.get("append_special_padding"), True)}
    for key, (got, want) in expected.items():
        if got != want:
            raise InputError(f"{path}: {key}={got!r}, expected {want!r} (the HD generation-stage model with "
                             f"placeholder-token queries, which is what their released checkpoints are)")
    n_l, n_s = c.get("length_que_end"), c.get("length_que_end_short")
    if not isinstance(n_l, int) or not isinstance(n_s, int) or not 1 <= n_s <= n_l:
        raise InputError(f"{path}: need integers 1 <= length_que_end_short <= length_que_end, got {n_l}, {n_s}")
    vc = ic["vision_config"]
    merge = (vc.get("enable_local_merge", True), vc.get("enable_token_crlf", True),
             vc.get("vembed_merge_kernel_size", 3), vc.get("vembed_merge_stride", 2),
             vc.get("vembed_hidden_size") or vc["hidden_size"])
    if merge != (True, True, 3, 2, vc["hidden_size"]):
        raise InputError(f"{path}: vision_config merge settings (enable_local_merge, enable_token_crlf, kernel, "
                         f"stride, vembed_hidden_size) = {merge}; VisionTower is (True, True, 3, 2, hidden_size)")
    vit = ViTConfig(image_size=vc["image_size"], patch_size=vc["patch_size"], width=vc["hidden_size"],
                    layers=vc["num_hidden_layers"], heads=vc["num_attention_heads"], mlp=vc["intermediate_size"],
                    act=vc.get("hidden_act", "quick_gelu"), eps=vc.get("layer_norm_eps", 1e-5))
    fused_layers = ic.get("num_hidden_layers") or ic["text_config"]["num_hidden_layers"]
    llm = c.get("llm_config")
    if not llm:
        raise InputError(f"{path}: no llm_config")
    cfg = FusedVLMConfig(vit=vit, llm=llama_config(llm, f"{path} llm_config"), fused_layers=fused_layers,
                         fused_heads=vit.width // 64, fused_mlp=vit.mlp, fused_eps=1e-6, fused_rope_theta=1e4)
    return cfg, n_l, n_s, llm


def read_clip_files(clip_dir):
    """-> (vocab {token: id}, merges.txt text). transformers 4.x saves vocab.json + merges.txt beside tokenizer.json;
    a folder with only tokenizer.json holds the same BPE model inside it."""
    vocab_file, merges_file = os.path.join(clip_dir, "vocab.json"), os.path.join(clip_dir, "merges.txt")
    if os.path.isfile(vocab_file) and os.path.isfile(merges_file):
        with open(merges_file, encoding="utf-8") as f:
            return read_json(vocab_file, ""), f.read()
    model = read_json(os.path.join(clip_dir, "tokenizer.json"), "their CLIP tokenizer, in the clip/ subfolder")["model"]
    if model.get("type") != "BPE":
        raise InputError(f"{clip_dir}/tokenizer.json: model type {model.get('type')!r}, expected CLIP's BPE")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return model["vocab"], "#version: 0.2\n" + "".join(m + "\n" for m in merges)


def read_clip_vocabulary(clip_dir):
    """-> (vocab, merges text, placeholder ids in order j = 0, 1, ..., other added tokens {content: id}).
    The placeholders were added to their CLIP tokenizer as ordinary tokens; whichever of tokenizer.json,
    added_tokens.json and tokenizer_config.json are present must agree."""
    vocab, merges = read_clip_files(clip_dir)
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise InputError(f"{clip_dir}: vocabulary ids are not 0..{len(vocab) - 1}")
    added, sources = {}, []

    def add(content, token_id, source):
        if added.setdefault(content, token_id) != token_id:
            raise InputError(f"{clip_dir}: {content} has id {added[content]} in one file, {token_id} in {source}")

    for name, tokens in [("tokenizer.json", lambda d: ((t["content"], t["id"]) for t in d["added_tokens"])),
                         ("added_tokens.json", lambda d: d.items()),
                         ("tokenizer_config.json", lambda d: ((t["content"], int(i)) for i, t in
                                                              d.get("added_tokens_decoder", {}).items()))]:
        if os.path.isfile(os.path.join(clip_dir, name)):
            sources.append(name)
            for content, token_id in tokens(read_json(os.path.join(clip_dir, name), "")):
                add(content, token_id, name)
    placeholders = []
    while PLACEHOLDER.format(len(placeholders)) in added:
        placeholders.append(added.pop(PLACEHOLDER.format(len(placeholders))))
    stray = sorted(k for k in added if k.startswith("<|placeholder_qed_"))
    if stray:
        raise InputError(f"{clip_dir}: placeholders are not numbered 0..{len(placeholders) - 1}: {stray[:5]}")
    if any(i < len(vocab) for i in placeholders):
        raise InputError(f"{clip_dir}: placeholder ids overlap the base vocabulary")
    others = {k: v for k, v in added.items() if v >= len(vocab)}  # CLIP's specials sit inside the base vocabulary
    print(f"clip/: base vocabulary {len(vocab)}, {len(placeholders)} placeholders (read {', '.join(sources)})")
    return vocab, merges, placeholders, others


def our_tensors(files, expected, base_vocab, placeholders, other_added):
    """-> ({"model." + our name: tensor as stored}, notes on embedding rows left out). Their embedding table is
    [base CLIP vocabulary][added tokens][maybe spare rows]; the placeholder rows become our query table."""
    def their_tensor(key):
        with safe_open(files[key], "pt") as f:
            return f.get_tensor(key)

    embed = their_tensor(EMBED)  # (rows, D)
    if max(placeholders, default=-1) >= len(embed):
        raise InputError(f"{EMBED} has {len(embed)} rows, but clip/ has placeholder id {max(placeholders)}")
    unused, used_rows = [], set(range(base_vocab)) | set(placeholders)
    for content, token_id in sorted(other_added.items(), key=lambda kv: kv[1]):
        unused.append(f"{EMBED} row {token_id} (added token {content}, not a placeholder)")
        used_rows.add(token_id)
    spare = sorted(set(range(len(embed))) - used_rows)
    if spare:
        unused.append(f"{EMBED} rows {spare[0]}..{spare[-1]} ({len(spare)} rows with no token in clip/)")
    tensors = {}
    for ours, shape in expected.items():
        if ours == "compressor.embed_tokens.weight":
            t = embed[:base_vocab]
        elif ours == "compressor.queries":
            t = embed[torch.tensor(placeholders, dtype=torch.long)].reshape(len(placeholders), embed.shape[1])
        elif ours == "vision.separator":
            t = their_tensor(their_key(ours)).reshape(-1)  # (1, 1, D) -> (D,)
        else:
            t = their_tensor(their_key(ours))
        if tuple(t.shape) != shape:
            raise InputError(f"{their_key(ours)} gives {ours} shape {tuple(t.shape)}, the config implies {shape}")
        tensors["model." + ours] = t.contiguous()
    return tensors, unused


def write_llama(files, src, out_dir, llm_config):
    """llm_backbone.* -> a sharded HF LlamaForCausalLM folder (one shard per source file, tensors as stored)."""
    os.makedirs(out_dir, exist_ok=True)
    by_file = {}
    for key, file in files.items():
        if key.startswith(LLM) and not key.endswith(DERIVED_BUFFERS):
            by_file.setdefault(file, []).append(key)
    weight_map, total_bytes, t_start = {}, 0, time.time()
    for i, file in enumerate(sorted(by_file)):
        t0 = time.time()
        with safe_open(file, "pt") as f:
            tensors = {k[len(LLM):]: f.get_tensor(k) for k in by_file[file]}
        name = f"model-{i + 1:05d}-of-{len(by_file):05d}.safetensors"
        save_file(tensors, os.path.join(out_dir, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        total_bytes += size
        dt = time.time() - t0
        print(f"llama shard {i + 1}/{len(by_file)}: {len(tensors)} tensors, {size / 1e9:.2f} GB in {dt:.1f} s "
              f"({size / 1e9 / max(dt, 1e-9):.2f} GB/s)")
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({**llm_config, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}, f, indent=2)
    shutil.copyfile(os.path.join(src, "tokenizer.model"), os.path.join(out_dir, "tokenizer.model"))
    print(f"llama: {len(weight_map)} tensors, {total_bytes / 1e9:.2f} GB written to {out_dir} "
          f"in {time.time() - t_start:.1f} s")


def check_llama_folder(files, llama_path, llm):
    """--llama_path must hold exactly their LLM: same config numbers and, where their checkpoint carries the LLM,
    bit-equal tensors (a different Llama would silently change every answer)."""
    theirs = llama_config(read_json(os.path.join(llama_path, "config.json"), "an HF Llama folder"), llama_path)
    if theirs != llm:
        raise InputError(f"--llama_path={llama_path}: config {theirs} differs from their llm_config {llm}")
    if not os.path.isfile(os.path.join(llama_path, "tokenizer.model")):
        raise InputError(f"--llama_path={llama_path}: no tokenizer.model")
    given = weight_files(llama_path)
    llm_keys = sorted(k for k in files if k.startswith(LLM) and not k.endswith(DERIVED_BUFFERS))
    missing = [k[len(LLM):] for k in llm_keys if k[len(LLM):] not in given]
    if missing:
        raise InputError(f"--llama_path={llama_path} lacks {len(missing)} of their LLM tensors, e.g. {missing[:5]}")
    t0 = time.time()
    for i, key in enumerate(llm_keys):
        with safe_open(files[key], "pt") as a, safe_open(given[key[len(LLM):]], "pt") as b:
            if not torch.equal(a.get_tensor(key), b.get_tensor(key[len(LLM):])):
                raise InputError(f"--llama_path={llama_path}: {key[len(LLM):]} differs from their {key}")
        if (i + 1) % 50 == 0 or i + 1 == len(llm_keys):
            print(f"llama check: {i + 1}/{len(llm_keys)} tensors equal ({time.time() - t0:.1f} s)")


def convert(cfg: Config):
    if not cfg.src or not cfg.out:
        raise InputError("give --src=THEIR_DIR and --out=OUR_DIR")
    ckpt_path = os.path.join(cfg.out, "ckpt.safetensors")
    if os.path.exists(ckpt_path):
        raise InputError(f"{ckpt_path} exists; remove it first (a conversion never overwrites a checkpoint)")
    model_cfg, n_l, n_s, llm_config = read_their_config(cfg.src)
    vocab, merges, placeholders, other_added = read_clip_vocabulary(os.path.join(cfg.src, "clip"))
    if len(placeholders) < n_l - 1:
        raise InputError(f"{cfg.src}/clip: {len(placeholders)} placeholder tokens, but n_l = {n_l} needs {n_l - 1}")
    model_cfg.fused_vocab_size, model_cfg.n_queries = len(vocab), len(placeholders)
    files = weight_files(cfg.src)  # refuses pickles

    # ours: every tensor of a FusedVLM of this config, its shape from a model built on the meta device
    with torch.device("meta"):
        vlm = FusedVLM(model_cfg)
    expected = {k: tuple(v.shape) for k, v in vlm.trainable_state_dict().items()}
    wanted = {their_key(k) for k in expected}
    has_llm = any(k.startswith(LLM) for k in files)
    if has_llm:  # the LLM goes out under transformers' names, which Llama.from_hf reads
        wanted |= {LLM + (k if k.startswith("lm_head") else "model." + hf_llama_block_key(k))
                   for k in vlm.llm.state_dict()}
        if llm_config.get("tie_word_embeddings") and LLM + "lm_head.weight" not in files:
            wanted.discard(LLM + "lm_head.weight")
    missing = sorted(k for k in wanted if k not in files)
    if missing:
        raise InputError(f"{cfg.src}: their checkpoint lacks {len(missing)} tensors the config implies: {missing}")
    deliberately_unused = [k for k in files if k.endswith(DERIVED_BUFFERS)]
    unknown = sorted(k for k in files if k not in wanted and k not in deliberately_unused)
    if unknown:
        raise InputError(f"{cfg.src}: tensors of theirs that map to nothing of ours: {unknown}")

    tensors, unused_rows = our_tensors(files, expected, len(vocab), placeholders, other_added)
    deliberately_unused += unused_rows

    # the frozen LLM: written out from their checkpoint, or an existing folder checked against it
    if cfg.llama_path:
        check_llama_folder(files if has_llm else {}, cfg.llama_path, model_cfg.llm)
        llama_path = cfg.llama_path
    elif has_llm:
        llama_path = os.path.join(cfg.out, "llama")
        write_llama(files, cfg.src, llama_path, llm_config)
    else:
        raise InputError(f"{cfg.src}: no llm_backbone.* tensors in their checkpoint; give --llama_path=DIR "
                         f"(an HF Llama-2-7b-chat folder with tokenizer.model)")

    # the CLIP BPE files fusion.py reads (the placeholders live in our query table, not in the tokenizer)
    clip_path = os.path.join(cfg.out, "clip")
    os.makedirs(clip_path, exist_ok=True)
    with open(os.path.join(clip_path, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(clip_path, "merges.txt"), "w", encoding="utf-8") as f:
        f.write(merges)

    processor = os.path.join(cfg.src, "preprocessor_config.json")
    num_crops = read_json(processor, "").get("num_crops") if os.path.isfile(processor) else None
    if num_crops is None:
        print(f"{processor}: no num_crops; using 16 (the paper's setting)")
        num_crops = 16
    meta = {
        "stage": "gen",
        "model_config": asdict(model_cfg),
        "clip_path": os.path.abspath(clip_path),
        "llama_path": os.path.abspath(llama_path),
        "token_space": {"image_size": model_cfg.vit.image_size, "num_crops": num_crops, "n_l": n_l, "n_s": n_s,
                        "drop_question": cfg.drop_question,
                        "max_seq_len": llm_config.get("max_position_embeddings", 4096),
                        "system_prompt": DEFAULT_SYSTEM_PROMPT},  # their llama-2-vision template's system message
        "train_config": asdict(cfg),  # what was converted, and how
    }
    save_checkpoint(ckpt_path, tensors, meta)  # last, so a folder with ckpt.safetensors is complete

    print(f"converted {len(tensors)} tensors: vision {model_cfg.vit.width} x {model_cfg.vit.layers} layers "
          f"({model_cfg.vit.act}), "
          f"fused {model_cfg.fused_layers} layers x {model_cfg.fused_heads} heads, {len(placeholders)} queries, "
          f"n_l={n_l}, n_s={n_s}, num_crops={num_crops}")
    print("deliberately unused:" + ("".join(f"\n  {u}" for u in deliberately_unused) or " none"))
    print(f"wrote {ckpt_path} (llama_path={meta['llama_path']})")
    return ckpt_path


def main(argv):
    cfg, positional = parse_config(Config(), argv)
    if positional:
        raise InputError(f"convert_authors.py takes only --key=value arguments, got {positional}")
    print(json.dumps(asdict(cfg)))
    convert(cfg)


if __name__ == "__main__":
    report_input_errors()
    main(sys.argv[1:])
