"""torch.compile sees every training mode as one graph, and the compiled step computes the eager loss."""
import pytest
import torch
import torch._dynamo

from model import GPT, GPTConfig


@pytest.mark.parametrize('kind', ['ntp', 'interleave', 'add', 'none', 'pause', 'chunked'])
def test_every_mode_compiles_without_graph_breaks(monkeypatch, kind):
    import model as M
    if kind == 'chunked':  # both heads in chunks (chunked.py), as on a device without memory to spare
        monkeypatch.setattr(M, 'device_memory', torch.compiler.assume_constant_result(lambda device_type: 0))
    torch.manual_seed(0)
    concepts = kind in ('interleave', 'add', 'none', 'chunked')
    model = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32, insert_layer=1,
                          n_concepts=48 if concepts else 0, concept_topk=4, pause=kind == 'pause',
                          mix=kind if kind in ('add', 'none') else 'interleave'))
    x = torch.randint(0, 64, (2, 32))
    labels = torch.randint(-1, 48, (2, 32, 4)) if concepts else None

    def loss_of(m):
        _, loss, out = m(x, x, concept_labels=labels)
        return loss + 0.1 * out['concept'] if labels is not None else loss
    torch._dynamo.reset()
    assert torch._dynamo.explain(model)(x, x, concept_labels=labels).graph_break_count == 0
    compiled = torch.compile(model, backend='aot_eager')  # the traced graph and its autograd, without codegen
    losses = [loss_of(compiled) for _ in range(2)]
    losses[-1].backward()
    torch.testing.assert_close(losses[-1], loss_of(model))


def test_cocomix_training_step_under_inductor_equals_eager(monkeypatch):
    """The GPU's compiler (inductor, here generating CPU code) on the whole CoCoMix step, both
    heads chunked: loss and every gradient equal eager's within float tolerance."""
    import model as M
    monkeypatch.setattr(M, 'device_memory', torch.compiler.assume_constant_result(lambda device_type: 0))
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, insert_layer=1,
                          n_concepts=48, concept_topk=4, bias=False))
    x = torch.randint(0, 64, (2, 16))
    labels = torch.randint(-1, 48, (2, 16, 4))

    def step(m):
        _, loss, out = m(x, x, concept_labels=labels)
        loss = loss + 0.1 * out['concept']
        return loss, torch.autograd.grad(loss, list(model.parameters()))
    torch._dynamo.reset()
    loss, grads = step(torch.compile(model, backend='inductor'))
    ref_loss, ref_grads = step(model)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-5)


def test_scripts_start_without_importing_the_compiler():
    """torch._dynamo doubles the start of every script, a one-line error included; model.py marks
    device_memory constant for torch.compile without it (the graph-break test above checks the mark)."""
    from conftest import run
    code = "import sys, common, model, sae, attribution, prepare; print('torch._dynamo' in sys.modules)"
    assert run(['-c', code]).stdout.strip() == 'False'
