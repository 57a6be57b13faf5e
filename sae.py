"""TopK sparse autoencoders (Gao et al. 2024, OpenAI's format): their latents are the concepts."""
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from chunked import gathered_grads
from common import DEVICE, DTYPE, UserError, autocast, configure, fingerprint
from common import load_checkpoint, load_teacher, save_checkpoint
from model import sae_norm
from prepare import data_dir_of, download, load_tokens, read_meta, windows

# -----------------------------------------------------------------------------
out_dir: 'out' = 'out-sae'
init_from: 'scratch|resume' = 'scratch'  # resume: from out_dir/sae_ckpt.pt
teacher: 'str' = ''  # 'gpt2*' or a train.py out_dir; '': the evaluated SAE's
sae_layer: 'int >= -1' = -1  # the block (0-based) the SAE reads; -1: the evaluated SAE's
dataset: 'str' = ''  # prepare.py's; '': the evaluated SAE's
n_latents: 'int >= 1' = 32768
k: 'int >= 1' = 32  # active latents
normalize: 'bool' = True
k_aux: 'int >= 0' = 0  # latents in the AuxK loss; 0 = n_inputs // 2
aux_coef: 'float >= 0' = 1 / 32
dead_tokens: 'int >= 1' = 10_000_000  # a latent inactive this many training tokens is dead
batch_size: 'int >= 1' = 4096  # activation vectors per step
context: 'int >= 1' = 64  # tokens per teacher window
buffer_size: 'int >= 1' = 131072  # vectors per shuffle buffer
max_tokens: 'int >= 1' = 200_000_000
learning_rate: 'float >= 0' = 0.0  # 0 = Gao et al.'s 2e-4 / sqrt(n_latents / 2^14)
eval_tokens: 'int >= 1' = 65536  # held-out tokens
log_interval: 'int >= 1' = 50
ckpt_interval: 'int >= 1' = 1000  # steps between checkpoints
evaluate: 'file?' = ''  # evaluate this SAE file and stop
device: 'device' = DEVICE
dtype: 'float32|bfloat16|float16' = DTYPE  # autocast
seed: 'int >= 0' = 1337
# -----------------------------------------------------------------------------
# all a resume may change; the rest fix the SAE and its data
FREE_ON_RESUME = {'out_dir', 'init_from', 'max_tokens', 'eval_tokens', 'log_interval',
                  'ckpt_interval', 'evaluate', 'device', 'dtype'}
OPENAI_URL = 'https://openaipublic.blob.core.windows.net/sparse-autoencoder/gpt2-small/'


