"""
TopK sparse autoencoders (Gao et al. 2024, OpenAI's architecture and file format): their latents are
CoCoMix's concepts.

    python sae.py config/sae_shakespeare.py                 # train on a teacher's residual stream
    python sae.py --evaluate=out-sae-shakespeare/sae.pt     # FVU, dead latents, teacher loss with the SAE spliced in
    python sae.py --inspect=out-sae-shakespeare/sae.pt --latent=7     # a latent's top contexts and tokens
    python sae.py --inspect=out-sae-shakespeare/sae.pt --top=20       # the most frequent / strongest latents,
                                                  # and a description of every latent in sae.pt.concepts.json

load_sae() takes a file (OpenAI's or ours) or 'openai:LOCATION:LAYER[:32k|128k]' (downloaded once).
"""
import json
import math
import os
import time
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import UserError, atomic_path, autocast, configure, fingerprint, load_checkpoint, load_teacher
from common import save_checkpoint
from model import sae_norm
from prepare import data_dir_of, get_tokenizer, load_tokens, read_meta
from prepare import download as fetch  # `download` is a parameter of sae_file

OPENAI_URL = 'https://openaipublic.blob.core.windows.net/sparse-autoencoder/gpt2-small/{location}_v5_{size}/autoencoders/{layer}.pt'


class TopKSAE(nn.Module):
    """x -> LN -> pre = W_enc (x - pre_bias) + latent_bias -> keep the k largest, ReLU -> x_hat = W_dec c + pre_bias
    -> undo the LN. Parameter names and shapes are OpenAI's, so their files load as they are."""

    def __init__(self, n_inputs, n_latents, k, normalize=True):
        super().__init__()
        self.n_inputs, self.n_latents, self.k, self.normalize = n_inputs, n_latents, k, normalize
        self.pre_bias = nn.Parameter(torch.zeros(n_inputs))
        self.encoder = nn.Linear(n_inputs, n_latents, bias=False)  # weight (n, d)
        self.latent_bias = nn.Parameter(torch.zeros(n_latents))
        self.decoder = nn.Linear(n_latents, n_inputs, bias=False)  # weight (d, n): column i is latent i's direction
        self.register_buffer('stats_last_nonzero', torch.zeros(n_latents, dtype=torch.long))  # tokens since last active
        self.register_buffer('latents_activation_frequency', torch.ones(n_latents))
        self.register_buffer('latents_mean_square', torch.zeros(n_latents))

    def preprocess(self, x):
        """OpenAI's LN: no affine, unbiased std, eps added to the std. Returns x and what decode needs to undo it."""
        if not self.normalize:
            return x, None
        x_norm, mu, std = sae_norm(x)
        return x_norm, (mu, std)

    def encode_pre(self, x_norm):
        return F.linear(x_norm - self.pre_bias, self.encoder.weight, self.latent_bias)  # (..., n)

    def encode(self, x):
        """x (..., d) -> values (..., k), indices (..., k) of the active latents, and info for decode."""
        x_norm, info = self.preprocess(x)
        values, indices = self.encode_pre(x_norm).topk(self.k, dim=-1)
        return F.relu(values), indices, info

    def decode_norm(self, values, indices, rows=None):
        """Sum of the k active decoder columns weighted by their values, in normalised space, without pre_bias:
        a gather of k columns per vector, never the dense (..., n) x (n, d) product. The gather reads a row-major
        copy of the decoder (gathering from the transposed view is about 20x slower on a CPU): `rows`, when the
        caller already made one."""
        rows = self.decoder.weight.t().contiguous() if rows is None else rows
        flat = F.embedding_bag(indices.reshape(-1, indices.size(-1)), rows,
                               per_sample_weights=values.reshape(-1, values.size(-1)).to(self.decoder.weight.dtype),
                               mode='sum')
        return flat.view(*indices.shape[:-1], self.n_inputs)

    def decode(self, values, indices, info):
        x_hat = self.decode_norm(values, indices) + self.pre_bias
        return x_hat if info is None else x_hat * info[1] + info[0]

    def encode_dense(self, x):
        """The (..., n) sparse code, for tests and inspection."""
        values, indices, _ = self.encode(x)
        dense = torch.zeros(*x.shape[:-1], self.n_latents, device=x.device, dtype=values.dtype)
        return dense.scatter(-1, indices, values)

    def forward(self, x):
        values, indices, info = self.encode(x)
        return self.decode(values, indices, info)

    def save(self, path, meta=None):
        """OpenAI's format. Their loader reads only k and postact_fn from activation_state_dict and loads
        every other top-level key strictly, so our metadata rides inside activation_state_dict."""
        sd = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        sd['activation'] = 'TopK'  # which OpenAI's loader takes to mean normalize=True; ours reads the flag below
        sd['activation_state_dict'] = {'k': self.k, 'postact_fn': 'ReLU',
                                       'cocomix': dict(meta or {}, normalize=self.normalize)}
        with atomic_path(path) as tmp:
            torch.save(sd, tmp)


