"""Does CoCoMix beat next-token prediction, and at what cost? NTP, CoCoMix and the paper's controls
on character-level Wikipedia, sized for a 2-core CPU: RESULTS.md ("The study") gives the design.

    python tools/study.py --input=enwiki_extract_clean.txt --val_input=wiki.valid.raw  # resumable
    python tools/study.py --report_only=True  # README tables, plot from assets/study_results.json
    python tools/study.py ... --teacher_from=ckpt.pt --sae_from=sae.pt  # another machine: add seeds

Runs in assets/study_results.json (kept in git) count as done. Seeds are the pairing unit: all
methods of a seed run on one kind of machine (floats differ across CPUs), so another machine adds
whole seeds on the first machine's teacher and SAE, checked by fingerprint."""
import json
import math
import os
import platform
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

import numpy as np
import torch

from common import UserError, atomic_path, configure, fingerprint, first_line
from model import GPT, GPTConfig
from sae import load_sae
from stages import label_flops_per_token, publish, run_stages

# -----------------------------------------------------------------------------
input: 'file?' = ''  # the training text
val_input: 'file?' = ''  # the val text
out: 'str' = 'out-study'
results: 'str' = 'assets/study_results.json'
seeds: 'int >= 1' = 3  # seeds per method, unless the method names its own (method:seeds)
jobs: 'int >= 1' = 2  # runs at once (stages.run_stages), one thread each
teacher: 'str' = '--n_layer=4 --n_head=4 --n_embd=192'
teacher_iters: 'int >= 1' = 2600  # x 4,096 characters: one pass over the text
teacher_from: 'file?' = ''  # instead of training: a teacher ckpt.pt copied from the first machine
sae_from: 'file?' = ''  # likewise its sae.pt
sae_latents: 'int >= 1' = 1024  # the concept vocabulary
student_iters: 'int >= 1' = 2000  # x 4,096 characters = 8.2M per student
eval_every: 'int >= 1' = 100  # steps between val estimates (the curves)
eval_windows: 'int >= 1' = 2000  # final val loss: the first eval_windows x 128 characters of val
timing_steps: 'int >= 0' = 60  # steps of each method's timing run (the compute table)
large: 'str' = '--n_layer=8 --n_head=4 --n_embd=48 --insert_layer=3'  # the paper's shape
large_methods: 'str' = ('ntp:5,cocomix:5,cocomix_add,kd,pause,predict_only,activation,'
                        'interleave_no_concept_loss:5,ntp_flops_student,ntp_flops_total')
small: 'str' = '--n_layer=4 --n_head=4 --n_embd=48 --insert_layer=1'  # half the depth: the gap?
small_methods: 'str' = 'ntp,cocomix'
report_only: 'bool' = False
device: 'device' = 'cpu'
# -----------------------------------------------------------------------------
DATA = 'data/study_char'
METHODS = {  # method -> (config, overrides, dataset, what it reads of the teacher: labels by a method, KD or None)
    'ntp': ('ntp', ['--mode=ntp', '--window_grid=True'], DATA, None),  # the label cache's windows
    'kd': ('ntp', ['--mode=kd', '--window_grid=True'], DATA, 'kd'),
    'pause': ('ntp', ['--mode=pause', '--window_grid=True'], DATA, None),
    'cocomix': ('cocomix', ['--mix=interleave'], DATA, 'attribution'),  # the paper's method
    'cocomix_add': ('cocomix', ['--mix=add'], DATA, 'attribution'),
    'predict_only': ('cocomix', ['--mix=none'], DATA, 'attribution'),
    'activation': ('cocomix', ['--mix=interleave', '--label_method=activation'], DATA + '_act', 'activation'),
    # the same architecture as 'cocomix', trained by the next-token loss alone: do labels matter?
    'interleave_no_concept_loss': ('cocomix', ['--mix=interleave', '--lam_concept=0'], DATA, None),
    # NTP at CoCoMix's compute: its student FLOPs, and its student plus cached labelling FLOPs
    'ntp_flops_student': ('ntp', ['--mode=ntp', '--window_grid=True'], DATA, None),
    'ntp_flops_total': ('ntp', ['--mode=ntp', '--window_grid=True'], DATA, None),
}
WIDENED = ('ntp', 'kd')  # to CoCoMix's active size
FLOPS_MATCHED = ('ntp_flops_student', 'ntp_flops_total')  # widened to CoCoMix's FLOPs per character
SAE_LAYER = 1  # config/sae_shakespeare_char.py's
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def sizes():
    """size -> (student overrides, {method: seeds}), refused in one line before any report or run."""
    def methods(spec):
        pairs = [m.split(':') if ':' in m else [m, str(seeds)] for m in spec.split(',')]
        bad = [':'.join(p) for p in pairs if len(p) != 2 or p[0] not in METHODS or not p[1].isdigit() or p[1] == '0']
        if bad:
            raise UserError(f"no method or seed count '{bad[0]}' in '{spec}'; methods: {', '.join(METHODS)}")
        return {m: int(n) for m, n in pairs}
    return {'8-layer': (large.split(), methods(large_methods)), '4-layer': (small.split(), methods(small_methods))}


