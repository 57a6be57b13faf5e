"""
Concept labels for CoCoMix: which SAE latents of the teacher matter for its next-token loss (METHOD.md,
section 2). Online, train.py calls concept_labels() on each batch; offline, this script
labels a prepared dataset once, in fixed windows of block_size tokens:

    python attribution.py config/cocomix_shakespeare.py      # writes data/NAME/labels_{train,val}.bin + .json
    torchrun --standalone --nproc_per_node=8 attribution.py config/cocomix_gpt2.py   # on 8 GPUs of one machine
"""
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import UserError, atomic_path, autocast, configure, fingerprint, load_teacher, settings, setup_distributed
from prepare import data_dir_of, load_tokens, read_meta
from sae import load_sae, teacher_residual

METHODS = ('attribution', 'activation', 'attribution_preact', 'attribution_neg')


def concept_labels(teacher, sae, idx, sae_layer, k_attr=4, method='attribution', return_scores=False):
    """idx (B, T) token ids -> labels (B, T, k_attr): the latents with the largest positive scores, -1 where
    fewer than k_attr latents score above 0, and at each sequence's last position for the gradient methods
    (it predicts nothing, so its gradient is exactly zero). The teacher's weights get no gradient."""
    if method not in METHODS:
        raise UserError(f"unknown label_method '{method}'; use one of {', '.join(METHODS)}")
    if sae.n_inputs != teacher.config.n_embd:
        raise UserError(f"the SAE reads {sae.n_inputs}-wide vectors but the teacher is "
                         f"{teacher.config.n_embd} wide; use an SAE trained on this teacher")
    if k_attr > sae.k and method != 'attribution_preact':
        raise UserError(f"k_attr={k_attr} is more than the SAE's {sae.k} active latents")
    with torch.no_grad():
        h = teacher_residual(teacher, idx, sae_layer)
    if method == 'activation':
        grad = None
    else:  # g = dL/dh, L = the teacher's mean next-token loss; backward stops at h, no weight gradient
        h.requires_grad_(True)
        with torch.enable_grad():
            targets = F.pad(idx[:, 1:], (0, 1), value=-1)
            _, loss = teacher.head(teacher.run_blocks(h, start=sae_layer + 1), targets)
            grad = torch.autograd.grad(loss, h)[0]
        h = h.detach()
    with torch.no_grad():
        values, indices, info = sae.encode(h)  # (B, T, k) active latents
        W = sae.decoder.weight.t()  # (C, d): row i is latent i's decoder direction
        if method == 'attribution_preact':  # Eq. 1: every latent's pre-activation, a dense (B, T, C) product
            indices = torch.arange(sae.n_latents, device=idx.device).expand(*idx.shape, -1)
            scores = sae.encode_pre(sae.preprocess(h)[0]) * (grad @ W.t())
        elif method == 'activation':
            scores = values
        else:  # a_i = c_i * (g . W_dec[:, i]) over the k active latents only: k gathers of (B, T, d), never (d x C).
            # (The exact dL/dc_i also carries the position's std > 0 from the SAE's de-normalisation; it cannot
            # change the ranking within a position, so it is left out.)
            scores = values * torch.stack([(W[indices[..., j]] * grad).sum(-1) for j in range(sae.k)], -1)
            if method == 'attribution_neg':  # the concepts whose removal would raise the loss most
                scores = -scores
        top = scores.float().topk(k_attr, dim=-1)
        labels = indices.gather(-1, top.indices).masked_fill(top.values <= 0, -1)
        if grad is not None:
            labels[:, -1] = -1
    return (labels, top.values) if return_scores else labels


# -----------------------------------------------------------------------------
# The offline cache: labels_<split>.bin, (N_tokens, k_attr) ids in fixed windows, the "no label" id = the
# dtype's maximum, and labels_<split>.json describing exactly what was labelled.

