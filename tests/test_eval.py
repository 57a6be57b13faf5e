import json
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import eval as E
from conftest import ROOT, run, user_error
from common import save_checkpoint
from model import GPT, GPTConfig
from prepare import CharTokenizer

BENCH = os.path.join(ROOT, '..', 'shared', 'data', 'benchmarks_sample')
CHARS = 'abcdefghijklmnopqrstuvwxyz '  # ids 0 .. 26, end-of-text 27


class NextLetter(nn.Module):
    """A hand-built model: the next character follows the cycle a b .. z ' ' a (and end-of-text -> a) with
    probability 0.9, the rest shared evenly. Context 8."""

    def __init__(self):
        super().__init__()
        self.config = GPTConfig(block_size=8, vocab_size=28)

    def forward(self, idx, targets=None):
        logits = torch.full((*idx.shape, 28), math.log(0.1 / 27))
        nxt = torch.where(idx == 27, 0, (idx + 1) % 27)
        return logits.scatter(-1, nxt.unsqueeze(-1), math.log(0.9)), None

    def generate(self, idx, max_new_tokens, temperature=0):
        for _ in range(max_new_tokens):
            idx = torch.cat([idx, self(idx)[0][:, -1:].argmax(-1)], 1)
        return idx


def test_scorer_on_a_hand_built_model():
    s = E.Scorer(NextLetter(), CharTokenizer(CHARS), 'cpu', batch_size=2)
    good, bad = math.log(0.9), math.log(0.1 / 27)
    (ll, greedy), (ll2, greedy2) = s.loglikelihood([('abc', 'de'), ('abc', 'dx')])
    assert abs(ll - 2 * good) < 1e-5 and greedy and abs(ll2 - (good + bad)) < 1e-5 and not greedy2
    # 16 letters after the end-of-text token, in windows of 8 (each scored once), then 'z' that breaks the cycle
    assert abs(s.loglikelihood_rolling([('abcdefghijklmnopz',)])[0] - (16 * good + bad)) < 1e-4
    assert s.generate_until([('xyz', {'until': ['e'], 'max_gen_toks': 10})]) == [' abcd']
    assert E.multiple_choice(s, [('abc', ['dx', 'de'], 1), ('mn', ['op', 'oq'], 0)]) == {'acc': 100.0, 'acc_norm': 100.0}
    out = E.lambada(s, [{'text': 'xyz abcd'}, {'text': 'xyz abce'}])  # the second last word is wrong at 'e'
    assert out['acc'] == 50.0 and abs(out['ppl'] - math.exp(-(9 * good + bad) / 2)) < 1e-4
    # ' cd' after 'ab z' (z -> ' ' likely) beats ' cd' after 'ab x'
    wino = [{'sentence': 'ab _ cd', 'option1': 'x', 'option2': 'z', 'answer': '2'},
            {'sentence': 'ab _ cd', 'option1': 'z', 'option2': 'x', 'answer': '1'},
            {'sentence': 'ab _ cd', 'option1': 'z', 'option2': 'x', 'answer': '2'}]
    assert abs(E.winogrande(s, wino)['acc'] - 200 / 3) < 1e-9


def tiny_gpt(vocab=50304, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=32, vocab_size=vocab, n_layer=2, n_head=2, n_embd=16)).eval()


def test_batched_padded_scoring_equals_one_forward_each():
    """Requests of different lengths (one longer than the context) batched and padded = each scored alone by a
    plain forward and log-softmax."""
    model = tiny_gpt(vocab=64)
    g = torch.Generator().manual_seed(0)
    pieces = [(torch.randint(0, 64, (n,), generator=g).tolist(), k) for n, k in ((5, 2), (12, 4), (40, 3), (7, 6))]
    s = E.Scorer(model, None, 'cpu', batch_size=3)
    for (ids, k), (ll, greedy) in zip(pieces, s.score(pieces)):
        ids = ids[-33:]
        with torch.no_grad():
            logits = model(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]))[0][0]
        logp = F.log_softmax(logits, -1)[-k:].gather(-1, torch.tensor(ids[-k:]).unsqueeze(-1))
        assert abs(ll - logp.sum().item()) < 1e-4
        assert greedy == bool((logits[-k:].argmax(-1) == torch.tensor(ids[-k:])).all())


def test_readers_on_the_official_sample_files():
    if not os.path.isdir(BENCH):
        pytest.skip('no benchmark samples')
    items = lambda task: E.choice_items(task, E.task_file(task, BENCH), BENCH)
    for task, n_choices in (('hellaswag', 4), ('piqa', 2), ('siqa', 3), ('arc_easy', None)):
        assert len(items(task)) == 200 and all(0 <= g < len(c) for _, c, g in items(task)), task
        assert n_choices is None or all(len(c) == n_choices for _, c, _ in items(task))
    first = items('hellaswag')[0]
    assert first[0] == 'Roof shingle removal: A man is sitting on a roof. he' and first[2] == 3
    assert items('piqa')[1][2] == 1  # from piqa_valid-labels (0, 1, 1, ...)
    assert items('siqa')[0][2] == 2  # label 3 of 1..3
    assert E.read_jsonl(E.task_file('winogrande', BENCH))[0]['answer'] == '2'


