"""
Does CoCoMix beat next-token prediction at equal tokens? A study sized for a 2-core CPU (about 2 hours):
character-level Wikipedia, one teacher clearly stronger than every student and its SAE, then students of two
sizes trained on the same 8.2M characters in the same order per seed: NTP (widened to CoCoMix's active
parameters), CoCoMix interleaved (the paper's), CoCoMix added (its ablation) and KD, three seeds each.

    python tools/study.py --input=enwiki_extract_clean.txt --val_input=wiki.valid.raw   # resumable, run by run; runs
                                          # in assets/study_results.json count as done (with the same teacher)
    python tools/study.py --report_only=True    # the README's table and plot again, from assets/study_results.json
                                          # (first refreshed from out-study/ where the runs are on this machine)

The text: a plain-text English Wikipedia extract of about 10M characters (a WikiExtractor dump; the teacher
reads it once, each student 0.77 times) and WikiText-2's validation file wiki.valid.raw as the val split.

The report gives, per size: the final val loss of each method (mean +- std over seeds), its paired difference
to NTP (the same seed: the same windows in the same order) with a 95% t-interval, and the characters the method
needs to reach NTP's final loss (the paper's "fewer tokens" measure) with its interval. It writes
assets/study_results.json (every run's curve and final loss: small, kept in git), the table between the
study markers of README.md and assets/study_val_loss.png (matplotlib, optional).
"""
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

import numpy as np

from common import UserError, atomic_path, configure
from pipeline import run_stages

# -----------------------------------------------------------------------------
input = ''  # the training text
val_input = ''  # the val text
out = 'out-study'
results = 'assets/study_results.json'
seeds = 3
jobs = 2  # runs at once (pipeline.run_stages)
teacher = '--n_layer=4 --n_head=4 --n_embd=192'  # 1.8M parameters, 4x the largest student
teacher_iters = 2600  # x 4,096 characters: one pass over a 10.7M-character text
sae_latents = 1024  # the concept vocabulary
student_iters = 2000  # x 4,096 characters = 8.2M per student, 5x the earlier study's
eval_every = 100  # steps between val estimates (the curves that give "characters to reach")
eval_windows = 2000  # final val loss: the first eval_windows x 128 characters of the val split, for every run
large = '--n_layer=8 --n_head=4 --n_embd=48 --insert_layer=3'  # the paper's shape: concepts after block 3 of 8
large_methods = 'ntp,cocomix,cocomix_add,kd'
small = '--n_layer=4 --n_head=4 --n_embd=48 --insert_layer=1'  # half the depth: does the gap move with size?
small_methods = 'ntp,cocomix'
report_only = False
device = 'cpu'
# -----------------------------------------------------------------------------
METHODS = {  # method -> (config, overrides)
    'ntp': ('ntp', ['--mode=ntp', '--window_grid=True']),  # the grid: the windows CoCoMix's label cache uses
    'kd': ('ntp', ['--mode=kd', '--window_grid=True']),
    'cocomix': ('cocomix', ['--mix=interleave']),  # the paper's method
    'cocomix_add': ('cocomix', ['--mix=add']),
}
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # t_0.975


def sizes():
    return {'8-layer': (large.split(), large_methods.split(',')), '4-layer': (small.split(), small_methods.split(','))}


def matched_width(student):
    """The NTP width (a multiple of n_head) whose parameters first reach the CoCoMix student's active ones."""
    from model import GPT, GPTConfig
    args = {k[2:]: int(v) for k, v in (a.split('=') for a in student)}
    vocab = math.ceil(json.load(open('data/study_char/meta.json'))['vocab_size'] / 64) * 64  # padded as train.py does
    base = dict(block_size=128, vocab_size=vocab, n_layer=args['n_layer'], n_head=args['n_head'], bias=False)
    target = GPT(GPTConfig(**base, n_embd=args['n_embd'], n_concepts=sae_latents, concept_topk=16,
                           insert_layer=args['insert_layer'])).get_num_params(active=True)
    width = args['n_embd']
    while GPT(GPTConfig(**base, n_embd=width)).get_num_params() < target:
        width += args['n_head']
    return width


