import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, concept_loss


def cocomix(mix='interleave', C=40, insert_layer=1, seed=0, block_size=32):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=64, n_layer=3, n_head=2, n_embd=32, bias=True,
                          n_concepts=C if mix != 'pause' else 0, concept_topk=5, insert_layer=insert_layer,
                          mix='interleave' if mix == 'plain' else mix))
    with torch.no_grad():  # larger concept weights than the init, so that mixing visibly changes the outputs
        for name, p in model.named_parameters():
            if name.startswith(('concepts.', 'pause')):
                p.normal_(0, 0.5)
    return model.eval()


@pytest.mark.parametrize('mix', ['plain', 'interleave', 'pause'])
def test_model_is_causal(mix):
    """Changing token t+1 leaves every logit (and concept logit) at positions <= t unchanged."""
    model = cocomix(mix)
    if mix == 'plain':
        del model.concepts  # the same GPT without the concept parts
        model.mixing = False
    idx = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(0))
    changed = idx.clone()
    changed[0, 9] = (changed[0, 9] + 1) % 64
    outputs = []
    with torch.no_grad():
        for x in (idx, changed):
            outputs.append([model(x, x)[0]] + ([model.concept_logits] if mix == 'interleave' else []))
    for x, y in zip(*outputs):
        assert torch.equal(x[:, :9], y[:, :9])
        assert not torch.allclose(x[:, 9:], y[:, 9:])


def test_gather_compression_equals_dense_masked_matmul():
    model = cocomix()
    h = torch.randn(2, 5, 32, requires_grad=True)
    z, c_hat = model.concepts(h)
    m = model.concepts
    mu, std = h.mean(-1, keepdim=True), h.std(-1, keepdim=True)  # unbiased, as the SAE
    z_ref = m.concept_head((h - mu) / (std + 1e-5) - m.pre_bias)
    kept = torch.zeros_like(z_ref).scatter(-1, z_ref.topk(5).indices, z_ref.topk(5).values)  # TopK, raw values
    c_ref = (kept @ m.compress.weight + m.compress_bias + m.pre_bias) * std + mu  # dense (C-wide) product
    torch.testing.assert_close(z, z_ref)
    torch.testing.assert_close(c_hat, c_ref)
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
    del plain.concepts  # the same weights without the concept parts: a plain GPT
    plain.mixing = False
    with torch.no_grad():
        assert torch.equal(plain(idx, idx)[0], outs['none'])  # prediction only leaves the stream untouched
    assert not torch.allclose(outs['interleave'], outs['none']) and not torch.allclose(outs['add'], outs['none'])


def test_steering():
    model = cocomix()
    idx = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    base = model.generate(idx, 20, temperature=0)
    assert torch.equal(model.generate(idx, 20, temperature=0, steer={3: 1.0, 7: 1.0}), base)
    assert not torch.equal(model.generate(idx, 20, temperature=0, steer={3: 10.0}), base)


def test_concept_loss_in_forward():
    model = cocomix()
    idx = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(-1, 40, (2, 8, 4), generator=torch.Generator().manual_seed(1))
    _, loss = model(idx, idx, concept_labels=labels, lam_concept=0.1)
    ntp, concept = model.losses['ntp'], model.losses['concept']
    torch.testing.assert_close(loss, ntp + 0.1 * concept)
    torch.testing.assert_close(concept, concept_loss(model.concept_logits, labels))


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
        concept = [float(l.split('concept loss ')[1].split(',')[0]) for l in p.stdout.splitlines() if 'concept loss' in l]
        assert sum(concept[-5:]) / 5 < sum(concept[:5]) / 5 - 0.2, concept  # and the concept loss
    ckpt = torch.load(tmp_path / 'online' / 'ckpt.pt', weights_only=True)
    assert ckpt['mode'] == 'cocomix' and ckpt['model_args']['n_concepts'] == 48
    assert not any(k.startswith(('teacher', 'sae')) for k in ckpt['model'])  # only the student is saved

    run(['train.py', f'--out_dir={tmp_path / "split"}', '--label_cache=True'] + TINY + common + ['--max_iters=20'])
    run(['train.py', f'--out_dir={tmp_path / "split"}', '--label_cache=True', '--init_from=resume'] + TINY + common)
    a, b = (torch.load(tmp_path / d / 'ckpt.pt', weights_only=True)['model'] for d in ('cached', 'split'))
    assert all(torch.equal(a[k], b[k]) for k in a)  # a resumed cocomix run continues exactly

    wrong = run(['train.py', f'--out_dir={tmp_path / "online"}', '--init_from=resume', f'--dataset={dataset}'] + TINY,
                check=False)
    assert wrong.returncode != 0 and "was trained with mode='cocomix'" in wrong.stderr
    stale = run(['train.py', f'--out_dir={tmp_path / "x"}', '--label_cache=True', '--k_attr=2'] + TINY + common, check=False)
    assert stale.returncode != 0 and 'was made with k_attr=4, this run has 2' in stale.stderr
