"""checkpoint.py reading a checkpoint written before the current format: tests/fixtures/ckpt_2bbe1ac_fused.safetensors
is a tiny stage-2 FusedVLM saved by the code of commit 2bbe1ac (its compressor under the old key prefix `fused.`);
ckpt_2bbe1ac_fused_expected.safetensors holds what that code computed with it: a batch, the frozen LLM's weights,
the logits, the loss and the greedy answers. Today's code must reproduce them: the answers exactly, the logits and the
loss to float32 rounding (another CPU's kernels may sum in another order; a wrong key map moves them by whole units)."""
from pathlib import Path

import torch
from safetensors.torch import load_file

from backbones import Llama
from checkpoint import init_from, load_checkpoint, read_gen_checkpoint, trained_vlm, upgrade
from model import FusedVLM, FusedVLMConfig

FIXTURES = Path(__file__).resolve().parent / "fixtures"
OLD = str(FIXTURES / "ckpt_2bbe1ac_fused.safetensors")


def old_run():
    expected = load_file(FIXTURES / "ckpt_2bbe1ac_fused_expected.safetensors")
    batch = {k[len("batch."):]: v for k, v in expected.items() if k.startswith("batch.")}
    batch["pixel_values"] = batch["pixel_values"].float()  # stored as float16
    return batch, {k[len("llm."):]: v for k, v in expected.items() if k.startswith("llm.")}, expected


def test_a_checkpoint_of_the_old_format_gives_the_same_logits_and_answers():
    batch, llm_weights, expected = old_run()
    weights, meta = read_gen_checkpoint(OLD)
    assert any(k.startswith("compressor.") for k in weights) and not any(k.startswith("fused.") for k in weights)
    cfg = FusedVLMConfig.from_dict(meta["model_config"])
    llm = Llama(cfg.llm)
    llm.load_state_dict(llm_weights)
    vlm = trained_vlm(cfg, weights, llm, OLD).eval()
    with torch.no_grad():
        logits, loss_sum = vlm(batch)
        answers = vlm.generate(batch, max_new_tokens=4, eos_token_id=2, min_new_tokens=1)
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_sum.reshape(1), expected["loss_sum"], rtol=1e-5, atol=1e-5)
    assert answers == expected["answers"].tolist()


def test_init_from_an_old_checkpoint_takes_every_trained_tensor():
    _, meta = load_checkpoint(OLD)
    model = FusedVLM(FusedVLMConfig.from_dict(meta["model_config"]))
    init_from(model, OLD, log=lambda *args: None)
    tensors, _ = load_checkpoint(OLD, prefix="model.")
    trained = model.trainable_state_dict()
    assert trained.keys() == {k[len("model."):] for k in tensors}
    assert all(torch.equal(trained[k[len("model."):]], v) for k, v in tensors.items())


def test_the_meta_of_a_checkpoint_before_compressors_and_chat_templates_reads_as_what_it_was():
    meta = upgrade({"model_config": {"fused_layers": 2}, "token_space": {"n_l": 4}})
    assert meta["model_config"]["compressor"] == "fused"
    assert meta["token_space"]["chat_template"] == "llama-2"