def by_seed(runs, size, m):
    """Method m's saved runs at one size: {seed: run}."""
    return {int(k.split('/')[2]): v for k, v in runs.items() if k.startswith(f'{size}/{m}/')}


def student_config(student, meta, width=None, **extra):
    args = {k[2:]: int(v) for k, v in (a.split('=') for a in student)}
    vocab = math.ceil(meta['vocab_size'] / 64) * 64  # as train.py pads
    return GPTConfig(block_size=128, vocab_size=vocab, n_layer=args['n_layer'], n_head=args['n_head'],
                     bias=False, n_embd=width or args['n_embd'], insert_layer=args['insert_layer'], **extra)


def matched_width(student, m):
    """The NTP width (a multiple of n_head, same depth) matched to CoCoMix's: the first whose
    parameters reach its active ones (WIDENED), else the nearest in FLOPs per character, its
    student's (ntp_flops_student) or with cached labelling (ntp_flops_total)."""
    meta = json.load(open(f'{DATA}/meta.json'))
    size = lambda cfg: GPT(cfg).get_num_params(active=True) if m in WIDENED else GPT(cfg).flops_per_token(128)
    target = size(student_config(student, meta, n_concepts=sae_latents, concept_topk=16))
    ntp = student_config(student, meta)
    if m == 'ntp_flops_total':  # in the results' terms; label_flops reads the sae_latents setting
        shape = '{n_layer} x {n_embd}'.format_map(dict(a[2:].split('=') for a in teacher.split()))
        res = dict(teacher_shape=shape, vocab_size=ntp.vocab_size, train_chars=meta['train_tokens'])
        target = cached_flops(res, 'cocomix', target, student_iters * 4096)
    width = ntp.n_embd
    while size(student_config(student, meta, width)) < target:
        width += ntp.n_head
    if m in WIDENED:
        return width
    return min(width - ntp.n_head, width, key=lambda w: abs(size(student_config(student, meta, w)) - target))


def label_flops(res, m):
    """Per token: the teacher's labelling for method m's labels, KD's teacher, or 0."""
    if not METHODS[m][3]:
        return 0
    t = res['teacher_shape'].split(' x ')
    teacher_cfg = GPTConfig(n_layer=int(t[0]), n_embd=int(t[1]), vocab_size=res['vocab_size'])
    return label_flops_per_token(teacher_cfg, SAE_LAYER, res.get('sae_latents', sae_latents),
                                 128, METHODS[m][3])  # 128: the study's windows


def cached_flops(res, m, flops, budget):
    """FLOPs per training character with cached labels: the whole corpus (train_chars) labelled
    once and charged to one run of `budget` characters; KD's teacher runs online."""
    return flops + label_flops(res, m) * (res['train_chars'] / budget if METHODS[m][0] == 'cocomix' else 1)


def machine():
    """The kind of CPU and the torch build: runs of one seed must all come from one kind."""
    cpuinfo = open('/proc/cpuinfo').read() if os.path.exists('/proc/cpuinfo') else ''
    names = re.findall(r'model name\s*:\s*(.*)', cpuinfo)
    kind = re.findall(r'cpu family\s*:\s*(\d+)\n(?:.*\n)*?model\s*:\s*(\d+)', cpuinfo)
    kind = f" (family {kind[0][0]}, model {kind[0][1]})" if kind else ''  # 'AMD EPYC' names several
    return f"{names[0] if names else platform.processor()}{kind}, torch {torch.__version__}"


