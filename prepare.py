"""Tokenize text, streaming, into the uint16 files train.py reads (README.md): OUT_DIR/train.bin,
val.bin, then meta.json. Each document (.txt file, .jsonl line, .parquet or hub row) ends with EOT.
"""
import bz2
import glob
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import sys
import tarfile
import time
import urllib.request

import numpy as np
from tqdm import tqdm

from common import REPO, UserError, atomic_path, check_hub, configure, first_line

# -----------------------------------------------------------------------------
input: 'str' = ''  # train files or globs, comma-separated: .txt, .jsonl (or .gz/.xz/.bz2), .parquet
val_input: 'str' = ''  # the same for the val split
hub: 'str' = ''  # a Hugging Face dataset, streamed
hub_config: 'str' = ''
hub_split: 'str' = 'train'
hub_revision: 'str' = ''  # a branch, tag or commit ('': main; openwebtext: OPENWEBTEXT_REVISION)
local_hub: 'dir?' = ''  # a hub dataset's files (hf download --local-dir)
text_field: 'str' = 'text'  # of a .jsonl line, a .parquet row or a hub row
out_dir: 'out?' = ''  # default: data/NAME
val_fraction: '0 < float < 1' = 0.1  # held out when no val split is given
max_tokens: 'int >= 0' = 0  # 0: all
num_proc: 'int >= 1' = 8  # tokenizer threads
tokenizer: 'gpt2|char' = 'gpt2'  # char: one id per distinct character (nanoGPT's shakespeare_char)
# -----------------------------------------------------------------------------
ASSETS = os.path.join(REPO, 'assets')
SHAKESPEARE = os.path.join(ASSETS, 'tinyshakespeare.txt')  # Karpathy's char-rnn copy, public domain
GPT2_BPE_SHA256 = {
    'vocab.bpe': '1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5',
    'encoder.json': '196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783'}
KNOWN = ('shakespeare', 'wikitext2', 'openwebtext')
OPENWEBTEXT = 'Skylion007/openwebtext'
# main's subsets/*.tar became data/*.parquet: the rows the old loading script made, 8,013,769
# documents (nanoGPT's 8,009,762 + 4,007), at this commit; a local copy of the tars reads the same
OPENWEBTEXT_REVISION = '79d93d786212f7344586290adb811d4ae6a1762c'


class CharTokenizer:
    """Character ids behind tiktoken's interface; ~100 ids make the output head cheap on a CPU."""

    def __init__(self, chars):
        self.chars, self.ids = chars, {c: i for i, c in enumerate(chars)}
        self.eot_token, self.n_vocab = len(chars), len(chars) + 1

    def encode_ordinary(self, text, allowed_special=()):
        try:
            return [self.ids[c] for c in text]
        except KeyError as e:
            raise UserError(f"{e.args[0]!r} is not in this dataset's character vocabulary")

    encode = encode_ordinary  # no special tokens: '<|endoftext|>' is 13 characters here

    def encode_ordinary_batch(self, texts, num_threads):
        return [self.encode_ordinary(t) for t in texts]

    def decode(self, ids):
        return ''.join(self.chars[i] if i < self.eot_token else '<|endoftext|>' for i in ids)


def get_tokenizer(meta):
    return CharTokenizer(meta['chars']) if meta and 'chars' in meta else gpt2_tokenizer()


