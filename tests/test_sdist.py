"""The source distribution ships whole: build it, unpack it, check that it holds everything its tests need
(the helper modules, the conftest files, benchmarks/, examples/, the docs), and run a smoke subset of its
tests from the unpacked tree.

0.1.0's sdist shipped ``tests/test_*.py`` without ``tests/_reference.py``, the conftest files or
``benchmarks/``, so its tests did not even collect. The test builds with ``python -m build --sdist``, as a
packager would, whatever the build backend (it needs the ``build`` package, in the test extra, and takes
some 10-30 s: an isolated build environment is made for it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# what the tests, the benchmarks and the docs build read, beyond the package itself
REQUIRED = [
    "pyproject.toml",
    "README.md",
    "LICENSE",
    "CHANGELOG.md",
    "CONTRIBUTING.md",
    "conftest.py",
    "mkdocs.yml",
    "tests/conftest.py",
    "tests/_reference.py",
    "tests/_options_reference.py",
    "tests/scripts/torch_first_op.py",
    "benchmarks/README.md",
    "benchmarks/small_calls.py",
    "benchmarks/kernel_cpu_micro.py",
    "examples/01_pos_weight_digits.py",
    "docs/index.md",
    "docs/bench-cpu.png",
    "src/bcelogits/__init__.py",
]


def _checkout_files() -> list[str]:
    """The files of this checkout as a fresh clone would have them: tracked, or new and not ignored."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return [f for f in out.stdout.splitlines() if (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def checkout_files() -> list[str]:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout (this is an unpacked sdist): the sdist is built from a checkout")
    return _checkout_files()


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory, checkout_files) -> Path:
    """The sdist, built from a clean copy of the checkout (build outputs in the working tree, such as a
    stale ``*.egg-info``, would otherwise leak into it), then unpacked."""
    pytest.importorskip("build", reason="building the sdist needs the 'build' package (the test extra)")
    clean = tmp_path_factory.mktemp("clone")
    for f in checkout_files:
        (clean / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, clean / f)
    out = tmp_path_factory.mktemp("sdist")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--outdir", str(out), str(clean)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, f"python -m build --sdist failed:\n{log}"
    (archive,) = out.glob("bcelogits-*.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(out, filter="data")
    (top,) = [p for p in out.iterdir() if p.is_dir()]
    return top


def test_sdist_holds_what_its_tests_need(unpacked, checkout_files):
    missing = [p for p in REQUIRED if not (unpacked / p).is_file()]
    assert not missing, f"the sdist lacks {missing}"
    wanted = [f for f in checkout_files if f.startswith(("src/", "tests/", "benchmarks/", "examples/"))]
    missing = [f for f in wanted if not (unpacked / f).is_file()]
    assert not missing, f"files of the checkout missing from the sdist: {missing}"
    assert not list(unpacked.rglob("__pycache__")) and not list(unpacked.rglob("*.pyc"))


def test_sdist_tests_collect_and_a_smoke_subset_passes(unpacked):
    """Every test module of the sdist imports (its helpers are there), and a few run, from the unpacked
    tree, against the installed package."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    base = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--rootdir", str(unpacked)]
    collect = subprocess.run(
        [*base, "--collect-only", "tests"], cwd=unpacked, capture_output=True, text=True, timeout=600, env=env
    )
    assert collect.returncode == 0, collect.stdout[-3000:] + collect.stderr[-3000:]
    assert "error" not in collect.stdout.lower().splitlines()[-1]
    run = subprocess.run(
        [*base, "-x", "tests/test_errors.py", "tests/test_numpy.py", "-k", "not slow"],
        cwd=unpacked, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout.splitlines()[-1]
