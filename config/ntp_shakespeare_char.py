# The quick start's NTP baseline: the CoCoMix student of config/cocomix_shakespeare_char.py without
# concepts, widened from 48 to 56 so that its parameters reach CoCoMix's active ones, on the same
# windows in the same order (window_grid: the label cache's windows).
#   python train.py config/ntp_shakespeare_char.py
exec(open('config/teacher_shakespeare_char.py').read())  # the same data, batch and schedule
out_dir = 'out-shakespeare_char/ntp'
n_layer = 8
n_embd = 56
window_grid = True
always_save_checkpoint = True
max_iters = 500
lr_decay_iters = 500
