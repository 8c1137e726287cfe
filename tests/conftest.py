"""Shared fixtures for the bcelogits test suite.

* ``backend`` runs a test once on the plain (unfused reference) path and once on the fused native
  ``cpu`` kernel; the ``cpu`` parameter is skipped, with the reason, only when
  ``bcelogits.kernels.cpu.available()`` says the kernel cannot run here.
* Every test starts from the same torch / numpy random state, so failures reproduce.
* Hypothesis runs derandomised and without an example database by default (profile ``bcelogits``);
  ``HYPOTHESIS_PROFILE=thorough`` runs many more random examples.
* Before the first test, torch runs one multi-threaded operator (see :func:`pytest_sessionstart`).
"""

from __future__ import annotations

import os
import sys

import hypothesis
import numpy as np
import pytest
import torch

# ``--import-mode=importlib`` does not put tests/ on sys.path; the helpers module lives here.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


def pytest_sessionstart(session):
    """Run one multi-threaded torch operator before any test, and check that it was right.

    torch 2.13.0 (CPU wheel) on this project's 2-core Intel VM: in a fresh process the first
    multi-threaded elementwise operator occasionally computes the share of torch's second OpenMP thread
    wrongly (``torch.exp`` off by 1.5e-4 to 6e-4 relative, not seen with one thread, every later call
    right). It is torch's own: 1 in 40 fresh processes that import only torch, 2 in 40 with a dummy
    custom op, 0 in 40 after ``import bcelogits`` (tests/scripts/torch_first_op.py). It needs no call
    of ours, but it made the first test of a run, an accuracy test of the plain path built on torch's
    operators, fail now and then (1 run in 8 to 15). With this warm-up: 0 failures in 36 runs of that
    test alone. The check below still fails the run if torch's exp is wrong after the warm-up."""
    x = torch.linspace(-50.0, 0.0, 1 << 18)
    for _ in range(2):
        got = torch.exp(x).double()
    want = torch.exp(x.double())
    worst = float(((got - want).abs() / want).max())
    if worst > 1e-6:
        raise pytest.UsageError(f"torch.exp is inaccurate on this machine even after a warm-up: {worst:.3g}")


hypothesis.settings.register_profile(
    "bcelogits",
    deadline=None,
    database=None,
    derandomize=True,
    max_examples=60,
    suppress_health_check=[hypothesis.HealthCheck.too_slow, hypothesis.HealthCheck.function_scoped_fixture],
)
hypothesis.settings.register_profile(
    "thorough",
    deadline=None,
    database=None,
    max_examples=2000,
    suppress_health_check=[hypothesis.HealthCheck.too_slow, hypothesis.HealthCheck.function_scoped_fixture],
)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "bcelogits"))

BACKENDS = ["plain", "cpu"]


def _cpu_kernel_unavailable_reason():
    """None when the fused CPU kernel can run, else the reason to skip it."""
    try:
        from bcelogits.kernels import cpu
    except ImportError as exc:  # pragma: no cover - depends on the install
        return f"bcelogits.kernels.cpu cannot be imported ({exc})"
    if not cpu.available():
        return f"fused CPU kernel unavailable: {cpu.unavailable_reason}"
    return None


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Force the computation path for the duration of one test: 'plain' or 'cpu'."""
    from bcelogits import kernels

    if request.param == "cpu":
        reason = _cpu_kernel_unavailable_reason()
        if reason is not None:
            # CI builds the native core on purpose: there an unusable kernel is a failure, not a skip.
            (pytest.fail if os.environ.get("CI") else pytest.skip)(reason)
    with kernels.use(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _deterministic_rng():
    torch.manual_seed(0)
    np.random.seed(0)  # noqa: NPY002 - legacy global state, for code that still uses it
    yield
