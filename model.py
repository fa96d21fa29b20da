"""
The paper's model, nanoGPT style, built from backbones.py's networks:

    image crops -> ViT (CLIP) -> new LayerNorm -> merge conv -> separator  = VisionTower
    [vision tokens][question][queries][EOS]... -> Llama-style decoder      = FusedModel
    fused outputs at the query/EOS positions -> Linear bridge -> frozen Llama = FusedVLM

The fused model is one of three compressors (FusedVLMConfig.compressor, held in FusedVLM.compressor) that turn the
vision tokens into the n_l (first question) / n_s (later questions) tokens the LLM slots take, with the same inputs
and outputs: "fused" (the paper's, question-aware), "pool" (adaptive average pooling, no parameters) and "resampler"
(learned queries cross-attending to the vision tokens, question-blind).

plus stage 1's AlignModel (the fused model's question tokens against the CLIP text tower) and the FLOP count behind
MFU. Our checkpoint format (and FusedVLM built from a checkpoint) is checkpoint.py's; what a training run adds around
the networks (optimizer, schedule, FSDP) is training.py's.

The vision-token count the LLM sees is the paper's knob n_l: it is set by the data (how many query slots
fusion.py writes), not by the model, so one trained model can be run at any n_l up to n_queries + 1 (pool: any).
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbones import CLIPText, CLIPTextConfig, Llama, LlamaBlock, LlamaConfig, RMSNorm, ViT, ViTConfig, rope

# -----------------------------------------------------------------------------
# The paper's configuration: CLIP ViT-H/14 at 336 px, a 12-layer fused model, Llama-2-7B.


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
        subs = {"vit": ViTConfig, "llm": LlamaConfig, "text": CLIPTextConfig}
        return FusedVLMConfig(**{k: subs[k](**v) if k in subs else v for k, v in d.items()})


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


def compressor_blocks(compressor):
    """A compressor's transformer blocks; pooling has none."""
    return [] if isinstance(compressor, PoolCompressor) else list(compressor.layers)


class FusedVLM(nn.Module):
    def __init__(self, cfg: FusedVLMConfig, llm=None):
        """llm: an already loaded Llama (saves the random init of a 7B model that is about to be overwritten)."""
        super().__init__()
        if cfg.compressor not in COMPRESSORS:
            raise ValueError(f"compressor must be one of {', '.join(COMPRESSORS)}, got {cfg.compressor!r}")
        self.cfg = cfg
        self.vision = VisionTower(cfg.vit)
        self.compressor = COMPRESSORS[cfg.compressor](cfg)
        if cfg.compressor != "fused":  # only the fused model reads the separator; DDP would wait for its gradient
            self.vision.separator.requires_grad_(False)
        self.bridge = nn.Linear(cfg.vit.width, cfg.llm.dim, bias=False)
        nn.init.normal_(self.bridge.weight, std=cfg.bridge_init_std)
        self.llm = (Llama(cfg.llm) if llm is None else llm).requires_grad_(False)

    def blocks(self):
        """The trainable transformer blocks, each its own unit for activation checkpointing, compile and FSDP."""
        return [*self.vision.vit.layers, *compressor_blocks(self.compressor)]

    def fused_tokens(self, batch):  # -> (N_out, llm dim), in slot order
        vision = self.vision(batch["pixel_values"])
        fused = self.compressor(vision, batch["crop_to_sample"], batch["fused_ids"], batch["query_mask"],
                                batch["output_mask"])
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
        self.compressor = FusedModel(cfg)  # stage 1 aligns the fused model: the paper's compressor
        self.text = CLIPText(cfg.text)
        self.align_head = nn.Linear(cfg.vit.width, cfg.text.projection_dim, bias=False)
        nn.init.normal_(self.align_head.weight, std=0.02)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, batch):
        """-> question embeddings (A, P) at each question's EOS, answer embeddings (A, P), all fused outputs (N_out, D)."""
        fused = self.compressor(self.vision(batch["pixel_values"]), batch["crop_to_sample"], batch["fused_ids"],
                                batch["query_mask"], batch["output_mask"])
        is_eos = ~batch["query_mask"][batch["output_mask"]]  # among the outputs, the EOS ones (one per question)
        questions = self.align_head(fused[is_eos])
        _, answers = self.text(batch["answer_ids"], batch["answer_attention_mask"])
        return questions, answers, fused

    def blocks(self):
        """The transformer blocks, each its own unit for activation checkpointing, compile and FSDP."""
        return [*self.vision.vit.layers, *self.compressor.layers, *self.text.layers]


