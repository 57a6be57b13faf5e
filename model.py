"""GPT-2 with CoCoMix (Tack et al., "LLM Pretraining with Continuous Concepts"); n_concepts = 0:
nanoGPT's GPT-2. CoCoMix predicts a teacher SAE's active concepts after insert_layer blocks and
mixes a continuous vector made of them into the later blocks.
Shapes: B batch, T time, d = n_embd, V vocabulary, C = n_concepts, K = concept_topk.
"""
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from chunked import linear_cross_entropy


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head

    def forward(self, x, cache=None):
        """cache: this layer's past keys and values, extended in place."""
        B, T, d = x.size()
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (t.view(B, T, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            if cache:
                k, v = torch.cat([cache['k'], k], dim=2), torch.cat([cache['v'], v], dim=2)
            cache['k'], cache['v'] = k, v
        T_past = k.size(2) - T
        dropout_p = self.attn_dropout if self.training else 0.0
        mask = None  # is_causal selects the flash kernels
        if T_past:  # query i, at T_past + i, sees keys 0 .. T_past + i
            mask = torch.ones(T, T_past + T, dtype=torch.bool, device=x.device).tril(T_past)
        y = F.scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal=mask is None)
        y = y.transpose(1, 2).contiguous().view(B, T, d)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate='tanh')  # GPT-2's
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # as GPT-2; False: a bit better and faster
    # CoCoMix
    n_concepts: int = 0  # C, the SAE's latents
    concept_topk: int = 32  # K, concepts kept
    insert_layer: int = 3  # blocks before the concept head
    mix: str = 'interleave'  # 'interleave' | 'add' | 'none' (predict only)
    pause: bool = False  # baseline: a learned c_hat


