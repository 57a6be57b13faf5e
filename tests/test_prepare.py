import json
import os

import numpy as np
import pytest
from conftest import ROOT, run
from prepare import gpt2_tokenizer

enc = gpt2_tokenizer()  # built from the repository's copy of GPT-2's BPE files


def test_gpt2_tokenizer_from_the_repository_files():
    assert enc.encode('Hello world') == [15496, 995] and enc.encode(' the') == [262]  # GPT-2's published ids
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    cache = os.path.join(ROOT, '..', 'shared', 'tiktoken_cache')  # tiktoken's own download, where one is at hand
    if not os.path.isdir(cache):
        pytest.skip('no tiktoken cache beside the repository to compare with')
    import tiktoken
    os.environ['TIKTOKEN_CACHE_DIR'] = cache
    text = open(os.path.join(ROOT, 'assets', 'tinyshakespeare.txt')).read()[:200_000]
    assert tiktoken.get_encoding('gpt2').encode(text) == enc.encode(text)


def test_shakespeare_offline_from_the_shipped_text(tmp_path):
    text = open(os.path.join(ROOT, 'assets', 'tinyshakespeare.txt'), encoding='utf-8').read()
    env = {'TIKTOKEN_CACHE_DIR': str(tmp_path / 'empty')}  # no cache and no network: the repository's files only
    run(['prepare.py', 'shakespeare', f'--out_dir={tmp_path / "bpe"}'], env=env)
    assert decode_dir(tmp_path / 'bpe') == text + '<|endoftext|>'
    run(['prepare.py', 'shakespeare', '--tokenizer=char', f'--out_dir={tmp_path / "char"}'], env=env)
    meta = json.loads((tmp_path / 'char' / 'meta.json').read_text())
    assert meta['vocab_size'] == 66 and meta['train_tokens'] + meta['val_tokens'] == len(text) + 1


def decode_dir(out):
    tokens = np.concatenate([np.fromfile(os.path.join(out, f'{s}.bin'), dtype=np.uint16) for s in ('train', 'val')])
    return enc.decode(tokens.tolist())


def test_round_trip_one_file(tmp_path):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak. \u00e9\u00e8 \u2014 ok\n" * 40
    (tmp_path / 'in.txt').write_text(text, encoding='utf-8')
    out = tmp_path / 'data'
    p = run(['prepare.py', 'mine', f'--input={tmp_path / "in.txt"}', f'--out_dir={out}', '--val_fraction=0.25'])
    assert decode_dir(out) == text + '<|endoftext|>'
    meta = json.loads((out / 'meta.json').read_text())
    n = len(enc.encode_ordinary(text)) + 1
    assert meta['train_tokens'] + meta['val_tokens'] == n and meta['val_tokens'] == int(n * 0.25)
    assert meta['vocab_size'] == 50257 and meta['tokenizer'] == 'gpt2'
    assert f"train {meta['train_tokens']:,} tokens" in p.stdout


def test_character_level_round_trip(tmp_path):
    from prepare import get_tokenizer
    (tmp_path / 'a.txt').write_text('to be, or not\n\u00e9')
    (tmp_path / 'v.txt').write_text('be not!')
    out = tmp_path / 'data'
    run(['prepare.py', 'c', f"--input={tmp_path / 'a.txt'}", f"--val_input={tmp_path / 'v.txt'}", f'--out_dir={out}',
         '--tokenizer=char'])
    meta = json.loads((out / 'meta.json').read_text())
    assert meta['chars'] == '\n !,benort\u00e9' and meta['vocab_size'] == len(meta['chars']) + 1 == meta['eot_token'] + 1
    enc = get_tokenizer(meta)
    split = lambda s: np.fromfile(out / f'{s}.bin', dtype=np.uint16).tolist()
    assert enc.decode(split('train')) == 'to be, or not\n\u00e9<|endoftext|>' and split('val')[:2] == [4, 5]
    with pytest.raises(SystemExit, match="'z' is not in this dataset's character vocabulary"):
        enc.encode('zebra')


def test_globs_and_separate_val_files(tmp_path):
    for name, text in (('a.txt', 'alpha beta\n'), ('b.txt', 'gamma delta\n'), ('v.txt', 'held out\n')):
        (tmp_path / name).write_text(text)
    out = tmp_path / 'data'
    run(['prepare.py', 'two', f"--input={tmp_path / '[ab].txt'}", f"--val_input={tmp_path / 'v.txt'}", f'--out_dir={out}'])
    val = np.fromfile(out / 'val.bin', dtype=np.uint16).tolist()
    assert enc.decode(val) == 'held out\n<|endoftext|>'
    assert decode_dir(out) == 'alpha beta\n<|endoftext|>gamma delta\n<|endoftext|>held out\n<|endoftext|>'


@pytest.mark.parametrize('args, message', [
    (['nonsense'], "unknown dataset 'nonsense'"),
    (['mine', '--input=/no/such/file.txt'], "--input '/no/such/file.txt' matches no file"),
    (['mine', '--input=EMPTY'], 'is empty'),
    (['mine', '--input=FOLDER'], 'is a folder'),
    (['mine', '--input=GOOD', '--val_fraction=1.5'], 'val_fraction must be in (0, 1)'),
    (['mine', '--input=GOOD', '--vocab=3'], "unknown config key 'vocab'"),
])
def test_bad_inputs_are_one_line_errors(tmp_path, args, message):
    (tmp_path / 'empty.txt').write_text('  \n')
    (tmp_path / 'good.txt').write_text('some text\n')
    subs = {'EMPTY': str(tmp_path / 'empty.txt'), 'FOLDER': str(tmp_path), 'GOOD': str(tmp_path / 'good.txt')}
    for placeholder, path in subs.items():
        args = [a.replace(placeholder, path) for a in args]
    p = run(['prepare.py'] + args + [f'--out_dir={tmp_path / "out"}'], check=False)
    assert p.returncode != 0 and message in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
