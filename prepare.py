"""
Tokenize a text dataset into the uint16 memmaps that train.py reads:

    python prepare.py shakespeare [--input=PATH] [--out_dir=data/shakespeare]
    python prepare.py wikitext2   [--input=wiki.train.raw --val_input=wiki.valid.raw]
    python prepare.py openwebtext [--num_proc=8]
    python prepare.py mytext --input='texts/*.txt' [--val_input=held_out.txt] [--val_fraction=0.1]
    python prepare.py shakespeare_char --input=PATH --tokenizer=char      # one token per character

Writes OUT_DIR/train.bin, OUT_DIR/val.bin (GPT-2 BPE token ids, or character ids, uint16) and OUT_DIR/meta.json
(tokenizer, vocab size, token counts, sources). Each document is followed by the end-of-text token. Local inputs: each
file is one document; without --val_input the last val_fraction of the token stream is the val split, so
train.bin + val.bin is exactly the tokenized text.
"""
import glob
import json
import os
import sys
import urllib.request

import numpy as np
from tqdm import tqdm

from common import UserError, atomic_path, check_hub, configure

# -----------------------------------------------------------------------------
input = ''  # comma-separated local files or globs (the train split, or both splits without val_input)
val_input = ''  # comma-separated local files or globs for the val split
out_dir = ''  # default: data/NAME
val_fraction = 0.1  # share of the token stream held out when no val_input is given
num_proc = 8  # openwebtext: tokenizer processes
tokenizer = 'gpt2'  # or 'char': one id per distinct character, as nanoGPT's shakespeare_char (local text only)
# -----------------------------------------------------------------------------
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'assets')
SHAKESPEARE = os.path.join(ASSETS, 'tinyshakespeare.txt')  # Karpathy's char-rnn copy, public domain
GPT2_BPE_SHA256 = {'vocab.bpe': '1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5',
                   'encoder.json': '196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783'}
KNOWN = ('shakespeare', 'wikitext2', 'openwebtext')


class CharTokenizer:
    """Character-level ids: one per distinct character of the text, then the end-of-text id. With a vocabulary
    of ~100 instead of 50257 the output head costs almost nothing, so a CPU learns from ~10x more text per
    minute (the same interface as tiktoken's encodings, for the methods this repository uses)."""

    def __init__(self, chars):
        self.chars, self.stoi = chars, {c: i for i, c in enumerate(chars)}
        self.eot_token, self.n_vocab = len(chars), len(chars) + 1

    def encode_ordinary(self, text):
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise UserError(f"the character {e.args[0]!r} is not in this dataset's character vocabulary")

    def encode(self, text, allowed_special=()):
        return self.encode_ordinary(text)

    def decode(self, ids):
        return ''.join(self.chars[i] if i < self.eot_token else '<|endoftext|>' for i in ids)


def get_tokenizer(meta=None):
    """The tokenizer a prepared dataset was written with (GPT-2 BPE without meta)."""
    if meta is not None and meta['tokenizer'] == 'char':
        return CharTokenizer(meta['chars'])
    return gpt2_tokenizer()


