"""
The generic networks, nanoGPT style, each loading a Hugging Face folder with its own parameter names:

    ViT       CLIP's vision trunk (CLIPModel or CLIPVisionModel folder), position grid resizable
    CLIPText  CLIP's text tower, position table extendable (stage 1's alignment target)
    Llama     the Llama decoder with an LM head and a KV cache (the frozen LLM; its block is also the fused model's),
              from a Llama-2/3.x, Mistral or Qwen2/2.5 folder (the same architecture up to the options in LlamaConfig)

Loading is strict: safetensors only (a pickle is refused, never opened), every expected key present, every shape
equal. model.py builds the paper's model out of these; nothing here knows of it.
"""
import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch.distributed.tensor import DTensor, distribute_tensor

from configurator import InputError

# -----------------------------------------------------------------------------
# Configs. Defaults are the paper's: CLIP ViT-H/14 at 336 px, Llama-2-7B.


@dataclass
class ViTConfig:
    image_size: int = 336
    patch_size: int = 14
    width: int = 1280
    layers: int = 32
    heads: int = 16
    mlp: int = 5120
    act: str = "gelu"  # CLIP ViT-L uses quick_gelu; the checkpoint's config decides
    eps: float = 1e-5


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408
    max_positions: int = 512  # CLIP's 77, extended for long answers
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp: int = 4096
    act: str = "gelu"
    eps: float = 1e-5
    projection_dim: int = 1024
    eos_token_id: int = 49407


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    dim: int = 4096
    layers: int = 32
    heads: int = 32
    kv_heads: int = 32
    mlp: int = 11008
    eps: float = 1e-5
    rope_theta: float = 1e4
    rope_scaling: dict | None = None    # Llama-3.1/3.2's "llama3" type: factor, low/high_freq_factor,
                                        # original_max_position_embeddings
    qkv_bias: bool = False              # Qwen2/2.5: biases on the q, k and v projections
    sliding_window: int | None = None   # Mistral v0.1: longer sequences are refused (up to it, attention is full)


# -----------------------------------------------------------------------------
# CLIP blocks (pre-LN transformer with biases), shared by the vision and text towers.

ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x)}


class CLIPAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, mask=None, is_causal=False):
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class CLIPBlock(nn.Module):
    def __init__(self, width, heads, mlp, act, eps):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.self_attn = CLIPAttention(width, heads)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)
        self.fc1 = nn.Linear(width, mlp)
        self.fc2 = nn.Linear(mlp, width)
        self.act = ACTIVATIONS[act]

    def forward(self, x, mask=None, is_causal=False):
        x = x + self.self_attn(self.layer_norm1(x), mask, is_causal)
        return x + self.fc2(self.act(self.fc1(self.layer_norm2(x))))


