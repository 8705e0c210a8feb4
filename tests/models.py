"""Every test model, by name: ``all_builders()`` gathers the builders that live beside the tests of
their op family (``tests/ops/test_<family>.py``, each with a ``BUILDERS`` dict); the shared pieces
(``make_model``, the layer ``Builder``, ``random_input``, ``run``) are in ``tests/builders.py`` and
re-exported here. ``python tests/models.py`` builds every model, runs the full checker and one
onnxruntime inference for each, and prints a line per model.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a script: the repository root makes `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from tests.builders import (  # noqa: E402,F401  (re-exported for the tests and benches)
    CONV_INPUT, DEFAULT_OPSET, Builder, make_model, random_input, run, weights_as_constants, x_input,
)
import tests.ops  # noqa: E402
from tests.ops.test_conv import conv_chain, grouped, residual_downsample  # noqa: E402,F401  (used by name)
from tests.ops.test_elementwise import activation, residual  # noqa: E402,F401
from tests.ops.test_layout import blocked_graph_output, concat, slice_, split  # noqa: E402,F401
from tests.ops.test_linear import flatten_gemm, mlp  # noqa: E402,F401
from tests.ops.test_norm import conv_bn_relu, conv_bn_relu_constant_nodes, group_norm  # noqa: E402,F401

_Builder = Builder  # the name older tests use
# every tests/ops/test_<family>.py that has a BUILDERS dict
FAMILIES = tuple(module for module in (importlib.import_module(f"tests.ops.{info.name}")
                                       for info in pkgutil.iter_modules(tests.ops.__path__)
                                       if info.name.startswith("test_"))
                 if hasattr(module, "BUILDERS"))


def mixed_scale_head(nhwc: bool = False, scale: float = 300.0) -> onnx.ModelProto:
    """A detector-like head: one output concatenating 4 large-valued channels (a 1x1 conv of the input
    times `scale`, like box coordinates) with 18 small-valued ones (like class scores) behind the only
    prunable group (16 hidden channels), so pruning damages the small block alone. `nhwc`: the output
    transposed to [batch, H, W, 22]."""
    b = Builder(seed=3)
    big = b.node("Mul", "boxes", [b.conv("box_conv", "x", 3, 4, k=1), b.const("box_scale", scale)])
    hidden = b.relu("relu1", b.conv("conv1", "x", 3, 16))
    small = b.conv("cls_conv", hidden, 16, 18, k=1)
    head = b.node("Concat", "concat", [big, small], axis=1)
    if nhwc:
        head = b.node("Transpose", "nhwc", [head], perm=[0, 2, 3, 1])
    b.output(head)
    return b.model(x_input([1, 3, 8, 8]), [("y", [1, 8, 8, 22] if nhwc else [1, 22, 8, 8])])


def all_builders() -> dict[str, Callable[[], onnx.ModelProto]]:
    """Every test model, name -> zero-argument callable (op-argument builders expanded)."""
    return {name: build for family in FAMILIES for name, build in family.BUILDERS.items()}


def checker_rejected_builders() -> dict[str, Callable[[], onnx.ModelProto]]:
    """Models that onnxruntime runs but onnx's checker refuses (as real exporters still write them).

    ``group_norm_opset18``: GroupNormalization-18, which onnx now reports as deprecated.
    """
    return {"group_norm_opset18": lambda: group_norm(opset=18)}


def _self_check() -> int:
    failures = 0
    builders = all_builders()
    for name, build in builders.items():
        try:
            m = build()
            onnx.checker.check_model(m, full_check=True)
            outs = run(m, random_input(m))
            desc = ", ".join(f"{o.name}{[d.dim_value for d in o.type.tensor_type.shape.dim]}"
                             for o in m.graph.output)
            stats = " ".join(f"std={np.std(o):.3g}" for o in outs)
            bad = not all(np.isfinite(o).all() for o in outs)
            ops = sorted({n.op_type for n in m.graph.node})
            print(f"{'FAIL' if bad else 'ok  '} {name:32s} opset={m.opset_import[0].version} "
                  f"ir={m.ir_version} {desc} {stats}{' NON-FINITE' if bad else ''} {ops}")
            failures += bad
        except Exception as e:  # noqa: BLE001 - report every failure
            failures += 1
            print(f"FAIL {name:32s} {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    for name, build in checker_rejected_builders().items():
        try:
            m = build()
            try:
                onnx.checker.check_model(m, full_check=True)
                verdict = "checker now accepts it"
            except onnx.checker.ValidationError as e:
                verdict = "checker refuses (expected): " + str(e).splitlines()[0][:80]
            outs = run(m, random_input(m))
            bad = not all(np.isfinite(o).all() for o in outs)
            print(f"{'FAIL' if bad else 'ok  '} {name:32s} opset={m.opset_import[0].version} "
                  f"ir={m.ir_version} ORT ran it; {verdict}")
            failures += bad
        except Exception as e:  # noqa: BLE001
            failures += 1
            print(f"FAIL {name:32s} {type(e).__name__}: {str(e).splitlines()[0][:300]}")
        builders = {**builders, name: build}
    print(f"{len(builders) - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    import sys

    sys.exit(_self_check())
