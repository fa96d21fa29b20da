# Stage 2 as in the paper (config/paper_gen.py: same data, batch, schedule, n_l = 256, n_s = 8), with
# Llama-3.1-8B-Instruct frozen in place of Llama-2-7B chat. Why this one: it is Llama-2-7B chat's own successor, with
# the same width (4096, so the bridge 1280 -> 4096 keeps its shape) and depth (32 blocks), so a change in the law or
# the fusion gain is the newer LLM's, not another architecture's; what differs is its training, grouped KV heads, a
# 128K vocabulary and the llama3 RoPE scaling, all of which our Llama runs exactly. Stage 1 does not involve the LLM's
# weights: start from its checkpoint as config/paper_gen.py does.
#   torchrun --standalone --nproc_per_node=8 train_gen.py config/llama3_gen.py
import os
import runpy

globals().update({k: v for k, v in runpy.run_path(os.path.join(os.path.dirname(__file__), "paper_gen.py")).items()
                  if not k.startswith("_")})
out_dir = "out/llama3-gen"
llama_path = "weights/Llama-3.1-8B-Instruct"  # meta-llama/Llama-3.1-8B-Instruct (safetensors, tokenizer.json)
chat_template = "llama-3"
