"""model.train_flops (the MFU numerator) against torch.utils.flop_counter.FlopCounterMode on a tiny FusedVLM.

FlopCounterMode counts matmul-like ops only (mm, addmm, bmm, convolution and their backward), each as
2*m*n*k, on what actually runs. Its registry has no entry for the CPU flash-attention kernel, so every count
here runs SDPA's math backend, whose two bmm per head it does count (the full T x T product even under a causal
mask, which is also what train_flops charges). Everything else the model does (norms, activations, RoPE,
embeddings, softmax, the loss) is elementwise or a gather, outside both counts; so on a batch without padding
the two must agree exactly, and the only tolerance is float rounding (rel 1e-9).
"""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from backbones import LlamaConfig, ViTConfig
from model import AnswerModel, FusedVLM, FusedVLMConfig, train_flops

EOS, SLOT = 63, 0


def tiny_config():
    # 28 px crops of 7 px patches: 16 patches -> 2x2 merged + separator = 5 tokens per crop; grouped KV heads in the LLM
    return FusedVLMConfig(ViTConfig(image_size=28, patch_size=7, width=32, layers=2, heads=4, mlp=64),
                          LlamaConfig(vocab_size=128, dim=48, layers=2, heads=4, kv_heads=2, mlp=96),
                          fused_layers=2, fused_heads=4, fused_mlp=64, fused_vocab_size=64, n_queries=15)


def make_batch(samples):
    """samples: [(crops, question_len, n_l, llm_len)] -> a right-padded batch per the contract, one question each."""
    B = len(samples)
    Lq = max(q + n for _, q, n, _ in samples)
    L = max(m for *_, m in samples)
    batch = dict(pixel_values=torch.randn(sum(s[0] for s in samples), 3, 28, 28),
                 crop_to_sample=torch.cat([torch.full((k,), b) for b, (k, *_) in enumerate(samples)]),
                 fused_ids=torch.zeros(B, Lq, dtype=torch.long), query_mask=torch.zeros(B, Lq, dtype=torch.bool),
                 output_mask=torch.zeros(B, Lq, dtype=torch.bool), fused_real_mask=torch.zeros(B, Lq, dtype=torch.bool),
                 input_ids=torch.zeros(B, L, dtype=torch.long), slot_mask=torch.zeros(B, L, dtype=torch.bool),
                 labels=torch.full((B, L), -100), attention_mask=torch.zeros(B, L, dtype=torch.bool))
    for b, (_, q, n, m) in enumerate(samples):
        batch["fused_ids"][b, :q] = torch.randint(1, EOS, (q,))
        batch["fused_ids"][b, q:q + n - 1] = torch.arange(n - 1)  # query rows
        batch["fused_ids"][b, q + n - 1] = EOS
        batch["query_mask"][b, q:q + n - 1] = True
        batch["output_mask"][b, q:q + n] = True
        batch["fused_real_mask"][b, :q + n] = True
        batch["input_ids"][b, :m] = torch.randint(3, 128, (m,))
        batch["input_ids"][b, 2:2 + n] = SLOT
        batch["slot_mask"][b, 2:2 + n] = True
        batch["labels"][b, m - 3:m] = batch["input_ids"][b, m - 3:m]  # the last 3 tokens are the answer
        batch["attention_mask"][b, :m] = True
    return batch


