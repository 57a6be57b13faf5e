"""One training loop for every mode, on one CPU or GPU or many through torchrun (README.md)."""
import gc
import glob
import math
import os
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from attribution import concept_labels, label_windows, load_concepts, load_label_cache
from common import DEVICE, DTYPE, UserError, autocast, check_tokenizers, configure, load_checkpoint
from common import load_model, peak_flops, pretrained_shape, save_checkpoint, setup_distributed
from model import GPT, GPTConfig, concept_accuracy, kd_loss
from prepare import data_dir_of, load_tokens, read_meta, windows

# -----------------------------------------------------------------------------
# I/O
out_dir: 'out' = 'out'
eval_interval: 'int >= 1' = 2000
log_interval: 'int >= 1' = 1
eval_iters: 'int >= 1' = 200  # batches per split and process in each evaluation
eval_only: 'bool' = False  # evaluate once and stop
always_save_checkpoint: 'bool' = True  # else save only when val loss improves
init_from: 'str' = 'scratch'  # 'scratch', 'resume' (from out_dir), 'gpt2*' or a GPT-2 folder
# the paper's baselines: kd (distillation), pause (a learned vector interleaved), kd_pause
mode: 'ntp|cocomix|kd|pause|kd_pause' = 'ntp'
# wandb logging
wandb_log: 'bool' = False
wandb_project: 'str' = 'cocomix'
wandb_run_name: 'str' = 'run'
# data
dataset: 'str' = 'shakespeare'  # a name under data/ or a folder written by prepare.py
gradient_accumulation_steps: 'int >= 1' = 40  # micro-batches per step, all processes together
batch_size: 'int >= 1' = 12  # sequences per micro-batch
block_size: 'int >= 1' = 1024
window_grid: 'bool' = False  # windows on the label cache's grid: NTP sees CoCoMix's windows
# model
n_layer: 'int >= 1' = 12
n_head: 'int >= 1' = 12
n_embd: 'int >= 1' = 768
dropout: '0 <= float < 1' = 0.0  # 0 for pretraining, 0.1+ for finetuning
bias: 'bool' = True  # biases in Linears and LayerNorms, as GPT-2
# CoCoMix: concepts of a frozen teacher's SAE at sae_layer, predicted after insert_layer blocks
teacher: 'str' = 'gpt2'  # 'gpt2*', a GPT-2 folder or a train.py out_dir; also the KD teacher
sae: 'str' = 'openai:resid_post_mlp:5'  # a file or openai:LOCATION:LAYER (sae.load_sae)
sae_layer: 'int >= 0' = 5
k_attr: 'int >= 1' = 4  # concept labels per position
label_method: 'attribution|activation|attribution_preact|attribution_neg' = 'attribution'
label_cache: 'bool' = False  # read attribution.py's labels_train.bin, not labelling each batch
lam_concept: 'float >= 0' = 0.1  # loss = NTP + lam_concept * concept (Eq. 4); 0: no teacher
n_concepts: 'int >= 0' = 0  # the SAE's width; give it with lam_concept=0 (then no SAE is read)
concept_topk: 'int >= 1' = 32
insert_layer: 'int >= 0' = 3
mix: 'interleave|add|none' = 'interleave'  # the paper's; 'none': predict only
lam_kd: 'float >= 0' = 0.1  # loss = CE + lam_kd * KL(teacher || student)
# AdamW
learning_rate: 'float >= 0' = 6e-4
max_iters: 'int >= 0' = 600000  # optimizer steps
weight_decay: 'float >= 0' = 1e-1
beta1: '0 <= float < 1' = 0.9
beta2: '0 <= float < 1' = 0.95
grad_clip: 'float >= 0' = 1.0  # clip the global gradient norm; 0 = off
# learning rate schedule: linear warmup, then cosine decay to min_lr
decay_lr: 'bool' = True
warmup_iters: 'int >= 0' = 2000
lr_decay_iters: 'int >= 1' = 600000  # ~ max_iters (Chinchilla)
min_lr: 'float >= 0' = 6e-5  # ~ learning_rate / 10 (Chinchilla)
# system
device: 'device' = DEVICE  # 'cpu', 'cuda', 'cuda:1', 'mps'
dtype: 'float32|bfloat16|float16' = DTYPE
compile: 'bool' = torch.cuda.is_available()  # torch.compile: slow to start on a CPU
seed: 'int >= 0' = 1337
device_peak_flops: 'float >= 0' = 0.0  # for MFU; 0: the datasheet's for known GPUs, or FLOP/s
# -----------------------------------------------------------------------------
given = set()  # the settings a config file or an override set
config = configure(globals(), given=given)

