"""Loading, normalising and saving ONNX models.

`load_model` returns a model that the rest of the pipeline can rely on: opset >= 11, weights held in
initializers (``Constant`` and constant ``ConstantOfShape`` nodes folded), external data loaded.
`infer_shapes` gives static shapes for analysis without serialising the weights, so it works on
models over 2 GB. `save_model` writes atomically, with external data when the model is large.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper, version_converter

from .errors import ModelError, UsageError

log = logging.getLogger(__name__)

MIN_OPSET = 11
CONVERT_TO_OPSET = 13
# Protobuf cannot serialise a message of 2 GB or more; stay well below it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# Initializers at most this many elements keep their data in the shape-inference skeleton
# (shape constants for Reshape, Split sizes, ...); bigger ones are only their dims.
SKELETON_KEEP_ELEMENTS = 64
FOLD_MAX_ELEMENTS = 1 << 30  # a larger ConstantOfShape is no weight (VGG-19's largest is 1e8 elements)


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX file (with its external data) and normalise it, or raise ModelError."""
    return load_model_file(path)[0]


def load_model_file(path: str | os.PathLike) -> tuple[onnx.ModelProto, int, ModelFile]:
    """`load_model`, the bytes the model takes on disk (the file and its external data), and the file
    as a `ModelFile` (what capture passes can read instead of the proto, so that it can be freed)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"input model '{path}' does not exist: check the path")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and others
        raise ModelError(
            f"'{path}' is not a readable ONNX model ({type(exc).__name__}): "
            "check that the file is a complete .onnx export"
        ) from None
    if not model.graph.node:
        raise ModelError(f"'{path}' holds no graph nodes: it is empty, truncated or not an ONNX model")
    size = file_size(path, model)
    external = bool(_external_tensors(model))
    _load_external_data(model, path.parent)
    model, changed = _normalize(model)  # nobody else holds this proto: no need to copy it
    outputs = tuple(o.name for o in model.graph.output)
    return model, size, ModelFile(path, outputs, verbatim=not changed and not external)


@dataclass(frozen=True)
class ModelFile:
    """A model file to re-read instead of holding its parsed proto. `verbatim`: the file parses to the
    normalised model and holds all its weights (no external data), so onnxruntime can read a copy of it
    as it is; otherwise the model is parsed and normalised again (`load`)."""

    path: Path
    outputs: tuple[str, ...] = ()  # the graph's outputs
    verbatim: bool = False

    def load(self) -> onnx.ModelProto:
        return load_model(self.path)


def _load_external_data(model: onnx.ModelProto, base_dir: Path) -> None:
    for tensor in _external_tensors(model):
        location = _location(tensor)
        if not (base_dir / location).is_file():
            raise ModelError(
                f"external data file '{location}' of tensor '{tensor.name}' is missing next to the "
                f"model in '{base_dir}': copy it beside the .onnx file"
            )
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(base_dir))
    except Exception as exc:
        raise ModelError(f"could not read the model's external data ({exc}): the data file is truncated or corrupt") from None


def _external_tensors(model: onnx.ModelProto):
    return [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]


def opset_version(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise ModelError("the model imports no default ONNX opset: it is not a standard ONNX model")


def normalize_model(model: onnx.ModelProto, copy: bool = True) -> onnx.ModelProto:
    """Return a model with opset >= 11 and constant weights as initializers (a copy unless told)."""
    if copy:
        model = _copy(model)
    return _normalize(model)[0]


def _normalize(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """Normalise `model` in place (an old opset is converted into a new proto); (model, whether it changed)."""
    before = model.ir_version
    changed = opset_version(model) < MIN_OPSET
    if changed:
        old = opset_version(model)
        try:
            model = version_converter.convert_version(model, CONVERT_TO_OPSET)
        except Exception as exc:
            raise ModelError(
                f"the model uses opset {old}; converting it to opset {CONVERT_TO_OPSET} failed ({exc}): "
                "re-export it with opset 11 or newer"
            ) from None
        log.info("converted the model from opset %d to %d", old, CONVERT_TO_OPSET)
    changed |= fold_constant_nodes(model.graph) > 0
    changed |= _weights_are_not_inputs(model)
    return model, changed or model.ir_version != before


def _weights_are_not_inputs(model: onnx.ModelProto) -> bool:
    """Old exports (IR < 4) list every initializer as a graph input too; pruning treats weights as
    constants, so drop them from the inputs and raise the IR version to one that allows that."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    dropped = len(inputs) != len(model.graph.input)
    if dropped:
        del model.graph.input[:]
        model.graph.input.extend(inputs)
    model.ir_version = max(model.ir_version, onnx.helper.find_min_ir_version_for(model.opset_import, ignore_unknown=True))
    return dropped


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def fold_constant_nodes(graph: onnx.GraphProto) -> int:
    """Turn Constant nodes, and ConstantOfShape nodes with a constant shape, into initializers."""
    known = {t.name: t for t in graph.initializer}
    kept, folded = [], 0
    for node in graph.node:
        tensor = None
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            tensor = _constant_node_value(node)
        elif node.op_type == "ConstantOfShape" and node.input and node.input[0] in known:
            shape = numpy_helper.to_array(known[node.input[0]]).astype(np.int64)
            fill = np.zeros(1, dtype=np.float32)
            for attr in node.attribute:
                if attr.name == "value":
                    fill = numpy_helper.to_array(attr.t)
            if _foldable(shape, fill):
                tensor = numpy_helper.from_array(np.full(tuple(shape), fill.reshape(-1)[0], dtype=fill.dtype))
        if tensor is None:
            kept.append(node)
            continue
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
        known[tensor.name] = tensor
        folded += 1
    if folded:
        del graph.node[:]
        graph.node.extend(kept)
        log.info("folded %d constant nodes into initializers", folded)
    return folded


