"""Our CoCoMix against the authors' released code (facebookresearch/RAM, projects/cocomix), on tiny random models
with the same weights: next-token and concept logits, both losses, every gradient, and the attribution labels.

    git clone https://github.com/facebookresearch/RAM
    pip install --target /tmp/tf4 --no-deps transformers==4.44.2 tokenizers==0.19.1 huggingface-hub==0.24.6
    COCOMIX_OFFICIAL=RAM PYTHONPATH=/tmp/tf4 python -m pytest tests/test_faithfulness.py

Their code pins transformers 4.44.2 and imports internals that later versions moved; it also wants blobfile and
transformer_lens, which only their GPT-2 download and hook API use: the test stands in for both (a hook on the
block's output of a transformers GPT-2 with the teacher's weights). Skipped unless COCOMIX_OFFICIAL is set."""
import importlib
import os
import sys
import types
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

ROOT = os.environ.get('COCOMIX_OFFICIAL', '')
pytestmark = pytest.mark.skipif(not ROOT, reason="set COCOMIX_OFFICIAL to a checkout of facebookresearch/RAM")
B, T, V, d, C, K, K_ATTR, LAYERS, INSERT = 2, 16, 64, 32, 48, 8, 4, 3, 1
TRANSPOSED = ('c_attn.weight', 'c_proj.weight', 'c_fc.weight', 'compress_layer.weight')  # theirs (in, out)


@pytest.fixture(scope='module')
def official():
    """Their modules: models.modeling_gpt2_cocomix and models.concept_extractor."""
    sys.modules.setdefault('blobfile', types.ModuleType('blobfile'))
    lens = types.ModuleType('transformer_lens')
    lens.HookedTransformer, lens.ActivationCache = None, lambda cache, model: cache
    sys.modules.setdefault('transformer_lens', lens)
    sys.path.insert(0, os.path.join(ROOT, 'projects', 'cocomix'))
    try:
        return tuple(importlib.import_module(f'models.{m}') for m in ('modeling_gpt2_cocomix', 'concept_extractor'))
    except ImportError as e:
        pytest.skip(f"the authors' code does not import here ({e}); it pins transformers==4.44.2")


def gpt2_config(**kw):
    from transformers import GPT2Config
    cfg = GPT2Config(vocab_size=V, n_positions=2 * T, n_embd=d, n_layer=LAYERS, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, activation_function='gelu_new', **kw)
    cfg._attn_implementation = 'eager'
    return cfg


def ours_from(theirs):
    """Our GPT with their weights: Conv1D weights transposed, compress_layer (d, C) as our (C, d) rows."""
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(block_size=2 * T, vocab_size=V, n_layer=LAYERS, n_head=2, n_embd=d, bias=True,
                          n_concepts=C, concept_topk=K, insert_layer=INSERT, mix='interleave'))
    names = {'transformer.pre_bias': 'concepts.pre_bias', 'transformer.concept_predictor.weight':
             'concepts.concept_head.weight', 'transformer.concept_predictor.bias': 'concepts.concept_head.bias',
             'transformer.compress_layer.weight': 'concepts.compress.weight',
             'transformer.compress_layer.bias': 'concepts.compress_bias'}
    mapping = {}
    sd = model.state_dict()
    with torch.no_grad():
        for k, w in theirs.state_dict().items():
            if k.endswith(('.attn.bias', '.attn.masked_bias')) or k == 'lm_head.weight':
                continue
            mapping[k] = names.get(k, k)
            sd[mapping[k]].copy_(w.t() if k.endswith(TRANSPOSED) else w)
    assert set(mapping.values()) | {'lm_head.weight'} == set(sd)
    return model, mapping


