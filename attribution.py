"""Concept labels (METHOD.md, section 2): active latent i of the teacher's SAE scores
a_i = c_i (g . W_dec[:, i]), g = dL/dh; a position's labels are its k_attr best. train.py labels
online; this labels a dataset once for --label_cache=True, under torchrun too (README.md).
"""
import glob
import json
import os
import time
from contextlib import suppress

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import DEVICE, UserError, atomic_path, configure, fingerprint
from common import load_teacher, setting_names, setup_distributed
from prepare import data_dir_of, data_fingerprint, load_tokens, read_meta, windows
from sae import check_layer, check_width, load_sae, teacher_residual

# -----------------------------------------------------------------------------
teacher: 'str' = 'gpt2'  # any spec common.load_model takes
sae: 'str' = 'openai:resid_post_mlp:5'  # any spec sae.load_sae takes
sae_layer: 'int >= 0' = 5
dataset: 'str' = 'openwebtext'
label_method: 'attribution|activation|attribution_preact|attribution_neg' = 'attribution'
k_attr: 'int >= 1' = 4
block_size: 'int >= 1' = 1024  # the labelled windows; train.py must use the same
batch_size: 'int >= 1' = 8  # windows per teacher pass
splits: 'train,val|val,train|train|val' = 'train,val'
device: 'device' = DEVICE  # labels are computed in float32 whatever the run's dtype
# -----------------------------------------------------------------------------
LABEL_METHODS = tuple(__annotations__['label_method'].split('|'))


def check_setup(teacher, sae, sae_layer, k_attr, method):
    if method not in LABEL_METHODS:
        raise UserError(f"unknown label_method '{method}'; use one of {', '.join(LABEL_METHODS)}")
    check_width(sae, teacher.config.n_embd)
    check_layer(teacher, sae_layer)
    if k_attr > sae.k and method != 'attribution_preact':
        raise UserError(f"k_attr={k_attr} is more than the SAE's {sae.k} active latents")


def concept_labels(teacher, sae, idx, sae_layer, k_attr=4, method='attribution',
                   return_scores=False):
    """idx (B, T) -> labels (B, T, k_attr), best first; -1 where fewer score above 0, and at the
    last position for the gradient methods (it predicts nothing)."""
    check_setup(teacher, sae, sae_layer, k_attr, method)
    # float32 as the authors; bfloat16 flips near-ties at the TopK and in the scores (RESULTS.md)
    with torch.autocast(idx.device.type, enabled=False), torch.no_grad():
        h = teacher_residual(teacher, idx, sae_layer)
        if method != 'activation':
            with torch.enable_grad():  # to h only: the teacher's weights get no gradient
                _, loss = teacher.head(teacher.run_blocks(h.requires_grad_(), sae_layer + 1),
                                       F.pad(idx[:, 1:], (0, 1), value=-1))
                grad = torch.autograd.grad(loss, h)[0]
        W = sae.decoder.weight.t()  # (C, d): row i is W_dec[:, i]
        if method == 'attribution_preact':  # Eq. 1 as the paper writes it: every latent scores
            indices = torch.arange(sae.n_latents, device=idx.device).expand(*idx.shape, -1)
            scores = sae.encode_pre(sae.preprocess(h)[0]) * (grad @ sae.decoder.weight)
        else:  # the k active latents. The exact dL/dc_i has a factor std > 0 too (the SAE's
            # de-normalisation): it cannot change their order.
            values, indices, _ = sae.encode(h)  # (B, T, k)
            scores = values if method == 'activation' else values * torch.stack(
                [(W[indices[..., j]] * grad).sum(-1) for j in range(sae.k)], -1)
            if method == 'attribution_neg':  # those whose removal would raise the loss most
                scores = -scores
        top = scores.float().topk(k_attr, dim=-1)
        labels = indices.gather(-1, top.indices).masked_fill(top.values <= 0, -1)
    if method != 'activation':
        labels[:, -1] = -1
    return (labels, top.values) if return_scores else labels