class TopKSAE(nn.Module):
    """x -> LN -> W_enc (x - pre_bias) + latent_bias -> top k, ReLU -> W_dec c + pre_bias -> undo
    the LN. OpenAI's parameter names and shapes: their files load."""

    def __init__(self, n_inputs, n_latents, k, normalize=True):
        super().__init__()
        self.n_inputs, self.n_latents, self.k, self.normalize = n_inputs, n_latents, k, normalize
        self.pre_bias = nn.Parameter(torch.zeros(n_inputs))
        self.encoder = nn.Linear(n_inputs, n_latents, bias=False)
        self.latent_bias = nn.Parameter(torch.zeros(n_latents))
        self.decoder = nn.Linear(n_latents, n_inputs, bias=False)  # column i: latent i's direction
        # tokens since each latent last fired; two statistics OpenAI's files keep
        self.register_buffer('stats_last_nonzero', torch.zeros(n_latents, dtype=torch.long))
        self.register_buffer('latents_activation_frequency', torch.ones(n_latents))
        self.register_buffer('latents_mean_square', torch.zeros(n_latents))

    def preprocess(self, x):
        """OpenAI's LN (model.sae_norm) -> (x, what decode needs to undo it, [] if none)."""
        x_norm, *info = sae_norm(x) if self.normalize else (x,)
        return x_norm, info

    def encode_pre(self, x_norm):
        return F.linear(x_norm - self.pre_bias, self.encoder.weight, self.latent_bias)  # (..., n)

    def encode(self, x):
        """x (..., d) -> the k active values and indices (..., k), decode's info."""
        x_norm, info = self.preprocess(x)
        values, indices = self.encode_pre(x_norm).topk(self.k)
        return F.relu(values), indices, info

    def decode_norm(self, values, indices, rows=None):
        """The active columns summed by value, in LN space before pre_bias; `rows`: the decoder
        row-major (its transposed view is slow on a CPU)."""
        rows = self.decoder.weight.t().contiguous() if rows is None else rows
        k = indices.size(-1)
        flat = F.embedding_bag(indices.reshape(-1, k), rows, mode='sum',
                               per_sample_weights=values.reshape(-1, k).to(rows.dtype))
        return flat.view(*indices.shape[:-1], self.n_inputs)

    def decode(self, values, indices, info):
        x_hat = self.decode_norm(values, indices) + self.pre_bias
        return x_hat * info[1] + info[0] if info else x_hat

    def forward(self, x):
        return self.decode(*self.encode(x))

    def save(self, path, meta=None):
        """OpenAI's format; their loader reads only k and postact_fn of activation_state_dict."""
        sd = {k: v.cpu() for k, v in self.state_dict().items()}
        sd['activation'] = 'TopK'  # their loader assumes normalize=True; ours reads the flag
        sd['activation_state_dict'] = {'k': self.k, 'postact_fn': 'ReLU',
                                       'cocomix': dict(meta or {}, normalize=self.normalize)}
        save_checkpoint(sd, *os.path.split(path))


def sae_file(spec, fetch=True):
    """An SAE spec's file: a path, or 'openai:LOCATION:LAYER[:32k|128k]' downloaded once."""
    if not spec.startswith('openai:'):
        if fetch and not os.path.exists(spec):
            raise UserError(f"no SAE file '{spec}'; train one with sae.py or use openai:LOC:LAYER")
        return spec
    parts = spec.split(':')
    if len(parts) not in (3, 4) or not parts[2].isdigit():
        raise UserError(f"SAE spec '{spec}' must look like openai:resid_post_mlp:5[:32k|128k]")
    name = f"{parts[1]}_v5_{(parts + ['32k'])[3]}/autoencoders/{parts[2]}.pt"
    url = OPENAI_URL + name
    path = os.path.expanduser('~/.cache/cocomix/openai_sae/') + name.replace('/', '_')
    if fetch and not os.path.exists(path):
        try:
            download(url, path, 'SAE')
        except OSError as e:
            raise UserError(f"cannot download {url} ({e}); fetch it elsewhere, pass its path")
    return path


def load_sae(spec, n_inputs=None):
    """An SAE spec -> (TopKSAE, our metadata or {}); refuses a width other than n_inputs."""
    spec = sae_file(spec)
    try:
        sd = torch.load(spec, map_location='cpu', weights_only=True)
    except Exception:  # a folder, a text file, a truncated download: refused below
        sd = None
    if not isinstance(sd, dict) or sd.get('activation') != 'TopK' or 'encoder.weight' not in sd:
        raise UserError(f"'{spec}' is not a TopK SAE file in OpenAI's format (or is truncated)")
    act, _ = sd.pop('activation_state_dict'), sd.pop('activation')
    meta = act.get('cocomix', {})
    n_latents, d = sd['encoder.weight'].shape
    sae = TopKSAE(d, n_latents, act['k'], normalize=meta.get('normalize', True))
    if n_inputs is not None:
        check_width(sae, n_inputs, f"the SAE '{spec}'")
    sae.load_state_dict(sd)
    return sae.eval(), meta


def check_width(sae, n_inputs, name='the SAE'):
    if sae.n_inputs != n_inputs:
        raise UserError(f"{name} reads {sae.n_inputs}-wide vectors but the teacher is {n_inputs} "
                        "wide; use an SAE trained on this teacher")


def check_layer(teacher, layer):
    if not 0 <= layer < teacher.config.n_layer:
        raise UserError(f"sae_layer={layer} is out of range for a teacher of "
                        f"{teacher.config.n_layer} blocks")