def stages():
    """-> (the teacher, SAE and label stages, or none when no pending run reads them; the runs)."""
    done, timed, here = saved()['runs'], saved().get('timing', {}), machine()
    # a seed's runs that read the teacher come from one machine kind; the others pair by seed (the
    # same initial weights and batches) across kinds, whose floats differ in the last digits
    elsewhere = {k.split('/')[2] for k, v in done.items()
                 if v.get('machine', here) != here and METHODS[k.split('/')[1]][3]}
    # the question first (NTP vs CoCoMix at the paper's shape), then scale, then the controls
    order = sorted(((size, student, m, n) for size, (student, methods) in sizes().items()
                    for m, n in methods.items()),
                   key=lambda p: (p[2] not in ('ntp', 'cocomix'), p[0] != '8-layer'))
    runs = []
    for size, student, m, n in order:
        width = matched_width(student, m) if m in WIDENED + FLOPS_MATCHED else None
        student_args = student + ([f'--n_embd={width}'] if width else [])
        for seed in range(n):
            run = f'{out}/{size}/{m}_s{seed}'
            if f'{size}/{m}/{seed}' not in done and not (METHODS[m][3] and str(seed) in elsewhere):
                runs += [train_stage(f'{size} {m} seed {seed}', run, m, student_iters,
                                     [f'--seed={seed}', f'--eval_interval={eval_every}', '--log_interval=100',
                                      '--always_save_checkpoint=True', *student_args]), evaluation(run)]
        if size == '8-layer' and m not in timed:  # a short timed run per method
            runs.append(train_stage(f'timing {m}', f'{out}/timing/{m}', m, timing_steps,
                                    ['--eval_interval=100000', '--log_interval=1', *student_args]))
    ckpt, sae = f'{out}/teacher/ckpt.pt', f'{out}/sae/sae.pt'
    if not any(ckpt in inputs for _, _, inputs, _ in runs):  # none reads it
        return [], runs
    models = [f'--teacher={out}/teacher', f'--sae={sae}']
    train = ['train.py', 'config/teacher_shakespeare_char.py', *teacher.split(), f'--out_dir={out}/teacher',
             f'--max_iters={teacher_iters}', f'--lr_decay_iters={teacher_iters}', '--eval_interval=500',
             '--log_interval=100', f'--dataset={DATA}', f'--device={device}', '--eval_iters=10']
    fit = ['sae.py', 'config/sae_shakespeare_char.py', f'--dataset={DATA}', f'--out_dir={out}/sae', models[0],
           f'--n_latents={sae_latents}', '--max_tokens=2000000', f'--device={device}']
    copy = ['-c', 'import shutil, sys; shutil.copyfile(sys.argv[1], sys.argv[2])']
    # teacher_from: the first machine's teacher and SAE, checked by fingerprint before any run
    s = [('teacher', copy + [teacher_from, ckpt] if teacher_from else train,
          [] if teacher_from else [f'{DATA}/meta.json'], ckpt),
         ('sae', copy + [sae_from, sae] if sae_from else fit, [ckpt], sae)]
    for data, method in ((DATA, 'attribution'), (DATA + '_act', 'activation')):
        s.append((f'labels {method}', ['attribution.py', 'config/cocomix_shakespeare_char.py', f'--dataset={data}',
                                       *models, '--splits=train', f'--label_method={method}', f'--device={device}'],
                  [sae, f'{data}/meta.json'], f'{data}/labels_train.json'))
    return s + [evaluation(f'{out}/teacher')], runs


def train_stage(name, run, m, iters, args):
    config, extra, data, reads_teacher = METHODS[m]
    if reads_teacher:
        models = [f'--teacher={out}/teacher', f'--sae={out}/sae/sae.pt']
        inputs = [f'{out}/teacher/ckpt.pt'] + ([f'{data}/labels_train.json'] if config == 'cocomix' else [])
    else:  # no labels: the concept vocabulary is the SAE's width, from the settings
        models = [f'--n_concepts={sae_latents}'] if config == 'cocomix' else []
        inputs = [f'{data}/meta.json']
    # a run stopped midway (no stamp yet) continues from its last checkpoint: resume is exact
    path = f'{out}/stamps.json'
    stamp = (json.load(open(path)) if os.path.exists(path) else {}).get(f'{run}/ckpt.pt', 'resume')
    resume = ['--init_from=resume'] if os.path.exists(f'{run}/ckpt.pt') and 'resume' in stamp else []
    return (name, ['train.py', f'config/{config}_shakespeare_char.py', f'--out_dir={run}', f'--max_iters={iters}',
                   f'--lr_decay_iters={student_iters}', *args, *extra, *models, f'--dataset={data}',
                   f'--device={device}', '--eval_iters=10', *resume], inputs, f'{run}/ckpt.pt')


