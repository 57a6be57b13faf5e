"""Off the path, as a newcomer tried it (issue #30's second round): damaged files are one line, not a
traceback, and a mistaken rerun never spoils finished work (an SAE, a label cache)."""
import json
import os
import runpy
import sys

import numpy as np

from conftest import ROOT, run, user_error
from test_reliability import one_line_error, teacher_and_sae, train


def test_damaged_files_are_one_line(tmp_path):
    from common import configure, load_checkpoint
    from prepare import read_meta
    from sae import load_sae
    (tmp_path / 'text.pt').write_text('hello\n')
    (tmp_path / 'empty.pt').write_bytes(b'')
    for path in ('text.pt', 'empty.pt', ''):  # '' : the folder itself
        assert 'is not a TopK SAE file' in user_error(load_sae, str(tmp_path / path))
    os.makedirs(tmp_path / 'out')
    (tmp_path / 'out' / 'ckpt.pt').write_bytes(b'')
    assert 'cannot read the checkpoint' in user_error(load_checkpoint, str(tmp_path / 'out'), 'cpu')
    (tmp_path / 'out' / 'meta.json').write_text('')
    assert 'no prepared dataset at' in user_error(read_meta, str(tmp_path / 'out'))
    (tmp_path / 'cfg.py').write_bytes(b'batch_size = 4  # \xff\n')
    names = {'__annotations__': {'batch_size': 'int >= 1'}, 'batch_size': 1}
    assert 'cannot read config file' in user_error(configure, names, [str(tmp_path / 'cfg.py')])


def test_an_empty_val_split_is_refused_in_one_line(dataset, tmp_path):
    open(os.path.join(dataset, 'val.bin'), 'wb').close()
    one_line_error(train(dataset, tmp_path / 'out', '--max_iters=1', check=False),
                   'the val split of')


def test_sae_settings_that_waste_a_run_are_refused_before_it(dataset, tmp_path):
    spec = teacher_and_sae(dataset, tmp_path)
    sae = ['sae.py', spec[0], f'--dataset={dataset}', '--sae_layer=0', '--n_latents=32', '--k=4',
           '--batch_size=64', '--buffer_size=512', '--eval_tokens=256', '--context=16', '--device=cpu',
           '--dtype=float32', f'--out_dir={tmp_path / "sae"}']
    # fewer tokens than a batch would save an untrained SAE over a finished one
    one_line_error(run(sae + ['--max_tokens=10'], check=False), 'must hold a batch of 64')
    run(sae + ['--max_tokens=640', '--ckpt_interval=5'])
    trained = open(tmp_path / 'sae' / 'sae.pt', 'rb').read()
    one_line_error(run(sae + ['--max_tokens=640', '--n_latents=16'], check=False),  # a new SAE over it
                   'holds an SAE; pass --init_from=resume or another out_dir')
    assert open(tmp_path / 'sae' / 'sae.pt', 'rb').read() == trained
    one_line_error(run(sae + ['--max_tokens=320', '--init_from=resume'], check=False),
                   '640 tokens (max_tokens=320)')  # it recorded 320 tokens trained after 640
    short = tmp_path / 'short'  # a val split too short for one window: before training, not after
    os.makedirs(short)
    for name in ('train.bin', 'meta.json'):
        (short / name).write_bytes(open(os.path.join(dataset, name), 'rb').read())
    np.zeros(6, np.uint16).tofile(short / 'val.bin')
    p = run([a.replace(f'--dataset={dataset}', f'--dataset={short}') for a in sae] + ['--max_tokens=640',
             f'--out_dir={tmp_path / "sae2"}'], check=False)
    one_line_error(p, "val split has 6 tokens")
    assert 'SAE' not in p.stdout + p.stderr.split('error')[0]  # no training step ran


