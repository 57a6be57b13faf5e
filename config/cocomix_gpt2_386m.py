# The paper's 386M CoCoMix (METHOD.md): 24 x 1024 x 16, concepts after block 5; teacher and SAE as in
# config/cocomix_gpt2.py. Matched baseline: config/ntp_gpt2_386m.py (24 x 1072).
# torchrun --standalone --nproc_per_node=8 train.py config/cocomix_gpt2_386m.py
exec(open('config/ntp_gpt2_386m.py').read())
out_dir = 'out-cocomix_gpt2_386m'
mode = 'cocomix'  # teacher gpt2, SAE openai:resid_post_mlp:5 at sae_layer 5: train.py's defaults
n_embd = 1024
insert_layer = 5
