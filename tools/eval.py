"""Evaluate a checkpoint of any mode (or OpenAI's GPT-2) as the paper does: perplexity on the
dataset's val split, LAMBADA, WikiText, HellaSwag, PIQA, ARC-Easy, WinoGrande and Social IQA, scored
by log-likelihood as EleutherAI's lm-evaluation-harness does (its prompts and acc / acc_norm).

Task files: from data_dir (official names, or files starting with them: lambada_test*.jsonl), else
downloaded once into ~/.cache/cocomix/eval. lm_eval_model(scorer) wraps a Scorer for the harness.
"""
import glob
import json
import math
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

import numpy as np
import torch
import torch.nn.functional as F

from common import DEVICE, DTYPE, UserError, atomic_path, autocast, check_hub, check_tokenizers
from common import configure, first_line, load_model
from prepare import data_dir_of, download, get_tokenizer, load_tokens, read_meta, windows

# -----------------------------------------------------------------------------
init_from: 'str' = 'resume'  # 'resume' (the checkpoint in out_dir) or a gpt2 variant
out_dir: 'str' = 'out'
tasks: 'str' = 'ppl,lambada,wikitext,hellaswag,piqa,arc_easy,winogrande,siqa'
dataset: 'str' = ''  # for ppl: default, the checkpoint's own dataset
data_dir: 'dir?' = ''  # task files; default: download them
limit: 'int >= 0' = 0  # items per task (windows for ppl); 0 = all
batch_size: 'int >= 1' = 16  # sequences per forward pass
json_out: 'str' = ''  # also write the results here
device: 'device' = DEVICE
dtype: 'float32|bfloat16|float16' = DTYPE
# -----------------------------------------------------------------------------
CACHE = os.path.expanduser('~/.cache/cocomix/eval')
# (file pattern in data_dir, URL, or HF (path, name, split) where no plain file is published)
SOURCES = {
    'lambada': ('lambada_test*.jsonl', 'https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl'),
    'hellaswag': ('hellaswag_val*.jsonl', 'https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl'),
    'piqa': ('piqa_valid*.jsonl', 'https://yonatanbisk.com/piqa/data/valid.jsonl'),
    'piqa_labels': ('piqa_valid-labels*.lst', 'https://yonatanbisk.com/piqa/data/valid-labels.lst'),
    'siqa_labels': ('siqa_dev-labels*.lst', None),  # the hub's rows carry their labels
    'arc_easy': ('arc_easy_test*.jsonl', ('allenai/ai2_arc', 'ARC-Easy', 'test')),
    'winogrande': ('winogrande_dev*.jsonl', ('allenai/winogrande', 'winogrande_xl', 'validation')),
    'siqa': ('siqa_dev*.jsonl', ('allenai/social_i_qa', None, 'validation')),
    'wikitext': ('wiki.test.raw', ('Salesforce/wikitext', 'wikitext-2-raw-v1', 'test')),
}


