"""What an SAE's latents (CoCoMix's concepts) mean: where they fire in the teacher's text and which
tokens their decoder directions promote. The teacher, data and layer come from the SAE file. Listing
the top latents also writes a description of each beside the SAE file: sample.py --show_concepts
prints them beside the concepts a CoCoMix model predicts."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

import torch

from attribution import load_concepts
from common import DEVICE, DTYPE, UserError, atomic_path, configure
from prepare import data_dir_of, get_tokenizer, read_meta
from sae import load_sae, residuals, sae_file, split_windows

# -----------------------------------------------------------------------------
sae: 'str' = ''  # an SAE file (any load_sae spec, with teacher and dataset given)
teacher: 'str' = ''  # default: the SAE file's own
dataset: 'str' = ''  # default: the SAE file's own
sae_layer: 'int >= -1' = -1  # default (-1): the SAE file's own
latent: 'int >= -1' = -1  # show this latent's top contexts; -1: list the top latents
top: 'int >= 1' = 10  # else list this many of the strongest and most frequent latents
tokens: 'int >= 1' = 100_000  # held-out tokens scanned
context: 'int >= 1' = 64  # tokens per window, at most the teacher's context
window: 'int >= 0' = 10  # tokens shown on each side of a peak
device: 'device' = DEVICE
dtype: 'float32|bfloat16|float16' = DTYPE
# -----------------------------------------------------------------------------


def promoted(sae_model, teacher_model, enc, ids, n=8, decode=True):
    """The n tokens (their ids if not decode; the head's padding is no token) each latent's decoder
    direction raises most through the teacher's final LN and unembedding: (len(ids), n)."""
    out = []
    for chunk in torch.tensor(ids).split(1024):  # (1024, V) logits at a time
        direction = sae_model.decoder.weight[:, chunk].t()
        direction = (direction - direction.mean(-1, keepdim=True)) * teacher_model.transformer.ln_f.weight
        out.append(teacher_model.lm_head(direction)[:, :enc.n_vocab].topk(n).indices)
    out = torch.cat(out)
    return [[enc.decode([t]) for t in row] for row in out.tolist()] if decode else out


if __name__ == '__main__':
    configure(globals())
    if not sae:
        raise UserError("give --sae=FILE (an SAE from sae.py, or OpenAI's with --teacher etc.)")
    sae_model, meta = load_sae(sae)
    teacher, dataset = teacher or meta.get('teacher', ''), dataset or meta.get('dataset', '')
    sae_layer = sae_layer if sae_layer >= 0 else meta.get('layer', -1)
    if not teacher or not dataset or sae_layer < 0:
        raise UserError("this SAE file does not name its teacher, dataset and layer: "
                        "give --teacher, --dataset and --sae_layer")
    data_dir = data_dir_of(dataset)
    # checked as for training: descriptions of another layer's or teacher's latents would be wrong
    teacher_model, sae_model, _ = load_concepts(teacher, sae, sae_layer, device, read_meta(data_dir),
                                                data_dir, 1, 'activation', 1)
    n_latents, enc = sae_model.n_latents, get_tokenizer(read_meta(data_dir))
    if latent >= n_latents:
        raise UserError(f"latent {latent} is out of range: give one of 0 .. {n_latents - 1}")
    if top > n_latents:
        raise UserError(f"top={top} but the SAE has {n_latents} latents; give --top={n_latents}")
    cfg = teacher_model.config  # the teacher reads no window longer than its context
    if context > cfg.block_size:
        raise UserError(f"context={context} is longer than the teacher's {cfg.block_size} tokens; "
                        f"give --context={cfg.block_size} or less")
    torch.set_grad_enabled(False)  # inference only
    idx = split_windows(data_dir, 'val', max(1, tokens // context), context)  # (N, T) held-out text
    residual = (residuals(teacher_model, part, sae_layer, dtype) for part in idx.split(64))
    encoded = [[t.cpu() for t in sae_model.encode(r)[:2]] for r in residual]
    values, indices = map(torch.cat, zip(*encoded))  # the active values and latents: (N, T, k)
    n_tokens, on = values.shape[0] * values.shape[1], values > 0
    count = torch.bincount(indices[on], minlength=n_latents)
    if latent < 0:
        mean = torch.zeros(n_latents).index_add_(0, indices[on], values[on]) / count.clamp_min(1)
        for name, score in (('most frequent', count.float()), ('strongest (mean activation)', mean)):
            print(f"{name} latents over {n_tokens:,} tokens:")
            ids = score.topk(top).indices.tolist()
            for i, promotes in zip(ids, promoted(sae_model, teacher_model, enc, ids, 5)):
                print(f"  {i:6d}  freq {count[i] / n_tokens:.4f}  mean act {mean[i]:.3f}  "
                      f"promotes {promotes}")
        # one short description per latent: the token of its strongest activation, what it promotes
        peak = torch.zeros(n_latents).scatter_reduce(0, indices[on], values[on], 'amax')
        is_peak = on & (values == peak[indices])
        peak_token = torch.zeros(n_latents, dtype=torch.long)
        peak_token[indices[is_peak]] = idx.unsqueeze(-1).expand_as(indices)[is_peak]
        every = promoted(sae_model, teacher_model, enc, list(range(n_latents)), 3)
        desc = {i: (f"on {enc.decode([peak_token[i].item()])!r}, " if count[i] else 'inactive, ')
                + 'promotes ' + ' '.join(map(repr, p)) for i, p in enumerate(every)}
        path = sae_file(sae) + '.concepts.json'
        with atomic_path(path) as tmp, open(tmp, 'w') as f:
            json.dump(desc, f, indent=0)
        print(f"saved a description of each of the {n_latents} latents to {path}")
    else:
        act = (values * (indices == latent)).sum(-1)  # (N, T)
        print(f"latent {latent}: active on {count[latent]:,} of {n_tokens:,} tokens "
              f"(freq {count[latent] / n_tokens:.5f})")
        print(f"promotes: {promoted(sae_model, teacher_model, enc, [latent])[0]}")
        for value, flat in zip(*act.flatten().topk(min(10, int(count[latent])))):
            w, t = divmod(flat.item(), context)
            left = enc.decode(idx[w, max(0, t - window):t].tolist())
            right = enc.decode(idx[w, t + 1:t + 1 + window].tolist())
            print(f"  {value.item():8.3f}  {left!r} [[{enc.decode([idx[w, t].item()])!r}]] {right!r}")
