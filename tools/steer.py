"""Steering, measured (the paper's third claim, Sec. 4.4; RESULTS.md, "Steering"): each model (a
CoCoMix out_dir, with the teacher and SAE it trained with) steers the `concepts` it most often ranks
first on the val text, a rule fixed in advance. `prompts` val windows are continued twice with the
same random draws, plainly and with the concept's logit multiplied by alpha; the teacher and SAE
then read both."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

import numpy as np
import torch

from common import UserError, configure, load_model, load_teacher
from concepts import promoted
from prepare import data_dir_of, get_tokenizer, load_tokens, windows
from sae import load_sae, teacher_residual
from stages import publish as publish_block
from study import ci

# -----------------------------------------------------------------------------
runs: 'str' = ''  # comma-separated CoCoMix out_dirs
concepts: 'int >= 1' = 8  # concepts steered per model
prompts: 'int >= 1' = 16  # val windows continued
prompt_len: 'int >= 1' = 32
new_tokens: 'int >= 1' = 96
alpha: 'float' = 8.0
temperature: 'float >= 0' = 1.0  # 0: greedy
seed: 'int >= 0' = 0
device: 'device' = 'cpu'
publish: 'bool' = False  # also replace RESULTS.md's steering table (run from the repository)
# -----------------------------------------------------------------------------


def load(run):
    """A run's model, teacher, SAE and data, checked: every run is, before any is measured."""
    model, ckpt = load_model(run, device)
    cfg, T = ckpt['config'], model.config.block_size
    if not model.config.n_concepts or model.config.mix == 'none':
        raise UserError(f"{run} is not a CoCoMix model that mixes concepts: nothing to steer")
    if concepts > model.config.n_concepts:
        raise UserError(f"concepts={concepts} but {run} has only {model.config.n_concepts}")
    data_dir = data_dir_of(cfg['dataset'])
    teacher = load_teacher(cfg['teacher'], device, ckpt['data_meta'], data_dir)
    if prompt_len + new_tokens > min(T, teacher.config.block_size):  # the teacher reads it whole
        raise UserError(f"prompt_len + new_tokens = {prompt_len + new_tokens} is over the context of "
                        f"{run} or its teacher ({min(T, teacher.config.block_size)}); lower either")
    sae = load_sae(cfg['sae'], teacher.config.n_embd)[0].to(device)
    return model, cfg, T, teacher, sae, get_tokenizer(ckpt['data_meta']), load_tokens(data_dir, 'val')


@torch.no_grad()
def measure(model, cfg, T, teacher, sae, enc, val):
    text = windows(val, range(0, 64 * T, T), T).to(device)
    first = model(text, text)[2]['concept_ids'][..., 0].flatten()
    chosen = torch.bincount(first, minlength=model.config.n_concepts).topk(concepts).indices.tolist()
    starts = np.linspace(0, len(val) - prompt_len - 1, prompts).astype(int).tolist()
    prompt = windows(val, starts, prompt_len).to(device)
    for c in chosen:
        out, top = {}, promoted(sae, teacher, enc, [c], 5, decode=False)[0]
        for steer in (None, {c: alpha}):
            torch.manual_seed(seed)  # the same draws: the plain and steered texts are paired
            x = model.generate(prompt, new_tokens, temperature=temperature, steer=steer)
            values, indices, _ = sae.encode(teacher_residual(teacher, x, cfg['sae_layer']))
            act = (values * (indices == c)).sum(-1)[:, prompt_len:]  # the concept at new positions
            for k, v in (('active', (act > 0).float().mean()), ('activation', act.mean()),
                         ('promoted tokens', torch.isin(x[:, prompt_len:], top).float().mean())):
                out.setdefault(k, []).append(v.item())
        tokens = ' '.join(map(repr, promoted(sae, teacher, enc, [c], 3)[0]))
        yield c, tokens.replace('|', '\\|'), out  # a | would end the table cell


if __name__ == '__main__':
    configure(globals())
    if not runs:
        raise UserError("give --runs=OUT_DIR[,OUT_DIR...]: CoCoMix models trained by train.py")
    if publish and not os.path.isfile('RESULTS.md'):
        raise UserError("publish=True rewrites ./RESULTS.md's steering block: run from the "
                        "repository")
    table = ["| model | concept (promotes) | active: plain → steered | mean activation | "
             "promoted tokens |", '|---' * 5 + '|']
    changes = {}
    loaded = {run: load(run) for run in dict.fromkeys(runs.split(','))}  # each once, all checked first
    for run, args in loaded.items():
        for c, desc, m in measure(*args):
            table.append(f"| {os.path.basename(run)} | {c} ({desc}) | " + ' | '.join(
                f"{a:.3f} → {b:.3f}" for a, b in m.values()) + ' |')
            for k, (a, b) in m.items():
                changes.setdefault(k, []).append(b - a)
    text = '\n'.join([
        f"alpha {alpha:g}, {prompts} prompts of {prompt_len} characters continued by {new_tokens}, "
        f"temperature {temperature:g}; the {concepts} concepts each model most often ranks first.",
        '', *table, '',
        f"Steered minus plain, mean over {len(changes['active'])} (model, concept) pairs (95% CI): "
        + '; '.join(f"{k} {ci(v, '+.3f')}" for k, v in changes.items()) + '.'])
    if publish:
        publish_block('steer', text, 'RESULTS.md')
    else:
        print(text)