class Scorer:
    """Log-likelihoods under one of our models: the three calls lm-evaluation-harness makes."""

    def __init__(self, model, enc, device, batch_size=16):
        self.model, self.enc, self.device, self.batch_size = model, enc, device, batch_size
        self.block_size = model.config.block_size

    def score(self, pieces):
        """pieces: (token ids, n) -> (log-probability of the last n tokens given the ones before,
        whether each is the greedy choice). Left-truncated to block_size + 1 tokens (a longer
        continuation is scored on its last block_size tokens); batched, padded right."""
        out = []
        for i in range(0, len(pieces), self.batch_size):
            batch = [(ids[-(self.block_size + 1):], min(n, len(ids) - 1, self.block_size))
                     for ids, n in pieces[i:i + self.batch_size]]
            T = max(len(ids) for ids, _ in batch) - 1
            x = torch.zeros(len(batch), T, dtype=torch.long)
            y = torch.full((len(batch), T), -1, dtype=torch.long)
            for b, (ids, n) in enumerate(batch):
                x[b, :len(ids) - 1] = torch.tensor(ids[:-1])
                y[b, len(ids) - 1 - n:len(ids) - 1] = torch.tensor(ids[-n:])  # scored targets only
            with torch.no_grad():
                logits = self.model(x.to(self.device), y.to(self.device))[0].float().cpu()
            mask = y >= 0
            ll = (F.log_softmax(logits, dim=-1).gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask).sum(-1)
            greedy = ((logits.argmax(-1) == y) | ~mask).all(-1)
            out += list(zip(ll.tolist(), greedy.tolist()))
        return out

    def loglikelihood(self, requests):
        """[(context, continuation)] -> [(log p(continuation | context), is greedy)]."""
        pieces = []
        for context, continuation in requests:
            cont = self.enc.encode_ordinary(continuation)
            pieces.append(((self.enc.encode_ordinary(context) or [self.enc.eot_token]) + cont, len(cont)))
        return self.score(pieces)

    def loglikelihood_rolling(self, requests):
        """[(text,)] -> [log p(text)]: every token scored once, after the end-of-text token, in
        disjoint block_size windows (the harness's rolling windows with one token of context)."""
        out = []
        for (text,) in requests:
            ids = [self.enc.eot_token] + self.enc.encode_ordinary(text)
            pieces = [(ids[i:i + self.block_size + 1], len(ids[i:i + self.block_size + 1]) - 1)
                      for i in range(0, len(ids) - 1, self.block_size)]
            out.append(sum(ll for ll, _ in self.score(pieces)))
        return out

    def generate_until(self, requests):
        """[(context, {'until': stops, 'max_gen_toks': n})] -> [greedy text up to a stop]."""
        out = []
        for context, kwargs in requests:
            idx = torch.tensor([self.enc.encode_ordinary(context) or [self.enc.eot_token]], device=self.device)
            with torch.no_grad():
                y = self.model.generate(idx, kwargs.get('max_gen_toks', 256), temperature=0)
            text = self.enc.decode([t for t in y[0, idx.size(1):].tolist() if t < self.enc.n_vocab])
            for stop in kwargs.get('until', []):
                text = text.split(stop)[0]
            out.append(text)
        return out


def lm_eval_model(scorer):
    """The Scorer as an lm_eval LM: lm_eval.simple_evaluate(model=lm_eval_model(s), tasks=[...])."""
    try:
        from lm_eval.api.model import LM
    except ImportError:
        raise UserError("the harness adapter needs the optional package lm_eval: pip install lm_eval")
    calls = ('loglikelihood', 'loglikelihood_rolling', 'generate_until')
    method = lambda name: lambda self, requests, disable_tqdm=False: getattr(scorer, name)([r.args for r in requests])
    return type('CoCoMixLM', (LM,), {name: method(name) for name in calls})()


# -----------------------------------------------------------------------------
# Task files and their items: (context, [choices], gold index)

def task_file(name, data_dir=''):
    pattern, source = SOURCES[name]
    if data_dir:
        found = sorted(glob.glob(os.path.join(data_dir, pattern)))
        if name == 'wikitext' and not found:  # the paper's test split, else the val split at hand
            found = sorted(glob.glob(os.path.join(data_dir, 'wiki.valid.raw')))
        if not found:
            raise UserError(f"no file matching {pattern} in {data_dir}; add it or leave data_dir empty to download")
        return found[0]
    path = os.path.join(CACHE, pattern.replace('*', ''))
    if os.path.exists(path):
        return path
    if source is None:  # published with the data, nowhere else
        raise UserError(f"no file matching {pattern}: put it in a folder, pass --data_dir=FOLDER")
    try:  # into CACHE: atomic_path makes the folder
        if isinstance(source, str):
            download(source, path, name)
        else:  # only on the HF hub: written out once in its usual jsonl / raw layout
            from datasets import load_dataset
            check_hub(f"the {name} data", "put the file in a folder and pass --data_dir=FOLDER")
            rows = load_dataset(source[0], source[1], split=source[2])
            with atomic_path(path) as tmp, open(tmp, 'w') as f:
                f.writelines([''.join(rows['text'])] if name == 'wikitext' else
                             [json.dumps(row) + '\n' for row in rows])
    except Exception as e:
        raise UserError(f"cannot download the {name} data ({type(e).__name__}: {e}); "
                        f"put the file in a folder and pass --data_dir=FOLDER")
    return path