def gpt2_tokenizer():
    """GPT-2's BPE built from the repository's copy of OpenAI's two files (assets/gpt2), so that no code path needs
    the network or a tiktoken cache; the same encoding as tiktoken.get_encoding('gpt2') (tests check known ids)."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str
    ranks = data_gym_to_mergeable_bpe_ranks(os.path.join(ASSETS, 'gpt2', 'vocab.bpe'),
                                            os.path.join(ASSETS, 'gpt2', 'encoder.json'), GPT2_BPE_SHA256['vocab.bpe'],
                                            GPT2_BPE_SHA256['encoder.json'])
    return tiktoken.Encoding('gpt2', pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={'<|endoftext|>': 50256}, explicit_n_vocab=50257)


def download(url, path, desc):
    """Fetch url into path with a progress bar, through a temporary file (atomic_path) so that a broken download
    never carries the final name (shared by prepare.py, sae.py and eval.py). Raises OSError."""
    with urllib.request.urlopen(url, timeout=30) as r, atomic_path(path) as tmp, open(tmp, 'wb') as f, \
            tqdm(total=int(r.headers.get('Content-Length', 0)), unit='B', unit_scale=True, desc=desc) as bar:
        while chunk := r.read(1 << 20):
            bar.update(f.write(chunk))


def expand(spec, flag):
    """'a.txt,dir/*.txt' -> sorted list of existing files; a pattern that matches nothing is an error."""
    files = []
    for pattern in filter(None, spec.split(',')):
        matched = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matched:
            raise UserError(f"{flag} '{pattern}' matches no file; check the path")
        files += matched
    return files


def read_documents(files):
    docs = []
    for path in files:
        if os.path.isdir(path):
            raise UserError(f"'{path}' is a folder; give files or a glob such as '{path}/*.txt'")
        with open(path, encoding='utf-8') as f:
            text = f.read()
        if not text.strip():
            raise UserError(f"input file '{path}' is empty")
        docs.append(text)
    return docs


def tokenize(docs, enc, desc):
    """Documents -> one uint16 token stream, each document followed by the end-of-text token."""
    ids = []
    for doc in tqdm(docs, desc=f"tokenizing {desc}", unit='doc', disable=len(docs) < 2):
        ids.extend(enc.encode_ordinary(doc))
        ids.append(enc.eot_token)
    return np.array(ids, dtype=np.uint16)  # GPT-2's 50257 ids fit in 16 bits


def write_split(path, tokens):
    with atomic_path(path) as tmp:  # a half-written file never carries the final name
        tokens.astype(np.uint16).tofile(tmp)


def openwebtext_splits(enc):
    """nanoGPT's recipe: HF openwebtext, 0.0005 of the documents held out with seed 2357, tokenized in
    parallel and written shard by shard, so memory stays flat."""
    from datasets import load_dataset
    check_hub('openwebtext', "prepare it on a machine with internet and copy data/openwebtext here")
    dataset = load_dataset('openwebtext', num_proc=num_proc)
    split = dataset['train'].train_test_split(test_size=0.0005, seed=2357, shuffle=True)
    split['val'] = split.pop('test')

    def process(example):
        ids = enc.encode_ordinary(example['text']) + [enc.eot_token]
        return {'ids': ids, 'len': len(ids)}

    tokenized = split.map(process, remove_columns=['text'], desc='tokenizing', num_proc=num_proc)
    out = {}
    for name, dset in tokenized.items():
        total = int(np.sum(dset['len'], dtype=np.uint64))
        arr = np.empty(total, dtype=np.uint16)
        idx = 0
        n_shards = min(1024, len(dset))
        for i in tqdm(range(n_shards), desc=f'collecting {name}'):
            shard = dset.shard(num_shards=n_shards, index=i, contiguous=True).with_format('numpy')
            batch = np.concatenate(shard['ids'])
            arr[idx:idx + len(batch)] = batch
            idx += len(batch)
        out[name] = arr
    return out, ['HF openwebtext']


def main(argv):
    positional = [a for a in argv if not a.startswith('--')]
    if len(positional) != 1:
        raise UserError("usage: python prepare.py NAME [--input=FILES] [--val_input=FILES] [--out_dir=DIR]; "
             f"NAME is one of {', '.join(KNOWN)} or any name for local --input files")
    name = positional[0]
    configure(globals(), [a for a in argv if a.startswith('--')])
    if name not in KNOWN and not input:
        raise UserError(f"unknown dataset '{name}': use one of {', '.join(KNOWN)}, or local files: --input=PATH")
    if not 0 < val_fraction < 1:
        raise UserError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if tokenizer not in ('gpt2', 'char'):
        raise UserError(f"unknown tokenizer '{tokenizer}'; use 'gpt2' or 'char'")
    if tokenizer == 'char' and name in ('openwebtext', 'wikitext2') and not input:
        raise UserError("tokenizer='char' needs local text: give it with --input=PATH")
    enc = get_tokenizer() if tokenizer == 'gpt2' else None  # char: built from the text below
    target = out_dir or os.path.join('data', name)

    if name == 'openwebtext' and not input:
        splits, sources = openwebtext_splits(enc)
    else:
        if input:
            train_files = expand(input, '--input')
        elif name == 'shakespeare':  # shipped with the repository
            train_files = [SHAKESPEARE]
        else:  # wikitext2 from the HF hub: the raw text of each split is one document
            from datasets import load_dataset
            check_hub('wikitext-2', "give local files with --input=wiki.train.raw --val_input=wiki.valid.raw")
            try:
                ds = load_dataset('wikitext', 'wikitext-2-raw-v1')
            except Exception as e:
                raise UserError(f"cannot load wikitext-2-raw-v1 from the HF hub ({type(e).__name__}); "
                     "give local files with --input=wiki.train.raw --val_input=wiki.valid.raw")
            splits = {s: tokenize([''.join(ds[k]['text'])], enc, s)
                      for s, k in (('train', 'train'), ('val', 'validation'))}
            sources = ['HF wikitext/wikitext-2-raw-v1']
            train_files = None
        if train_files is not None:
            sources = [os.path.abspath(f) for f in train_files]
            docs = read_documents(train_files)
            val_files = expand(val_input, '--val_input')
            val_docs = read_documents(val_files)
            if tokenizer == 'char':  # the vocabulary: every character of both splits
                enc = CharTokenizer(''.join(sorted(set(''.join(docs + val_docs)))))
            tokens = tokenize(docs, enc, 'train')
            if val_input:
                sources += [os.path.abspath(f) for f in val_files]
                splits = {'train': tokens, 'val': tokenize(val_docs, enc, 'val')}
            else:
                n_val = max(1, int(len(tokens) * val_fraction))
                splits = {'train': tokens[:-n_val], 'val': tokens[-n_val:]}

    os.makedirs(target, exist_ok=True)
    for split, tokens in splits.items():
        write_split(os.path.join(target, f'{split}.bin'), tokens)
    meta = {'tokenizer': tokenizer, 'vocab_size': enc.n_vocab, 'eot_token': enc.eot_token, 'dtype': 'uint16',
            'train_tokens': int(len(splits['train'])), 'val_tokens': int(len(splits['val'])), 'sources': sources}
    if tokenizer == 'char':
        meta['chars'] = enc.chars
    with open(os.path.join(target, 'meta.json'), 'w') as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {target}: train {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} tokens")



# -----------------------------------------------------------------------------
# Reading a prepared dataset (train.py, sae.py, attribution.py)

def data_dir_of(dataset):
    """A name under data/ or a path to a folder prepare.py wrote."""
    return dataset if os.path.isdir(dataset) else os.path.join('data', dataset)


def read_meta(data_dir):
    path = os.path.join(data_dir, 'meta.json')
    if not os.path.exists(path):
        raise UserError(f"no prepared dataset at '{data_dir}' ({path} is missing); "
                         f"run: python prepare.py NAME --out_dir={data_dir}")
    with open(path) as f:
        return json.load(f)


def load_tokens(data_dir, split):
    """The split's tokens as a read-only uint16 memmap. Open a fresh one per batch in long loops: a memmap
    kept open grows the resident memory as pages are touched (nanoGPT's fix)."""
    path = os.path.join(data_dir, f'{split}.bin')
    if not os.path.exists(path):
        raise UserError(f"{path} is missing; run prepare.py for this dataset")
    return np.memmap(path, dtype=np.uint16, mode='r')


if __name__ == '__main__':
    main(sys.argv[1:])