def test_a_finished_label_cache_is_never_overwritten(dataset, tmp_path):
    spec = teacher_and_sae(dataset, tmp_path)
    label = ['attribution.py', f'--dataset={dataset}', '--block_size=16', '--device=cpu', '--sae_layer=0',
             '--splits=train'] + spec
    run(label)
    before = open(os.path.join(dataset, 'labels_train.bin'), 'rb').read()
    before_id = json.load(open(os.path.join(dataset, 'labels_train.json')))['sae_id']
    one_line_error(run(label + ['--k_attr=2'], check=False), 'holds finished labels made with k_attr=4')
    assert open(os.path.join(dataset, 'labels_train.bin'), 'rb').read() == before
    assert json.load(open(os.path.join(dataset, 'labels_train.json')))['complete']
    cached = ['--mode=cocomix', '--insert_layer=1', '--concept_topk=4', '--max_iters=1', '--label_cache=True',
              '--sae_layer=0', *spec]
    train(dataset, tmp_path / 'out', *cached)
    with open(os.path.join(dataset, 'labels_train.bin'), 'r+b') as f:  # cut short, still marked complete
        f.truncate(len(before) // 2)
    one_line_error(train(dataset, tmp_path / 'out2', *cached, check=False), 'is missing or cut short')
    one_line_error(run(label[:-3] + ['--splits=train,test'] + spec, check=False), 'splits must be one of')
    other = teacher_and_sae(dataset, tmp_path, seed=1, name='other.pt')  # new inputs: stale labels go
    run(label[:-2] + other)
    assert json.load(open(os.path.join(dataset, 'labels_train.json')))['sae_id'] != before_id


def test_a_finished_checkpoint_is_not_replaced_by_a_new_run(dataset, tmp_path):
    out = tmp_path / 'out'
    train(dataset, out, '--max_iters=2', '--eval_interval=2')
    before = open(out / 'ckpt.pt', 'rb').read()
    one_line_error(train(dataset, out, '--max_iters=4', check=False), 'holds a checkpoint; pass --init_from=resume or another out_dir')
    # a resume whose max_iters is below the saved step would re-save the step as if it were new
    one_line_error(train(dataset, out, '--max_iters=1', '--init_from=resume', check=False),
                   'is at step 2, past max_iters=1')
    train(dataset, out, '--max_iters=1', '--init_from=resume', '--eval_only=True')  # saves nothing: allowed
    assert open(out / 'ckpt.pt', 'rb').read() == before


def test_a_study_report_is_refused_before_it_rewrites_a_readme(tmp_path, monkeypatch):
    """The report rewrites README.md and RESULTS.md in the working folder: bad methods or results
    must stop it first (they were a traceback, or tables with a method left out)."""
    for name in ('README.md', 'RESULTS.md'):
        (tmp_path / name).write_text('<!-- study:begin -->\nkept\n<!-- study:end -->\n'
                                     '<!-- headline:begin -->\nkept\n<!-- headline:end -->\n')
    (tmp_path / 'empty.json').write_text('')
    (tmp_path / 'list.json').write_text('[1, 2]')
    (tmp_path / 'no_runs.json').write_text('{"runs": {}}')
    os.makedirs(tmp_path / 'assets')  # the study's saved results, as a clone has them
    (tmp_path / 'assets' / 'study_results.json').write_text(open(f'{ROOT}/assets/study_results.json').read())
    monkeypatch.chdir(tmp_path)
    for arg, want in (('--large_methods=ntp,cocomixx', "no method or seed count 'cocomixx:3'"),
                      ('--large_methods=ntp:x', "'ntp:x'"), ('--small_methods=ntp:0', "'ntp:0'"),
                      ('--small_methods=ntp:3:4', "'ntp:3:4'"), ('--results=empty.json', 'cannot read empty.json'),
                      ('--results=list.json', 'not the results study.py writes'),
                      ('--results=no_runs.json', 'no saved results at no_runs.json'),
                      (f'--results={tmp_path}', f'cannot read {tmp_path}')):
        monkeypatch.setattr(sys, 'argv', ['study.py', '--report_only=True', arg])
        assert want in user_error(runpy.run_path, f'{ROOT}/tools/study.py', None, '__main__')
    assert all('kept' in (tmp_path / n).read_text() for n in ('README.md', 'RESULTS.md'))


def test_a_pipeline_name_that_is_no_folder_name_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # '' wrote the dataset into data/ itself, 'a/b' made out-a/b
    for name in ('', 'a/b', '..'):
        monkeypatch.setattr(sys, 'argv', ['pipeline.py', f'--name={name}'])
        assert 'name must be a folder name' in user_error(runpy.run_path, f'{ROOT}/tools/pipeline.py', None, '__main__')
    assert not os.listdir(tmp_path)
