"""Off the quick start's path: every combination of settings either does what it says or refuses in one line
before any expensive work. One GPT-2-tokenized toy dataset, one tiny GPT-2 folder (transformers'
save_pretrained) as the pretrained start and the teacher, one random SAE on its block-1 output."""
import json
import os

import numpy as np
import pytest
import torch

from conftest import run, write_dataset

TWO = ['torchrun', '--standalone', '--nproc_per_node=2']
ONE_THREAD = {'OMP_NUM_THREADS': '1'}
# a tiny student from scratch; a GPT-2 start takes its shape from the folder instead
SHAPE = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--bias=False']
RUN = ['--block_size=16', '--batch_size=4', '--device=cpu', '--dtype=float32', '--eval_iters=2', '--log_interval=1',
       '--warmup_iters=1', '--learning_rate=1e-2', '--min_lr=1e-3', '--gradient_accumulation_steps=2',
       '--eval_interval=2', '--insert_layer=1', '--concept_topk=4', '--sae_layer=1']


@pytest.fixture(scope='module')
def world(tmp_path_factory, tiny_hf_gpt2):
    """(dataset, teacher folder, SAE file, label cache made): what every cell shares."""
    import sae as S
    root = tmp_path_factory.mktemp('world')
    data = write_dataset(str(root / 'data'), vocab=96)
    meta = json.load(open(os.path.join(data, 'meta.json')))
    json.dump(dict(meta, tokenizer='gpt2'), open(os.path.join(data, 'meta.json'), 'w'))  # GPT-2's ids, as the teacher
    torch.manual_seed(0)
    sae = S.TopKSAE(32, 64, 4)
    S.init_sae(sae, torch.randn(256, 32))
    sae.save(str(root / 'sae.pt'), {'layer': 1})
    teacher = tiny_hf_gpt2[0]
    concepts = [f'--teacher={teacher}', f'--sae={root / "sae.pt"}']
    run(['attribution.py', f'--dataset={data}', '--block_size=16', '--device=cpu', '--splits=train',
         '--sae_layer=1'] + concepts)
    return data, teacher, concepts


def train(world, out, *args, procs=1, check=True):
    data, _, concepts = world
    cmd = (TWO if procs == 2 else []) + ['train.py', f'--dataset={data}', f'--out_dir={out}'] + RUN + concepts
    return run(cmd + list(args), check=check, env=ONE_THREAD)


def one_line_error(p, message):
    assert p.returncode != 0 and message in p.stderr, p.stderr[-3000:]
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr[-3000:]  # no traceback


# -----------------------------------------------------------------------------
# The five cases that broke one step off the tested paths

def test_cocomix_and_pause_from_a_gpt2_folder_add_their_module_to_the_pretrained_model(world, tmp_path, tiny_hf_gpt2):
    """The pretrained weights are kept (learning rate 0: nothing moves) and the concept (or pause) module is
    added, freshly initialised; the log has the concept loss; the checkpoint samples."""
    folder, hf = tiny_hf_gpt2
    for mode, key, term in (('cocomix', 'concepts.concept_head.weight', 'concept '), ('pause', 'pause', 'loss ')):
        out = tmp_path / mode
        p = train(world, out, f'--mode={mode}', f'--init_from={folder}', '--max_iters=2', '--learning_rate=0.0',
                  '--min_lr=0.0', '--weight_decay=0.0')
        assert term in [l for l in p.stdout.splitlines() if l.startswith('iter 1:')][0], p.stdout
        ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
        assert key in ckpt['model'] and ckpt['model_args']['n_layer'] == 3
        hf_wte = hf.transformer.wte.weight
        assert torch.equal(ckpt['model']['transformer.wte.weight'][:hf_wte.size(0)], hf_wte)
        assert torch.equal(ckpt['model']['transformer.h.2.mlp.c_fc.weight'], hf.transformer.h[2].mlp.c_fc.weight.t())
        run(['sample.py', f'--out_dir={out}', '--num_samples=1', '--max_new_tokens=3', '--start=!', '--device=cpu'])


