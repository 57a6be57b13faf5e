import ast
import json

import pytest
import torch
import torch.nn.functional as F

import sae as S
from conftest import TINY, run
from model import GPT

OPENAI_KEYS = {'pre_bias', 'encoder.weight', 'latent_bias', 'decoder.weight', 'stats_last_nonzero',
               'latents_activation_frequency', 'latents_mean_square'}



def encode_dense(sae, x):
    """The (..., n) sparse code of x: the k active values scattered into zeros."""
    values, indices, _ = sae.encode(x)
    return torch.zeros(*x.shape[:-1], sae.n_latents).scatter(-1, indices, values)

def openai_file(path, d=16, n=64, k=4, seed=0):
    """An SAE state dict laid out as OpenAI's released files."""
    g = torch.Generator().manual_seed(seed)
    sd = {'pre_bias': torch.randn(d, generator=g), 'encoder.weight': torch.randn(n, d, generator=g),
          'latent_bias': torch.randn(n, generator=g) * 0.1, 'decoder.weight': torch.randn(d, n, generator=g),
          'stats_last_nonzero': torch.zeros(n, dtype=torch.long), 'latents_activation_frequency': torch.ones(n),
          'latents_mean_square': torch.zeros(n), 'activation': 'TopK',
          'activation_state_dict': {'k': k, 'postact_fn': 'ReLU'}}
    torch.save(sd, path)
    return sd


def openai_reference(sd, x, k):
    """OpenAI's formulas, written out: LN (unbiased std, eps on the std), TopK then ReLU, decode, undo LN."""
    mu = x.mean(-1, keepdim=True)
    std = (x - mu).std(-1, keepdim=True)
    xn = (x - mu) / (std + 1e-5)
    pre = (xn - sd['pre_bias']) @ sd['encoder.weight'].T + sd['latent_bias']
    top = pre.topk(k, dim=-1)
    latents = torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))
    return latents, (latents @ sd['decoder.weight'].T + sd['pre_bias']) * std + mu


def test_openai_file_matches_reference_and_round_trips(tmp_path):
    sd = openai_file(tmp_path / 'openai.pt')
    sae, meta = S.load_sae(str(tmp_path / 'openai.pt'))
    assert meta == {} and sae.k == 4 and sae.normalize
    x = torch.randn(3, 5, 16) * 3 + 1  # any leading shape
    latents, recon = openai_reference(sd, x, 4)
    torch.testing.assert_close(encode_dense(sae, x), latents)
    torch.testing.assert_close(sae(x), recon, atol=1e-4, rtol=1e-4)

    sae.save(str(tmp_path / 'ours.pt'), {'teacher': 'gpt2', 'layer': 5})
    raw = torch.load(tmp_path / 'ours.pt', weights_only=True)
    # OpenAI's loader pops these two keys and then loads the rest with strict=True: the keys must be theirs
    assert raw.pop('activation') == 'TopK' and raw.pop('activation_state_dict')['k'] == 4
    assert set(raw) == OPENAI_KEYS
    again, meta = S.load_sae(str(tmp_path / 'ours.pt'))
    assert meta['teacher'] == 'gpt2' and meta['layer'] == 5
    for key, value in sae.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_wrong_width_and_bad_specs_are_refused(tmp_path):
    openai_file(tmp_path / 'sae.pt', d=16)
    with pytest.raises(SystemExit, match='reads 16-wide vectors but the teacher is 768 wide'):
        S.load_sae(str(tmp_path / 'sae.pt'), n_inputs=768)
    with pytest.raises(SystemExit, match='no SAE file'):
        S.load_sae(str(tmp_path / 'missing.pt'))
    with pytest.raises(SystemExit, match='must look like openai:resid_post_mlp:5'):
        S.load_sae('openai:resid_post_mlp')


