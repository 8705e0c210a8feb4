"""Real-model tier: every public real model and every onnx light topology prunes, checks and runs."""

import numpy as np
import onnx
import pytest

import real_models as rm
from oracle import zero_dropped
from onnxprune import PruneConfig, prune

pytestmark = pytest.mark.real

LIGHT = rm.light_models()


def _prune_and_check(path, shapes, ratio):
    result = prune(path, PruneConfig(filters=ratio, input_shapes=shapes))
    report = result.report
    assert report["after"]["macs"] < report["before"]["macs"], report["groups"]
    assert report["after"]["params"] < report["before"]["params"]
    # prune() ran onnx.checker (full_check) and onnxruntime on the result; fidelity is finite
    assert np.isfinite(report["fidelity"]["cosine"])
    return result


@pytest.mark.parametrize("ratio", [0.3, 0.5])
@pytest.mark.parametrize("name", sorted(rm.REGISTRY))
def test_public_real_model(name, ratio):
    _prune_and_check(rm.real_model(name), rm.input_shapes(name), ratio)


@pytest.mark.parametrize("name", sorted(rm.REGISTRY))
def test_public_real_model_rewrite_is_exact(name):
    """The exactness oracle on real graphs: dead channels removed, outputs unchanged."""
    shapes = rm.input_shapes(name)
    zeroed, plan = zero_dropped(str(rm.real_model(name)), input_shapes=shapes)
    report = prune(zeroed, PruneConfig(plan=plan, input_shapes=shapes)).report
    assert report["after"]["macs"] < report["before"]["macs"]
    for output, fid in report["fidelity"]["per_output"].items():
        if output in STATE_OUTPUTS.get(name, ()):
            continue  # zeros at the removed units by design (tests/ops/test_recurrent.py checks the kept ones)
        assert fid["rel_l2"] < 1e-4, (output, fid)


STATE_OUTPUTS = {"silero_vad": ("hn", "cn")}  # an LSTM's final state, widened back to its full width


@pytest.mark.parametrize("ratio", [0.3, 0.5])
@pytest.mark.parametrize("name", sorted(LIGHT))
def test_onnx_light_topology(name, ratio):
    _prune_and_check(LIGHT[name], {}, ratio)


def _with_random_weights(path):
    """The light models' weights are all 0.02, which would hide a wrong slice: randomise them."""
    from onnx import numpy_helper

    from onnxprune.io import normalize_model

    model = normalize_model(onnx.load(str(path)))
    rng = np.random.default_rng(0)
    for tensor in model.graph.initializer:
        values = numpy_helper.to_array(tensor)
        if values.dtype == np.float32 and values.ndim >= 2:
            scale = 1 / np.sqrt(np.prod(values.shape[1:]))
            tensor.CopyFrom(numpy_helper.from_array((rng.standard_normal(values.shape) * scale).astype(np.float32), tensor.name))
    return model


@pytest.mark.parametrize("name", ["densenet121", "inception_v2", "resnet50", "shufflenet", "squeezenet"])
def test_onnx_light_topology_rewrite_is_exact(name):
    zeroed, plan = zero_dropped(_with_random_weights(LIGHT[name]))
    report = prune(zeroed, PruneConfig(plan=plan)).report
    assert report["after"]["macs"] < 0.6 * report["before"]["macs"]
    assert report["fidelity"]["rel_l2"] < 1e-5
