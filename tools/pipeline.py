"""The whole CoCoMix pipeline in one command, the study's design at a size a newcomer waits for
(RESULTS.md, "The quick start"): a teacher, its SAE and labels, then NTP, CoCoMix and CoCoMix added at
the paper's shape on Tiny Shakespeare's characters; their evaluation beside the study's, a steered sample.

Thread counts are fixed, so reruns on the same kind of machine give the same numbers.
"""
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

import torch

from common import UserError, configure, load_model
from prepare import load_tokens
from stages import run_stages
from study import by_seed, ci, saved

# -----------------------------------------------------------------------------
input: 'str' = ''  # local text files (prepare.py --input); empty: the shipped Tiny Shakespeare
name: 'str' = 'shakespeare_char'  # the dataset is data/NAME, the runs out-NAME/*
steer_alpha: 'float' = 8.0  # the steered sample multiplies one concept's logit by this
device: 'device' = 'cpu'
# -----------------------------------------------------------------------------
configure(globals())
if not re.fullmatch(r'[\w.-]+', name) or name.strip('.') == '':  # one folder under data/ and out-*
    raise UserError(f"name must be a folder name (letters, digits, _ . -), not {name!r}")
py, data, out = sys.executable, f'data/{name}', f'out-{name}'
common = [f'--dataset={data}', f'--device={device}']
models = f'--teacher={out}/teacher', f'--sae={out}/sae/sae.pt'
MODELS = {'ntp': 'NTP', 'cocomix': 'CoCoMix (interleave, the paper)', 'cocomix_add': 'CoCoMix (add)'}
CONCEPTS = [  # (name, command, inputs, output): the teacher, its SAE and the labels, 2 threads each
    ('prepare', ['prepare.py', 'shakespeare', '--tokenizer=char', f'--out_dir={data}']
     + ([f'--input={input}'] if input else []), [], f'{data}/meta.json'),
    ('teacher', ['train.py', 'config/teacher_shakespeare_char.py', f'--out_dir={out}/teacher'] + common,
     [f'{data}/meta.json', 'config/teacher_shakespeare_char.py'], f'{out}/teacher/ckpt.pt'),
    ('sae', ['sae.py', 'config/sae_shakespeare_char.py', f'--out_dir={out}/sae', models[0]] + common,
     [f'{out}/teacher/ckpt.pt', 'config/sae_shakespeare_char.py'], f'{out}/sae/sae.pt'),
    ('labels', ['attribution.py', 'config/cocomix_shakespeare_char.py', *models] + common,
     [f'{out}/sae/sae.pt'], f'{data}/labels_train.json'),
]
STUDENTS = [  # one thread each, two at a time: faster than one run on two threads
    ('concepts', ['tools/concepts.py', f'--sae={out}/sae/sae.pt', '--top=5', f'--device={device}'],
     [f'{out}/sae/sae.pt'], f'{out}/sae/sae.pt.concepts.json'),
] + [(m.replace('_', ' '), ['train.py', f'config/{c}_shakespeare_char.py', f'--out_dir={out}/{m}', *extra] + common,
      [f'{data}/{needs}', f'config/{c}_shakespeare_char.py'], f'{out}/{m}/ckpt.pt')
     for m, c, needs, extra in (('cocomix', 'cocomix', 'labels_train.json', models), ('ntp', 'ntp', 'meta.json', ()),
                                ('cocomix_add', 'cocomix', 'labels_train.json', ('--mix=add', *models)))
] + [(f'eval {m}', ['tools/eval.py', f'--out_dir={out}/{m}', '--tasks=ppl', f'--json_out={out}/{m}/eval.json',
                    f'--device={device}'], [f'{out}/{m}/ckpt.pt'], f'{out}/{m}/eval.json') for m in MODELS]

t0 = time.time()
stamps = f'{out}/pipeline_stamps.json'
run_stages(CONCEPTS, stamps, jobs=1, threads=2)
run_stages(STUDENTS, stamps, jobs=2, threads=1)
print(f"\n{'model':<31} {'layers x width':>14} {'active':>7} {'chars':>10} {'val loss':>8}  "
      "the study: Δ vs NTP at this shape (95% CI)")
for m, title in MODELS.items():
    model, ckpt = load_model(f'{out}/{m}')
    c, r = ckpt['config'], json.load(open(f'{out}/{m}/eval.json'))['results']['ppl']
    tokens = c['max_iters'] * c['batch_size'] * c['block_size'] * c['gradient_accumulation_steps']
    ntp, same = (by_seed(saved()['runs'], '8-layer', k) for k in ('ntp', m))  # the study's, at this shape
    paired = [same[s]['final'] - ntp[s]['final'] for s in same if s in ntp]
    print(f"{title:<31} {model.config.n_layer:>6} x {model.config.n_embd:<6} "
          f"{model.get_num_params(active=True) / 1e6:>6.2f}M {tokens:>10,} {r['loss']:>8.4f}  "
          + (f"{ci(paired)}, {len(paired)} seeds" if m != 'ntp' and len(paired) > 1 else ''))
model, _ = load_model(f'{out}/cocomix')
with torch.no_grad():  # steer the concept the student predicts most often on the val text
    x = torch.from_numpy(load_tokens(data, 'val')[:model.config.block_size].astype('int64'))[None]
    concept = model(x, x)[2]['concept_ids'][..., 0].flatten().mode().values.item()
desc = json.load(open(f'{out}/sae/sae.pt.concepts.json')).get(str(concept), '')
sample = ['sample.py', f'--out_dir={out}/cocomix', '--num_samples=1', '--max_new_tokens=200',
          '--start=ROMEO:', f'--device={device}']
steered = f"steered: concept {concept} ({desc}) x {steer_alpha:g}"
for title, extra in (('CoCoMix sample', []), (steered, [f'--steer={concept}:{steer_alpha}'])):
    print(f"\n--- {title}: python {' '.join(sample + extra)}")
    text = subprocess.run([py] + sample + extra, capture_output=True, text=True, check=True).stdout
    print(text.split('\n', 1)[1].split('---')[0])
print(f"done: pipeline in {time.time() - t0:.0f} s; outputs in {out}/ and {data}/")