def test_cli_every_task_and_json(tmp_path):
    if not os.path.isdir(BENCH):
        pytest.skip('no benchmark samples')
    model = tiny_gpt()
    save_checkpoint({'model': model.state_dict(), 'model_args': dict(block_size=32, vocab_size=50304, n_layer=2,
                     n_head=2, n_embd=16), 'mode': 'ntp', 'iter_num': 0, 'config': {}}, str(tmp_path / 'out'))
    p = run(['tools/eval.py', f'--out_dir={tmp_path / "out"}', f'--data_dir={BENCH}', '--limit=4', '--device=cpu',
             '--dtype=float32', '--tasks=lambada,hellaswag,piqa,arc_easy,winogrande,siqa', f'--json_out={tmp_path / "r.json"}'])
    results = json.load(open(tmp_path / 'r.json'))['results']
    assert set(results) == {'lambada', 'hellaswag', 'piqa', 'arc_easy', 'winogrande', 'siqa'} and 'done:' in p.stdout
    assert all(0 <= r['acc'] <= 100 for r in results.values())
    (tmp_path / 'wiki').mkdir()
    (tmp_path / 'wiki' / 'wiki.valid.raw').write_text(' = Title = \n a short article about nothing at all . \n')
    w = run(['tools/eval.py', f'--out_dir={tmp_path / "out"}', f'--data_dir={tmp_path / "wiki"}', '--tasks=wikitext', '--device=cpu'])
    assert 'word_ppl' in w.stdout
    bad = run(['tools/eval.py', f'--out_dir={tmp_path / "out"}', f'--data_dir={tmp_path / "wiki"}', '--tasks=piqa'], check=False)
    assert bad.returncode != 0 and 'no file matching piqa_valid*.jsonl' in bad.stderr


def test_perplexity_task_equals_mean_window_loss(dataset, tmp_path):
    from conftest import TINY
    run(['train.py', f'--dataset={dataset}', f'--out_dir={tmp_path / "out"}', '--max_iters=4', '--eval_interval=4'] + TINY)
    p = run(['tools/eval.py', f'--out_dir={tmp_path / "out"}', '--tasks=ppl', '--device=cpu', '--limit=10'])
    loss = float(p.stdout.split('loss ')[1].split(',')[0])
    from common import load_model
    import numpy as np
    model = load_model(str(tmp_path / 'out'))[0]
    val = np.fromfile(os.path.join(dataset, 'val.bin'), dtype=np.uint16).astype(np.int64)
    x = torch.from_numpy(val[:160].reshape(10, 16))
    y = torch.from_numpy(val[1:161].reshape(10, 16))
    with torch.no_grad():
        assert abs(model(x, y)[1].item() - loss) < 1e-4


def test_lm_eval_adapter_calls_the_scorer():
    pytest.importorskip('lm_eval')
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import LM
    s = E.Scorer(NextLetter(), CharTokenizer(CHARS), 'cpu')
    lm = E.lm_eval_model(s)
    assert isinstance(lm, LM)
    req = lambda kind, args: Instance(request_type=kind, doc={}, arguments=args, idx=0)
    assert lm.loglikelihood([req('loglikelihood', ('abc', 'de'))]) == s.loglikelihood([('abc', 'de')])
    assert lm.loglikelihood_rolling([req('loglikelihood_rolling', ('abcdefghijklmnopz',))]) == \
        s.loglikelihood_rolling([('abcdefghijklmnopz',)])
    assert lm.generate_until([req('generate_until', ('xyz', {'until': ['e'], 'max_gen_toks': 10}))]) == [' abcd']


def saved_tiny(tmp_path, dataset):
    """A tiny random checkpoint as train.py saves it, trained (nominally) on `dataset`: its out_dir."""
    model = tiny_gpt(vocab=64)
    meta = json.load(open(os.path.join(dataset, 'meta.json')))
    save_checkpoint({'model': model.state_dict(), 'model_args': dict(block_size=32, vocab_size=64, n_layer=2,
                     n_head=2, n_embd=16), 'mode': 'ntp', 'iter_num': 0, 'config': {'dataset': dataset},
                     'data_meta': meta}, str(tmp_path / 'out'))
    return str(tmp_path / 'out')


