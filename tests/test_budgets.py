"""The code's size budgets: `python -m pytest tests/test_budgets.py -s` prints where each stands.

The core is the top-level Python (the design's six files and the two support modules); "all Python" is
everything outside tests/ and config/. The 100-column rule is checked on the core, as before issue #30;
tools/ keeps longer lines (104 then, 142 now), whose wrapping would cost about as many lines."""
import glob
import os

from conftest import ROOT

CORE = sorted(glob.glob(os.path.join(ROOT, '*.py')))
ALL = CORE + sorted(glob.glob(os.path.join(ROOT, 'tools', '*.py')))


def lines(path):
    return open(path).read().splitlines()


def report(name, value, limit):
    print(f"\n{name}: {value:,} (budget {limit:,})")
    return value <= limit


def test_core_files_and_lines():
    names = {os.path.basename(p) for p in CORE}
    assert names <= {'model.py', 'sae.py', 'attribution.py', 'train.py', 'sample.py', 'prepare.py', 'common.py',
                     'chunked.py'}, names  # six files of the design and at most two support modules
    assert report('core lines over 100 characters', sum(len(l) > 100 for p in CORE for l in lines(p)), 0)
    assert report('model.py lines', len(lines(os.path.join(ROOT, 'model.py'))), 400)


def test_core_characters():
    assert report('core characters', sum(len(open(p).read()) for p in CORE), 110_000)


def test_all_python_lines():
    assert report('lines of Python outside tests/ and config/', sum(len(lines(p)) for p in ALL), 3_750)