def counted(fn):
    """-> (FLOPs FlopCounterMode counts while fn runs, {op name: FLOPs}, fn's result)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = fn()
    by_op = {str(op).split(".")[1]: n for op, n in counter.get_flop_counts()["Global"].items()}
    by_op["matmul"] = by_op.get("mm", 0) + by_op.get("addmm", 0)  # biased Linear runs addmm forward, mm backward
    return counter.get_total_flops(), by_op, out


def counted_step(vlm, batch):
    total_fwd, _, (_, loss) = counted(lambda: vlm(batch))
    total_bwd, _, _ = counted(loss.backward)
    return total_fwd + total_bwd


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    return FusedVLM(tiny_config())


def test_train_flops_equals_counted_forward_backward(vlm):
    torch.manual_seed(1)
    batch = make_batch([(3, 4, 6, 20), (3, 4, 6, 20)])  # equal samples: no padding anywhere
    expected = counted_step(vlm, batch)
    assert train_flops(vlm, batch) == pytest.approx(expected, rel=1e-9)


def test_padding_is_not_counted_as_model_flops(vlm):
    """train_flops counts real tokens only: a padded batch costs what its samples cost one at a time."""
    torch.manual_seed(2)
    samples = [(1, 2, 3, 12), (4, 5, 8, 25)]
    padded = make_batch(samples)
    alone = sum(counted_step(vlm, make_batch([s])) for s in samples)
    assert counted_step(vlm, padded) > alone  # the padded run does compute on the padding
    assert train_flops(vlm, padded) == pytest.approx(alone, rel=1e-9)


def test_frozen_llm_backward_has_no_weight_gradient_matmuls(vlm):
    """Split the graph at the LLM's input: the frozen LLM's backward repeats its forward matmuls once (input
    gradients only: 4N in all), the trainable side's twice (input and weight gradients: 6N). Attention has no
    weights, so its backward is twice its forward on both sides."""
    torch.manual_seed(3)
    batch = make_batch([(2, 3, 7, 18), (2, 3, 7, 18)])
    vlm.zero_grad(set_to_none=True)
    _, vision_fwd, embeds = counted(lambda: vlm.input_embeds(batch))
    inputs = embeds.detach().requires_grad_(True)
    _, llm_fwd, logits = counted(lambda: vlm.llm(inputs_embeds=inputs))
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                             ignore_index=-100, reduction="sum")
    _, llm_bwd, _ = counted(loss.backward)
    _, vision_bwd, _ = counted(lambda: embeds.backward(inputs.grad))

    assert llm_fwd["matmul"] > 0 and llm_fwd["bmm"] > 0
    assert llm_bwd["matmul"] == llm_fwd["matmul"]
    assert llm_bwd["bmm"] == 2 * llm_fwd["bmm"]
    assert vision_bwd["matmul"] == 2 * vision_fwd["matmul"]
    assert vision_bwd["bmm"] == 2 * vision_fwd["bmm"]
    assert all(p.grad is None for p in vlm.llm.parameters())
    assert vlm.bridge.weight.grad is not None and vlm.vision.vit.patch_embedding.weight.grad is not None


def test_answer_stage_counts_its_frozen_vision_tower_forward_only():
    """train_align.py --objective=answers: the vision tower runs without gradient, the fused model and the head
    train; its train_flops against the counted forward of the whole and backward of the cross-entropy."""
    torch.manual_seed(4)
    model = AnswerModel(tiny_config(), n_answers=7)
    model.vision.requires_grad_(False)
    batch = make_batch([(3, 4, 6, 20), (3, 4, 6, 20)])
    batch["answer_ids"] = torch.zeros(2, 1, dtype=torch.long)  # one question each
    batch["answer_class"] = torch.tensor([1, 5])
    forward, _, (_, loss) = counted(lambda: model(batch))
    backward, _, _ = counted(loss.backward)
    assert all(p.grad is None for p in model.vision.parameters())
    assert train_flops(model, batch) == pytest.approx(forward + backward, rel=1e-9)


def test_paper_vit_matches_the_published_openclip_profile():
    """OpenCLIP's model_profile.csv lists ViT-H-14 at 334.6 GFLOPs per 224 px image (forward); training costs
    three forwards. Our vision part at 224 px also has the merge conv (6 FLOPs per weight per output token,
    hand-counted here); the rest of the gap (OpenCLIP counts its final projection, we count 257 positions
    through every block, the patch embedding is 2 forwards not 3) is under 0.5%."""
    with torch.device("meta"):
        vlm = FusedVLM(FusedVLMConfig(vit=ViTConfig(image_size=224)))
    one_crop = make_batch([(1, 4, 8, 30)])
    one_crop["pixel_values"] = torch.empty(1, 3, 224, 224, device="meta")
    # train_flops charges the vision tower per row of pixel_values and sizes the fused sequence by crop_to_sample,
    # so dropping the pixel rows alone leaves exactly the vision tower's share
    no_crop = dict(one_crop, pixel_values=one_crop["pixel_values"][:0])
    vision = train_flops(vlm, one_crop) - train_flops(vlm, no_crop)
    merge = 6 * 1280 * 1280 * 9 * 8 * 8
    assert vision - merge == pytest.approx(3 * 334.6e9, rel=5e-3)
