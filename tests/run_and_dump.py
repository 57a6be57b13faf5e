"""Test helper: run a script with the given arguments, then save each process's final model weights.
    python tests/run_and_dump.py DUMP_DIR train.py ARGS...   (also under torchrun)"""
import os
import runpy
import sys

import torch

dump_dir, script = sys.argv[1], sys.argv[2]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # the script's own imports
sys.argv = [script] + sys.argv[3:]
final = runpy.run_path(script, run_name='__main__')
os.makedirs(dump_dir, exist_ok=True)
torch.save(final['raw_model'].state_dict(), os.path.join(dump_dir, f"weights_rank{os.environ.get('RANK', '0')}.pt"))