def read_safetensors(path):
    """A .safetensors file -> {name: tensor}: an 8-byte length, a JSON header, the raw bytes."""
    dtypes = {'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16}
    with open(path, 'rb') as f:
        header, data = json.loads(f.read(int.from_bytes(f.read(8), 'little'))), bytearray(f.read())
    header.pop('__metadata__', None)
    out = {}
    for name, info in header.items():
        raw, dtype = data[slice(*info['data_offsets'])], dtypes[info['dtype']]
        tensor = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        out[name] = tensor.view(info['shape'])
    return out


def device_memory(device_type):
    if device_type == 'cuda':
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


# compile reads it once: assume_constant_result's mark, without the compiler's slow import
device_memory._dynamo_marked_constant = True


def chunked_head(x, n_cols):
    """Chunk a head's training loss (chunked.py) if fp32 logits and gradient fill 1/16 of memory."""
    n_rows = x[..., 0].numel()
    return torch.is_grad_enabled() and 8 * n_rows * n_cols > device_memory(x.device.type) // 16


# -----------------------------------------------------------------------------
# CoCoMix: the whole change to a GPT (paper Sec. 3)

def sae_norm(h):
    """OpenAI's SAE normalisation: LN without affine, unbiased std, eps on the std."""
    mu = h.mean(dim=-1, keepdim=True)
    std = (h - mu).std(dim=-1, keepdim=True)
    return (h - mu) / (std + 1e-5), mu, std


def concept_loss(z, labels):
    """Eq. 2: CE of the logits z (..., C) against each label (..., k_attr), -1 = none."""
    valid = labels >= 0
    nll = z.float().logsumexp(-1, keepdim=True) - z.float().gather(-1, labels.clamp_min(0))
    return (nll * valid).sum() / valid.sum().clamp_min(1)


class CoCoMix(nn.Module):
    """Predict concepts from h, keep the TopK logits and compress them into c_hat (Eq. 3)."""

    def __init__(self, config):
        super().__init__()
        C, d = config.n_concepts, config.n_embd
        self.topk = config.concept_topk
        self.pre_bias = nn.Parameter(torch.zeros(d))  # the SAE's b_pre: h read as the SAE reads it
        self.concept_head = nn.Linear(d, C)  # W_head, b_head
        assert config.mix in ('interleave', 'add', 'none'), f"unknown mix {config.mix!r}"
        mixes = config.mix != 'none'  # predict-only: no c_hat
        self.compress = nn.Embedding(C, d) if mixes else None  # W_comp, a row per concept
        self.compress_bias = nn.Parameter(torch.zeros(d)) if mixes else None

    def forward(self, h, labels=None, steer=None):
        """h (B, T, d) after insert_layer blocks, labels (B, T, k_attr), steer {concept: alpha}
        -> c_hat (B, T, d) or None, and a record: concept loss, logits z or None if chunked,
        kept ids (B, T, K), best first."""
        x, mu, std = sae_norm(h)
        x = x - self.pre_bias
        W, b = self.concept_head.weight, self.concept_head.bias
        if labels is not None and chunked_head(x, len(W)):
            z = None  # too many logits to hold
            loss, values, ids = linear_cross_entropy(x, W, b, labels, self.topk)
        else:
            z = self.concept_head(x)  # z = W_head x + b_head, (B, T, C)
            if steer:  # scale chosen concepts' logits before TopK (Sec. 4.4)
                sel = torch.tensor(list(steer), device=z.device)
                z = z.index_copy(-1, sel, z[..., sel] * z.new_tensor(list(steer.values())))
            loss = None if labels is None else concept_loss(z, labels)
            values, ids = z.topk(self.topk, dim=-1)  # raw logits, negative ones too
        record = dict(concept=loss, concept_logits=z, concept_ids=ids)
        if self.compress is None:
            return None, record
        # c_hat = (W_comp TopK(z) + b_comp + b_pre) * std + mu: a sum of K rows of W_comp
        W_comp = self.compress.weight
        c_hat = F.embedding_bag(ids.flatten(0, -2), W_comp, mode='sum',
                                per_sample_weights=values.flatten(0, -2).to(W_comp.dtype))
        return (c_hat.view_as(h) + self.compress_bias + self.pre_bias) * std + mu, record


@torch.no_grad()
def concept_accuracy(kept, labels):
    """Share of labels (B, T, k_attr) among the kept concepts (B, T, K)."""
    valid = labels >= 0
    hit = (labels[..., None] == kept[..., None, :]).any(-1)
    return (hit & valid).sum() / valid.sum().clamp_min(1)


def kd_loss(logits, teacher_logits):
    """KD baseline: KL(teacher || student) per position, averaged; the student's V may be padded."""
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)
    log_q = F.log_softmax(logits.float(), dim=-1)[..., :teacher_logits.size(-1)]
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.concepts = CoCoMix(config) if config.n_concepts else None
        self.pause = nn.Parameter(torch.randn(config.n_embd) * 0.02) if config.pause else None
        self.transformer.wte.weight = self.lm_head.weight
        for m in self.modules():  # GPT-2's init, the random draws in nanoGPT's order
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for pn, p in self.named_parameters():  # GPT-2's scaled residual init
            if pn.endswith('c_proj.weight'):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layer))

    def get_num_params(self, active=False):
        """Without position embeddings; active: only the K compression rows a token uses (paper)."""
        n_params = sum(p.numel() for p in self.parameters()) - self.transformer.wpe.weight.numel()
        if active and self.config.n_concepts and self.config.mix != 'none':
            n_params -= (self.config.n_concepts - self.config.concept_topk) * self.config.n_embd
        return n_params

    # The forward pass in steps, to read the hidden state after any block
    def embed(self, idx, pos=0):
        """idx (B, T) at positions pos .. pos + T - 1 -> (B, T, d)."""
        T = idx.size(1)
        assert pos + T <= self.config.block_size, \
            f"cannot forward {pos + T} positions, block_size is only {self.config.block_size}"
        positions = torch.arange(pos, pos + T, device=idx.device)
        return self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))

    def run_blocks(self, x, start=0, stop=None, cache=None):
        """Blocks start .. stop-1; cache: new_cache()'s list."""
        for i, block in enumerate(self.transformer.h[start:stop], start):
            x = block(x, None if cache is None else cache[i])
        return x

    def head(self, x, targets=None, logits=False):
        """-> (logits (B, T, V), mean CE, -1 = no target); no logits if chunked, unless asked."""
        x = self.transformer.ln_f(x)
        if targets is not None and not logits and chunked_head(x, self.config.vocab_size):
            return None, linear_cross_entropy(x, self.lm_head.weight, None, targets[..., None])[0]
        logits = self.lm_head(x)
        return logits, None if targets is None else F.cross_entropy(
            logits.flatten(0, -2).float(), targets.reshape(-1), ignore_index=-1)

    def forward(self, idx, targets=None, concept_labels=None, cache=None, pos=0, steer=None,
                logits=False):
        """idx (B, T) from position pos -> (logits, loss, record); no targets: last logits only."""
        x = self.embed(idx, pos)
        record = {}
        if self.concepts is None and self.pause is None:
            x = self.run_blocks(x, cache=cache)
        else:
            L = self.config.insert_layer
            h = self.run_blocks(x, stop=L, cache=cache)
            if self.pause is not None:
                c_hat = self.pause.expand_as(h)
            else:
                c_hat, record = self.concepts(h, concept_labels, steer)
            if self.config.mix == 'interleave' or self.pause is not None:
                # (h_1, c_1, h_2, c_2, ...), 2T positions under the plain causal mask: c_t sees
                # h_1..h_t and predicts token t + 1, so the readout is at the concept positions
                x = torch.stack((h, c_hat), dim=2).flatten(1, 2)
                x = self.run_blocks(x, start=L, cache=cache)[:, 1::2]
            else:  # 'add'; predict only (no c_hat): the concept loss trains the lower blocks
                x = self.run_blocks(h if c_hat is None else h + c_hat, start=L, cache=cache)
        return *self.head(x if targets is not None else x[:, [-1]], targets, logits), record

    def new_cache(self):
        return [{} for _ in range(self.config.n_layer)]

    @classmethod
    def from_pretrained(cls, folder, dropout=0.0, **extra):
        """GPT-2 from a Hugging Face folder; extra: settings of new CoCoMix or pause parts."""
        hf = json.load(open(os.path.join(folder, 'config.json')))
        assert hf.get('activation_function', 'gelu_new') in ('gelu_new', 'gelu_pytorch_tanh')
        model = cls(GPTConfig(block_size=hf['n_positions'], dropout=dropout, **extra, **{
            k: hf[k] for k in ('vocab_size', 'n_layer', 'n_head', 'n_embd')}))
        path = os.path.join(folder, 'model.safetensors')
        sd_hf = read_safetensors(path) if os.path.exists(path) else torch.load(
            os.path.join(folder, 'pytorch_model.bin'), map_location='cpu', weights_only=True)
        # keys with or without 'transformer.'; no attention masks (buffers), no tied lm_head
        sd_hf = {'transformer.' + k.removeprefix('transformer.'): v for k, v in sd_hf.items()
                 if not k.endswith(('.attn.masked_bias', '.attn.bias', 'lm_head.weight'))}
        sd = {k: v for k, v in model.state_dict().items()
              if not k.startswith(('concepts.', 'pause', 'lm_head'))}
        assert set(sd_hf) == set(sd), f"mismatched keys: {sorted(set(sd_hf) ^ set(sd))}"
        # OpenAI's Conv1D modules store these weights transposed
        for k, w in sd_hf.items():  # state_dict() is detached: no autograd
            w = w.t() if k.endswith(('c_attn.weight', 'c_proj.weight', 'c_fc.weight')) else w
            assert w.shape == sd[k].shape, f"{k}: {w.shape} vs {sd[k].shape}"
            sd[k].copy_(w)
        return model

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; no weight decay on biases and LayerNorm gains (< 2-D)."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                  {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
        fused = device_type == 'cuda' or None  # None: PyTorch's default kernel
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    def flops_per_token(self, T):
        """Training FLOPs per token (PaLM, app. B); interleaved blocks: 2x matmul, 4x attention."""
        cfg = self.config
        interleaved = cfg.pause or (cfg.n_concepts and cfg.mix == 'interleave')
        L_2T = cfg.n_layer - cfg.insert_layer if interleaved else 0
        block = sum(p.numel() for p in self.transformer.h[0].parameters())
        return 6 * (self.get_num_params(active=True) + L_2T * block) + \
            12 * (cfg.n_layer + 3 * L_2T) * cfg.n_embd * T

    def check_concepts(self, steer, show_concepts):  # sample.py runs these first
        C = self.config.n_concepts
        if (steer or show_concepts) and not C:
            raise ValueError("this model predicts no concepts: nothing to steer or show")
        if steer and not all(0 <= i < C for i in steer):
            raise ValueError(f"concept ids must be in [0, {C}); got {sorted(steer)}")

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, steer=None,
                 show_concepts=0):
        """Sample max_new_tokens after idx (B, T); show_concepts = n: also their top n concepts.
        With interleaving the cache holds one entry per token below insert_layer and two above."""
        self.check_concepts(steer, show_concepts)
        cache = self.new_cache() if use_cache else None
        fed, shown = 0, []  # fed: tokens of idx in the cache
        for _ in range(max_new_tokens):
            # past block_size the window slides and positions shift: no cache
            if cache is not None and idx.size(1) <= self.config.block_size:
                logits, _, record = self(idx[:, fed:], cache=cache, pos=fed, steer=steer)
            else:
                logits, _, record = self(idx[:, -self.config.block_size:], steer=steer)
            fed = idx.size(1)
            if show_concepts:
                shown.append(record['concept_ids'][:, -1, :show_concepts])
            logits = logits[:, -1]
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