def cache_paths(data_dir, split):
    return os.path.join(data_dir, f'labels_{split}.bin'), os.path.join(data_dir, f'labels_{split}.json')


def cache_dtype(n_concepts):
    return np.uint16 if n_concepts < 2 ** 16 else np.uint32  # the top id is the "no label" marker


def describe(data_dir, split, teacher_id, sae_id, sae_layer, label_method, k_attr, block_size, n_concepts):
    """What a cache must match to be used: the data file, the teacher's and the SAE's weights (their fingerprints,
    so a file retrained at the same path is noticed) and every setting that changes the labels."""
    data_file = os.path.join(data_dir, f'{split}.bin')
    return dict(data_file=os.path.abspath(data_file), data_bytes=os.path.getsize(data_file), teacher_id=teacher_id,
                sae_id=sae_id, sae_layer=sae_layer, label_method=label_method, k_attr=k_attr, block_size=block_size,
                n_concepts=n_concepts)


def load_concept_sae(spec, teacher, teacher_id, sae_layer, device):
    """A run's SAE (any load_sae spec) on the device, with its fingerprint. Refused when it reads another width,
    or was trained on another layer or another teacher (its file records both; OpenAI's name their layer)."""
    sae, meta = load_sae(spec, teacher.config.n_embd)
    layer = int(spec.split(':')[2]) if spec.startswith('openai:') else meta.get('layer', sae_layer)
    if layer != sae_layer:
        raise UserError(f"the SAE {spec} reads layer {layer} of its teacher but this run has sae_layer={sae_layer}; "
                        f"set --sae_layer={layer} or use an SAE trained on layer {sae_layer}")
    if meta.get('teacher_id', teacher_id) != teacher_id:
        raise UserError(f"the SAE {spec} was trained on another teacher (weights {meta['teacher_id']}, this run's "
                        f"teacher has {teacher_id}); use the teacher it was trained on or retrain the SAE")
    return sae.to(device), fingerprint(sae)


def load_label_cache(data_dir, split, expected):
    """The labels of a finished cache as a memmap (N_tokens, k_attr); a cache made differently is refused."""
    path, meta_path = cache_paths(data_dir, split)
    if not os.path.exists(meta_path):
        raise UserError(f"no label cache at {path}; run: python attribution.py with this run's config")
    with open(meta_path) as f:
        meta = json.load(f)
    for key, value in expected.items():
        if meta.get(key) != value:
            raise UserError(f"the label cache {path} was made with {key}={meta.get(key)!r}, this run has "
                             f"{value!r}; relabel with attribution.py or set label_cache=False for online labels")
    if not meta.get('complete'):
        raise UserError(f"the label cache {path} is unfinished; run attribution.py again to complete it")
    labels = np.memmap(path, dtype=cache_dtype(meta['n_concepts']), mode='r').reshape(-1, meta['k_attr'])
    return labels


def labels_from_cache(cache, starts, block_size, n_concepts):
    """(B, block_size, k_attr) long labels of the windows starting at `starts`, the marker turned into -1."""
    out = torch.from_numpy(np.stack([cache[s:s + block_size] for s in starts]).astype(np.int64))
    return out.masked_fill(out == np.iinfo(cache_dtype(n_concepts)).max, -1)


