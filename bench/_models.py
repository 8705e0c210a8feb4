"""Models for the scoring benchmarks: onnx's light ResNet-50 topology with seeded random weights."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxprune.io import normalize_model  # noqa: E402
from tests.real_models import light_models  # noqa: E402


def random_resnet50(seed: int = 0, batch: str | int = "N") -> onnx.ModelProto:
    """light_resnet50 (real topology, weights stripped) with He-initialised conv/fc weights, BatchNorm
    statistics that keep activations O(1), and a dynamic batch axis (`batch`)."""
    model = normalize_model(onnx.load(str(light_models()["resnet50"])))
    rng = np.random.default_rng(seed)
    consumers = {}
    for node in model.graph.node:
        for position, name in enumerate(node.input):
            consumers[name] = (node.op_type, position)
    for init in model.graph.initializer:
        op, position = consumers.get(init.name, (None, None))
        shape = tuple(init.dims)
        if op in ("Conv", "Gemm") and position == 1:
            fan_in = int(np.prod(shape[1:])) if op == "Conv" else shape[1]
            values = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        elif op == "BatchNormalization":
            values = {1: 1.0 + 0.1 * rng.standard_normal(shape), 2: 0.1 * rng.standard_normal(shape),
                      3: np.zeros(shape), 4: np.ones(shape)}.get(position, rng.standard_normal(shape))
        elif op == "Reshape":
            values = numpy_helper.to_array(init).copy()
            values[0] = -1
        elif init.data_type == onnx.TensorProto.FLOAT:
            values = 0.01 * rng.standard_normal(shape)
        else:
            continue
        dtype = numpy_helper.to_array(init).dtype
        init.CopyFrom(numpy_helper.from_array(np.asarray(values).astype(dtype), init.name))
    for value in list(model.graph.input) + list(model.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        if isinstance(batch, str):
            dim.dim_param = batch
        else:
            dim.dim_value = batch
    return model