# settings that contradict each other stop the run before any work
cocomix, kd, pause = mode == 'cocomix', 'kd' in mode, 'pause' in mode  # kd_pause: both
for key, off in (('mix', 'interleave'), ('label_cache', False)):
    if config[key] != off and not cocomix:
        raise UserError(f"{key}={config[key]!r} applies to mode=cocomix only (this run: {mode})")
if cocomix and mix == 'none' and lam_concept == 0:
    raise UserError("lam_concept=0.0 with mix=none leaves the concept head untrained and unused")
if n_embd % n_head:
    raise UserError(f"n_embd={n_embd} is no multiple of n_head={n_head}; change either")
if decay_lr and lr_decay_iters <= warmup_iters:
    raise UserError(f"lr_decay_iters={lr_decay_iters} must be above warmup_iters={warmup_iters}")
supervised = cocomix and lam_concept > 0  # concept labels needed: a teacher and its SAE
if cocomix and not supervised and not n_concepts:
    raise UserError("lam_concept=0 has no SAE to size the concept head: give --n_concepts")
if init_from not in ('scratch', 'resume') and not init_from.startswith('gpt2') and \
        not os.path.exists(os.path.join(init_from, 'config.json')):
    raise UserError(f"unknown init_from '{init_from}'; use scratch, resume, gpt2* or a folder")
if init_from != 'resume' and not eval_only and os.path.exists(os.path.join(out_dir, 'ckpt.pt')):
    raise UserError(f"{out_dir} holds a checkpoint; pass --init_from=resume or another out_dir")

rank, world_size, device = setup_distributed(device)
ddp, master = 'RANK' in os.environ, rank == 0  # the master logs and saves checkpoints
if gradient_accumulation_steps % world_size:
    raise UserError(f"gradient_accumulation_steps={gradient_accumulation_steps} is no multiple of "
                    f"the {world_size} processes")
accum_steps = gradient_accumulation_steps // world_size  # this process's micro-batches per step
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
device_type = 'cuda' if 'cuda' in device else 'cpu'
sync = torch.cuda.synchronize if device_type == 'cuda' else torch.cpu.synchronize  # tests count it
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
ctx = autocast(device, dtype)
data_dir = data_dir_of(dataset)
meta = read_meta(data_dir)
for split in ('train', 'val'):  # refused before any model loads
    n = len(load_tokens(data_dir, split))
    if n <= block_size:
        raise UserError(f"the {split} split of {data_dir} has {n} tokens, fewer than "
                        f"block_size + 1 = {block_size + 1}; use more text or a smaller block_size")

# the student's shape: this run's settings, or what the checkpoint or GPT-2 weights it continues fix
model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias,
                  vocab_size=math.ceil(meta['vocab_size'] / 64) * 64,  # a multiple of 64: fast
                  dropout=dropout)
if cocomix:
    model_args.update(concept_topk=concept_topk, insert_layer=insert_layer, mix=mix,
                      n_concepts=n_concepts)
if pause:
    model_args.update(insert_layer=insert_layer, pause=True)
fixed, source, checkpoint = {}, None, None
if init_from == 'resume':
    source, checkpoint = f"{out_dir}/ckpt.pt", load_checkpoint(out_dir, device)
    if checkpoint['mode'] != mode:
        raise UserError(f"{source} was trained with mode='{checkpoint['mode']}', this run has "
                        f"mode='{mode}'; set --mode={checkpoint['mode']} or use a new out_dir")
    if checkpoint['iter_num'] > max_iters and not eval_only:
        raise UserError(f"{source} is at step {checkpoint['iter_num']}, past max_iters="
                        f"{max_iters}; raise it")
    check_tokenizers(meta, f"the data in {data_dir}", checkpoint['data_meta'], source)
    fixed = checkpoint['model_args']
elif init_from != 'scratch':
    check_tokenizers(meta, f"the data in {data_dir}", {'tokenizer': 'gpt2'}, init_from)
    fixed, source = pretrained_shape(init_from), init_from