def stages():
    data = 'data/study_char'
    common = [f'--dataset={data}', f'--device={device}', '--eval_iters=10']
    models = [f'--teacher={out}/teacher', f'--sae={out}/sae/sae.pt']
    s = [('teacher', ['train.py', 'config/teacher_shakespeare_char.py', *teacher.split(), f'--out_dir={out}/teacher',
                      f'--max_iters={teacher_iters}', f'--lr_decay_iters={teacher_iters}', '--eval_interval=500',
                      '--log_interval=100'] + common, [f'{data}/meta.json'], f'{out}/teacher/ckpt.pt'),
         ('sae', ['sae.py', 'config/sae_shakespeare_char.py', f'--dataset={data}', f'--out_dir={out}/sae', models[0],
                  f'--n_latents={sae_latents}', '--max_tokens=2000000', f'--device={device}'],
          [f'{out}/teacher/ckpt.pt'], f'{out}/sae/sae.pt'),
         ('labels', ['attribution.py', 'config/cocomix_shakespeare_char.py', f'--dataset={data}', *models,
                     '--splits=train', f'--device={device}'], [f'{out}/sae/sae.pt'], f'{data}/labels_train.json')]
    s.append(evaluation(f'{out}/teacher'))
    width = {size: matched_width(student) for size, (student, _) in sizes().items()}
    done = saved()['runs']  # runs saved by an earlier machine count as done: only the missing ones run here
    # the question first (NTP vs the paper's CoCoMix at the paper's shape), then scale, then the other methods
    order = sorted(((size, student, m) for size, (student, methods) in sizes().items() for m in methods),
                   key=lambda p: (p[2] not in ('ntp', 'cocomix'), p[0] != '8-layer'))
    for size, student, m in order:
        config, extra = METHODS[m]
        needs = [f'{data}/labels_train.json'] if config == 'cocomix' else \
            [f'{out}/teacher/ckpt.pt'] if m == 'kd' else [f'{data}/meta.json']
        for seed in range(seeds):
            if f'{size}/{m}/{seed}' in done:
                continue
            run = f'{out}/{size}/{m}_s{seed}'
            s.append((f'{size} {m} seed {seed}',
                      ['train.py', f'config/{config}_shakespeare_char.py', f'--out_dir={run}', f'--seed={seed}',
                       f'--max_iters={student_iters}', f'--lr_decay_iters={student_iters}',
                       f'--eval_interval={eval_every}', '--log_interval=100', '--always_save_checkpoint=True',
                       *student, *([f'--n_embd={width[size]}'] if config == 'ntp' else []), *extra,
                       *models] + common, needs, f'{run}/ckpt.pt'))
            s.append(evaluation(run))
    return s


def evaluation(run):
    """The final loss of a run on the same val windows as every other run."""
    return (f'eval {run}', ['tools/eval.py', f'--out_dir={run}', '--tasks=ppl', f'--limit={eval_windows}',
                            f'--json_out={run}/eval.json', f'--device={device}'],
            [f'{run}/ckpt.pt'], f'{run}/eval.json')


def saved():
    return json.load(open(results)) if os.path.exists(results) else {'runs': {}}