def gpt2_tokenizer():
    """tiktoken's 'gpt2' encoding from OpenAI's files in assets/gpt2: no network or cache needed."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str
    files = [os.path.join(ASSETS, 'gpt2', name) for name in GPT2_BPE_SHA256]
    ranks = data_gym_to_mergeable_bpe_ranks(*files, *GPT2_BPE_SHA256.values())
    return tiktoken.Encoding('gpt2', pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={'<|endoftext|>': 50256}, explicit_n_vocab=50257)


def download(url, path, desc):
    with urllib.request.urlopen(url, timeout=30) as r, atomic_path(path) as tmp:
        total = int(r.headers.get('Content-Length', 0))
        with open(tmp, 'wb') as f, tqdm(total=total, unit='B', unit_scale=True, desc=desc) as bar:
            while chunk := r.read(1 << 20):
                bar.update(f.write(chunk))


# Documents, as (text, ends the document) pieces

def expand(spec, flag):
    files = []
    for pattern in filter(None, spec.split(',')):
        matched = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matched:
            raise UserError(f"{flag} '{pattern}' matches no file")
        files += matched
    for path in files:
        if os.path.isdir(path):
            raise UserError(f"'{path}' is a folder; give files or a glob, e.g. '{path}/*.txt'")
        # up to the first text: a bad first record fails before any progress bar
        if not any(text.strip() for text, _ in local_documents([path])):
            raise UserError(f"input file '{path}' is empty")
    return files


def pieces(f, block):
    """A text file's text as one document, read in blocks and cut only where its GPT-2 tokens do not
    change: after a newline between two letters or digits, where the pre-tokenizer splits anyway."""
    text = ''
    while chunk := f.read(block):
        text += chunk
        i = text.rfind('\n')
        while i >= 0 and not (0 < i < len(text) - 1 and (text[i - 1] + text[i + 1]).isalnum()):
            i = text.rfind('\n', 0, i)
        if i >= 0:
            yield text[:i + 1], False
            text = text[i + 1:]
    yield text, True


# read as corpora often come (.jsonl.gz): decompressing first would need the disk twice over
OPENERS = {'.gz': gzip.open, '.xz': lzma.open, '.bz2': bz2.open}


def local_documents(files, block=1 << 24):
    for path in files:
        stem, ext = os.path.splitext(path)
        kind = os.path.splitext(stem)[1] if ext in OPENERS else ext
        try:
            if kind == '.parquet':
                yield from rows_of(parquet_rows(path), f"{path}, row")
            else:
                with OPENERS.get(ext, open)(path, 'rt', encoding='utf-8') as f:
                    yield from rows_of(f, f"{path}, line") if kind == '.jsonl' else pieces(f, block)
        except UnicodeDecodeError as e:
            byte = e.object[e.start:e.start + 1]
            raise UserError(f"{path} is not UTF-8 text (byte {byte!r} and on); convert it: "
                            "iconv -f latin1 -t utf-8 FILE > NEW")
        except (OSError, EOFError) as e:  # also a broken or mislabelled compressed file
            raise UserError(f"cannot read {path} ({first_line(e)})")


def rows_of(rows, where):
    for i, row in enumerate(rows, 1):
        at = f"{where} {i}"
        if isinstance(row, str):
            if not row.strip():
                continue
            try:
                row = json.loads(row)
            except ValueError as e:
                raise UserError(f"{at} is not JSON ({e})")
        if not isinstance(row, dict) or text_field not in row:
            has = f"its fields: {', '.join(list(row)[:20])}" if isinstance(row, dict) else \
                f"it is a JSON {type(row).__name__}"
            raise UserError(f"{at} has no '{text_field}' field ({has}); pass --text_field=NAME")
        if not isinstance(text := row[text_field], str):
            raise UserError(f"{at}: its '{text_field}' is {text!r:.40}, not text; fix or drop it")
        yield text, True


def parquet_rows(path):
    try:
        import pyarrow.parquet as pq  # installed with datasets
        file = pq.ParquetFile(path)
    except Exception as e:  # ArrowInvalid: not parquet
        raise UserError(f"cannot read {path} as parquet ({e})")
    columns = file.schema_arrow.names
    if text_field not in columns:
        raise UserError(f"{path} has no column '{text_field}' (its columns: "
                        f"{', '.join(columns[:20])}); pass --text_field=NAME")
    for batch in file.iter_batches(columns=[text_field]):
        yield from batch.to_pylist()


def hub_documents(path, config, split):
    from datasets import load_dataset
    if not os.path.isdir(path):
        check_hub(path, f"download its files elsewhere, pass --{'hub' if hub else 'local_hub'}=DIR")
    try:  # the connection may also fail midway
        rows = load_dataset(path, config or None, split=split, streaming=True,
                            revision=hub_revision or None)
        yield from rows_of(rows, f"{path}, row")
    except Exception as e:
        raise UserError(f"cannot read {path} ({first_line(e)}); check the --hub* settings")


def openwebtext_documents(files):
    """OpenWebText as its old loading script gave it, in the order nanoGPT's split permutes: the
    parquet files' rows, or each tar's .xz archives' .txt files, 3+ newlines squeezed, stripped."""
    def members(tar, suffix):  # regular files, hidden ones skipped, as datasets' archive iterator
        for info in tar:
            name = os.path.basename(info.name)
            if info.isreg() and not name.startswith(('.', '__')) and name.endswith(suffix):
                yield tar.extractfile(info)
    for path in files:
        if path.endswith('.parquet'):
            yield from parquet_rows(path)  # {'text': ...}
            continue
        with tarfile.open(path, mode='r|*') as outer:
            for f in members(outer, '.xz'):
                with tarfile.open(fileobj=lzma.open(f), mode='r|') as inner:
                    for g in members(inner, '.txt'):
                        yield {'text': re.sub('\n\n\n+', '\n\n', g.read().decode()).strip()}


