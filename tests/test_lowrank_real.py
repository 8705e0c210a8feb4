"""Real-model tier for low-rank factorization: every public real model factorizes, checks and runs."""

import numpy as np
import pytest

import real_models as rm
from onnxprune import PruneConfig, prune
from onnxprune.baseline import prepare

pytestmark = pytest.mark.real


# With --rank auto each model gets an error bound loose enough that some of its layers qualify on
# weights alone (synthetic inputs: no data-aware factors), so the rewrite is exercised on every model.
SETTINGS = [dict(rank=0.5), dict(rank="auto", lowrank_error=0.3)]


@pytest.mark.parametrize("name", sorted(rm.REGISTRY))
def test_public_real_model_factorizes(name):
    baseline = prepare(rm.real_model(name), PruneConfig(input_shapes=rm.input_shapes(name)))  # loaded once
    for settings in SETTINGS:
        result = prune(baseline, PruneConfig(input_shapes=rm.input_shapes(name), **settings))
        report = result.report
        lowrank = report["lowrank"]
        # prune() ran onnx.checker (full_check) and onnxruntime on the factorized model
        assert lowrank["factorized"] >= 1 and len(result.plan.lowrank) == lowrank["factorized"], settings
        assert report["after"]["macs"] < report["before"]["macs"]
        assert report["after"]["params"] < report["before"]["params"]
        for layer in lowrank["layers"]:
            if layer["status"] == "factorized":
                assert layer["macs_after"] < layer["macs_before"] and layer["params_after"] < layer["params_before"]
            else:
                assert layer["reason"]
        assert all(np.isfinite(f["cosine"]) for f in report["fidelity"]["per_output"].values())
