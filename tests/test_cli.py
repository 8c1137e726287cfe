"""``bcelogits warmup``: which kernels it prepares, and that a later process's real call uses them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bcelogits import cli
from bcelogits.kernels import cpu


def test_warmup_specs_use_the_keys_real_calls_use():
    assert len(cli.warmup_specs()) == 12  # float32 x 3 modes x (none, w, p, wp)
    assert len(cli.warmup_specs(float64=True)) == 24
    everything = cli.warmup_specs(everything=True)
    assert len(everything) == 2 * 2 * 16 * 3 == len(set(everything))
    for dtype, mode, focal, uses in everything:
        w, p, s, i = (c in uses for c in "wpsi")
        # the string a call with these options is compiled under (cpu._uses), not a look-alike
        assert uses == cpu._uses(w or None, p or None, 0.1 if s else 0.0, -1.0 if i else None)
        assert dtype in ("float32", "float64") and mode in (0, 1, 2) and focal in (False, True)


def _run(code, cache):
    env = dict(os.environ, BCELOGITS_CACHE_DIR=str(cache))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.skipif(not cpu.available(), reason="numba kernel unavailable")
def test_warmup_stores_kernels_that_later_calls_load_without_numba(tmp_path):
    one = "from bcelogits import cli; cli.warmup_specs = lambda *a: [('float32', 0, False, 'p')]; "
    first = _run(one + "raise SystemExit(cli.main(['warmup']))", tmp_path)
    assert "[  1/1] float32 loss only, pos_weight: compiled and stored" in first
    assert "done in" in first
    assert "cached" in _run(one + "raise SystemExit(cli.main(['warmup']))", tmp_path)
    # A later process's evaluation call with a pos_weight runs the warmed kernel, without importing numba.
    call = (
        "import sys, torch, bcelogits\n"
        "x, y = torch.randn(64, 8), torch.rand(64, 8)\n"
        "with torch.no_grad():\n"
        "    bcelogits.binary_cross_entropy_with_logits(x, y, pos_weight=torch.rand(8))\n"
        "print('numba imported:', 'numba' in sys.modules)\n"
    )
    assert "numba imported: False" in _run(call, tmp_path)


def test_a_closed_pipe_ends_the_output_quietly():
    """`bcelogits compare | head -3` must not end in a BrokenPipeError traceback. The reader is gone
    before the first line is written (the child is still importing torch), so every write fails."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from bcelogits import cli; sys.exit(cli.main(['compare']))"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
