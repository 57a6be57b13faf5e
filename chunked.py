"""
Memory, not method: a reader learning CoCoMix can skip this file. Two autograd functions that give the
same numbers as the plain computation without its largest temporaries (tests/test_cocomix.py and
tests/test_sae.py check values and gradients against autograd):

- LinearCrossEntropy: a head's cross-entropy without holding its logits, used in training when
  model.chunked_head finds the logits too big (at the paper's scale, 16K tokens per micro-batch, the
  vocabulary head's fp32 logits and their gradient take 6.6 GB, the concept head's 4.3 GB);
- gathered_grads: the gradients of a few chosen outputs of a linear layer (the kept concept logits,
  the SAE's active latents) without a dense (N, C) or (N, K, d) temporary.
"""
import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 2 ** 25  # logits per chunk in LinearCrossEntropy: 128 MiB in fp32


def gathered_grads(grad, ids, x, weight):
    """out = (x W^T + b).gather(-1, ids), ids (N, K): given grad = dL/dout (N, K), returns dL/dx (N,
    d), a sum of K rows of W; dL/dW (C, d), a sparse (C, N) matrix times x; dL/db (C,)."""
    grad, x = grad.to(weight.dtype), x.to(weight.dtype)
    grad_x = F.embedding_bag(ids, weight, per_sample_weights=grad, mode='sum')
    if torch.compiler.is_compiling():  # torch.compile cannot trace sparse tensors: K scatters of (N, d)
        grad_w = torch.zeros_like(weight)
        for j in range(ids.size(1)):
            grad_w.index_add_(0, ids[:, j], grad[:, j, None] * x)
    else:  # the fastest here: a sparse (C, N) matrix, entry (i, n) = dL/dout[n] at row i, times x
        rows = torch.arange(len(ids), device=ids.device).repeat_interleave(ids.size(1))
        chosen = torch.sparse_coo_tensor(torch.stack([ids.flatten(), rows]), grad.flatten(),
                                         (len(weight), len(ids)), check_invariants=False)
        grad_w = torch.sparse.mm(chosen, x)
    grad_b = torch.zeros_like(weight[:, 0]).index_add_(0, ids.flatten(), grad.flatten())
    return grad_x, grad_w, grad_b


class LinearCrossEntropy(torch.autograd.Function):
    """loss = mean over labelled slots of CE(x W^T + b, label): the next-token loss (one label per
    row) and the concept loss of Eq. 2 (k_attr labels per row, -1 = none), plus, for concepts, the
    top-k logits and their ids. Forward walks over row chunks and computes each chunk's gradient on
    the spot, so the logits and their gradient never exist whole and nothing is recomputed."""

    @staticmethod
    def forward(ctx, x, weight, bias, labels, topk, needs):
        N = x.size(0)
        chunk = max(1, CHUNK_ELEMENTS // weight.size(0))  # rows per chunk
        valid = labels >= 0
        n_valid = valid.sum().clamp_min(1)
        loss = torch.zeros((), device=x.device)
        values, ids = [], []
        grad_x = torch.empty_like(x) if needs[0] else None  # only what needs a gradient: a frozen
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if needs[1] else None  # teacher's
        grad_b = torch.zeros(weight.size(0), device=x.device) if needs[2] else None  # head has none
        for s in range(0, N, chunk):
            xs, lab, v = x[s:s + chunk], labels[s:s + chunk].clamp_min(0), valid[s:s + chunk]
            z = F.linear(xs, weight.to(xs.dtype), None if bias is None else bias.to(xs.dtype)).float()
            if topk:
                top = z.topk(topk, dim=-1)
                values.append(top.values), ids.append(top.indices)
            lse = z.logsumexp(-1, keepdim=True)
            loss += ((lse - z.gather(-1, lab)) * v).sum()
            if any(needs):  # dloss/dz = (softmax(z) * labels in the row - one-hot of each label) / n_valid
                g = (z - lse).exp_().mul_(v.sum(-1, keepdim=True)).scatter_add_(-1, lab, -v.float())
                g /= n_valid
                if grad_x is not None:
                    grad_x[s:s + chunk] = (g.to(xs.dtype) @ weight.to(xs.dtype)).to(x.dtype)
                if grad_w is not None:
                    grad_w += g.t() @ xs.float()
                if grad_b is not None:
                    grad_b += g.sum(0)
        ids = torch.cat(ids) if topk else None
        ctx.save_for_backward(grad_x, grad_w, grad_b, x, weight, ids)
        return loss / n_valid, torch.cat(values) if topk else None, ids

    @staticmethod
    def backward(ctx, grad_loss, grad_values, _):
        grad_x, grad_w, grad_b, x, weight, ids = ctx.saved_tensors
        scale = lambda g: None if g is None else g * grad_loss
        grad_x, grad_w, grad_b = scale(grad_x), scale(grad_w), scale(grad_b)
        if grad_values is not None:  # the kept logits feed the compression: K rows of W per position
            gx, gw, gb = gathered_grads(grad_values, ids, x, weight)
            grad_x = None if grad_x is None else grad_x + gx.to(x.dtype)
            grad_w = None if grad_w is None else grad_w + gw
            grad_b = None if grad_b is None else grad_b + gb
        cast = lambda g: None if g is None else g.to(weight.dtype)
        return grad_x, cast(grad_w), cast(grad_b), None, None, None


def linear_cross_entropy(x, weight, bias, labels, topk=0):
    """x (..., d), labels (..., k) -> (loss, top-k logits (..., topk), their ids)."""
    shape = x.shape[:-1]
    grad = torch.is_grad_enabled()
    needs = (grad and x.requires_grad, grad and weight.requires_grad,
             grad and bias is not None and bias.requires_grad)
    loss, values, ids = LinearCrossEntropy.apply(x.reshape(-1, x.size(-1)), weight, bias,
                                                 labels.reshape(-1, labels.size(-1)), topk, needs)
    if not topk:
        return loss, None, None
    return loss, values.view(*shape, topk), ids.view(*shape, topk)
