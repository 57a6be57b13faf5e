import os

import pytest
import torch

from conftest import TINY, eval_losses, run


def train(dataset, out_dir, *extra, check=True):
    return run(['train.py', f'--dataset={dataset}', f'--out_dir={out_dir}'] + TINY + list(extra), check=check)


def load(out_dir):
    return torch.load(os.path.join(out_dir, 'ckpt.pt'), weights_only=True)


def test_training_lowers_loss_and_checkpoints(dataset, tmp_path):
    p = train(dataset, tmp_path / 'out', '--max_iters=60', '--eval_interval=30', '--lr_decay_iters=60')
    losses = eval_losses(p.stdout)
    assert [s for s, _, _ in losses] == [0, 30, 60]
    assert losses[-1][2] < losses[0][2] - 1.0, losses  # val loss falls by more than a nat
    ckpt = load(tmp_path / 'out')
    assert ckpt['iter_num'] == 60 and ckpt['mode'] == 'ntp'
    assert not any(k.startswith(('_orig_mod.', 'module.')) for k in ckpt['model'])
    assert ckpt['config']['max_iters'] == 60 and 'done: 60 steps' in p.stdout


def test_resume_reproduces_uninterrupted_run(dataset, tmp_path):
    common = ['--eval_interval=4', '--lr_decay_iters=8', '--dropout=0.1']  # dropout: the RNG must resume too
    full = train(dataset, tmp_path / 'full', '--max_iters=8', *common)
    train(dataset, tmp_path / 'split', '--max_iters=4', *common)
    resumed = train(dataset, tmp_path / 'split', '--max_iters=8', '--init_from=resume', *common)
    a, b = load(tmp_path / 'full'), load(tmp_path / 'split')
    assert a['iter_num'] == b['iter_num'] == 8
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    assert eval_losses(full.stdout)[-1] == eval_losses(resumed.stdout)[-1]
    log = lambda out: [l for l in out.splitlines() if l.startswith('iter ') and int(l.split()[1][:-1]) >= 4]
    strip = lambda lines: [l.split(', time')[0] for l in lines]  # drop the timing
    assert strip(log(full.stdout)) == strip(log(resumed.stdout))


def test_ddp_two_processes_match_one_with_accumulation(dataset, tmp_path):
    args = [f'--dataset={dataset}'] + TINY + ['--max_iters=5', '--eval_interval=5', '--lr_decay_iters=5']
    args = [a for a in args if not a.startswith('--gradient_accumulation_steps')] + ['--gradient_accumulation_steps=2']
    run(['torchrun', '--standalone', '--nproc_per_node=2', 'tests/run_and_dump.py', str(tmp_path / 'ddp'),
         'train.py', f'--out_dir={tmp_path / "ddp_out"}'] + args, env={'OMP_NUM_THREADS': '1'})
    run(['tests/run_and_dump.py', str(tmp_path / 'single'), 'train.py', f'--out_dir={tmp_path / "single_out"}'] + args)
    rank0, rank1 = (torch.load(tmp_path / 'ddp' / f'weights_rank{r}.pt') for r in (0, 1))
    single = torch.load(tmp_path / 'single' / 'weights_rank0.pt')
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), k
        torch.testing.assert_close(rank0[k], single[k], atol=2e-5, rtol=1e-4)
    assert load(tmp_path / 'ddp_out')['iter_num'] == 5


def test_nan_loss_stops_and_keeps_last_checkpoint(dataset, tmp_path):
    train(dataset, tmp_path / 'out', '--max_iters=2', '--eval_interval=2')
    before = load(tmp_path / 'out')
    p = train(dataset, tmp_path / 'out', '--init_from=resume', '--max_iters=50', '--eval_interval=2',
              '--learning_rate=1e30', '--warmup_iters=0', '--grad_clip=0.0', '--decay_lr=False', check=False)
    assert p.returncode != 0
    assert 'error: loss is nan at step' in p.stdout or 'error: loss is inf at step' in p.stdout, p.stdout[-2000:]
    after = load(tmp_path / 'out')  # still loadable, and a finite model
    assert all(torch.isfinite(v).all() for v in after['model'].values())
    assert after['iter_num'] >= before['iter_num']


