"""The ``bcelogits`` command line."""

from __future__ import annotations

import subprocess
import sys


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
