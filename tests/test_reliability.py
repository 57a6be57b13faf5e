"""What a multi-day torchrun job needs: the last checkpoint on disk at exit, no blown-up model saved, concepts
from the teacher and SAE the run was started with, exact resume on another process count, and one-line errors."""
import os
import time

import torch

from conftest import TINY, run

TWO = ['torchrun', '--standalone', '--nproc_per_node=2']
ONE_THREAD = {'OMP_NUM_THREADS': '1'}


def train(dataset, out_dir, *extra, check=True, env=None):
    return run(['train.py', f'--dataset={dataset}', f'--out_dir={out_dir}'] + TINY + list(extra), check=check, env=env)


def weights(out_dir):
    return torch.load(os.path.join(out_dir, 'ckpt.pt'), weights_only=True)


def one_line_error(p, message):
    assert p.returncode != 0 and message in p.stderr, p.stderr[-3000:]
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr[-3000:]  # no traceback


def test_torchrun_exit_waits_for_the_final_checkpoint(dataset, tmp_path):
    """Rank 0's save is slowed down by 2 s: rank 1 must not end (and tear the group down) before it is on disk."""
    args = [f'--dataset={dataset}', f'--out_dir={tmp_path / "out"}'] + TINY + ['--max_iters=2', '--eval_interval=2']
    args = [a for a in args if not a.startswith('--gradient_accumulation_steps')] + ['--gradient_accumulation_steps=2']
    run(TWO + ['tests/slow_save.py', str(tmp_path / 'log'), 'train.py'] + args, env=ONE_THREAD)
    read = lambda name: float((tmp_path / 'log' / name).read_text())
    assert read('ended1') >= read('saved') and read('ended0') >= read('saved')
    assert weights(tmp_path / 'out')['iter_num'] == 2
    assert os.listdir(tmp_path / 'out') == ['ckpt.pt']  # no temporary file left


def test_a_blown_up_evaluation_is_never_saved(dataset, tmp_path):
    train(dataset, tmp_path / 'out', '--max_iters=3', '--eval_interval=3')
    before = weights(tmp_path / 'out')
    p = train(dataset, tmp_path / 'out', '--init_from=resume', '--max_iters=20', '--eval_interval=1',
              '--learning_rate=1e6', '--warmup_iters=0', '--decay_lr=False', check=False)
    assert p.returncode != 0 and 'the last checkpoint, step 3, in' in p.stdout, p.stdout[-2000:]
    after = weights(tmp_path / 'out')
    assert after['iter_num'] == 3 and all(torch.equal(before['model'][k], after['model'][k]) for k in before['model'])
    fresh = train(dataset, tmp_path / 'fresh', '--max_iters=20', '--eval_interval=1', '--learning_rate=1e6',
                  '--warmup_iters=0', '--decay_lr=False', check=False)
    assert fresh.returncode != 0 and 'no checkpoint was written' in fresh.stdout, fresh.stdout[-2000:]
    assert not os.path.exists(tmp_path / 'fresh' / 'ckpt.pt')


def test_resume_on_another_process_count_is_exact(dataset, tmp_path):
    """With dropout, 2 processes to step 4 then 1 process to step 8 = 1 process to step 8 (up to float rounding)."""
    common = [f'--dataset={dataset}'] + [a for a in TINY if not a.startswith('--gradient_accumulation_steps')] + \
        ['--gradient_accumulation_steps=2', '--dropout=0.1', '--eval_interval=4', '--lr_decay_iters=8']
    run(['train.py', f'--out_dir={tmp_path / "full"}', '--max_iters=8'] + common)
    run(TWO + ['train.py', f'--out_dir={tmp_path / "split"}', '--max_iters=4'] + common, env=ONE_THREAD)
    run(['train.py', f'--out_dir={tmp_path / "split"}', '--max_iters=8', '--init_from=resume'] + common)
    a, b = weights(tmp_path / 'full'), weights(tmp_path / 'split')
    assert a['iter_num'] == b['iter_num'] == 8
    assert max((a['model'][k] - b['model'][k]).abs().max().item() for k in a['model']) < 1e-4


def teacher_and_sae(dataset, tmp_path, layer=0, seed=0, n_latents=48, name='sae.pt'):
    """A 2-block teacher trained on the dataset, and an SAE file that records the layer and teacher it belongs to."""
    from common import fingerprint, load_model
    from sae import TopKSAE, init_sae
    teacher = tmp_path / 'teacher'
    if not (teacher / 'ckpt.pt').exists():
        train(dataset, teacher, '--max_iters=2', '--eval_interval=2')
    torch.manual_seed(seed)
    sae = TopKSAE(32, n_latents, k=6)
    init_sae(sae, torch.randn(256, 32))
    sae.save(str(tmp_path / name), dict(layer=layer, teacher_id=fingerprint(load_model(str(teacher))[0])))
    return [f'--teacher={teacher}', f'--sae={tmp_path / name}']


