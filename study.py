"""
A small, honest reproduction of the paper's claim (CoCoMix beats next-token prediction at equal tokens), sized for
a 2-core CPU: character-level Wikipedia with WikiText's validation text as the val
split, one teacher and its SAE, then students with matched active parameters trained on the same tokens:
NTP, KD, CoCoMix (interleaved, the paper's; and added, the paper's ablation) and the ablations activation labels,
prediction only and mixing only, several seeds each.

    python study.py --input=WIKI.txt --val_input=wiki.valid.raw      # about an hour on 2 cores; resumable
    python study.py --input=WIKI.txt --val_input=wiki.valid.raw --seeds=1 --student_iters=100   # a quick look

The text: any English Wikipedia plain text of 3M+ characters (we used a WikiExtractor dump of about 10.7 MB) and
WikiText-2's validation file wiki.valid.raw (from the wikitext-2-raw-v1 release, or `datasets`' wikitext).

Writes out-study/results.md (val loss and perplexity, mean +- std over seeds, and the tokens NTP needs to reach
each method's final loss: the paper's "fewer tokens" measure) and out-study/val_loss.png (matplotlib, optional).
"""
import json
import math
import os

import numpy as np

from common import UserError, configure
from pipeline import run_stages

# -----------------------------------------------------------------------------
input = ''  # the training text (required)
val_input = ''  # the val text (required)
train_chars = 3_000_000  # the first characters of input: what every model here trains on
out = 'out-study'
seeds = 3
methods = 'ntp,kd,cocomix,cocomix_add,activation,predict_only,mix_only'
teacher_iters = 1000  # x 4,096 characters
student_iters = 400  # x 4,096 characters, the same for every student
eval_every = 25  # steps between val losses (the curve that gives "tokens NTP needs")
eval_windows = 2000  # final val loss: the first eval_windows x 128 characters of the val split, for every run
student = '--n_layer=4 --n_embd=128 --insert_layer=1'  # CoCoMix's student; NTP and KD are widened to match
ntp_width = 140
device = 'cpu'
# -----------------------------------------------------------------------------
METHODS = {  # method -> (config, overrides); mix=add is the paper's additive ablation, the variant that wins here
    'ntp': ('ntp', ['--mode=ntp']),
    'kd': ('ntp', ['--mode=kd']),
    'cocomix': ('cocomix', ['--mix=interleave']),  # the paper's method
    'cocomix_add': ('cocomix', ['--mix=add']),
    'activation': ('cocomix', ['--mix=add', '--label_method=activation']),
    'predict_only': ('cocomix', ['--mix=none']),
    'mix_only': ('cocomix', ['--mix=add', '--lam_concept=0.0']),
}


def stages():
    py_data, act_data = 'data/study_char', 'data/study_char_activation'
    text = f'{out}/train_text.txt'
    common = [f'--device={device}', '--eval_iters=20']
    models = [f'--teacher={out}/teacher', f'--sae={out}/sae/sae.pt']
    s = [('prepare', ['prepare.py', 'study_char', '--tokenizer=char', f'--input={text}', f'--val_input={val_input}',
                      f'--out_dir={py_data}'], [text], f'{py_data}/meta.json'),
         ('teacher', ['train.py', 'config/teacher_shakespeare_char.py', f'--dataset={py_data}',
                      f'--out_dir={out}/teacher', f'--max_iters={teacher_iters}', f'--lr_decay_iters={teacher_iters}',
                      '--eval_interval=250'] + common,
          [f'{py_data}/meta.json'], f'{out}/teacher/ckpt.pt'),
         ('sae', ['sae.py', 'config/sae_shakespeare_char.py', f'--dataset={py_data}', f'--out_dir={out}/sae', models[0],
                  f'--device={device}'], [f'{out}/teacher/ckpt.pt'], f'{out}/sae/sae.pt')]
    for data, method in ((py_data, 'attribution'), (act_data, 'activation')):  # one label cache per data folder
        s.append((f'labels {method}', ['attribution.py', 'config/cocomix_shakespeare_char.py', f'--dataset={data}',
                                       *models,
                                       f'--label_method={method}', '--splits=train', f'--device={device}'],
                  [f'{out}/sae/sae.pt'], f'{data}/labels_train.json'))
    for seed in range(seeds):
        for m in methods.split(','):
            config, extra = METHODS[m]
            data = act_data if m == 'activation' else py_data
            width = [f'--n_embd={ntp_width}'] if config == 'ntp' else []
            run = f'{out}/{m}_s{seed}'
            s.append((f'{m} seed {seed}', ['train.py', f'config/{config}_shakespeare_char.py', f'--dataset={data}',
                                            f'--out_dir={run}', f'--seed={seed}', f'--max_iters={student_iters}',
                                            f'--lr_decay_iters={student_iters}', f'--eval_interval={eval_every}',
                                            '--always_save_checkpoint=True', *student.split(), *width, *extra,
                                            *models] + common,
                      [f'{data}/labels_train.json'], f'{run}/ckpt.pt'))
    for seed in range(seeds):  # the final loss of every run on the same val windows
        for m in methods.split(','):
            run = f'{out}/{m}_s{seed}'
            s.append((f'eval {m} seed {seed}', ['eval.py', f'--out_dir={run}', '--tasks=ppl', f'--limit={eval_windows}',
                                                 f'--json_out={run}/eval.json', f'--device={device}'],
                      [f'{run}/ckpt.pt'], f'{run}/eval.json'))
    return s


