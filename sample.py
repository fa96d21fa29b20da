"""
Answer questions about one image with a trained checkpoint (ours, or an authors' one converted by
convert_authors.py): greedy decoding as evaluate.py does it, in the token space the checkpoint was trained with.

    python sample.py --ckpt=out/ft-64 --image=photo.jpg --question="What is written on the sign?"
    python sample.py --ckpt=out/ft-64 --image=photo.jpg --question="What is this?" --question="What colour is it?"
    python sample.py --ckpt=out/authors/256 --image=photo.jpg --question="..." --n_l=64

Several --question make a multi-turn chat: each is asked after the previous answers, which are fed back as the
assistant's turns (the first question gets n_l vision tokens, every later one n_s, as in training). With one
question only the answer is printed; with several, each question and its answer.
"""
import sys
from dataclasses import dataclass

import torch
from PIL import Image

from backbones import Llama
from checkpoint import checkpoint_file, inference_vlm, read_gen_checkpoint
from configurator import InputError, parse_config, report_input_errors
from evaluate import greedy_answers, torch_dtype
from fusion import TokenSpace, TokenSpaceConfig
from model import FusedVLMConfig


@dataclass
class Config:
    ckpt: str = ""             # a gen checkpoint: folder with ckpt.safetensors, or the file
    image: str = ""            # an image file Pillow reads
    question: str = ""         # repeat --question=... for a multi-turn chat
    n_l: int | None = None     # None = as trained; vision tokens for the first question
    n_s: int | None = None     # None = as trained; for every later question
    num_crops: int | None = None  # None = as trained
    max_new_tokens: int = 512  # evaluate.py's budget for open questions
    llama_path: str = ""       # "" = the checkpoint's (set it when the weights have moved)
    clip_path: str = ""
    device: str = ""           # "" = cuda when there is one, else cpu
    dtype: str = ""            # float32 | bfloat16 | float16; "" = bfloat16 on GPU, float32 on CPU


def load(cfg, device, dtype):
    """-> (FusedVLM in eval mode, TokenSpace) of the checkpoint, with the command line's token-space overrides."""
    path = checkpoint_file(cfg.ckpt)
    weights, meta = read_gen_checkpoint(path)
    model_cfg, trained = FusedVLMConfig.from_dict(meta["model_config"]), meta["token_space"]
    ts_cfg = TokenSpaceConfig(clip_path=cfg.clip_path or meta["clip_path"],
                              llama_path=cfg.llama_path or meta["llama_path"], image_size=trained["image_size"],
                              num_crops=trained["num_crops"] if cfg.num_crops is None else cfg.num_crops,
                              n_l=trained["n_l"] if cfg.n_l is None else cfg.n_l,
                              n_s=trained["n_s"] if cfg.n_s is None else cfg.n_s,
                              drop_question=trained["drop_question"], max_seq_len=trained["max_seq_len"],
                              system_prompt=trained["system_prompt"],
                              chat_template=trained["chat_template"])
    if max(ts_cfg.n_l, ts_cfg.n_s) - 1 > model_cfg.n_queries:
        raise InputError(f"{path}: n_l={ts_cfg.n_l}, n_s={ts_cfg.n_s} need up to {max(ts_cfg.n_l, ts_cfg.n_s) - 1} "
                         f"learned queries, the checkpoint has {model_cfg.n_queries}")
    llm = Llama.from_hf(ts_cfg.llama_path, dtype=dtype).to(device)
    return inference_vlm(model_cfg, weights, llm, path, device, dtype), TokenSpace(ts_cfg)


def chat(vlm, token_space, image, questions, max_new_tokens, device, dtype):
    """Greedy answers to the questions in turn, each asked after the earlier (question, answer) turns."""
    turns = []
    for question in questions:
        sample = token_space.make_sample(image, turns + [(question, None)])
        (answer,), _ = greedy_answers(vlm, token_space, [sample], max_new_tokens, device, dtype)
        turns.append((question, answer))
    return [answer for _, answer in turns]


def main(argv):
    questions = [arg.partition("=")[2] for arg in argv if arg.startswith("--question=")]
    cfg, positional = parse_config(Config(), argv)
    if positional:
        raise InputError(f"sample.py takes no positional arguments, got {positional}")
    if not questions and cfg.question:  # a config file may set one question
        questions = [cfg.question]
    if not cfg.ckpt or not cfg.image or not questions:
        raise InputError("give --ckpt=DIR --image=FILE --question=\"...\" (repeat --question for a chat)")
    try:
        with Image.open(cfg.image) as f:
            image = f.convert("RGB")
    except OSError as e:
        raise InputError(f"{cfg.image}: not an image Pillow can read ({e})") from None
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch_dtype(cfg, device)
    vlm, token_space = load(cfg, device, dtype)
    answers = chat(vlm, token_space, image, questions, cfg.max_new_tokens, device, dtype)
    if len(questions) == 1:
        print(answers[0])
    else:
        for question, answer in zip(questions, answers):
            print(f"Q: {question}\nA: {answer}\n")
    return answers


if __name__ == "__main__":
    report_input_errors()
    main(sys.argv[1:])
