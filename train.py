"""
One training loop for every mode, on one CPU or GPU or many through torchrun.

    python train.py config/ntp_shakespeare.py --max_iters=100
    torchrun --standalone --nproc_per_node=8 train.py config/ntp_gpt2.py
    # two nodes, on each: torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 --master_addr=IP train.py ...

Settings are the globals below; config files and --key=value override them (common.configure), and an
unknown key is an error. gradient_accumulation_steps is the global number of micro-batches per step, so the
batch does not depend on the number of processes. Importing train.py gives its settings alone (attribution.py
reads train.py configs); the run is under `if __name__ == '__main__'`.
"""
import glob
import math
import os
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from common import UserError, autocast as autocast_context, check_tokenizers, configure, fingerprint, load_checkpoint
from common import load_model, load_teacher, peak_flops as datasheet_flops, save_checkpoint, setup_distributed
from model import GPT, GPTConfig, concept_accuracy, kd_loss
from prepare import data_dir_of, load_tokens, read_meta

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out'
eval_interval = 2000
log_interval = 1
eval_iters = 200  # batches per split (per process) in each evaluation
eval_only = False  # evaluate once and stop
always_save_checkpoint = True  # else save only when val loss improves
init_from = 'scratch'  # 'scratch', 'resume' (from out_dir), 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' or a folder
# 'ntp' next-token prediction; 'cocomix' plus concept prediction and mixing; the paper's baselines: 'kd' NTP
# plus distillation from the teacher, 'pause' a learned pause vector interleaved at insert_layer, 'kd_pause' both
mode = 'ntp'
# wandb logging (optional package, imported only when on)
wandb_log = False
wandb_project = 'cocomix'
wandb_run_name = 'run'
# data
dataset = 'shakespeare'  # a name under data/ or a folder written by prepare.py
gradient_accumulation_steps = 40  # micro-batches per optimizer step, over all processes together
batch_size = 12  # sequences per micro-batch
block_size = 1024
window_grid = False  # windows start on multiples of block_size, as a label cache needs: with it, NTP and
# CoCoMix runs of one seed train on the same windows in the same order (study.py)
# model
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0  # 0 for pretraining, 0.1+ for finetuning
bias = True  # biases in Linears and LayerNorms, as GPT-2
# CoCoMix (mode='cocomix'): concepts of a frozen teacher's SAE at sae_layer, predicted after insert_layer blocks
teacher = 'gpt2'  # 'gpt2*' or a train.py out_dir; also the KD teacher
sae = 'openai:resid_post_mlp:5'  # a file or openai:LOCATION:LAYER (sae.load_sae)
sae_layer = 5
k_attr = 4  # concept labels per position
label_method = 'attribution'  # or 'activation', 'attribution_preact', 'attribution_neg' (attribution.py)
label_cache = False  # read attribution.py's labels_<split>.bin instead of labelling each batch online
lam_concept = 0.1  # weight of the concept loss: loss = NTP + lam_concept * concept (Eq. 4)
concept_topk = 32
insert_layer = 3
mix = 'interleave'  # 'interleave' (the paper's), 'add', 'none' (predict only)
lam_kd = 0.1  # modes 'kd', 'kd_pause': loss = CE + lam_kd * KL(teacher || student), temperature 1
# AdamW
learning_rate = 6e-4
max_iters = 600000  # optimizer steps
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip the global gradient norm; 0 = off
# learning rate schedule: linear warmup, then cosine decay to min_lr
decay_lr = True
warmup_iters = 2000
lr_decay_iters = 600000  # ~ max_iters (Chinchilla)
min_lr = 6e-5  # ~ learning_rate / 10 (Chinchilla)
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'  # or 'float16'
compile = torch.cuda.is_available()  # torch.compile the model (slow to start on a CPU, but works)
seed = 1337
peak_flops = 0.0  # the device's peak FLOP/s for MFU; 0 = the datasheet's for known GPUs, else FLOP/s are shown
# -----------------------------------------------------------------------------

