# The paper's NTP baseline for the 386M CoCoMix model (METHOD.md): 24 x 1072 x 16, widened from CoCoMix's 1024
# so that its parameters match CoCoMix's active ones. OpenWebText, context 1024, 20B tokens in 40k steps.
# torchrun --standalone --nproc_per_node=8 train.py config/ntp_gpt2_386m.py
exec(open('config/ntp_gpt2.py').read())  # the 69M baseline's data, optimiser and schedule shape
out_dir = 'out-ntp_gpt2_386m'
n_layer = 24
n_embd = 1072
n_head = 16
learning_rate = 3e-4
min_lr = 3e-5
