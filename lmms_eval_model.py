"""
Our checkpoints as an lmms-eval model, so that any of lmms-eval's tasks can score them. evaluate.py stays the
reference for the paper's benchmarks (exact, judge-free rules); this is for the rest of the field's tasks. Nothing
else in the project imports this file, and lmms-eval is not a dependency of the project.

    pip install lmms-eval
    python lmms_eval_model.py --register      # once per environment: makes `--model tokenspace` known
    python -m lmms_eval --model tokenspace --model_args ckpt=out/ft-64,batch_size=8 --tasks mme,pope

or from Python, with this folder on the path (no --register needed):

    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval_model import TokenSpaceLMMS
    results = simple_evaluate(model=TokenSpaceLMMS(ckpt="out/ft-64"), tasks=["mme"])

--register writes into the environment's site-packages what `pip install -e` of a package with this entry point
would: a .pth that puts this checkout on the path and a dist-info naming the entry point (group lmms_eval.models,
name tokenspace). `pip uninstall tokenspace-lmms-eval` removes both.

The model is a stage-2/3 checkpoint (ours, or an authors' one converted by convert_authors.py), loaded as sample.py
loads it (the token space it was trained with; model_args n_l, n_s, num_crops override it), and answers as
evaluate.py does: its prompt building (TokenSpace.generation_sample: lmms-eval's context is the question), its
greedy decoding and its left-padded batches (evaluate.greedy_answers), so a row and its image give the same answer
in both. Requests are batched batch_size at a time in the order they come, consecutive ones with the same
generation settings together: in evaluate.py's row order that makes evaluate.py's very batches. A request's
image is its doc's last image (evaluate.py shows a row with several images its last one); a doc without one is
refused, the model reads one image per question. Unlike evaluate.py, no JPEG round trip: lmms-eval's other
models see the dataset's images as they are.

    generate_until             greedy, at most gen_kwargs' max_new_tokens (default 512, evaluate.py's open budget),
                               the text cut before the first of gen_kwargs' `until` strings; sampling settings
                               are ignored (always greedy, as evaluate.py)
    loglikelihood              the continuation (stripped: our answers never start with a space) as the answer
                               after the context's prompt, through the frozen LLM: the sum of its tokens'
                               log-probabilities, and whether greedy decoding (EOS banned at the first step, as
                               when generating) gives exactly these tokens
    generate_until_multi_round one conversation about the first round's image per request: each later question
                               (from the task's doc_to_text, given the answers so far) is asked after the earlier
                               turns in the token space's later-turn layout (n_s vision tokens), as sample.py's chat
                               does; later rounds' visuals are not read. -> the list of the rounds' answers
One process (lmms-eval's rank 0 of 1).
"""
import os
import sys
import sysconfig

import torch
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from PIL import Image

import sample
from evaluate import greedy_answers, torch_dtype
from fusion import IGNORE, collate

DEFAULT_MAX_NEW_TOKENS = 512
DISTRIBUTION = "tokenspace_lmms_eval"  # pip's normalised form of tokenspace-lmms-eval


