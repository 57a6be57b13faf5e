# The paper's 1.38B CoCoMix (METHOD.md): 24 x 2048 x 16, concepts after block 5, 20B tokens in 20k steps of 1M;
# teacher and SAE as in config/cocomix_gpt2.py. Matched baseline: config/ntp_gpt2_1b.py (24 x 2096).
# torchrun --standalone --nproc_per_node=8 train.py config/cocomix_gpt2_1b.py
exec(open('config/ntp_gpt2_1b.py').read())
out_dir = 'out-cocomix_gpt2_1b'
mode = 'cocomix'  # teacher gpt2, SAE openai:resid_post_mlp:5 at sae_layer 5: train.py's defaults
n_embd = 2048
insert_layer = 5
