"""
Time the training step of a train.py config on random tokens: ms/iter, tokens/s, MFU and peak memory.

    python bench.py config/ntp_shakespeare.py --compile=False
    python bench.py config/ntp_gpt2.py --batch_size=8

Accepts any train.py config; the keys of train.py that a bare training step does not use are ignored.
"""
import math
import os
import resource
import time
from contextlib import nullcontext

import torch

from configurator import configure, train_keys
from model import GPT, GPTConfig, guess_peak_flops

# -----------------------------------------------------------------------------
batch_size = 12
block_size = 1024
vocab_size = 50257  # padded to a multiple of 64, as train.py does
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = True
learning_rate = 6e-4
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'
compile = torch.cuda.is_available()
peak_flops = 0.0  # 0 = guess from the device
seed = 1337
warmup_steps = 3  # untimed (compilation, allocator warm-up)
steps = 10  # timed
# -----------------------------------------------------------------------------


configure(globals(), ignore=train_keys())
torch.manual_seed(seed)
device_type = 'cuda' if 'cuda' in device else 'cpu'
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
autocast = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=ptdtype)
sync = torch.cuda.synchronize if device_type == 'cuda' else (lambda: None)

config = GPTConfig(block_size=block_size, vocab_size=math.ceil(vocab_size / 64) * 64, n_layer=n_layer,
                   n_head=n_head, n_embd=n_embd, dropout=dropout, bias=bias)
model = GPT(config).to(device)
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
step_model = torch.compile(model) if compile else model
x = torch.randint(0, vocab_size, (batch_size, block_size), device=device)
y = torch.randint(0, vocab_size, (batch_size, block_size), device=device)


def train_step():
    with autocast:
        _, loss = step_model(x, y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


for _ in range(warmup_steps):
    train_step()
sync()
if device_type == 'cuda':
    torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter()
for _ in range(steps):
    train_step()
sync()
dt = (time.perf_counter() - t0) / steps
tokens = batch_size * block_size
peak = peak_flops or guess_peak_flops(device, dtype)
flops = model.flops_per_token(block_size) * tokens / dt
memory = (f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device_type == 'cuda' else
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
print(f"{model.get_num_params() / 1e6:.2f}M params, {tokens} tokens/iter, compile={compile}, {dtype} on {device}: "
      f"{dt * 1000:.1f} ms/iter, {tokens / dt:,.0f} tokens/s, {flops / 1e9:,.1f} GFLOP/s, "
      f"MFU {flops / peak * 100:.1f}% of {peak / 1e12:.2f} TFLOP/s, {memory}")
