"""
The GPT-2 language model, in one file, read top to bottom.
References: OpenAI's GPT-2 (https://github.com/openai/gpt-2) and nanoGPT (https://github.com/karpathy/nanoGPT).
Shapes: B batch, T time, C = n_embd channels, V vocabulary.
"""
import hashlib
import inspect
import json
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from configurator import UserError, atomic_path, check_hub


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head

    def forward(self, x, cache=None):
        """x (B, T, C). cache: None, or a dict holding this layer's past 'k', 'v' (B, nh, T_past, hs), which
        is extended in place; the T new positions attend to all T_past cached ones and causally to each other."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        T_past = 0
        if cache is not None:
            if 'k' in cache:
                T_past = cache['k'].size(2)
                k, v = torch.cat([cache['k'], k], dim=2), torch.cat([cache['v'], v], dim=2)
            cache['k'], cache['v'] = k, v
        dropout_p = self.attn_dropout if self.training else 0.0
        if T_past == 0:  # the training path: SDPA's own causal mask selects the flash / memory-efficient kernels
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:  # new query i sits at absolute position T_past + i and sees keys 0 .. T_past + i
            mask = torch.ones(T, T_past + T, dtype=torch.bool, device=x.device).tril(diagonal=T_past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate='tanh')  # GPT-2's GELU, so pretrained weights reproduce exactly
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
        x = x + self.mlp(self.ln_2(x))
        return x


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms, as GPT-2; False is a bit better and faster
    # CoCoMix (n_concepts = 0: a plain GPT)
    n_concepts: int = 0  # C, the SAE's latents = the concept vocabulary
    concept_topk: int = 32  # predicted concepts kept before compression
    insert_layer: int = 3  # blocks before the concept head
    mix: str = 'interleave'  # 'interleave' | 'add' | 'none' (predict only) | 'pause' (a learned vector, no concepts)


def sae_norm(h):
    """OpenAI's SAE normalisation, shared by the SAE and the concept head: LN without affine, unbiased std,
    eps added to the std. Returns the normalised h and the (mu, std) that undo it."""
    mu = h.mean(dim=-1, keepdim=True)
    std = (h - mu).std(dim=-1, keepdim=True)
    return (h - mu) / (std + 1e-5), mu, std


class ConceptMixer(nn.Module):
    """The whole CoCoMix change to a GPT (paper Sec. 3, METHOD.md "The student"): predict concept logits from the
    hidden state, keep the top concept_topk, and compress them into one continuous concept vector."""

    def __init__(self, config):
        super().__init__()
        C, d = config.n_concepts, config.n_embd
        self.topk = config.concept_topk
        self.pre_bias = nn.Parameter(torch.zeros(d))  # as the SAE's b_pre: the head reads LN(h) - b_pre
        self.concept_head = nn.Linear(d, C)  # z = W_head x + b_head, z in R^C
        self.compress = nn.Embedding(C, d)  # W_comp stored row per concept, so compression is a gather
        self.compress_bias = nn.Parameter(torch.zeros(d))

    def forward(self, h, labels=None, steer=None):
        """h (B, T, d) -> concept logits z (B, T, C) (None in training), the concept loss against labels
        (B, T, k_attr) (None without), the kept concept ids (B, T, concept_topk), best first, and the concept
        vectors c_hat (B, T, d)."""
        x, mu, std = sae_norm(h)
        x = x - self.pre_bias
        z = loss = None
        if labels is not None:  # training: the loss and TopK chunk by chunk, never the whole (B, T, C) logits
            loss, values, indices = linear_cross_entropy(x, self.concept_head.weight, self.concept_head.bias, labels, self.topk)
        else:
            z = self.concept_head(x)  # z = W_head x + b_head
            if steer:  # multiply chosen concepts' logits by alpha before TopK (paper Sec. 4.4, steering)
                ids = torch.tensor(list(steer), device=z.device)
                z = z.index_copy(-1, ids, z.index_select(-1, ids) * torch.tensor(list(steer.values()), device=z.device, dtype=z.dtype))
            values, indices = z.topk(self.topk, dim=-1)  # raw logits, may be negative
        # c_hat = (W_comp TopK(z) + b_comp + b_pre) * std + mu: a weighted sum of concept_topk rows, not a C-wide matmul
        mixed = F.embedding_bag(indices.flatten(0, -2), self.compress.weight, mode='sum',
                                per_sample_weights=values.flatten(0, -2).to(self.compress.weight.dtype)).view_as(h)
        return z, loss, indices, (mixed + self.compress_bias + self.pre_bias) * std + mu


@torch.no_grad()
def concept_accuracy(kept, labels):
    """For logging: the share of labels (B, T, k_attr) found among the kept concepts (B, T, concept_topk)."""
    valid = labels >= 0
    hit = (labels.unsqueeze(-1) == kept.unsqueeze(-2)).any(-1)
    return (hit & valid).sum() / valid.sum().clamp_min(1)


def kd_loss(logits, teacher_logits):
    """The KD baseline's KL(teacher || student) of next-token distributions at temperature 1, averaged over
    positions. The student's vocabulary may be padded past the teacher's: the padding gets no teacher mass."""
    V = teacher_logits.size(-1)
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)
    log_q = F.log_softmax(logits.float(), dim=-1)[..., :V]
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.mixing = config.n_concepts > 0 or config.mix == 'pause'
        if self.mixing:
            assert 0 <= config.insert_layer <= config.n_layer and config.mix in ('interleave', 'add', 'none', 'pause')
        if config.mix == 'pause':  # the pause-token baseline: one learned vector instead of the concept vector
            self.pause = nn.Parameter(torch.randn(config.n_embd) * 0.02)
        elif config.n_concepts:
            self.concepts = ConceptMixer(config)
        self.losses = {}  # the last forward's next-token and concept losses, for logging
        self.transformer.wte.weight = self.lm_head.weight  # weight tying (https://paperswithcode.com/method/weight-tying)
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2 * n_layer)
            if pn.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True, active=False):
        """Parameters of the model; position embeddings are left out by default, and the token embeddings
        are counted once since they are tied to the output head. active: as the paper counts CoCoMix, only the
        concept_topk compression rows a token uses, not all C."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        if active and hasattr(self, 'concepts'):
            n_params -= (self.config.n_concepts - self.config.concept_topk) * self.config.n_embd
        return n_params

    # The forward pass in three steps, so that a caller can stop after any block, read or perturb the hidden
    # state there (a teacher's residual stream for an SAE), and carry on.
    def embed(self, idx, pos_offset=0):
        """idx (B, T) token ids -> (B, T, C) input of block 0."""
        T = idx.size(1)
        assert pos_offset + T <= self.config.block_size, \
            f"cannot forward {pos_offset + T} positions, block_size is only {self.config.block_size}"
        pos = torch.arange(pos_offset, pos_offset + T, dtype=torch.long, device=idx.device)
        return self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))

    def run_blocks(self, x, start=0, stop=None, caches=None):
        """Apply blocks start .. stop-1 to x (B, T, C); `caches` is a list with one dict per block (KV cache)."""
        for i in range(start, self.config.n_layer if stop is None else stop):
            x = self.transformer.h[i](x, None if caches is None else caches[i])
        return x

    def head(self, x, targets=None, logits=True):
        """Final LN and tied unembedding: x (B, T, C) -> logits (B, T, V) and the mean cross-entropy against
        targets (B, T) (-1 = no target), or None without targets. logits=False: only the loss, computed in
        chunks without ever holding the (B, T, V) logits (linear_cross_entropy)."""
        x = self.transformer.ln_f(x)
        if targets is not None and not logits:
            return None, linear_cross_entropy(x, self.lm_head.weight, None, targets.unsqueeze(-1))[0]
        logits = self.lm_head(x)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1), ignore_index=-1)
        return logits, loss

    def forward(self, idx, targets=None, caches=None, concept_labels=None, lam_concept=0.1, steer=None, logits=True):
        """idx (B, T) -> (logits, loss). Full-sequence logits with targets; without them, only the last
        position's logits (B, 1, V), all that sampling needs. logits=False: the loss alone, in less memory.
        `caches` (from new_caches) enables the KV cache. CoCoMix: with concept_labels (B, T, k_attr),
        loss = NTP + lam_concept * concept loss (self.losses has both)."""
        cfg = self.config
        pos_offset = caches[0].get('pos', 0) if caches is not None else 0
        if caches is not None:
            caches[0]['pos'] = pos_offset + idx.size(1)
        x = self.embed(idx, pos_offset)
        x = self.run_blocks(x, stop=cfg.insert_layer if self.mixing else None, caches=caches)
        if self.mixing:
            if cfg.mix == 'pause':
                c_hat = self.pause.expand_as(x)
            else:
                self.concept_logits, concept, self.concept_ids, c_hat = self.concepts(x, concept_labels, steer)
            if cfg.mix in ('interleave', 'pause'):  # (h_1, c_1, h_2, c_2, ...): 2T positions, the plain causal mask
                x = torch.stack((x, c_hat), dim=2).flatten(1, 2)
            elif cfg.mix == 'add':
                x = x + c_hat
            x = self.run_blocks(x, start=cfg.insert_layer, caches=caches)
            if cfg.mix in ('interleave', 'pause'):
                x = x[:, 1::2]  # read out at the concept slots: c_t predicts token t+1
        logits, loss = self.head(x if targets is not None else x[:, [-1], :], targets, logits)
        self.losses = {'ntp': loss}
        if concept_labels is not None and cfg.n_concepts:
            self.losses['concept'] = concept
            self.losses['concept_acc'] = concept_accuracy(self.concept_ids, concept_labels)
            loss = loss + lam_concept * concept
        return logits, loss

    def new_caches(self):
        return [{} for _ in range(self.config.n_layer)]

    def crop_block_size(self, block_size):
        """Shrink the context (e.g. a pretrained 1024 model to 256)."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    @classmethod
    def from_pretrained(cls, name_or_dir, override_args=None):
        """GPT-2 weights: 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' from the Hugging Face hub (cached), or a
        local folder with config.json and model.safetensors or pytorch_model.bin (as save_pretrained writes).
        Needs neither transformers nor safetensors. override_args may set only dropout."""
        override_args = override_args or {}
        assert all(k == 'dropout' for k in override_args), "only dropout can be overridden"
        folder = name_or_dir if os.path.isdir(name_or_dir) else hub_folder(name_or_dir)
        with open(os.path.join(folder, 'config.json')) as f:
            hf = json.load(f)
        if hf.get('activation_function', 'gelu_new') not in ('gelu_new', 'gelu_pytorch_tanh'):
            raise UserError(f"{name_or_dir} uses the activation {hf['activation_function']}; only GPT-2's is supported")
        config = GPTConfig(block_size=hf['n_positions'], vocab_size=hf['vocab_size'], n_layer=hf['n_layer'],
                           n_head=hf['n_head'], n_embd=hf['n_embd'], bias=True, dropout=override_args.get('dropout', 0.0))
        model = cls(config)
        sd = model.state_dict()
        path = os.path.join(folder, 'model.safetensors')
        sd_hf = read_safetensors(path) if os.path.exists(path) else \
            torch.load(os.path.join(folder, 'pytorch_model.bin'), map_location='cpu', weights_only=True)
        # the hub's files name GPT2Model's weights (h.0...), save_pretrained GPT2LMHeadModel's (transformer.h.0...);
        # lm_head is tied to wte, and the attention masks are buffers, not weights
        sd_hf = {'transformer.' + k.removeprefix('transformer.'): v for k, v in sd_hf.items()
                 if not k.endswith(('.attn.masked_bias', '.attn.bias', 'lm_head.weight'))}
        sd_hf['lm_head.weight'] = sd_hf['transformer.wte.weight']
        # OpenAI's checkpoints use Conv1D modules, which store these weights transposed relative to nn.Linear
        transposed = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
        assert set(sd_hf) == set(sd), f"mismatched keys: {sorted(set(sd_hf) ^ set(sd))}"
        with torch.no_grad():
            for k, w in sd_hf.items():
                w = w.t() if k.endswith(transposed) else w
                assert w.shape == sd[k].shape, f"{k}: {w.shape} vs {sd[k].shape}"
                sd[k].copy_(w)
        return model

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on every >= 2-D tensor (matmul weights, embeddings), none on biases and
        LayerNorm gains; the fused kernel on CUDA."""
        params = [p for p in self.parameters() if p.requires_grad]
        optim_groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                        {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
        use_fused = device_type == 'cuda' and 'fused' in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, **(dict(fused=True) if use_fused else {}))

    def flops_per_token(self, T):
        """Training FLOPs (forward + backward) per token at context T: 6 per active parameter plus attention
        (PaLM paper, appendix B). Interleaving runs the blocks after insert_layer on 2 positions per token, each
        attending over 2T: twice their matmul FLOPs and four times their attention FLOPs."""
        cfg = self.config
        L_2T = cfg.n_layer - cfg.insert_layer if self.mixing and cfg.mix in ('interleave', 'pause') else 0
        block = sum(p.numel() for p in self.transformer.h[0].parameters())
        return 6 * (self.get_num_params(active=True) + L_2T * block) + 12 * (cfg.n_layer + 3 * L_2T) * cfg.n_embd * T

    def estimate_mfu(self, tokens_per_iter, dt, peak_flops):
        """Model FLOPs utilisation: achieved FLOP/s of `tokens_per_iter` tokens in dt seconds over the
        device's peak FLOP/s (e.g. 989e12 for an H100's bf16, 312e12 for an A100's)."""
        return self.flops_per_token(self.config.block_size) * tokens_per_iter / dt / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, steer=None, show_concepts=0):
        """Continue idx (B, T) by max_new_tokens sampled tokens. temperature 0 = greedy. With use_cache, each
        step runs only the new token through the blocks; without, it recomputes the whole (cropped) context.
        CoCoMix: the cache holds one entry per token below insert_layer and two (h_t, c_t) above it; steer
        {concept id: alpha} scales those concept logits at every position; show_concepts = n also returns the n
        top kept concepts (B, max_new_tokens, n) that each generated token was predicted from."""
        C = self.config.n_concepts if hasattr(self, 'concepts') else 0
        if (steer or show_concepts) and not C:
            raise ValueError("this model predicts no concepts (n_concepts=0 or mix='pause'): nothing to steer or show")
        if steer and not all(0 <= i < C for i in steer):
            raise ValueError(f"concept ids must be in [0, {C}); got {sorted(steer)}")
        caches, fed, shown = None, 0, []  # fed: how many tokens of idx the cache already holds
        for _ in range(max_new_tokens):
            # past block_size the window slides and every position embedding shifts: recompute from then on
            cached = use_cache and idx.size(1) <= self.config.block_size
            if cached and caches is None:
                caches, fed = self.new_caches(), 0
            logits, _ = self(idx[:, fed:] if cached else idx[:, -self.config.block_size:], caches=caches if cached else None,
                              steer=steer)
            fed = idx.size(1)
            if show_concepts:
                shown.append(self.concept_ids[:, -1, :show_concepts])
            logits = logits[:, -1, :]
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float('Inf')
                idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return (idx, torch.stack(shown, 1)) if show_concepts else idx


