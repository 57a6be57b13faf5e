import json
import os

import numpy as np
import pytest
from conftest import ROOT, run, user_error
import prepare as P
from prepare import gpt2_tokenizer

enc = gpt2_tokenizer()  # built from the repository's copy of GPT-2's BPE files
DEFAULTS = {key: getattr(P, key) for key in P.__annotations__}  # before any test sets them


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
    (['mine', '--input=GOOD', '--val_fraction=1.5'], 'val_fraction must be a float with 0 < val_fraction < 1'),
    (['mine', '--input=GOOD', '--tokenizer=bpe'], 'tokenizer must be one of gpt2, char'),
    (['mine', '--input=GOOD', '--num_proc=0'], 'num_proc must be an int with num_proc >= 1'),
    (['mine', '--input=GOOD', '--max_tokens=-1'], 'max_tokens must be an int with max_tokens >= 0'),
    (['openwebtext', '--local_hub=/no/such/dir'], 'local_hub must be an existing folder'),
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


# -----------------------------------------------------------------------------
# Corpora of any size: three formats, the hub's layout, OpenWebText's files, interrupted runs

DOCS = ['First doc.\nIt has two lines.', 'Second: caf\u00e9 \u2014 10 + 20 = 30\n\n\nspaced', 'third']


def write_formats(folder, docs=DOCS):
    """The same documents as .txt files (one each), one .jsonl and one .parquet (a row each)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(folder / 'txt')
    for i, d in enumerate(docs):
        (folder / 'txt' / f'{i:03d}.txt').write_text(d, encoding='utf-8')
    with open(folder / 'docs.jsonl', 'w', encoding='utf-8') as f:
        f.writelines(json.dumps({'text': d, 'id': i}) + '\n' for i, d in enumerate(docs))
    pq.write_table(pa.table({'text': docs}), folder / 'docs.parquet')


def test_txt_jsonl_parquet_and_hub_layout_give_identical_files(tmp_path):
    write_formats(tmp_path)
    hub = tmp_path / 'hub' / 'data'  # a local folder in the hub's layout, read by datasets, streaming
    os.makedirs(hub)
    (hub / 'train-00000-of-00001.parquet').write_bytes((tmp_path / 'docs.parquet').read_bytes())
    outs = {}
    sources = {'txt': f"--input={tmp_path / 'txt' / '*.txt'}", 'jsonl': f"--input={tmp_path / 'docs.jsonl'}",
               'parquet': f"--input={tmp_path / 'docs.parquet'}", 'hub': f"--hub={tmp_path / 'hub'}"}
    for name, arg in sources.items():
        run(['prepare.py', name, f'--out_dir={tmp_path / name}', '--val_fraction=0.2', arg])
        outs[name] = [(tmp_path / name / f'{s}.bin').read_bytes() for s in ('train', 'val')]
    assert outs['txt'] == outs['jsonl'] == outs['parquet'] == outs['hub']
    expected = sum((enc.encode_ordinary(d) + [enc.eot_token] for d in DOCS), [])
    n_val = int(len(expected) * 0.2)
    assert np.frombuffer(outs['txt'][0], dtype=np.uint16).tolist() == expected[:-n_val]
    assert np.frombuffer(outs['txt'][1], dtype=np.uint16).tolist() == expected[-n_val:]


def test_a_long_text_read_in_blocks_has_the_tokens_of_the_whole(tmp_path):
    import prepare as P
    text = open(os.path.join(ROOT, 'assets', 'tinyshakespeare.txt'), encoding='utf-8').read()[:100_000]
    (tmp_path / 'long.txt').write_text(text, encoding='utf-8')
    pieces = list(P.local_documents([str(tmp_path / 'long.txt')], block=997))
    assert len(pieces) > 50 and ''.join(t for t, _ in pieces) == text  # cut in many places, nothing lost
    assert [end for _, end in pieces] == [False] * (len(pieces) - 1) + [True]
    assert sum((enc.encode_ordinary(t) for t, _ in pieces), []) == enc.encode_ordinary(text)


def test_a_text_is_not_cut_inside_its_leading_newlines(tmp_path):
    import prepare as P
    text = '\n\n\n' + 'abc def ' * 500  # no newline between two letters: no safe cut in the first block
    (tmp_path / 'lead.txt').write_text(text, encoding='utf-8')
    pieces = [t for t, _ in P.local_documents([str(tmp_path / 'lead.txt')], block=997)]
    assert ''.join(pieces) == text
    assert sum((enc.encode_ordinary(t) for t in pieces), []) == enc.encode_ordinary(text)


def prepare(*args):
    """prepare.py's main in this process, from its default settings (a call sets the module's globals)."""
    for key, value in DEFAULTS.items():
        setattr(P, key, value)
    P.main([str(a) for a in args] + ['--num_proc=1'])


def error_of(*args):
    """The one-line error prepare.py exits with."""
    return user_error(prepare, *args)


def files_of(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


@pytest.mark.parametrize('bad, message', [
    (['--max_tokens=1'], 'the train text gave 1 tokens'),
    (['--text_field=body'], "docs.jsonl, line 1 has no 'body' field"),
    (['--input=BAD'], "bad.jsonl, line 2 has no 'text' field"),  # found while tokenizing
])
def test_a_failed_rerun_leaves_the_previous_dataset(tmp_path, bad, message):
    from prepare import load_tokens, read_meta
    write_formats(tmp_path)
    (tmp_path / 'bad.jsonl').write_text('{"text": "fine"}\n{"body": "no text"}\n')
    out = tmp_path / 'data'
    prepare('x', f"--input={tmp_path / 'docs.jsonl'}", f'--out_dir={out}')
    before = files_of(out)
    bad = [a.replace('BAD', str(tmp_path / 'bad.jsonl')) for a in bad]
    assert message in error_of('x', f"--input={tmp_path / 'docs.jsonl'}", f'--out_dir={out}', *bad)
    assert files_of(out) == before and read_meta(str(out))['val_tokens'] == len(load_tokens(str(out), 'val'))


def test_an_interrupted_run_leaves_the_previous_dataset(tmp_path, monkeypatch):
    write_formats(tmp_path)
    out = tmp_path / 'data'
    prepare('x', f"--input={tmp_path / 'docs.jsonl'}", f'--out_dir={out}')
    before = files_of(out)

    def killed(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(P, 'hold_out', killed)  # stopped after the train tokens, before the val split
    with pytest.raises(KeyboardInterrupt):
        prepare('x', f"--input={tmp_path / 'txt' / '*.txt'}", f'--out_dir={out}')
    assert files_of(out) == before  # no temporary file left either


def test_a_run_killed_while_swapping_files_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
    write_formats(tmp_path)
    out = tmp_path / 'data'
    prepare('x', f"--input={tmp_path / 'docs.jsonl'}", f'--out_dir={out}')

    def killed(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, 'replace', killed)  # the first new file is about to get its name
    with pytest.raises(KeyboardInterrupt):
        prepare('x', f"--input={tmp_path / 'txt' / '*.txt'}", f'--out_dir={out}')
    assert sorted(os.listdir(out)) == ['train.bin', 'val.bin']
    with pytest.raises(SystemExit, match='no prepared dataset'):
        P.read_meta(str(out))


def write_parquet(path, **columns):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table(columns), path)


@pytest.mark.parametrize('name, content, message', [
    ('a.jsonl', b'{"text": "fine"}\n{"body": "x", "id": 2}\n',
     "a.jsonl, line 2 has no 'text' field (its fields: body, id); pass --text_field=NAME"),
    ('a.jsonl', b'{"text": "fine"}\n\n{"text": null}\n', "a.jsonl, line 3: its 'text' is None, not text"),
    ('a.jsonl', b'{"text": 42}\n', "a.jsonl, line 1: its 'text' is 42, not text"),
    ('a.jsonl', b'{"text": "fine"}\n{"text": "cut off\n', 'a.jsonl, line 2 is not JSON'),
    ('a.jsonl', b'["text"]\n', "a.jsonl, line 1 has no 'text' field (it is a JSON list)"),
    ('a.txt', 'caf\u00e9\n'.encode('latin-1'), "a.txt is not UTF-8 text (byte b'\\xe9' and on); convert it"),
    ('a.txt.gz', b'not gzip at all', 'cannot read '),
    ('a.parquet', None, "a.parquet has no column 'text' (its columns: body); pass --text_field=NAME"),
    ('b.parquet', None, "b.parquet, row 2: its 'text' is None, not text"),
    ('a.parquet', b'PAR1 but not parquet', 'as parquet'),
])
def test_bad_files_are_one_line_errors_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    elif name == 'a.parquet':
        write_parquet(path, body=['x', 'y'])
    else:
        write_parquet(path, text=['x', None])
    assert message in error_of('x', f'--input={path}', f"--out_dir={tmp_path / 'out'}")
    assert not (tmp_path / 'out').exists() or not os.listdir(tmp_path / 'out')


def test_compressed_jsonl_and_txt_are_read_as_they_are(tmp_path):
    import gzip
    import lzma
    write_formats(tmp_path)
    (tmp_path / 'docs.jsonl.gz').write_bytes(gzip.compress((tmp_path / 'docs.jsonl').read_bytes()))
    for i, d in enumerate(DOCS):
        (tmp_path / f'{i:03d}.txt.xz').write_bytes(lzma.compress(d.encode()))
    sources = {'plain': tmp_path / 'docs.jsonl', 'gz': tmp_path / 'docs.jsonl.gz', 'xz': tmp_path / '*.txt.xz'}
    for name, path in sources.items():
        prepare(name, f'--input={path}', f'--out_dir={tmp_path / name}')
    tokens = lambda name: [(tmp_path / name / f'{s}.bin').read_bytes() for s in ('train', 'val')]
    assert tokens('plain') == tokens('gz') == tokens('xz')


def test_openwebtext_from_its_files_gives_nanogpts_split(tmp_path):
    """A local copy of the hub's layout: subsets/*.tar of .xz tar archives of .txt documents. The split
    must be nanoGPT's: datasets' train_test_split(test_size=0.0005, seed=2357) of the documents in the
    old loading script's order and form."""
    import io
    import lzma
    import re
    import tarfile
    from datasets import Dataset
    rng = np.random.default_rng(0)
    words = ['alpha', 'beta', 'gamma', 'delta', '\n', '\n\n\n\n', 'end.']
    order = []
    os.makedirs(tmp_path / 'hub' / 'subsets')
    for t in range(2):
        with tarfile.open(tmp_path / 'hub' / 'subsets' / f'urlsf_subset{t:02d}.tar', 'w') as outer:
            for x in range(3):
                inner_bytes = io.BytesIO()
                with tarfile.open(fileobj=inner_bytes, mode='w') as inner:
                    for d in range(400):
                        text = ' '.join(rng.choice(words, 12)) + '\n'
                        name = f'{t}-{x}-{d}.txt'
                        info = tarfile.TarInfo(name)
                        info.size = len(text.encode())
                        inner.addfile(info, io.BytesIO(text.encode()))
                        order.append(re.sub('\n\n\n+', '\n\n', text).strip())
                xz = lzma.compress(inner_bytes.getvalue())
                info = tarfile.TarInfo(f'openwebtext/urlsf_subset{t:02d}-{x}_data.xz')
                info.size = len(xz)
                outer.addfile(info, io.BytesIO(xz))
    # the pinned revision's layout: the same documents as rows of data/train-*.parquet, in order
    os.makedirs(tmp_path / 'parquet' / 'data')
    for i, part in enumerate((order[:1000], order[1000:])):
        Dataset.from_dict({'text': part}).to_parquet(tmp_path / 'parquet' / 'data' / f'train-{i:05d}-of-00002.parquet')
    split = Dataset.from_dict({'text': order}).train_test_split(test_size=0.0005, seed=2357, shuffle=True)
    tokens = lambda docs: sum((enc.encode_ordinary(d) + [enc.eot_token] for d in docs), [])
    for layout in ('hub', 'parquet'):
        run(['prepare.py', 'openwebtext', f"--local_hub={tmp_path / layout}", f'--out_dir={tmp_path / layout}_owt'],
            env={'HF_DATASETS_CACHE': str(tmp_path / 'cache')})
        read = lambda s: np.fromfile(tmp_path / f'{layout}_owt' / f'{s}.bin', dtype=np.uint16).tolist()
        assert len(split['test']) == 2 and read('val') == tokens(split['test']['text'])
        assert read('train') == tokens(split['train']['text'])


