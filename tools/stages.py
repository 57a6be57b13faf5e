"""Commands run as stages that skip themselves when current, and README blocks rewritten from
results: what tools/pipeline.py and tools/study.py share."""
import json
import os
import re
import subprocess
import sys
import time
from contextlib import nullcontext

from attribution import LABEL_METHODS  # the importing tool put the repository on the path
from common import UserError, atomic_path


def run_stages(stages, stamps_path, jobs=1, threads=1):
    """Run (name, command, inputs, output) stages once their inputs' stages are done, skipping those
    whose output is current (stamps_path keeps each output's command). `jobs` run at once on
    `threads` threads each, logging beside stamps_path when jobs > 1."""
    stamps = json.load(open(stamps_path)) if os.path.exists(stamps_path) else {}
    pending, running, failed = list(stages), {}, []
    logs = os.path.join(os.path.dirname(stamps_path), 'logs')
    os.makedirs(logs if jobs > 1 else os.path.dirname(logs), exist_ok=True)  # for the stamps (and logs)

    def save_stamps():
        with atomic_path(stamps_path) as tmp, open(tmp, 'w') as f:
            json.dump(stamps, f, indent=1)
    while (pending and not failed) or running:  # after a failure, wait for the running ones
        busy = {s[3] for s in pending} | {s[1] for s in running.values()}  # outputs still to come
        ready = [s for s in pending if busy.isdisjoint(s[2])]
        for stage, cmd, inputs, output in ready[:max(0, jobs - len(running)) if not failed else 0]:
            pending.remove((stage, cmd, inputs, output))
            line = ' '.join(['python'] + cmd)
            if os.path.exists(output) and stamps.get(output) == line and \
                    all(os.path.getmtime(i) <= os.path.getmtime(output) for i in inputs if os.path.exists(i)):
                print(f"[{stage}] up to date: {output}")
                continue
            if cmd[0] in ('train.py', 'sae.py') and '--init_from=resume' not in cmd and os.path.exists(output):
                os.remove(output)  # stale: train.py and sae.py will not start over their output
            stamps.pop(output, None)  # until it succeeds: a killed rerun's output is not current
            save_stamps()
            name = os.path.join(logs, re.sub(r'[^\w.-]+', '_', stage) + '.log')
            with open(name, 'w') if jobs > 1 else nullcontext() as log:  # closed here: the stage has its copy
                print(f"[{stage}] {line}" + (f"  (log: {name})" if log else ''), flush=True)
                proc = subprocess.Popen([sys.executable] + cmd, env=dict(os.environ, OMP_NUM_THREADS=str(threads)),
                                        stdout=log, stderr=subprocess.STDOUT if log else None)
            running[proc] = (stage, output, line, time.time())
        finished = [p for p in running if p.poll() is not None]
        if running and not finished:  # else look again at once: done or up-to-date stages made room
            time.sleep(1)
        for proc in finished:
            stage, output, line, t0 = running.pop(proc)
            if proc.returncode != 0:
                failed.append(stage)
                continue
            print(f"[{stage}] done in {time.time() - t0:.0f} s", flush=True)
            stamps[output] = line
            save_stamps()
    if failed:
        raise UserError(f"stage '{failed[0]}' failed; fix the cause and run again (done stages are kept)")


def publish(name, text, path='README.md'):
    """Print text and put it in path between <!-- NAME:begin --> and <!-- NAME:end -->."""
    print(text)
    readme = open(path).read()
    block = re.compile(f'(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)', re.S)
    with open(path, 'w') as f:
        f.write(block.sub(lambda m: m[1] + text + '\n' + m[2], readme, count=1))


def label_flops_per_token(cfg, sae_layer, n_concepts, T, method='attribution'):
    """Matmul and attention FLOPs per token of attribution.concept_labels(method): the input
    gradient costs one matmul per weight, 'attribution_preact' adds the gradient's dot with every
    decoder direction; method='kd': KD's teacher, its forward alone."""
    assert method in LABEL_METHODS + ('kd',), f"unknown method {method!r}"
    d, after, block = cfg.n_embd, cfg.n_layer - sae_layer - 1, 12 * cfg.n_embd ** 2
    blocks = lambda n: 2 * n * block + 4 * n * d * T  # n blocks' forward, as nanoGPT's estimate_mfu
    head, encoder = 2 * cfg.vocab_size * d, 2 * d * n_concepts
    if method == 'activation':  # no loss to differentiate: the teacher stops at sae_layer
        return blocks(sae_layer + 1) + encoder
    forward = blocks(cfg.n_layer) + head
    if method == 'kd':
        return forward
    backward = 2 * after * block + head + 8 * after * d * T
    return forward + backward + encoder * (2 if method == 'attribution_preact' else 1)
