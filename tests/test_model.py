import math

import pytest
import torch

from common import load_model
from model import GPT, GPTConfig


def tiny_gpt(vocab=64, block_size=32, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=block_size, vocab_size=vocab, n_layer=2, n_head=2, n_embd=32,
                         dropout=dropout, bias=True)).eval()


def test_from_pretrained_matches_transformers(tiny_hf_gpt2):
    path, hf = tiny_hf_gpt2
    model = GPT.from_pretrained(path).eval()
    idx = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(idx, targets=idx)[0]
        theirs = hf(idx).logits
    assert theirs.abs().max() > 1.0  # the comparison is not between near-zero numbers
    assert (ours - theirs).abs().max().item() < 1e-4
    loaded, checkpoint = load_model(path)  # the same folder through the generic loader
    assert checkpoint is None and torch.equal(loaded(idx, targets=idx)[0], ours)


def test_initial_loss_is_uniform():
    model = tiny_gpt(vocab=512)
    g = torch.Generator().manual_seed(0)
    idx, targets = torch.randint(0, 512, (2, 4, 32), generator=g)  # independent: with tied embeddings an
    with torch.no_grad():                                            # input token is its own likeliest target
        loss = model(idx, targets=targets)[1]
    assert abs(loss.item() - math.log(512)) < 0.05


def test_cached_forward_in_chunks_equals_full_forward():
    """A cache fed 5, then 1, then 7 tokens gives the logits of one full pass (the offset causal mask)."""
    model = tiny_gpt()
    idx = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(idx, targets=idx)[0]
        cache = model.new_cache()
        parts = [model.head(model.run_blocks(model.embed(idx[:, a:b], a), cache=cache))[0]
                 for a, b in ((0, 5), (5, 6), (6, 13))]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize('new_tokens', [10, 40])  # 40 runs past block_size: the window slides
def test_kv_cache_generation_equals_recompute(new_tokens):
    model = tiny_gpt(block_size=32)
    idx = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    cached = model.generate(idx, new_tokens, temperature=0, use_cache=True)
    recomputed = model.generate(idx, new_tokens, temperature=0, use_cache=False)
    assert cached.shape == (2, 7 + new_tokens)
    assert torch.equal(cached, recomputed)
    assert torch.equal(cached[:, :7], idx)


def test_optimizer_decays_only_matrices():
    model = tiny_gpt()
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    decay, no_decay = opt.param_groups
    assert decay['weight_decay'] == 0.1 and all(p.dim() >= 2 for p in decay['params'])
    assert no_decay['weight_decay'] == 0.0 and all(p.dim() < 2 for p in no_decay['params'])
    assert len(decay['params']) + len(no_decay['params']) == len(list(model.parameters()))