def test_predict_only_trains_under_torchrun(world, tmp_path):
    """mix=none has no compression weights (nothing would give them a gradient, which DDP refuses)."""
    p = train(world, tmp_path / 'none', *SHAPE, '--mode=cocomix', '--mix=none', '--max_iters=2', procs=2)
    assert 'concept ' in [l for l in p.stdout.splitlines() if l.startswith('iter 1:')][0]
    ckpt = torch.load(tmp_path / 'none' / 'ckpt.pt', weights_only=True)
    assert not any('compress' in k for k in ckpt['model']) and ckpt['iter_num'] == 2


def test_resume_refuses_another_architecture_and_records_what_it_ran(world, tmp_path):
    out = tmp_path / 'run'
    train(world, out, *SHAPE, '--mode=cocomix', '--mix=interleave', '--max_iters=2')
    one_line_error(train(world, out, *SHAPE, '--mode=cocomix', '--mix=add', '--init_from=resume', '--max_iters=3',
                         check=False), "mix='add' but ")
    one_line_error(train(world, out, '--n_layer=3', '--n_embd=48', '--mode=cocomix', '--init_from=resume',
                         '--max_iters=3', check=False), 'n_layer=3, n_embd=48')
    # architecture settings left out are the checkpoint's, and the checkpoint records those, not train.py's defaults
    train(world, out, '--mode=cocomix', '--init_from=resume', '--max_iters=4')
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ckpt['iter_num'] == 4 and ckpt['config']['mix'] == 'interleave' and ckpt['config']['n_layer'] == 2
    assert ckpt['config']['n_embd'] == ckpt['model_args']['n_embd'] == 32


def test_any_seed_trains(world, tmp_path):
    for seed in (1_000_000, 2 ** 62):
        train(world, tmp_path / str(seed), *SHAPE, f'--seed={seed}', '--max_iters=1', '--eval_interval=1')


def test_sae_context_beyond_the_teachers_is_refused(world, tmp_path):
    data, teacher, _ = world  # the tiny GPT-2 reads 64 positions
    one_line_error(run(['sae.py', f'--teacher={teacher}', f'--dataset={data}', '--sae_layer=1', '--context=128',
                        f'--out_dir={tmp_path}', '--device=cpu'], check=False),
                   'context=128 is longer than the teacher')


@pytest.mark.parametrize('args, message', [
    (['--mode=ntp', '--mix=add'], "mix='add' applies to mode=cocomix"),
    (['--mode=pause', '--mix=add'], "mix='add' applies to mode=cocomix"),
    (['--mode=kd', '--label_cache=True'], 'label_cache=True applies to mode=cocomix'),
    (['--mode=cocomix', '--mix=none', '--lam_concept=0.0'], 'lam_concept=0.0 with mix=none'),
    (['--mode=cocomix', '--insert_layer=5'], 'insert_layer=5 is outside'),
    (['--mode=cocomix', '--concept_topk=100'], 'concept_topk=100 is more than'),
    (['--mode=cocomix', '--k_attr=9'], 'k_attr=9 is more than'),
    (['--mode=cocomix', '--label_method=gradient'], "label_method must be one of attribution, activation"),
    (['--mode=cocomix', '--init_from=resume'], 'no checkpoint at'),
])
def test_conflicting_settings_are_one_line_before_any_work(world, tmp_path, args, message):
    one_line_error(train(world, tmp_path / 'x', *SHAPE, '--max_iters=1', *args, check=False), message)


def test_a_second_writer_finishing_the_label_cache_is_no_error(world, tmp_path, monkeypatch):
    """Two attribution.py runs labelling the same split: the one that finishes second finds the other's
    .done file already removed (simulated here: it disappears just before this writer finishes)."""
    import attribution as A
    from common import load_teacher
    from sae import load_sae
    data, teacher_dir, _ = world
    out = tmp_path / 'data'
    os.makedirs(out)
    for name in ('train.bin', 'val.bin', 'meta.json'):
        (out / name).write_bytes(open(os.path.join(data, name), 'rb').read())
    meta = json.load(open(out / 'meta.json'))
    teacher = load_teacher(teacher_dir, 'cpu', meta, str(out))
    sae = load_sae(os.path.join(os.path.dirname(data), 'sae.pt'))[0]
    identity = dict(teacher_id='t', sae_id='s', sae_layer=1, n_concepts=sae.n_latents)
    expected = A.describe(str(out), 'train', identity, 'attribution', 4, 16)
    write_meta, done = A.write_meta, str(out / 'labels_train.bin.done')

    def other_writer_finished_first(path, meta):
        if meta['complete']:
            os.remove(done)
        write_meta(path, meta)
    monkeypatch.setattr(A, 'write_meta', other_writer_finished_first)
    A.label_split(teacher, sae, str(out), 'train', expected, 'cpu', batch_size=64)
    labels = np.fromfile(out / 'labels_train.bin', dtype=np.uint16)
    assert (labels == np.fromfile(os.path.join(data, 'labels_train.bin'), dtype=np.uint16)).all()
    assert json.load(open(out / 'labels_train.json'))['complete']