def evaluation(run):
    """The final loss of a run on the same val windows as every other run."""
    return (f'eval {run}', ['tools/eval.py', f'--out_dir={run}', '--tasks=ppl', f'--limit={eval_windows}',
                            f'--json_out={run}/eval.json', f'--device={device}'],
            [f'{run}/ckpt.pt'], f'{run}/eval.json')


def saved():
    try:
        res = json.load(open(results)) if os.path.exists(results) else {'runs': {}}
        return dict(res, runs=dict(res['runs']))  # a dict of runs, else refused below
    except (OSError, ValueError, TypeError, KeyError) as e:  # a folder, a cut file, other JSON
        raise UserError(f"cannot read {results} ({first_line(e)}): not the results study.py writes")


def check_identity(old):
    """This machine's teacher's and SAE's fingerprints, refused if unlike those of the saved results (old)."""
    teacher = torch.load(f'{out}/teacher/ckpt.pt', map_location='cpu', weights_only=True)['model']
    teacher_id, sae_id = fingerprint(teacher), fingerprint(torch.load(f'{out}/sae/sae.pt', weights_only=True))
    if old['runs'] and (old.get('teacher_id'), old.get('sae_id')) != (teacher_id, sae_id):
        raise UserError(f"{results} was made with another teacher or SAE (weights {old.get('teacher_id')}, "
                        f"{old.get('sae_id')}; here {teacher_id}, {sae_id}): copy the first machine's with "
                        "--teacher_from and --sae_from, or move the results aside to start over")
    return teacher_id, sae_id


def collect():
    """Add this machine's finished runs and timing runs to the saved results (of any machine), and
    its teacher's and SAE's entries where it has them (refused if their fingerprints differ)."""
    from common import load_model  # looked up when called: the tests replace it
    res, here = saved(), machine()
    if os.path.exists(f'{out}/teacher/eval.json') and os.path.exists(f'{out}/sae/sae.pt'):
        teacher_eval = json.load(open(f'{out}/teacher/eval.json'))['results']['ppl']
        c = load_model(f'{out}/teacher')[1]['config']
        meta = json.load(open(f'{DATA}/meta.json'))
        sae, sae_meta = load_sae(f'{out}/sae/sae.pt')
        res.update(teacher=teacher_eval['loss'], teacher_shape=f"{c['n_layer']} x {c['n_embd']}",
                   val_chars=teacher_eval['tokens'], sae=sae_meta['eval'], sae_latents=sae.n_latents,
                   train_chars=meta['train_tokens'],
                   vocab_size=student_config(large.split(), meta).vocab_size)
        res['teacher_id'], res['sae_id'] = check_identity(res)  # its runs and ids are still the saved ones
    elif 'teacher_id' not in res:
        return
    res.setdefault('timing', {})
    for size, (_, methods) in sizes().items():
        for m, n in methods.items():
            for seed in range(n):
                run = f'{out}/{size}/{m}_s{seed}'
                if os.path.exists(f'{run}/eval.json') and f'{size}/{m}/{seed}' not in res['runs']:
                    model, ckpt = load_model(run)
                    c = ckpt['config']
                    tokens = c['batch_size'] * c['block_size'] * c['gradient_accumulation_steps']
                    res['runs'][f'{size}/{m}/{seed}'] = dict(
                        final=json.load(open(f'{run}/eval.json'))['results']['ppl']['loss'], machine=here,
                        params=model.get_num_params(active=True), shape=f"{c['n_layer']} x {c['n_embd']}",
                        flops=model.flops_per_token(c['block_size']),
                        curve=[(it * tokens, val) for it, _, val in ckpt['history']])
            log = f'{out}/logs/timing_{m}.log'
            if size == '8-layer' and os.path.exists(log) and os.path.exists(f'{out}/timing/{m}/ckpt.pt'):
                steps = re.findall(r'^iter (\d+):.*time ([\d.]+)ms', open(log).read(), re.M)
                ms = [float(t) for it, t in steps if int(it) >= 10]  # after the first steps warm up
                if ms:  # none when timing_steps <= 10
                    res['timing'][m] = dict(ms_per_step=float(np.median(ms)), machine=here)
    with atomic_path(results) as tmp, open(tmp, 'w') as f:
        json.dump(res, f, indent=0)