def prepare_text():
    """The study's training text: the first train_chars characters of input (written once)."""
    path = f'{out}/train_text.txt'
    if not os.path.exists(path):
        os.makedirs(out, exist_ok=True)
        with open(input, encoding='utf-8') as f:
            text = f.read(train_chars)
        with open(path, 'w', encoding='utf-8') as f:
            f.write(text)
    act = 'data/study_char_activation'  # the same data in a second folder, for the activation-label cache
    os.makedirs(act, exist_ok=True)
    for name in ('train.bin', 'val.bin', 'meta.json'):
        if not os.path.exists(f'{act}/{name}') and os.path.exists(f'data/study_char/{name}'):
            os.symlink(os.path.abspath(f'data/study_char/{name}'), f'{act}/{name}')


def tokens_to_reach(curve, loss):
    """Tokens at which a (tokens, val loss) curve first reaches `loss`, linearly interpolated; None if never."""
    for (t0, l0), (t1, l1) in zip(curve, curve[1:]):
        if l1 <= loss:
            return t0 + (t1 - t0) * (l0 - loss) / (l0 - l1) if l0 > loss else t0
    return None


def report():
    import torch
    results = {}
    for m in methods.split(','):
        runs = []
        for seed in range(seeds):
            ckpt = torch.load(f'{out}/{m}_s{seed}/ckpt.pt', map_location='cpu', weights_only=True)
            c = ckpt['config']
            tokens = c['batch_size'] * c['block_size'] * c['gradient_accumulation_steps']
            runs.append([(it * tokens, val) for it, _, val in ckpt['history']])
        results[m] = runs
    loss = lambda m, seed: json.load(open(f'{out}/{m}_s{seed}/eval.json'))['results']['ppl']['loss']
    final = {m: np.array([loss(m, seed) for seed in range(seeds)]) for m in results}
    ntp_curve = np.mean([[v for _, v in r] for r in results['ntp']], axis=0)
    ntp_curve = list(zip([t for t, _ in results['ntp'][0]], ntp_curve))
    budget = ntp_curve[-1][0]
    lines = [f"| method | val loss (mean ± std, {seeds} seeds) | val ppl | tokens NTP needs to reach this loss | "
             "tokens this method needs to reach NTP's final loss |", '|---|---|---|---|---|']
    share = lambda t: f"{t / budget:.2f} x {budget:,}" if t is not None else f"more than {budget:,}"
    for m, v in final.items():  # the token measures compare curves measured alike: train.py's val estimates
        curve = list(zip([t for t, _ in results[m][0]], np.mean([[y for _, y in r] for r in results[m]], axis=0)))
        lines.append(f"| {m} | {v.mean():.4f} ± {v.std():.4f} | {math.exp(v.mean()):.3f} | "
                     f"{share(tokens_to_reach(ntp_curve, curve[-1][1]))} | "
                     f"{share(tokens_to_reach(curve, ntp_curve[-1][1]))} |")
    table = '\n'.join(lines)
    with open(f'{out}/results.md', 'w') as f:
        f.write(table + '\n')
    print(table)
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return print("(no plot: pip install matplotlib)")
    plt.figure(figsize=(7, 4.5))
    for m, runs in results.items():
        t = [x for x, _ in runs[0]][1:]
        v = np.array([[y for _, y in r][1:] for r in runs])
        plt.plot(t, v.mean(0), label=m)
        plt.fill_between(t, v.min(0), v.max(0), alpha=0.2)
    plt.xlabel('training tokens (characters)'), plt.ylabel('val loss (nats per character)'), plt.legend()
    plt.ylim(top=min(3.0, plt.ylim()[1])), plt.grid(alpha=0.3), plt.tight_layout()
    plt.savefig(f'{out}/val_loss.png', dpi=120)
    print(f"wrote {out}/results.md and {out}/val_loss.png")


if __name__ == '__main__':
    configure(globals())
    if not os.path.exists(input) or not os.path.exists(val_input):
        raise UserError("study.py needs --input=TRAIN_TEXT and --val_input=VAL_TEXT (see its docstring for which)")
    prepare_text()
    run_stages(stages()[:1], f'{out}/stamps.json')
    prepare_text()  # link the prepared data for the activation-label cache
    run_stages(stages(), f'{out}/stamps.json')
    report()
