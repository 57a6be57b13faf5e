# The paper's KD baseline at 69M (METHOD.md): the NTP model (8 x 624) trained on CE + 0.1 * KL(teacher || student)
# at temperature 1, with GPT-2 124M as the teacher, on the same data and schedule.
# torchrun --standalone --nproc_per_node=8 train.py config/kd_gpt2.py
exec(open('config/ntp_gpt2.py').read())
out_dir = 'out-kd_gpt2'
mode = 'kd'  # 'kd_pause' adds the pause vector of config/pause_gpt2.py
teacher = 'gpt2'
lam_kd = 0.1