def tokens_to_reach(curve, loss):
    """Tokens at which a (tokens, val loss) curve first reaches `loss`, interpolated; None if never."""
    for (t0, l0), (t1, l1) in zip(curve, curve[1:]):
        if l1 <= loss:
            return t0 + (t1 - t0) * (l0 - loss) / (l0 - l1) if l0 > loss else t0


def ci(x, fmt='+.4f'):
    """The mean and its 95% t-interval."""
    x = np.asarray(x, dtype=float)
    mean = x.mean()
    if len(x) < 2:
        return f"{mean:{fmt}} (one seed: no interval)"
    half = T95.get(len(x) - 1, 1.96) * x.std(ddof=1) / math.sqrt(len(x))
    return f"{mean:{fmt}} ({mean - half:{fmt}}, {mean + half:{fmt}})"


def compute_rows(res, got, reach, missed):
    """The 8-layer compute table: FLOPs per character with the teacher's labelling online and cached,
    ms per step, and the cost of reaching NTP's final loss in characters, FLOPs and time (reach: the
    run fractions of the methods that reach it in every seed; missed: the others' "not reached" text)."""
    lines = ["| method | student FLOPs/char | + teacher, online | + teacher, cached | ms/step | "
             "to reach NTP: chars | FLOPs (cached) | time |", '|---' * 8 + '|']
    ntp, timing = next(iter(got['ntp'].values())), res.get('timing', {})
    t_ntp = timing.get('ntp', {})
    for m, r in got.items():
        v, t = next(iter(r.values())), timing.get(m, {})
        cached = cached_flops(res, m, v['flops'], v['curve'][-1][0])
        ms = t.get('ms_per_step') if t.get('machine') == t_ntp.get('machine') else None  # else two kinds of machine
        row = [m, f"{v['flops'] / 1e6:.2f}M", f"{(v['flops'] + label_flops(res, m)) / 1e6:.2f}M",
               f"{cached / 1e6:.2f}M", f"{ms:.0f}" if ms else '—']
        if m not in reach:
            row += [missed.get(m, '—'), '—', '—']
        else:
            row += [ci(reach[m], '.2f'), ci([x * cached / ntp['flops'] for x in reach[m]], '.2f'),
                    ci([x * ms / t_ntp['ms_per_step'] for x in reach[m]], '.2f') if ms else '—']
        lines.append('| ' + ' | '.join(row) + ' |')
    return lines


