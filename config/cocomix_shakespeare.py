# CoCoMix on Tiny Shakespeare, CPU-sized: the student of config/ntp_shakespeare.py (4 x 128) with concepts from
# the small teacher (out-shakespeare, config/ntp_shakespeare.py) and its SAE (config/sae_shakespeare.py).
#   python attribution.py config/cocomix_shakespeare.py      # optional: label once, then --label_cache=True
#   python train.py config/cocomix_shakespeare.py
exec(open('config/ntp_shakespeare.py').read())  # the same data, model and schedule as the NTP baseline
out_dir = 'out-cocomix-shakespeare'
mode = 'cocomix'
teacher = 'out-shakespeare'
sae = 'out-sae-shakespeare/sae.pt'
sae_layer = 1
k_attr = 4
lam_concept = 0.1
concept_topk = 16
insert_layer = 2  # concepts after 2 of the 4 blocks
mix = 'interleave'