ARCH = ('n_layer', 'n_head', 'n_embd', 'bias', 'concept_topk', 'insert_layer', 'mix')
asked = [k for k in ARCH if k in given and k in fixed and fixed[k] != config[k]]
if asked:  # refuse rather than train something else
    mine, theirs = (', '.join(f"{k}={args[k]!r}" for k in asked) for args in (config, fixed))
    raise UserError(f"this run asks for {mine} but {source} has {theirs}; leave those settings "
                    "out or start a new out_dir")
if fixed.get('block_size', block_size) < block_size or \
        init_from == 'resume' and fixed['block_size'] != block_size:  # the optimizer's state too
    fix = f"--block_size={fixed['block_size']}" + ('' if init_from == 'resume' else ' or less')
    raise UserError(f"block_size={block_size} does not fit {source}'s {fixed['block_size']}; "
                    f"set {fix}")
model_args.update({k: v for k, v in fixed.items() if k in ARCH + ('vocab_size', 'pause')})
config.update({k: v for k, v in model_args.items() if k in config})  # record what ran
globals().update(config)
if (cocomix or pause) and insert_layer > n_layer:
    raise UserError(f"insert_layer={insert_layer} is outside the student's 0 .. {n_layer} blocks")

# the teacher and the SAE: frozen, never wrapped in DDP nor saved (only their fingerprints)
teacher_model, sae_model, identity, cache = None, None, {}, None
if supervised or kd:
    teacher_model, sae_model, identity = load_concepts(
        teacher, sae if supervised else None, sae_layer, device, meta, data_dir, k_attr,
        label_method, block_size, concept_topk if supervised else 0)
if checkpoint is not None:  # a resume needs the same teacher, SAE and layer
    for key, value in identity.items():
        if checkpoint['identity'].get(key, value) != value:
            raise UserError(f"{source} was trained with {key}={checkpoint['identity'][key]}, this "
                            f"run has {value}; use the same teacher and SAE, or a new out_dir")
if supervised:
    if n_concepts and n_concepts != sae_model.n_latents:
        raise UserError(f"n_concepts={n_concepts} but the SAE {sae} has {sae_model.n_latents} "
                        "latents; leave n_concepts out")
    model_args['n_concepts'] = sae_model.n_latents
    if label_cache:
        cache = load_label_cache(data_dir, 'train', identity, label_method, k_attr, block_size)

# the student
torch.manual_seed(seed)  # the same initial weights on every process
if init_from in ('scratch', 'resume'):
    model = GPT(GPTConfig(**model_args))
else:  # OpenAI's weights; the CoCoMix or pause parts on top start freshly initialised
    extra = {k: v for k, v in model_args.items() if k not in {*fixed, 'vocab_size', 'dropout'}}
    model = load_model(init_from, 'cpu', dropout, **extra)[0].train()
    model_args.update(vocab_size=model.config.vocab_size)
if block_size < model.config.block_size:
    model.config.block_size = block_size
    model.transformer.wpe.weight = torch.nn.Parameter(model.transformer.wpe.weight[:block_size])
model.to(device)
if master:
    print(f"tokens per iteration: {tokens_per_iter:,} "
          f"({gradient_accumulation_steps} x {batch_size} x {block_size})")
    total, active = model.get_num_params(), model.get_num_params(active=True)
    print(f"parameters: {total / 1e6:.2f}M, {active / 1e6:.2f}M active")
    os.makedirs(out_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(out_dir, 'ckpt.pt.*.tmp')):  # left by a killed run
        os.remove(stale)

scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
iter_num, best_val_loss, history, saved_step = 0, float('inf'), [], None  # (step, train, val)
if checkpoint is not None:
    model.load_state_dict(checkpoint['model'])
    optimizer.load_state_dict(checkpoint['optimizer'])
    if checkpoint['scaler'] and scaler.is_enabled():  # {}: saved by a bf16 or fp32 run
        scaler.load_state_dict(checkpoint['scaler'])
    iter_num = saved_step = checkpoint['iter_num']
    best_val_loss, history = checkpoint['best_val_loss'], checkpoint['history']
checkpoint = None  # free the memory

raw_model = model  # checkpoints hold the unwrapped module's weights
if compile:
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[torch.device(device).index] if device_type == 'cuda' else None)

