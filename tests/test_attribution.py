import json
import os

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_flop_count

import attribution as A
from conftest import run
from common import fingerprint, save_checkpoint
from model import GPT, GPTConfig
from sae import TopKSAE, init_sae, teacher_residual
from stages import label_flops_per_token

LAYER = 1



def encode_dense(sae, x):
    """The (..., n) sparse code of x: the k active values scattered into zeros."""
    values, indices, _ = sae.encode(x)
    return torch.zeros(*x.shape[:-1], sae.n_latents).scatter(-1, indices, values)

def setup(seed=0):
    torch.manual_seed(seed)
    teacher = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=3, n_head=2, n_embd=32, bias=True)).eval()
    sae = TopKSAE(32, 128, k=8)
    init_sae(sae, torch.randn(256, 32))
    with torch.no_grad():
        sae.latent_bias.normal_(0, 0.1)
    idx = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(seed))
    return teacher, sae, idx


def grad_at_residual(teacher, idx):
    h = teacher_residual(teacher, idx, LAYER).detach().requires_grad_(True)
    targets = torch.nn.functional.pad(idx[:, 1:], (0, 1), value=-1)
    loss = teacher.head(teacher.run_blocks(h, start=LAYER + 1), targets)[1]
    return h.detach(), torch.autograd.grad(loss, h)[0]


def check_against(dense_scores, labels, scores, factor=1.0):
    """Our labels/scores equal the top-k of a dense (B, T, C) score tensor, wherever ours found a label."""
    ref = dense_scores.topk(labels.size(-1), dim=-1)
    has = labels[:, :-1] >= 0
    assert has.float().mean() > 0.5  # most slots get a label: the comparison is not vacuous
    assert torch.equal(labels[:, :-1][has], ref.indices[:, :-1][has])
    torch.testing.assert_close((scores * factor)[:, :-1][has], ref.values[:, :-1][has], rtol=1e-4, atol=1e-6)
    assert (ref.values[:, :-1][~has] <= 1e-6).all()  # ours left a slot empty only where no positive score remains
    assert (labels[:, -1] == -1).all()  # the last position predicts nothing


def test_attribution_equals_brute_force_autograd():
    """Brute force: make the SAE code a leaf, splice its decoding into the teacher at LAYER, and take
    code * dL/dcode. The splice adds the detached reconstruction error, so the teacher runs on the exact
    residual (the gradient is taken where ours is). dL/dc_i = std * (g . W_dec[:, i]) includes the SAE's
    de-normalisation std of each position, which ours leaves out: the test multiplies our scores by it."""
    teacher, sae, idx = setup()
    labels, scores = A.concept_labels(teacher, sae, idx, LAYER, k_attr=4, return_scores=True)
    h = teacher_residual(teacher, idx, LAYER).detach()
    values, indices, info = sae.encode(h)
    code = torch.zeros(*h.shape[:-1], sae.n_latents).scatter(-1, indices, values).requires_grad_(True)
    recon = (code @ sae.decoder.weight.T + sae.pre_bias) * info[1] + info[0]
    spliced = recon + (h - recon).detach()
    targets = torch.nn.functional.pad(idx[:, 1:], (0, 1), value=-1)
    loss = teacher.head(teacher.run_blocks(spliced, start=LAYER + 1), targets)[1]
    brute = (code * torch.autograd.grad(loss, code)[0]).detach()
    brute = brute.masked_fill(code.detach() == 0, -float('inf'))  # inactive latents are not candidates
    check_against(brute, labels, scores, factor=info[1])


def test_sparse_gather_equals_official_dense_formula():
    teacher, sae, idx = setup(1)
    for method, sign in (('attribution', 1), ('attribution_neg', -1)):
        labels, scores = A.concept_labels(teacher, sae, idx, LAYER, k_attr=3, method=method, return_scores=True)
        h, g = grad_at_residual(teacher, idx)
        c = encode_dense(sae, h)
        official = sign * (g @ sae.decoder.weight) * c  # the released code's (g @ W_dec) * c, dense (B, T, C)
        check_against(official.masked_fill(c == 0, -float('inf')), labels, scores)


