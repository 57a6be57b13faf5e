import json
import os
import time

import pytest

from stages import run_stages
from study import tokens_to_reach


def tools_imports():
    """{tools/ module: the tools/ modules it imports, anywhere in it}."""
    import ast
    from conftest import ROOT
    folder = os.path.join(ROOT, 'tools')
    mine = {f[:-3] for f in os.listdir(folder) if f.endswith('.py')}
    graph = {}
    for m in mine:
        tree = ast.parse(open(os.path.join(folder, m + '.py')).read())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        graph[m] = names & mine - {m}
    return graph


def test_tools_import_each_other_one_way():
    """No import circle among tools/ (study and pipeline imported each other): each module's imports,
    followed transitively, never lead back to it."""
    graph = tools_imports()
    for start in graph:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            assert m != start, f"tools/{start}.py imports itself through {sorted(seen)}"
            if m not in seen:
                seen.add(m)
                todo += graph[m]


def test_stages_skip_when_current_and_rerun_when_not(tmp_path, capsys):
    src, out, stamps = tmp_path / 'in.txt', tmp_path / 'out.txt', str(tmp_path / 'stamps.json')
    src.write_text('a')
    copy = lambda suffix: [('copy', ['-c', f"import sys; open(sys.argv[2], 'w').write(open(sys.argv[1]).read() + '{suffix}')",
                                     str(src), str(out)], [str(src)], str(out))]
    run_stages(copy('1'), stamps)
    assert out.read_text() == 'a1'
    run_stages(copy('1'), stamps)  # current: skipped
    assert 'up to date' in capsys.readouterr().out
    run_stages(copy('2'), stamps)  # another command: runs again
    assert out.read_text() == 'a2'
    time.sleep(0.01)
    src.write_text('b')  # a newer input: runs again
    os.utime(src, (time.time() + 5, time.time() + 5))
    run_stages(copy('2'), stamps)
    assert out.read_text() == 'b2'


