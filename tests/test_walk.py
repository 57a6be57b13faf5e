"""Every script's settings, walked with bad values: each setting declares its domain (an
annotation), and every value outside it is one line naming the setting, before any work. The
scripts are found, not listed: a script added later is walked too."""
import ast
import glob
import os
import time

import pytest
import torch

from common import UserError, configure
from conftest import ROOT, run


def settings_block(path):
    """The statements between a script's two dashed lines, or None."""
    lines = open(path).read().split('\n')
    marks = [i for i, line in enumerate(lines) if line.startswith('# ---')]
    return ast.parse('\n'.join(lines[marks[0] + 1:marks[1]])) if len(marks) >= 2 else None


SCRIPTS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, '*.py')) +
                 glob.glob(os.path.join(ROOT, 'tools', '*.py')) if settings_block(p))


def settings(script):
    """{name: (domain, default)} of a script, its settings block run on its own."""
    tree = settings_block(os.path.join(ROOT, script))
    names = {'DEVICE': 'cpu', 'DTYPE': 'float32', 'torch': torch}
    exec(compile(tree, script, 'exec'), names)
    return {n.target.id: (n.annotation.value, names[n.target.id]) for n in tree.body
            if isinstance(n, ast.AnnAssign)}


def bad_values(domain):
    """Values outside a domain, found from its words alone."""
    words = domain.split()
    if '|' in domain:
        return ['no_such_choice', 3]
    if domain.rstrip('?') in ('file', 'dir'):
        return ['/no/such/path', ROOT if domain.startswith('file') else __file__]
    if domain.rstrip('?') == 'out':  # a folder to write into
        return [__file__] + ([] if domain.endswith('?') else [''])
    if domain == 'device':
        return ['tpu', 'cuda:x'] + ([] if torch.cuda.is_available() else ['cuda'])
    if domain == 'bool':
        return ['maybe', 2]
    if domain == 'str':
        return []  # any text is a name; what it names is each script's check
    kind = 'int' if 'int' in words else 'float'
    bounds = [float(w) for w in words if w.lstrip('-').replace('.', '').isdigit()]
    out = ['abc'] + ([2.5] if kind == 'int' else [float('nan')])
    for b in bounds:  # just outside each bound
        for v in (b - 1, b + 1, b - 0.5, b + 0.5):
            v = int(v) if kind == 'int' and v == int(v) else v
            if kind == 'int' and v != int(v):
                continue
            if not eval(domain.replace(kind, 'x'), {'inf': float('inf')}, {'x': v}):
                out.append(v)
    return out


def test_scripts_are_found():
    assert {'train.py', 'prepare.py', 'sae.py', 'attribution.py', 'sample.py',
            'tools/eval.py', 'tools/study.py'} <= set(SCRIPTS), SCRIPTS


@pytest.mark.parametrize('script', SCRIPTS)
def test_every_setting_declares_a_domain_its_default_meets(script):
    tree = settings_block(os.path.join(ROOT, script))
    bare = [ast.unparse(n.targets[0]) for n in tree.body if isinstance(n, ast.Assign)]
    assert not bare, f"{script}: settings without a domain: {bare}"
    found = settings(script)
    assert found
    names = {'__annotations__': {k: d for k, (d, _) in found.items()},
             **{k: v for k, (_, v) in found.items()}}
    configure(names, argv=[])  # the defaults lie in their domains


@pytest.mark.parametrize('script', SCRIPTS)
def test_every_bad_value_is_one_line_naming_the_setting(script):
    found = settings(script)
    names = {'__annotations__': {k: d for k, (d, _) in found.items()},
             **{k: v for k, (_, v) in found.items()}}
    walked = 0
    for key, (domain, _) in found.items():
        for bad in bad_values(domain):
            with pytest.raises(UserError) as e:
                configure(dict(names), argv=[f'--{key}={bad}'])
            message = str(e.value.code)
            assert message.startswith('error: ') and '\n' not in message, message
            assert f' {key} must be ' in message, message
            walked += 1
    assert walked or all(d == 'str' for d, _ in found.values())


@pytest.mark.parametrize('script', SCRIPTS)
def test_a_script_refuses_a_bad_value_before_any_work(script, tmp_path):
    """The script itself, run as a user runs it: the first setting with a bad value."""
    found = settings(script)
    key, bad = next((k, bad_values(d)[0]) for k, (d, _) in found.items() if bad_values(d))
    args = ['prepare.py', 'walk'] if script == 'prepare.py' else [script]
    t0 = time.time()
    p = run(args + [f'--{key}={bad}'], check=False, cwd=ROOT)
    assert p.returncode == 1, (p.stdout[-2000:], p.stderr[-2000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and f' {key} must be ' in lines[0], p.stderr[-2000:]
    assert time.time() - t0 < 60