def test_activation_and_preact_methods():
    teacher, sae, idx = setup(2)
    labels = A.concept_labels(teacher, sae, idx, LAYER, k_attr=4, method='activation')
    h = teacher_residual(teacher, idx, LAYER).detach()
    assert torch.equal(labels, encode_dense(sae, h).topk(4).indices)  # top activations, last position included
    labels, scores = A.concept_labels(teacher, sae, idx, LAYER, k_attr=4, method='attribution_preact', return_scores=True)
    h, g = grad_at_residual(teacher, idx)
    check_against(sae.encode_pre(sae.preprocess(h)[0]) * (g @ sae.decoder.weight), labels, scores)


class MatmulFlops(TorchDispatchMode):
    """The FLOPs of the matmuls and attention a computation runs, as torch's FLOP counter counts
    them; CPU flash attention is missing from its table: its forward counted as the others, its
    backward as four matmuls, twice the forward (nanoGPT's convention: no recomputed scores)."""
    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        op, shapes = func.overloadpacket, [a.shape for a in args[:4] if isinstance(a, torch.Tensor)]
        if op in flop_registry:
            self.total += flop_registry[op](*args, **(kwargs or {}), out_val=out)
        elif op is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
            self.total += sdpa_flop_count(*shapes[:3])
        elif op is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
            self.total += 2 * sdpa_flop_count(*shapes[1:4])
        return out


@pytest.mark.parametrize('method', A.LABEL_METHODS + ('kd',))
def test_label_flops_count_what_labelling_runs(method):
    """The compute table's per-token labelling cost equals the FLOPs concept_labels (KD: the
    teacher's forward with all logits) executes, counted op by op. Sizes where no two terms
    coincide: 1 + 1 blocks up to the SAE's layer, 3 after; head 2 * 48 * 32, encoder 2 * 32 * 80."""
    torch.manual_seed(0)
    teacher = GPT(GPTConfig(block_size=32, vocab_size=48, n_layer=5, n_head=2, n_embd=32, bias=True)).eval()
    sae = TopKSAE(32, 80, k=8)
    init_sae(sae, torch.randn(256, 32))
    idx = torch.randint(0, 48, (3, 12))
    with MatmulFlops() as counted:
        if method == 'kd':
            with torch.no_grad():
                teacher(idx, torch.zeros_like(idx))
        else:
            A.concept_labels(teacher, sae, idx, LAYER, method=method)
    assert counted.total > 0
    expected = label_flops_per_token(teacher.config, LAYER, sae.n_latents, idx.shape[1], method)
    assert counted.total == expected * idx.numel()


def test_teacher_gets_no_gradient_and_is_unchanged():
    teacher, sae, idx = setup()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert all(p.requires_grad for p in teacher.parameters())  # not frozen: the function itself must not touch them
    A.concept_labels(teacher, sae, idx, LAYER)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_bad_inputs():
    teacher, sae, idx = setup()
    with pytest.raises(SystemExit, match='reads 16-wide vectors but the teacher is 32 wide'):
        A.concept_labels(teacher, TopKSAE(16, 64, 4), idx, LAYER)
    with pytest.raises(SystemExit, match='sae_layer=5 is out of range'):
        A.concept_labels(teacher, sae, idx, 5)
    with pytest.raises(SystemExit, match="unknown label_method 'magic'"):
        A.concept_labels(teacher, sae, idx, LAYER, method='magic')