def test_ppl_refuses_data_of_another_tokenizer(dataset, tmp_path):
    """The checkpoint's data is 'synthetic'-tokenized; the same ids under a character tokenizer mean other text:
    refused in one line, as train.py refuses it, not scored."""
    from conftest import write_dataset
    out = saved_tiny(tmp_path, dataset)
    other = write_dataset(str(tmp_path / 'chars'))
    json.dump({'tokenizer': 'char', 'chars': list('abcdefghijklmnopqrstuvwxyz!?,.:;'), 'vocab_size': 32,
               'train_tokens': 20000, 'val_tokens': 2000}, open(os.path.join(other, 'meta.json'), 'w'))
    ok = run(['tools/eval.py', f'--out_dir={out}', '--tasks=ppl', '--device=cpu', '--dtype=float32', '--limit=2'])
    assert 'ppl' in ok.stdout  # its own data: scored
    bad = run(['tools/eval.py', f'--out_dir={out}', '--tasks=ppl', f'--dataset={other}', '--device=cpu',
               '--dtype=float32', '--limit=2'], check=False)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "tokenized with a different character set but the model" in bad.stderr and 'ppl' not in bad.stdout


def test_ppl_on_a_val_split_shorter_than_the_context(tmp_path):
    from conftest import write_dataset
    short = write_dataset(str(tmp_path / 'short'), n_val=20)  # the model's context is 32
    out = saved_tiny(tmp_path, short)
    bad = run(['tools/eval.py', f'--out_dir={out}', '--tasks=ppl', '--device=cpu', '--dtype=float32'], check=False)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        f"error: the val split of {short} has 20 tokens, fewer than one window of the model's context 32 + 1; "
        "prepare more val text"], bad.stderr


@pytest.mark.parametrize('arg, want', [('--limit=-1', 'limit must be an int with limit >= 0'),
                                       ('--batch_size=0', 'batch_size must be an int with batch_size >= 1'),
                                       ('--data_dir=/no/such/dir', 'data_dir must be an existing folder'),
                                       ('--dtype=fp16', 'dtype must be one of float32, bfloat16, float16')])
def test_bad_settings_one_line_before_any_work(tmp_path, arg, want):
    bad = run(['tools/eval.py', f'--out_dir={tmp_path / "none"}', '--tasks=ppl', arg], check=False)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1 and want in bad.stderr, bad.stderr



def test_task_files_and_json_out_off_the_path(tmp_path, monkeypatch, capsys):
    """Every task file is found before the first task runs; a damaged one is one line naming it (a
    KeyError, IndexError or a nan before); json_out may be in a folder yet to make, never a folder."""
    save_checkpoint({'model': tiny_gpt().state_dict(), 'model_args': dict(block_size=32, vocab_size=50304,
                     n_layer=2, n_head=2, n_embd=16), 'mode': 'ntp', 'iter_num': 0, 'config': {}}, str(tmp_path / 'out'))
    tasks = tmp_path / 'tasks'
    tasks.mkdir()
    good = json.dumps({'text': 'the cat sat on the mat'}) + '\n'
    (tasks / 'lambada_test.jsonl').write_text(good)
    for key in E.__annotations__:  # main() sets the module's settings: restored after the test
        monkeypatch.setattr(E, key, getattr(E, key))
    argv = lambda *args: [f'--out_dir={tmp_path / "out"}', f'--data_dir={tasks}', '--device=cpu', '--dtype=float32',
                          '--json_out=', *args]
    assert 'no file matching piqa_valid*.jsonl' in user_error(E.main, argv('--tasks=lambada,piqa'))
    (tmp_path / 'file').write_text('')
    for bad in (tasks, f'{tmp_path}/new/', f'{tmp_path}/file/r.json'):  # a folder, or in a file
        assert 'must name a file' in user_error(E.main, argv('--tasks=lambada', f'--json_out={bad}'))
    (tasks / 'hellaswag_val.jsonl').write_text(good)  # the first task's file is fine, the second's not
    assert 'hellaswag_val.jsonl (or its labels) is not' in user_error(E.main, argv('--tasks=lambada,hellaswag'))
    assert 'lambada:' not in capsys.readouterr().out  # none ran a task
    E.main(argv('--tasks=lambada', f'--json_out={tmp_path / "new" / "r.json"}'))
    assert 'lambada' in json.load(open(tmp_path / 'new' / 'r.json'))['results']
    for task, text in (('lambada_test.jsonl', '{"txt": "a b"}\n'), ('lambada_test.jsonl', ''),
                       ('lambada_test.jsonl', '{"text": "oneword"}\n'), ('winogrande_dev.jsonl', '{"sentence": "no"}\n'),
                       ('hellaswag_val.jsonl', 'not json\n')):
        (tasks / task).write_text(text)
        name = task.split('_')[0]
        assert f"{tasks / task} (or its labels) is not a {name} file" in user_error(E.main, argv(f'--tasks={name}'))
        (tasks / task).write_text(good)
    os.remove(tasks / 'lambada_test.jsonl')
    os.mkdir(tasks / 'lambada_test.jsonl')  # a folder by a task file's name
    assert 'is not a lambada file' in user_error(E.main, argv('--tasks=lambada'))
