# Stage 1 as the authors' code and released checkpoints have it, where it differs from config/paper_align.py:
# CLIP ViT-L/14 at its native 336 px (quick-GELU, read from the checkpoint's config.json; no position
# interpolation) instead of ViT-H/14; the fused model at the ViT's width 1024 by their rule (heads = width // 64,
# MLP = the ViT's MLP, depth = the CLIP text tower's 12 layers); n_l 128 / n_s 8 and 1024 text positions as their
# stage-1 checkpoints. The answer encoder is that CLIP's text tower (12 layers x 768). The recipe (batch, lr,
# steps) is the paper's: their repository has no training code.
#   torchrun --standalone --nproc_per_node=8 train_align.py config/authors_align.py
# Fill in the local paths: nothing is downloaded at run time.
out_dir = "out/authors-align"
data_dir = "data/images"  # the image root: LLaVA's folders (coco/, gqa/, ocr_vqa/, textvqa/, vg/) and DocDownstream-1.0/
train_file = "train.jsonl"  # in data_dir: the JSONLs of data/llava, data/svit and data/docdownstream prepare.py, concatenated
clip_path = "weights/clip-vit-large-patch14-336"  # openai/clip-vit-large-patch14-336 (safetensors)
llama_path = "weights/Llama-2-7b-chat-hf"  # meta-llama/Llama-2-7b-chat-hf: here only its tokenizer.model
num_workers = 8
log_interval = 10
ckpt_interval = 100
batch_size = 32
grad_accum = 1
max_iters = 1000
lr = 2e-5
warmup_ratio = 0.1
image_size = 336
num_crops = 16
n_l = 128
n_s = 8
max_seq_len = 4096
fused_layers = 12
fused_heads = 16
fused_mlp = 4096
text_max_positions = 1024
eye_weight = 1.0
text_outlier_sigma = 1.0
gather_negatives = False
dtype = "bfloat16"
activation_checkpointing = True
