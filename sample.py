"""Sample from a train.py out_dir (any mode) or from OpenAI's GPT-2 weights (--init_from=gpt2)."""
import json

import torch

from common import DEVICE, DTYPE, UserError, autocast, configure, first_line, load_model
from prepare import get_tokenizer

# -----------------------------------------------------------------------------
init_from: 'str' = 'resume'  # 'resume' (out_dir's checkpoint) or a gpt2 variant
out_dir: 'str' = 'out'
start: 'str' = "\n"  # the prompt; "FILE:prompt.txt" reads it from a file
num_samples: 'int >= 1' = 3
max_new_tokens: 'int >= 1' = 200  # 0 would only echo the prompt
temperature: 'float >= 0' = 0.8  # < 1 sharper, 0 = greedy
top_k: 'int >= 0' = 200  # 0 = all tokens
seed: 'int >= 0' = 1337
steer: 'str' = ''  # CoCoMix: 'ID:ALPHA[,...]' scales those concept logits before TopK (Sec. 4.4)
show_concepts: 'bool' = False  # CoCoMix: print each token with the concepts it was predicted from
device: 'device' = DEVICE
dtype: 'float32|bfloat16|float16' = DTYPE
# -----------------------------------------------------------------------------
configure(globals())
torch.manual_seed(seed)
if start.startswith('FILE:'):
    try:
        start = open(start[5:], encoding='utf-8').read()
    except (OSError, ValueError) as e:  # missing, a folder, not UTF-8
        raise UserError(f"cannot read the prompt file '{start[5:]}' ({first_line(e)})")

model, checkpoint = load_model(out_dir if init_from == 'resume' else init_from, device)
mode = (checkpoint or {}).get('mode', 'ntp')
if checkpoint:
    print(f"loaded {out_dir}/ckpt.pt: mode '{mode}', step {checkpoint['iter_num']}, "
          f"val loss {checkpoint['best_val_loss']:.4f}")
try:
    pairs = (p.split(':') for p in steer.split(',')) if steer else []
    steer_map = {int(i): float(a) for i, a in pairs} or None
except ValueError:
    raise UserError(f"--steer='{steer}' must look like ID:ALPHA[,ID:ALPHA], e.g. --steer=299:4")
try:  # before any work, the checks generate() makes
    model.check_concepts(steer_map, show_concepts)
except ValueError as e:
    raise UserError(f"{e} (this model was trained with mode '{mode}')")
descriptions = {}
if show_concepts:
    from sae import sae_file
    path = sae_file(checkpoint['config']['sae'], fetch=False) + '.concepts.json'
    try:
        descriptions = dict(json.load(open(path)))
    except (OSError, ValueError, TypeError) as e:
        print(f"(no concept descriptions: {first_line(e)}; tools/concepts.py writes them)")

enc = get_tokenizer(checkpoint and checkpoint.get('data_meta'))
start_ids = enc.encode(start, allowed_special={'<|endoftext|>'}) or [enc.eot_token]
x = torch.tensor(start_ids, dtype=torch.long, device=device)[None]
decode = lambda ids: enc.decode([t for t in ids if t < enc.n_vocab])  # drop the head's padding ids

with autocast(device, dtype):
    for _ in range(num_samples):
        out = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k or None,
                             steer=steer_map, show_concepts=3 if show_concepts else 0)
        y, concepts = out if show_concepts else (out, None)
        print(decode(y[0].tolist()))
        if show_concepts:  # token t+1 was read out at the concept slot of position t
            for token, ids in zip(y[0, x.size(1):].tolist(), concepts[0].tolist()):
                shown = ' | '.join(f"{i} {descriptions.get(str(i), '')}".strip() for i in ids)
                print(f"  {decode([token])!r:>14} <- {shown}")
        print('---------------')
