"""
GPT-2 with CoCoMix's continuous concepts, in one file, read top to bottom.

With n_concepts = 0 this is nanoGPT's GPT-2. CoCoMix (Tack et al., "LLM Pretraining with Continuous
Concepts") adds one module, the class CoCoMix below: after insert_layer blocks the model predicts
which concepts (latents of a teacher's sparse autoencoder) are active, compresses the top ones into
one continuous vector, and GPT.forward mixes that vector into the hidden states of the later blocks.
Shapes: B batch, T time, d = n_embd channels, V vocabulary, C = n_concepts, K = concept_topk.
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
        # key, query, value projections for all heads, in a batch
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head

    def forward(self, x, cache=None):
        """x (B, T, d). cache: None, or this layer's dict of past keys and values, extended in place
        (generation): the T new positions attend to the cached ones and causally to each other."""
        B, T, d = x.size()
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (t.view(B, T, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v))
        T_past = 0
        if cache is not None:
            if 'k' in cache:
                T_past = cache['k'].size(2)
                k, v = torch.cat([cache['k'], k], dim=2), torch.cat([cache['v'], v], dim=2)
            cache['k'], cache['v'] = k, v
        dropout_p = self.attn_dropout if self.training else 0.0
        if T_past == 0:  # SDPA's own causal mask selects the flash kernels
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:  # new query i sits at position T_past + i and sees keys 0 .. T_past + i
            mask = torch.ones(T, T_past + T, dtype=torch.bool, device=x.device).tril(T_past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, d)  # re-assemble all head outputs
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate='tanh')  # GPT-2's GELU, so pretrained weights reproduce
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
    bias: bool = True  # biases in Linears and LayerNorms, as GPT-2; False: a bit better and faster
    # CoCoMix; n_concepts = 0 and pause = False give a plain GPT
    n_concepts: int = 0  # C, the SAE's latents: the concept vocabulary
    concept_topk: int = 32  # K, predicted concepts kept before compression
    insert_layer: int = 3  # blocks before the concept head
    mix: str = 'interleave'  # 'interleave' | 'add' | 'none' (predict only)
    pause: bool = False  # the pause-token baseline: a learned vector in the concept vector's place


# -----------------------------------------------------------------------------
# Which head path runs: the one place that decides

@torch.compiler.assume_constant_result  # a fixed number: torch.compile reads it once
def device_memory(device_type):
    """Bytes of memory of this kind of device: the GPU's, or the machine's."""
    if device_type == 'cuda':
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def chunked_head(n_rows, n_cols, device):
    """In training, whether a head computes its loss in chunks (chunked.py) instead of from full
    logits: only when the fp32 logits and their gradient would take more than 1/16 of the device's
    memory (they are one of many activations a step keeps). Below that the plain head is as fast."""
    return 8 * n_rows * n_cols > device_memory(device.type) // 16


# -----------------------------------------------------------------------------
# CoCoMix: the whole change to a GPT (paper Sec. 3)

def sae_norm(h):
    """OpenAI's SAE normalisation, shared by the SAE and the concept head: LN without affine,
    unbiased std, eps added to the std. Returns the normalised h and the (mu, std) that undo it."""
    mu = h.mean(dim=-1, keepdim=True)
    std = (h - mu).std(dim=-1, keepdim=True)
    return (h - mu) / (std + 1e-5), mu, std


def concept_loss(z, labels):
    """Eq. 2: (1/k_attr) sum_i CE(z, label_i), the concept logits z (..., C) against the teacher's
    labels (..., k_attr), averaged over the labelled slots (-1 = no label)."""
    valid = labels >= 0
    nll = z.float().logsumexp(-1, keepdim=True) - z.float().gather(-1, labels.clamp_min(0))
    return (nll * valid).sum() / valid.sum().clamp_min(1)


class CoCoMix(nn.Module):
    """Predict the concepts from the hidden state h after insert_layer blocks, keep the TopK logits
    and compress them into one continuous concept vector c_hat (Eq. 3)."""

    def __init__(self, config):
        super().__init__()
        C, d = config.n_concepts, config.n_embd
        self.topk = config.concept_topk
        self.pre_bias = nn.Parameter(torch.zeros(d))  # the SAE's b_pre: read as the SAE reads
        self.concept_head = nn.Linear(d, C)  # W_head, b_head
        mixes = config.mix != 'none'  # predict-only makes no concept vector
        self.compress = nn.Embedding(C, d) if mixes else None  # W_comp, a row per concept: a gather
        self.compress_bias = nn.Parameter(torch.zeros(d)) if mixes else None

    def forward(self, h, labels=None, steer=None):
        """h (B, T, d); labels (B, T, k_attr), the teacher's concepts; steer {concept id: alpha}.
        Returns c_hat (B, T, d) (None for predict-only) and a record: the concept loss (with
        labels), the logits z (B, T, C) (None when chunked), the kept ids (B, T, K), best first."""
        x, mu, std = sae_norm(h)
        x = x - self.pre_bias
        W, b = self.concept_head.weight, self.concept_head.bias
        if labels is not None and torch.is_grad_enabled() and \
                chunked_head(x[..., 0].numel(), len(W), x.device):
            z = None  # too many logits to hold: loss, gradient and TopK chunk by chunk
            loss, values, ids = linear_cross_entropy(x, W, b, labels, self.topk)
        else:
            z = self.concept_head(x)  # z = W_head x + b_head, (B, T, C)
            if steer:  # multiply chosen concepts' logits by alpha before TopK (paper Sec. 4.4)
                sel = torch.tensor(list(steer), device=z.device)
                alpha = z.new_tensor(list(steer.values()))
                z = z.index_copy(-1, sel, z.index_select(-1, sel) * alpha)
            loss = None if labels is None else concept_loss(z, labels)
            values, ids = z.topk(self.topk, dim=-1)  # the raw logits are kept, negative ones too
        record = dict(concept=loss, concept_logits=z, concept_ids=ids)
        if self.compress is None:
            return None, record
        # c_hat = (W_comp TopK(z) + b_comp + b_pre) * std + mu: a sum of K rows, no C-wide product
        W_comp = self.compress.weight
        c_hat = F.embedding_bag(ids.flatten(0, -2), W_comp, mode='sum',
                                per_sample_weights=values.flatten(0, -2).to(W_comp.dtype))
        return (c_hat.view_as(h) + self.compress_bias + self.pre_bias) * std + mu, record


# -----------------------------------------------------------------------------

@torch.no_grad()
def concept_accuracy(kept, labels):
    """For logging: the share of labels (B, T, k_attr) found among the kept concepts (B, T, K)."""
    valid = labels >= 0
    hit = (labels.unsqueeze(-1) == kept.unsqueeze(-2)).any(-1)
    return (hit & valid).sum() / valid.sum().clamp_min(1)


def kd_loss(logits, teacher_logits):
    """The KD baseline: KL(teacher || student) of the next-token distributions at temperature 1,
    averaged over positions. The student's vocabulary may be padded past the teacher's."""
    V = teacher_logits.size(-1)
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)
    log_q = F.log_softmax(logits.float(), dim=-1)[..., :V]
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        assert config.mix in ('interleave', 'add', 'none')
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
        self.transformer.wte.weight = self.lm_head.weight  # weight tying (Press & Wolf 2017)
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():  # GPT-2: residual projections at 1/sqrt(2 * n_layer)
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
        """Parameters, without the position embeddings by default (the tied token embeddings count
        once). active: as the paper counts CoCoMix, only the K compression rows a token uses."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        if active and self.concepts is not None and self.concepts.compress is not None:
            n_params -= (self.config.n_concepts - self.config.concept_topk) * self.config.n_embd
        return n_params

    # The forward pass in steps, so that a caller can stop after any block, read the hidden state
    # there (the teacher's residual stream for the SAE) and carry on.
    def embed(self, idx, pos=0):
        """idx (B, T) token ids at positions pos .. pos + T - 1 -> (B, T, d), block 0's input."""
        T = idx.size(1)
        assert pos + T <= self.config.block_size, \
            f"cannot forward {pos + T} positions, block_size is only {self.config.block_size}"
        positions = torch.arange(pos, pos + T, dtype=torch.long, device=idx.device)
        return self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))

    def run_blocks(self, x, start=0, stop=None, cache=None):
        """Blocks start .. stop-1 on x (B, T, d); cache: new_cache()'s list, one dict per block."""
        for i in range(start, self.config.n_layer if stop is None else stop):
            x = self.transformer.h[i](x, None if cache is None else cache[i])
        return x

    def head(self, x, targets=None, logits=False):
        """Final LN and the tied unembedding: x (B, T, d) -> (logits (B, T, V), mean cross-entropy
        against targets (B, T), -1 = none). In training, when chunked_head finds the logits too big,
        the loss comes in chunks and the logits are None, unless the caller asks for them (KD)."""
        x = self.transformer.ln_f(x)
        V = self.config.vocab_size
        if targets is not None and not logits and torch.is_grad_enabled() and \
                chunked_head(x[..., 0].numel(), V, x.device):
            return None, linear_cross_entropy(x, self.lm_head.weight, None, targets[..., None])[0]
        logits = self.lm_head(x)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, V).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def forward(self, idx, targets=None, concept_labels=None, cache=None, pos=0, steer=None,
                logits=False):
        """idx (B, T) tokens at positions pos .. pos + T - 1 -> (logits, loss, record). With
        targets: every position's logits and the mean next-token loss; without: the last position's
        logits, all that sampling needs. record: CoCoMix's concept loss, logits and kept ids."""
        x = self.embed(idx, pos)
        record = {}
        if self.concepts is None and self.pause is None:
            x = self.run_blocks(x, cache=cache)
        else:
            L = self.config.insert_layer
            h = self.run_blocks(x, stop=L, cache=cache)  # (B, T, d)
            if self.pause is not None:  # the baseline: a learned vector, the same at every position
                c_hat = self.pause.expand_as(h)
            else:
                c_hat, record = self.concepts(h, concept_labels, steer)  # (B, T, d) or None
            if self.config.mix == 'interleave' or self.pause is not None:
                # (h_1, c_1, h_2, c_2, ...): 2T positions under the plain causal mask; read out at
                # the concept positions, so c_t predicts token t + 1
                x = torch.stack((h, c_hat), dim=2).flatten(1, 2)
                x = self.run_blocks(x, start=L, cache=cache)[:, 1::2]
            elif self.config.mix == 'add':
                x = self.run_blocks(h + c_hat, start=L, cache=cache)
            else:  # predict only: the concept loss trains the lower blocks, the stream is untouched
                x = self.run_blocks(h, start=L, cache=cache)
        logits, loss = self.head(x if targets is not None else x[:, [-1], :], targets, logits)
        return logits, loss, record

    def new_cache(self):
        return [{} for _ in range(self.config.n_layer)]

    def crop_block_size(self, block_size):
        """Shrink the context (e.g. a pretrained 1024 model to 256)."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    @classmethod
    def from_pretrained(cls, folder, dropout=0.0, **extra):
        """GPT-2 weights from a folder with config.json and model.safetensors or pytorch_model.bin
        (the hub's files, or save_pretrained's). extra: CoCoMix or pause settings; those parts start
        freshly initialised on the pretrained model. Needs neither transformers nor safetensors."""
        with open(os.path.join(folder, 'config.json')) as f:
            hf = json.load(f)
        assert hf.get('activation_function', 'gelu_new') in ('gelu_new', 'gelu_pytorch_tanh')
        model = cls(GPTConfig(block_size=hf['n_positions'], vocab_size=hf['vocab_size'], bias=True,
                              n_layer=hf['n_layer'], n_head=hf['n_head'], n_embd=hf['n_embd'],
                              dropout=dropout, **extra))
        path = os.path.join(folder, 'model.safetensors')
        from common import read_safetensors  # here: common imports this file
        sd_hf = read_safetensors(path) if os.path.exists(path) else torch.load(
            os.path.join(folder, 'pytorch_model.bin'), map_location='cpu', weights_only=True)
        # the hub's files name GPT2Model's weights (h.0...), save_pretrained GPT2LMHeadModel's
        # (transformer.h.0...); lm_head is tied to wte, and the attention masks are buffers
        sd_hf = {'transformer.' + k.removeprefix('transformer.'): v for k, v in sd_hf.items()
                 if not k.endswith(('.attn.masked_bias', '.attn.bias', 'lm_head.weight'))}
        sd_hf['lm_head.weight'] = sd_hf['transformer.wte.weight']
        # OpenAI's checkpoints use Conv1D modules, which store these weights transposed
        transposed = ('c_attn.weight', 'attn.c_proj.weight', 'c_fc.weight', 'mlp.c_proj.weight')
        sd = {k: v for k, v in model.state_dict().items()  # the new parts keep their initialisation
              if not k.startswith(('concepts.', 'pause'))}
        assert set(sd_hf) == set(sd), f"mismatched keys: {sorted(set(sd_hf) ^ set(sd))}"
        with torch.no_grad():
            for k, w in sd_hf.items():
                w = w.t() if k.endswith(transposed) else w
                assert w.shape == sd[k].shape, f"{k}: {w.shape} vs {sd[k].shape}"
                sd[k].copy_(w)
        return model

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on every >= 2-D tensor (matmul weights, embeddings), none on
        biases and LayerNorm gains; the fused kernel on CUDA."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                  {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
        fused = device_type == 'cuda' or None  # None: PyTorch's default kernel
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    def flops_per_token(self, T):
        """Training FLOPs (forward and backward) per token at context T: 6 per active parameter plus
        attention (PaLM, appendix B). Interleaving runs the blocks after insert_layer on 2 positions
        per token, each attending over 2T: twice their matmul, four times their attention FLOPs."""
        cfg = self.config
        interleaved = cfg.pause or (cfg.n_concepts and cfg.mix == 'interleave')
        L_2T = cfg.n_layer - cfg.insert_layer if interleaved else 0
        block = sum(p.numel() for p in self.transformer.h[0].parameters())
        return 6 * (self.get_num_params(active=True) + L_2T * block) + \
            12 * (cfg.n_layer + 3 * L_2T) * cfg.n_embd * T

    def check_concepts(self, steer, show_concepts):  # generate's checks; sample.py makes them first
        C = self.config.n_concepts
        if (steer or show_concepts) and not C:
            raise ValueError("this model predicts no concepts: nothing to steer or show")
        if steer and not all(0 <= i < C for i in steer):
            raise ValueError(f"concept ids must be in [0, {C}); got {sorted(steer)}")

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, steer=None,
                 show_concepts=0):
        """Continue idx (B, T) by max_new_tokens sampled tokens; temperature 0 = greedy. With
        use_cache, each step runs only the new token through the blocks (CoCoMix: one cache entry
        per token below insert_layer, two above it). steer {concept id: alpha} scales those concept
        logits; show_concepts = n also returns each new token's n top concepts (B, new, n)."""
        self.check_concepts(steer, show_concepts)
        cache, fed, shown = None, 0, []  # fed: how many tokens of idx the cache holds
        for _ in range(max_new_tokens):
            # past block_size the window slides and every position shifts: recompute from then on
            cached = use_cache and idx.size(1) <= self.config.block_size
            if cached and cache is None:
                cache, fed = self.new_cache(), 0
            if cached:
                logits, _, record = self(idx[:, fed:], cache=cache, pos=fed, steer=steer)
            else:
                logits, _, record = self(idx[:, -self.config.block_size:], steer=steer)
            fed = idx.size(1)
            if show_concepts:
                shown.append(record['concept_ids'][:, -1, :show_concepts])
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