@pytest.mark.parametrize('args, message', [
    (['--bogus=1'], "unknown config key 'bogus'"),
    (['--batch_size=big'], "batch_size must be an int, not 'big'"),
    (['--init_from=gpt3'], "unknown init_from 'gpt3'"),
    (['--dataset=/nonexistent/data'], 'no prepared dataset'),
])
def test_bad_config_is_a_one_line_error(dataset, tmp_path, args, message):
    p = run(['train.py', f'--dataset={dataset}', f'--out_dir={tmp_path}'] + TINY + args, check=False)
    assert p.returncode != 0 and message in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr  # no traceback


def test_unknown_key_in_config_file(dataset, tmp_path):
    cfg = tmp_path / 'cfg.py'
    cfg.write_text("batch_size = 4\nlearning_rat = 1e-3  # typo\n")
    p = run(['train.py', str(cfg), f'--dataset={dataset}'], check=False)
    assert p.returncode != 0 and f"unknown config key 'learning_rat' in config file {cfg}" in p.stderr


def test_resume_without_checkpoint_is_an_error(dataset, tmp_path):
    p = train(dataset, tmp_path / 'empty', '--init_from=resume', check=False)
    assert p.returncode != 0 and 'no checkpoint at' in p.stderr


def test_mfu_peak_follows_the_matmul_precision(monkeypatch):
    """H100 datasheet: 989 TFLOP/s bf16 dense, 494.5 TF32 (train.py allows TF32), ~67 plain fp32."""
    from common import peak_flops
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device: 'NVIDIA H100 80GB HBM3')
    assert peak_flops('cuda:0', 'bfloat16') == 989e12
    # set by hand: pytest 9.2's monkeypatch cannot restore this attribute (torch serves it by
    # __getattr__) and fails the test's teardown
    matmul, allowed = torch.backends.cuda.matmul, torch.backends.cuda.matmul.allow_tf32
    try:
        matmul.allow_tf32 = True
        assert peak_flops('cuda:0', 'float32') == 989e12 / 2
        matmul.allow_tf32 = False
        assert peak_flops('cuda:0', 'float32') == 989e12 / 16
    finally:
        matmul.allow_tf32 = allowed
    assert peak_flops('cpu', 'float32') is None


@pytest.mark.parametrize('name, peak', [('NVIDIA L40S', 362e12), ('NVIDIA L4', 121e12),
                                        ('NVIDIA A10', 125e12), ('NVIDIA A100-SXM4-80GB', 312e12),
                                        ('NVIDIA GeForce RTX 4090', 165e12), ('Tesla T4', None)])
def test_mfu_peak_matches_whole_device_names(monkeypatch, name, peak):
    """An L40S is not an L4, nor an A100 an A10: the datasheet table matches whole words."""
    from common import peak_flops
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device: name)
    assert peak_flops('cuda:0', 'bfloat16') == peak


@pytest.mark.parametrize('first, then', [('float32', 'float16'), ('float16', 'bfloat16')])
def test_resume_in_another_dtype(dataset, tmp_path, first, then):
    """The blow-up message advises another dtype: a resume across fp32/bf16 and fp16 must work
    (loading the GradScaler's state of a run without one crashed)."""
    dtype = lambda d: [a for a in TINY if not a.startswith('--dtype')] + [f'--dtype={d}']
    run(['train.py', f'--dataset={dataset}', f'--out_dir={tmp_path}', *dtype(first),
         '--max_iters=2', '--eval_interval=2'])
    p = run(['train.py', f'--dataset={dataset}', f'--out_dir={tmp_path}', *dtype(then),
             '--max_iters=3', '--eval_interval=3', '--init_from=resume'])
    assert 'step 3:' in p.stdout and torch.load(tmp_path / 'ckpt.pt')['iter_num'] == 3