class ViT(nn.Module):
    """CLIP vision trunk. Returns the last encoder layer (B, 1+P, D), before CLIP's post-LayerNorm."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        grid = cfg.image_size // cfg.patch_size
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(cfg.width))
        self.position_embedding = nn.Parameter(torch.zeros(1 + grid * grid, cfg.width))
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=cfg.eps)  # CLIP's spelling, kept for the key map
        self.layers = nn.ModuleList(CLIPBlock(cfg.width, cfg.heads, cfg.mlp, cfg.act, cfg.eps) for _ in range(cfg.layers))

    def forward(self, pixel_values):  # (B, 3, S, S) -> (B, 1+P, D)
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = self.pre_layrnorm(torch.cat([cls, x], dim=1) + self.position_embedding)
        for layer in self.layers:
            x = layer(x)
        return x

    @staticmethod
    def from_hf(path, image_size=None):
        """CLIP vision trunk from a CLIPModel or CLIPVisionModel folder; image_size != the checkpoint's
        interpolates the position grid bicubically (how the 224 px ViT-H/14 runs at 336 px)."""
        config = _read_config(path)
        vc = config.get("vision_config", config)
        prefix = "vision_model." if "vision_config" in config else ""
        cfg = ViTConfig(image_size=vc["image_size"], patch_size=vc["patch_size"], width=vc["hidden_size"],
                        layers=vc["num_hidden_layers"], heads=vc["num_attention_heads"],
                        mlp=vc["intermediate_size"], act=vc.get("hidden_act", "quick_gelu"),
                        eps=vc.get("layer_norm_eps", 1e-5))
        vit = _build(ViT, cfg)
        hf = {k: prefix + _clip_key(k).replace("position_embedding", "embeddings.position_embedding.weight")
              .replace("class_embedding", "embeddings.class_embedding")
              .replace("patch_embedding", "embeddings.patch_embedding") for k in vit.state_dict()}
        _load_strict(vit, path, hf)
        if image_size is not None and image_size != cfg.image_size:
            vit.resize_positions(image_size)
        return vit

    @torch.no_grad()
    def resize_positions(self, image_size):
        old, new = self.cfg.image_size // self.cfg.patch_size, image_size // self.cfg.patch_size
        grid = self.position_embedding[1:].T.reshape(1, -1, old, old).float()
        grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
        table = torch.cat([self.position_embedding[:1].float(), grid.reshape(-1, new * new).T])
        self.position_embedding = nn.Parameter(table.to(self.position_embedding.dtype))
        self.cfg.image_size = image_size


class CLIPText(nn.Module):
    """CLIP text tower: causal transformer over BPE ids, pooled at the first EOS, then projected."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Parameter(torch.zeros(cfg.max_positions, cfg.width))
        self.layers = nn.ModuleList(CLIPBlock(cfg.width, cfg.heads, cfg.mlp, cfg.act, cfg.eps) for _ in range(cfg.layers))
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)

    def forward(self, input_ids, attention_mask=None):  # (B, L) -> hidden (B, L, D), embeds (B, P)
        B, L = input_ids.shape
        x = self.token_embedding(input_ids) + self.position_embedding[:L]
        mask = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        if attention_mask is not None:  # right padding: every row still sees token 0, so none is fully masked
            mask = mask & attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        x = self.final_layer_norm(x)
        is_eos = input_ids == self.cfg.eos_token_id
        if not is_eos.any(dim=1).all():
            raise ValueError("every CLIP text row needs an EOS token to pool at")
        pooled = x[torch.arange(B, device=x.device), is_eos.int().argmax(dim=1)]
        return x, self.text_projection(pooled)

    @staticmethod
    def from_hf(path, max_positions=None):
        """max_positions beyond the checkpoint's (None keeps it: 77 for CLIP) extends the learned position table:
        old rows kept, new rows drawn from N(mean, std) of the old table (the paper's code, for long answers)."""
        config = _read_config(path)
        tc = config.get("text_config", config)
        prefix = "text_model." if "text_config" in config else ""
        cfg = CLIPTextConfig(vocab_size=tc["vocab_size"], max_positions=tc["max_position_embeddings"],
                             width=tc["hidden_size"], layers=tc["num_hidden_layers"], heads=tc["num_attention_heads"],
                             mlp=tc["intermediate_size"], act=tc.get("hidden_act", "quick_gelu"),
                             eps=tc.get("layer_norm_eps", 1e-5),
                             projection_dim=config.get("projection_dim", tc.get("projection_dim")),
                             eos_token_id=tc.get("eos_token_id", 49407))
        if cfg.eos_token_id == 2:  # configs written before transformers#24773: <|endoftext|> is the last id
            cfg.eos_token_id = cfg.vocab_size - 1
        text = _build(CLIPText, cfg)
        hf = {}
        for k in text.state_dict():
            if k.startswith("text_projection"):
                hf[k] = k
            else:
                hf[k] = prefix + _clip_key(k).replace("token_embedding", "embeddings.token_embedding") \
                    .replace("position_embedding", "embeddings.position_embedding.weight")
        _load_strict(text, path, hf)
        max_positions = max_positions or cfg.max_positions
        if max_positions < cfg.max_positions:
            raise ValueError(f"{path}: max_positions={max_positions} is below the checkpoint's {cfg.max_positions}")
        if max_positions > cfg.max_positions:
            text.extend_positions(max_positions)
        return text

    @torch.no_grad()
    def extend_positions(self, max_positions):
        old = self.position_embedding.float()
        new = torch.randn(max_positions - len(old), old.shape[1]) * old.std() + old.mean()
        self.position_embedding = nn.Parameter(torch.cat([old, new]).to(self.position_embedding.dtype))
        self.cfg.max_positions = max_positions


def _clip_key(k):
    """Our CLIP names -> HF names: the blocks live under encoder.layers, fc1/fc2 under mlp."""
    return (k.replace("layers.", "encoder.layers.").replace(".fc1.", ".mlp.fc1.").replace(".fc2.", ".mlp.fc2."))


