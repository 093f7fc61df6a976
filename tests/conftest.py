"""Shared test set-up.

``NUMBA_ENABLE_CUDASIM`` must be set before numba is imported anywhere: on a machine
without a GPU the CUDA kernels run on numba's simulator (tests/test_runtime_kernels.py);
on one with a GPU they run for real (tests/test_runtime_cuda.py). Set the variable
yourself to choose.

``MONETDSL_CACHE`` points at a fresh directory for each run of the tests.
"""
import os

if "NUMBA_ENABLE_CUDASIM" not in os.environ:
    import torch

    os.environ["NUMBA_ENABLE_CUDASIM"] = "0" if torch.cuda.is_available() else "1"

import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

# measured costs (and the allocator counter) go to a directory of this test run, not the
# user's cache: no test reads what an earlier run measured
os.environ["MONETDSL_CACHE"] = tempfile.mkdtemp(prefix="monetdsl-test-cache-")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"


@pytest.fixture
def specs_dir() -> Path:
    return SPECS


@pytest.fixture(autouse=True)
def _no_schedules_from_earlier_tests():
    """Each test searches as a fresh process does: the schedules an earlier test's
    infeasible solve remembered (``monetdsl.search.known``) would be extra candidates
    here, and results would depend on the order the tests run in."""
    from monetdsl.search import known

    known.forget()
    yield