def test_student_matches_the_official_model(official):
    modeling, _ = official
    torch.manual_seed(0)
    theirs = modeling.GPT2CoCoMixLMHeadModel(gpt2_config(), concept_dim=C, insert_layer_idx=INSERT, concept_num=K)
    with torch.no_grad():  # move every weight off its init (zero biases, unit gains) so each one is tested
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours, mapping = ours_from(theirs)
    idx, labels = torch.randint(V, (B, T)), torch.randint(C, (B, T, K_ATTR))
    lam = 0.1

    out, z_theirs = theirs(input_ids=idx, labels=idx, get_concept_logit=True)
    concept_theirs = sum(F.cross_entropy(z_theirs.reshape(-1, C), labels[..., i].reshape(-1)) / K_ATTR
                         for i in range(K_ATTR))
    (out.loss + lam * concept_theirs).backward()

    logits, loss, rec = ours(idx, F.pad(idx[:, 1:], (0, 1), value=-1), labels)  # the training path
    (loss + lam * rec['concept']).backward()
    assert torch.allclose(logits, out.logits, atol=1e-5, rtol=0)
    assert torch.allclose(loss, out.loss, atol=1e-6) and torch.allclose(rec['concept'], concept_theirs, atol=1e-6)
    with torch.no_grad():
        z_ours = ours(idx, F.pad(idx[:, 1:], (0, 1), value=-1))[2]['concept_logits']
    assert torch.allclose(z_ours, z_theirs, atol=1e-5, rtol=0)
    ours_params = dict(ours.named_parameters())
    for k, p in theirs.named_parameters():
        if k == 'lm_head.weight':  # tied to wte: one gradient, compared there
            continue
        g = ours_params[mapping[k]].grad
        g = g.t() if k.endswith(TRANSPOSED) else g
        assert (g - p.grad).norm() <= 1e-4 * p.grad.norm() + 1e-8, k


def test_labels_match_the_official_attribution(official, tmp_path):
    from transformers import GPT2LMHeadModel
    from attribution import concept_labels
    from model import GPT
    from sae import load_sae
    _, extractor = official
    layer, n_latents, k = 1, 96, 8
    torch.manual_seed(1)
    teacher_hf = GPT2LMHeadModel(gpt2_config()).eval()
    teacher_hf.save_pretrained(tmp_path / 'teacher', safe_serialization=True)
    teacher = GPT.from_pretrained(str(tmp_path / 'teacher')).eval()
    W = F.normalize(torch.randn(d, n_latents), dim=0)
    state = {'encoder.weight': W.t() * 2.0, 'decoder.weight': W, 'pre_bias': torch.randn(d) * 0.1,
             'latent_bias': torch.randn(n_latents) * 0.1,
             'stats_last_nonzero': torch.zeros(n_latents, dtype=torch.long),
             'latents_activation_frequency': torch.ones(n_latents), 'latents_mean_square': torch.zeros(n_latents),
             'activation': 'TopK', 'activation_state_dict': {'k': k, 'postact_fn': 'ReLU'}}  # OpenAI's format
    torch.save(state, tmp_path / 'sae.pt')
    sae = load_sae(str(tmp_path / 'sae.pt'))[0]

    class Hooked:  # transformer_lens's hook interface over the transformers teacher, for their labeller
        def __init__(self):
            self.hooks = {}

        def add_hook(self, name, fn, kind):
            self.hooks[kind] = (name, fn)

        def reset_hooks(self):
            self.hooks = {}

        def __call__(self, tokens):
            def at_block_output(module, args, output):
                h = output[0]
                for kind, (name, fn) in self.hooks.items():  # a backward hook gets dL/dh when backward passes h
                    hook = SimpleNamespace(name=name)
                    h.register_hook(lambda g, fn=fn, hook=hook: fn(g, hook)) if kind == 'bwd' else fn(h, hook)
            handle = teacher_hf.transformer.h[layer].register_forward_hook(at_block_output)
            try:
                return teacher_hf(tokens).logits
            finally:
                handle.remove()

    labeller = extractor.TransformerLensSAE.__new__(extractor.TransformerLensSAE)
    torch.nn.Module.__init__(labeller)
    labeller.base_model, labeller.transformer_lens_loc = Hooked(), f'blocks.{layer}.hook_resid_post'
    labeller.autoencoder = importlib.import_module('models.sparse_autoencoder').Autoencoder.from_state_dict(
        dict(state, activation_state_dict=dict(state['activation_state_dict'])))  # it pops keys: a copy
    idx = torch.randint(V, (B, T))
    attribute = labeller(idx)  # (B, T, n_latents), zero off the active latents
    theirs = attribute.topk(K_ATTR, dim=-1).indices
    ours = concept_labels(teacher, sae, idx, layer, K_ATTR)
    # we write -1 where they train on scores <= 0: zeros of inactive latents, in an arbitrary tie order, where fewer
    # than k_attr latents score above 0, and everywhere at each sequence's last position (no loss, no gradient)
    given = ours >= 0
    assert given[:, :-1].float().mean() > 0.75 and not given[:, -1].any()
    assert torch.equal(ours[given], theirs[given])
    assert (attribute.gather(-1, theirs)[~given] <= 0).all()