def test_offline_cache_equals_online_labels_resumes_and_refuses_mismatch(dataset, tmp_path):
    teacher, sae, _ = setup()
    model_args = dict(block_size=32, vocab_size=64, n_layer=3, n_head=2, n_embd=32, bias=True, dropout=0.0)
    save_checkpoint({'model': teacher.state_dict(), 'model_args': model_args}, str(tmp_path / 'teacher'))
    sae.save(str(tmp_path / 'sae.pt'))
    args = ['attribution.py', f'--teacher={tmp_path / "teacher"}', f'--sae={tmp_path / "sae.pt"}', '--sae_layer=1',
            f'--dataset={dataset}', '--block_size=24', '--batch_size=32', '--device=cpu', '--dtype=float32']
    p = run(args)
    assert 'tokens labelled' in p.stdout
    identity = dict(teacher_id=fingerprint(teacher), sae_id=fingerprint(sae), sae_layer=1, n_concepts=128)
    cache = A.load_label_cache(dataset, 'val', identity, 'attribution', 4, 24)
    starts = [0, 24 * 7, 24 * 82]  # window starts
    cached = A.label_windows(cache, starts, 24)
    val = np.fromfile(os.path.join(dataset, 'val.bin'), dtype=np.uint16).astype(np.int64)
    idx = torch.from_numpy(np.stack([val[s:s + 24] for s in starts]))
    assert torch.equal(cached, A.concept_labels(teacher, sae, idx, 1))
    path, meta_path = A.cache_paths(dataset, 'val')
    reference = np.fromfile(path, dtype=np.uint16)
    assert reference.shape == (2000 * 4,) and (reference[83 * 24 * 4:] == 0).all()  # past the last whole window

    # two processes (torchrun) write the same file; an interrupted run resumes, here with one process
    os.remove(meta_path)
    run(['torchrun', '--standalone', '--nproc_per_node=2'] + args + ['--splits=val', '--batch_size=8'],
        env={'OMP_NUM_THREADS': '1'})
    assert np.array_equal(np.fromfile(path, dtype=np.uint16), reference) and json.load(open(meta_path))['complete']
    meta = json.load(open(meta_path))
    json.dump(dict(meta, complete=False), open(meta_path, 'w'))
    np.array([[0, 30], [30, 40]], dtype='<i8').tofile(path + '.done')  # windows 0 .. 39 written
    partial = np.memmap(path, dtype=np.uint16, mode='r+')
    partial[40 * 24 * 4:83 * 24 * 4] = 0
    partial[:4] = 7  # a label in a window marked done: resuming must not touch it
    partial.flush()
    del partial
    run(args + ['--splits=val', '--batch_size=8'])
    resumed = np.fromfile(path, dtype=np.uint16)
    assert (resumed[:4] == 7).all() and np.array_equal(resumed[4:], reference[4:]) and not os.path.exists(path + '.done')

    with pytest.raises(SystemExit, match='was made with k_attr=4, this run has 2'):
        A.load_label_cache(dataset, 'val', identity, 'attribution', 2, 24)
    wrong = run(args[:1] + [f'--teacher={tmp_path / "teacher"}', f'--sae={tmp_path / "sae.pt"}', '--sae_layer=7',
                            f'--dataset={dataset}', '--device=cpu'], check=False)
    assert wrong.returncode != 0 and 'sae_layer=7 is out of range' in wrong.stderr


# -----------------------------------------------------------------------------
# The cache: resumes exactly, matched to its data by content, no fill, no memmap held

IDENTITY = dict(teacher_id='t', sae_id='s', sae_layer=LAYER, n_concepts=128)


class Killed(Exception):
    pass


def label(data, monkeypatch, batch_size, rank=0, world=1, batches=None, block_size=24):
    """label_split on the val split; stopped as by kill -9 before batch number `batches` if given."""
    teacher, sae, _ = setup()
    calls, real = [0], A.concept_labels

    def stoppable(*args, **kwargs):
        if batches is not None and calls[0] == batches:
            raise Killed
        calls[0] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(A, 'concept_labels', stoppable)
    expected = A.describe(data, 'val', IDENTITY, 'attribution', 4, block_size)
    try:
        A.label_split(teacher, sae, data, 'val', expected, device='cpu', batch_size=batch_size,
                      rank=rank, world=world)
    except Killed:
        pass
    monkeypatch.setattr(A, 'concept_labels', real)
    return A.cache_paths(data, 'val')


def test_resume_with_other_batch_sizes_and_process_counts_equals_a_fresh_run(tmp_path, monkeypatch):
    """Runs stopped part way, on 2 processes (ranks run here one after the other) and on 1, with
    batch sizes 8, 5, 3 and 7, finish with the bytes of one uninterrupted run."""
    from conftest import write_dataset
    fresh, data = (write_dataset(str(tmp_path / name)) for name in ('fresh', 'data'))
    path, _ = label(fresh, monkeypatch, batch_size=32)
    reference = open(path, 'rb').read()
    path, meta_path = label(data, monkeypatch, batch_size=8, rank=0, world=2, batches=3)
    rank0 = open(path + '.done', 'rb').read()
    label(data, monkeypatch, batch_size=5, rank=1, world=2, batches=2)
    assert open(path + '.done', 'rb').read() == rank0  # each process writes only its own progress
    label(data, monkeypatch, batch_size=3, batches=4)
    assert not json.load(open(meta_path))['complete']
    label(data, monkeypatch, batch_size=7)
    assert open(path, 'rb').read() == reference and json.load(open(meta_path))['complete']
    assert not [name for name in os.listdir(data) if '.done' in name]