def test_chained_config_files_work_from_any_folder(dataset, tmp_path):
    """config/cocomix_shakespeare_char.py execs config/teacher_shakespeare_char.py: from another
    folder that exec found no file."""
    from conftest import ROOT
    cfg = os.path.join(ROOT, 'config', 'ntp_shakespeare_char.py')
    p = run(['-c', f'import runpy, sys; sys.argv = ["train.py", {cfg!r}, "--eval_only=True", '
             f'"--dataset={dataset}", "--out_dir={tmp_path}", "--eval_iters=1", "--device=cpu", '
             f'"--compile=False", "--block_size=16"]; runpy.run_path({os.path.join(ROOT, "train.py")!r}, '
             'run_name="__main__")'], cwd=str(tmp_path), env={'PYTHONPATH': ROOT})
    assert 'step 0:' in p.stdout


@pytest.mark.parametrize('script', ['train.py', 'sample.py', 'tools/eval.py'])
def test_cuda_on_a_cpu_only_torch_is_one_line(dataset, tmp_path, script):
    """From scratch or from a checkpoint: one line about the device, not an assertion deep in
    torch nor 'the checkpoint is truncated'."""
    args = ['train.py', f'--dataset={dataset}', f'--out_dir={tmp_path}', '--device=cuda'] \
        if script == 'train.py' else [script, f'--out_dir={tmp_path}', '--device=cuda']
    p = run(args, check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and 'device must be cpu' in lines[0], p.stderr


def test_the_hub_check_goes_through_the_proxy(monkeypatch):
    """A cluster that reaches the hub only through HTTPS_PROXY: the check must ask the proxy, as
    the hub client will (a raw socket to the hub's host ignored it and refused every download)."""
    import socket
    import threading

    from common import UserError, check_hub
    server = socket.socket()
    server.bind(('127.0.0.1', 0))
    server.listen(1)
    asked = []

    def proxy():  # a proxy that answers CONNECT and then closes
        conn, _ = server.accept()
        asked.append(conn.recv(1024).decode())
        conn.sendall(b'HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n')
        conn.close()
    threading.Thread(target=proxy, daemon=True).start()
    for var in ('HTTPS_PROXY', 'https_proxy'):
        monkeypatch.setenv(var, f'http://127.0.0.1:{server.getsockname()[1]}')
    monkeypatch.delenv('NO_PROXY', raising=False)
    monkeypatch.delenv('no_proxy', raising=False)
    import huggingface_hub.constants as C
    monkeypatch.setattr(C, 'HF_HUB_OFFLINE', False)
    with pytest.raises(UserError):
        check_hub('a test', 'fix it')
    server.close()
    assert asked and asked[0].startswith('CONNECT huggingface.co:443'), asked


def test_cocomix_without_concept_loss_needs_no_teacher_and_trains_the_head(dataset, tmp_path):
    """lam_concept=0: the same architecture trained by the next-token loss alone (the study's
    control); no teacher, SAE or labels are read, and the concept head still learns, through the
    TopK values that weight the compression."""
    from common import load_model
    args = ['--mode=cocomix', '--lam_concept=0', '--insert_layer=1', '--concept_topk=4',
            '--teacher=/no/teacher', '--sae=/no/sae.pt', '--max_iters=3', '--eval_interval=3']
    p = train(dataset, tmp_path, *args, check=False)
    assert p.returncode == 1 and '--n_concepts' in p.stderr.strip().splitlines()[-1]
    p = train(dataset, tmp_path, *args, '--n_concepts=24')
    assert 'concept' not in next(l for l in p.stdout.splitlines() if l.startswith('iter 2:'))
    model, _ = load_model(str(tmp_path))
    assert model.config.n_concepts == 24
    x = torch.randint(0, 32, (2, 16))
    model.train()(x, x)[1].backward()  # the next-token loss alone reaches the concept head
    assert model.concepts.concept_head.weight.grad.abs().sum() > 0


def test_a_split_shorter_than_a_window_is_refused_before_any_model_loads(tmp_path):
    from conftest import write_dataset
    short = write_dataset(str(tmp_path / 'short'), n_val=10)
    p = train(short, tmp_path / 'out', '--mode=cocomix', '--teacher=/no/teacher', check=False)
    assert p.returncode == 1 and p.stderr.strip() == (
        f"error: the val split of {short} has 10 tokens, fewer than block_size + 1 = 17; use more "
        "text or a smaller block_size"), p.stderr