def load_concepts(teacher_spec, sae_spec, sae_layer, device, data_meta, data_dir, k_attr, method,
                  block_size, concept_topk=0):
    """A run's frozen teacher and SAE (None for KD), checked together -> (teacher, SAE, identity:
    the fingerprints and settings that checkpoints and caches record)."""
    sae, sae_meta = load_sae(sae_spec) if sae_spec else (None, {})
    if sae is not None:  # the SAE first: its own mismatches need no teacher
        layer = int(sae_spec.split(':')[2]) if sae_spec.startswith('openai:') else \
            sae_meta.get('layer', sae_layer)
        if layer != sae_layer:
            raise UserError(f"the SAE {sae_spec} reads layer {layer} of its teacher but this run "
                            f"has sae_layer={sae_layer}; use --sae_layer={layer} or another SAE")
        if concept_topk > sae.n_latents:
            raise UserError(f"concept_topk={concept_topk} is more than the SAE's {sae.n_latents} "
                            "concepts")
    teacher = load_teacher(teacher_spec, device, data_meta, data_dir)
    if sae is not None:
        check_setup(teacher, sae, sae_layer, k_attr, method)
    if block_size > teacher.config.block_size:
        raise UserError(f"block_size={block_size} is longer than the teacher's context "
                        f"({teacher.config.block_size}); use a shorter block_size")
    identity = dict(teacher_id=fingerprint(teacher))
    if sae is None:
        return teacher, None, identity
    trained_on = sae_meta.get('teacher_id')
    if trained_on not in (None, identity['teacher_id']):
        raise UserError(f"the SAE {sae_spec} was trained on another teacher ({trained_on}, not "
                        f"{identity['teacher_id']}); use that teacher or retrain the SAE")
    identity.update(n_concepts=sae.n_latents, sae_layer=sae_layer, sae_id=fingerprint(sae))
    return teacher, sae.to(device), identity


# -----------------------------------------------------------------------------
# The cache: labels_<split>.bin, (N_tokens, k_attr) concept ids + 1: 0 = no label, so a fresh
# sparse file is all "no label" (OpenWebText: 9B tokens x 4 x 2 bytes = 72 GB); its .json says what
# made it. Each process appends the (first, stop) windows it wrote to labels_<split>.bin.done
# (rank 0) or .done.<rank>; a window any file lists is done, so a run resumes on any batch size
# and process count.

def cache_paths(data_dir, split):
    return tuple(os.path.join(data_dir, f'labels_{split}.{ext}') for ext in ('bin', 'json'))


def cache_dtype(n_concepts):
    return np.dtype(np.uint16 if n_concepts < 2 ** 16 else np.uint32)


def describe(data_dir, split, identity, label_method, k_attr, block_size):
    return dict(data=data_fingerprint(os.path.join(data_dir, f'{split}.bin')), **identity,
                label_method=label_method, k_attr=k_attr, block_size=block_size)


def load_label_cache(data_dir, split, identity, label_method, k_attr, block_size):
    """A finished cache, for label_windows; one made otherwise is refused."""
    path, meta_path = cache_paths(data_dir, split)
    if not os.path.exists(meta_path):
        raise UserError(f"no label cache at {path}; run attribution.py with this run's config")
    meta = json.load(open(meta_path))
    for key, value in describe(data_dir, split, identity, label_method, k_attr, block_size).items():
        if meta.get(key) != value:
            raise UserError(f"the label cache {path} was made with {key}={meta.get(key)!r}, "
                            f"this run has {value!r}; run attribution.py or set label_cache=False")
    if not meta.get('complete'):
        raise UserError(f"the label cache {path} is unfinished; run attribution.py again")
    dtype, tokens = cache_dtype(meta['n_concepts']), len(load_tokens(data_dir, split))
    if not os.path.isfile(path) or os.path.getsize(path) != tokens * k_attr * dtype.itemsize:
        raise UserError(f"the label cache {path} is missing or cut short; run attribution.py again")
    return dict(path=path, dtype=dtype, k_attr=k_attr)


def label_windows(cache, starts, length):
    """(B, length, k_attr) labels of the windows at `starts`, -1 for none. A fresh memmap per
    call: one kept open grows the resident memory (prepare.load_tokens)."""
    labels = np.memmap(cache['path'], dtype=cache['dtype'], mode='r').reshape(-1, cache['k_attr'])
    return windows(labels, starts, length) - 1


