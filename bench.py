"""
What CoCoMix costs and how fast each part is, as ratios measured in one run, with the targets of the repository:

    python bench.py config/cocomix_shakespeare.py                 # CPU: the small student, C from --n_concepts
    python bench.py config/cocomix_gpt2.py --parts=train,labels   # GPU: the paper's 69M student, C = 32768

parts (--parts=a,b):
  train     ms/iter, tokens/s, FLOP/s, MFU (student only, and with the teacher) and peak memory of a training step
            for ntp, cocomix with cached labels and cocomix with online labels, at the config's width and batch;
            each mode runs in its own process, so that its peak memory is its own
  labels    labels/s of our sparse attribution vs the official formulation (teacher weight gradients, dense SAE
            encode, dense (g @ W_dec) * c) on the same inputs, asserting the same labels
  generate  tokens/s of greedy generation with the KV cache vs recomputation, NTP and CoCoMix
  sae       SAE training tokens/s and FVU after the same tokens vs EleutherAI's sparsify (if installed)
Weights are random (timing does not depend on them; nothing is downloaded). Any train.py config is accepted.
"""
import json
import math
import resource
import subprocess
import sys
import time

import torch

import train
from common import UserError, autocast as autocast_context, configure, measure_peak_flops, settings
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
parts = 'train,labels,generate,sae'
batch_size = 12
block_size = 1024
vocab_size = 50257  # padded to a multiple of 64, as train.py does
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = True
insert_layer = 3
concept_topk = 32
mix = 'interleave'
k_attr = 4
n_concepts = 32768  # the SAE's width (OpenAI's GPT-2 SAEs: 32768)
sae_k = 32
sae_layer = 5
teacher_layers = 12  # the teacher's shape (GPT-2 small); the labels part also uses it
teacher_embd = 768
label_batch = 2  # sequences of block_size per labelling call
gen_tokens = 256
sae_tokens = 200_000  # training tokens for the sae part
ntp_width = 0  # also time NTP at this width (the baseline matched to CoCoMix's active parameters); 0 = skip
learning_rate = 6e-4
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'
compile = torch.cuda.is_available()
peak_flops = 0.0  # 0 = guess from the device
seed = 1337
warmup_steps = 3  # untimed (compilation, allocator warm-up)
steps = 10  # timed
run_mode = ''  # internal: the one training mode a child process measures
# -----------------------------------------------------------------------------
argv = sys.argv[1:]
configure(globals(), argv, ignore=settings(vars(train)))
torch.manual_seed(seed)
device_type = 'cuda' if 'cuda' in device else 'cpu'
autocast = autocast_context(device, dtype)
sync = torch.cuda.synchronize if device_type == 'cuda' else (lambda: None)
peak = peak_flops or measure_peak_flops(device, dtype)
V = math.ceil(vocab_size / 64) * 64


def student(mode, T=block_size):
    concepts = dict(n_concepts=n_concepts, concept_topk=concept_topk, insert_layer=insert_layer, mix=mix) \
        if mode.startswith('cocomix') else {}
    width = ntp_width if mode == 'ntp_matched' else n_embd
    return GPT(GPTConfig(block_size=T, vocab_size=V, n_layer=n_layer, n_head=n_head, n_embd=width, dropout=dropout,
                         bias=bias, **concepts)).to(device)


def teacher_and_sae():
    from sae import TopKSAE
    teacher = GPT(GPTConfig(block_size=block_size, vocab_size=V, n_layer=teacher_layers, n_head=max(1, teacher_embd // 64),
                            n_embd=teacher_embd)).to(device).eval().requires_grad_(False)
    return teacher, TopKSAE(teacher_embd, n_concepts, sae_k).to(device).eval()


def timed(fn, n=steps, warmup=warmup_steps):
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        out = fn()
    sync()
    return (time.perf_counter() - t0) / n, out


def label_flops_per_token(teacher):
    """Teacher forward, backward of the blocks above sae_layer and the head to the residual only (no weight
    gradients), and the SAE encoder."""
    block = sum(p.numel() for p in teacher.transformer.h[0].parameters())
    return 2 * teacher.get_num_params() + 2 * ((teacher_layers - sae_layer - 1) * block + V * teacher_embd) \
        + 2 * teacher_embd * n_concepts


def train_child(mode):
    """One mode's training step: prints one JSON line for the parent."""
    from attribution import concept_labels
    model = student(mode)
    optimizer = model.configure_optimizers(0.1, learning_rate, (0.9, 0.95), device_type)
    step_model = torch.compile(model) if compile else model
    x = torch.randint(0, vocab_size, (batch_size, block_size), device=device)
    labels = torch.randint(0, n_concepts, (batch_size, block_size, k_attr), device=device)
    teacher, sae = teacher_and_sae() if mode == 'cocomix_online' else (None, None)

    def step():
        c = labels if mode == 'cocomix_cached' else None
        if teacher is not None:
            with autocast:
                c = concept_labels(teacher, sae, x, sae_layer, k_attr)
        with autocast:
            _, loss, out = step_model(x, x, concept_labels=c)
            loss = loss + 0.1 * out['concept'] if c is not None else loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device_type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    dt, _ = timed(step)
    tokens = batch_size * block_size
    flops = model.flops_per_token(block_size) * tokens / dt
    total = flops + (label_flops_per_token(teacher) * tokens / dt if teacher is not None else 0)
    memory = torch.cuda.max_memory_allocated() if device_type == 'cuda' else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(ms=dt * 1000, tokens_s=tokens / dt, flops=flops, flops_total=total, memory=memory,
                          params=model.get_num_params(active=True))))