def openwebtext_splits():
    """nanoGPT's (train, val) split, the train documents in its permuted order."""
    from datasets import Dataset
    revision = hub_revision or OPENWEBTEXT_REVISION
    fix = (f"get them with hf download {OPENWEBTEXT} --repo-type dataset --revision {revision}"
           " --local-dir DIR and pass --local_hub=DIR")
    folder = local_hub
    if not folder:
        from huggingface_hub import snapshot_download
        check_hub('openwebtext', fix)
        try:
            folder = snapshot_download(OPENWEBTEXT, repo_type='dataset', revision=revision,
                                       allow_patterns=['*.parquet', 'subsets/*.tar'])
        except Exception as e:
            raise UserError(f"cannot download {OPENWEBTEXT} at revision {revision} "
                            f"({first_line(e)}); {fix}")
    files = sorted(glob.glob(os.path.join(folder, '**', '*.parquet'), recursive=True)) or \
        sorted(glob.glob(os.path.join(folder, 'subsets', 'urlsf_subset*.tar')))
    if not files:
        raise UserError(f"no .parquet files or subsets/urlsf_subset*.tar in {folder}; {fix}")
    try:  # on disk
        docs = Dataset.from_generator(openwebtext_documents, gen_kwargs={'files': files})
    except Exception as e:
        raise UserError(f"cannot read OpenWebText's files ({first_line(e)}); {fix}")
    split = docs.train_test_split(test_size=0.0005, seed=2357, shuffle=True)
    rows = lambda d: ((text, True) for batch in d.iter(1024) for text in batch['text'])
    return rows(split['train']), rows(split['test'])


def batches(pieces, n_chars):
    batch, size = [], 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece[0])
        if size >= n_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def tokenize_into(path, pieces, enc, desc, limit=0):
    n = 0
    with open(path, 'wb') as f, \
            tqdm(desc=f"tokenizing {desc}", unit=' tokens', unit_scale=True) as bar:
        for batch in batches(pieces, 1 << 23):
            ids = []
            encoded = enc.encode_ordinary_batch([t for t, _ in batch], num_threads=num_proc)
            for tokens, (_, ends) in zip(encoded, batch):
                ids += tokens + [enc.eot_token] * ends
            ids = np.array(ids[:limit - n] if limit else ids, dtype=np.uint16)  # all ids < 2**16
            ids.tofile(f)
            n += len(ids)
            bar.update(len(ids))
            if limit and n >= limit:
                break
    return n


def hold_out(train_path, val_path, start):
    with open(train_path, 'rb') as src, open(val_path, 'wb') as dst:
        src.seek(start)
        shutil.copyfileobj(src, dst)
    os.truncate(train_path, start)


