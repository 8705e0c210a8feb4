import sys
from pathlib import Path

import numpy as np
import pytest

# tests/ helpers (models.py, real_models.py, oracle.py) import as top-level modules
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def float64_products(monkeypatch):
    """Least squares' per-batch products in float64, for tests of the normal equations' algebra or of what
    feeds them to 1e-9. Recovery's float32 products agree with these to about 1e-7-1e-6 on well-conditioned data
    (test_float32_products_fit_as_float64_ones_even_far_from_zero), far less at ridge 1e-6 on noiseless or
    rank-deficient toy problems, where these tests compare weights."""
    from onnxprune.recover.lstsq import NormalEquations

    monkeypatch.setattr(NormalEquations, "products", np.float64)
