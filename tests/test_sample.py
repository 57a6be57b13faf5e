"""sample.py refuses what it cannot do in one line, before loading a model."""
import os
import runpy
import sys

import pytest
import torch

from conftest import ROOT


def error_of(monkeypatch, *args):
    """The one-line error sample.py exits with, run in this process (no model is loaded first)."""
    monkeypatch.setattr(sys, 'argv', ['sample.py'] + [str(a) for a in args])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, 'sample.py'), run_name='__main__')
    message = str(e.value.code)
    assert message.startswith('error: ') and '\n' not in message, message
    return message


def test_no_new_tokens_with_concepts_is_refused(monkeypatch, tmp_path):
    message = error_of(monkeypatch, f'--out_dir={tmp_path}', '--max_new_tokens=0', '--show_concepts')
    assert 'max_new_tokens must be an int with max_new_tokens >= 1, not 0' in message


def test_a_missing_out_dir_is_named(monkeypatch, tmp_path):
    message = error_of(monkeypatch, f'--out_dir={tmp_path / "nothing"}', '--device=cpu')
    assert f"'{tmp_path / 'nothing'}' is neither gpt2* nor a folder with ckpt.pt" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason='this torch sees a GPU')
def test_cuda_without_a_gpu_is_refused(monkeypatch, tmp_path):
    message = error_of(monkeypatch, f'--out_dir={tmp_path}', '--device=cuda')
    assert 'device must be cpu (this torch sees no CUDA GPU' in message


def test_a_prompt_file_it_cannot_read_is_one_line_before_the_model(monkeypatch, tmp_path):
    (tmp_path / 'latin1.txt').write_bytes(b'caf\xe9\n')
    for name, why in (('missing.txt', 'No such file'), ('', 'Is a directory'), ('latin1.txt', 'utf-8')):
        message = error_of(monkeypatch, f'--start=FILE:{tmp_path / name}', f'--out_dir={tmp_path}/none')
        assert f"cannot read the prompt file '{tmp_path / name}'" in message and why in message, message


def test_damaged_concept_descriptions_leave_the_concepts_shown_by_id(monkeypatch, tmp_path, capsys):
    """tools/concepts.py's descriptions beside the SAE file: an empty or foreign one was a traceback."""
    from common import save_checkpoint
    from model import GPT, GPTConfig
    args = dict(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, n_concepts=8, concept_topk=2,
                insert_layer=1)
    save_checkpoint({'model': GPT(GPTConfig(**args)).state_dict(), 'model_args': args, 'mode': 'cocomix',
                     'iter_num': 1, 'best_val_loss': 2.0, 'config': {'sae': str(tmp_path / 'sae.pt')},
                     'data_meta': {'tokenizer': 'char', 'chars': list('abcdefgh'), 'vocab_size': 8}},
                    str(tmp_path / 'out'))
    for text, why in (('', 'JSONDecodeError'), ('[1, 2]', 'TypeError')):
        (tmp_path / 'sae.pt.concepts.json').write_text(text)
        monkeypatch.setattr(sys, 'argv', ['sample.py', f'--out_dir={tmp_path / "out"}', '--device=cpu', '--start=ab',
                                          '--num_samples=1', '--max_new_tokens=2', '--show_concepts', '--dtype=float32'])
        runpy.run_path(os.path.join(ROOT, 'sample.py'), run_name='__main__')
        out = capsys.readouterr().out
        assert f'(no concept descriptions: {why}' in out and out.count(' <- ') == 2, out