def report(res):
    runs, sae = res['runs'], res['sae']
    lines = [f"Teacher {res['teacher_shape']}: val loss {res['teacher']:.4f}; SAE FVU {sae['fvu']:.4f}. Val loss "
             f"in nats per character on the first {res['val_chars']:,} characters of WikiText-2's validation text.",
             '', "| size | method | layers x width | active params | seeds | val loss (mean ± std) | "
             "Δ vs NTP, paired (95% CI) | chars to reach NTP's final loss (95% CI) |", '|---' * 8 + '|']
    deltas, leads, compute = {}, [], []
    for size, (_, methods) in sizes().items():
        got = {m: by_seed(runs, size, m) for m in methods if by_seed(runs, size, m)}
        ntp, reach, missed = got.get('ntp', {}), {}, {}  # as compute_rows reads them
        for m, r in got.items():
            finals = np.array([v['final'] for v in r.values()])
            paired = [s for s in r if s in ntp]
            delta = need_text = '—'
            if m != 'ntp' and paired:
                deltas[(size, m)] = {s: r[s]['final'] - ntp[s]['final'] for s in paired}
                delta = ci(list(deltas[(size, m)].values()))
                budget = r[paired[0]]['curve'][-1][0]
                need = [tokens_to_reach(r[s]['curve'], ntp[s]['curve'][-1][1]) for s in paired]
                if None in need:
                    need_text = missed[m] = f"not reached in {need.count(None)} of {len(need)} seeds"
                else:
                    reach[m] = [x / budget for x in need]
                    need_text = f"{ci(reach[m], '.2f')} x {budget / 1e6:.1f}M"
                # when does NTP catch up? the paired mean of the val curves, point by point
                gap = np.mean([[a[1] - b[1] for a, b in zip(r[s]['curve'], ntp[s]['curve'])] for s in paired], 0)
                ahead = [t for (t, _), g in zip(r[paired[0]]['curve'][1:], gap[1:]) if g < 0]
                leads.append(f"{size} {m}: " + ('never ahead of NTP' if not ahead else 'ahead of NTP at the end' if
                             gap[-1] < 0 else f"ahead of NTP until {ahead[-1] / 1e6:.1f}M characters, behind after"))
            v = next(iter(r.values()))
            lines.append(f"| {size} | {m} | {v['shape']} | {v['params'] / 1e3:.0f}K | {len(r)} | {finals.mean():.4f} ± "
                         f"{finals.std(ddof=1) if len(r) > 1 else 0:.4f} | {delta} | {need_text} |")
        if size == '8-layer' and ntp and all('flops' in v for r in got.values() for v in r.values()):
            compute = compute_rows(res, got, reach, missed)
    lines += ['', 'On the val curves (paired mean over seeds): ' + '; '.join(leads) + '.'] if leads else []
    versus = {}  # the paper's method against each other method, seed by seed
    for (size, m), d in deltas.items():
        ref = deltas.get((size, 'cocomix'), {})
        common = [s for s in d if s in ref]
        if m != 'cocomix' and len(common) > 1:  # (interleave - NTP) - (m - NTP) = interleave - m
            versus[(size, m)] = [ref[s] - d[s] for s in common]
    lines += ['', 'Interleave minus each other method, paired (95% CI): ' + '; '.join(
        f"{size} {m} {ci(d)}" for (size, m), d in versus.items()) + '.'] if versus else []
    gaps = [deltas.get((size, 'cocomix'), {}) for size in sizes()]
    common = [s for s in gaps[0] if all(s in g for g in gaps)]
    if len(common) > 1:  # a paired difference of differences
        lines += ['', f"Scale: interleave − NTP at 8 layers minus at 4 layers: {ci([gaps[0][s] - gaps[1][s] for s in common])}"
                      "; negative means the gap favours CoCoMix more at the larger size."]
    if compute:
        lines += ['', "Compute at 8 layers, per training character. The teacher's labelling: online, every "
                  "step; cached (as the study's CoCoMix runs), the whole corpus labelled once and charged to "
                  "one run, hence above online when the corpus is longer than a run (an upper bound: the "
                  "study's runs share one cache per label method). 'To reach' is in units of NTP's whole run "
                  "(95% CI); its FLOPs use the cached cost. ms/step excludes the cached labelling but "
                  "includes KD's teacher, which runs online.", ''] + compute
    publish('study', '\n'.join(lines), 'RESULTS.md')
    publish('headline', '\n'.join(headline(res, deltas, versus)))
    plot(res)


HEADLINE = {  # the README's table: NTP, CoCoMix and the controls that ask whether it pays
    'ntp': "NTP, CoCoMix's active parameters",
    'cocomix': "CoCoMix (interleave, the paper's)",
    'interleave_no_concept_loss': "CoCoMix without concept labels (lam_concept=0)",
    'ntp_flops_student': "NTP at CoCoMix's student FLOPs",
    'ntp_flops_total': "NTP at CoCoMix's FLOPs with labelling",
}


def headline(res, deltas, versus):
    """The 8-layer methods that answer: do the labels matter, and does CoCoMix pay at equal
    compute? Paired by seed; 'CoCoMix minus it' < 0 means CoCoMix is ahead."""
    lines = ["| method | layers x width | FLOPs/char: student, + labelling (cached) | seeds | "
             "val loss | Δ vs NTP (95% CI) | CoCoMix minus it (95% CI) |", '|---' * 7 + '|']
    crossed = 0  # runs paired with an NTP run of another machine kind
    for m, title in HEADLINE.items():
        r = by_seed(res['runs'], '8-layer', m)
        if not r:
            lines.append(f"| {title} | — | — | 0 | not run yet | — | — |")
            continue
        v, finals = next(iter(r.values())), [v['final'] for v in r.values()]
        cached = cached_flops(res, m, v['flops'], v['curve'][-1][0])
        delta, vs = deltas.get(('8-layer', m)), versus.get(('8-layer', m))
        ntp = by_seed(res['runs'], '8-layer', 'ntp')
        crossed += sum(s in ntp and ntp[s].get('machine') != r[s].get('machine') for s in r)
        lines.append(f"| {title} | {v['shape']} | {v['flops'] / 1e6:.2f}M, {cached / 1e6:.2f}M | "
                     f"{len(r)} | {np.mean(finals):.4f} | {ci(list(delta.values())) if delta else '—'} | "
                     f"{ci(vs) if vs else '—'} |")
    return lines + ([f"\n{crossed} of these runs pair with a seed run on another kind of CPU (RESULTS.md: "
                     "the float noise such a pair carries)."] if crossed else [])