def sae_file(spec, download=True, cache_dir=os.path.expanduser('~/.cache/cocomix')):
    """The local file of an SAE spec: the path itself, or OpenAI's SAE downloaded once into cache_dir."""
    if spec.startswith('openai:'):
        parts = spec.split(':')
        if len(parts) not in (3, 4) or not parts[2].isdigit():
            raise UserError(f"SAE spec '{spec}' must look like openai:resid_post_mlp:5[:32k|128k]")
        url = OPENAI_URL.format(location=parts[1], layer=parts[2], size=parts[3] if len(parts) == 4 else '32k')
        path = os.path.join(cache_dir, 'openai_sae', url.split('gpt2-small/')[1].replace('/', '_'))
        if not os.path.exists(path) and download:
            try:
                fetch(url, path, 'SAE')
            except OSError as e:
                raise UserError(f"cannot download {url} ({e}); download it elsewhere and pass the file's path")
        spec = path
    if not os.path.exists(spec) and download:
        raise UserError(f"no SAE file at '{spec}'; train one with sae.py or use openai:LOCATION:LAYER")
    return spec


def load_sae(spec, n_inputs=None):
    """A file (OpenAI's or ours) or 'openai:LOCATION:LAYER[:32k|128k]' -> (TopKSAE, our metadata or {}).
    With n_inputs, an SAE of another width is refused."""
    spec = sae_file(spec)
    sd = torch.load(spec, map_location='cpu', weights_only=True)
    if sd.get('activation') != 'TopK' or 'encoder.weight' not in sd:
        raise UserError(f"'{spec}' is not a TopK SAE in OpenAI's format")
    act, _ = sd.pop('activation_state_dict'), sd.pop('activation')
    n_latents, d = sd['encoder.weight'].shape
    if n_inputs is not None and d != n_inputs:
        raise UserError(f"the SAE '{spec}' reads {d}-wide vectors but the teacher is {n_inputs} wide; "
                         "use an SAE trained on this teacher's residual stream")
    sae = TopKSAE(d, n_latents, act['k'], normalize=act.get('cocomix', {}).get('normalize', True))
    sae.load_state_dict(sd)
    return sae.eval(), act.get('cocomix', {})


def teacher_residual(teacher, idx, layer):
    """The residual stream after block `layer` (0-based) of a GPT: what the SAE reads. (B, T) -> (B, T, d)."""
    if not 0 <= layer < teacher.config.n_layer:
        raise UserError(f"sae_layer={layer} is out of range for a teacher of {teacher.config.n_layer} blocks")
    return teacher.run_blocks(teacher.embed(idx), stop=layer + 1)