def _foldable(shape: np.ndarray, fill: np.ndarray) -> bool:
    """Whether a ConstantOfShape of this shape and fill value is worth an initializer; a broken or hostile
    one (negative dims, terabytes) stays a node, for `vetting` to judge with the other tensors."""
    return shape.ndim == 1 and fill.size == 1 and shape.min(initial=0) >= 0 and \
        np.prod(shape, dtype=np.float64) <= FOLD_MAX_ELEMENTS


def _constant_node_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    for attr in node.attribute:
        if attr.name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(attr.t)
            return tensor
        if attr.name in ("value_float", "value_int"):
            dtype = np.float32 if attr.name == "value_float" else np.int64
            return numpy_helper.from_array(np.array(attr.f if attr.name == "value_float" else attr.i, dtype=dtype))
        if attr.name in ("value_floats", "value_ints"):
            dtype = np.float32 if attr.name == "value_floats" else np.int64
            values = attr.floats if attr.name == "value_floats" else attr.ints
            return numpy_helper.from_array(np.array(list(values), dtype=dtype))
    return None  # sparse or string constants stay as nodes


# ---------------------------------------------------------------- inputs and shapes


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The inputs a caller feeds (old exports also list initializers as inputs)."""
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def parse_input_shape(text: str) -> tuple[str, list[int]]:
    """Parse ``NAME:1x3x224x224`` (the name may itself contain ':')."""
    name, sep, dims = text.rpartition(":")
    try:
        shape = [int(d) for d in dims.lower().split("x")]
    except ValueError:
        shape = []
    if not sep or not name or not shape or min(shape) < 1:
        raise UsageError(f"--input-shape '{text}' is not NAME:DIMS with positive dims, e.g. input:1x3x224x224")
    return name, shape


def resolve_input_shapes(model: onnx.ModelProto, overrides: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    """Static shapes for every graph input: overrides first, a dynamic batch dim becomes 1."""
    overrides = dict(overrides or {})
    inputs = graph_inputs(model)
    unknown = set(overrides) - {i.name for i in inputs}
    if unknown:
        names = ", ".join(i.name for i in inputs)
        raise UsageError(f"--input-shape names unknown input(s) {sorted(unknown)}: the model's inputs are {names}")
    shapes = {}
    for value in inputs:
        dims = value.type.tensor_type.shape.dim
        if value.name in overrides:
            shape = overrides[value.name]
            if dims and len(shape) != len(dims):
                raise UsageError(f"--input-shape for '{value.name}' has rank {len(shape)}, the model's input has rank {len(dims)}")
            shapes[value.name] = shape
            continue
        shape = []
        for axis, dim in enumerate(dims):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                shape.append(dim.dim_value)
            elif axis == 0:
                shape.append(1)  # dynamic batch: analyse at batch 1
            else:
                label = dim.dim_param or "?"
                example = "x".join(str(d.dim_value) if d.dim_value > 0 else "N" for d in dims)
                raise UsageError(
                    f"input '{value.name}' has a dynamic dimension {axis} ('{label}'): give its size with "
                    f"--input-shape {value.name}:{example.replace('N', '1', 1)}"
                )
        shapes[value.name] = shape
    return shapes


def skeleton(model: onnx.ModelProto, input_shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """A weightless copy of the model with fixed input shapes, for fast shape inference."""
    graph = model.graph
    out = onnx.ModelProto()
    out.ir_version = model.ir_version
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    g = out.graph
    g.name = graph.name
    g.node.extend(graph.node)
    g.output.extend(graph.output)
    for value in graph.input:
        fixed = g.input.add()
        fixed.CopyFrom(value)
        if value.name in input_shapes:
            fixed.type.tensor_type.shape.Clear()
            for d in input_shapes[value.name]:
                fixed.type.tensor_type.shape.dim.add().dim_value = d
    for tensor in graph.initializer:
        if int(np.prod(tensor.dims, dtype=np.int64)) <= SKELETON_KEEP_ELEMENTS:
            g.initializer.append(tensor)
            continue
        stub = g.initializer.add()
        stub.name, stub.data_type = tensor.name, tensor.data_type
        stub.dims.extend(tensor.dims)
        stub.data_location = onnx.TensorProto.EXTERNAL
        entry = stub.external_data.add()
        entry.key, entry.value = "location", "weights-not-loaded"
    return out


# ---------------------------------------------------------------- saving


def model_size_bytes(model: onnx.ModelProto) -> int:
    """Serialized size; protobuf refuses to size a message over 2 GB, so then sum the tensors."""
    try:
        return model.ByteSize()
    except Exception:  # google.protobuf.message.EncodeError
        return sum(t.ByteSize() for t in [*model.graph.initializer, *model.graph.sparse_initializer])


def check_output_path(out: str | os.PathLike, inp: str | os.PathLike | None = None) -> None:
    """Refuse OUT == IN and unwritable destinations before any work is done."""
    out = Path(out)
    if inp is not None and Path(inp).exists() and out.exists() and os.path.samefile(inp, out):
        raise UsageError(f"output '{out}' is the input model: choose another output path, the input is never overwritten")
    if inp is not None and out.resolve() == Path(inp).resolve():
        raise UsageError(f"output '{out}' is the input model: choose another output path, the input is never overwritten")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise UsageError(f"cannot write '{out}': directory '{parent}' does not exist")
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise UsageError(f"cannot write '{out}': permission denied, choose a writable output path")
    if out.is_dir():
        raise UsageError(f"cannot write '{out}': it is a directory, give a file name such as {out / 'model.onnx'}")


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> list[Path]:
    """Write the model atomically; models too big for one protobuf get a '<name>.data' file beside them.

    Returns the files written. Nothing is left behind if writing fails.
    """
    path = Path(path)
    staging = Path(tempfile.mkdtemp(prefix=".onnxprune-", dir=path.resolve().parent))
    try:
        staged = write_model(model, staging / path.name)
        written = []
        for file in staged:
            target = path.parent / file.name
            os.replace(file, target)
            written.append(target)
        return written
    except OSError as exc:
        raise UsageError(f"cannot write '{path}' ({exc.strerror or exc}): free space or choose another output path") from None
    finally:
        for leftover in staging.iterdir():
            leftover.unlink()
        staging.rmdir()


def write_model(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Write `model` to `path` (not atomically); returns the files written."""
    if model_size_bytes(model) < EXTERNAL_DATA_THRESHOLD:
        path.write_bytes(model.SerializeToString())
        return [path]
    data_name = path.name + ".data"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    # save_model converted the tensors of `model` to external references; load them back so the caller's
    # model stays usable.
    onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    return [p for p in (path, path.parent / data_name) if p.exists()]  # tiny tensors stay inline


def file_size(path: str | os.PathLike, model: onnx.ModelProto | None = None) -> int:
    """Size of a model file plus the external-data files it references (read from `model`, the
    file's proto as loaded without external data, when given, so the file is not parsed again)."""
    path = Path(path)
    if model is None:
        model = onnx.load(str(path), load_external_data=False)
    total = path.stat().st_size
    for location in {_location(t) for t in _external_tensors(model)}:
        if (path.parent / location).is_file():
            total += (path.parent / location).stat().st_size
    return total


def _location(tensor: onnx.TensorProto) -> str:
    return next((e.value for e in tensor.external_data if e.key == "location"), "")
