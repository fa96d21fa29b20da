# Stage 2 for the authors' released model: config/paper_gen.py's recipe (n_l 256 / n_s 8 on the full data, Llama-2
# frozen) on config/authors_align.py's model: CLIP ViT-L/14 at 336 px and a fused model of 12 layers x 16 heads,
# width 1024, MLP 4096.
#   torchrun --standalone --nproc_per_node=8 train_gen.py config/authors_gen.py
# Fill in the local paths: nothing is downloaded at run time.
out_dir = "out/authors-gen"
init_from = "out/authors-align/ckpt.safetensors"
data_dir = "data/images"
train_file = "train.jsonl"
clip_path = "weights/clip-vit-large-patch14-336"  # openai/clip-vit-large-patch14-336: config and BPE vocabulary
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
fused_heads = 16
fused_mlp = 4096
dtype = "bfloat16"
activation_checkpointing = True
