# Stage 3 for the authors' released models (their ten n_l = 1 ... 768, n_s 8; 1 for n_l = 1): config/paper_finetune.py's
# recipe on config/authors_gen.py's model (CLIP ViT-L/14 at 336 px, fused 12 layers x 16 heads, width 1024, MLP 4096).
#   for n in 1 8 16 32 64 128 256 384 512 768; do
#     s=8; [ $n = 1 ] && s=1
#     torchrun --standalone --nproc_per_node=8 train_gen.py config/authors_finetune.py --n_l=$n --n_s=$s --out_dir=out/authors-ft-$n
#   done
# The VQ-ft ablation adds --drop_question=True (and its own out_dir). Fill in the local paths as in authors_gen.py.
out_dir = "out/authors-ft-256"
init_from = "out/authors-gen/ckpt.safetensors"
data_fraction = 0.1
data_dir = "data/images"
train_file = "train.jsonl"
clip_path = "weights/clip-vit-large-patch14-336"
llama_path = "weights/Llama-2-7b-chat-hf"
num_workers = 8
log_interval = 1
ckpt_interval = 10
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
