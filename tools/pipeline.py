"""
The whole CoCoMix pipeline in one command, the study's design at a size a newcomer waits for:
character-level Tiny Shakespeare, a teacher clearly stronger than the students, its SAE, concept
labels, then the paper's shape (8 layers, concepts after block 3) trained on the same characters in
the same order as CoCoMix interleaved (the paper's), CoCoMix added and NTP widened to CoCoMix's
active parameters; their evaluation beside the study's paired result, and a steered sample.

    python tools/pipeline.py                        # Tiny Shakespeare, shipped with the repository
    python tools/pipeline.py --input='my_texts/*.txt' --name=mytext

Every stage is an ordinary command, printed before it runs, that skips itself when its output
exists, is newer than its inputs and was made by the same command. Thread counts are fixed, so
reruns on the same kind of machine give the same numbers.
"""
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

from common import UserError, configure

# -----------------------------------------------------------------------------
input = ''  # local text files (prepare.py --input); empty: the shipped Tiny Shakespeare
name = 'shakespeare_char'  # the dataset is data/NAME, the runs out-NAME/*
steer_alpha = 8.0  # the steered sample multiplies one concept's logit by this
device = 'cpu'
# -----------------------------------------------------------------------------
if __name__ == '__main__':
    configure(globals())
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
    ('cocomix', ['train.py', 'config/cocomix_shakespeare_char.py', f'--out_dir={out}/cocomix', *models] + common,
     [f'{data}/labels_train.json', 'config/cocomix_shakespeare_char.py'], f'{out}/cocomix/ckpt.pt'),
    ('ntp', ['train.py', 'config/ntp_shakespeare_char.py', f'--out_dir={out}/ntp'] + common,
     [f'{data}/meta.json', 'config/ntp_shakespeare_char.py'], f'{out}/ntp/ckpt.pt'),
    ('cocomix add', ['train.py', 'config/cocomix_shakespeare_char.py', f'--out_dir={out}/cocomix_add',
                     '--mix=add', *models] + common,
     [f'{data}/labels_train.json', 'config/cocomix_shakespeare_char.py'], f'{out}/cocomix_add/ckpt.pt'),
] + [(f'eval {m}', ['tools/eval.py', f'--out_dir={out}/{m}', '--tasks=ppl', f'--json_out={out}/{m}/eval.json',
                    f'--device={device}'], [f'{out}/{m}/ckpt.pt'], f'{out}/{m}/eval.json') for m in MODELS]


def run_stages(stages, stamps_path, jobs=1, threads=1):
    """Run (name, command, inputs, output) stages once their inputs' stages are done, skipping those
    whose output is current (stamps_path keeps each output's command). `jobs` run at once on
    `threads` threads each, logging beside stamps_path when jobs > 1."""
    stamps = json.load(open(stamps_path)) if os.path.exists(stamps_path) else {}
    made_by = {output: stage for stage, _, _, output in stages}
    pending, running, failed = list(stages), {}, []
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    while (pending and not failed) or running:  # after a failure, wait for the running ones
        waiting = {made_by[s[3]] for s in pending} | {s[0] for s in running.values()}
        ready = [s for s in pending if not any(made_by.get(i) in waiting for i in s[2])]
        for stage, cmd, inputs, output in ready[:max(0, jobs - len(running)) if not failed else 0]:
            pending.remove((stage, cmd, inputs, output))
            line = ' '.join(['python'] + cmd)
            if os.path.exists(output) and stamps.get(output) == line and \
                    all(os.path.getmtime(i) <= os.path.getmtime(output) for i in inputs if os.path.exists(i)):
                print(f"[{stage}] up to date: {output}")
                continue
            log = None
            if jobs > 1:
                logs = os.path.join(os.path.dirname(stamps_path), 'logs')
                os.makedirs(logs, exist_ok=True)
                log = open(os.path.join(logs, re.sub(r'[^\w.-]+', '_', stage) + '.log'), 'w')
            print(f"[{stage}] {line}" + (f"  (log: {log.name})" if log else ''), flush=True)
            proc = subprocess.Popen([py] + cmd, stdout=log, stderr=subprocess.STDOUT if log else None, env=env)
            running[proc] = (stage, output, line, time.time(), log)
        finished = [p for p in running if p.poll() is not None]
        if running and not finished:  # else look again at once: done or up-to-date stages made room
            time.sleep(1)
        for proc in finished:
            stage, output, line, t0, log = running.pop(proc)
            if log:
                log.close()
            if proc.returncode != 0:
                failed.append(stage)
                continue
            print(f"[{stage}] done in {time.time() - t0:.0f} s", flush=True)
            os.makedirs(os.path.dirname(stamps_path), exist_ok=True)
            stamps[output] = line
            with open(stamps_path, 'w') as f:
                json.dump(stamps, f, indent=1)
    if failed:
        raise UserError(f"stage '{failed[0]}' failed; fix the cause and run again (done stages are kept)")


def publish(name, text):
    """Print text and put it in README.md between <!-- NAME:begin --> and <!-- NAME:end -->."""
    print(text)
    readme = open('README.md').read()
    begin, end = f'<!-- {name}:begin -->\n', f'<!-- {name}:end -->'
    if begin in readme and end in readme:
        head, rest = readme.split(begin)
        with open('README.md', 'w') as f:
            f.write(head + begin + text + '\n' + end + rest.split(end, 1)[1])


def main():
    t0 = time.time()
    stamps = f'{out}/pipeline_stamps.json'
    run_stages(CONCEPTS, stamps, jobs=1, threads=2)
    run_stages(STUDENTS, stamps, jobs=2, threads=1)
    import study
    import torch
    from common import load_model
    print(f"\n{'model':<31} {'layers x width':>14} {'active':>7} {'chars':>10} {'val loss':>8}  "
          "the study: Δ vs NTP at this shape (95% CI)")
    done = study.saved()['runs']  # the study's paired result at the same shape, where it has one
    for m, title in MODELS.items():
        model, ckpt = load_model(f'{out}/{m}')
        c, r = ckpt['config'], json.load(open(f'{out}/{m}/eval.json'))['results']['ppl']
        tokens = c['max_iters'] * c['batch_size'] * c['block_size'] * c['gradient_accumulation_steps']
        ntp, same = (study.by_seed(done, '8-layer', k) for k in ('ntp', m))
        paired = [same[s]['final'] - ntp[s]['final'] for s in same if s in ntp]
        print(f"{title:<31} {model.config.n_layer:>6} x {model.config.n_embd:<6} "
              f"{model.get_num_params(active=True) / 1e6:>6.2f}M {tokens:>10,} {r['loss']:>8.4f}  "
              + (f"{study.ci(paired)}, {len(paired)} seeds" if m != 'ntp' and len(paired) > 1 else ''))
    model, _ = load_model(f'{out}/cocomix')
    with torch.no_grad():  # steer the concept the student predicts most often on the val text
        from prepare import load_tokens
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


if __name__ == '__main__':
    main()
