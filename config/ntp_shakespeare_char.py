# The pipeline's NTP baseline: the CoCoMix student of config/cocomix_shakespeare_char.py without concepts,
# widened from 128 to 140 so that its 0.96M parameters match (+2%) CoCoMix's 0.94M active ones.
#   python train.py config/ntp_shakespeare_char.py
exec(open('config/teacher_shakespeare_char.py').read())  # the same data, batch and schedule as the teacher
out_dir = 'out-shakespeare_char/ntp'
n_embd = 140
