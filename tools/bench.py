"""Each speed target as a ratio measured in one run on this machine (CPU or GPU), with random
weights, at the settings' shapes or any train.py config's (RESULTS.md has the commands).

parts (--parts=a,b), each printing its measures and each ratio beside its target:
  smoke     a machine's check before a long run: training steps of NTP and of CoCoMix with cached
            and with online labels, at the config's shapes, dtype and compile, in each of torchrun's
            processes; online labelling eager and compiled; a verdict
  train     the same, each mode in its own process (its own peak memory)
  ntp       our NTP step vs nanoGPT's model.py (--nanogpt=DIR)
  labels    online labelling's FLOP/s, counting only what it must do (teacher forward, input-gradient
            backward to sae_layer, SAE encoder), vs a teacher-shaped NTP step's; compiled vs eager
  heads     the chunked heads' gradients against the plain ones', at dtype, each against float32
  generate  KV-cache greedy generation, NTP and CoCoMix, beside reading every weight once per token
  sae       SAE training vs EleutherAI's sparsify (pip install eai-sparsify), same synthetic data
  prepare   prepare.py on synthetic .jsonl corpora of prepare_mb and 10x that: its memory is flat
"""
import json
import math
import os
import random
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext, redirect_stdout
from resource import RUSAGE_SELF, getrusage
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import model as M
import sae as S
from attribution import concept_labels
from common import (DEVICE, DTYPE, REPO, UserError, autocast, configure, peak_flops,
                    pretrained_shape, setting_names, setup_distributed)
from stages import label_flops_per_token

# -----------------------------------------------------------------------------
parts: 'str' = 'train,labels,generate,sae'
batch_size: 'int >= 1' = 12
block_size: 'int >= 1' = 1024
vocab_size: 'int >= 1' = 50257
n_layer: 'int >= 1' = 12
n_head: 'int >= 1' = 12
n_embd: 'int >= 1' = 768
bias: 'bool' = True
dropout: '0 <= float < 1' = 0.0
insert_layer: 'int >= 0' = 3
concept_topk: 'int >= 1' = 32
mix: 'interleave|add|none' = 'interleave'
k_attr: 'int >= 1' = 4
n_concepts: 'int >= 1' = 32768  # the SAE: OpenAI's GPT-2 SAEs are 768 -> 32768, k 32, layer 5
sae_k: 'int >= 1' = 32
sae_layer: 'int >= 0' = 5
teacher: 'str' = ''  # a config's teacher: a GPT-2 gives its shape, with random weights
teacher_layers: 'int >= 1' = 12  # else the teacher's shape (GPT-2 small)
teacher_embd: 'int >= 1' = 768
label_batch: 'int >= 1' = 2  # sequences of block_size per labelling call
gen_positions: 'int > 16' = 1024  # generate up to this many positions (16 of prompt)
sae_tokens: 'int >= 1' = 65536  # SAE training tokens
sae_batch: 'int >= 1' = 4096
nanogpt: 'dir?' = ''  # a checkout of karpathy/nanoGPT, for --parts=ntp
rounds: 'int >= 1' = 5  # alternating rounds (ntp)
steps: 'int >= 1' = 5  # timed steps per measurement
smoke_tiny: 'bool' = False  # every shape shrunk: smoke's code path on a CPU in a minute
device: 'device' = DEVICE
dtype: 'float32|bfloat16|float16' = DTYPE
compile: 'bool' = False
backend: 'str' = 'inductor'  # torch.compile's; 'aot_eager' compiles in seconds on a CPU (tests)
seed: 'int >= 0' = 1337
prepare_mb: 'int >= 1' = 15  # the smaller synthetic corpus for --parts=prepare
run_mode: '|ntp|cached|online' = ''  # internal: the mode a child process of --parts=train measures
# -----------------------------------------------------------------------------
argv, given = sys.argv[1:], set()
configure(globals(), argv, ignore=setting_names('train.py'), given=given)  # train.py configs work
if teacher.startswith('gpt2') and not given & {'teacher_layers', 'teacher_embd'}:
    teacher_layers, teacher_embd = (pretrained_shape(teacher)[k] for k in ('n_layer', 'n_embd'))