# -----------------------------------------------------------------------------
# Memory: the output heads' cross-entropy without their logits

CHUNK_ELEMENTS = 2 ** 25  # logits per chunk in LinearCrossEntropy: 128 MiB in fp32


class LinearCrossEntropy(torch.autograd.Function):
    """loss = mean over labelled slots of CE(x W^T + b, label): the next-token loss (one label per row) and
    the concept loss (1/k_attr) sum_i CE(z, label_i) (Eq. 2 of the paper; -1 = no label), plus, for concepts, the
    top-k logits and their ids. What it buys: the (N, V) or (N, C) logits and their gradient never exist at once
    (at C = 32768 and 16K tokens they are 2 GiB each): forward walks over row chunks and computes the gradient of
    each chunk on the spot, so backward only scales it, and nothing is recomputed."""

    @staticmethod
    def forward(ctx, x, weight, bias, labels, topk, with_grad):
        N = x.size(0)
        chunk = max(1, CHUNK_ELEMENTS // weight.size(0))  # rows per chunk
        valid = labels >= 0
        n_valid = valid.sum().clamp_min(1)
        loss = torch.zeros((), device=x.device)
        values, ids = [], []
        grad_x = torch.empty_like(x) if with_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if with_grad else None
        grad_b = torch.zeros(weight.size(0), device=x.device) if with_grad and bias is not None else None
        for s in range(0, N, chunk):
            xs, lab, v = x[s:s + chunk], labels[s:s + chunk].clamp_min(0), valid[s:s + chunk]
            z = F.linear(xs, weight.to(xs.dtype), None if bias is None else bias.to(xs.dtype)).float()
            if topk:
                top = z.topk(topk, dim=-1)
                values.append(top.values), ids.append(top.indices)
            lse = z.logsumexp(-1, keepdim=True)
            loss += ((lse - z.gather(-1, lab)) * v).sum()
            if with_grad:  # dloss/dz = (softmax(z) * labels in the row - one-hot of each label) / n_valid
                g = ((z - lse).exp_().mul_(v.sum(-1, keepdim=True)).scatter_add_(-1, lab, -v.float()) / n_valid)
                grad_x[s:s + chunk] = (g.to(xs.dtype) @ weight.to(xs.dtype)).to(x.dtype)
                grad_w += g.t() @ xs.float()
                if grad_b is not None:
                    grad_b += g.sum(0)
        ctx.save_for_backward(grad_x, grad_w, grad_b, x, weight, torch.cat(ids) if topk else None)
        return loss / n_valid, torch.cat(values) if topk else None, torch.cat(ids) if topk else None

    @staticmethod
    def backward(ctx, grad_loss, grad_values, _):
        grad_x, grad_w, grad_b, x, weight, ids = ctx.saved_tensors
        grad_x, grad_w = grad_x * grad_loss, grad_w * grad_loss
        grad_b = grad_b * grad_loss if grad_b is not None else None
        if grad_values is not None:  # the kept logits feed the compression: sparse, k rows of W per position
            grad_x = grad_x + F.embedding_bag(ids, weight, per_sample_weights=grad_values.to(weight.dtype), mode='sum').to(x.dtype)
            grad_w = grad_w.index_add(0, ids.flatten(), (grad_values.unsqueeze(-1) * x.unsqueeze(1)).flatten(0, 1).float())
            if grad_b is not None:
                grad_b = grad_b.index_add(0, ids.flatten(), grad_values.flatten().float())
        return grad_x, grad_w.to(weight.dtype), None if grad_b is None else grad_b.to(weight.dtype), None, None, None


def linear_cross_entropy(x, weight, bias, labels, topk=0):
    """x (..., d), labels (..., k) -> (loss, top-k logits (..., topk), their ids) through LinearCrossEntropy."""
    shape = x.shape[:-1]
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    loss, values, ids = LinearCrossEntropy.apply(x.reshape(-1, x.size(-1)), weight, bias, labels.reshape(-1, labels.size(-1)),
                                                 topk, needs_grad)
    return loss, None if values is None else values.view(*shape, topk), None if ids is None else ids.view(*shape, topk)


# -----------------------------------------------------------------------------
# Checkpoints and loading, shared by train.py, sample.py and every script that needs a trained model

def save_checkpoint(checkpoint, out_dir, name='ckpt.pt'):
    with atomic_path(os.path.join(out_dir, name)) as tmp:
        torch.save(checkpoint, tmp)


def load_checkpoint(out_dir, device='cpu', name='ckpt.pt'):
    path = os.path.join(out_dir, name)
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}; train one with train.py (out_dir={out_dir})")
    try:
        return torch.load(path, map_location=device, weights_only=True)  # plain data only: no code runs on load
    except Exception as e:  # truncated or not a checkpoint: say so in one line
        raise UserError(f"cannot read the checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                        "it is truncated or not a checkpoint: restore it or train again")


def fingerprint(tensors):
    """A short hash of a module's weights or a state dict: the identity of a teacher or an SAE, recorded in
    checkpoints and label caches so that a different one (even at the same path) is refused."""
    h = hashlib.sha256()
    items = tensors.state_dict() if isinstance(tensors, nn.Module) else tensors
    for k in sorted(items):
        v = items[k]
        if torch.is_tensor(v):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def load_model(spec, device='cpu', dropout=None):
    """'gpt2', 'gpt2-medium', ..., a transformers directory, or a train.py out_dir -> (model in eval mode,
    the checkpoint or None)."""
    if os.path.isdir(spec) and not os.path.exists(os.path.join(spec, 'config.json')):
        checkpoint = load_checkpoint(spec, device)
        model_args = dict(checkpoint['model_args'], **({} if dropout is None else {'dropout': dropout}))
        model = GPT(GPTConfig(**model_args))
        model.load_state_dict(checkpoint['model'])
    elif spec.startswith('gpt2') or os.path.isdir(spec):
        checkpoint, model = None, GPT.from_pretrained(spec, {} if dropout is None else {'dropout': dropout})
    else:
        raise UserError(f"'{spec}' is neither gpt2* nor a folder holding ckpt.pt or a transformers config.json")
    return model.to(device).eval(), checkpoint


def hub_folder(name):
    """The local folder of a GPT-2 model on the Hugging Face hub: from the hub cache, else downloaded. Without a
    connection this fails in seconds, not after minutes of retries."""
    from huggingface_hub import constants, snapshot_download  # installed with datasets
    patterns = ['config.json', 'model.safetensors']
    try:
        return snapshot_download(name, allow_patterns=patterns, local_files_only=True)
    except Exception:  # not cached yet
        pass
    fix = (f"on a machine with internet run `huggingface-cli download {name} config.json model.safetensors "
           f"--local-dir DIR`, copy DIR here and pass its path instead of '{name}'")
    check_hub(f"'{name}'", fix)
    try:
        return snapshot_download(name, allow_patterns=patterns)
    except Exception as e:
        raise UserError(f"cannot download '{name}' from the Hugging Face hub ({type(e).__name__}); {fix}")


def read_safetensors(path):
    """A .safetensors file -> {name: tensor}: an 8-byte header length, a JSON header of dtypes, shapes and byte
    offsets, then the raw bytes (the format is that simple, so no package is needed for it)."""
    dtypes = {'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16, 'F64': torch.float64,
              'I64': torch.int64, 'I32': torch.int32, 'U8': torch.uint8, 'BOOL': torch.bool}
    with open(path, 'rb') as f:
        n = int.from_bytes(f.read(8), 'little')
        header, data = json.loads(f.read(n)), bytearray(f.read())
    out = {}
    for name, info in header.items():
        if name != '__metadata__':
            start, end = info['data_offsets']
            dtype = dtypes[info['dtype']]
            out[name] = torch.frombuffer(data, dtype=dtype, count=(end - start) // dtype.itemsize,
                                         offset=start).view(info['shape']) if end > start else \
                torch.empty(info['shape'], dtype=dtype)
    return out


def model_tokenizer(model, checkpoint):
    """The tokenizer of a model from load_model, for prepare.check_tokenizers: GPT-2's for OpenAI's weights, the
    recorded one for our checkpoints (only the vocabulary size for those that predate it)."""
    if checkpoint is None:
        return {'tokenizer': 'gpt2'}
    return checkpoint.get('data_meta', {'vocab_size': model.config.vocab_size})


def autocast(device, dtype):
    """The mixed-precision context of a script's `dtype` setting: none for float32, else torch.autocast."""
    if dtype not in ('float32', 'bfloat16', 'float16'):
        raise UserError(f"unknown dtype '{dtype}'; use float32, bfloat16 or float16")
    return nullcontext() if dtype == 'float32' else \
        torch.autocast('cuda' if 'cuda' in str(device) else 'cpu', dtype=getattr(torch, dtype))


def guess_peak_flops(device, dtype):
    """Peak dense FLOP/s for MFU when none is configured: the datasheet figure of common GPUs, else a rough
    figure for a CPU (about 100 GFLOP/s fp32 on 2 cores)."""
    if 'cuda' in str(device):
        name = torch.cuda.get_device_name(device)
        bf16 = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'L4': 121e12, 'A10': 125e12, '4090': 165e12}
        for key, flops in bf16.items():
            if key in name:
                return flops if dtype != 'float32' else flops / 16  # TF32 off: roughly fp32 CUDA-core rate
        return 100e12
    return 50e9 * max(1, torch.get_num_threads())