if __name__ == '__main__':
    config = configure(globals())
    MODES = ('ntp', 'cocomix', 'kd', 'pause', 'kd_pause')
    if mode not in MODES:
        raise UserError(f"unknown mode '{mode}'; use one of {', '.join(MODES)}")
    kd = mode in ('kd', 'kd_pause')
    if init_from not in ('scratch', 'resume') and not init_from.startswith('gpt2') and \
            not os.path.exists(os.path.join(init_from, 'config.json')):
        raise UserError(f"unknown init_from '{init_from}'; use scratch, resume, gpt2* or a folder of GPT-2 weights")
    if mode == 'cocomix' and mix not in ('interleave', 'add', 'none'):  # the pause baseline is a mode, not a mix
        raise UserError(f"unknown mix '{mix}' for mode='cocomix'; use interleave, add or none "
                        "(the pause-token baseline is --mode=pause)")
    if mode in ('cocomix', 'pause', 'kd_pause') and not 0 <= insert_layer <= n_layer:
        raise UserError(f"insert_layer={insert_layer} is outside the model's 0 .. {n_layer} blocks")

    # torchrun sets RANK, LOCAL_RANK and WORLD_SIZE
    rank, world_size, device = setup_distributed(device)
    ddp, master = 'RANK' in os.environ, rank == 0  # the master logs and writes checkpoints
    if gradient_accumulation_steps % world_size:
        raise UserError(f"gradient_accumulation_steps={gradient_accumulation_steps} is not a multiple "
                        f"of the {world_size} processes; make it one")
    accum_steps = gradient_accumulation_steps // world_size  # micro-batches of this process per step
    tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
    if master:
        print(f"tokens per iteration: {tokens_per_iter:,} "
              f"({gradient_accumulation_steps} x {batch_size} x {block_size})")
        os.makedirs(out_dir, exist_ok=True)
        for stale in glob.glob(os.path.join(out_dir, 'ckpt.pt.*.tmp')):  # half-written by a killed run: never valid
            os.remove(stale)
    device_type = 'cuda' if 'cuda' in device else 'cpu'
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    autocast = autocast_context(device, dtype)
    data_dir = data_dir_of(dataset)
    meta = read_meta(data_dir)

    # every random draw is a function of (seed, what is drawn, step, global micro-batch index) alone, so neither
    # resuming nor the number of processes changes any batch or any dropout mask
    DRAWS = {'train': 0, 'val': 1, 'eval_train': 2, 'dropout': 3}

    def draw_seed(kind, step, micro):
        return ((seed * 4 + DRAWS[kind]) * 1_000_000_007 + step) * 65_537 + micro

    # the teacher and the SAE: frozen, in eval mode, never wrapped in DDP nor saved (only their fingerprints)
    teacher_model = sae_model = labels = None
    identity = {}  # what the concepts come from; a resumed run must use the same (checked below)
    if mode in ('cocomix', 'kd', 'kd_pause'):
        teacher_model = load_teacher(teacher, device, meta, data_dir)
        if teacher_model.config.block_size < block_size:
            raise UserError(f"block_size={block_size} is longer than the teacher's context "
                            f"({teacher_model.config.block_size}); use --block_size={teacher_model.config.block_size}")
        identity['teacher_id'] = fingerprint(teacher_model)
    if mode == 'cocomix':
        from attribution import concept_labels, describe, labels_from_cache, load_concept_sae, load_label_cache
        sae_model, sae_id = load_concept_sae(sae, teacher_model, identity['teacher_id'], sae_layer, device)
        identity.update(n_concepts=sae_model.n_latents, sae_layer=sae_layer, sae_id=sae_id)
        if label_cache:
            labels = load_label_cache(data_dir, 'train', describe(data_dir, 'train', identity['teacher_id'],
                                                                  identity['sae_id'], sae_layer, label_method, k_attr,
                                                                  block_size, sae_model.n_latents))

    def get_batch(split, step, micro):
        """(x, y, concept labels or None) of batch_size windows. With a label cache (or window_grid), windows start
        on the block_size grid that attribution.py labelled."""
        data = load_tokens(data_dir, 'val' if split == 'val' else 'train')  # fresh memmap: flat resident memory
        if len(data) <= block_size:
            raise UserError(f"the {split} split of {data_dir} has {len(data)} tokens, fewer than "
                            f"block_size + 1 = {block_size + 1}; use more text or a smaller block_size")
        g = torch.Generator().manual_seed(draw_seed(split, step, micro))
        if labels is not None or window_grid:
            ix = (torch.randint((len(data) - 1) // block_size, (batch_size,), generator=g) * block_size).tolist()
        else:
            ix = torch.randint(len(data) - block_size, (batch_size,), generator=g).tolist()
        x = torch.stack([torch.from_numpy(data[i:i + block_size].astype('int64')) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype('int64')) for i in ix])
        if device_type == 'cuda':  # pinned memory lets the copy run asynchronously
            x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        else:
            x, y = x.to(device), y.to(device)
        c = None  # labels only for training batches: evaluation measures the plain next-token loss
        if split == 'train' and labels is not None:
            c = labels_from_cache(labels, ix, block_size, sae_model.n_latents).to(device)
        return x, y, c

    def teach(x):
        """The teacher's online work on a training batch: (concept labels or None, teacher logits or None)."""
        c = logits = None
        with autocast:
            if mode == 'cocomix' and labels is None:  # as the official code: teacher forward and backward each step
                c = concept_labels(teacher_model, sae_model, x, sae_layer, k_attr, label_method)
            if kd:
                with torch.no_grad():  # every position's logits, no loss
                    logits = teacher_model.head(teacher_model.run_blocks(teacher_model.embed(x)))[0]
        return c, logits

    # the student
    torch.manual_seed(seed)  # the same initial weights on every process and every run
    iter_num, best_val_loss, checkpoint, history = 0, float('inf'), None, []  # history: (step, train, val) losses
    saved_step = None  # the step of the checkpoint on disk, for the stop messages
    vocab_size = math.ceil(meta['vocab_size'] / 64) * 64  # padded to a multiple of 64: faster matmuls
    model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias,
                      vocab_size=vocab_size, dropout=dropout)
    if mode == 'cocomix':
        model_args.update(n_concepts=sae_model.n_latents, concept_topk=concept_topk, insert_layer=insert_layer, mix=mix)
    elif mode in ('pause', 'kd_pause'):
        model_args.update(insert_layer=insert_layer, pause=True)
    if kd:
        model_args['max_logits'] = 2 ** 62  # KD compares the full next-token distributions: never chunk the head
    if init_from == 'scratch':
        model = GPT(GPTConfig(**model_args))
    elif init_from == 'resume':
        checkpoint = load_checkpoint(out_dir, device)
        if checkpoint.get('mode', 'ntp') != mode:
            raise UserError(f"{out_dir}/ckpt.pt was trained with mode='{checkpoint.get('mode')}', "
                            f"this run has mode='{mode}'; set --mode={checkpoint.get('mode')} or use a new out_dir")
        for key, value in identity.items():  # the same teacher, SAE and layer as the run being continued
            if checkpoint.get('identity', {}).get(key, value) != value:
                what = {'teacher_id': 'teacher', 'sae_id': 'SAE', 'sae_layer': 'SAE layer', 'n_concepts': 'SAE width'}
                raise UserError(f"{out_dir}/ckpt.pt was trained with {key}={checkpoint['identity'][key]}, this run "
                                f"has {value}: a different {what[key]}; use that one or a new out_dir")
        if 'data_meta' in checkpoint:
            check_tokenizers(meta, f"the data in {data_dir}", checkpoint['data_meta'], f"{out_dir}/ckpt.pt")
        if checkpoint['model_args']['block_size'] < block_size:
            raise UserError(f"block_size={block_size} is longer than the checkpoint's "
                            f"{checkpoint['model_args']['block_size']}; use a block_size up to that")
        # the checkpoint's architecture; dropout and the head's memory rule stay this run's
        model_args.update({k: v for k, v in checkpoint['model_args'].items() if k not in ('dropout', 'max_logits')})
        model = GPT(GPTConfig(**model_args))
        model.load_state_dict(checkpoint['model'])
        iter_num, best_val_loss = checkpoint['iter_num'], checkpoint['best_val_loss']
        history, saved_step = checkpoint.get('history', []), checkpoint['iter_num']
    else:
        check_tokenizers(meta, f"the data in {data_dir}", {'tokenizer': 'gpt2'}, init_from)
        model = load_model(init_from, device, dropout)[0].train()  # OpenAI's weights, from the hub or a folder
        if model.config.block_size < block_size:
            raise UserError(f"block_size={block_size} is longer than {init_from}'s context ({model.config.block_size})")
        for k in ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size'):
            model_args[k] = getattr(model.config, k)
        model.config.max_logits = model_args.get('max_logits', model.config.max_logits)
    if meta['vocab_size'] > model_args['vocab_size']:
        raise UserError(f"{data_dir} has {meta['vocab_size']} token ids but the model only "
                        f"{model_args['vocab_size']}; prepare the data with the model's tokenizer")
    if block_size < model.config.block_size:
        model.crop_block_size(block_size)
        model_args['block_size'] = block_size
    model.to(device)
    if master:  # the paper counts CoCoMix's active parameters: concept_topk compression rows per token, not all C
        total, active = model.get_num_params(), model.get_num_params(active=True)
        print(f"parameters: {total / 1e6:.2f}M" + (f", {active / 1e6:.2f}M active" if active != total else ''))

    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
    optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint['optimizer'])
        scaler.load_state_dict(checkpoint['scaler'])
    checkpoint = None  # free the memory

    raw_model = model  # checkpoints hold the plain module's weights: no '_orig_mod.' or 'module.' prefixes
    if compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[int(os.environ['LOCAL_RANK'])] if device_type == 'cuda' else None)

    def all_mean(value):
        """The mean of a float over all processes."""
        t = torch.tensor(float(value), device=device)
        if ddp:
            torch.distributed.all_reduce(t)
            t /= world_size
        return t.item()

    @torch.no_grad()
    def estimate_loss():
        """Mean loss of eval_iters fixed batches per split and process, averaged over all processes."""
        out = {}
        model.eval()
        for split in ('eval_train', 'val'):
            losses = torch.zeros(eval_iters)
            for k in range(eval_iters):
                X, Y, _ = get_batch(split, k, rank)  # perplexity is always the plain next-token loss
                with autocast:
                    losses[k] = model(X, Y)[1].item()
            out[split.removeprefix('eval_')] = all_mean(losses.mean())
        model.train()
        return out

    def stop(message):
        """Stop every process after a blow-up, saying truthfully what is on disk."""
        if master:
            kept = f"the last checkpoint, step {saved_step}, in {out_dir} is intact" if saved_step is not None else \
                f"no checkpoint was written to {out_dir}"
            print(f"error: {message}; stopping: {kept}. Resume with a lower learning_rate or another dtype", flush=True)
        if ddp:
            torch.distributed.destroy_process_group()
        raise SystemExit(1)

    def get_lr(it):
        if it < warmup_iters:  # linear warmup
            return learning_rate * (it + 1) / (warmup_iters + 1)
        if it > lr_decay_iters:
            return min_lr
        decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
        coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # from 1 to 0
        return min_lr + coeff * (learning_rate - min_lr)

    if wandb_log and master:
        try:
            import wandb
        except ImportError:
            raise UserError("wandb_log=True needs the optional package wandb: pip install wandb")
        wandb.init(project=wandb_project, name=wandb_run_name, config=config)

    # the loop: evaluate (and checkpoint) every eval_interval steps and at the end, then step
    peak = peak_flops or datasheet_flops(device, dtype)
    flops_per_iter = raw_model.flops_per_token(block_size) * tokens_per_iter
    t_start, t0, tokens_seen, running_mfu, local_iter = time.time(), time.time(), 0, -1.0, 0
    while True:
        if iter_num % eval_interval == 0 or iter_num == max_iters or eval_only:
            losses = estimate_loss()
            if master:
                print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                if not history or history[-1][0] < iter_num:
                    history.append((iter_num, losses['train'], losses['val']))
                if wandb_log:
                    wandb.log({'iter': iter_num, 'train/loss': losses['train'], 'val/loss': losses['val'],
                               'lr': get_lr(iter_num) if decay_lr else learning_rate, 'mfu': running_mfu * 100})
            # every process holds the same averaged losses, so all take the same decision
            if not all(map(math.isfinite, losses.values())):  # never save a blown-up model over a good one
                stop(f"the evaluation at step {iter_num} is not finite (train {losses['train']}, val {losses['val']})")
            if iter_num > 0 and not eval_only and (losses['val'] < best_val_loss or always_save_checkpoint):
                best_val_loss = min(best_val_loss, losses['val'])
                if master:
                    save_checkpoint({'model': raw_model.state_dict(), 'optimizer': optimizer.state_dict(),
                                     'scaler': scaler.state_dict(), 'model_args': model_args, 'mode': mode,
                                     # the data position and every random draw are functions of (seed, iter_num)
                                     'iter_num': iter_num, 'seed': seed, 'best_val_loss': best_val_loss,
                                     'config': config, 'data_meta': meta, 'history': history,  # meta: tokenizer
                                     'identity': identity}, out_dir)  # teacher, SAE: a resume must use the same
                    print(f"saved checkpoint to {out_dir}/ckpt.pt")
                saved_step = iter_num
                if ddp:  # no process goes on (or exits and tears the group down) before the checkpoint is on disk
                    torch.distributed.barrier()
            t0 = time.time()  # time the training steps only
        if iter_num >= max_iters or eval_only:
            break

        lr = get_lr(iter_num) if decay_lr else learning_rate
        for param_group in optimizer.param_groups:
            param_group['lr'] = lr
        parts, teacher_time = {}, 0.0  # the step's loss terms (for the log) and the teacher's seconds
        for micro_step in range(accum_steps):
            micro = rank * accum_steps + micro_step  # the global micro-batch index: its data and dropout masks
            torch.manual_seed(draw_seed('dropout', iter_num, micro))
            X, Y, C = get_batch('train', iter_num, micro)
            if teacher_model is not None and C is None:
                t = time.time()
                C, teacher_logits = teach(X)
                if device_type == 'cuda':
                    torch.cuda.synchronize()
                teacher_time += time.time() - t
            if ddp:  # synchronise gradients only on the last micro-step
                model.require_backward_grad_sync = micro_step == accum_steps - 1
            with autocast:
                logits, loss, out = model(X, Y, concept_labels=C)
                terms = {'ntp': loss}
                if out.get('concept') is not None:  # paper Eq. 4: NTP + lam_concept * concept loss
                    terms.update(concept=out['concept'], concept_acc=concept_accuracy(out['concept_ids'], C))
                    loss = loss + lam_concept * out['concept']
                if kd:
                    terms['kd'] = kd_loss(logits, teacher_logits)
                    loss = loss + lam_kd * terms['kd']
            for k, v in dict(terms, loss=loss).items():  # each term's mean over the micro-batches
                parts[k] = parts.get(k, 0.0) + v.detach() / accum_steps
            scaler.scale(loss / accum_steps).backward()  # DDP averages over processes
        loss_value = all_mean(parts['loss'])  # one sync per step, so that a bad loss stops us at the step it happens
        if not math.isfinite(loss_value):  # before the weights are touched
            stop(f"loss is {loss_value} at step {iter_num}")
        if grad_clip != 0.0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        t1 = time.time()
        dt, t0 = t1 - t0, t1
        tokens_seen += tokens_per_iter
        if iter_num % log_interval == 0 and master:
            if local_iter >= 3:  # let the first steps (compilation, warm caches) pass before measuring MFU
                mfu = flops_per_iter / dt / (peak or 1)  # without a known peak: FLOP/s
                running_mfu = mfu if running_mfu == -1.0 else 0.9 * running_mfu + 0.1 * mfu
            # rank 0's terms: ntp (next-token), concept (its loss), concept_acc (labels among the kept concepts), kd
            shown = {k: v for k, v in parts.items() if k != 'loss'} if len(parts) > 2 else {}
            terms = ''.join(f", {k} {v:.2%}" if k == 'concept_acc' else f", {k} {v:.4f}" for k, v in shown.items())
            online = teacher_model is not None and labels is None
            share = f", teacher {teacher_time / dt:.0%} of the time" if online else ''
            speed = f", mfu {running_mfu:.1%}" if peak else f", {running_mfu / 1e9:.1f} GFLOP/s"
            print(f"iter {iter_num}: loss {loss_value:.4f}{terms}, lr {lr:.2e}{share}, time {dt * 1000:.1f}ms, "
                  f"{tokens_per_iter / dt:,.0f} tok/s" + (speed if running_mfu >= 0 else ''))
        iter_num += 1
        local_iter += 1

    if master:
        saved = f"checkpoint of step {saved_step} in {out_dir}" if saved_step is not None else 'no checkpoint written'
        print(f"done: {local_iter} steps, {tokens_seen:,} tokens in {time.time() - t_start:.1f}s, "
              f"best val loss {best_val_loss:.4f}, {saved}")
    if ddp:
        torch.distributed.destroy_process_group()
