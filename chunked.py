"""
Memory: the output heads' cross-entropy without their logits. A reader learning the method can skip this file:
model.py calls it only where a head's logits would not fit comfortably (GPTConfig.max_logits), and
tests/test_cocomix.py checks it equal to the plain head in values and gradients.

At the paper's scale (16K tokens per micro-batch) the vocabulary head's fp32 logits and their gradient take
2 x 3.3 GB and the concept head's (C = 32768) 2 x 2.1 GB; here they never exist at once.
"""
import torch
import torch.nn.functional as F

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
            gathered = F.embedding_bag(ids, weight, per_sample_weights=grad_values.to(weight.dtype), mode='sum')
            grad_x = grad_x + gathered.to(x.dtype)
            rows = (grad_values.unsqueeze(-1) * x.unsqueeze(1)).flatten(0, 1).float()
            grad_w = grad_w.index_add(0, ids.flatten(), rows)
            if grad_b is not None:
                grad_b = grad_b.index_add(0, ids.flatten(), grad_values.flatten().float())
        return grad_x, grad_w.to(weight.dtype), None if grad_b is None else grad_b.to(weight.dtype), None, None, None


def linear_cross_entropy(x, weight, bias, labels, topk=0):
    """x (..., d), labels (..., k) -> (loss, top-k logits (..., topk), their ids) through LinearCrossEntropy."""
    shape = x.shape[:-1]
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    loss, values, ids = LinearCrossEntropy.apply(x.reshape(-1, x.size(-1)), weight, bias,
                                                 labels.reshape(-1, labels.size(-1)),
                                                 topk, needs_grad)
    return loss, None if values is None else values.view(*shape, topk), None if ids is None else ids.view(*shape, topk)