class TokenSpaceLMMS(lmms):
    def __init__(self, ckpt, batch_size=1, max_batch_size=None, device=None, dtype="", n_l=None, n_s=None,
                 num_crops=None, llama_path="", clip_path=""):
        """max_batch_size: lmms-eval passes it; batches are batch_size. device None: cuda when there is one.
        dtype "": bfloat16 on GPU, float32 on CPU. llama_path, clip_path: "" = the checkpoint's."""
        super().__init__()
        cfg = sample.Config(ckpt=ckpt, n_l=n_l, n_s=n_s, num_crops=num_crops, llama_path=llama_path,
                            clip_path=clip_path, dtype=dtype)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = torch_dtype(cfg, self.device)
        self.vlm, self.token_space = sample.load(cfg, self.device, self.dtype)
        self.batch_size = int(batch_size)

    def image(self, doc_to_visual, doc_id, task, split):
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        images = [v for v in visuals if isinstance(v, Image.Image)]
        if not images:
            raise ValueError(f"{task} {split} doc {doc_id}: no image; this model reads one image per question")
        return images[-1].convert("RGB")

    def batches(self, requests, settings=lambda request: None):
        """Consecutive requests with equal settings(request), batch_size at a time, in their order."""
        batch = []
        for request in requests:
            if batch and (len(batch) == self.batch_size or settings(request) != settings(batch[0])):
                yield batch
                batch = []
            batch.append(request)
        if batch:
            yield batch

    def answers(self, samples, gen_kwargs):
        until = gen_kwargs.get("until") or []
        texts, _ = greedy_answers(self.vlm, self.token_space, samples,
                                  gen_kwargs.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS), self.device, self.dtype)
        for stop in [until] if isinstance(until, str) else until:
            texts = [text.split(stop)[0] for text in texts]
        return texts

    def generate_until(self, requests):
        out = []
        for batch in self.batches(requests, settings=lambda request: request.args[1]):  # args[1]: gen_kwargs
            samples = [self.token_space.generation_sample(self.image(*r.args[2:6]), r.args[0]) for r in batch]
            out += self.answers(samples, batch[0].args[1])
        return out

    @torch.no_grad()
    def loglikelihood(self, requests):
        out = []
        for batch in self.batches(requests):
            samples = []
            for request in batch:
                context, continuation = request.args[:2]
                answer = torch.tensor(self.token_space.sp.encode(continuation.strip()), dtype=torch.long)
                if len(answer) == 0:
                    raise ValueError(f"{request.task_name} doc {request.doc_id}: an empty continuation")
                prompt = self.token_space.generation_sample(self.image(*request.args[2:6]), context)
                no_slots = torch.zeros(len(answer), dtype=torch.bool)
                samples.append(dict(prompt, input_ids=torch.cat([prompt["input_ids"], answer]),
                                    slot_mask=torch.cat([prompt["slot_mask"], no_slots]),
                                    labels=torch.cat([torch.full_like(prompt["input_ids"], IGNORE), answer])))
            inputs = {k: v.to(self.device) for k, v in collate(samples).items()}  # right-padded: no mask needed
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            logits, _ = self.vlm(inputs)
            targets = inputs["labels"][:, 1:]  # position t predicts token t + 1
            for b in range(len(batch)):
                positions = (targets[b] != IGNORE).nonzero()[:, 0]
                answer, logprobs = targets[b, positions], logits[b, positions].float().log_softmax(-1)
                greedy = logprobs.clone()
                greedy[0, self.token_space.eos] = -float("inf")  # generation makes at least one new token
                out.append((logprobs.gather(1, answer[:, None]).sum().item(),
                            bool((greedy.argmax(-1) == answer).all())))
        return out

    def generate_until_multi_round(self, requests):
        out = []
        for request in requests:
            question, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
            image, doc = self.image(doc_to_visual, doc_id, task, split), self.task_dict[task][split][doc_id]
            turns, round_info, done = [], None, False
            while not done:
                (answer,) = self.answers([self.token_space.make_sample(image, turns + [(question, None)])], gen_kwargs)
                turns.append((question, answer))
                _, question, done, _, round_info = doc_to_text(doc, previous_output=[a for _, a in turns],
                                                               round_idx=len(turns), previous_round_info=round_info)
            out.append([answer for _, answer in turns])
        return out


# -----------------------------------------------------------------------------
# `--model tokenspace`: the lmms_eval.models entry point


def manifest():
    return ModelManifest(model_id="tokenspace", simple_class_path="lmms_eval_model.TokenSpaceLMMS")


def register(site_dir):
    """Writes into site_dir what an editable install of a package with our entry point writes, RECORD included so
    that pip can uninstall it. -> the paths written."""
    info = f"{DISTRIBUTION}-0.dist-info"
    files = {f"{DISTRIBUTION}.pth": os.path.dirname(os.path.abspath(__file__)) + "\n",
             f"{info}/METADATA": "Metadata-Version: 2.1\nName: tokenspace-lmms-eval\nVersion: 0\n",
             f"{info}/entry_points.txt": "[lmms_eval.models]\ntokenspace = lmms_eval_model:manifest\n",
             f"{info}/INSTALLER": "lmms_eval_model.py\n"}
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    os.makedirs(os.path.join(site_dir, info), exist_ok=True)
    for name, text in files.items():
        with open(os.path.join(site_dir, name), "w") as f:
            f.write(text)
    return [os.path.join(site_dir, name) for name in files]


if __name__ == "__main__":
    if sys.argv[1:] != ["--register"]:
        sys.exit("usage: python lmms_eval_model.py --register   (see the docstring at the top)")
    for path in register(sysconfig.get_paths()["purelib"]):
        print(f"wrote {path}")
    print("lmms-eval now knows --model tokenspace; `pip uninstall tokenspace-lmms-eval` removes it")
