# The NTP baseline of config/cocomix_shakespeare.py at matched active parameters: 4 x 132 has about the
# 7.49M that the 4 x 128 CoCoMix student with 2048 concepts uses per token (7.23M at width 128).
exec(open('config/ntp_shakespeare.py').read())
out_dir = 'out-ntp-shakespeare-matched'
n_embd = 132
