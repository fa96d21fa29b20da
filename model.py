"""
Every network of tokenspace, in one file, nanoGPT style:

    image crops -> ViT (CLIP) -> new LayerNorm -> merge conv -> separator  = VisionTower
    [vision tokens][question][queries][EOS]... -> Llama-style decoder      = FusedModel
    fused outputs at the query/EOS positions -> Linear bridge -> frozen Llama = FusedVLM

The fused model is one of three compressors (FusedVLMConfig.compressor) that turn the vision tokens into the n_l
(first question) / n_s (later questions) tokens the LLM slots take, with the same inputs and outputs: "fused" (the
paper's, question-aware), "pool" (adaptive average pooling, no parameters) and "resampler" (learned queries
cross-attending to the vision tokens, question-blind).

plus the CLIP text tower used as the target of stage-1 alignment (AlignModel), the loaders that read
Hugging Face folders (safetensors only, strict key map), our checkpoint format and the FLOP count behind MFU.
What a training run adds around them (optimizer, schedule, exact resume, FSDP) is in training.py.

The vision-token count the LLM sees is the paper's knob n_l: it is set by the data (how many query slots
fusion.py writes), not by the model, so one trained model can be run at any n_l up to n_queries + 1 (pool: any).
"""
import json
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor, distribute_tensor

# -----------------------------------------------------------------------------
# Configs. Defaults are the paper's: CLIP ViT-H/14 at 336 px, a 12-layer fused model, Llama-2-7B.


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


@dataclass
class FusedVLMConfig:
    vit: ViTConfig = field(default_factory=ViTConfig)
    llm: LlamaConfig = field(default_factory=LlamaConfig)
    text: CLIPTextConfig = field(default_factory=CLIPTextConfig)  # stage 1 only
    fused_layers: int = 12
    fused_heads: int = 20
    fused_mlp: int = 5120
    fused_vocab_size: int = 49408  # CLIP BPE: the question text is read with CLIP's tokenizer
    n_queries: int = 767  # learned query rows; n_l up to n_queries + 1 (the EOS is the last output)
    # fused | pool | resampler: what makes the LLM's vision tokens; the resampler has n_queries + 1 query rows and
    # fused_layers blocks of fused_heads heads and fused_mlp, so --compressor swaps the mechanism at the same size
    compressor: str = "fused"
    fused_eps: float = 1e-6
    fused_rope_theta: float = 1e4
    bridge_init_std: float = 1e-3

    @staticmethod
    def from_dict(d):
        d = dict(d)  # a checkpoint written before compressors existed has no "compressor": the default, fused
        subs = {"vit": ViTConfig, "llm": LlamaConfig, "text": CLIPTextConfig}
        return FusedVLMConfig(**{k: subs[k](**v) if k in subs else v for k, v in d.items()})


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