def label_split(teacher, sae, data_dir, split, expected, device, dtype, batch_size, rank=0, world_size=1):
    """Label one split of a prepared dataset in windows of expected['block_size'] tokens, batch_size windows per
    teacher pass; process `rank` of `world_size` takes every world_size-th batch. A byte per batch in
    labels_<split>.bin.done records what is written, so a run stopped at any point resumes, with any number of
    processes."""
    block_size, k_attr = expected['block_size'], expected['k_attr']
    path, meta_path = cache_paths(data_dir, split)
    n_tokens = len(load_tokens(data_dir, split))
    n_windows, dt = n_tokens // block_size, cache_dtype(sae.n_latents)
    n_batches = -(-n_windows // batch_size)
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
    same = all(meta.get(k) == v for k, v in expected.items()) and os.path.exists(path)
    if same and meta.get('complete'):
        return rank == 0 and print(f"{path}: already labelled")
    if rank == 0 and not (same and os.path.exists(path + '.done')):  # a fresh cache
        labels = np.memmap(path, dtype=dt, mode='w+', shape=(n_tokens, k_attr))
        labels[:] = np.iinfo(dt).max  # tokens past the last whole window keep "no label"
        labels.flush()
        np.zeros(n_batches, dtype=np.uint8).tofile(path + '.done')
        write_meta(meta_path, dict(expected, complete=False))
    barrier()
    labels = np.memmap(path, dtype=dt, mode='r+', shape=(n_tokens, k_attr))
    done = np.memmap(path + '.done', dtype=np.uint8, mode='r+')
    todo = [b for b in range(rank, n_batches, world_size) if not done[b]]
    t0 = time.time()
    for b in tqdm(todo, desc=f'labelling {split}' + (f' (rank {rank})' if world_size > 1 else ''), position=rank,
                  unit='batch'):
        data = load_tokens(data_dir, split)
        w, stop = b * batch_size, min((b + 1) * batch_size, n_windows)
        idx = torch.from_numpy(data[w * block_size:stop * block_size].astype(np.int64)).view(-1, block_size)
        with autocast(device, dtype):
            out = concept_labels(teacher, sae, idx.to(device), expected['sae_layer'], k_attr, expected['label_method'])
        out = out.reshape(-1, k_attr).cpu().numpy()
        labels[w * block_size:stop * block_size] = np.where(out < 0, np.iinfo(dt).max, out).astype(dt)
        labels.flush()
        done[b] = 1  # only once its labels are on disk
        done.flush()
    n_done = sum(min((b + 1) * batch_size, n_windows) - b * batch_size for b in todo) * block_size
    rate = n_done / max(time.time() - t0, 1e-9)
    barrier()
    if rank == 0:
        if not done.all():
            raise UserError(f"{path}: {int((done == 0).sum())} batches are missing; run attribution.py again")
        write_meta(meta_path, dict(expected, complete=True))
        os.remove(path + '.done')
        print(f"{path}: {n_windows * block_size:,} tokens labelled ({rate * world_size:,.0f} tokens/s over "
              f"{world_size} process{'es' if world_size > 1 else ''})")


def barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def write_meta(path, meta):
    with atomic_path(path) as tmp, open(tmp, 'w') as f:
        json.dump(meta, f, indent=1)


if __name__ == '__main__':
    # -----------------------------------------------------------------------------
    # a train.py config works as it is: its other settings are accepted and ignored
    teacher = 'gpt2'  # 'gpt2*' or a train.py out_dir
    sae = 'openai:resid_post_mlp:5'  # any spec load_sae takes
    sae_layer = 5
    dataset = 'openwebtext'
    label_method = 'attribution'
    k_attr = 4
    block_size = 1024  # the labelled windows; train.py must use the same
    batch_size = 8  # windows per teacher pass
    splits = 'train,val'
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'
    # -----------------------------------------------------------------------------
    import train
    configure(globals(), ignore=settings(vars(train)))
    rank, world_size, device = setup_distributed(device)  # torchrun: each process labels its share of batches
    data_dir = data_dir_of(dataset)
    teacher_model = load_teacher(teacher, device, read_meta(data_dir), data_dir)
    teacher_id = fingerprint(teacher_model)
    sae_model, sae_id = load_concept_sae(sae, teacher_model, teacher_id, sae_layer, device)
    for split in splits.split(','):
        expected = describe(data_dir, split, teacher_id, sae_id, sae_layer, label_method, k_attr, block_size,
                            sae_model.n_latents)
        label_split(teacher_model, sae_model, data_dir, split, expected, device, dtype, batch_size, rank, world_size)
    if world_size > 1:
        torch.distributed.destroy_process_group()
