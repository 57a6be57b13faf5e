# An SAE on the small Shakespeare teacher of the CPU pipeline (config/ntp_shakespeare.py, 4 x 128): a few
# minutes on 2 CPU cores.  python sae.py config/sae_shakespeare.py
out_dir = 'out-sae-shakespeare'
teacher = 'out-shakespeare'
dataset = 'shakespeare'
sae_layer = 1  # the output of block 2 of 4, the middle of the network as in the paper (GPT-2: 6 of 12)
n_latents = 2048  # 16 x the teacher's width
k = 16
dead_tokens = 200_000
batch_size = 1024
context = 64
buffer_size = 65536
max_tokens = 3_000_000
eval_tokens = 20000
log_interval = 20
ckpt_interval = 500
device = 'cpu'
dtype = 'float32'
