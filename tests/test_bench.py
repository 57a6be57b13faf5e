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


def test_labels_compiled_against_eager():
    """--parts=labels reports torch.compile's labelling speed against eager's, as a ratio, from one run
    (aot_eager: the compiled path without inductor's C++ builds, which take minutes on a shared CPU)."""
    out = run(['tools/bench.py', '--parts=labels', '--smoke_tiny=True', '--device=cpu', '--dtype=float32',
               '--backend=aot_eager', '--steps=1'], env={'OMP_NUM_THREADS': '1'}).stdout
    line = re.search(r"labelling \(2 x 64 tokens, aot_eager\): eager ([\d,]+) tokens/s, compiled ([\d,]+) "
                     r"tokens/s: ([\d.]+)x; labels agree at 100.0% of slots", out)
    assert line, out
    assert re.search(r"labelling tokens/s compiled / eager: [\d.]+ \(target >= 1.0: (met|MISSED)\)", out)


def test_gpu_check_prints_its_verdict_on_a_cpu():
    """tools/gpu_check.sh --cpu: its steps tiny (a compiled smoke, the heads' gradients in bfloat16 against
    float32), within two minutes, ending with its one verdict line."""
    import os
    import subprocess
    from conftest import ROOT
    p = subprocess.run(['bash', 'tools/gpu_check.sh', '--cpu'], cwd=ROOT, capture_output=True, text=True,
                       timeout=170, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert re.search(r"heads \(bfloat16 against float32.*chunked vs plain", p.stdout)
    assert p.stdout.strip().splitlines()[-1] == "gpu_check: OK (smoke bfloat16; torchrun skipped (0 GPUs))"


@pytest.mark.parametrize('arg, want', [('--parts=smoke,bogus', "unknown part 'bogus'"),
                                       ('--steps=0', 'steps must be an int with steps >= 1'),
                                       ('--n_head=5', 'n_embd=768 is no multiple of its 5 heads'),
                                       ('--mix=concat', 'mix must be one of interleave, add, none')])
def test_bad_settings_one_line_before_any_part(arg, want):
    p = run(['tools/bench.py', '--device=cpu', arg], check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and p.stdout == '' and len(lines) == 1 and want in lines[0], p.stderr
