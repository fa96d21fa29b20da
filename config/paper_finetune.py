# Stage 3 as in the paper: from the stage-2 checkpoint, one model per n_l, each on the same fixed
# random 10% of the training data (data_fraction draws it with its own seed); otherwise stage 2's recipe, as the
# paper gives no other (the 2 epochs here are our choice).
#   for n in 1 8 16 32 64 128 256 384 512 768; do
#     s=8; [ $n = 1 ] && s=1
#     torchrun --standalone --nproc_per_node=8 train_gen.py config/paper_finetune.py --n_l=$n --n_s=$s --out_dir=out/paper-ft-$n
#   done
# The VQ-ft ablation adds --drop_question=True (and its own out_dir). Fill in the local paths as in paper_gen.py.
out_dir = "out/paper-ft-256"
init_from = "out/paper-gen/ckpt.safetensors"
data_fraction = 0.1
data_dir = "data/images"
train_file = "train.jsonl"
clip_path = "weights/CLIP-ViT-H-14-laion2B-s32B-b79K"
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
fused_heads = 20
fused_mlp = 5120
dtype = "bfloat16"
activation_checkpointing = True
