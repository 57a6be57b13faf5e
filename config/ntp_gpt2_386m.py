# The paper's NTP baseline for the 386M CoCoMix model (METHOD.md): 24 x 1072 x 16, widened from CoCoMix's width
# so that its parameters match CoCoMix's active ones. OpenWebText, context 1024, 20B tokens.
# torchrun --standalone --nproc_per_node=8 train.py config/ntp_gpt2_386m.py
out_dir = 'out-ntp_gpt2_386m'
dataset = 'openwebtext'  # python prepare.py openwebtext
eval_interval = 1000
eval_iters = 200
log_interval = 10

# 524,288 tokens per step = 16 sequences x 1024 tokens x 32 micro-batches (over all GPUs)
batch_size = 16
block_size = 1024
gradient_accumulation_steps = 32

n_layer = 24
n_embd = 1072
n_head = 16
# The released code trained through Hugging Face GPT-2 defaults: biases on and dropout 0.1. We follow it so the
# baselines match the paper's numbers; bias=False, dropout=0.0 is the usual modern choice and a little faster.
bias = True
dropout = 0.1

# AdamW(0.9, 0.95), weight decay 0.1, clip 1.0; warmup 1/300 of the steps, cosine to a tenth of the peak
learning_rate = 3e-4
min_lr = 3e-05
max_iters = 40000
lr_decay_iters = 40000
warmup_iters = 130
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

dtype = 'bfloat16'
compile = True
