# The paper's 69M CoCoMix (METHOD.md): 8 x 512 x 8, concepts after block 3, from GPT-2 124M's OpenAI SAE
# (resid_post_mlp, layer 5, 32768 latents); k_attr 4, concept_topk 32, lam_concept 0.1 are train.py's defaults.
# OpenWebText, context 1024, 20B tokens = 40k steps of 524,288 tokens. Matched baseline: config/ntp_gpt2.py.
#   python attribution.py config/cocomix_gpt2.py     # optional: label OpenWebText once, then --label_cache=True
#   torchrun --standalone --nproc_per_node=8 train.py config/cocomix_gpt2.py
exec(open('config/ntp_gpt2.py').read())  # the baseline's data, optimiser, schedule, bias and dropout
out_dir = 'out-cocomix_gpt2'
mode = 'cocomix'
teacher = 'gpt2'
sae = 'openai:resid_post_mlp:5'
sae_layer = 5
n_embd = 512  # NTP's 624 is this width plus the concept parts' active parameters
insert_layer = 3