def main(argv):
    names = [a for a in argv if not a.startswith('--')]
    if len(names) != 1:
        raise UserError("usage: python prepare.py NAME [--input=FILES | --hub=DATASET]; NAME: "
                        f"{', '.join(KNOWN)} or your data's name")
    name = names[0]
    configure(globals(), [a for a in argv if a.startswith('--')])
    if name not in KNOWN and not input and not hub:
        raise UserError(f"unknown dataset '{name}': use one of {', '.join(KNOWN)}, "
                        "--input=FILES or --hub=DATASET")
    target = out_dir or os.path.join('data', name)

    # docs() -> fresh (train, val) documents; val None: the tail of the train stream
    if input or (name == 'shakespeare' and not hub):  # Tiny Shakespeare: shipped
        train_files = expand(input, '--input') if input else [SHAKESPEARE]
        val_files = expand(val_input, '--val_input')
        sources = [os.path.abspath(f) for f in train_files + val_files]
        docs = lambda: (local_documents(train_files),
                        local_documents(val_files) if val_files else None)
    elif hub:
        sources = [f'{hub}:{hub_config}' if hub_config else hub]
        docs = lambda: (hub_documents(hub, hub_config, hub_split), None)
    elif name == 'wikitext2':  # the raw text of each split is one document
        path, config = local_hub or 'Salesforce/wikitext', 'wikitext-2-raw-v1'
        sources = [f'{path}:{config}']
        whole = lambda split: [(''.join(t for t, _ in hub_documents(path, config, split)), True)]
        docs = lambda: (whole('train'), whole('validation'))
    else:  # openwebtext
        if tokenizer == 'char':
            raise UserError("tokenizer='char' is for small local text: give it with --input=PATH")
        sources = [f'{OPENWEBTEXT}@{hub_revision or OPENWEBTEXT_REVISION}']
        docs = openwebtext_splits  # called once: the char tokenizer, which reads twice, is refused
    enc = gpt2_tokenizer() if tokenizer == 'gpt2' else \
        CharTokenizer(''.join(sorted({c for s in docs() if s for t, _ in s for c in t})))

    # New files replace the old only once complete, meta.json (the finished mark) removed just
    # before and written last: a failed run keeps the old dataset, one killed mid-swap has no meta.
    meta_path = os.path.join(target, 'meta.json')
    train_docs, val_docs = docs()
    t0 = time.time()
    with atomic_path(os.path.join(target, 'train.bin')) as train_tmp, \
            atomic_path(os.path.join(target, 'val.bin')) as val_tmp:
        n_train = tokenize_into(train_tmp, train_docs, enc, 'train', max_tokens)
        if n_train < 2:
            raise UserError(f"the train text gave {n_train} tokens; check the input, text_field")
        if val_docs is not None:
            n_val = tokenize_into(val_tmp, val_docs, enc, 'val')
        else:
            n_val = max(1, int(n_train * val_fraction))
            n_train -= n_val
            hold_out(train_tmp, val_tmp, 2 * n_train)  # in bytes, two a token
        for tmp in (train_tmp, val_tmp):  # on disk before the old files stop counting
            with open(tmp, 'rb+') as f:
                os.fsync(f.fileno())
        if os.path.exists(meta_path):
            os.remove(meta_path)
    meta = {'tokenizer': tokenizer, 'vocab_size': enc.n_vocab, 'eot_token': enc.eot_token,
            'dtype': 'uint16', 'train_tokens': n_train, 'val_tokens': n_val, 'sources': sources}
    if tokenizer == 'char':
        meta['chars'] = enc.chars
    with atomic_path(meta_path) as tmp, open(tmp, 'w') as f:
        json.dump(meta, f, indent=1)
    rate = (n_train + n_val) / max(time.time() - t0, 1e-9)
    print(f"wrote {target}: train {n_train:,} tokens, val {n_val:,} tokens ({rate:,.0f} tokens/s)")


# Reading a prepared dataset (train.py, sae.py, attribution.py)

def data_dir_of(dataset):
    return dataset if os.path.isdir(dataset) else os.path.join('data', dataset)


def read_meta(data_dir):
    try:
        with open(os.path.join(data_dir, 'meta.json')) as f:
            return json.load(f)
    except (OSError, ValueError):  # missing, or not what prepare.py writes
        raise UserError(f"no prepared dataset at '{data_dir}'; "
                        f"run python prepare.py NAME --out_dir={data_dir}")


def windows(data, starts, length):
    import torch
    return torch.from_numpy(np.stack([data[s:s + length] for s in starts]).astype(np.int64))


def load_tokens(data_dir, split):
    """A read-only memmap; reopen it per batch, as nanoGPT: one kept open grows resident memory."""
    path = os.path.join(data_dir, f'{split}.bin')
    if not os.path.exists(path):
        raise UserError(f"{path} is missing; rerun prepare.py")
    if not os.path.getsize(path):  # np.memmap refuses an empty file
        return np.zeros(0, np.uint16)
    return np.memmap(path, dtype=np.uint16, mode='r')


def data_fingerprint(path, blocks=64, block=1 << 16):
    """Ties a label cache to its tokens: a digest of the file's size and `blocks` evenly spaced
    blocks of `block` bytes (4 MiB of 18 GB; all of a smaller file); bytes between go unseen."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    whole = size <= blocks * block
    with open(path, 'rb') as f:
        for i in [0] if whole else range(blocks):
            f.seek(i * (size - block) // (blocks - 1))  # the first block at 0, the last at the end
            h.update(f.read(size if whole else block))
    return h.hexdigest()[:16]


if __name__ == '__main__':
    main(sys.argv[1:])
