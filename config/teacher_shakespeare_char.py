# The teacher of the quick start (tools/pipeline.py) and of the study: a character-level GPT, 4 x 192
# (1.8M parameters, four times the students), on Tiny Shakespeare 700 steps of 4,096 characters.
#   python prepare.py shakespeare --tokenizer=char --out_dir=data/shakespeare_char
#   python train.py config/teacher_shakespeare_char.py
exec(open('config/ntp_shakespeare.py').read())  # lr 2e-3 with warmup, context 128, CPU settings
out_dir = 'out-shakespeare_char/teacher'
dataset = 'shakespeare_char'
log_interval = 25
batch_size = 32  # 4,096 characters per step
n_embd = 192
dropout = 0.0  # about three passes over the text: too few to overfit at this size
max_iters = 700
lr_decay_iters = 700
