# A small GPT on Tiny Shakespeare (GPT-2 BPE) that trains on a laptop CPU in a few minutes.
# python prepare.py shakespeare   (the text ships with the repository)
# python train.py config/ntp_shakespeare.py
out_dir = 'out-shakespeare'
dataset = 'shakespeare'
eval_interval = 100
eval_iters = 10
log_interval = 20
always_save_checkpoint = False  # keep the best val loss: a small model overfits Shakespeare quickly

gradient_accumulation_steps = 1
batch_size = 12
block_size = 128

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.1
bias = False

learning_rate = 2e-3  # small models tolerate a high rate
max_iters = 400
lr_decay_iters = 400
warmup_iters = 40
min_lr = 2e-4

device = 'cpu'
dtype = 'float32'
compile = False