class AnswerModel(nn.Module):
    """Stage 1 with objective=answers: each question's EOS output classified over the training set's frequent
    answers, as the classic VQA heads do (train_align.py gives the loss to first questions only). The vision tower
    runs without gradient: this stage teaches the fused model alone to carry what its question asks for; the head is
    left behind with the stage."""

    def __init__(self, cfg: FusedVLMConfig, n_answers):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(cfg.vit)
        self.compressor = FusedModel(cfg)
        self.answer_head = nn.Linear(cfg.vit.width, n_answers)
        nn.init.normal_(self.answer_head.weight, std=0.02)
        nn.init.zeros_(self.answer_head.bias)

    def forward(self, batch):
        """-> (answer logits (A, n_answers) at each question's EOS, loss_sum): cross-entropy summed over the questions
        whose batch["answer_class"] is not -1. As in FusedVLM, the caller divides by the whole step's count."""
        with torch.no_grad():
            vision_tokens = self.vision(batch["pixel_values"])
        fused = self.compressor(vision_tokens, batch["crop_to_sample"], batch["fused_ids"], batch["query_mask"],
                                batch["output_mask"])
        is_eos = ~batch["query_mask"][batch["output_mask"]]
        logits = self.answer_head(fused[is_eos])
        return logits, F.cross_entropy(logits.float(), batch["answer_class"], ignore_index=-1, reduction="sum")

    def blocks(self):
        return [*self.vision.vit.layers, *self.compressor.layers]


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
    """Model FLOPs of one forward+backward of a FusedVLM (any compressor), an AlignModel or an AnswerModel on `batch`
    (MFU's numerator; recomputation from activation checkpointing is not counted). A trainable weight costs 6 FLOPs
    per token (forward 2, input gradient 2, weight gradient 2); a frozen LLM weight 4 (no weight gradient, but the
    gradient must flow through it to the bridge); AnswerModel's frozen vision tower 2 (forward only, no gradient
    flows into it). Attention scores cost 12 x layers x width x T per token wherever a gradient flows through them
    (the resampler's cross-attention: 12 x layers x width x its vision tokens per output), 4 in a forward only."""
    vit = model.vision.vit.cfg
    K = batch["pixel_values"].shape[0]
    patches = (vit.image_size // vit.patch_size) ** 2
    merged = model.vision.tokens_per_crop() - 1
    forward_only = isinstance(model, AnswerModel)
    weight, pixels, scores = (2, 2, 4) if forward_only else (6, 4, 12)  # pixels need no gradient: 4, not 6
    flops = weight * K * (linear_params(model.vision.vit) * (1 + patches) + model.vision.merge.weight.numel() * merged)
    flops += pixels * K * model.vision.vit.patch_embedding.weight.numel() * patches
    flops += scores * K * vit.layers * vit.width * (1 + patches) ** 2
    B = batch["fused_ids"].shape[0]
    crops = torch.bincount(batch["crop_to_sample"], minlength=B)
    if isinstance(model.compressor, FusedModel):  # self-attention over [vision tokens][fused text] per sample
        fused_lens = crops * model.vision.tokens_per_crop() + batch["fused_real_mask"].sum(-1)
        flops += 6 * linear_params(model.compressor) * int(fused_lens.sum())
        flops += 12 * model.cfg.fused_layers * vit.width * int((fused_lens ** 2).sum())
    elif isinstance(model.compressor, Resampler):  # k, v over the sample's vision tokens, the rest over its outputs
        vision_lens = crops * (model.vision.tokens_per_crop() - 1)  # no separators
        outputs = batch["output_mask"].sum(-1)
        kv = sum(block.k_proj.weight.numel() + block.v_proj.weight.numel() for block in model.compressor.layers)
        flops += 6 * kv * int(vision_lens.sum()) + 6 * (linear_params(model.compressor) - kv) * int(outputs.sum())
        flops += 12 * model.cfg.fused_layers * vit.width * int((outputs * vision_lens).sum())
    # PoolCompressor: averages only, no matmul
    if isinstance(model, AlignModel):  # the CLIP text tower and the alignment head train too
        text_lens = batch["answer_attention_mask"].sum(-1)
        flops += 6 * linear_params(model.text) * int(text_lens.sum())
        flops += 12 * model.cfg.text.layers * model.cfg.text.width * int((text_lens ** 2).sum())
        flops += 6 * model.align_head.weight.numel() * len(batch["answer_ids"])
        return float(flops)
    if forward_only:  # the answer head, once per question
        return float(flops + 6 * model.answer_head.weight.numel() * len(batch["answer_ids"]))
    flops += 6 * model.bridge.weight.numel() * int(batch["output_mask"].sum())
    llm_lens = batch["attention_mask"].sum(-1)
    flops += 4 * linear_params(model.llm) * int(llm_lens.sum())
    flops += 12 * model.llm.cfg.layers * model.llm.cfg.dim * int((llm_lens ** 2).sum())
    return float(flops)
