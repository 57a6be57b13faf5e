import pytest
import torch

from chunked import linear_cross_entropy
from model import GPT, GPTConfig, concept_accuracy, concept_loss, kd_loss


def cocomix(mix='interleave', C=40, insert_layer=1, seed=0, block_size=32):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=64, n_layer=3, n_head=2, n_embd=32, bias=True,
                          n_concepts=C if mix != 'pause' else 0, concept_topk=5, insert_layer=insert_layer,
                          mix=mix if mix in ('add', 'none') else 'interleave', pause=mix == 'pause'))
    with torch.no_grad():  # larger concept weights than the init, so that mixing visibly changes the outputs
        for name, p in model.named_parameters():
            if name.startswith('concepts.'):
                p.normal_(0, 0.5)
    return model.eval()


@pytest.mark.parametrize('mix', ['plain', 'interleave', 'pause'])
def test_model_is_causal(mix):
    """Changing token t+1 leaves every logit (and concept logit) at positions <= t unchanged."""
    model = cocomix(mix)
    if mix == 'plain':
        model.concepts = None  # the same GPT without the concept parts
    idx = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(0))
    changed = idx.clone()
    changed[0, 9] = (changed[0, 9] + 1) % 64
    outputs = []
    with torch.no_grad():
        for x in (idx, changed):
            logits, _, out = model(x, x)
            outputs.append([logits] + ([out['concept_logits']] if mix == 'interleave' else []))
    for x, y in zip(*outputs):
        assert torch.equal(x[:, :9], y[:, :9])
        assert not torch.allclose(x[:, 9:], y[:, 9:])


def test_gather_compression_equals_dense_masked_matmul():
    model = cocomix(mix='add')
    h = torch.randn(2, 5, 32, requires_grad=True)
    c_hat, out = model.concepts(h)
    z, kept_ids = out['concept_logits'], out['concept_ids']
    m = model.concepts
    mu, std = h.mean(-1, keepdim=True), h.std(-1, keepdim=True)  # unbiased, as the SAE
    z_ref = m.concept_head((h - mu) / (std + 1e-5) - m.pre_bias)
    kept = torch.zeros_like(z_ref).scatter(-1, z_ref.topk(5).indices, z_ref.topk(5).values)  # TopK, raw values
    c_ref = (kept @ m.compress.weight + m.compress_bias + m.pre_bias) * std + mu  # dense (C-wide) product
    torch.testing.assert_close(z, z_ref)
    torch.testing.assert_close(c_hat, c_ref)
    assert torch.equal(kept_ids, z_ref.topk(5).indices)
    w = torch.randn_like(c_hat)
    params = [h, m.compress.weight, m.concept_head.weight, m.pre_bias]
    for a, b in zip(torch.autograd.grad((c_hat * w).sum(), params), torch.autograd.grad((c_ref * w).sum(), params)):
        torch.testing.assert_close(a, b)


def test_concept_loss_by_hand():
    z = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]])  # (1, 2, 3)
    labels = torch.tensor([[[0, 2], [1, -1]]])  # the last slot has no label
    lse = [torch.logsumexp(z[0, t], 0).item() for t in range(2)]
    expected = ((lse[0] - 2.0) + (lse[0] + 1.0) + (lse[1] - 0.5)) / 3
    assert abs(concept_loss(z, labels).item() - expected) < 1e-6
    assert concept_loss(z, torch.full_like(labels, -1)).item() == 0.0


@pytest.mark.parametrize('mix', ['interleave', 'add', 'none', 'pause'])
@pytest.mark.parametrize('insert_layer', [0, 2])
def test_kv_cache_generation_equals_recompute(mix, insert_layer):
    model = cocomix(mix, insert_layer=insert_layer)
    idx = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    for n in (8, 40):  # 40 runs past block_size
        cached = model.generate(idx, n, temperature=0, use_cache=True)
        assert torch.equal(cached, model.generate(idx, n, temperature=0, use_cache=False))