def test_a_stale_training_stage_starts_without_its_old_checkpoint(tmp_path, monkeypatch):
    """train.py refuses to start over a checkpoint: a rerun training stage (another command) removes it
    first, a resume keeps it, and so does any other command (a copy into place); a failed rerun leaves
    no stamp, so a killed run's output never counts as current."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'train.py').write_text("import os, sys; assert not os.path.exists(sys.argv[1]); "
                                       "open(sys.argv[1], 'w').write('new')")
    ckpt, stamps = str(tmp_path / 'ckpt.pt'), str(tmp_path / 'stamps.json')
    train = lambda *arg: [('train', ['train.py', ckpt, *arg], [], ckpt)]
    run_stages(train('--seed=1'), stamps)
    run_stages(train('--seed=2'), stamps)
    assert open(ckpt).read() == 'new'
    with pytest.raises(SystemExit):  # the stage fails: it found the checkpoint it resumes
        run_stages(train('--init_from=resume'), stamps)
    assert open(ckpt).read() == 'new' and ckpt not in json.load(open(stamps))
    copy = [('copy', ['-c', "import sys; assert open(sys.argv[1]).read() == 'new'", ckpt], [], ckpt)]
    run_stages(copy, stamps)  # not a training command: its output stays
    assert open(ckpt).read() == 'new'


def test_tokens_to_reach_interpolates():
    curve = [(0, 4.0), (100, 3.0), (200, 2.0), (300, 1.5)]
    assert tokens_to_reach(curve, 2.5) == 150
    assert tokens_to_reach(curve, 1.75) == 250
    assert tokens_to_reach(curve, 4.5) == 0
    assert tokens_to_reach(curve, 1.0) is None


def test_stages_run_in_parallel_after_their_inputs(tmp_path):
    """With jobs=2, 'first' can only finish while 'second' runs beside it (it waits for second's marker), and
    'last' starts only once both of its inputs exist."""
    p = lambda name: str(tmp_path / name)
    wait = f"import os, sys, time; t = time.time()\nwhile not os.path.exists({p('marker')!r}):\n" \
           f"    time.sleep(0.05)\n    assert time.time() - t < 20\nopen({p('a')!r}, 'w').write('a')"
    stages = [('first', ['-c', wait], [], p('a')),
              ('second', ['-c', f"open({p('marker')!r}, 'w'); open({p('b')!r}, 'w').write('b')"], [], p('b')),
              ('last', ['-c', f"open({p('c')!r}, 'w').write(open({p('a')!r}).read() + open({p('b')!r}).read())"],
               [p('a'), p('b')], p('c'))]
    run_stages(stages, p('stamps.json'), jobs=2)
    assert (tmp_path / 'c').read_text() == 'ab'
    assert sorted(os.listdir(tmp_path / 'logs')) == ['first.log', 'last.log', 'second.log']


def test_study_report_pairs_seeds_and_rewrites_the_readme_block(tmp_path, monkeypatch):
    """Paired differences and characters-to-reach with 95% t-intervals (t = 4.303 at 2 degrees of freedom),
    worked out by hand, in the table that replaces the README's study block."""
    import study
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'RESULTS.md').write_text('intro\n<!-- study:begin -->\nold table\n<!-- study:end -->\nrest\n')
    (tmp_path / 'README.md').write_text('top\n<!-- headline:begin -->\nold\n<!-- headline:end -->\n')
    monkeypatch.setattr(study, 'plot', lambda res: None)
    monkeypatch.setattr(study, 'small_methods', 'ntp,cocomix')
    run = lambda final, curve: dict(final=final, params=1000, shape='8 x 48', curve=curve)
    runs = {}
    for seed, (ntp, cocomix, add, reach) in enumerate([(2.0, 2.05, 2.02, 400_000), (2.1, 2.12, 2.15, 600_000),
                                                       (2.2, 2.23, 2.22, 800_000)]):
        # the control without labels: cocomix minus it = (0.01, 0.02, -0.02)
        runs[f'8-layer/interleave_no_concept_loss/{seed}'] = dict(
            run(cocomix - (0.01, 0.02, -0.02)[seed], [(0, 3.0), (1_000_000, 2.1)]), flops=1e6)
        runs[f'8-layer/ntp/{seed}'] = run(ntp, [(0, 3.0), (500_000, 2.2), (1_000_000, 2.0)])
        runs[f'8-layer/cocomix/{seed}'] = run(cocomix, [(0, 3.0), (reach, 2.0), (1_000_000, 1.9)])
        runs[f'8-layer/cocomix_add/{seed}'] = run(add, [(0, 3.0), (500_000, 2.2), (1_000_000, add)])
        runs[f'4-layer/ntp/{seed}'] = run(ntp, [(0, 3.0), (500_000, 2.2), (1_000_000, 2.0)])
        runs[f'4-layer/cocomix/{seed}'] = run(ntp + 0.01, [(0, 3.0), (500_000, 2.1), (1_000_000, 2.1)])
    for k in runs:
        runs[k].setdefault('flops', 1e6)
    study.report({'teacher': 1.5, 'teacher_shape': '4 x 192', 'val_chars': 256000, 'sae': {'fvu': 0.03},
                  'runs': runs, 'vocab_size': 1024, 'train_chars': 1_000_000})
    headline = (tmp_path / 'README.md').read_text()
    # mean 0.00333, sd 0.020817, half-width 4.303 * 0.020817 / sqrt(3) = 0.05172: up to 0.05505
    assert '| CoCoMix without concept labels (lam_concept=0) | 8 x 48 |' in headline
    assert '| +0.0033 (-0.0484, +0.0550) |' in headline and 'not run yet' in headline
    text = (tmp_path / 'RESULTS.md').read_text()
    assert text.startswith('intro\n<!-- study:begin -->\n') and text.endswith('<!-- study:end -->\nrest\n')
    assert 'old table' not in text
    # final losses, d = (0.05, 0.02, 0.03): mean 0.03333, sd 0.015275, half-width 4.303 * 0.015275 / sqrt(3) = 0.03795
    assert '+0.0333 (-0.0046, +0.0713)' in text
    # NTP's final curve loss 2.0 reached at 0.4, 0.6, 0.8 of the budget: mean 0.6, half-width 4.303 * 0.2 / sqrt(3)
    assert '0.60 (0.10, 1.10) x 1.0M' in text
    assert '8-layer cocomix: ahead of NTP at the end' in text  # 1.9 against 2.0 at the last point
    assert '4-layer cocomix: ahead of NTP until 0.5M characters, behind after' in text
    # interleave - add: (0.03, -0.03, 0.01), mean 0.00333, sd 0.030551, half-width 4.303 * 0.030551 / sqrt(3) = 0.07590
    assert ('other method, paired (95% CI): 8-layer cocomix_add +0.0033 (-0.0726, +0.0792); '
            '8-layer interleave_no_concept_loss +0.0033 (-0.0484, +0.0550).') in text
    # interleave's gap at 8 layers minus at 4: (0.04, 0.01, 0.02), mean 0.02333, half-width 0.03795
    assert 'Scale: interleave − NTP at 8 layers minus at 4 layers: +0.0233 (-0.0146, +0.0613)' in text


