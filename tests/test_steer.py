"""tools/steer.py, the steering measure, on a tiny CoCoMix model with its teacher and SAE."""
import os
import re

from conftest import ROOT, TINY, run
from test_cocomix import teacher_and_sae


def test_steer_measures_paired_generations(dataset, tmp_path):
    spec = teacher_and_sae(dataset, tmp_path)
    model = tmp_path / 'cocomix'
    run(['train.py', f'--out_dir={model}', f'--dataset={dataset}', '--mode=cocomix', '--insert_layer=1',
         '--concept_topk=4', '--n_layer=3', '--max_iters=20', '--eval_interval=20'] + TINY + spec)
    (tmp_path / 'RESULTS.md').write_text('before\n<!-- steer:begin -->\nold\n<!-- steer:end -->\nafter\n')
    steer = [os.path.join(ROOT, 'tools', 'steer.py'), f'--runs={model}', '--concepts=3', '--prompts=4',
             '--prompt_len=4', '--new_tokens=8']
    # alpha 1 multiplies by one: the steered generations are the plain ones, draw for draw
    out = run(steer + ['--alpha=1.0', f'--runs={model},{model}'], cwd=tmp_path).stdout
    rows = [l for l in out.splitlines() if l.startswith('| cocomix |')]
    assert len(rows) == 3  # a run named twice is measured once
    for row in rows:  # each measure reads "plain → steered" with the two equal
        pairs = re.findall(r'([\d.]+) → ([\d.]+)', row)
        assert len(pairs) == 3 and all(a == b for a, b in pairs), row
    assert 'active +0.000' in out and 'promoted tokens +0.000' in out
    # an ordinary run leaves the published table in RESULTS.md alone
    assert (tmp_path / 'RESULTS.md').read_text() == 'before\n<!-- steer:begin -->\nold\n<!-- steer:end -->\nafter\n'
    # a large alpha changes what is generated, so some measure moves; publish=True writes the table
    out = run(steer + ['--alpha=50', '--publish=True'], cwd=tmp_path).stdout
    assert any(a != b for a, b in re.findall(r'([\d.]+) → ([\d.]+)', out)), out
    results = (tmp_path / 'RESULTS.md').read_text()
    assert results.startswith('before\n<!-- steer:begin -->\nalpha 50,') and results.endswith('<!-- steer:end -->\nafter\n')
    long = run(steer + ['--new_tokens=13'], cwd=tmp_path, check=False)  # 4 + 13 over the context 16
    assert long.returncode == 1 and long.stderr.strip().splitlines() == [
        f"error: prompt_len + new_tokens = 17 is over the context of {model} or its teacher (16); lower either"]
    bad = run(steer + [f'--runs={model},{tmp_path / "teacher"}'], cwd=tmp_path, check=False)  # all checked first
    assert bad.returncode != 0 and 'nothing to steer' in bad.stderr
    (tmp_path / 'elsewhere').mkdir()  # publishing needs the RESULTS.md it rewrites, before any work
    bad = run(steer + ['--publish=True'], cwd=tmp_path / 'elsewhere', check=False)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines() == [
        "error: publish=True rewrites ./RESULTS.md's steering block: run from the repository"]