def test_mixing_changes_the_output_and_none_does_not():
    idx = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    outs = {}
    for mix in ('interleave', 'add', 'none'):
        model = cocomix(mix)
        with torch.no_grad():
            outs[mix] = model(idx, idx)[0]
    plain = cocomix('none')
    plain.concepts = None  # the same weights without the concept parts: a plain GPT
    with torch.no_grad():
        assert torch.equal(plain(idx, idx)[0], outs['none'])  # prediction only leaves the stream untouched
    assert not torch.allclose(outs['interleave'], outs['none']) and not torch.allclose(outs['add'], outs['none'])


def test_steering_and_shown_concepts():
    model = cocomix()
    idx = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    base, shown = model.generate(idx, 20, temperature=0, show_concepts=3)
    assert torch.equal(model.generate(idx, 20, temperature=0, steer={3: 1.0, 7: 1.0}), base)
    steered, shown_steered = model.generate(idx, 20, temperature=0, steer={3: 10.0}, show_concepts=3)
    assert not torch.equal(steered, base)
    with torch.no_grad():  # the shown concepts are the top concept logits at the position each token came from
        z = model(base[:, :-1], base[:, :-1])[2]['concept_logits']
    assert shown.shape == (1, 20, 3)
    assert torch.equal(shown, z[:, 5:].topk(3).indices)
    assert (shown_steered == 3).float().mean() > (shown == 3).float().mean()  # steering raises concept 3
    with pytest.raises(ValueError, match=r'concept ids must be in \[0, 40\)'):
        model.generate(idx, 2, steer={40: 2.0})
    with pytest.raises(ValueError, match='predicts no concepts'):
        cocomix('pause').generate(idx, 2, steer={1: 2.0})


def test_plain_config_is_exactly_the_foundation_gpt(tiny_hf_gpt2):
    """n_concepts=0 with any concept settings: the same parameters, init and outputs as a GPT built without
    them, and (same weights) the same logits as transformers' GPT-2."""
    torch.manual_seed(0)
    base = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=3, n_head=2, n_embd=32))
    torch.manual_seed(0)
    other = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=3, n_head=2, n_embd=32, n_concepts=0,
                          concept_topk=7, insert_layer=1, mix='add'))
    assert [(k, v.shape) for k, v in base.state_dict().items()] == [(k, v.shape) for k, v in other.state_dict().items()]
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in base.state_dict().items())
    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(base(idx, idx)[0], other(idx, idx)[0])
    path, hf = tiny_hf_gpt2
    ours = GPT.from_pretrained(path).eval()
    ours.config.mix, ours.config.insert_layer = 'add', 1  # ignored without concepts
    idx = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx, idx)[0], hf(idx).logits, atol=1e-4, rtol=1e-4)


def test_concept_accuracy_and_kd_loss_by_hand():
    kept = torch.tensor([[[3, 1], [0, 2]]])  # (1, 2, concept_topk=2)
    labels = torch.tensor([[[1, 4], [2, -1]]])  # 1 kept, 4 not, 2 kept, one empty slot
    assert abs(concept_accuracy(kept, labels).item() - 2 / 3) < 1e-6
    teacher = torch.tensor([[[0.0, 1.0]]])
    student = torch.tensor([[[1.0, 0.0, 5.0]]])  # one padding entry past the teacher's vocabulary
    p = torch.softmax(teacher, -1)[0, 0]
    q = torch.softmax(student, -1)[0, 0, :2]
    assert abs(kd_loss(student, teacher).item() - (p * (p.log() - q.log())).sum().item()) < 1e-6
    assert kd_loss(teacher, teacher).abs().item() < 1e-6


def test_paper_parameter_counts(monkeypatch, capsys):
    """The paper configs against METHOD.md: CoCoMix active parameters (C + concept_topk columns) and the
    widened NTP baselines; 20B-token runs all in 69M / 386M / 1.38B classes."""
    import os
    from conftest import ROOT
    monkeypatch.chdir(ROOT)
    paper = {'gpt2': 69e6, 'gpt2_386m': 386e6, 'gpt2_1b': 1.38e9}
    rows = []
    for size, expected in paper.items():
        for kind in ('cocomix', 'ntp'):
            g = {}
            exec(open(os.path.join('config', f'{kind}_{size}.py')).read(), g)
            assert g.get('mode', 'ntp') == kind
            with torch.device('meta'):  # shapes only: a 1.38B model without its memory
                model = GPT(GPTConfig(n_layer=g['n_layer'], n_head=g['n_head'], n_embd=g['n_embd'], bias=g['bias'],
                                      n_concepts=32768 if kind == 'cocomix' else 0, insert_layer=g.get('insert_layer', 3)))
            total, active = model.get_num_params(), model.get_num_params(active=True)
            rows.append(f"{kind}_{size}: {g['n_layer']} x {g['n_embd']}, total {total / 1e6:.1f}M, "
                        f"active {active / 1e6:.1f}M, paper {expected / 1e6:.0f}M")
            assert abs(active / expected - 1) < 0.02, rows[-1]
    with capsys.disabled():
        print('\n' + '\n'.join(rows))


