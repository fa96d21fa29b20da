# Stage 2 as in the paper: from the stage-1 checkpoint, 5 conversations per GPU x 64 accumulation
# x 8 GPUs = 2560 per step, lr 2e-5, cosine schedule with 3% warm-up, 2 epochs, n_l = 256, n_s = 8; Llama-2 frozen.
#   torchrun --standalone --nproc_per_node=8 train_gen.py config/paper_gen.py
# Fill in the local paths: nothing is downloaded at run time.
out_dir = "out/paper-gen"
init_from = "out/paper-align/ckpt.safetensors"
data_dir = "data/images"  # the image root: LLaVA's folders (coco/, gqa/, ocr_vqa/, textvqa/, vg/) and DocDownstream-1.0/
train_file = "train.jsonl"  # in data_dir: the JSONLs of data/llava, data/svit and data/docdownstream prepare.py, concatenated
clip_path = "weights/CLIP-ViT-H-14-laion2B-s32B-b79K"  # laion/CLIP-ViT-H-14-laion2B-s32B-b79K: config and BPE vocabulary
llama_path = "weights/Llama-2-7b-chat-hf"  # meta-llama/Llama-2-7b-chat-hf (safetensors)
num_workers = 8
log_interval = 1
ckpt_interval = 50
batch_size = 5
grad_accum = 64
epochs = 2
max_iters = 0  # from epochs
lr = 2e-5
warmup_ratio = 0.03
image_size = 336
num_crops = 16
n_l = 256
n_s = 8
max_seq_len = 4096
fused_layers = 12
fused_heads = 20
fused_mlp = 5120
dtype = "bfloat16"
activation_checkpointing = True