def read_jsonl(path):
    with open(path, encoding='utf-8') as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows or json.loads('')  # an empty file: a ValueError, as a damaged one


def choice_items(name, path, data_dir=''):
    rows = read_jsonl(path)
    if name == 'hellaswag':  # the harness's cleanup of WikiHow artifacts
        clean = lambda t: re.sub('\\[.*?\\]', '', t.strip().replace(' [title]', '. ')).replace('  ', ' ')
        ctx = lambda r: r['ctx_a'] + ' ' + r['ctx_b'].capitalize() if 'ctx_a' in r else r['ctx']
        return [(r['activity_label'] + ': ' + clean(ctx(r)), [' ' + clean(e) for e in r['endings']],
                 int(r['label'])) for r in rows]
    if name == 'arc_easy':
        return [(f"Question: {r['question']}\nAnswer:", [' ' + t for t in r['choices']['text']],
                 r['choices']['label'].index(r['answerKey'])) for r in rows]
    if rows and 'label' in rows[0]:  # gold labels in the rows, else in the task's .lst file
        gold = [int(r['label']) for r in rows]
    else:
        gold = [int(line) for line in open(task_file(name + '_labels', data_dir)) if line.strip()]
    if name == 'piqa':
        return [(f"Question: {r['goal']}\nAnswer:", [' ' + r['sol1'], ' ' + r['sol2']], g)
                for r, g in zip(rows, gold)]
    return [(f"Q: {r['context']} {r['question']}\nA:", [' ' + r['answer' + c] for c in 'ABC'], g - 1)
            for r, g in zip(rows, gold)]  # siqa


def multiple_choice(scorer, items):
    """acc: the highest log-likelihood is gold; acc_norm: the same per character (the harness's)."""
    requests = [(ctx, c) for ctx, choices, _ in items for c in choices]
    ll = iter(scorer.loglikelihood(requests))
    acc = acc_norm = 0
    for ctx, choices, gold in items:
        scores = [next(ll)[0] for _ in choices]
        acc += int(np.argmax(scores) == gold)
        acc_norm += int(np.argmax([s / len(c) for s, c in zip(scores, choices)]) == gold)
    return {'acc': 100 * acc / len(items), 'acc_norm': 100 * acc_norm / len(items)}


def winogrande(scorer, rows):
    """The harness's partial scoring: the text after the blank, given its start with each option."""
    requests, gold = [], []
    for r in rows:
        i = r['sentence'].index('_')
        target = ' ' + r['sentence'][i + 1:].strip()
        requests += [(r['sentence'][:i] + r['option1'], target), (r['sentence'][:i] + r['option2'], target)]
        gold.append(int(r['answer']) - 1)
    ll = [x for x, _ in scorer.loglikelihood(requests)]
    return {'acc': 100 * np.mean([int(ll[2 * k + 1] > ll[2 * k]) == g for k, g in enumerate(gold)])}


def lambada(scorer, rows):
    """OpenAI's LAMBADA: the last word; acc: all its tokens greedy; ppl = exp(-mean log p(word))."""
    requests = [(r['text'].rsplit(' ', 1)[0], ' ' + r['text'].rsplit(' ', 1)[1]) for r in rows]
    out = scorer.loglikelihood(requests)
    return {'acc': 100 * np.mean([g for _, g in out]), 'ppl': math.exp(-np.mean([ll for ll, _ in out]))}


def wikitext(scorer, path, limit=0):
    """Word perplexity (per whitespace word of the raw text, the paper's WikiText number), token
    perplexity and bits per byte, the whole file one rolling document."""
    text = open(path, encoding='utf-8').read()[:limit * 1000 or None]  # about `limit` paragraphs
    ll = scorer.loglikelihood_rolling([(text,)])[0]
    n_tokens = len(scorer.enc.encode_ordinary(text))
    return {'word_ppl': math.exp(-ll / len(text.split())), 'token_ppl': math.exp(-ll / n_tokens),
            'bits_per_byte': -ll / math.log(2) / len(text.encode('utf-8'))}


