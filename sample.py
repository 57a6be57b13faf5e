"""
Sample from a trained model (a train.py out_dir) or from OpenAI's GPT-2 weights.

    python sample.py --out_dir=out-shakespeare --start="ROMEO:" --num_samples=3
    python sample.py --init_from=gpt2 --start=FILE:prompt.txt --temperature=0.8 --top_k=200
"""
import os
from contextlib import nullcontext

import tiktoken
import torch

from configurator import configure
from model import load_model

# -----------------------------------------------------------------------------
init_from = 'resume'  # 'resume' (the checkpoint in out_dir) or a gpt2 variant, e.g. 'gpt2-xl'
out_dir = 'out'
start = "\n"  # the prompt; "FILE:prompt.txt" reads it from a file
num_samples = 3
max_new_tokens = 200
temperature = 0.8  # 1.0 = the model's distribution, < 1 sharper, 0 = greedy
top_k = 200  # keep only the top_k most likely tokens; 0 = all
seed = 1337
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'
# -----------------------------------------------------------------------------
configure(globals())
torch.manual_seed(seed)
device_type = 'cuda' if 'cuda' in device else 'cpu'
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
autocast = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=ptdtype)

model, checkpoint = load_model(out_dir if init_from == 'resume' else init_from, device)
if checkpoint is not None:
    print(f"loaded {out_dir}/ckpt.pt: mode '{checkpoint.get('mode', 'ntp')}', step {checkpoint['iter_num']}, "
          f"val loss {checkpoint['best_val_loss']:.4f}")

enc = tiktoken.get_encoding('gpt2')  # prepare.py tokenizes every dataset with GPT-2 BPE
if start.startswith('FILE:'):
    path = start[5:]
    if not os.path.exists(path):
        raise SystemExit(f"error: prompt file '{path}' does not exist")
    with open(path, encoding='utf-8') as f:
        start = f.read()
start_ids = enc.encode(start, allowed_special={'<|endoftext|>'}) or [enc.eot_token]
x = torch.tensor(start_ids, dtype=torch.long, device=device)[None, ...]

with torch.no_grad(), autocast:
    for k in range(num_samples):
        y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k or None)
        # ids past GPT-2's vocabulary are padding rows of the head; an untrained model can still pick them
        print(enc.decode([t for t in y[0].tolist() if t < enc.n_vocab]))
        print('---------------')