if smoke_tiny:
    n_layer, n_head, n_embd, block_size, vocab_size, batch_size = 2, 2, 64, 64, 512, 2
    n_concepts, sae_k, concept_topk, insert_layer, sae_layer = 256, 8, 8, 1, 0
    teacher_layers, teacher_embd = 2, 64
for what, wide, heads in (('', n_embd, n_head), ('teacher_', teacher_embd, max(1, teacher_embd // 64))):
    if wide % heads:
        raise UserError(f"{what}n_embd={wide} is no multiple of its {heads} heads")
if insert_layer > n_layer or sae_layer >= teacher_layers or k_attr > sae_k:
    raise UserError(f"insert_layer={insert_layer} must be at most n_layer={n_layer}, sae_layer="
                    f"{sae_layer} below teacher_layers={teacher_layers}, k_attr={k_attr} at most "
                    f"sae_k={sae_k}")
torch.manual_seed(seed)
torch.backends.cuda.matmul.allow_tf32 = True  # as train.py: float32 runs as it will there
torch.backends.cudnn.allow_tf32 = True
cuda = 'cuda' in device
ctx = autocast(device, dtype)
V = math.ceil(vocab_size / 64) * 64
COCOMIX = dict(n_concepts=n_concepts, concept_topk=concept_topk, insert_layer=insert_layer, mix=mix)
sync = torch.cuda.synchronize if cuda else torch.cpu.synchronize


def timed(fn, n=steps, warmup=1):  # seconds per call of fn, after warmup calls
    for i in range(warmup + n):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        fn()
    sync()
    return (time.perf_counter() - t0) / n


def gpt(layers=n_layer, width=n_embd, heads=n_head, T=block_size, lib=vars(M), **concepts):
    return lib['GPT'](lib['GPTConfig'](block_size=T, vocab_size=V, n_layer=layers, n_head=heads,
                                       n_embd=width, bias=bias, dropout=dropout, **concepts)).to(device)


def train_step(model, labels=None, world=1, compiled=compile):
    """One AdamW step on a random batch, a closure (DDP for world > 1); labels: cached, or a function of x."""
    step_model = torch.compile(model, backend=backend) if compiled else model
    if world > 1:
        step_model = DDP(step_model, device_ids=[torch.device(device).index] if cuda else None)
    x = torch.randint(0, vocab_size, (batch_size, block_size), device=device)
    opt = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), 'cuda' if cuda else 'cpu')

    def step():
        with ctx:
            if labels is None:  # nanoGPT's model too: it takes no concept labels
                loss = step_model(x, x)[1]
            else:
                _, ntp_loss, out = step_model(x, x, concept_labels=labels(x) if callable(labels) else labels)
                loss = ntp_loss + 0.1 * out['concept']
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def labelling():  # a teacher, its SAE and label_batch sequences to label
    teacher = gpt(teacher_layers, teacher_embd, max(1, teacher_embd // 64)).eval().requires_grad_(False)
    sae = S.TopKSAE(teacher_embd, n_concepts, sae_k).to(device).eval()
    return teacher, sae, torch.randint(0, vocab_size, (label_batch, block_size), device=device)


def report_label_speeds(teacher_model, sae, idx):
    """Labelling's tokens/s eager and compiled (alternating: neither gains from the order) -> compiled / eager."""
    torch._dynamo.reset()
    calls = {'eager': concept_labels, 'compiled': torch.compile(concept_labels, backend=backend)}
    with ctx:
        labels = {k: fn(teacher_model, sae, idx, sae_layer, k_attr) for k, fn in calls.items()}
        seconds = [timed(lambda: calls[k](teacher_model, sae, idx, sae_layer, k_attr)) for k in [*calls] * 2]
    eager, compiled = min(seconds[::2]), min(seconds[1::2])
    # ties in a low precision may order latents otherwise
    agree = (labels['eager'] == labels['compiled']).float().mean().item()
    print(f"  labelling ({label_batch} x {block_size} tokens, {backend}): eager "
          f"{idx.numel() / eager:,.0f} tokens/s, compiled {idx.numel() / compiled:,.0f} tokens/s: "
          f"{eager / compiled:.2f}x; labels agree at {agree:.1%} of slots")
    return eager / compiled


def check(name, value, target):
    print(f"  {name}: {value:.2f} (target >= {target}: {'met' if value >= target else 'MISSED'})")


def measure(mode, world=1):
    torch._dynamo.reset()  # each mode compiles, and counts its graph breaks, afresh
    torch._dynamo.utils.counters.clear()
    model = gpt(**(COCOMIX if mode != 'ntp' else {}))
    cached = torch.randint(0, n_concepts, (batch_size, block_size, k_attr), device=device)
    teacher_model, sae, _ = labelling() if mode == 'online' else (None, None, None)
    seconds = dict(teacher=0.0)

    def labeller(x):
        t0 = time.perf_counter()
        labels = concept_labels(teacher_model, sae, x, sae_layer, k_attr)
        sync()
        seconds['teacher'] += time.perf_counter() - t0
        return labels
    step = train_step(model, dict(cached=cached, online=labeller).get(mode), world)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    dt = timed(lambda: seconds.update(loss=step().item()), warmup=2)  # they compile
    memory = torch.cuda.max_memory_allocated(device) if cuda else getrusage(RUSAGE_SELF).ru_maxrss * 1024
    memory = torch.tensor(float(memory), device=device)  # on the GPU, else the process's peak resident set
    if world > 1:
        torch.distributed.all_reduce(memory, op=torch.distributed.ReduceOp.MAX)
    tokens = batch_size * block_size * world / dt  # per second, in all processes
    flops = model.flops_per_token(block_size) * tokens
    peak = peak_flops(device, dtype)
    return dict(tokens=tokens, ms=dt * 1e3, flops=flops, memory=memory.item(), loss=seconds['loss'],
                breaks=sum(torch._dynamo.utils.counters['graph_break'].values()),
                mfu=f", MFU {flops / (peak * world):.1%}" if peak else '', teacher=seconds['teacher'] / (steps + 2) / dt)


def child(mode):
    """measure(mode) in a fresh process: its peak memory is the mode's own."""
    p = subprocess.run([sys.executable, __file__] + argv + [f'--run_mode={mode}'],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise UserError(f"bench.py --run_mode={mode} failed: {p.stderr.strip().splitlines()[-1]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def bench_modes(part):
    global device  # under torchrun: this process's GPU
    if part == 'train' and 'RANK' in os.environ:
        raise UserError("--parts=train runs one process per mode: run it without torchrun "
                        "(under torchrun: --parts=smoke)")
    rank, world, device = setup_distributed(device)
    rows, problems = {}, []
    with redirect_stdout(sys.stdout if rank == 0 else open(os.devnull, 'w')):  # all measure alike; rank 0 tells
        bare = '; memory above a bare process' if part == 'train' and not cuda else ''
        print(f"{part} ({world} process{'es' if world > 1 else ''}, {dtype}, compile {compile}, "
              f"{n_layer} x {n_embd}, {batch_size} x {block_size} tokens per process, "
              f"C = {n_concepts}, teacher {teacher_layers} x {teacher_embd}{bare}):")
        for mode in ('ntp', 'cached', 'online'):
            row = rows[mode] = child(mode) if part == 'train' else measure(mode, world)
            print(f"  {mode:>6}: {row['tokens']:,.0f} tokens/s, {row['ms']:,.1f} ms/iter, "
                  f"{row['flops'] / 1e9:,.1f} GFLOP/s{row['mfu']}, peak memory per process "
                  f"{row['memory'] / 2 ** 30:.2f} GiB, graph breaks {row['breaks']}"
                  + (f", teacher {row['teacher']:.0%} of the step" if mode == 'online' else ''))
            if not math.isfinite(row['loss']):
                problems.append(f"{mode}: loss {row['loss']}")
            if row['breaks']:
                problems.append(f"{mode}: {row['breaks']} graph breaks")
        if part == 'smoke':
            report_label_speeds(*labelling())
        check('cocomix (cached labels) FLOP/s / NTP FLOP/s',
              rows['cached']['flops'] / rows['ntp']['flops'], 0.9)
        ready = ', ready for the long run' if part == 'smoke' else ''
        print(f"{part}: " + (f'OK{ready}' if not problems else 'FAILED: ' + '; '.join(problems)))
    if world > 1:  # measure() freed DDP's objects: freed after the group, they can hang the exit
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if problems:
        raise SystemExit(1)


def bench_ntp():
    path = os.path.join(nanogpt, 'model.py')
    if not nanogpt or not os.path.exists(path):  # '' would find our own model.py
        raise UserError(f"no {path}: --parts=ntp needs --nanogpt=DIR, a karpathy/nanoGPT checkout")
    # nanoGPT's model from its globals (beside our model.py, not in its place), eager
    step = {'ours': train_step(gpt()), 'nanoGPT': train_step(gpt(lib=runpy.run_path(path)), compiled=False)}
    # each first in every other round: neither gains from the order
    times = [{k: timed(step[k]) for k in [*step][::-1 if r % 2 else 1]} for r in range(rounds)]
    ms = {k: statistics.median(t[k] for t in times) * 1e3 for k in step}
    print(f"ntp vs nanoGPT ({batch_size} x {block_size}, {n_layer} x {n_embd}, vocab {V}, {dtype}): "
          f"ours {ms['ours']:.1f} ms/iter, nanoGPT {ms['nanoGPT']:.1f} ms/iter (medians of {rounds} rounds)")
    check('our speed / nanoGPT', ms['nanoGPT'] / ms['ours'], 0.97)


def bench_labels():
    teacher, sae, idx = labelling()
    label = lambda: concept_labels(teacher, sae, idx, sae_layer, k_attr)
    with ctx:
        dt = timed(label, n=3)
    useful = label_flops_per_token(teacher.config, sae_layer, n_concepts, block_size) * idx.numel()
    flops = useful / dt
    ntp = gpt(teacher_layers, teacher_embd, teacher.config.n_head)  # the teacher's shape
    ntp_flops = ntp.flops_per_token(block_size) * batch_size * block_size / timed(train_step(ntp), n=3)
    print(f"labels (teacher {teacher_layers} x {teacher_embd}, SAE -> {n_concepts}, k {sae_k}): "
          f"{idx.numel() / dt:,.0f} tokens/s, {flops / 1e9:.1f} GFLOP/s; NTP step of the teacher's shape "
          f"{ntp_flops / 1e9:.1f} GFLOP/s")
    check('labelling FLOP/s / NTP FLOP/s', flops / ntp_flops, 0.8)
    # the LM head in chunks (forced; large label batches get it): the frozen head's weight gradient
    # is skipped; computing it, as a head with requires_grad would, shows what that saves
    rate = {}
    with ctx, mock.patch.object(M, 'chunked_head', lambda *args: True):
        for name in ('computed', 'skipped') * 2:  # alternating
            teacher.lm_head.weight.requires_grad_(name == 'computed')
            rate[name] = max(rate.get(name, 0), useful / timed(label, n=3) / 1e9)
    print(f"  labelling with a chunked head: {rate['computed']:.1f} GFLOP/s with the frozen head's weight "
          f"gradient computed, {rate['skipped']:.1f} skipped: {rate['skipped'] / rate['computed']:.2f}x")
    check('labelling tokens/s compiled / eager', report_label_speeds(teacher, sae, idx), 1.0)


def bench_heads():
    net = gpt(**COCOMIX).eval()  # no dropout: the runs differ by the heads and dtype alone
    x = torch.randint(0, vocab_size, (batch_size, block_size), device=device)
    labels = torch.randint(0, n_concepts, (batch_size, block_size, k_attr), device=device)

    def grads(chunked, low):
        net.zero_grad(set_to_none=True)
        with ctx if low else nullcontext(), mock.patch.object(M, 'chunked_head', lambda *args: chunked):
            _, loss, out = net(x, x, concept_labels=labels)
            (loss + 0.1 * out['concept']).backward()
        return torch.cat([p.grad.float().flatten() for p in net.parameters() if p.grad is not None])
    got = {'float32': grads(False, False), 'plain': grads(False, True), 'chunked': grads(True, True)}
    rel = lambda a, b: ((got[a] - got[b]).norm() / got[b].norm()).item()
    err = {k: rel(k, 'float32') for k in ('plain', 'chunked')}
    between = rel('chunked', 'plain')
    print(f"heads ({dtype} against float32, {batch_size} x {block_size}, V {V}, C {n_concepts}): "
          f"gradient relative error plain {err['plain']:.2e}, chunked {err['chunked']:.2e}; "
          f"chunked vs plain {between:.2e}")
    # chunking changes the order of sums, not the precision: no worse than the plain head's own
    bound = max(2 * err['plain'], 1e-4)
    ok = all(math.isfinite(e) for e in (*err.values(), between)) and err['chunked'] <= bound
    print("heads: " + ('OK' if ok else f"FAILED: chunked error {err['chunked']:.2e} above {bound:.2e}"))
    if not ok:
        raise SystemExit(1)


def bench_generate():
    a = torch.empty(2 ** 27 // 4, device=device)  # 128 MiB: the bandwidth of a read plus a write
    bandwidth = 2 * a.numel() * 4 / timed(lambda: a.clone(), n=5)
    prompt = torch.randint(0, vocab_size, (1, 16), device=device)
    new = gen_positions - 16
    print(f"generate (to {gen_positions} positions, batch 1, greedy, {dtype}; memory {bandwidth / 1e9:.1f} GB/s):")
    for name, concepts in (('ntp', {}), ('cocomix', COCOMIX)):
        model = gpt(T=gen_positions, **concepts).eval()
        with torch.no_grad(), ctx:
            rate = new / timed(lambda: model.generate(prompt, new, temperature=0), n=1, warmup=0)
        weight_bytes = sum(p.numel() * (2 if dtype != 'float32' else 4) for p in model.parameters())
        print(f"  {name:>8}: {rate:,.1f} tokens/s; reading the weights once per token allows "
              f"{bandwidth / weight_bytes:,.1f}: {rate * weight_bytes / bandwidth:.0%} of that bound")


def bench_sae():
    d, C, k = teacher_embd, n_concepts, sae_k
    g = torch.Generator().manual_seed(0)  # sparse sums of hidden atoms, noise, an offset
    atoms = torch.nn.functional.normalize(torch.randn(4 * d, d, generator=g), dim=1)
    offset = torch.randn(d, generator=g)

    def batch():
        codes = torch.zeros(sae_batch, 4 * d).scatter_(1, torch.randint(0, 4 * d, (sae_batch, 8), generator=g),
                                                        torch.rand(sae_batch, 8, generator=g))
        return (codes @ atoms + offset + 0.05 * torch.randn(sae_batch, d, generator=g)).to(device)
    data, held_out = [batch() for _ in range(max(1, sae_tokens // sae_batch))], batch()
    normed, mu, std = M.sae_norm(held_out)  # ours: the FVU of layer-normalised vectors (OpenAI's)
    fvus = lambda recon: (S.fvu(held_out, recon).item(), S.fvu(normed, (recon - mu) / (std + 1e-5)).item())
    lr = 2e-4 / math.sqrt(C / 2 ** 14)
    ours = S.TopKSAE(d, C, k).to(device)
    S.init_sae(ours, data[0])
    opt = torch.optim.Adam(ours.parameters(), lr=lr)
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError:
        raise UserError("--parts=sae compares with EleutherAI's sparsify: pip install eai-sparsify")
    theirs = SparseCoder(d, SparseCoderConfig(num_latents=C, k=k), device=device)
    theirs.b_dec.data = data[0].mean(0)  # as sparsify's trainer does on its first batch
    their_opt = torch.optim.Adam(theirs.parameters(), lr=lr)

    def theirs_step(x):  # sparsify's trainer: FVU, decoder-parallel gradient removed, unit decoder
        theirs(x).fvu.backward()
        theirs.remove_gradient_parallel_to_decoder_directions()
        their_opt.step()
        their_opt.zero_grad(set_to_none=True)
        theirs.set_decoder_norm_to_unit_norm()
    step = {'ours': lambda x: S.train_step(ours, opt, x, d // 2, 10 ** 9, 1 / 32, dtype), 'sparsify': theirs_step}
    with ctx:  # alternating, batch by batch: the same tokens in the same order
        seconds = [{k: timed(lambda: step[k](x), n=1, warmup=0) for k in step} for x in data]
    with torch.no_grad():
        results = {'ours': fvus(ours(held_out)), 'sparsify': fvus(theirs(held_out).sae_out)}
    rate = {k: (len(data) - 1) * sae_batch / sum(s[k] for s in seconds[1:]) for k in step}  # the first warms up
    print(f"sae ({d} -> {C}, k {k}, {len(data) * sae_batch:,} tokens, batch {sae_batch}, lr {lr:.2e}):")
    for name in rate:
        print(f"  {name:>8}: {rate[name]:,.0f} tokens/s, FVU on held-out vectors {results[name][0]:.4f} "
              f"(layer-normalised: {results[name][1]:.4f})")
    check('SAE training tokens/s ours / sparsify', rate['ours'] / rate['sparsify'], 1.0)
    check('FVU sparsify / ours (higher: ours reconstructs better)', results['sparsify'][0] / results['ours'][0], 1.0)


def bench_prepare():
    words = [''.join(random.Random(i).choices('abcdefghijklmnopqrstuvwxyz', k=1 + i % 9)) for i in range(5000)]
    rng = random.Random(seed)
    measure = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
               "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)")
    peaks = []
    with tempfile.TemporaryDirectory() as tmp:
        for mb in (prepare_mb, 10 * prepare_mb):
            with open(f'{tmp}/corpus.jsonl', 'w') as f:  # documents of 200 to 2,000 words
                while f.tell() < mb * 2 ** 20:
                    f.write(json.dumps({'text': ' '.join(rng.choices(words, k=rng.randint(200, 2000)))}) + '\n')
            command = [sys.executable, 'prepare.py', 'bench', f'--input={tmp}/corpus.jsonl', f'--out_dir={tmp}/out']
            t0 = time.perf_counter()
            peaks.append(int(subprocess.run([sys.executable, '-c', measure] + command, check=True,
                                            capture_output=True, text=True, cwd=REPO).stdout))
            seconds = time.perf_counter() - t0
            tokens = sum(json.load(open(f'{tmp}/out/meta.json'))[k] for k in ('train_tokens', 'val_tokens'))
            print(f"  prepare {mb} MB: {tokens:,} tokens, {tokens / seconds:,.0f} tokens/s, "
                  f"peak memory {peaks[-1] / 2 ** 20:,.0f} MB")
    print(f"  peak memory at 10x the text: {peaks[1] / peaks[0]:.2f}x (target <= 1.5x + 100 MB: "
          f"{'met' if peaks[1] <= 1.5 * peaks[0] + 100 * 2 ** 20 else 'MISSED'})")


if run_mode:  # one mode of --parts=train
    bare = 0 if cuda else getrusage(RUSAGE_SELF).ru_maxrss * 1024  # this process before any model
    row = measure(run_mode)
    print(json.dumps(dict(row, memory=row['memory'] - bare)))
else:
    run_part = dict(smoke=lambda: bench_modes('smoke'), train=lambda: bench_modes('train'),
                    ntp=bench_ntp, labels=bench_labels, generate=bench_generate, sae=bench_sae,
                    prepare=bench_prepare, heads=bench_heads)
    unknown = [p for p in parts.split(',') if p not in run_part]
    if unknown:  # before any part runs: a typo in the last must not cost the others
        raise UserError(f"unknown part '{unknown[0]}'; use some of {','.join(run_part)}")
    for part in parts.split(','):
        run_part[part]()