def windows(data_dir, split, n_windows, length, generator=None):
    """(n_windows, length) token windows: random starts with a generator, else consecutive from the start."""
    data = load_tokens(data_dir, split)
    if len(data) < length + 1:
        raise UserError(f"the {split} split of {data_dir} has {len(data)} tokens, fewer than {length + 1}")
    if generator is None:
        starts = [i * length for i in range(min(n_windows, (len(data) - 1) // length))]
    else:
        starts = torch.randint(len(data) - length, (n_windows,), generator=generator).tolist()
    return torch.stack([torch.from_numpy(data[s:s + length].astype('int64')) for s in starts])


@torch.no_grad()
def residuals(teacher, idx, layer, dtype, chunk=64):
    """Teacher residuals after block `layer` for (N, T) windows -> (N, T, d) in fp32, in chunks of windows."""
    device = teacher.lm_head.weight.device
    with autocast(device, dtype):
        return torch.cat([teacher_residual(teacher, idx[i:i + chunk].to(device), layer).float()
                          for i in range(0, len(idx), chunk)])


def geometric_median(x, iters=50):
    """Weiszfeld's algorithm: the point minimising the summed distance to the rows of x."""
    median = x.mean(0)
    for _ in range(iters):
        w = 1 / (x - median).norm(dim=-1).clamp_min(1e-8)
        median = (w[:, None] * x).sum(0) / w.sum()
    return median


class GatheredLinear(torch.autograd.Function):
    """(x W^T + b) at the chosen latents idx (N, K), from the product `pre` computed without autograd. What it
    buys: the backward touches only the N*K chosen latents instead of the dense (N, C) gradient, two of the three
    (N, d, C) matmuls of a step: 2-3x faster SAE training at C = 32768 (bench.py --parts=sae)."""

    @staticmethod
    def forward(ctx, x, weight, bias, pre, idx):
        ctx.save_for_backward(x, weight, idx)
        return pre.gather(-1, idx)

    @staticmethod
    def backward(ctx, grad):
        x, weight, idx = ctx.saved_tensors
        grad = grad.to(weight.dtype)
        grad_x = F.embedding_bag(idx, weight, per_sample_weights=grad, mode='sum')
        rows = torch.arange(len(idx), device=idx.device).repeat_interleave(idx.size(1))
        chosen = torch.sparse_coo_tensor(torch.stack([idx.flatten(), rows]), grad.flatten(), (len(weight), len(idx)),
                                         check_invariants=False)  # (C, N): entry (i, n) = dL/dpre[n, i]
        grad_w = torch.sparse.mm(chosen, x.to(weight.dtype))  # (C, d): summed over the rows that chose each latent
        grad_b = torch.zeros_like(weight[:, 0]).index_add_(0, idx.flatten(), grad.flatten())
        return grad_x.to(x.dtype), grad_w, grad_b, None, None


def sae_losses(sae, x, dead=None, k_aux=0):
    """Normalised MSE (= FVU of the batch) and the AuxK loss: the top k_aux dead latents reconstruct the
    detached residual, decoded without the bias (Gao et al. 2024, A.2). Also returns the active indices."""
    x_norm, _ = sae.preprocess(x)
    inputs = x_norm - sae.pre_bias
    with torch.no_grad():  # choose the latents on the dense product; gradients flow through the chosen ones only
        pre = F.linear(inputs, sae.encoder.weight, sae.latent_bias)
        indices = pre.topk(sae.k, dim=-1).indices
        n_aux = min(k_aux, int(dead.sum())) if dead is not None else 0
        if n_aux:
            aux_indices = pre.masked_fill(~dead, -float('inf')).topk(n_aux, dim=-1).indices
            indices = torch.cat([indices, aux_indices], dim=-1)
    chosen = F.relu(GatheredLinear.apply(inputs, sae.encoder.weight, sae.latent_bias, pre, indices))
    values, indices = chosen[:, :sae.k], indices[:, :sae.k]
    rows = sae.decoder.weight.t().contiguous()  # one row-major copy for both decodes (differentiable)
    recon = sae.decode_norm(values, indices, rows) + sae.pre_bias
    variance = (x_norm - x_norm.mean(0)).pow(2).sum(-1).mean()
    fvu = (recon - x_norm).pow(2).sum(-1).mean() / variance
    aux = torch.zeros((), device=x.device)
    if n_aux:
        residual = (x_norm - recon).detach()
        aux_recon = sae.decode_norm(chosen[:, sae.k:], aux_indices, rows)
        aux = (aux_recon - residual).pow(2).sum(-1).mean() / (residual - residual.mean(0)).pow(2).sum(-1).mean()
    return fvu, aux, indices[values > 0]


@torch.no_grad()
def evaluate_sae(sae, teacher, layer, data_dir, n_tokens, context=64, dtype='float32'):
    """On held-out windows: FVU in normalised and raw space, the fraction of latents never active, and the
    teacher's next-token loss clean vs with the reconstruction spliced in at `layer` (and the KL between them)."""
    idx = windows(data_dir, 'val', max(1, n_tokens // (context + 1)), context + 1)
    sums = dict(sse_norm=0.0, sse_raw=0.0, clean=0.0, spliced=0.0, kl=0.0, n=0)
    moments = {'norm': [0.0, 0.0], 'raw': [0.0, 0.0]}  # sum and sum of squares per feature
    device = sae.encoder.weight.device
    active = torch.zeros(sae.n_latents, dtype=torch.bool, device=device)
    for i in range(0, len(idx), 32):
        x_in, y = idx[i:i + 32, :-1].to(device), idx[i:i + 32, 1:].to(device)
        with autocast(device, dtype):
            h = teacher_residual(teacher, x_in, layer).float()
            values, indices, info = sae.encode(h)
            h_hat = sae.decode(values, indices, info)
            h_norm, h_hat_norm = sae.preprocess(h)[0], (h_hat - info[0]) / (info[1] + 1e-5) if info else h_hat
            logits = [teacher.head(teacher.run_blocks(z, start=layer + 1))[0].float() for z in (h, h_hat)]
        active[indices[values > 0]] = True
        for name, a, b in (('norm', h_norm, h_hat_norm), ('raw', h, h_hat)):
            sums['sse_' + name] += (a - b).pow(2).sum().item()
            moments[name][0] += a.reshape(-1, a.size(-1)).sum(0)
            moments[name][1] += a.pow(2).reshape(-1, a.size(-1)).sum(0)
        logp = [F.log_softmax(l, -1) for l in logits]
        sums['clean'] += F.nll_loss(logp[0].flatten(0, 1), y.flatten(), reduction='sum').item()
        sums['spliced'] += F.nll_loss(logp[1].flatten(0, 1), y.flatten(), reduction='sum').item()
        sums['kl'] += (logp[0].exp() * (logp[0] - logp[1])).sum().item()
        sums['n'] += y.numel()
    n = sums['n']
    fvu = {name: sums['sse_' + name] / (s2 - s1.pow(2) / n).sum().item() for name, (s1, s2) in moments.items()}
    return dict(fvu=fvu['norm'], fvu_raw=fvu['raw'], dead_fraction=1 - active.float().mean().item(),
                loss_clean=sums['clean'] / n, loss_spliced=sums['spliced'] / n, kl=sums['kl'] / n, tokens=n)


def report(m):
    return (f"FVU {m['fvu']:.4f} (raw {m['fvu_raw']:.4f}), dead {m['dead_fraction'] * 100:.1f}% of latents, "
            f"teacher loss {m['loss_clean']:.4f} -> {m['loss_spliced']:.4f} spliced "
            f"(+{m['loss_spliced'] - m['loss_clean']:.4f}, KL {m['kl']:.4f}) on {m['tokens']:,} held-out tokens")


@torch.no_grad()
def init_sae(sae, sample):
    """Gao et al.: random unit-norm decoder columns, encoder = decoder transpose, pre_bias = the geometric
    median of a sample (in normalised space). The encoder starts at 1/sqrt(3) of the decoder's norm, the norm
    of nn.Linear's default rows that sparsify starts from: bench.py measures FVU 0.733 -> 0.679 after 65K tokens."""
    sae.decoder.weight.copy_(F.normalize(torch.randn_like(sae.decoder.weight), dim=0))
    sae.encoder.weight.copy_(sae.decoder.weight.t() / math.sqrt(3))
    sae.pre_bias.copy_(geometric_median(sae.preprocess(sample)[0]))


def train_step(sae, optimizer, x, k_aux, dead_tokens, aux_coef, dtype='float32'):
    """One Adam step on a batch of vectors x (N, d); returns the batch FVU and AuxK loss."""
    with autocast(x.device, dtype):
        fvu, aux, active = sae_losses(sae, x, sae.stats_last_nonzero > dead_tokens, k_aux)
    optimizer.zero_grad(set_to_none=True)
    (fvu + aux_coef * aux).backward()
    with torch.no_grad():
        sae.stats_last_nonzero += len(x)
        sae.stats_last_nonzero[active] = 0
        # keep only the part of each decoder column's gradient orthogonal to the column, then renormalise
        W = sae.decoder.weight
        W.grad -= (W.grad * W).sum(0, keepdim=True) * W
        optimizer.step()
        W.div_(W.norm(dim=0, keepdim=True))
    return fvu.detach(), aux.detach()


def train_sae(teacher, data_dir, c):
    """Train a TopK SAE on the teacher's residual stream after block c.sae_layer; c holds sae.py's settings.
    Returns the SAE and the training tokens per second."""
    d, device = teacher.config.n_embd, teacher.lm_head.weight.device
    lr = c.learning_rate or 2e-4 / math.sqrt(c.n_latents / 2 ** 14)
    steps, per_buffer = c.max_tokens // c.batch_size, c.buffer_size // c.batch_size
    sae = TopKSAE(d, c.n_latents, c.k, c.normalize).to(device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    step, buffer_index, buffer = 0, -1, None

    def fill(r):  # the r-th shuffled buffer: a function of (seed, r) alone, so resuming is exact
        g = torch.Generator().manual_seed(c.seed * 1_000_003 + r)
        idx = windows(data_dir, 'train', c.buffer_size // c.context + 1, c.context, g)
        h = residuals(teacher, idx, c.sae_layer, c.dtype).reshape(-1, d)
        return h[torch.randperm(len(h), generator=g)[:per_buffer * c.batch_size].to(h.device)]

    if c.init_from == 'resume':
        ckpt = load_checkpoint(c.out_dir, device, 'sae_ckpt.pt')
        sae.load_state_dict(ckpt['sae'])
        optimizer.load_state_dict(ckpt['optimizer'])
        step = ckpt['step']
    else:
        init_sae(sae, fill(0)[:32768])
    bar = tqdm(range(step, steps), initial=step, total=steps, desc='SAE', unit='step')
    t0, fvu = time.time(), torch.tensor(float('nan'))
    for step in bar:
        if step // per_buffer != buffer_index:
            buffer_index = step // per_buffer
            buffer = fill(buffer_index)
        x = buffer[(step % per_buffer) * c.batch_size:(step % per_buffer + 1) * c.batch_size]
        fvu, aux = train_step(sae, optimizer, x, c.k_aux or d // 2, c.dead_tokens, c.aux_coef, c.dtype)
        if step % c.log_interval == 0:
            dead = (sae.stats_last_nonzero > c.dead_tokens).float().mean().item()
            bar.set_postfix_str(f"FVU {fvu.item():.4f} aux {aux.item():.3f} dead {dead * 100:.1f}% "
                                f"{(step + 1 - bar.initial) * c.batch_size / (time.time() - t0):,.0f} tok/s")
        if (step + 1) % c.ckpt_interval == 0 or step + 1 == steps:
            save_checkpoint({'sae': sae.state_dict(), 'optimizer': optimizer.state_dict(), 'step': step + 1,
                             'config': vars(c)}, c.out_dir, 'sae_ckpt.pt')
    bar.close()
    tokens_per_s = (steps - bar.initial) * c.batch_size / max(time.time() - t0, 1e-9)
    return sae.eval(), tokens_per_s


@torch.no_grad()
def inspect_sae(sae, teacher_model, data_dir, c):
    """Top-activating contexts, frequency and promoted tokens of latent c.latent, or a listing of the c.top
    strongest and most frequent ones and a description of every latent (c: sae.py's settings)."""
    latent, context, window = c.latent, c.context, c.window
    enc = get_tokenizer(read_meta(data_dir))
    idx = windows(data_dir, 'val', max(1, c.inspect_tokens // context), context)
    values, indices = [], []
    for i in range(0, len(idx), 64):
        v, ix, _ = sae.encode(residuals(teacher_model, idx[i:i + 64], c.sae_layer, c.dtype))
        values.append(v.cpu()), indices.append(ix.cpu())
    values, indices = torch.cat(values), torch.cat(indices)  # (N, T, k)
    n_tokens = values.shape[0] * values.shape[1]
    count = torch.bincount(indices[values > 0], minlength=sae.n_latents)
    total = torch.zeros(sae.n_latents).index_add_(0, indices[values > 0], values[values > 0])

    def promoted(ids, n=8):  # the tokens a latent's decoder direction raises most, through final LN and unembedding
        out = []
        for chunk in torch.tensor(ids).split(1024):  # (1024, V) logits at a time
            direction = sae.decoder.weight[:, chunk].t()
            direction = (direction - direction.mean(-1, keepdim=True)) * teacher_model.transformer.ln_f.weight
            logits = teacher_model.lm_head(direction)
            out += [[enc.decode([t]) for t in row] for row in logits[:, :enc.n_vocab].topk(n).indices.tolist()]
        return out

    if latent < 0:
        mean = total / count.clamp_min(1)
        for name, score in (('most frequent', count.float()), ('strongest (mean activation)', mean)):
            print(f"{name} latents over {n_tokens:,} tokens:")
            ids = score.topk(c.top).indices.tolist()
            for i, tokens in zip(ids, promoted(ids, 5)):
                print(f"  {i:6d}  freq {count[i] / n_tokens:.4f}  mean act {mean[i]:.3f}  promotes {tokens}")
        # one short description per latent, which sample.py --show_concepts prints beside the predicted concepts
        on = values > 0
        peak = torch.zeros(sae.n_latents).scatter_reduce(0, indices[on], values[on], 'amax')
        is_peak = on & (values == peak[indices])
        peak_token = torch.zeros(sae.n_latents, dtype=torch.long)
        peak_token[indices[is_peak]] = idx.unsqueeze(-1).expand_as(indices)[is_peak]
        where = lambda i: f"on {enc.decode([peak_token[i].item()])!r}, " if count[i] else 'inactive, '
        desc = {i: where(i) + 'promotes ' + ' '.join(map(repr, tokens))
                for i, tokens in enumerate(promoted(list(range(sae.n_latents)), 3))}
        path = sae_file(c.inspect) + '.concepts.json'
        with open(path, 'w') as f:
            json.dump(desc, f, indent=0)
        return print(f"saved a description of each of the {sae.n_latents} latents to {path}")
    if not 0 <= latent < sae.n_latents:
        raise UserError(f"latent {latent} is out of range: the SAE has latents 0 .. {sae.n_latents - 1}")
    act = (values * (indices == latent)).sum(-1)  # (N, T)
    print(f"latent {latent}: active on {count[latent]:,} of {n_tokens:,} tokens (freq {count[latent] / n_tokens:.5f})")
    print(f"promotes: {promoted([latent])[0]}")
    for value, flat in zip(*act.flatten().topk(min(10, int(count[latent])))):
        w, t = divmod(flat.item(), context)
        left = enc.decode(idx[w, max(0, t - window):t].tolist())
        right = enc.decode(idx[w, t + 1:t + 1 + window].tolist())
        print(f"  {value.item():8.3f}  {left!r} [[{enc.decode([idx[w, t].item()])!r}]] {right!r}")


if __name__ == '__main__':
    # -----------------------------------------------------------------------------
    # Training, evaluation and inspection: python sae.py [config] [--key=value ...]
    out_dir = 'out-sae'
    init_from = 'scratch'  # or 'resume' (out_dir/sae_ckpt.pt)
    teacher = ''  # 'gpt2*' or a train.py out_dir; for --evaluate/--inspect, default: the SAE's own metadata
    sae_layer = -1  # the block whose output the SAE reads (0-based; GPT-2 small: 5 = the output of block 6 of 12)
    dataset = ''  # a prepared dataset (prepare.py)
    n_latents = 32768
    k = 32
    normalize = True
    k_aux = 0  # latents in the AuxK loss; 0 = n_inputs // 2
    aux_coef = 1 / 32
    dead_tokens = 10_000_000  # a latent with no activation in this many training tokens is dead
    batch_size = 4096  # activation vectors per step
    context = 64  # tokens per teacher window
    buffer_size = 131072  # activation vectors per refill of the shuffle buffer
    max_tokens = 200_000_000
    learning_rate = 0.0  # 0 = Gao et al.'s 2e-4 / sqrt(n_latents / 2^14)
    eval_tokens = 65536  # held-out tokens for evaluation
    log_interval = 50
    ckpt_interval = 1000  # steps between resumable checkpoints
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'  # autocast for the teacher and the SAE
    seed = 1337
    evaluate = ''  # an SAE file: evaluate it and stop
    inspect = ''  # an SAE file: show --latent=ID or the --top=N latents and stop
    latent = -1
    top = 0
    inspect_tokens = 100_000  # tokens scanned for inspection
    window = 10  # tokens shown on each side of a peak
    # -----------------------------------------------------------------------------


    config = configure(globals())
    torch.manual_seed(seed)
    path = evaluate or inspect
    meta = load_sae(path)[1] if path else {}
    teacher, dataset = teacher or meta.get('teacher', ''), dataset or meta.get('dataset', '')
    sae_layer = sae_layer if sae_layer >= 0 else meta.get('layer', -1)
    if not teacher or not dataset or sae_layer < 0:
        raise UserError("set teacher, dataset and sae_layer (a config such as config/sae_shakespeare.py)")
    data_dir = data_dir_of(dataset)
    teacher_model = load_teacher(teacher, device, read_meta(data_dir), data_dir)
    settings_now = SimpleNamespace(**dict(config, teacher=teacher, dataset=dataset, sae_layer=sae_layer))
    if path:
        sae = load_sae(path, teacher_model.config.n_embd)[0].to(device)
        if inspect:
            inspect_sae(sae, teacher_model, data_dir, settings_now)
        else:
            print(report(evaluate_sae(sae, teacher_model, sae_layer, data_dir, eval_tokens, context, dtype)))
    else:
        sae, tokens_per_s = train_sae(teacher_model, data_dir, settings_now)
        metrics = evaluate_sae(sae, teacher_model, sae_layer, data_dir, eval_tokens, context, dtype)
        sae.save(os.path.join(out_dir, 'sae.pt'), dict(teacher=teacher, teacher_id=fingerprint(teacher_model),
                                                        layer=sae_layer, location='resid_post', dataset=dataset,
                                                        tokens_trained=max_tokens // batch_size * batch_size,
                                                        eval=metrics))
        print(f"done: {report(metrics)}; trained at {tokens_per_s:,.0f} tokens/s; saved {out_dir}/sae.pt")
