# The whole pipeline on CPU in seconds, on the synthetic world and its tiny random CLIP and Llama:
#   python data/synthetic/prepare.py --out_dir=data/synthetic/out
#   python train_align.py config/tiny.py
#   python train_gen.py config/tiny.py --init_from=out/align/ckpt.safetensors
# Every key here is valid for both train scripts; the script-specific ones keep their defaults or come as --key=value.
_data = "data/synthetic/out"
data_dir = _data
clip_path = _data + "/clip"
llama_path = _data + "/llama"
num_workers = 0
log_interval = 5
ckpt_interval = 50
max_iters = 40
batch_size = 8
grad_accum = 2
lr = 1e-3
warmup_ratio = 0.1
# token space: the synthetic CLIP runs at 112 px (8 x 8 patches -> 17 tokens per crop)
image_size = 112
num_crops = 4
n_l = 16
n_s = 4
max_seq_len = 1024
# a 2-layer fused model at the tiny ViT's width (128)
fused_layers = 2
fused_heads = 4
fused_mlp = 256
dtype = "float32"
