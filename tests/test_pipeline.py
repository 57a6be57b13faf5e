import os
import time

from pipeline import run_stages
from study import tokens_to_reach


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
