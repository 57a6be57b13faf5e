# The teacher of the one-command CPU pipeline (pipeline.py): a character-level GPT on Tiny Shakespeare,
# 4 x 192, about 2 minutes on 2 CPU cores.
#   python prepare.py shakespeare --tokenizer=char --out_dir=data/shakespeare_char
#   python train.py config/teacher_shakespeare_char.py
exec(open('config/ntp_shakespeare.py').read())  # the schedule (400 steps, lr 2e-3), context 128 and CPU settings
out_dir = 'out-shakespeare_char/teacher'
dataset = 'shakespeare_char'
log_interval = 25
batch_size = 32  # 4,096 characters per step
n_embd = 192
dropout = 0.0  # 1.6 passes over the text: too few to overfit