def test_a_cache_cut_short_while_unfinished_is_labelled_again(tmp_path, monkeypatch):
    """Windows the progress lists as done but past the file's end were lost: a resume that kept the
    progress marked them complete as "no label" (29% of a newcomer's cache)."""
    from conftest import write_dataset
    fresh, data = (write_dataset(str(tmp_path / name)) for name in ('fresh', 'data'))
    path, _ = label(fresh, monkeypatch, batch_size=32)
    reference = open(path, 'rb').read()
    path, _ = label(data, monkeypatch, batch_size=8, batches=5)
    with open(path, 'r+b') as f:
        f.truncate(len(reference) // 3)
    label(data, monkeypatch, batch_size=8)
    assert open(path, 'rb').read() == reference


def test_a_fresh_cache_is_not_filled_by_one_process(tmp_path, monkeypatch):
    """A fresh cache is a sparse file that already means "no label": no process writes 72 GB of
    markers while the others wait at a barrier."""
    from conftest import write_dataset
    data = write_dataset(str(tmp_path / 'data'), n_val=200_000)
    path, _ = label(data, monkeypatch, batch_size=8, batches=0)
    assert os.path.getsize(path) == 200_000 * 4 * 2 and os.stat(path).st_blocks * 512 < 100_000
    cache = dict(path=path, dtype=np.uint16, k_attr=4)
    assert (A.label_windows(cache, [0, 24 * 100], 24) == -1).all()


def test_a_cache_of_other_data_of_the_same_size_is_refused(tmp_path, monkeypatch):
    from conftest import write_dataset
    data = write_dataset(str(tmp_path / 'data'))
    label(data, monkeypatch, batch_size=32)
    A.load_label_cache(data, 'val', IDENTITY, 'attribution', 4, 24)
    write_dataset(data, seed=1)  # prepared again from other text, to the same sizes
    with pytest.raises(SystemExit, match=r"was made with data='\w+', this run has '\w+'") as e:
        A.load_label_cache(data, 'val', IDENTITY, 'attribution', 4, 24)
    assert '\n' not in str(e.value)


def test_the_cache_holds_no_memmap(tmp_path, monkeypatch):
    """train.py keeps the cache for the whole run: label_windows opens the file per call, as
    prepare.load_tokens, so the resident memory does not grow with the pages read."""
    import pickle
    from conftest import write_dataset
    data = write_dataset(str(tmp_path / 'data'))
    label(data, monkeypatch, batch_size=32)
    cache = A.load_label_cache(data, 'val', IDENTITY, 'attribution', 4, 24)
    assert len(pickle.dumps(cache)) < 1000  # a path and a dtype, not 16 KB of labels
    assert A.label_windows(cache, [0, 24], 24).shape == (2, 24, 4)


@pytest.mark.parametrize('method', ['attribution', 'activation'])
def test_labels_under_bfloat16_autocast_equal_float32_labels(method):
    """train.py labels inside its autocast context: the labels are computed in float32 all the same."""
    teacher, sae, _ = setup()
    idx = torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(5))
    fp32 = A.concept_labels(teacher, sae, idx, LAYER, method=method)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        bf16 = A.concept_labels(teacher, sae, idx, LAYER, method=method)
    assert torch.equal(bf16, fp32)


def test_windows_longer_than_the_teachers_context_are_refused(dataset, tmp_path):
    teacher, sae, _ = setup()  # the teacher reads 32 positions
    model_args = dict(block_size=32, vocab_size=64, n_layer=3, n_head=2, n_embd=32, bias=True, dropout=0.0)
    save_checkpoint({'model': teacher.state_dict(), 'model_args': model_args}, str(tmp_path / 'teacher'))
    sae.save(str(tmp_path / 'sae.pt'))
    p = run(['attribution.py', f'--teacher={tmp_path / "teacher"}', f'--sae={tmp_path / "sae.pt"}', '--sae_layer=1',
             f'--dataset={dataset}', '--block_size=48', '--device=cpu'], check=False)
    assert p.returncode != 0 and "block_size=48 is longer than the teacher's context (32)" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not os.path.exists(os.path.join(dataset, 'labels_train.json'))