def collect():
    """Every finished run's curve and final loss -> the results file (kept in git, so the report outlives out/),
    beside the saved runs not made on this machine. Those are comparable only if this machine rebuilt the same
    teacher and SAE: the build is deterministic (one thread, fixed seed); a differing val loss or FVU is an error.
    Nothing to do before the teacher is evaluated and the SAE trained."""
    if not (os.path.exists(f'{out}/teacher/eval.json') and os.path.exists(f'{out}/sae/sae.pt')):
        return
    from common import load_model
    from sae import load_sae
    teacher_eval = json.load(open(f'{out}/teacher/eval.json'))['results']['ppl']
    c = load_model(f'{out}/teacher')[1]['config']
    res = {'teacher': teacher_eval['loss'], 'teacher_shape': f"{c['n_layer']} x {c['n_embd']}",
           'val_chars': teacher_eval['tokens'], 'sae': load_sae(f'{out}/sae/sae.pt')[1]['eval'], 'runs': {}}
    old = saved()
    if old['runs'] and (old['teacher'], old['sae']['fvu']) != (res['teacher'], res['sae']['fvu']):
        raise UserError(f"{results} was made with another teacher or SAE (val {old['teacher']}, FVU "
                        f"{old['sae']['fvu']}; here {res['teacher']}, {res['sae']['fvu']}): move it aside to rerun all")
    res['runs'] = old['runs']
    for size, (_, methods) in sizes().items():
        for m in methods:
            for seed in range(seeds):
                run = f'{out}/{size}/{m}_s{seed}'
                if not os.path.exists(f'{run}/eval.json'):
                    continue
                model, ckpt = load_model(run)
                c = ckpt['config']
                tokens = c['batch_size'] * c['block_size'] * c['gradient_accumulation_steps']
                res['runs'][f'{size}/{m}/{seed}'] = dict(
                    final=json.load(open(f'{run}/eval.json'))['results']['ppl']['loss'],
                    params=model.get_num_params(active=True), shape=f"{c['n_layer']} x {c['n_embd']}",
                    curve=[(it * tokens, val) for it, _, val in ckpt['history']])
    with atomic_path(results) as tmp, open(tmp, 'w') as f:  # the file now holds runs from other machines too
        json.dump(res, f, indent=0)


def tokens_to_reach(curve, loss):
    """Tokens at which a (tokens, val loss) curve first reaches `loss`, linearly interpolated; None if never."""
    for (t0, l0), (t1, l1) in zip(curve, curve[1:]):
        if l1 <= loss:
            return t0 + (t1 - t0) * (l0 - loss) / (l0 - l1) if l0 > loss else t0
    return None


def interval(x):
    """Mean and the half-width of its 95% t-interval."""
    x = np.asarray(x, dtype=float)
    return x.mean(), (T95.get(len(x) - 1, 1.96) * x.std(ddof=1) / math.sqrt(len(x)) if len(x) > 1 else float('nan'))


def report(res):
    runs = res['runs']
    sae = res['sae']
    lines = [f"Teacher {res['teacher_shape']}: val loss {res['teacher']:.4f}; SAE FVU {sae['fvu']:.4f}. Val loss in "
             f"nats per character on the first {res['val_chars']:,} characters of WikiText-2's validation text.", '',
             "| size | method | layers x width | active params | seeds | val loss (mean ± std) | "
             "Δ vs NTP, paired (95% CI) | chars to reach NTP's final loss (95% CI) |", '|---' * 8 + '|']
    deltas, leads = {}, []
    for size, (_, methods) in sizes().items():
        got = {m: {int(k.split('/')[2]): v for k, v in runs.items() if k.startswith(f'{size}/{m}/')} for m in methods}
        for m in methods:
            if not got[m]:
                continue
            r, finals = got[m], np.array([v['final'] for v in got[m].values()])
            paired = [s for s in r if s in got['ntp']]
            delta = reach = '—'
            if m != 'ntp' and paired:
                d = [r[s]['final'] - got['ntp'][s]['final'] for s in paired]
                deltas[(size, m)] = dict(zip(paired, d))
                mean, half = interval(d)
                delta = f"{mean:+.4f} ({mean - half:+.4f}, {mean + half:+.4f})"
                need = [tokens_to_reach(r[s]['curve'], got['ntp'][s]['curve'][-1][1]) for s in paired]
                budget = r[paired[0]]['curve'][-1][0]
                if all(t is not None for t in need):
                    mean, half = interval([t / budget for t in need])
                    reach = f"{mean:.2f} ({mean - half:.2f}, {mean + half:.2f}) x {budget / 1e6:.1f}M"
                else:
                    reach = f"not reached in {sum(t is None for t in need)} of {len(need)} seeds"
            v = next(iter(r.values()))
            lines.append(f"| {size} | {m} | {v['shape']} | {v['params'] / 1e3:.0f}K | {len(r)} | "
                         f"{finals.mean():.4f} ± {finals.std(ddof=1) if len(r) > 1 else 0:.4f} | {delta} | {reach} |")
            if m != 'ntp' and paired:  # when does NTP catch up? the paired mean of the val curves, point by point
                gap = np.mean([[a[1] - b[1] for a, b in zip(r[s]['curve'], got['ntp'][s]['curve'])] for s in paired], 0)
                ahead = [t for (t, _), g in zip(r[paired[0]]['curve'][1:], gap[1:]) if g < 0]
                leads.append(f"{size} {m}: " + ('never ahead of NTP' if not ahead else 'ahead of NTP at the end' if
                             gap[-1] < 0 else f"ahead of NTP until {ahead[-1] / 1e6:.1f}M characters, behind after"))
    lines += ['', 'On the val curves (paired mean over seeds): ' + '; '.join(leads) + '.'] if leads else []
    versus = []
    for (size, m), d in deltas.items():  # the paper's method against its ablation and KD, seed by seed
        ref = deltas.get((size, 'cocomix'), {})
        if m != 'cocomix' and ref:  # (interleave - NTP) - (m - NTP) = interleave - m
            mean, half = interval([ref[s] - d[s] for s in d if s in ref])
            versus.append(f"{size} {m} {mean:+.4f} ({mean - half:+.4f}, {mean + half:+.4f})")
    lines += ['', 'Interleave minus each other method, paired (95% CI): ' + '; '.join(versus) + '.'] if versus else []
    gaps = [deltas.get((size, 'cocomix'), {}) for size in sizes()]
    if all(gaps) and len(gaps) == 2:  # the same seeds in both sizes: a paired difference of differences
        common_seeds = [s for s in gaps[0] if s in gaps[1]]
        mean, half = interval([gaps[0][s] - gaps[1][s] for s in common_seeds])
        lines += ['', f"Scale: interleave − NTP at 8 layers minus at 4 layers: {mean:+.4f} "
                      f"({mean - half:+.4f}, {mean + half:+.4f}); negative means the gap favours CoCoMix more "
                      f"at the larger size."]
    table = '\n'.join(lines)
    print(table)
    readme = open('README.md').read()
    begin, end = '<!-- study:begin -->\n', '<!-- study:end -->'
    if begin in readme and end in readme:
        head, rest = readme.split(begin)
        with open('README.md', 'w') as f:
            f.write(head + begin + table + '\n' + end + rest.split(end, 1)[1])
    plot(runs)


