"""Test helper: run a script with rank 0's torch.save slowed down by 2 s, and record when rank 0's last save
finished and when each process ended: python tests/slow_save.py LOG_DIR SCRIPT ARGS... (under torchrun)."""
import os
import runpy
import sys
import time

import torch

log_dir, script = sys.argv[1], sys.argv[2]
rank = os.environ.get('RANK', '0')
os.makedirs(log_dir, exist_ok=True)
save = torch.save


def slow_save(*args, **kwargs):
    if rank == '0':
        time.sleep(2)
    save(*args, **kwargs)
    with open(os.path.join(log_dir, 'saved'), 'w') as f:
        f.write(repr(time.time()))


torch.save = slow_save
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
sys.argv = [script] + sys.argv[3:]
runpy.run_path(script, run_name='__main__')
with open(os.path.join(log_dir, f'ended{rank}'), 'w') as f:
    f.write(repr(time.time()))