def plot(res):
    """Mean val curves against characters at both sizes, and at 8 layers against training FLOPs: the
    student's, + labelling online (every step), + cached (the whole corpus labelled before step 0)."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return print("(no plot: pip install matplotlib)")
    figures = {'assets/study_val_loss.png': plt.subplots(1, len(sizes()), figsize=(11, 4.2), sharey=True),
               'assets/study_val_loss_flops.png': plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)}
    (_, by_chars), (_, by_flops) = figures.values()
    for ax, (size, (_, methods)) in zip(by_chars, sizes().items()):
        for m in methods:
            r = by_seed(res['runs'], size, m)
            if not r:
                continue
            v = next(iter(r.values()))
            chars = np.array([x for x, _ in v['curve']][1:])
            loss = np.array([[y for _, y in run['curve']][1:] for run in r.values()])
            ax.plot(chars / 1e6, loss.mean(0), label=f'{m} ({len(r)} seeds)')
            ax.fill_between(chars / 1e6, loss.min(0), loss.max(0), alpha=0.2)
            cached = cached_flops(res, m, v['flops'], chars)
            for ax_flops, flops in zip(by_flops if size == '8-layer' else [],
                                       (v['flops'], v['flops'] + label_flops(res, m), cached)):
                ax_flops.plot(chars * flops / 1e12, loss.mean(0), label=f'{m} ({len(r)} seeds)')
        ax.set_title(f'{size} students'), ax.set_xlabel('training characters (M)'), ax.grid(alpha=0.3)
        ax.set_ylim(top=2.8), ax.legend(fontsize=8)
    for ax, title in zip(by_flops, ('student FLOPs', 'student + labelling, online', 'student + labelling, cached')):
        ax.set_title(title), ax.set_xlabel('training FLOPs (T)'), ax.grid(alpha=0.3)
        ax.set_ylim(top=2.8), ax.set_xscale('log'), ax.legend(fontsize=7)
    for path, (fig, axes) in figures.items():
        axes[0].set_ylabel('val loss (nats per character)')
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        print(f"wrote {path}")


if __name__ == '__main__':
    configure(globals())
    sizes(), saved()  # the methods and the saved results, checked before any work
    if report_only:
        collect()  # the runs finished on this machine, if any (the study may go on elsewhere)
    else:
        if not input or not val_input:  # their domain ('file?') checked that given ones exist
            raise UserError("study.py needs --input=TRAIN_TEXT and --val_input=VAL_TEXT (see its docstring)")
        if bool(teacher_from) != bool(sae_from):
            raise UserError("give both --teacher_from and --sae_from (the first machine's files), or neither")
        prepare = ['prepare.py', 'study_char', '--tokenizer=char', f'--input={input}', f'--val_input={val_input}',
                   f'--out_dir={DATA}']
        link = ['-c', "import os, sys; os.makedirs(sys.argv[2], exist_ok=True); [os.link(f'{sys.argv[1]}/{n}', "
                "f'{sys.argv[2]}/{n}') for n in ('train.bin', 'val.bin', 'meta.json')]", DATA, DATA + '_act']
        run_stages([('prepare', prepare, [], f'{DATA}/meta.json'),
                    ('activation data', link, [f'{DATA}/meta.json'], f'{DATA}_act/meta.json')], f'{out}/stamps.json')
        concept_stages, runs = stages()
        if concept_stages:
            run_stages(concept_stages[:2], f'{out}/stamps.json')  # the teacher and SAE, then their identity
            check_identity(saved())
        try:
            run_stages(concept_stages + runs, f'{out}/stamps.json', jobs)
        finally:  # what finished so far is kept, whatever stopped the rest
            collect()
    res = saved()
    if 'sae' not in res:  # no file, or no finished teacher and SAE in it
        raise UserError(f"no saved results at {results}: run the study first (see its docstring)")
    report(res)
