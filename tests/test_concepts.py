"""tools/concepts.py's settings: refused in one line before the held-out text is scanned."""
import os

import pytest
import torch

from common import fingerprint, save_checkpoint
from conftest import run, write_dataset
from model import GPT, GPTConfig
from sae import TopKSAE


@pytest.fixture(scope='module')
def sae_file(tmp_path_factory):
    """A random teacher of context 16 (as train.py saves it) and an SAE naming it, its data and layer."""
    tmp = tmp_path_factory.mktemp('concepts')
    data = write_dataset(str(tmp / 'data'), n_train=2000, n_val=2000)
    args = dict(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32)
    for seed, name in ((1, 'other_teacher'), (0, 'teacher')):  # the SAE's own teacher is seed 0's
        torch.manual_seed(seed)
        teacher = GPT(GPTConfig(**args))
        save_checkpoint({'model': teacher.state_dict(), 'model_args': args, 'mode': 'ntp', 'iter_num': 0,
                         'config': {}, 'data_meta': {'tokenizer': 'synthetic', 'vocab_size': 32}},
                        str(tmp / name))
    path = str(tmp / 'sae.pt')
    TopKSAE(32, 48, 4).save(path, {'teacher': str(tmp / 'teacher'), 'dataset': data, 'layer': 0,
                                   'teacher_id': fingerprint(teacher)})
    return path


@pytest.mark.parametrize('arg, want', [
    ('--context=64', "context=64 is longer than the teacher's 16 tokens; give --context=16 or less"),
    ('--top=49', "top=49 but the SAE has 48 latents; give --top=48"),
    ('--sae_layer=1', "reads layer 0 of its teacher but this run has sae_layer=1"),
    ('--teacher={tmp}/other_teacher', "was trained on another teacher"),
    ('--tokens=0', "tokens must be an int with tokens >= 1"),
])
def test_bad_settings_one_line(sae_file, arg, want):
    arg = arg.format(tmp=os.path.dirname(sae_file))
    bad = run(['tools/concepts.py', f'--sae={sae_file}', '--device=cpu', '--dtype=float32', '--context=16', arg],
              check=False)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1 and want in bad.stderr, bad.stderr
    assert not os.path.exists(sae_file + '.concepts.json')  # no descriptions of another layer or teacher


def test_context_of_the_teacher_works(sae_file):
    out = run(['tools/concepts.py', f'--sae={sae_file}', '--device=cpu', '--dtype=float32', '--context=16',
               '--tokens=256', '--top=3']).stdout
    assert 'most frequent latents over 256 tokens' in out
