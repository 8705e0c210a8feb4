"""Exact rewrites applied when a model is loaded (`loading.load`), so that everything after (analysis,
scoring, recovery, the result) sees the rewritten graph: op patterns onnxruntime leaves unfused made
faster, onnxruntime's own FusedConv spelled out as ONNX's ops (which it fuses again), and a packed Q/K/V
picked apart by a Gather made the Slice it amounts to (which the analysis can follow). One rule per
module, each with `NAME`, `TRIGGERS` (the ops a graph needs for it to match) and `apply(graph, shapes) -> int`
(how many times it rewrote; why a candidate was left is logged at debug level). The rewritten graph
computes the same outputs up to float rounding; the reference outputs and the "before" latency stay the
given model's, so validation measures any difference with the rest."""

from __future__ import annotations

import logging

import onnx
import onnx_graphsurgeon as gs

from ...io import export_graph, fold_constants, import_graph
from . import (affine_before_conv, affine_into_conv, computed_sizes, computed_slices, fused_conv, hard_swish, inferred_merge,
               packed_qkv)

log = logging.getLogger(__name__)

RULES = (fused_conv, affine_into_conv, hard_swish, affine_before_conv, computed_slices, computed_sizes,  # fused_conv first: it makes Convs
         packed_qkv, inferred_merge)  # computed_sizes before packed_qkv: it makes the packed split's size a constant;
# computed_slices before computed_sizes: its constant Slice bounds let a target's shape arithmetic be followed


def simplify(graph: gs.Graph, shapes: dict | None = None) -> dict[str, int]:
    """Apply every rule to `graph` in place; the count of each rule that rewrote something. `shapes`: the
    analysed shapes, for the rules that need them where ONNX's inference leaves a dim symbolic or unknown."""
    counts = {}
    for rule in RULES:
        count = rule.apply(graph, shapes)
        if count:
            counts[rule.NAME] = count
    if counts:
        graph.cleanup().toposort()
        log.info("simplified: %s", ", ".join(f"{n} {name}" for name, n in counts.items()))
    return counts


def simplify_model(model: onnx.ModelProto, shapes: dict | None = None) -> tuple[onnx.ModelProto, dict[str, int]]:
    """(`model` rewritten, counts per rule); `model` itself and {} when no rule applies (never changed).
    `shapes`: the analysed tensor shapes (onnxruntime's where inference stops), handed to the rules for the
    dims ONNX's shape inference leaves symbolic or unknown."""
    ops = {node.op_type for node in model.graph.node}
    if not any(rule.TRIGGERS <= ops for rule in RULES):  # no rule can match: no import, no shape inference
        return model, {}
    graph = import_graph(with_shapes(model))
    fold_constants(graph)  # constants an exporter computes (a bias reshaped) become constants the rules read
    counts = simplify(graph, shapes)
    if not counts:
        return model, {}
    rewritten = export_graph(graph)
    tensors = {name for node in rewritten.graph.node for name in node.output}
    del rewritten.graph.value_info[:]  # the inferred shapes were for the rules: keep only the model's own
    rewritten.graph.value_info.extend(v for v in model.graph.value_info if v.name in tensors)
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(rewritten, field, getattr(model, field))
    rewritten.metadata_props.extend(model.metadata_props)
    return rewritten, counts


def with_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with ONNX's inferred shapes and types (the rules match only where they are known); as it
    is when inference fails. The model's own value_info is left out of the inference (and kept in `model`):
    recorded at one size, it would make a dim that varies with the input look static to `computed_sizes`."""
    recorded = list(model.graph.value_info)
    del model.graph.value_info[:]
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception as exc:  # a contrib op or a broken shape: the rules that need shapes leave those parts
        log.debug("shape inference failed before the rewrites: %s", exc)
        return model
    finally:
        model.graph.value_info.extend(recorded)


def rewritten_model(model: onnx.ModelProto, shapes: dict | None = None) -> onnx.ModelProto:
    """`model` rewritten (what `io.ModelFile.rewrite` applies each time the file is read again, with the
    shapes it was first rewritten with)."""
    return simplify_model(model, shapes)[0]