def read_progress(path, n_windows):
    done = np.zeros(n_windows, dtype=bool)
    for name in glob.glob(glob.escape(path) + '.done*'):
        with suppress(FileNotFoundError), open(name, 'rb') as f:  # a finished writer removes it
            raw = f.read()
            for first, stop in np.frombuffer(raw[:len(raw) // 16 * 16], '<i8').reshape(-1, 2):
                done[first:stop] = True
    return done


def label_split(teacher, sae, data_dir, split, expected, device, batch_size, rank=0, world=1):
    """Label a split's windows not yet done; process `rank` takes every world-th batch."""
    block_size, k_attr = expected['block_size'], expected['k_attr']
    path, meta_path = cache_paths(data_dir, split)
    n_tokens = len(load_tokens(data_dir, split))
    n_windows, dt = n_tokens // block_size, cache_dtype(sae.n_latents)
    size = n_tokens * k_attr * dt.itemsize  # bytes
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
    differ = [k for k, v in expected.items() if meta.get(k) != v]
    # cut short, it lost windows listed as done: reset
    same = not differ and os.path.isfile(path) and os.path.getsize(path) == size
    barrier()  # all read it before rank 0 resets it
    if same and meta.get('complete'):
        return rank == 0 and print(f"{path}: already labelled")
    if differ and meta.get('complete') and not {'data', 'teacher_id', 'sae_id'} & set(differ):
        made = ', '.join(f"{k}={meta.get(k)!r}" for k in differ)  # a typo must not wipe them
        raise UserError(f"{meta_path} holds finished labels made with {made}; delete it to "
                        "relabel, or label with its settings")
    if rank == 0 and not same:  # a fresh, sparse cache: no rank waits on a fill
        remove_progress(path)
        with open(path, 'wb') as f:
            f.truncate(size)
        write_meta(meta_path, dict(expected, complete=False))
    barrier()
    done = read_progress(path, n_windows)
    barrier()  # every process has read the same progress before any adds to it
    edges = np.concatenate(([True], done, [True]))  # runs of windows to do: [first, stop)
    runs = zip(np.flatnonzero(edges[:-1] & ~edges[1:]), np.flatnonzero(~edges[:-1] & edges[1:]))
    batches = [(s, min(s + batch_size, stop)) for first, stop in runs
               for s in range(first, stop, batch_size)][rank::world]
    row = block_size * k_attr * dt.itemsize  # bytes per window
    t0, desc = time.time(), f'labelling {split}' + (f' (rank {rank})' if world > 1 else '')
    with (open(path, 'r+b', buffering=0) as out,
          open(path + '.done' + (f'.{rank}' if rank else ''), 'ab', buffering=0) as progress):
        for first, stop in tqdm(batches, desc=desc, position=rank, unit='batch'):
            starts = range(first * block_size, stop * block_size, block_size)
            idx = windows(load_tokens(data_dir, split), starts, block_size).to(device)
            ids = concept_labels(teacher, sae, idx, expected['sae_layer'], k_attr,
                                 expected['label_method']).cpu().numpy() + 1
            os.pwrite(out.fileno(), ids.astype(dt).tobytes(), int(first) * row)
            os.fsync(out.fileno())  # the labels on disk before the progress says so
            progress.write(np.array([first, stop], '<i8').tobytes())
            os.fsync(progress.fileno())
            done[first:stop] = True
    rate = sum(b - a for a, b in batches) * block_size / max(time.time() - t0, 1e-9)
    barrier()
    if rank == 0:
        missing = int((~(done | read_progress(path, n_windows))).sum())
        if missing:
            raise UserError(f"{path}: {missing} windows are missing; run again")
        write_meta(meta_path, dict(expected, complete=True))
        remove_progress(path)
        print(f"{path}: {n_windows * block_size:,} tokens labelled ({rate * world:,.0f} tokens/s, "
              f"{world} process{'es' if world > 1 else ''})")


def remove_progress(path):
    for name in glob.glob(glob.escape(path) + '.done*'):
        with suppress(FileNotFoundError):  # another writer of this cache may finish first
            os.remove(name)


def barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def write_meta(path, meta):
    with atomic_path(path) as tmp, open(tmp, 'w') as f:
        json.dump(meta, f, indent=1)


if __name__ == '__main__':
    configure(globals(), ignore=setting_names('train.py'))
    rank, world, device = setup_distributed(device)
    data_dir = data_dir_of(dataset)
    *models, identity = load_concepts(teacher, sae, sae_layer, device, read_meta(data_dir),
                                      data_dir, k_attr, label_method, block_size)
    for split in splits.split(','):
        expected = describe(data_dir, split, identity, label_method, k_attr, block_size)
        label_split(*models, data_dir, split, expected, device, batch_size, rank, world)
    if world > 1:
        torch.distributed.destroy_process_group()
