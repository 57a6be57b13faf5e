"""Shared test helpers: tiny synthetic datasets, running the scripts as a user would, tiny GPT-2 checkpoints."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'tools'))  # the drivers and tools

# a tiny model that trains in seconds on a CPU
TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=16', '--batch_size=4', '--bias=False',
        '--device=cpu', '--dtype=float32', '--compile=False', '--eval_iters=2', '--log_interval=1',
        '--warmup_iters=2', '--learning_rate=1e-2', '--min_lr=1e-3', '--gradient_accumulation_steps=1']


def run(args, cwd=ROOT, check=True, env=None):
    """Run `python ARGS` (or a torchrun command) in the repo root; returns the CompletedProcess."""
    cmd = args if args[0] in ('torchrun',) else [sys.executable] + args
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=dict(os.environ, **(env or {})))
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def user_error(fn, *args):
    """The one-line error ("error: ...") that fn(*args) exits with."""
    with pytest.raises(SystemExit) as e:
        fn(*args)
    message = str(e.value.code)
    assert message.startswith('error: ') and '\n' not in message, message
    return message


def write_dataset(path, vocab=32, n_train=20000, n_val=2000, seed=0):
    """A learnable token stream: mostly x[t+1] = (5 x[t] + 3) mod vocab, sometimes a random token."""
    rng = np.random.default_rng(seed)
    n = n_train + n_val
    x = np.empty(n, dtype=np.int64)
    x[0] = 0
    noise = rng.random(n) < 0.1
    rand = rng.integers(0, vocab, n)
    for t in range(1, n):
        x[t] = rand[t] if noise[t] else (5 * x[t - 1] + 3) % vocab
    os.makedirs(path, exist_ok=True)
    x[:n_train].astype(np.uint16).tofile(os.path.join(path, 'train.bin'))
    x[n_train:].astype(np.uint16).tofile(os.path.join(path, 'val.bin'))
    with open(os.path.join(path, 'meta.json'), 'w') as f:
        json.dump({'tokenizer': 'synthetic', 'vocab_size': vocab, 'train_tokens': n_train, 'val_tokens': n_val}, f)
    return path


@pytest.fixture
def dataset(tmp_path):
    return write_dataset(str(tmp_path / 'data'))


def eval_losses(stdout):
    """[(step, train loss, val loss), ...] from train.py's evaluation lines."""
    out = []
    for line in stdout.splitlines():
        if line.startswith('step ') and 'val loss' in line:
            step, rest = line[5:].split(':', 1)
            parts = rest.replace(',', '').split()
            out.append((int(step), float(parts[2]), float(parts[5])))
    return out


@pytest.fixture(scope='session')
def tiny_hf_gpt2(tmp_path_factory):
    """A random tiny GPT-2 written by transformers' save_pretrained: (directory, model)."""
    transformers = pytest.importorskip('transformers')
    import torch
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=3, n_head=2, n_embd=32, vocab_size=96, n_positions=64,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # move every weight off its init (LN gains off 1, biases off 0) so a mix-up shows
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = str(tmp_path_factory.mktemp('tiny_gpt2'))
    model.save_pretrained(path)
    return path, model
