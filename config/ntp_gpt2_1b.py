# The paper's NTP baseline for the 1.38B CoCoMix model (METHOD.md): 24 x 2096 x 16, widened from CoCoMix's 2048
# so that its parameters match CoCoMix's active ones. OpenWebText, context 1024, 20B tokens in 20k steps of 1M.
# torchrun --standalone --nproc_per_node=8 train.py config/ntp_gpt2_1b.py
exec(open('config/ntp_gpt2.py').read())  # the 69M baseline's data and optimiser
out_dir = 'out-ntp_gpt2_1b'
n_layer = 24
n_embd = 2096
n_head = 16
gradient_accumulation_steps = 64  # 1,048,576 tokens per step = 16 x 1024 x 64
learning_rate = 2e-4
min_lr = 2e-5
max_iters = 20000
lr_decay_iters = 20000
warmup_iters = 65
