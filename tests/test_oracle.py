"""The exactness oracle itself: it can fail. (Each op family's exactness cases are in tests/ops/.)"""

import numpy as np

import models
from oracle import zero_dropped
from onnxprune import PruneConfig, prune


def test_oracle_detects_a_wrong_slice():
    """The oracle can fail: pruning channels that do contribute changes the outputs."""
    model = models.residual()
    _, plan = zero_dropped(model)
    result = prune(model, PruneConfig(plan=plan))
    feed = models.random_input(model)
    assert not np.allclose(models.run(model, feed)[0], models.run(result.model, feed)[0], atol=1e-3)


def test_every_test_model_belongs_to_one_op_family():
    names = [name for family in models.FAMILIES for name in family.BUILDERS]
    assert len(names) == len(set(names)) == len(models.all_builders())
