# The quick start's CoCoMix student, the paper's shape at CPU size: 8 x 48, the concepts of the
# teacher's SAE (1024 latents, block 2's output) predicted after block 3, interleaved with the hidden
# states (tools/pipeline.py also trains --mix=add, the paper's ablation). 500 steps of 4,096 characters.
#   python attribution.py config/cocomix_shakespeare_char.py      # label the data once
#   python train.py config/cocomix_shakespeare_char.py
exec(open('config/teacher_shakespeare_char.py').read())  # the same data, batch and schedule
out_dir = 'out-shakespeare_char/cocomix'
mode = 'cocomix'
teacher = 'out-shakespeare_char/teacher'
sae = 'out-shakespeare_char/sae/sae.pt'
sae_layer = 1
n_layer = 8
n_embd = 48
insert_layer = 3
mix = 'interleave'
concept_topk = 16
k_attr = 4
lam_concept = 0.1
label_cache = True
always_save_checkpoint = True  # the last step, as the NTP run: both read the same characters
max_iters = 500
lr_decay_iters = 500
