"""Shared test set-up.

``NUMBA_ENABLE_CUDASIM`` must be set before numba is imported anywhere, so that the CUDA
kernels run on numba's simulator on machines without a GPU.
"""
import os

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"


@pytest.fixture
def specs_dir() -> Path:
    return SPECS