def rope(positions, head_dim, theta):
    """cos, sin of shape (B, 1, T, head_dim) for integer positions (B, T); computed each call, so there are
    no buffers and models can be built on the meta device and filled with assign=True."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):  # HF's rotate-half layout, so HF weights load without permutation
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, dim, heads, kv_heads):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
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
    def __init__(self, dim, heads, kv_heads, mlp, eps):
        super().__init__()
        self.input_layernorm = RMSNorm(dim, eps)
        self.self_attn = LlamaAttention(dim, heads, kv_heads)
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
        self.layers = nn.ModuleList(LlamaBlock(cfg.dim, cfg.heads, cfg.kv_heads, cfg.mlp, cfg.eps) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim, cfg.eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def _run(self, x, attention_mask=None, cache=None, start=0, positions=None, keep_hidden=False):
        B, T, _ = x.shape
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
        cos, sin = rope(positions, self.cfg.dim // self.cfg.heads, self.cfg.rope_theta)
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
        """Llama from a LlamaForCausalLM folder (single or sharded safetensors). dtype None keeps float32.
        shard: a function that shards the still empty (meta-device) model across ranks and allocates each rank's
        part (training.py's FSDP set-up); the weights are then read into the shards."""
        config = _read_config(path)
        for unsupported in ("rope_scaling", "attention_bias", "mlp_bias"):
            if config.get(unsupported):
                raise ValueError(f"{path}/config.json: {unsupported}={config[unsupported]} is not supported")
        rope_theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 1e4)
        cfg = LlamaConfig(vocab_size=config["vocab_size"], dim=config["hidden_size"], layers=config["num_hidden_layers"],
                          heads=config["num_attention_heads"],
                          kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
                          mlp=config["intermediate_size"], eps=config["rms_norm_eps"], rope_theta=float(rope_theta))
        if config.get("head_dim", cfg.dim // cfg.heads) != cfg.dim // cfg.heads:
            raise ValueError(f"{path}/config.json: head_dim != hidden_size / num_attention_heads is not supported")
        llama = _build(Llama, cfg)
        if shard is not None:
            shard(llama.to(dtype or torch.float32))
        hf = llama.hf_names(tied=config.get("tie_word_embeddings", False))
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


# -----------------------------------------------------------------------------
# The paper's model: vision tower -> fused model -> bridge -> frozen LLM.


class VisionTower(nn.Module):
    """ViT -> a new LayerNorm (CLIP's post-LN is not reused) -> drop CLS -> 3x3 stride-2 merge conv plus
    the tokens at even rows/columns as a residual -> one learnable separator appended per crop."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.vit = ViT(cfg)
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.merge = nn.Conv2d(cfg.width, cfg.width, kernel_size=3, stride=2, padding=1, bias=False)
        self.separator = nn.Parameter(torch.zeros(cfg.width))
        nn.init.normal_(self.merge.weight, std=0.02)
        nn.init.normal_(self.separator, std=0.02)

    def tokens_per_crop(self):
        grid = self.vit.cfg.image_size // self.vit.cfg.patch_size
        return ((grid + 1) // 2) ** 2 + 1

    def forward(self, pixel_values):  # (K, 3, S, S) -> (K, tokens_per_crop, D)
        x = self.norm(self.vit(pixel_values))[:, 1:]
        K, P, D = x.shape
        grid = int(math.isqrt(P))
        x = x.transpose(1, 2).reshape(K, D, grid, grid)
        x = self.merge(x) + x[:, :, ::2, ::2]  # nearest-neighbour 2x down-sampling is the even rows/columns
        x = x.flatten(2).transpose(1, 2)
        return torch.cat([x, self.separator.to(x.dtype).expand(K, 1, D)], dim=1)


def vision_layout(crop_to_sample, B, V):
    """Where every vision token goes when each sample's crops are laid side by side: -> crops (B,) per sample, and
    rows, cols (K * V,) of crop k's token v in a (B, max crops * V) grid, sample b's tokens from column 0 on."""
    K = len(crop_to_sample)
    crops = torch.bincount(crop_to_sample, minlength=B)
    first_crop = torch.cumsum(crops, 0) - crops
    crop_rank = torch.arange(K, device=crops.device) - first_crop[crop_to_sample]  # crop's index in its sample
    rows = crop_to_sample.repeat_interleave(V)
    cols = (crop_rank[:, None] * V + torch.arange(V, device=crops.device)).reshape(-1)
    return crops, rows, cols


class FusedModel(nn.Module):
    """A Llama-architecture decoder over [vision tokens of all crops][Q1][n_l-1 queries][EOS][Q2]...; its
    outputs at the query and EOS positions are the fused vision tokens. Causal over the whole sequence, so
    the queries of question t see every vision token, the questions up to t and the earlier queries."""

    def __init__(self, cfg: FusedVLMConfig):
        super().__init__()
        dim = cfg.vit.width
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.fused_vocab_size, dim)
        self.queries = nn.Parameter(torch.zeros(cfg.n_queries, dim))  # the learned queries, one row per slot
        self.layers = nn.ModuleList(LlamaBlock(dim, cfg.fused_heads, cfg.fused_heads, cfg.fused_mlp, cfg.fused_eps)
                                    for _ in range(cfg.fused_layers))
        self.norm = RMSNorm(dim, cfg.fused_eps)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, vision_tokens, crop_to_sample, fused_ids, query_mask, output_mask):
        """vision_tokens (K, V, D), crop_to_sample (K,), fused_ids/query_mask/output_mask (B, Lq) -> (N_out, D),
        the outputs at output_mask in row-major order (sample by sample, left to right)."""
        _, V, D = vision_tokens.shape
        B, Lq = fused_ids.shape
        text = self.embed_tokens(torch.where(query_mask, 0, fused_ids))
        text = text.masked_scatter(query_mask[..., None], self.queries[fused_ids[query_mask]].to(text.dtype))
        # Sample b's sequence is [its crops' tokens][its Lq fused tokens], right-padded to a common length.
        # Real tokens start at 0 and are contiguous, so causal attention alone never sees the padding.
        crops, rows, cols = vision_layout(crop_to_sample, B, V)
        n_vision = crops * V
        text_cols = n_vision[:, None] + torch.arange(Lq, device=crops.device)  # (B, Lq)
        T = int(n_vision.max()) + Lq
        x = vision_tokens.new_zeros(B, T, D)
        x = x.index_put((rows, cols), vision_tokens.reshape(-1, D).to(x.dtype))
        x = x.index_put((torch.arange(B, device=x.device)[:, None].expand(B, Lq), text_cols), text.to(x.dtype))
        cos, sin = rope(torch.arange(T, device=x.device).expand(B, T), D // self.cfg.fused_heads, self.cfg.fused_rope_theta)
        for layer in self.layers:
            x = layer(x, cos, sin)
        x = self.norm(x)
        b, j = output_mask.nonzero(as_tuple=True)  # row-major
        return x[b, text_cols[b, j]]


def question_sizes(query_mask, output_mask):
    """[(sample, n)] for every question in slot order: its outputs are its n - 1 query slots and its EOS, the one
    output that is not a query slot, so each EOS closes a question."""
    sizes = []
    for b in range(len(output_mask)):
        outputs_so_far = output_mask[b].cumsum(0)[output_mask[b] & ~query_mask[b]].tolist()
        sizes += [(b, end - start) for start, end in zip([0] + outputs_so_far, outputs_so_far)]
    return sizes


class PoolCompressor(nn.Module):
    """Matryoshka-Multimodal style, no parameters, question-blind. For a question with n outputs in a sample of k
    views: each view's g x g merged grid is average-pooled (adaptive_avg_pool2d) to s x s, s = min(g, ceil(sqrt(n / k)))
    so the k s^2 tokens are at least n where the grid allows; those tokens, view by view in reading order, are
    then average-pooled to n (adaptive_avg_pool1d: output i is the mean of tokens floor(i L / n) .. ceil((i+1) L / n) - 1).
    n above the k g^2 vision tokens: the same rule gives bins of one or two neighbouring tokens, so tokens repeat
    (n = 4 k g^2: each token 4 times), carrying nothing new. The separator is left out: it is the same learned
    vector in every view and marks where a view ends in the fused model's sequence, which pooling has no use for."""

    layers = ()  # no blocks to checkpoint, compile or shard

    def __init__(self, cfg: FusedVLMConfig):
        super().__init__()

    def forward(self, vision_tokens, crop_to_sample, fused_ids, query_mask, output_mask):  # -> (N_out, D), slot order
        grids = vision_tokens[:, :-1]  # (K, g*g, D), the separator dropped
        K, V, D = grids.shape
        g = math.isqrt(V)
        grids = grids.transpose(1, 2).reshape(K, D, g, g)
        out = []
        for b, n in question_sizes(query_mask, output_mask):
            views = grids[crop_to_sample == b]  # (k, D, g, g)
            s = min(g, math.ceil(math.sqrt(n / len(views))))
            tokens = F.adaptive_avg_pool2d(views, s).flatten(2).transpose(0, 1).reshape(D, -1)  # (D, k*s*s)
            out.append(F.adaptive_avg_pool1d(tokens[None], n)[0].T)  # (n, D)
        return torch.cat(out)


def sincos_2d(row, col, dim):
    """(N,) grid coordinates -> (N, dim): the fixed 2-D sine-cosine embedding of MAE and Qwen-VL's resampler, a
    quarter of the channels each for sin(row), cos(row), sin(col), cos(col) at geometric frequencies."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, device=row.device).float() / (dim // 4))
    return torch.cat([f(x.float()[:, None] * omega) for x in (row, col) for f in (torch.sin, torch.cos)], dim=-1)


class ResamplerBlock(nn.Module):
    """Pre-norm cross-attention of the queries to the vision tokens (keys carry the tokens' 2-D positions, the
    queries theirs), then a SwiGLU MLP on the queries. The vision tokens themselves are not updated."""

    def __init__(self, dim, heads, mlp, eps):
        super().__init__()
        self.heads = heads
        self.query_norm = RMSNorm(dim, eps)
        self.vision_norm = RMSNorm(dim, eps)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.mlp_norm = RMSNorm(dim, eps)
        self.gate_proj = nn.Linear(dim, mlp, bias=False)
        self.up_proj = nn.Linear(dim, mlp, bias=False)
        self.down_proj = nn.Linear(mlp, dim, bias=False)

    def forward(self, x, query_pos, vision, vision_pos, mask):
        """x, query_pos (B, Nq, D); vision, vision_pos (B, Tv, D); mask (B, 1, 1, Tv): the sample's own tokens."""
        (B, Nq, D), Tv = x.shape, vision.shape[1]
        v_in = self.vision_norm(vision)
        q = self.q_proj(self.query_norm(x) + query_pos).view(B, Nq, self.heads, -1).transpose(1, 2)
        k = self.k_proj(v_in + vision_pos).view(B, Tv, self.heads, -1).transpose(1, 2)
        v = self.v_proj(v_in).view(B, Tv, self.heads, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.o_proj(y.transpose(1, 2).reshape(B, Nq, D))
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Resampler(nn.Module):
    """Qwen-VL style, question-blind: the j-th output of a question is query row j (rows 0 .. n-1 of n_queries + 1)
    after fused_layers blocks of cross-attention to every merged token of its sample's views (the separators left
    out: the positions already say where a token sits). Positions are 2-D sine-cosine of the g x g merged grid: a
    token gets its cell, query j the cell j mod g^2 in reading order, so at the start query j looks at that cell
    of every view. Queries do not attend to each other, so output j is the same whatever n is: a later question's
    n_s outputs repeat the first question's first n_s."""

    def __init__(self, cfg: FusedVLMConfig):
        super().__init__()
        dim = cfg.vit.width
        if dim % 4:
            raise ValueError(f"resampler: width {dim} must be a multiple of 4 for its 2-D positions")
        self.queries = nn.Parameter(torch.zeros(cfg.n_queries + 1, dim))  # one more than the fused model: no EOS
        self.layers = nn.ModuleList(ResamplerBlock(dim, cfg.fused_heads, cfg.fused_mlp, cfg.fused_eps)
                                    for _ in range(cfg.fused_layers))
        self.norm = RMSNorm(dim, cfg.fused_eps)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, vision_tokens, crop_to_sample, fused_ids, query_mask, output_mask):  # -> (N_out, D), slot order
        grids = vision_tokens[:, :-1]  # (K, g*g, D), the separator dropped
        _, V, D = grids.shape
        B = len(fused_ids)
        g = math.isqrt(V)
        # sample b's views side by side, padded to the most views of the batch (as FusedModel lays them out)
        crops, rows, cols = vision_layout(crop_to_sample, B, V)
        vision = grids.new_zeros(B, int(crops.max()) * V, D).index_put((rows, cols), grids.reshape(-1, D))
        cell = torch.arange(vision.shape[1], device=crops.device) % V
        vision_pos = sincos_2d(cell // g, cell % g, D).to(vision.dtype)  # (Tv, D), the same for every sample
        mask = (torch.arange(vision.shape[1], device=crops.device) < crops[:, None] * V)[:, None, None, :]
        # the outputs, sample by sample: output j of a question is query row j (query slots hold rows 0..n-2 and the
        # EOS, the n-th output, follows the last of them)
        after_query = F.pad(query_mask[:, :-1], (1, 0))
        rows = torch.where(query_mask, fused_ids, torch.where(after_query, F.pad(fused_ids[:, :-1], (1, 0)) + 1, 0))
        b, j = output_mask.nonzero(as_tuple=True)  # row-major: slot order
        outputs = output_mask.sum(1)
        rank = torch.arange(len(b), device=b.device) - (torch.cumsum(outputs, 0) - outputs)[b]
        row = rows[b, j]
        x = vision.new_zeros(B, int(outputs.max()), D).index_put((b, rank), self.queries[row].to(vision.dtype))
        query_pos = vision.new_zeros(B, x.shape[1], D).index_put(
            (b, rank), sincos_2d(row % V // g, row % g, D).to(vision.dtype))
        for layer in self.layers:
            x = layer(x, query_pos, vision, vision_pos, mask)
        return self.norm(x)[b, rank]


COMPRESSORS = {"fused": FusedModel, "pool": PoolCompressor, "resampler": Resampler}


class FusedVLM(nn.Module):
    def __init__(self, cfg: FusedVLMConfig, llm=None):
        """llm: an already loaded Llama (saves the random init of a 7B model that is about to be overwritten)."""
        super().__init__()
        if cfg.compressor not in COMPRESSORS:
            raise ValueError(f"compressor must be one of {', '.join(COMPRESSORS)}, got {cfg.compressor!r}")
        self.cfg = cfg
        self.vision = VisionTower(cfg.vit)
        self.fused = COMPRESSORS[cfg.compressor](cfg)  # "fused" for every compressor: the fused checkpoints' keys
        if cfg.compressor != "fused":  # only the fused model reads the separator; DDP would wait for its gradient
            self.vision.separator.requires_grad_(False)
        self.bridge = nn.Linear(cfg.vit.width, cfg.llm.dim, bias=False)
        nn.init.normal_(self.bridge.weight, std=cfg.bridge_init_std)
        self.llm = (Llama(cfg.llm) if llm is None else llm).requires_grad_(False)

    @staticmethod
    def from_pretrained(cfg, weights, llm, path):
        """The trained model: `weights` = a stage-2/3 checkpoint's trainable tensors (load_checkpoint with prefix
        "model.", stripped), around an already loaded frozen LLM (a sweep shares one). Built on the meta device, so
        nothing is randomly initialised; only the trained parts get memory, on the CPU."""
        if llm.cfg != cfg.llm:
            raise ValueError(f"{path}: trained with the LLM {cfg.llm}, given one with {llm.cfg}")
        with torch.device("meta"):
            vlm = FusedVLM(cfg, llm=llm)
        for part in (vlm.vision, vlm.fused, vlm.bridge):
            part.to_empty(device="cpu")
        load_trainable(vlm, weights, path)  # strict: every trained tensor present, with its shape, nothing extra
        return vlm

    def fused_tokens(self, batch):  # -> (N_out, llm dim), in slot order
        vision = self.vision(batch["pixel_values"])
        fused = self.fused(vision, batch["crop_to_sample"], batch["fused_ids"], batch["query_mask"], batch["output_mask"])
        return self.bridge(fused)

    def input_embeds(self, batch):
        """The LLM's token embeddings with the bridge outputs written over the slots, in order (nanoVLM's scatter)."""
        embeds = self.llm.embed_tokens(batch["input_ids"])
        tokens = self.fused_tokens(batch)
        slots = batch["slot_mask"]
        if int(slots.sum()) != len(tokens):
            raise ValueError(f"{int(slots.sum())} LLM slots but {len(tokens)} fused tokens: batch is inconsistent")
        return embeds.masked_scatter(slots[..., None], tokens.to(embeds.dtype))

    def forward(self, batch):
        """-> (logits (B, L, V), loss_sum): cross-entropy summed over the supervised tokens. The caller divides
        by the supervised-token count of the whole optimizer step, so accumulation and DDP stay exact."""
        mask = batch.get("attention_mask")
        left_padded = mask is not None and not bool(mask[:, 0].all())
        logits = self.llm(inputs_embeds=self.input_embeds(batch), attention_mask=mask if left_padded else None)
        # log-softmax at the labelled positions only: over all of them it keeps a float32 (B, L, V) for the backward
        targets = batch["labels"][:, 1:]
        supervised = targets != -100
        loss_sum = F.cross_entropy(logits[:, :-1][supervised].float(), targets[supervised], reduction="sum")
        return logits, loss_sum

    @torch.no_grad()
    def generate(self, batch, max_new_tokens, eos_token_id, min_new_tokens=1):
        """Greedy answers for left-padded prompts -> list of token-id lists, EOS and what follows removed."""
        out = self.llm.generate(inputs_embeds=self.input_embeds(batch), attention_mask=batch["attention_mask"],
                                max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, min_new_tokens=min_new_tokens)
        answers = []
        for row in out.tolist():
            answers.append(row[:row.index(eos_token_id)] if eos_token_id in row else row)
        return answers

    def trainable_state_dict(self):
        """Only what training changes; the frozen LLM is reloaded from its own folder."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("llm.")}


class AlignModel(nn.Module):
    """Stage 1: each question's EOS output, projected, is pulled towards the CLIP text embedding of its answer."""

    def __init__(self, cfg: FusedVLMConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(cfg.vit)
        self.fused = FusedModel(cfg)
        self.text = CLIPText(cfg.text)
        self.align_head = nn.Linear(cfg.vit.width, cfg.text.projection_dim, bias=False)
        nn.init.normal_(self.align_head.weight, std=0.02)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, batch):
        """-> question embeddings (A, P) at each question's EOS, answer embeddings (A, P), all fused outputs (N_out, D)."""
        fused = self.fused(self.vision(batch["pixel_values"]), batch["crop_to_sample"], batch["fused_ids"],
                           batch["query_mask"], batch["output_mask"])
        is_eos = ~batch["query_mask"][batch["output_mask"]]  # among the outputs, the EOS ones (one per question)
        questions = self.align_head(fused[is_eos])
        _, answers = self.text(batch["answer_ids"], batch["answer_attention_mask"])
        return questions, answers, fused


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
        return json.load(f)


def weight_files(path):
    """{key: safetensors file} of a folder, single-file or sharded with model.safetensors.index.json."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        with safe_open(single, "pt") as f:
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
        raise KeyError(f"{path}: checkpoint lacks {len(missing)} expected keys, e.g. {missing[:5]}")
    expected = module.state_dict()
    tensors = {}
    for file in sorted(set(files[hf] for hf in hf_names.values())):
        with safe_open(file, "pt") as f:
            for ours, hf in hf_names.items():
                if files[hf] != file:
                    continue
                t = f.get_tensor(hf)
                if tuple(t.shape) != tuple(expected[ours].shape):
                    raise ValueError(f"{path}: {hf} has shape {tuple(t.shape)}, the config implies {tuple(expected[ours].shape)}")
                t = t.to(dtype) if dtype is not None else t.float()
                if isinstance(expected[ours], DTensor):
                    shard = expected[ours]
                    shard.copy_(distribute_tensor(t.to(shard.device), shard.device_mesh, shard.placements, src_data_rank=None))
                else:
                    tensors[ours] = t
    if tensors:
        module.load_state_dict(tensors, strict=True, assign=True)


# -----------------------------------------------------------------------------
# Our checkpoints: one safetensors file (tensors) with the config and training state as JSON metadata.
# Written to a temp file, synced, then renamed over the old one: a crash mid-write never loses a checkpoint.


def save_checkpoint(path, tensors, meta):
    tmp = path + ".tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata={"meta": json.dumps(meta)})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_file(path):
    """A checkpoint folder (holding ckpt.safetensors, what the training scripts write) or the file itself."""
    return os.path.join(path, "ckpt.safetensors") if os.path.isdir(path) else path


def load_checkpoint(path, prefix=""):
    """path: a checkpoint folder or file -> (tensors whose key starts with prefix, meta dict)."""
    path = checkpoint_file(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with safe_open(path, "pt") as f:
        meta = json.loads((f.metadata() or {}).get("meta", "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    return tensors, meta


def load_trainable(module, tensors, path, unused_prefixes=()):
    """Strictly load trained weights into `module`'s trainable part: every trainable key must be present with
    its shape; keys under unused_prefixes (e.g. the stage-1 text tower when building stage 2) are dropped on purpose."""
    expected = {k: v for k, v in module.state_dict().items() if not k.startswith("llm.")}
    extra = [k for k in tensors if k not in expected and not k.startswith(tuple(unused_prefixes))]
    missing = [k for k in expected if k not in tensors]
    if missing or extra:
        raise KeyError(f"{path}: does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, v in expected.items():
        if tensors[k].shape != v.shape:
            raise ValueError(f"{path}: {k} has shape {tuple(tensors[k].shape)}, the model expects {tuple(v.shape)}")
    module.load_state_dict({k: tensors[k] for k in expected}, strict=False)


# -----------------------------------------------------------------------------
# FLOPs: the count behind MFU.

# bf16 dense peak FLOP/s; matched by substring against torch.cuda.get_device_name().
PEAK_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
              "A6000": 155e12, "A10G": 125e12, "L4": 121e12, "4090": 165e12, "3090": 71e12, "V100": 125e12}


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def linear_params(module):
    """Weights of the Linear layers: the parameters that take part in a matmul once per token."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def train_flops(model, batch):
    """Model FLOPs of one forward+backward of a FusedVLM (any compressor) or an AlignModel on `batch` (MFU's numerator;
    recomputation from activation checkpointing is not counted). A trainable weight costs 6 FLOPs per token
    (forward 2, input gradient 2, weight gradient 2); a frozen LLM weight 4 (no weight gradient, but the
    gradient must flow through it to the bridge). Attention scores cost 12 x layers x width x T per token
    everywhere (the resampler's cross-attention: 12 x layers x width x its vision tokens per output): their
    backward needs the gradients of Q, K and V whether or not the weights train."""
    vit = model.vision.vit.cfg
    K = batch["pixel_values"].shape[0]
    patches = (vit.image_size // vit.patch_size) ** 2
    merged = model.vision.tokens_per_crop() - 1
    flops = 6 * K * (linear_params(model.vision.vit) * (1 + patches) + model.vision.merge.weight.numel() * merged)
    flops += 4 * K * model.vision.vit.patch_embedding.weight.numel() * patches  # pixels need no gradient: 4, not 6
    flops += 12 * K * vit.layers * vit.width * (1 + patches) ** 2
    B = batch["fused_ids"].shape[0]
    crops = torch.bincount(batch["crop_to_sample"], minlength=B)
    if isinstance(model.fused, FusedModel):  # self-attention over [vision tokens][fused text] per sample
        fused_lens = crops * model.vision.tokens_per_crop() + batch["fused_attention_mask"].sum(-1)
        flops += 6 * linear_params(model.fused) * int(fused_lens.sum())
        flops += 12 * model.cfg.fused_layers * vit.width * int((fused_lens ** 2).sum())
    elif isinstance(model.fused, Resampler):  # k, v over the sample's vision tokens, the rest over its outputs
        vision_lens = crops * (model.vision.tokens_per_crop() - 1)  # no separators
        outputs = batch["output_mask"].sum(-1)
        kv = sum(block.k_proj.weight.numel() + block.v_proj.weight.numel() for block in model.fused.layers)
        flops += 6 * kv * int(vision_lens.sum()) + 6 * (linear_params(model.fused) - kv) * int(outputs.sum())
        flops += 12 * model.cfg.fused_layers * vit.width * int((outputs * vision_lens).sum())
    # PoolCompressor: averages only, no matmul
    if isinstance(model, AlignModel):  # the CLIP text tower and the alignment head train too
        text_lens = batch["answer_attention_mask"].sum(-1)
        flops += 6 * linear_params(model.text) * int(text_lens.sum())
        flops += 12 * model.cfg.text.layers * model.cfg.text.width * int((text_lens ** 2).sum())
        flops += 6 * model.align_head.weight.numel() * len(batch["answer_ids"])
        return float(flops)
    flops += 6 * model.bridge.weight.numel() * int(batch["output_mask"].sum())
    llm_lens = batch["attention_mask"].sum(-1)
    flops += 4 * linear_params(model.llm) * int(llm_lens.sum())
    flops += 12 * model.llm.cfg.layers * model.llm.cfg.dim * int((llm_lens ** 2).sum())
    return float(flops)