def plot(runs):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return print("(no plot: pip install matplotlib)")
    fig, axes = plt.subplots(1, len(sizes()), figsize=(11, 4.2), sharey=True)
    for ax, (size, (_, methods)) in zip(np.atleast_1d(axes), sizes().items()):
        for m in methods:
            curves = [v['curve'] for k, v in runs.items() if k.startswith(f'{size}/{m}/')]
            if not curves:
                continue
            t = np.array([x for x, _ in curves[0]][1:]) / 1e6
            v = np.array([[y for _, y in c][1:] for c in curves])
            ax.plot(t, v.mean(0), label=f'{m} ({len(curves)} seeds)')
            ax.fill_between(t, v.min(0), v.max(0), alpha=0.2)
        ax.set_title(f'{size} students'), ax.set_xlabel('training characters (M)'), ax.grid(alpha=0.3)
        ax.set_ylim(top=2.8), ax.legend()
    np.atleast_1d(axes)[0].set_ylabel('val loss (nats per character)')
    fig.tight_layout()
    fig.savefig('assets/study_val_loss.png', dpi=110)
    print("wrote assets/study_val_loss.png")


if __name__ == '__main__':
    configure(globals())
    if report_only:
        collect()  # the runs finished so far on this machine, if any (the study may go on in another process)
    else:
        if not os.path.exists(input) or not os.path.exists(val_input):
            raise UserError("study.py needs --input=TRAIN_TEXT and --val_input=VAL_TEXT (see its docstring for which)")
        prepare = ['prepare.py', 'study_char', '--tokenizer=char', f'--input={input}', f'--val_input={val_input}',
                   '--out_dir=data/study_char']
        run_stages([('prepare', prepare, [], 'data/study_char/meta.json')], f'{out}/stamps.json')
        try:
            run_stages(stages(), f'{out}/stamps.json', jobs)
        finally:  # what finished so far is kept, whatever stopped the rest
            collect()
    if not os.path.exists(results):
        raise UserError(f"no saved results at {results}: run the study first (see study.py's docstring)")
    report(json.load(open(results)))