COCOMIX = ['--mode=cocomix', '--insert_layer=1', '--concept_topk=4', '--max_iters=2', '--eval_interval=2']


def test_concepts_from_another_layer_sae_or_teacher_are_refused(dataset, tmp_path):
    spec = teacher_and_sae(dataset, tmp_path, layer=0)
    one_line_error(train(dataset, tmp_path / 'a', *COCOMIX, *spec, '--sae_layer=1', check=False),
                   'reads layer 0 of its teacher but this run has sae_layer=1')
    other_teacher = tmp_path / 'other'
    train(dataset, other_teacher, '--max_iters=1', '--eval_interval=1', '--seed=7')
    one_line_error(train(dataset, tmp_path / 'b', *COCOMIX, f'--teacher={other_teacher}', spec[1], '--sae_layer=0',
                         check=False), 'was trained on another teacher')

    train(dataset, tmp_path / 'run', *COCOMIX, *spec, '--sae_layer=0')  # a healthy run, then resumes that differ
    for seed, n_latents, message in ((1, 48, 'trained with sae_id='), (0, 40, 'trained with n_concepts=48')):
        other = teacher_and_sae(dataset, tmp_path, layer=0, seed=seed, n_latents=n_latents, name=f'other{seed}.pt')
        one_line_error(train(dataset, tmp_path / 'run', *COCOMIX, *other, '--sae_layer=0', '--init_from=resume',
                             '--max_iters=4', check=False), message)

    # a label cache made from an SAE that was later retrained at the same path
    run(['attribution.py', f'--dataset={dataset}', '--block_size=16', '--device=cpu', '--splits=train',
         '--sae_layer=0'] + spec)
    teacher_and_sae(dataset, tmp_path, layer=0, seed=3)  # overwrites sae.pt
    one_line_error(train(dataset, tmp_path / 'c', *COCOMIX, *spec, '--sae_layer=0', '--label_cache=True',
                         check=False), 'was made with sae_id=')


def test_tokenizers_are_compared_not_only_their_sizes(tmp_path, tiny_hf_gpt2):
    """A GPT-2 teacher (96 ids) on character-level data (about 30 ids): the sizes fit, the tokenizers do not."""
    (tmp_path / 'text.txt').write_text('to be or not to be, that is the question\n' * 200)
    run(['prepare.py', 'c', f'--input={tmp_path / "text.txt"}', '--tokenizer=char', f'--out_dir={tmp_path / "char"}'])
    one_line_error(train(tmp_path / 'char', tmp_path / 'kd', '--mode=kd', f'--teacher={tiny_hf_gpt2[0]}',
                         check=False), "is tokenized with a different character set but the teacher")
    (tmp_path / 'other.txt').write_text('all the world is a stage\n' * 200)  # another character set
    run(['prepare.py', 'c', f'--input={tmp_path / "other.txt"}', '--tokenizer=char', f'--out_dir={tmp_path / "char2"}'])
    train(tmp_path / 'char', tmp_path / 'student', '--max_iters=1', '--eval_interval=1')
    one_line_error(train(tmp_path / 'char2', tmp_path / 'student', '--init_from=resume', '--max_iters=2',
                         check=False), 'a different character set')


def test_cocomix_with_the_pause_mix_is_refused(dataset, tmp_path):
    spec = teacher_and_sae(dataset, tmp_path)
    one_line_error(train(dataset, tmp_path / 'x', *COCOMIX, *spec, '--mix=pause', check=False), "mix must be one of interleave, add, none, not 'pause'")


def test_truncated_checkpoint_is_a_one_line_error_everywhere(dataset, tmp_path):
    train(dataset, tmp_path / 'out', '--max_iters=1', '--eval_interval=1')
    path = tmp_path / 'out' / 'ckpt.pt'
    path.write_bytes(path.read_bytes()[:5000])
    for args in (['sample.py', f'--out_dir={tmp_path / "out"}', '--device=cpu'],
                 ['tools/eval.py', f'--out_dir={tmp_path / "out"}', '--tasks=ppl', '--device=cpu'],
                 ['train.py', f'--dataset={dataset}', f'--out_dir={tmp_path / "out"}', '--init_from=resume'] + TINY):
        one_line_error(run(args, check=False), f'cannot read the checkpoint {path}')