def test_study_compute_rows_charge_each_method_its_teacher():
    """The compute table's arithmetic, worked by hand for the study's teacher (4 x 192, 1024 tokens,
    windows of 128) and an SAE of 512 latents at layer 1; per token, with block = 12 * 192^2 = 442,368:
    activation labels: 2 blocks' forward 2 * 2 * block + 4 * 2 * 192 * 128 and the encoder
    2 * 192 * 512 = 2,162,688; KD: 4 blocks and the head 2 * 1024 * 192 = 4,325,376;
    attribution: that, plus the gradient through 2 blocks, the head and the encoder = 7,077,888."""
    import study
    res = {'teacher_shape': '4 x 192', 'vocab_size': 1024, 'sae_latents': 512, 'train_chars': 2_000_000,
           'timing': {'ntp': dict(ms_per_step=100, machine='a'), 'cocomix': dict(ms_per_step=200, machine='a'),
                      'activation': dict(ms_per_step=150, machine='b')}}
    run = lambda flops: {0: dict(flops=flops, curve=[(0, 3.0), (1_000_000, 2.0)])}
    got = {'ntp': run(1e6), 'cocomix': run(2e6), 'activation': run(2e6), 'kd': run(1e6)}
    rows = study.compute_rows(res, got, {'cocomix': [0.5, 0.5], 'activation': [0.25, 0.25]},
                              {'kd': 'not reached in 1 of 2 seeds'})
    # cached: the 2M-character corpus labelled once for a 1M-character run, twice the online cost
    assert '| cocomix | 2.00M | 9.08M | 16.16M | 200 | 0.50 (0.50, 0.50) | 8.08 (8.08, 8.08) | 1.00 (1.00, 1.00) |' in rows
    # timed on another machine than NTP: no time ratio
    assert '| activation | 2.00M | 4.16M | 6.33M | — | 0.25 (0.25, 0.25) | 1.58 (1.58, 1.58) | — |' in rows
    assert '| kd | 1.00M | 5.33M | 5.33M | — | not reached in 1 of 2 seeds | — | — |' in rows
    assert '| ntp | 1.00M | 1.00M | 1.00M | 100 | — | — | — |' in rows


def test_study_resumes_from_saved_results_only_with_the_same_teacher(tmp_path, monkeypatch):
    """A run in the saved results is not run again, nor is a teacher-reading run of a seed whose
    teacher-reading runs were made on another kind of machine; collect() keeps the saved runs beside this machine's, and
    refuses a teacher or SAE whose weights (fingerprints) differ from the saved ones."""
    import json
    import pytest
    import torch
    import study
    from common import UserError, fingerprint, save_checkpoint
    from sae import TopKSAE
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(study, 'matched_width', lambda student, m: 56)
    monkeypatch.setattr(study, 'machine', lambda: 'this cpu')
    os.makedirs(f'{study.out}/teacher')
    save_checkpoint({'model': {'w': torch.ones(2)}, 'config': dict(n_layer=4, n_embd=192)}, f'{study.out}/teacher')
    TopKSAE(4, 8, 2).save(f'{study.out}/sae/sae.pt', {'eval': {'fvu': 0.09}})
    teacher_id, sae_id = study.check_identity({'runs': {}})
    assert teacher_id == fingerprint({'w': torch.ones(2)})
    run = lambda where: dict(final=2.2, params=1, shape='8 x 56', curve=[[0, 3.0]], machine=where)
    saved = {'teacher': 1.8, 'teacher_shape': '4 x 192', 'val_chars': 1000, 'sae': {'fvu': 0.09},
             'teacher_id': teacher_id, 'sae_id': sae_id,
             'runs': {'8-layer/ntp/0': run('this cpu'), '8-layer/ntp/1': run('another cpu'),
                      '8-layer/cocomix/1': run('another cpu')}}
    os.makedirs('assets')
    json.dump(saved, open(study.results, 'w'))
    os.makedirs(study.DATA)  # the prepared data's size and vocabulary go into the results too
    json.dump({'train_tokens': 10_000, 'vocab_size': 65}, open(f'{study.DATA}/meta.json', 'w'))
    names = [s[0] for stages in study.stages() for s in stages]  # (teacher, SAE, labels), runs
    assert '8-layer ntp seed 0' not in names and '8-layer kd seed 0' in names  # seed 0: this machine's
    # seed 1 read its teacher on another machine: its teacher-reading runs stay there; runs that read
    # no teacher pair by seed anywhere
    assert '8-layer kd seed 1' not in names and '8-layer activation seed 1' not in names
    assert '8-layer interleave_no_concept_loss seed 1' in names and '8-layer ntp seed 4' in names
    json.dump({'results': {'ppl': {'loss': 1.8, 'tokens': 1000}}}, open(f'{study.out}/teacher/eval.json', 'w'))
    monkeypatch.setattr('common.load_model', lambda run: (None, {'config': dict(n_layer=4, n_embd=192)}))
    study.collect()
    kept = json.load(open(study.results))
    assert kept['runs'] == json.loads(json.dumps(saved['runs'])) and kept['teacher_id'] == teacher_id
    assert (kept['train_chars'], kept['vocab_size'], kept['sae_latents']) == (10_000, 128, 8)  # 65 padded to 128
    torch.manual_seed(1)
    TopKSAE(4, 8, 2).save(f'{study.out}/sae/sae.pt', {'eval': {'fvu': 0.09}})  # other weights, same FVU
    with pytest.raises(UserError, match='another teacher or SAE'):
        study.collect()