# every random draw is a function of (seed, kind, step, global micro-batch) alone: no RNG state to
# checkpoint, and neither resuming nor the number of processes changes a batch or a dropout mask
DRAWS = {'train': 0, 'val': 1, 'eval_train': 2, 'dropout': 3}


def draw_seed(kind, step, micro):
    return (((seed * 4 + DRAWS[kind]) * 1_000_000_007 + step) * 65_537 + micro) % 2 ** 63


def get_batch(split, step, micro):
    """(x, y, concept labels or None); windows on attribution.py's grid with a label cache."""
    data = load_tokens(data_dir, split.removeprefix('eval_'))  # a fresh memmap per batch
    g = torch.Generator().manual_seed(draw_seed(split, step, micro))
    if label_cache or window_grid:
        ix = torch.randint((len(data) - 1) // block_size, (batch_size,), generator=g) * block_size
    else:
        ix = torch.randint(len(data) - block_size, (batch_size,), generator=g)
    xy = windows(data, ix.tolist(), block_size + 1)
    if device_type == 'cuda':  # pinned memory lets the copy run asynchronously
        xy = xy.pin_memory().to(device, non_blocking=True)
    x, y = xy[:, :-1].to(device), xy[:, 1:].to(device)
    if split != 'train' or cache is None:  # evaluation measures the plain next-token loss
        return x, y, None
    return x, y, label_windows(cache, ix.tolist(), block_size).to(device)


def teach(x):
    """The teacher's online work on a training batch: (concept labels, logits), each or None."""
    labels = logits = None
    with ctx:
        if supervised:  # online; attribution: a forward and backward
            labels = concept_labels(teacher_model, sae_model, x, sae_layer, k_attr, label_method)
        if kd:
            with torch.no_grad():
                logits = teacher_model.head(teacher_model.run_blocks(teacher_model.embed(x)))[0]
    return labels, logits


def all_mean(value):
    t = torch.tensor(float(value), device=device)
    if ddp:
        torch.distributed.all_reduce(t)
        t /= world_size
    return t.item()


@torch.no_grad()
def estimate_loss():
    """The next-token loss of eval_iters fixed batches per split and process, over all processes."""
    out = {}
    model.eval()
    for split in ('eval_train', 'val'):
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            X, Y, _ = get_batch(split, k, rank)
            with ctx:
                losses[k] = model(X, Y)[1].item()
        out[split.removeprefix('eval_')] = all_mean(losses.mean())
    model.train()
    return out


def get_lr(it):
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # from 1 to 0
    return min_lr + coeff * (learning_rate - min_lr)


def stop(message):
    if master:
        kept = f"the last checkpoint, step {saved_step}, in {out_dir} is intact" \
            if saved_step is not None else f"no checkpoint was written to {out_dir}"
        print(f"error: {message}; stopping: {kept}. Resume with a lower learning_rate or another "
              "dtype", flush=True)
    leave_group()
    raise SystemExit(1)


def leave_group():
    """End DDP. Its reducer must be freed while the process group lives: freed after it, at
    exit, its worker thread can abort or hang the process."""
    global model
    if ddp:
        model = None
        gc.collect()
        torch.distributed.destroy_process_group()


if wandb_log and master:
    try:
        import wandb
    except ImportError:
        raise UserError("wandb_log=True needs the optional package wandb: pip install wandb")
    wandb.init(project=wandb_project, name=wandb_run_name, config=config)

peak = device_peak_flops or peak_flops(device, dtype)  # one device's; None: FLOP/s, not MFU
flops_per_iter = raw_model.flops_per_token(block_size) * tokens_per_iter / world_size  # this one's
online = teacher_model is not None and cache is None  # the teacher works on every batch
if compile and online:  # the teacher's labelling: most of an online step at the paper's sizes
    teach = torch.compile(teach)
    if master:
        print("compiling the teacher's online work too")
t_start, t0, running_flops, local_iter = time.time(), time.time(), -1.0, 0
while True:
    lr = get_lr(iter_num) if decay_lr else learning_rate
    if iter_num % eval_interval == 0 or iter_num == max_iters or eval_only:
        losses = estimate_loss()
        if master:
            train_loss, val_loss = losses['train'], losses['val']
            print(f"step {iter_num}: train loss {train_loss:.4f}, val loss {val_loss:.4f}")
            if not history or history[-1][0] < iter_num:
                history.append((iter_num, train_loss, val_loss))
            if wandb_log:
                speed = {'mfu': running_flops / peak} if peak else {'flops': running_flops}
                wandb.log({'iter': iter_num, 'train/loss': train_loss, 'val/loss': val_loss,
                           'lr': lr, **speed})
        # every process holds the same averaged losses, so all take the same decision
        if not all(map(math.isfinite, losses.values())):
            stop(f"the evaluation at step {iter_num} is not finite ({losses})")
        better = losses['val'] < best_val_loss or always_save_checkpoint
        if iter_num > 0 and not eval_only and better:
            best_val_loss = min(best_val_loss, losses['val'])
            if master:
                save_checkpoint(dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(),
                                     scaler=scaler.state_dict(), model_args=model_args, mode=mode,
                                     iter_num=iter_num, seed=seed, best_val_loss=best_val_loss,
                                     config=config, data_meta=meta, history=history,
                                     identity=identity), out_dir)
                print(f"saved checkpoint to {out_dir}/ckpt.pt")
            saved_step = iter_num
            if ddp:  # no process tears the group down before the checkpoint is on disk
                torch.distributed.barrier()
        t0 = time.time()  # time the training steps only
    if iter_num >= max_iters or eval_only:
        break

    # one optimizer step over accum_steps micro-batches
    for group in optimizer.param_groups:
        group['lr'] = lr
    parts, teacher_time = {}, 0.0  # the step's mean loss terms and the teacher's seconds
    for micro_step in range(accum_steps):
        micro = rank * accum_steps + micro_step  # the global micro-batch: its data and dropout
        torch.manual_seed(draw_seed('dropout', iter_num, micro))
        X, Y, labels = get_batch('train', iter_num, micro)
        if online:  # timed on logging steps only: each sync stalls the GPU's queue
            timing = iter_num % log_interval == 0
            if timing:
                sync()
            t = time.time()
            labels, teacher_logits = teach(X)
            if timing:
                sync()
                teacher_time += time.time() - t
        if ddp:
            model.require_backward_grad_sync = micro_step == accum_steps - 1
        with ctx:
            logits, loss, record = model(X, Y, concept_labels=labels, logits=kd)
            terms = {'ntp': loss}
            if supervised:
                terms.update(concept=record['concept'],
                             concept_acc=concept_accuracy(record['concept_ids'], labels))
                loss = loss + lam_concept * record['concept']
            if kd:
                terms['kd'] = kd_loss(logits, teacher_logits)
                loss = loss + lam_kd * terms['kd']
        for k, v in dict(terms, loss=loss).items():
            parts[k] = parts.get(k, 0.0) + v.detach() / accum_steps
        scaler.scale(loss / accum_steps).backward()  # DDP averages over processes
    loss_value = all_mean(parts['loss'])  # one sync per step: a bad loss stops it before the update
    if not math.isfinite(loss_value):
        stop(f"loss is {loss_value} at step {iter_num}")
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)

    t1 = time.time()
    dt, t0 = t1 - t0, t1
    if iter_num % log_interval == 0 and master:
        if local_iter >= 3:  # let compilation and warm-up pass
            flops = flops_per_iter / dt
            running_flops = flops if running_flops < 0 else 0.9 * running_flops + 0.1 * flops
        # this process's terms where there are several: ntp, concept, concept_acc, kd
        terms = ''.join(f", {k} {v:.2%}" if k == 'concept_acc' else f", {k} {v:.4f}"
                        for k, v in parts.items() if k != 'loss' and len(parts) > 2)
        share = f", teacher {teacher_time / dt:.0%} of the time" if online else ''
        speed = '' if running_flops < 0 else f", mfu {running_flops / peak:.1%}" if peak else \
            f", {running_flops / 1e9:.1f} GFLOP/s per process"
        print(f"iter {iter_num}: loss {loss_value:.4f}{terms}, lr {lr:.2e}{share}, "
              f"time {dt * 1000:.1f}ms, {tokens_per_iter / dt:,.0f} tok/s{speed}")
    iter_num += 1
    local_iter += 1

if master:
    saved = f"checkpoint of step {saved_step} in {out_dir}" if saved_step is not None else \
        'no checkpoint written'
    print(f"done: {local_iter} steps, {local_iter * tokens_per_iter:,} tokens in "
          f"{time.time() - t_start:.1f}s, best val loss {best_val_loss:.4f}, {saved}")
leave_group()
