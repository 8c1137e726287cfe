"""Shared fixtures for the bcelogits test suite.

* ``backend`` runs a test once on the plain (unfused reference) path and once on the fused numba
  ``cpu`` kernel; the ``cpu`` parameter is skipped, with the reason, only when
  ``bcelogits.kernels.cpu.available()`` says the kernel cannot run here.
* Every test starts from the same torch / numpy random state, so failures reproduce.
* Hypothesis runs derandomised and without an example database by default (profile ``bcelogits``);
  ``HYPOTHESIS_PROFILE=thorough`` runs many more random examples.
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
        return "fused CPU kernel unavailable: bcelogits.kernels.cpu.available() is False (numba missing?)"
    return None


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Force the computation path for the duration of one test: 'plain' or 'cpu'."""
    from bcelogits import kernels

    if request.param == "cpu":
        reason = _cpu_kernel_unavailable_reason()
        if reason is not None:
            # CI installs numba on purpose: there an unusable kernel is a failure, not a skip.
            (pytest.fail if os.environ.get("CI") else pytest.skip)(reason)
    with kernels.use(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _deterministic_rng():
    torch.manual_seed(0)
    np.random.seed(0)  # noqa: NPY002 - legacy global state, for code that still uses it
    yield