def child(mode):
    """Run one mode in a fresh process; the bare process's memory is measured too (mode 'none')."""
    p = subprocess.run([sys.executable, __file__] + argv + [f'--run_mode={mode}'], capture_output=True, text=True)
    if p.returncode != 0:
        raise UserError(f"bench.py --run_mode={mode} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def check(name, value, target, higher=True):
    ok = value >= target if higher else value <= target
    print(f"  target {name}: {value:.2f} {'>=' if higher else '<='} {target} {'OK' if ok else 'MISSED'}")


def bench_train():
    base = child('none')['memory'] if device_type == 'cpu' else 0  # the process without a model
    rows = {m: child(m) for m in ('ntp', 'cocomix_cached', 'cocomix_online') + (('ntp_matched',) if ntp_width else ())}
    unit = 'peak GPU memory' if device_type == 'cuda' else 'peak RSS above a bare process'
    print(f"train ({batch_size} x {block_size} tokens, {n_layer} x {n_embd}, C = {n_concepts}, {dtype}, compile={compile}):")
    for m, r in rows.items():
        print(f"  {m:>15}: {r['params'] / 1e6:7.2f}M active, {r['ms']:8.1f} ms/iter, {r['tokens_s']:9,.0f} tokens/s, "
              f"{r['flops'] / 1e9:8.1f} GFLOP/s student (MFU {r['flops'] / peak:.1%}), {r['flops_total'] / 1e9:8.1f} with "
              f"the teacher (MFU {r['flops_total'] / peak:.1%}), {unit} {(r['memory'] - base) / 2**30:.2f} GiB")
    ntp, cached, online = rows['ntp'], rows['cocomix_cached'], rows['cocomix_online']
    print(f"  ms/iter: cocomix cached / ntp {cached['ms'] / ntp['ms']:.2f}, online / ntp {online['ms'] / ntp['ms']:.2f}"
          + (f", cached / ntp at width {ntp_width} {cached['ms'] / rows['ntp_matched']['ms']:.2f}" if ntp_width else ''))
    check('cocomix (cached) FLOP/s / NTP FLOP/s', cached['flops'] / ntp['flops'], 0.9)
    check('cocomix (cached) peak memory / NTP', (cached['memory'] - base) / (ntp['memory'] - base), 1.3, higher=False)


def official_labels(teacher, sae, idx):
    """The official formulation: teacher weight gradients on, dense SAE encode, dense (g @ W_dec) * c."""
    teacher.requires_grad_(True)
    h = teacher.run_blocks(teacher.embed(idx), stop=sae_layer + 1)
    h.retain_grad()
    targets = torch.nn.functional.pad(idx[:, 1:], (0, 1), value=-1)
    teacher.head(teacher.run_blocks(h, start=sae_layer + 1), targets)[1].backward()
    teacher.zero_grad(set_to_none=True)
    teacher.requires_grad_(False)
    with torch.no_grad():
        c = sae.encode_dense(h.detach())  # (B, T, C)
        top = (c * (h.grad @ sae.decoder.weight)).float().topk(k_attr, dim=-1)
        labels = top.indices.masked_fill(top.values <= 0, -1)
        labels[:, -1] = -1
    return labels


def bench_labels():
    from attribution import concept_labels
    teacher, sae = teacher_and_sae()
    idx = torch.randint(0, vocab_size, (label_batch, block_size), device=device)
    with autocast:
        dt_ours, ours = timed(lambda: concept_labels(teacher, sae, idx, sae_layer, k_attr), n=3, warmup=1)
        dt_official, official = timed(lambda: official_labels(teacher, sae, idx), n=3, warmup=1)
    same = (ours == official).float().mean().item()
    assert same > 0.999, f"sparse and official labels differ on {1 - same:.2%} of the slots"
    tokens = idx.numel()
    print(f"labels (teacher {teacher_layers} x {teacher_embd}, SAE {teacher_embd} -> {n_concepts}, k {sae_k}, "
          f"{tokens} tokens per call; labels agree on {same:.2%} of the slots):")
    print(f"  sparse {tokens / dt_ours:,.0f} tokens/s, official {tokens / dt_official:,.0f} tokens/s")
    check('sparse / official labels/s', dt_official / dt_ours, 3.0)


def bench_generate():
    T = max(block_size, 16 + gen_tokens)  # the cache is used throughout only within the context
    prompt = torch.randint(0, vocab_size, (1, 16), device=device)
    print(f"generate ({gen_tokens} new tokens after 16, batch 1, greedy):")
    for mode in ('ntp', 'cocomix'):
        model = student(mode, T).eval()
        with torch.no_grad(), autocast:
            rates = [gen_tokens / timed(lambda: model.generate(prompt, gen_tokens, temperature=0, use_cache=c), 1, 1)[0]
                     for c in (True, False)]
        print(f"  {mode:>8}: KV cache {rates[0]:,.0f} tokens/s, recomputation {rates[1]:,.0f} tokens/s")
        check(f'{mode} cache / recomputation', rates[0] / rates[1], 5.0)


def bench_sae():
    import sae as S
    d, C, k, batch = teacher_embd, n_concepts, sae_k, 4096
    g = torch.Generator().manual_seed(0)  # data: sparse combinations of a hidden dictionary plus noise
    atoms = torch.nn.functional.normalize(torch.randn(4 * d, d, generator=g), dim=1)

    def data(i):
        codes = torch.zeros(batch, 4 * d).scatter_(1, torch.randint(0, 4 * d, (batch, 8), generator=g), torch.rand(batch, 8, generator=g))
        return (codes @ atoms + 0.01 * torch.randn(batch, d, generator=g)).to(device)

    batches = [data(i) for i in range(max(1, sae_tokens // batch))]
    ours = S.TopKSAE(d, C, k).to(device)
    S.init_sae(ours, batches[0])
    opt = torch.optim.Adam(ours.parameters(), lr=2e-4 / math.sqrt(C / 2 ** 14), eps=6.25e-10)
    t0 = time.perf_counter()
    for x in batches:
        fvu = S.train_step(ours, opt, x, d // 2, 10 ** 9, 1 / 32)[0]
    sync()
    rate = len(batches) * batch / (time.perf_counter() - t0)
    print(f"sae ({d} -> {C}, k {k}, {len(batches) * batch:,} tokens of synthetic sparse data, batch {batch}):")
    print(f"  ours: {rate:,.0f} tokens/s, final batch FVU {fvu.item():.4f}")
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError:
        return print("  sparsify is not installed (pip install eai-sparsify): comparison skipped")
    theirs = SparseCoder(d, SparseCoderConfig(num_latents=C, k=k), device=device)
    opt = torch.optim.Adam(theirs.parameters(), lr=2e-4 / math.sqrt(C / 2 ** 14), eps=6.25e-10)
    t0 = time.perf_counter()
    for x in batches:  # sparsify's own loop body: FVU loss, decoder-parallel gradient removed, unit decoder norm
        out = theirs(x)
        out.fvu.backward()
        theirs.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)
        theirs.set_decoder_norm_to_unit_norm()
    sync()
    rate_theirs = len(batches) * batch / (time.perf_counter() - t0)
    print(f"  sparsify: {rate_theirs:,.0f} tokens/s, final batch FVU {out.fvu.item():.4f}")
    check('SAE training tokens/s ours / sparsify', rate / rate_theirs, 1.0)


if run_mode == 'none':
    print(json.dumps(dict(memory=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)))
elif run_mode:
    train_child(run_mode)
else:
    PARTS = {'train': bench_train, 'labels': bench_labels, 'generate': bench_generate, 'sae': bench_sae}
    for part in parts.split(','):
        if part not in PARTS:
            raise UserError(f"unknown part '{part}'; use some of {','.join(PARTS)}")
        PARTS[part]()
