"""Memory, not method (a reader learning CoCoMix can skip it): same numbers, smaller temporaries."""
import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 2 ** 25  # logits per chunk


def gathered_grads(grad, ids, x, weight):
    """dL/dx, dL/dW, dL/db of out = (x W^T + b).gather(-1, ids), ids (N, K), from grad = dL/dout,
    without a dense (N, C) temporary."""
    grad, x = grad.to(weight.dtype), x.to(weight.dtype)
    grad_x = F.embedding_bag(ids, weight, per_sample_weights=grad, mode='sum')
    if torch.compiler.is_compiling():  # compile cannot trace sparse tensors
        grad_w = torch.zeros_like(weight)
        for j in range(ids.size(1)):
            grad_w.index_add_(0, ids[:, j], grad[:, j, None] * x)
    else:
        rows = torch.arange(len(ids), device=ids.device).repeat_interleave(ids.size(1))
        chosen = torch.sparse_coo_tensor(torch.stack([ids.flatten(), rows]), grad.flatten(),
                                         (len(weight), len(ids)), check_invariants=False)
        grad_w = torch.sparse.mm(chosen, x)
    grad_b = torch.zeros_like(weight[:, 0]).index_add_(0, ids.flatten(), grad.flatten())
    return grad_x, grad_w, grad_b


class LinearCrossEntropy(torch.autograd.Function):
    """CE(x W^T + b, labels) averaged over labelled slots (-1 = none), and the top-k logits and
    ids, a chunk of rows at a time: forward computes each chunk's gradient on the spot."""

    @staticmethod
    def forward(ctx, x, weight, bias, labels, topk):
        needs = ctx.needs_input_grad  # x, weight, bias (grad is on: chunked_head)
        chunk = max(1, CHUNK_ELEMENTS // weight.size(0))  # rows per chunk
        valid = labels >= 0
        n_valid = valid.sum().clamp_min(1)
        loss = torch.zeros((), device=x.device)
        tops = []
        grad_x = torch.empty_like(x) if needs[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if needs[1] else None
        grad_b = torch.zeros(weight.size(0), device=x.device) if needs[2] else None
        w, b = weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
        for s in range(0, x.size(0), chunk):
            xs, lab, v = x[s:s + chunk], labels[s:s + chunk].clamp_min(0), valid[s:s + chunk]
            z = F.linear(xs, w, b).float()
            if topk:
                tops.append(z.topk(topk, dim=-1))
            lse = z.logsumexp(-1, keepdim=True)
            loss += ((lse - z.gather(-1, lab)) * v).sum()
            # dloss/dz = (softmax(z) * labels in row - one-hot of each) / n_valid, divided in
            # backward with the loss scale: p / n_valid (~1e-8 at 4,096 positions) is zero in fp16
            if any(needs):
                g = (z - lse).exp_().mul_(v.sum(-1, keepdim=True)).scatter_add_(-1, lab, -v.float())
                if needs[0]:
                    grad_x[s:s + chunk] = g.to(x.dtype) @ w
                if needs[1]:
                    grad_w += g.t() @ xs.float()
                if needs[2]:
                    grad_b += g.sum(0)
        values, ids = map(torch.cat, zip(*tops)) if topk else (None, None)
        ctx.save_for_backward(grad_x, grad_w, grad_b, x, weight, ids, n_valid)
        return loss / n_valid, values, ids

    @staticmethod
    def backward(ctx, grad_loss, grad_values, _):
        *grads, x, weight, ids, n_valid = ctx.saved_tensors  # grads: x, weight, bias, or None
        grads = [None if g is None else g.float() * (grad_loss / n_valid) for g in grads]
        if grad_values is not None:  # the top-k logits' share
            extra = gathered_grads(grad_values, ids, x, weight)
            grads = [None if g is None else g + e.float() for g, e in zip(grads, extra)]
        dtypes = x.dtype, weight.dtype, weight.dtype
        return (*[None if g is None else g.to(t) for g, t in zip(grads, dtypes)], None, None)


def linear_cross_entropy(x, weight, bias, labels, topk=0):
    """x (..., d), labels (..., k) -> (loss, top-k logits (..., topk), their ids)."""
    out = LinearCrossEntropy.apply(x.flatten(0, -2), weight, bias, labels.flatten(0, -2), topk)
    return (out[0], *[t.view(*x.shape[:-1], topk) for t in out[1:]]) if topk else out
