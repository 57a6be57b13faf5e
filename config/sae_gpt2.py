# The paper's SAE, should you want to train it again: GPT-2 small, residual stream after block 6 of 12
# (layer index 5), 32768 latents, k = 32, as OpenAI's v5_32k resid_post_mlp layer 5 (which load_sae
# downloads as 'openai:resid_post_mlp:5'). Gao et al. trained on 40B+ tokens; 2B already gives a usable SAE.
# python sae.py config/sae_gpt2.py
out_dir = 'out-sae-gpt2'
teacher = 'gpt2'
dataset = 'openwebtext'
sae_layer = 5
n_latents = 32768
k = 32
dead_tokens = 10_000_000
batch_size = 4096
context = 64
buffer_size = 262144
max_tokens = 2_000_000_000
eval_tokens = 262144
log_interval = 100
ckpt_interval = 5000