# -----------------------------------------------------------------------------
# Llama blocks (RMSNorm, RoPE, grouped KV heads, SwiGLU), shared by the LLM and the fused model.


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # in fp32, as Llama does, then back to the input dtype
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope(positions, head_dim, theta, scaling=None):
    """cos, sin of shape (B, 1, T, head_dim) for integer positions (B, T); computed each call, so there are
    no buffers and models can be built on the meta device and filled with assign=True."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    if scaling is not None:
        inv_freq = llama3_scaled(inv_freq, **scaling)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos(), angles.sin()


def llama3_scaled(inv_freq, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings):
    """Llama-3.1's long-context RoPE: wavelengths beyond the original context are stretched by factor, short ones
    kept, those in between interpolated smoothly (transformers' _compute_llama3_parameters, step for step)."""
    context = original_max_position_embeddings
    wavelength = 2 * math.pi / inv_freq
    stretched = torch.where(wavelength > context / low_freq_factor, inv_freq / factor, inv_freq)
    smooth = (context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * stretched / factor + smooth * stretched
    medium = ~(wavelength < context / high_freq_factor) * ~(wavelength > context / low_freq_factor)
    return torch.where(medium, smoothed, stretched)


def apply_rope(x, cos, sin):  # HF's rotate-half layout, so HF weights load without permutation
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, dim, heads, kv_heads, qkv_bias=False):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(heads * self.head_dim, dim, bias=False)

    def forward(self, x, cos, sin, mask=None, cache=None, start=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # cache = (k_buf, v_buf) of shape (B, kv_heads, max_len, head_dim)
            cache[0][:, :, start:start + T] = k
            cache[1][:, :, start:start + T] = v
            k, v = cache[0][:, :, :start + T], cache[1][:, :, :start + T]
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class LlamaBlock(nn.Module):
    def __init__(self, dim, heads, kv_heads, mlp, eps, qkv_bias=False):
        super().__init__()
        self.input_layernorm = RMSNorm(dim, eps)
        self.self_attn = LlamaAttention(dim, heads, kv_heads, qkv_bias)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.gate_proj = nn.Linear(dim, mlp, bias=False)
        self.up_proj = nn.Linear(dim, mlp, bias=False)
        self.down_proj = nn.Linear(mlp, dim, bias=False)

    def forward(self, x, cos, sin, mask=None, cache=None, start=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start)
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Llama(nn.Module):
    """Llama decoder with an LM head. Right-padded batches need no mask (causal attention never looks
    ahead at the padding); left-padded batches (generation) pass attention_mask."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(LlamaBlock(cfg.dim, cfg.heads, cfg.kv_heads, cfg.mlp, cfg.eps, cfg.qkv_bias)
                                    for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim, cfg.eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def _run(self, x, attention_mask=None, cache=None, start=0, positions=None, keep_hidden=False):
        B, T, _ = x.shape
        if self.cfg.sliding_window is not None and start + T > self.cfg.sliding_window:
            raise ValueError(f"a sequence of {start + T} tokens exceeds the LLM's sliding_window={self.cfg.sliding_window}; "
                             f"within the window attention is full, beyond it tokenspace does not run "
                             f"(shorten max_seq_len)")
        mask = None
        if attention_mask is not None or start > 0:
            keys = attention_mask.bool() if attention_mask is not None else torch.ones(B, start + T, dtype=torch.bool, device=x.device)
            if positions is None:
                positions = (keys.long().cumsum(-1) - 1).clamp(min=0)[:, start:]
            query_at = torch.arange(start, start + T, device=x.device)
            causal = torch.arange(start + T, device=x.device)[None, :] <= query_at[:, None]  # (T, start+T)
            mask = (causal & keys[:, None, None, :]) | (causal & (query_at[:, None] == torch.arange(start + T, device=x.device)))
        if positions is None:
            positions = torch.arange(T, device=x.device).expand(B, T)
        cos, sin = rope(positions, self.cfg.dim // self.cfg.heads, self.cfg.rope_theta, self.cfg.rope_scaling)
        hidden = [x]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, None if cache is None else cache[i], start)
            hidden.append(x)
        hidden[-1] = x = self.norm(x)
        return (x, hidden) if keep_hidden else x

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None):  # -> logits (B, L, V)
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        return self.lm_head(self._run(x, attention_mask))

    def hidden_states(self, input_ids=None, inputs_embeds=None, attention_mask=None):
        """HF convention: [embeddings, block 1, ..., block L-1, final norm(block L)]."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        return self._run(x, attention_mask, keep_hidden=True)[1]

    @torch.no_grad()
    def generate(self, input_ids=None, inputs_embeds=None, attention_mask=None, max_new_tokens=32,
                 eos_token_id=None, min_new_tokens=0):
        """Greedy decoding with a KV cache: one prefill, then one token per step. Prompts are left-padded.
        Returns (B, T_new); rows that finished early are filled with eos_token_id."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, L, _ = x.shape
        keys = torch.ones(B, L, dtype=torch.bool, device=x.device) if attention_mask is None else attention_mask.bool()
        hd = self.cfg.dim // self.cfg.heads
        cache = [tuple(torch.empty(B, self.cfg.kv_heads, L + max_new_tokens, hd, dtype=x.dtype, device=x.device)
                       for _ in range(2)) for _ in self.layers]
        logits = self.lm_head(self._run(x, keys, cache)[:, -1]).float()
        position = keys.long().sum(-1, keepdim=True)  # next position of every row
        done = torch.zeros(B, dtype=torch.bool, device=x.device)
        new_tokens = []
        for step in range(max_new_tokens):
            if eos_token_id is not None and step < min_new_tokens:
                logits[:, eos_token_id] = -float("inf")
            token = logits.argmax(-1)
            if eos_token_id is not None:
                token = torch.where(done, eos_token_id, token)
                done |= token == eos_token_id
            new_tokens.append(token)
            if done.all() or step == max_new_tokens - 1:
                break
            keys = torch.cat([keys, torch.ones(B, 1, dtype=torch.bool, device=x.device)], dim=1)
            h = self._run(self.embed_tokens(token)[:, None], keys, cache, start=L + step, positions=position)
            logits = self.lm_head(h[:, -1]).float()
            position = position + 1
        return torch.stack(new_tokens, dim=1)

    @staticmethod
    def from_hf(path, dtype=None, shard=None):
        """Llama from a LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM folder (single or sharded
        safetensors). dtype None keeps float32.
        shard: a function that shards the still empty (meta-device) model across ranks and allocates each rank's
        part (training.py's FSDP set-up); the weights are then read into the shards."""
        config = _read_config(path)
        cfg = llama_config(config, f"{path}/config.json")
        llama = _build(Llama, cfg)
        if shard is not None:
            shard(llama.to(dtype or torch.float32))
        tied = config.get("tie_word_embeddings", False)
        hf = llama.hf_names(tied=tied)
        # a tensor nothing reads (a bias of another family, a layer too many) means the config was misread;
        # RoPE tables older exports saved are recomputed, and a tied head duplicates the embeddings
        unread = [k for k in weight_files(path) if k not in hf.values() and not k.endswith("rotary_emb.inv_freq")
                  and not (tied and k == "lm_head.weight")]
        if unread:
            raise KeyError(f"{path}: {len(unread)} checkpoint tensors that the config leaves unused, e.g. {unread[:5]}")
        _load_strict(llama, path, hf, dtype=dtype or torch.float32)
        return llama

    def hf_names(self, tied=False):
        """Our state-dict keys -> LlamaForCausalLM's: everything under model., the MLP projections under mlp.
        (the key map from_hf loads with, and what a script writing an HF folder saves under)."""
        def hf(k):
            if k.startswith("lm_head"):
                return "model.embed_tokens.weight" if tied else k
            for p in ("gate_proj", "up_proj", "down_proj"):
                k = k.replace(f".{p}.", f".mlp.{p}.")
            return "model." + k
        return {k: hf(k) for k in self.state_dict()}


LLM_FAMILIES = ("llama", "mistral", "qwen2")  # config.json's model_type; Qwen2.5 is "qwen2", Llama-3.x "llama"


def llama_config(config, where):
    """Our LlamaConfig from an HF config.json dict (where: its name in messages). Every setting that would make
    transformers compute something Llama does not (another family, activation, bias, RoPE type, head size) is
    refused by name, never ignored."""
    def refuse(key):
        raise ValueError(f"{where}: {key}={config.get(key)!r} is not supported (tokenspace runs "
                         f"{', '.join(LLM_FAMILIES)} exactly as transformers does, and nothing else)")
    family = config.get("model_type", "llama")
    if family not in LLM_FAMILIES:
        refuse("model_type")
    for key, runs in [("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
                      ("partial_rotary_factor", 1.0)]:
        if config.get(key, runs) not in (runs, None):
            refuse(key)
    # transformers 4.x writes rope_theta and rope_scaling, 5.x one rope_parameters dict holding both
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        refuse("rope_parameters" if "rope_parameters" in config else "rope_scaling")
    scaling = None
    if rope_type == "llama3":
        scaling = {k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor")}
        scaling["original_max_position_embeddings"] = rope.get("original_max_position_embeddings",
                                                               config["max_position_embeddings"])
    # Mistral slides always; Qwen2 only with use_sliding_window (then its upper layers): refusing any sequence
    # longer than the window keeps every layer exact
    window = config.get("sliding_window") if family == "mistral" or config.get("use_sliding_window") else None
    cfg = LlamaConfig(vocab_size=config["vocab_size"], dim=config["hidden_size"], layers=config["num_hidden_layers"],
                      heads=config["num_attention_heads"],
                      kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
                      mlp=config["intermediate_size"], eps=config["rms_norm_eps"],
                      rope_theta=float(config.get("rope_theta") or rope.get("rope_theta", 1e4)),
                      rope_scaling=scaling, qkv_bias=family == "qwen2", sliding_window=window)
    if (config.get("head_dim") or cfg.dim // cfg.heads) != cfg.dim // cfg.heads:
        refuse("head_dim")
    return cfg


# -----------------------------------------------------------------------------
# Loading Hugging Face folders: safetensors only, every expected key present, every shape equal.


def _read_config(path):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint folder not found: {path!r} (put the Hugging Face folder with "
                                f"config.json and *.safetensors there)")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{path}: no config.json")
    with open(config_file) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise InputError(f"{config_file}:{e.lineno}: not valid JSON ({e.msg}; download the folder again)") from None


@contextmanager
def open_safetensors(path):
    """safe_open, with a truncated or corrupt file named: safetensors' own error does not say which file."""
    try:
        f = safe_open(path, "pt")
    except SafetensorError as e:
        raise InputError(f"{path}: not a readable safetensors file ({e}; write or download it again)") from None
    with f:
        yield f


def weight_files(path):
    """{key: safetensors file} of a folder, single-file or sharded with model.safetensors.index.json."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        with open_safetensors(single) as f:
            return {k: single for k in f.keys()}
    pickles = [n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    if pickles:
        raise ValueError(f"{path}: only pickle weights ({', '.join(sorted(pickles))}); tokenspace loads safetensors "
                         f"only and never unpickles. Convert once with transformers: "
                         f"Model.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _build(cls, cfg):
    with torch.device("meta"):  # no random init of weights that are about to be overwritten
        return cls(cfg)


def _load_strict(module, path, hf_names, dtype=None):
    """Fill every tensor of `module` from the HF folder; hf_names maps our key -> the checkpoint's key. Into a
    module that FSDP has already sharded (DTensor parameters, training.py) each rank copies only its shard, one
    tensor at a time, so the whole model is never in one process's memory."""
    files = weight_files(path)
    missing = [hf for hf in hf_names.values() if hf not in files]
    if missing:
        raise InputError(f"{path}: checkpoint lacks {len(missing)} expected keys, e.g. {missing[:5]}")
    expected = module.state_dict()
    tensors = {}
    for file in sorted(set(files[hf] for hf in hf_names.values())):
        with open_safetensors(file) as f:
            for ours, hf in hf_names.items():
                if files[hf] != file:
                    continue
                t = f.get_tensor(hf)
                if tuple(t.shape) != tuple(expected[ours].shape):
                    raise InputError(f"{path}: {hf} has shape {tuple(t.shape)}, the config implies {tuple(expected[ours].shape)}")
                t = t.to(dtype) if dtype is not None else t.float()
                if isinstance(expected[ours], DTensor):
                    shard = expected[ours]
                    shard.copy_(distribute_tensor(t.to(shard.device), shard.device_mesh, shard.placements, src_data_rank=None))
                else:
                    tensors[ours] = t
    if tensors:
        module.load_state_dict(tensors, strict=True, assign=True)