# -----------------------------------------------------------------------------
# The settings space, walked with a covering subset
#
# Each cell trains two steps, resumes to a third (on one process), then samples and evaluates the checkpoint.
# Covered: every mode from scratch and from a GPT-2 folder; every mode on two processes; each mix (interleave,
# add, none) with both starts, both label sources and both process counts; resume in every cell, after a run on
# either process count; torch.compile on the paper's path and on the pause baseline. What is left out is
# implied: the process count touches only DDP and the data shard, which are the same for every mode except
# through parameters without a gradient (mix=none, pause: both run on two processes here); the label source
# touches only cocomix; compile wraps the same forward that the other cells run.
CELLS = [  # (start, mode, mix, processes, labels, compile)
    ('scratch', 'ntp', '', 2, '', False),
    ('gpt2', 'ntp', '', 1, '', False),
    ('scratch', 'cocomix', 'interleave', 1, 'online', True),
    ('gpt2', 'cocomix', 'interleave', 2, 'cached', False),
    ('scratch', 'cocomix', 'add', 2, 'online', False),
    ('gpt2', 'cocomix', 'add', 1, 'cached', False),
    ('scratch', 'cocomix', 'none', 2, 'cached', False),
    ('gpt2', 'cocomix', 'none', 1, 'online', False),
    ('scratch', 'kd', '', 1, '', False),
    ('gpt2', 'kd', '', 2, '', False),
    ('scratch', 'pause', '', 2, '', False),
    ('gpt2', 'pause', '', 1, '', True),
    ('scratch', 'kd_pause', '', 1, '', False),
    ('gpt2', 'kd_pause', '', 2, '', False),
]
TERMS = {'ntp': [], 'cocomix': ['ntp', 'concept', 'concept_acc'], 'kd': ['ntp', 'kd'], 'pause': [],
         'kd_pause': ['ntp', 'kd']}


@pytest.mark.parametrize('start, mode, mix, procs, labels, compiled', CELLS,
                         ids=['-'.join(str(x) for x in c if x != '') for c in CELLS])
def test_settings_space(world, tmp_path, tiny_hf_gpt2, start, mode, mix, procs, labels, compiled):
    out = tmp_path / 'out'
    args = [f'--mode={mode}', f'--compile={compiled}'] + ([f'--mix={mix}'] if mix else []) + \
        (['--label_cache=True'] if labels == 'cached' else []) + \
        (SHAPE if start == 'scratch' else [f'--init_from={tiny_hf_gpt2[0]}'])
    p = train(world, out, *args, '--max_iters=2', procs=procs)
    line = [l for l in p.stdout.splitlines() if l.startswith('iter 1:')][0]
    online_teacher = mode in ('kd', 'kd_pause') or labels == 'online'
    assert all(f', {t} ' in line for t in TERMS[mode]) and ('teacher' in line) == online_teacher, line
    assert ("compiling the teacher's online work too" in p.stdout) == (compiled and online_teacher)
    resume = [a for a in args if not a.startswith('--init_from')] + ['--init_from=resume']
    p = train(world, out, *resume, '--max_iters=3')
    assert p.stdout.count('\niter ') == 1 and 'step 3:' in p.stdout, p.stdout
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ckpt['iter_num'] == 3 and ckpt['mode'] == mode and ckpt['config']['mix'] == (mix or 'interleave')
    run(['sample.py', f'--out_dir={out}', '--num_samples=1', '--max_new_tokens=3', '--start=!', '--device=cpu'])
    run(['tools/eval.py', f'--out_dir={out}', '--tasks=ppl', '--limit=2', '--device=cpu'])