@pytest.mark.parametrize('chunked', [False, True])  # the plain heads, and the chunked ones (chunked.py)
def test_concept_loss_in_forward(monkeypatch, chunked):
    """With labels (training) the forward's concept loss is Eq. 2 on the concept logits of a forward
    without labels, it mixes the same concept vectors, and the next-token loss and every gradient are
    those of the plain computation, with the heads plain or chunked (a device with no memory to spare)."""
    import model as M
    model = cocomix()
    idx = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(-1, 40, (2, 8, 4), generator=torch.Generator().manual_seed(1))
    ref_logits, ref_ntp, ref = model(idx, idx)  # without labels: the plain heads and the full concept logits
    params = [p for p in model.parameters() if p.requires_grad]
    ref_grads = torch.autograd.grad(ref_ntp + 0.1 * concept_loss(ref['concept_logits'], labels), params)
    if chunked:
        monkeypatch.setattr(M, 'device_memory', lambda device_type: 0)
    logits, ntp, out = model(idx, idx, concept_labels=labels)
    torch.testing.assert_close(out['concept'], concept_loss(ref['concept_logits'], labels))
    torch.testing.assert_close(ntp, ref_ntp)
    assert torch.equal(out['concept_ids'], ref['concept_ids'])
    if chunked:  # never held
        assert out['concept_logits'] is None and logits is None
    else:
        torch.testing.assert_close(logits, ref_logits)
        torch.testing.assert_close(out['concept_logits'], ref['concept_logits'])
    for a, b in zip(torch.autograd.grad(ntp + 0.1 * out['concept'], params), ref_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize('k, topk', [(1, 0), (4, 5)])
def test_chunked_linear_cross_entropy_equals_dense(monkeypatch, k, topk):
    """Loss, top-k and every gradient (through the loss and through the kept logits) equal autograd on the full
    logits; the chunk size is forced down to a few rows so that the chunking is exercised."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    b = torch.randn(50, generator=g, requires_grad=True)
    labels = torch.randint(-1, 50, (2, 7, k), generator=g)
    labels[0, 0] = -1  # a row without labels
    import chunked as M
    a = torch.randn(2, 7, topk, generator=g)  # weights on the kept logits, as the compression's gradient
    for chunk_rows in (3, 1000):
        monkeypatch.setattr(M, 'CHUNK_ELEMENTS', chunk_rows * 50)
        loss, values, ids = linear_cross_entropy(x, w, b, labels, topk)
        z = x @ w.t() + b
        ref = concept_loss(z, labels)
        torch.testing.assert_close(loss, ref)
        out, out_ref = 2 * loss, 2 * ref
        if topk:
            top = z.topk(topk)
            assert torch.equal(ids, top.indices)
            torch.testing.assert_close(values, top.values)
            out, out_ref = out + (values * a).sum(), out_ref + (top.values * a).sum()
        for ga, gb in zip(torch.autograd.grad(out, (x, w, b)), torch.autograd.grad(out_ref, (x, w, b))):
            torch.testing.assert_close(ga, gb)


def teacher_and_sae(dataset, tmp_path):
    from conftest import TINY, run
    from sae import TopKSAE, init_sae
    teacher = tmp_path / 'teacher'
    run(['train.py', f'--dataset={dataset}', f'--out_dir={teacher}', '--max_iters=30', '--eval_interval=30'] + TINY)
    torch.manual_seed(0)
    sae = TopKSAE(32, 48, k=6)
    init_sae(sae, torch.randn(256, 32))
    sae.save(str(tmp_path / 'sae.pt'))
    return [f'--teacher={teacher}', f'--sae={tmp_path / "sae.pt"}', '--sae_layer=0']


def test_cocomix_training_online_and_cached_resume_and_mode_check(dataset, tmp_path):
    from conftest import TINY, eval_losses, run
    spec = teacher_and_sae(dataset, tmp_path)
    common = [f'--dataset={dataset}', '--mode=cocomix', '--insert_layer=1', '--concept_topk=4', '--lam_concept=1.0',
              '--n_layer=3', '--max_iters=40', '--eval_interval=20', '--lr_decay_iters=40'] + spec
    online = run(['train.py', f'--out_dir={tmp_path / "online"}'] + TINY + common)
    run(['attribution.py', f'--dataset={dataset}', '--block_size=16', '--device=cpu', '--splits=train'] + spec)
    cached = run(['train.py', f'--out_dir={tmp_path / "cached"}', '--label_cache=True'] + TINY + common)
    for p in (online, cached):
        losses = eval_losses(p.stdout)
        assert losses[-1][2] < losses[0][2] - 0.5, losses  # the next-token val loss falls
        concept = [float(l.split('concept ')[1].split(',')[0]) for l in p.stdout.splitlines() if l.startswith('iter ')]
        assert sum(concept[-5:]) / 5 < sum(concept[:5]) / 5 - 0.2, concept  # and the concept loss
    ckpt = torch.load(tmp_path / 'online' / 'ckpt.pt', weights_only=True)
    assert ckpt['mode'] == 'cocomix' and ckpt['model_args']['n_concepts'] == 48
    assert not any(k.startswith(('teacher', 'sae')) for k in ckpt['model'])  # only the student is saved

    gen = ['sample.py', f'--out_dir={tmp_path / "online"}', '--num_samples=1', '--max_new_tokens=12', '--temperature=0',
           '--start=!', '--device=cpu']
    plain, same, steered = (run(gen + extra).stdout for extra in ([], ['--steer=5:1.0'], ['--steer=5:30,6:30']))
    assert plain == same and plain != steered  # alpha 1 changes nothing, a large alpha changes the text
    shown = run(gen + ['--show_concepts']).stdout
    assert plain.splitlines()[1] in shown.splitlines() and len([l for l in shown.splitlines() if ' <- ' in l]) == 12
    for extra, message in ((['--steer=48:2'], r'concept ids must be in [0, 48)'), (['--steer=x'], 'must look like ID:ALPHA'),
                           ([f'--out_dir={tmp_path / "teacher"}', '--show_concepts'], 'predicts no concepts')):
        bad = run(gen + extra, check=False)
        assert bad.returncode != 0 and message in bad.stderr, bad.stderr

    run(['train.py', f'--out_dir={tmp_path / "split"}', '--label_cache=True'] + TINY + common + ['--max_iters=20'])
    run(['train.py', f'--out_dir={tmp_path / "split"}', '--label_cache=True', '--init_from=resume'] + TINY + common)
    a, b = (torch.load(tmp_path / d / 'ckpt.pt', weights_only=True)['model'] for d in ('cached', 'split'))
    assert all(torch.equal(a[k], b[k]) for k in a)  # a resumed cocomix run continues exactly

    wrong = run(['train.py', f'--out_dir={tmp_path / "online"}', '--init_from=resume', f'--dataset={dataset}'] + TINY,
                check=False)
    assert wrong.returncode != 0 and "was trained with mode='cocomix'" in wrong.stderr
    stale = run(['train.py', f'--out_dir={tmp_path / "x"}', '--label_cache=True', '--k_attr=2'] + TINY + common, check=False)
    assert stale.returncode != 0 and 'was made with k_attr=4, this run has 2' in stale.stderr


def test_online_teacher_is_timed_on_logging_steps_only(dataset, tmp_path):
    """Timing the teacher takes a host sync before and after it (GPU work is asynchronous), and each
    sync stalls the GPU's queue: only logging steps time it. Counted through torch.cpu.synchronize,
    what train.py calls on a CPU where a GPU run calls torch.cuda.synchronize."""
    from conftest import TINY, run
    count = ("import runpy, sys, torch; n = []; torch.cpu.synchronize = lambda *a: n.append(1); "
             "sys.argv = ['train.py'] + sys.argv[1:]; runpy.run_path('train.py', run_name='__main__'); "
             "print('syncs', len(n))")
    p = run(['-c', count, f'--dataset={dataset}', f'--out_dir={tmp_path / "out"}', '--mode=cocomix',
             '--insert_layer=1', '--concept_topk=4', '--max_iters=6', '--eval_interval=100'] + TINY +
            ['--log_interval=3', '--gradient_accumulation_steps=2'] + teacher_and_sae(dataset, tmp_path))
    logged = [l for l in p.stdout.splitlines() if l.startswith('iter ')]
    assert len(logged) == 2 and 'teacher' in logged[0]  # steps 0 and 3
    assert p.stdout.splitlines()[-1] == 'syncs 8'  # 2 logged steps x 2 micro-steps x 2; not 24


def test_baseline_modes_lower_their_losses(dataset, tmp_path):
    """kd, pause and kd_pause train: the next-token val loss and the KD term fall; pause models save the
    pause vector and the mode, and the KD teacher is not saved."""
    from conftest import TINY, eval_losses, run
    spec = teacher_and_sae(dataset, tmp_path)[:1]  # the teacher only
    for mode in ('kd', 'pause', 'kd_pause'):
        p = run(['train.py', f'--out_dir={tmp_path / mode}', f'--dataset={dataset}', f'--mode={mode}', '--n_layer=3',
                 '--insert_layer=1', '--max_iters=40', '--eval_interval=20', '--lr_decay_iters=40'] + TINY + spec)
        losses = eval_losses(p.stdout)
        assert losses[-1][2] < losses[0][2] - 0.5, (mode, losses)
        if mode.startswith('kd'):
            kd = [float(l.split(' kd ')[1].split(',')[0]) for l in p.stdout.splitlines() if l.startswith('iter ')]
            assert sum(kd[-5:]) / 5 < sum(kd[:5]) / 5 - 0.2, (mode, kd)
            assert 'teacher' in p.stdout.splitlines()[-4]  # the teacher's share of the step time is logged
        ckpt = torch.load(tmp_path / mode / 'ckpt.pt', weights_only=True)
        assert ckpt['mode'] == mode and ('pause' in ckpt['model']) == mode.endswith('pause')
        assert len(ckpt['model']) == len(GPT(GPTConfig(**ckpt['model_args'])).state_dict())


@pytest.mark.parametrize('topk', [0, 8])
def test_chunked_head_fp16_gradients_survive_the_mean(topk):
    """Under fp16 autocast the chunked head gets fp16 activations; its dL/dlogits per slot is about
    p / n_valid, ~1e-8 here, below fp16's smallest number. GradScaler's scale reaches backward
    only: the gradients must come out as autograd gives them through the plain head in fp16 (the
    chunked ones flushed to zero before: relative error 1)."""
    g = torch.Generator().manual_seed(0)
    N, d, C, k = 2048, 32, 8192, 4
    x32 = torch.randn(N, d, generator=g)
    # rows sharing a direction, as trained heads' do: the softmax and label terms of dL/dx cancel
    w = (torch.randn(C, d, generator=g) * 0.02 + torch.randn(d, generator=g) * 0.1).requires_grad_()
    labels = torch.randint(0, C, (N, k), generator=g)
    scale = 2.0 ** 16  # GradScaler's initial scale
    x = x32.half().requires_grad_()
    loss, values, _ = linear_cross_entropy(x, w, None, labels, topk)
    out = loss + (values.float().sum() * 1e-6 if topk else 0)  # the loss term must dominate
    (out * scale).backward()
    x_ref, w_ref = x32.half().requires_grad_(), w.detach().clone().requires_grad_()
    z = (x_ref @ w_ref.half().t()).float()  # the plain head under fp16 autocast
    ref = concept_loss(z, labels) + (z.topk(topk).values.sum() * 1e-6 if topk else 0)
    (ref * scale).backward()
    for got, want in ((x.grad.float(), x_ref.grad), (w.grad, w_ref.grad)):
        err = (got - want).norm() / want.norm()
        assert err < 0.01, err.item()
