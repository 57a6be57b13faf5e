# The pipeline's CoCoMix student: 4 x 128, concepts of the teacher's SAE (1024 latents) predicted after block 1.
# Mixing: the paper interleaves (h_t, c_t); at this scale (4 layers, 1.6M characters) that loses to NTP, since the
# concept slots that carry the readout start almost empty of h_t, while adding c_t to h_t (the paper's ablation)
# wins: see the README's study. --mix=interleave gives the paper's version.
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
mix = 'add'
concept_topk = 16
k_attr = 4
lam_concept = 0.1
label_cache = True