def perplexity(model, data, block_size, batch_size, device, limit=0):
    """Mean next-token loss over the first `limit` (0: all) disjoint block_size windows of a
    prepared split (the paper's OpenWebText number)."""
    starts = range(0, (len(data) - 1) // block_size * block_size, block_size)[:limit or None]
    total = 0.0
    for i in range(0, len(starts), batch_size):
        w = windows(data, starts[i:i + batch_size], block_size + 1)
        total += model(w[:, :-1].to(device), w[:, 1:].to(device))[1].item() * len(w)
    loss = total / len(starts)
    return {'loss': loss, 'ppl': math.exp(loss), 'tokens': len(starts) * block_size}


def main(argv):
    configure(globals(), argv)
    known = ['ppl'] + [k for k in SOURCES if '_labels' not in k]
    unknown = [t for t in tasks.split(',') if t not in known]
    if unknown:  # before any work: a typo in the last task must not cost the evaluation of the others
        raise UserError(f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; use {', '.join(known)}")
    if json_out.endswith('/') or os.path.isdir(json_out) or os.path.isfile(os.path.dirname(json_out)):
        raise UserError(f"json_out={json_out} must name a file (in a folder, made if missing)")
    paths = {t: task_file(t, data_dir) for t in tasks.split(',') if t != 'ppl'}  # all found first
    model, checkpoint = load_model(out_dir if init_from == 'resume' else init_from, device)
    name = f"{out_dir} ({checkpoint.get('mode', 'ntp')}, step {checkpoint['iter_num']})" \
        if checkpoint else init_from
    tokens = {'tokenizer': 'gpt2'} if checkpoint is None else \
        checkpoint.get('data_meta', {'vocab_size': model.config.vocab_size})
    scorer = Scorer(model, get_tokenizer(checkpoint and checkpoint.get('data_meta')), device, batch_size)
    if 'ppl' in tasks.split(','):  # the data checked before any task runs
        ds = dataset or (checkpoint or {}).get('config', {}).get('dataset')
        if not ds:
            raise UserError("task ppl needs --dataset=NAME (a folder prepare.py wrote)")
        ppl_dir = data_dir_of(ds)
        # scored with another tokenizer, the ids mean other characters: a number, but meaningless
        check_tokenizers(read_meta(ppl_dir), f"the data in {ppl_dir}", tokens, f"the model {name}")
        val, T = load_tokens(ppl_dir, 'val'), model.config.block_size
        if len(val) < T + 1:
            raise UserError(f"the val split of {ppl_dir} has {len(val)} tokens, fewer than one "
                            f"window of the model's context {T} + 1; prepare more val text")

    def run(task, scorer):
        path = paths.get(task)
        try:
            with autocast(device, dtype), torch.no_grad():
                if task == 'ppl':
                    return perplexity(model, val, T, batch_size, device, limit)
                if task == 'wikitext':
                    return wikitext(scorer, path, limit)
                if task in ('winogrande', 'lambada'):
                    return (winogrande if task == 'winogrande' else lambada)(scorer, read_jsonl(path)[:limit or None])
                return multiple_choice(scorer, choice_items(task, path, data_dir)[:limit or None])
        except (OSError, KeyError, IndexError, TypeError, ValueError, ZeroDivisionError) as e:
            raise e if path is None or scorer is not dry else UserError(  # the files' errors only
                f"{path} (or its labels) is not a {task} file as published ({first_line(e)}); replace it")
    dry = Scorer(model, scorer.enc, device)
    dry.score = lambda pieces: [(0.0, False)] * len(pieces)
    for task in paths:  # every task file read, with no model call, before the first is scored
        run(task, dry)
    results = {}
    for task in tasks.split(','):
        results[task] = run(task, scorer)
        shown = (f"{k} {v:,.4f}" if isinstance(v, float) else f"{k} {v:,}" for k, v in results[task].items())
        print(f"{task:>10}: " + ', '.join(shown), flush=True)
    headline = (f"{t} {next(iter(r))} {next(iter(r.values())):.4f}" for t, r in results.items())
    print(f"done: {name}: " + '; '.join(headline))
    if json_out:
        with atomic_path(json_out) as tmp, open(tmp, 'w') as f:  # its folder made if missing
            json.dump({'model': name, 'results': results}, f, indent=1)
    return results


if __name__ == '__main__':
    main(sys.argv[1:])