# -----------------------------------------------------------------------------
# The hub: a pinned OpenWebText revision, one-line errors, `hf download` (today's client) in every hint

@pytest.mark.parametrize('args, revision', [([], 'PINNED'), (['--hub_revision=abc123'], 'abc123')])
def test_openwebtext_is_fetched_at_its_pinned_revision(tmp_path, monkeypatch, args, revision):
    import huggingface_hub
    revision = P.OPENWEBTEXT_REVISION if revision == 'PINNED' else revision
    asked = []

    def download(repo, repo_type, revision, allow_patterns):
        asked.append((repo, repo_type, revision))
        raise huggingface_hub.errors.EntryNotFoundError(f'nothing at {revision}\nmore')
    monkeypatch.setattr(huggingface_hub, 'snapshot_download', download)
    monkeypatch.setattr(P, 'check_hub', lambda *a: None)  # reachable
    message = error_of('openwebtext', f"--out_dir={tmp_path / 'out'}", *args)
    assert asked == [('Skylion007/openwebtext', 'dataset', revision)] and len(revision) >= 6
    assert f"cannot download Skylion007/openwebtext at revision {revision} (EntryNotFoundError" in message
    assert f'hf download Skylion007/openwebtext --repo-type dataset --revision {revision}' in message


def test_the_download_hint_names_todays_hf_client(tmp_path):
    message = error_of('openwebtext', f'--local_hub={tmp_path}', f"--out_dir={tmp_path / 'out'}")
    assert 'get them with hf download Skylion007/openwebtext' in message and 'huggingface-cli' not in message