def teacher_residual(teacher, idx, layer):
    """(B, T, d): the residual after block `layer` (0-based), what the SAE reads."""
    check_layer(teacher, layer)
    return teacher.run_blocks(teacher.embed(idx), stop=layer + 1)


@torch.no_grad()
def residuals(teacher, idx, layer, dtype):
    """(N, T) windows -> teacher residuals (N, T, d) in fp32."""
    device = teacher.lm_head.weight.device
    with autocast(device, dtype):
        return torch.cat([teacher_residual(teacher, part.to(device), layer).float()
                          for part in idx.split(64)])


def split_windows(data_dir, split, n_windows, length, generator=None):
    """(n_windows, length) windows: random starts with a generator, else consecutive."""
    data = load_tokens(data_dir, split)
    if len(data) < length + 1:
        raise UserError(f"{data_dir}'s {split} split has {len(data)} tokens, under {length + 1}")
    if generator is None:
        starts = range(0, min(n_windows, (len(data) - 1) // length) * length, length)
    else:
        starts = torch.randint(len(data) - length, (n_windows,), generator=generator).tolist()
    return windows(data, starts, length)


def fvu(x, x_hat):
    """Fraction of variance unexplained."""
    return (x_hat - x).pow(2).sum(-1).mean() / (x - x.mean(0)).pow(2).sum(-1).mean()


# -----------------------------------------------------------------------------
# Training (Gao et al. 2024): unit-norm decoder columns, AuxK for dead latents, Adam

@torch.no_grad()
def init_sae(sae, sample):
    """Encoder rows at norm 1/sqrt(3), nn.Linear's default, as sparsify; pre_bias at the geometric
    median of the sample (Weiszfeld's algorithm)."""
    sae.decoder.weight.copy_(F.normalize(torch.randn_like(sae.decoder.weight), dim=0))
    sae.encoder.weight.copy_(sae.decoder.weight.t() / math.sqrt(3))
    x = sae.preprocess(sample)[0]
    median = x.mean(0)
    for _ in range(50):
        w = 1 / (x - median).norm(dim=-1).clamp_min(1e-8)
        median = (w[:, None] * x).sum(0) / w.sum()
    sae.pre_bias.copy_(median)


class GatheredLinear(torch.autograd.Function):
    """`pre` = x W^T + b at latents idx (N, K); its backward never makes a dense (N, C) gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, pre, idx):
        ctx.save_for_backward(x, weight, idx)
        return pre.gather(-1, idx)

    @staticmethod
    def backward(ctx, grad):
        x, weight, idx = ctx.saved_tensors
        grad_x, grad_w, grad_b = gathered_grads(grad, idx, x, weight)
        return grad_x.to(x.dtype), grad_w, grad_b, None, None


def sae_losses(sae, x, dead, k_aux):
    """FVU, AuxK loss (the top k_aux dead latents reconstruct the residual, Gao et al. A.2),
    active indices."""
    x_norm, _ = sae.preprocess(x)
    inputs = x_norm - sae.pre_bias
    with torch.no_grad():
        pre = sae.encode_pre(x_norm)
        indices = pre.topk(sae.k).indices
        n_aux = min(k_aux, int(dead.sum()))
        if n_aux:
            aux_indices = pre.masked_fill(~dead, -float('inf')).topk(n_aux).indices
            indices = torch.cat([indices, aux_indices], dim=-1)
    chosen = F.relu(GatheredLinear.apply(inputs, sae.encoder.weight, sae.latent_bias, pre, indices))
    values, indices = chosen[:, :sae.k], indices[:, :sae.k]
    rows = sae.decoder.weight.t().contiguous()
    recon = sae.decode_norm(values, indices, rows) + sae.pre_bias
    aux = fvu((x_norm - recon).detach(), sae.decode_norm(chosen[:, sae.k:], aux_indices, rows)) \
        if n_aux else x.new_zeros(())
    return fvu(x_norm, recon), aux, indices[values > 0]


def train_step(sae, optimizer, x, k_aux, dead_tokens, aux_coef, dtype='float32'):
    """One Adam step on vectors x (N, d) -> FVU, AuxK loss."""
    with autocast(x.device, dtype):
        fvu_, aux, active = sae_losses(sae, x, sae.stats_last_nonzero > dead_tokens, k_aux)
    optimizer.zero_grad(set_to_none=True)
    (fvu_ + aux_coef * aux).backward()
    with torch.no_grad():
        sae.stats_last_nonzero += len(x)
        sae.stats_last_nonzero[active] = 0
        # unit-norm decoder columns: drop the gradient along each, renormalise after
        W = sae.decoder.weight
        W.grad -= (W.grad * W).sum(0, keepdim=True) * W
        optimizer.step()
        W.div_(W.norm(dim=0, keepdim=True))
    return fvu_.detach(), aux.detach()


@torch.no_grad()
def evaluate_sae(sae, teacher, data_dir):
    """Held-out FVU (normalised and raw), latents never active, the teacher's loss clean and with
    the reconstruction spliced in at sae_layer, and their KL; the other settings this run's."""
    idx = split_windows(data_dir, 'val', max(1, eval_tokens // (context + 1)), context + 1)
    active = torch.zeros(sae.n_latents, dtype=torch.bool, device=device)
    vectors, clean, spliced, kl = [], 0.0, 0.0, 0.0
    for batch in idx.to(device).split(32):
        y = batch[:, 1:].flatten()
        h = residuals(teacher, batch[:, :-1], sae_layer, dtype)
        with autocast(device, dtype):
            values, indices, info = sae.encode(h)
            h_hat = sae.decode(values, indices, info).float()
            logits = [teacher.head(teacher.run_blocks(z, sae_layer + 1))[0] for z in (h, h_hat)]
        active[indices[values > 0]] = True
        norm = lambda z: (z - info[0]) / (info[1] + 1e-5) if info else z  # h's LN
        vectors.append([z.flatten(0, 1) for z in (norm(h), norm(h_hat), h, h_hat)])
        logp, logq = (F.log_softmax(z.float(), -1).flatten(0, 1) for z in logits)
        clean += F.nll_loss(logp, y, reduction='sum').item()
        spliced += F.nll_loss(logq, y, reduction='sum').item()
        kl += (logp.exp() * (logp - logq)).sum().item()
    h_norm, h_hat_norm, h, h_hat = (torch.cat(z) for z in zip(*vectors))
    n = len(idx) * context
    return dict(fvu=fvu(h_norm, h_hat_norm).item(), fvu_raw=fvu(h, h_hat).item(),
                dead_fraction=1 - active.float().mean().item(), loss_clean=clean / n,
                loss_spliced=spliced / n, kl=kl / n, tokens=n)


def report(m):
    return ("FVU {fvu:.4f} (raw {fvu_raw:.4f}), dead {dead_fraction:.1%} of latents, teacher loss "
            "{loss_clean:.4f} -> {loss_spliced:.4f} spliced (+{gap:.4f}, KL {kl:.4f}) on "
            "{tokens:,} held-out tokens").format(gap=m['loss_spliced'] - m['loss_clean'], **m)


if __name__ == '__main__':
    config = configure(globals())
    torch.manual_seed(seed)
    sae, meta = load_sae(evaluate) if evaluate else (None, {})
    teacher, dataset = teacher or meta.get('teacher', ''), dataset or meta.get('dataset', '')
    sae_layer = sae_layer if sae_layer >= 0 else meta.get('layer', -1)
    if not teacher or not dataset or sae_layer < 0:
        raise UserError("set teacher, dataset and sae_layer (see config/sae_shakespeare.py)")
    ckpt, steps, per_buffer = None, max_tokens // batch_size, buffer_size // batch_size
    if not evaluate:  # refused before the teacher loads
        if k > n_latents:
            raise UserError(f"k={k} is more than n_latents={n_latents}; use k <= n_latents")
        if min(buffer_size, max_tokens) < batch_size:
            raise UserError(f"buffer_size={buffer_size} and max_tokens={max_tokens} must hold a "
                            f"batch of {batch_size}; raise them")
        if init_from == 'resume':
            ckpt = load_checkpoint(out_dir, device, 'sae_ckpt.pt')
            saved = ckpt['config']
            differ = [f"{key}={saved[key]!r} (this run: {value!r})" for key, value in config.items()
                      if key not in FREE_ON_RESUME and saved.get(key, value) != value]
            if ckpt['step'] > steps:
                differ.append(f"{ckpt['step'] * batch_size:,} tokens (max_tokens={max_tokens})")
            if differ:
                raise UserError(f"{out_dir}/sae_ckpt.pt was trained with {', '.join(differ)}; "
                                "resume with its settings, or train into another out_dir")
        elif os.path.exists(os.path.join(out_dir, 'sae.pt')):
            raise UserError(f"{out_dir} holds an SAE; pass --init_from=resume or another out_dir")
    data_dir = data_dir_of(dataset)
    split_windows(data_dir, 'val', 1, context + 1)  # too short: refused now, not after training
    teacher_model = load_teacher(teacher, device, read_meta(data_dir), data_dir)
    T, d = teacher_model.config.block_size, teacher_model.config.n_embd
    if context > T:
        raise UserError(f"context={context} is longer than the teacher's block_size {T}; "
                        f"use --context={T}")
    if evaluate:
        check_width(sae, d, f"the SAE '{evaluate}'")
        print(report(evaluate_sae(sae.to(device), teacher_model, data_dir)))
        raise SystemExit
    sae = TopKSAE(d, n_latents, k, normalize).to(device)
    lr = learning_rate or 2e-4 / math.sqrt(n_latents / 2 ** 14)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)

    def fill(r):  # buffer r depends on (seed, r) alone: resuming is exact
        g = torch.Generator().manual_seed(seed * 1_000_003 + r)
        idx = split_windows(data_dir, 'train', buffer_size // context + 1, context, g)
        h = residuals(teacher_model, idx, sae_layer, dtype).reshape(-1, d)
        return h[torch.randperm(len(h), generator=g)[:per_buffer * batch_size].to(h.device)]

    if ckpt is None:
        init_sae(sae, fill(0)[:32768])
    else:
        sae.load_state_dict(ckpt['sae'])
        optimizer.load_state_dict(ckpt['optimizer'])
    start = ckpt['step'] if ckpt else 0
    bar = tqdm(range(start, steps), initial=start, total=steps, desc='SAE', unit='step')
    t0 = time.time()
    rate = lambda done: (done - start) * batch_size / max(time.time() - t0, 1e-9)  # tokens/s
    for step in bar:
        if step % per_buffer == 0 or step == start:
            buffer = fill(step // per_buffer)
        x = buffer.split(batch_size)[step % per_buffer]
        fvu_, aux = train_step(sae, optimizer, x, k_aux or d // 2, dead_tokens, aux_coef, dtype)
        if step % log_interval == 0:
            dead = (sae.stats_last_nonzero > dead_tokens).float().mean().item()
            bar.set_postfix_str(f"FVU {fvu_.item():.4f} aux {aux.item():.3f} dead {dead:.1%} "
                                f"{rate(step + 1):,.0f} tok/s")
        if (step + 1) % ckpt_interval == 0 or step + 1 == steps:
            save_checkpoint(dict(sae=sae.state_dict(), optimizer=optimizer.state_dict(),
                                 step=step + 1, config=config), out_dir, 'sae_ckpt.pt')
    bar.close()
    tokens_per_s = rate(steps)
    metrics = evaluate_sae(sae, teacher_model, data_dir)
    sae.save(os.path.join(out_dir, 'sae.pt'), dict(
        teacher=teacher, teacher_id=fingerprint(teacher_model), layer=sae_layer,
        location='resid_post', dataset=dataset, tokens_trained=steps * batch_size, eval=metrics))
    print(f"done: {report(metrics)}; {tokens_per_s:,.0f} tokens/s; saved {out_dir}/sae.pt")
