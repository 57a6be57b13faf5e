# The paper's pause-token baseline at 69M (METHOD.md): the NTP model (8 x 624) with one learned vector
# interleaved after every token from block 3 on, exactly where CoCoMix interleaves its concept vectors.
# torchrun --standalone --nproc_per_node=8 train.py config/pause_gpt2.py
exec(open('config/ntp_gpt2.py').read())
out_dir = 'out-pause_gpt2'
mode = 'pause'
insert_layer = 3