def test_a_hub_dataset_failing_midway_is_one_line(tmp_path, monkeypatch):
    import datasets
    asked = []

    def load_dataset(path, config, **kwargs):
        asked.append(kwargs['revision'])
        yield {'text': 'first row'}
        raise ConnectionError('connection reset\nby peer')
    monkeypatch.setattr(datasets, 'load_dataset', load_dataset)
    monkeypatch.setattr(P, 'check_hub', lambda *a: None)
    message = error_of('x', '--hub=someone/corpus', '--hub_revision=v1', f"--out_dir={tmp_path / 'out'}")
    assert asked == ['v1'] and 'cannot read someone/corpus (ConnectionError: connection reset); check' in message


# -----------------------------------------------------------------------------
# data_fingerprint: matches a label cache to its token file by content, reading little of it

def test_data_fingerprint_of_a_small_file_is_of_all_of_it(tmp_path):
    from prepare import data_fingerprint
    a = write(tmp_path / 'a.bin', b'to be or not to be')
    assert data_fingerprint(a) == data_fingerprint(write(tmp_path / 'copy.bin', b'to be or not to be'))
    assert len(data_fingerprint(a)) == 16 and int(data_fingerprint(a), 16) >= 0
    assert data_fingerprint(a) != data_fingerprint(write(tmp_path / 'b.bin', b'to be or not to bee'))  # size
    assert data_fingerprint(a) != data_fingerprint(write(tmp_path / 'c.bin', b'to be or NOT to be'))  # text


def test_data_fingerprint_of_a_large_file_samples_blocks(tmp_path):
    from prepare import data_fingerprint
    data = np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    path = tmp_path / 'x.bin'
    sampled = lambda d: data_fingerprint(write(path, d), blocks=4, block=100)  # at 0, 3300, 6600 and 9900
    flip = lambda i: data[:i] + bytes([data[i] ^ 1]) + data[i + 1:]
    base = sampled(data)
    assert sampled(data) == base and sampled(flip(3350)) != base and sampled(flip(9999)) != base
    assert sampled(flip(5000)) == base  # between the blocks: unseen, the price of reading little
    assert sampled(data + b'\0\0') != base and sampled(bytes(reversed(data))) != base
    assert data_fingerprint(write(path, data)) != base  # the default reads all 10 kB


def write(path, data):
    path.write_bytes(data)
    return str(path)
