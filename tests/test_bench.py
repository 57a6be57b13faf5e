"""bench.py --parts=smoke, the check a GPU user runs before a long run, on its CPU-sized path."""
import re

import pytest

from conftest import run

SMOKE = ['tools/bench.py', '--parts=smoke', 'config/cocomix_gpt2.py', '--smoke_tiny=True', '--device=cpu',
         '--dtype=float32']


def check_report(out, processes):
    assert f"smoke ({processes} process" in out
    for mode in ('ntp', 'cached', 'online'):  # every mode ran, with a speed and a memory
        line = re.search(rf"^ *{mode}: ([\d,]+) tokens/s, .* peak memory per process ([\d.]+) GiB, "
                         r"graph breaks (\d+)", out, re.M)
        assert line, out
        assert float(line[1].replace(',', '')) > 0 and float(line[2]) > 0 and line[3] == '0'
    assert re.search(r"online: .*teacher \d+% of the step", out)
    assert out.strip().splitlines()[-1] == "smoke: OK, ready for the long run"


def test_smoke_compiled_one_process():
    """The config's own setting: torch.compile on (the test fails on any graph break)."""
    out = run(SMOKE, env={'OMP_NUM_THREADS': '1'}).stdout
    assert 'compile True' in out
    check_report(out, 1)


@pytest.mark.parametrize('world', [2])
def test_smoke_under_torchrun(world):
    out = run(['torchrun', '--standalone', f'--nproc_per_node={world}'] + SMOKE + ['--compile=False'],
              env={'OMP_NUM_THREADS': '1'}).stdout
    check_report(out, world)
    assert out.count('smoke: OK') == 1  # printed by rank 0 only
