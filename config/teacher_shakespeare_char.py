# The teacher of the one-command CPU pipeline (pipeline.py): a character-level GPT on Tiny Shakespeare,
# 4 x 192, about 2.5 minutes on 2 CPU cores.
#   python prepare.py shakespeare --tokenizer=char --input=../shared/data/tinyshakespeare/input.txt --out_dir=data/shakespeare_char
#   python train.py config/teacher_shakespeare_char.py
out_dir = 'out-shakespeare_char/teacher'
dataset = 'shakespeare_char'
eval_interval = 100
eval_iters = 10
log_interval = 25

gradient_accumulation_steps = 1
batch_size = 32
block_size = 128  # 4,096 characters per step

n_layer = 4
n_head = 4
n_embd = 192
dropout = 0.0  # 1.6 passes over the text: too few to overfit
bias = False

learning_rate = 2e-3
max_iters = 400
lr_decay_iters = 400
warmup_iters = 40
min_lr = 2e-4

device = 'cpu'
dtype = 'float32'
compile = False