def test_gather_decode_equals_dense_product_with_gradients():
    torch.manual_seed(0)
    sae = S.TopKSAE(12, 50, k=5)
    values = torch.rand(4, 3, 5, requires_grad=True)
    indices = torch.stack([torch.randperm(50)[:5] for _ in range(12)]).view(4, 3, 5)
    gathered = sae.decode_norm(values, indices)
    dense_code = torch.zeros(4, 3, 50).scatter(-1, indices, values)
    dense = dense_code @ sae.decoder.weight.T
    torch.testing.assert_close(gathered, dense)
    w = torch.randn_like(dense)
    g1 = torch.autograd.grad((gathered * w).sum(), [values, sae.decoder.weight])
    g2 = torch.autograd.grad((dense * w).sum(), [values, sae.decoder.weight])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def synthetic(n, d=32, atoms=64, active=3, seed=0):
    """Vectors that are sparse positive combinations of a known unit-norm dictionary (the same for every seed)."""
    D = F.normalize(torch.randn(atoms, d, generator=torch.Generator().manual_seed(1234)), dim=-1)
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(atoms, generator=g)[:active] for _ in range(n)])
    coef = torch.rand(n, active, generator=g) + 0.5
    return (coef[..., None] * D[idx]).sum(1), D


def fit(x, n_latents, k, steps, aux_coef, dead_tokens, batch=256, seed=0, normalize=False):
    torch.manual_seed(seed)
    sae = S.TopKSAE(x.size(1), n_latents, k, normalize=normalize)
    S.init_sae(sae, x[:2048])
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / (n_latents / 2 ** 14) ** 0.5)
    for step in range(steps):
        i = (step * batch) % (len(x) - batch)
        fvu, _ = S.train_step(sae, opt, x[i:i + batch], x.size(1) // 2, dead_tokens, aux_coef)
    return sae, fvu


def test_training_recovers_a_known_sparse_dictionary():
    x, D = synthetic(20000)
    sae, _ = fit(x, n_latents=128, k=4, steps=1500, aux_coef=1 / 32, dead_tokens=2000)
    x_test, _ = synthetic(2000, seed=1)
    with torch.no_grad():
        fvu = (sae(x_test) - x_test).pow(2).sum() / (x_test - x_test.mean(0)).pow(2).sum()
    assert fvu < 0.1, fvu
    cos = (D @ sae.decoder.weight).max(dim=1).values  # best-matching decoder column per true atom
    assert (cos > 0.9).float().mean() > 0.8, cos
    torch.testing.assert_close(sae.decoder.weight.norm(dim=0), torch.ones(128))  # unit columns after steps


def test_auxk_loss_equals_dense_formula_and_reaches_only_dead_latents():
    """The FVU and AuxK terms and all their gradients (ours: sparse, through GatheredLinear) against autograd on
    a brute-force dense computation; only dead latents learn from the AuxK term."""
    torch.manual_seed(0)
    sae = S.TopKSAE(16, 64, k=4, normalize=True)
    S.init_sae(sae, torch.randn(512, 16))
    x = torch.randn(32, 16) * 2 + 0.5
    dead = torch.zeros(64, dtype=torch.bool)
    dead[40:] = True
    fvu, aux, _ = S.sae_losses(sae, x, dead, k_aux=8)
    # dense reference: code all latents, keep top-4 overall and top-8 among the dead, decode by matmul
    xn = (x - x.mean(-1, keepdim=True)) / ((x - x.mean(-1, keepdim=True)).std(-1, keepdim=True) + 1e-5)
    pre = (xn - sae.pre_bias) @ sae.encoder.weight.T + sae.latent_bias
    keep = lambda p, kk: torch.zeros_like(p).scatter(-1, p.topk(kk).indices, F.relu(p.topk(kk).values))
    recon = keep(pre, 4) @ sae.decoder.weight.T + sae.pre_bias
    residual = (xn - recon).detach()
    aux_recon = keep(pre.masked_fill(~dead, -float('inf')), 8).nan_to_num() @ sae.decoder.weight.T
    var = lambda t: (t - t.mean(0)).pow(2).sum(-1).mean()
    torch.testing.assert_close(fvu, (recon - xn).pow(2).sum(-1).mean() / var(xn))
    torch.testing.assert_close(aux, (aux_recon - residual).pow(2).sum(-1).mean() / var(residual))
    assert aux > 0.5  # a real term, not an empty mask
    params = [sae.encoder.weight, sae.latent_bias, sae.pre_bias, sae.decoder.weight]
    ref_loss = (recon - xn).pow(2).sum(-1).mean() / var(xn) + 0.3 * (aux_recon - residual).pow(2).sum(-1).mean() / var(residual)
    for ours, ref in zip(torch.autograd.grad(fvu + 0.3 * aux, params, retain_graph=True),
                         torch.autograd.grad(ref_loss, params)):
        torch.testing.assert_close(ours, ref)
    sae.zero_grad()
    aux.backward()
    assert sae.encoder.weight.grad[:40].abs().max() == 0 and sae.decoder.weight.grad[:, :40].abs().max() == 0
    assert sae.encoder.weight.grad[40:].abs().max() > 0


def test_residual_equals_transformers_hidden_states(tiny_hf_gpt2):
    path, hf = tiny_hf_gpt2
    model = GPT.from_pretrained(path).eval()
    idx = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = hf(idx, output_hidden_states=True).hidden_states
        for layer in range(model.config.n_layer - 1):  # the last entry has the final LN applied
            torch.testing.assert_close(S.teacher_residual(model, idx, layer), hidden[layer + 1], atol=1e-5, rtol=1e-5)
    with pytest.raises(SystemExit, match='sae_layer=3 is out of range'):
        S.teacher_residual(model, idx, 3)


def test_cli_trains_resumes_evaluates_and_inspects(dataset, tmp_path):
    teacher = tmp_path / 'teacher'
    run(['train.py', f'--dataset={dataset}', f'--out_dir={teacher}', '--max_iters=20', '--eval_interval=20'] + TINY)
    args = [f'--teacher={teacher}', f'--dataset={dataset}', '--sae_layer=0', '--n_latents=64', '--k=4',
            '--batch_size=256', '--context=16', '--buffer_size=1024', '--eval_tokens=2000', '--ckpt_interval=4',
            '--dead_tokens=500', '--device=cpu', '--dtype=float32']
    full = run(['sae.py', f'--out_dir={tmp_path / "full"}', '--max_tokens=4096'] + args)
    assert 'done: FVU' in full.stdout and 'dead' in full.stdout and 'spliced' in full.stdout
    run(['sae.py', f'--out_dir={tmp_path / "split"}', '--max_tokens=2048'] + args)
    run(['sae.py', f'--out_dir={tmp_path / "split"}', '--max_tokens=4096', '--init_from=resume'] + args)
    a, b = (torch.load(tmp_path / d / 'sae.pt', weights_only=True) for d in ('full', 'split'))
    for key in OPENAI_KEYS:
        assert torch.equal(a[key], b[key]), key
    sae_file = str(tmp_path / 'full' / 'sae.pt')
    ev = run(['sae.py', f'--evaluate={sae_file}', '--eval_tokens=2000', '--context=16'])  # teacher etc. from the file
    assert ev.stdout.strip().startswith('FVU')
    ins = run(['tools/concepts.py', f'--sae={sae_file}', '--top=3', '--tokens=2000', '--context=16'])
    assert 'most frequent latents' in ins.stdout
    latent = int(ins.stdout.splitlines()[1].split()[0])
    one = run(['tools/concepts.py', f'--sae={sae_file}', f'--latent={latent}', '--tokens=2000', '--context=16'])
    assert f'latent {latent}: active on' in one.stdout and '[[' in one.stdout
    with open(sae_file + '.concepts.json') as f:  # the listing saved one description per latent
        desc = json.load(f)
    peak = one.stdout.split('[[')[1].split(']]')[0]  # the token of the latent's strongest activation
    promotes = ast.literal_eval(one.stdout.split('promotes: ')[1].splitlines()[0])
    assert len(desc) == 64 and desc[str(latent)] == f"on {peak}, promotes " + ' '.join(map(repr, promotes[:3]))
    bad = run(['tools/concepts.py', f'--sae={sae_file}', '--latent=64', '--context=16'], check=False)
    assert bad.returncode != 0 and 'latent 64 is out of range' in bad.stderr
    narrow = str(tmp_path / 'narrow.pt')  # another width, naming the same teacher, data and layer
    S.TopKSAE(8, 64, 4).save(narrow, S.load_sae(sae_file)[1])
    for cmd in (['sae.py', f'--evaluate={narrow}'], ['tools/concepts.py', f'--sae={narrow}']):
        bad = run(cmd + ['--context=16'], check=False)
        assert bad.returncode != 0 and 'reads 8-wide vectors but the teacher is' in bad.stderr


# -----------------------------------------------------------------------------
# sae.py's settings: refused in one line before any work, and a finished sae.pt kept

def tiny_teacher(tmp_path):
    """A random 2-block teacher written as a train.py checkpoint (seconds cheaper than training one)."""
    from common import save_checkpoint
    from model import GPTConfig
    torch.manual_seed(0)
    args = dict(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=16, bias=True, dropout=0.0)
    save_checkpoint({'model': GPT(GPTConfig(**args)).state_dict(), 'model_args': args}, str(tmp_path / 'teacher'))
    return str(tmp_path / 'teacher')


def sae_args(dataset, tmp_path, out='out'):
    return [f'--teacher={tiny_teacher(tmp_path)}', f'--dataset={dataset}', f'--out_dir={tmp_path / out}',
            '--sae_layer=0', '--n_latents=64', '--k=4', '--batch_size=128', '--context=16', '--buffer_size=512',
            '--max_tokens=512', '--eval_tokens=200', '--ckpt_interval=2', '--device=cpu', '--dtype=float32']


def one_line_error(p, message):
    assert p.returncode != 0 and message in p.stderr, p.stderr[-3000:]
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr[-3000:]  # no traceback


def test_init_from_typo_is_refused_and_leaves_the_finished_sae(dataset, tmp_path):
    args = sae_args(dataset, tmp_path)
    run(['sae.py'] + args)
    before = (tmp_path / 'out' / 'sae.pt').read_bytes()
    one_line_error(run(['sae.py'] + args + ['--init_from=resum'], check=False), 'init_from must be one of')
    assert (tmp_path / 'out' / 'sae.pt').read_bytes() == before


def test_k_outside_1_to_n_latents_is_refused(dataset, tmp_path):
    args = sae_args(dataset, tmp_path)
    one_line_error(run(['sae.py'] + args + ['--k=65'], check=False), 'k=65 is more than n_latents=64')
    one_line_error(run(['sae.py'] + args + ['--k=0'], check=False), 'k must be an int with k >= 1')
    assert not (tmp_path / 'out').exists()  # before any work


def test_resume_under_other_settings_is_refused_naming_each(dataset, tmp_path):
    args = sae_args(dataset, tmp_path)
    run(['sae.py'] + args + ['--max_tokens=256'])
    ckpt = (tmp_path / 'out' / 'sae_ckpt.pt').read_bytes()
    p = run(['sae.py'] + args + ['--init_from=resume', '--k=8', '--batch_size=64', '--sae_layer=1',
                                 '--n_latents=128'], check=False)
    one_line_error(p, 'was trained with sae_layer=0 (this run: 1), n_latents=64 (this run: 128), '
                      'k=4 (this run: 8), batch_size=128 (this run: 64)')
    assert (tmp_path / 'out' / 'sae_ckpt.pt').read_bytes() == ckpt
    run(['sae.py'] + args + ['--init_from=resume'])  # max_tokens may grow: the same SAE trains on


def test_a_scratch_run_over_a_finished_sae_is_refused(dataset, tmp_path):
    """A new run into an out_dir with a finished sae.pt is refused before any work (it used to replace
    it once it succeeded; a kill -9 after its first save left the worse one)."""
    from conftest import write_dataset
    args = sae_args(dataset, tmp_path)
    run(['sae.py'] + args)
    before = (tmp_path / 'out' / 'sae.pt').read_bytes()
    short = write_dataset(str(tmp_path / 'short'), n_val=10)
    p = run(['sae.py'] + args + [f'--dataset={short}', '--seed=1'], check=False)
    assert p.returncode != 0 and 'holds an SAE; pass --init_from=resume' in p.stderr, p.stderr[-2000:]
    assert (tmp_path / 'out' / 'sae.pt').read_bytes() == before