def test_bad_setups_fail_fast_in_one_line(dataset, tmp_path):
    cfg = tmp_path / 'cfg.py'
    cfg.write_text('batch_size = 4\nlearning_rate = 1e-3 +\n')
    one_line_error(run(['train.py', str(cfg)], check=False), f'config file {cfg}, line 2')
    train(dataset, tmp_path / 'out', '--max_iters=1', '--eval_interval=1')  # block_size 16
    one_line_error(train(dataset, tmp_path / 'out', '--init_from=resume', '--block_size=32', check=False),
                   f"block_size=32 does not fit {tmp_path / 'out' / 'ckpt.pt'}'s 16; set --block_size=16")
    spec = teacher_and_sae(dataset, tmp_path)
    one_line_error(train(dataset, tmp_path / 'kd', '--mode=kd', spec[0], '--block_size=32', check=False),
                   "block_size=32 is longer than the teacher's context (16)")
    # no network: the hub at a closed port, an empty cache; fail within seconds, saying how to use a local copy
    offline = {'HF_ENDPOINT': 'http://127.0.0.1:9', 'HF_HOME': str(tmp_path / 'hf'), 'HF_HUB_OFFLINE': '0'}
    (tmp_path / 'text.txt').write_text('to be or not to be, that is the question\n' * 200)
    run(['prepare.py', 'bpe', f'--input={tmp_path / "text.txt"}', f'--out_dir={tmp_path / "bpe"}'])
    shapeless = [a for a in TINY if not a.startswith(('--n_layer', '--n_head', '--n_embd', '--bias'))]
    for args in (shapeless + ['--init_from=gpt2'], TINY + ['--mode=kd', '--teacher=gpt2']):
        t0 = time.time()  # a GPT-2 start takes its shape from GPT-2: no shape settings
        p = run(['train.py', f'--dataset={tmp_path / "bpe"}', f'--out_dir={tmp_path / "gpt2"}'] + args, check=False,
                env=offline)
        assert time.time() - t0 < 20
        one_line_error(p, "pass its path instead of 'gpt2'")
    one_line_error(run(['prepare.py', 'openwebtext', f'--out_dir={tmp_path / "owt"}'], check=False, env=offline),
                   'cannot reach the Hugging Face hub for openwebtext')
    one_line_error(run(['tools/eval.py', f'--out_dir={tmp_path / "out"}', '--tasks=ppl,lambda', '--device=cpu'], check=False),
                   'unknown task lambda')


def test_stale_temporary_checkpoint_is_no_obstacle(dataset, tmp_path):
    out = tmp_path / 'out'
    (out / 'ckpt.pt.tmp').mkdir(parents=True)  # left by a killed run, in the old naming: even a folder
    (out / 'ckpt.pt.abc123.tmp').write_bytes(b'half a checkpoint')  # in ours: removed at start
    train(dataset, out, '--max_iters=1', '--eval_interval=1')
    assert weights(out)['iter_num'] == 1 and not (out / 'ckpt.pt.abc123.tmp').exists()


def test_torchrun_prints_an_error_once(tmp_path):
    p = run(TWO + ['train.py', '--dataset=/no/such/data', '--device=cpu'], check=False, env=ONE_THREAD)
    assert p.returncode != 0
    assert (p.stdout + p.stderr).count('error: no prepared dataset') == 1, p.stderr[-3000:]


def test_mfu_under_torchrun_counts_one_process_against_one_device(dataset, tmp_path):
    """MFU = this process's FLOP/s over one device's peak: the logged MFU equals the FLOPs of the
    tokens per second it logs (all processes together) / 2 processes / the peak (8x too high on 8
    GPUs before: every process's tokens were set against one device)."""
    import re

    from common import load_model
    peak = 1e8
    args = TINY + ['--max_iters=4', '--eval_interval=100', f'--device_peak_flops={peak}']
    args = [a for a in args if not a.startswith('--gradient_accumulation_steps')]
    p = run(TWO + ['train.py', f'--dataset={dataset}', f'--out_dir={tmp_path}', *args,
                   '--gradient_accumulation_steps=2'], env=ONE_THREAD)
    line = next(l for l in p.stdout.splitlines() if l.startswith('iter 3:'))  # the first measured
    tokens_per_s, mfu = re.search(r'([\d,]+) tok/s, mfu ([\d.]+)%', line).groups()
    model, ckpt = load_model(str(tmp_path))
    flops = model.flops_per_token(ckpt['config']['block_size']) * int(tokens_per_s.replace(',', ''))
    assert abs(float(mfu) / 100 / (flops / 2 / peak) - 1) < 0.02, line
