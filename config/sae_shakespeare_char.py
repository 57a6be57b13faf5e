# The SAE of the pipeline's teacher (config/teacher_shakespeare_char.py), about a minute on 2 CPU cores.
#   python sae.py config/sae_shakespeare_char.py
out_dir = 'out-shakespeare_char/sae'
teacher = 'out-shakespeare_char/teacher'
dataset = 'shakespeare_char'
sae_layer = 1  # the output of block 2 of 4, the middle of the network as in the paper (GPT-2: 6 of 12)
n_latents = 1024
k = 16
dead_tokens = 200_000
batch_size = 1024
context = 128
buffer_size = 65536
max_tokens = 1_000_000
eval_tokens = 20000
log_interval = 100
ckpt_interval = 500
device = 'cpu'
dtype = 'float32'
