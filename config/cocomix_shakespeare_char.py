# The pipeline's CoCoMix student: 4 x 128, concepts of the teacher's SAE (1024 latents) predicted after block 1.
# Mixing: the paper's, interleaving (h_t, c_t); pipeline.py also trains --mix=add (c_t added to h_t, the paper's
# ablation), which has done better than interleaving at this scale (RESULTS.md).
#   python attribution.py config/cocomix_shakespeare_char.py      # label the data once
#   python train.py config/cocomix_shakespeare_char.py --label_cache=True
exec(open('config/teacher_shakespeare_char.py').read())  # the same data, batch and schedule as the teacher
out_dir = 'out-shakespeare_char/cocomix'
mode = 'cocomix'
teacher = 'out-shakespeare_char/teacher'
sae = 'out-shakespeare_char/sae/sae.pt'
sae_layer = 1
n_embd = 128
insert_layer = 1
mix = 'interleave'
concept_topk = 16
k_attr = 4
lam_concept = 0.1
label_cache = True
