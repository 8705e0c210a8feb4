"""Loading, normalising and saving ONNX models.

`load_model` returns a model that the rest of the pipeline can rely on: opset >= 11, weights held in
initializers (``Constant`` and constant ``ConstantOfShape`` nodes folded). External data is never read
into the proto: each external initializer is *mapped* (its location made the data file's absolute path)
and read through a memory map (`tensor_array`), so a model's weights take no memory of ours until used
and a tensor over protobuf's 2 GB works. `write_model` writes mapped tensors, and every other large one,
tensor by tensor to the output's data file.
`infer_shapes` gives static shapes for analysis without serialising the weights, so it works on
models over 2 GB. `save_model` writes atomically, with external data when the model is large.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper, version_converter

from .errors import ModelError, UsageError, first_line
from .workdir import publish, staging_path

FOLD_LIMIT_BYTES = 256 << 20  # constants computed from constants are folded up to this size
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
    _map_external_data(model, path.parent)
    model, changed = _normalize(model)  # nobody else holds this proto: no need to copy it
    outputs = tuple(o.name for o in model.graph.output)
    return model, size, ModelFile(path, outputs, verbatim=not changed and not external)


@dataclass(frozen=True)
class ModelFile:
    """A model file to re-read instead of holding its parsed proto. `verbatim`: the file parses to the
    normalised model and holds all its weights (no external data), so onnxruntime can read a copy of it
    as it is; otherwise the model is parsed and normalised again, then given to `rewrite` (`load`)."""

    path: Path
    outputs: tuple[str, ...] = ()  # the graph's outputs
    verbatim: bool = False
    rewrite: Callable[[onnx.ModelProto], onnx.ModelProto] | None = None  # applied after normalising

    def load(self) -> onnx.ModelProto:
        model = load_model(self.path)
        return self.rewrite(model) if self.rewrite is not None else model


def _map_external_data(model: onnx.ModelProto, base_dir: Path) -> None:
    """Map every external initializer (see the module docstring) after checking that its file holds its
    bytes; external tensors elsewhere (node attributes, subgraphs) are few and small: loaded. Every
    external tensor's location is checked first, while none is mapped (absolute) yet."""
    helpers = onnx.external_data_helper
    for tensor in helpers._get_all_tensors(model):
        if helpers.uses_external_data(tensor):
            _check_location(tensor, base_dir)
    for tensor in _external_tensors(model):
        location = _location(tensor)
        file = (base_dir / location).resolve()
        fields = _external_fields(tensor)
        offset, length = _whole_number(fields.get("offset", "0")), _tensor_nbytes(tensor)
        if offset is None or "length" in fields and _whole_number(fields["length"]) is None:
            raise ModelError(f"the external data of tensor '{tensor.name}' has an offset or length that is "
                             "negative or not a number: the model file is corrupt or was edited; re-export it")
        if "length" in fields and int(fields["length"]) != length or offset + length > file.stat().st_size:
            raise ModelError(f"could not read the model's external data (tensor '{tensor.name}' lies outside "
                             f"'{location}' or has the wrong length): the data file is truncated or corrupt; "
                             "copy the complete data file beside the model or re-export it")
        del tensor.external_data[:]
        for key, value in (("location", str(file)), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    try:
        for tensor in helpers._get_all_tensors(model):  # what is not mapped
            if helpers.uses_external_data(tensor) and not mapped(tensor):
                helpers.load_external_data_for_tensor(tensor, str(base_dir))
    except Exception as exc:
        raise ModelError(f"could not read the model's external data ({exc}): the data file is truncated or corrupt") from None


def _whole_number(text: str) -> int | None:
    """`text` as a non-negative integer (an external-data offset or length), or None."""
    return int(text) if text.isascii() and text.isdigit() else None


def _check_location(tensor: onnx.TensorProto, base_dir: Path) -> None:
    """Refuse, saying why, an external-data path that onnx will not read: ONNX reads tensor data only from
    a regular file inside the model's folder, named by a relative path."""
    location = _location(tensor)
    where = f"external data of tensor '{tensor.name}' is at '{location}'"
    fix = ("ONNX reads tensor data only from files inside the model's folder: move the data file there and save "
           "the model again with a relative location")
    if Path(location).is_absolute():
        raise ModelError(f"{where}, an absolute path: {fix}")
    path = base_dir / location
    if not path.resolve().is_relative_to(base_dir.resolve()):
        raise ModelError(f"{where}, outside the model's folder '{base_dir}': {fix}")
    if path.is_symlink():
        raise ModelError(f"{where}, a symbolic link: onnx reads only regular files; copy the data file itself beside the model")
    if not path.exists():
        raise ModelError(
            f"external data file '{location}' of tensor '{tensor.name}' is missing next to the "
            f"model in '{base_dir}': copy it beside the .onnx file"
        )
    if not path.is_file():
        raise ModelError(f"{where}, not a regular file: put the data file itself there")


def mapped(tensor: onnx.TensorProto) -> bool:
    """Whether `tensor` is a mapped initializer: its bytes in a file named by absolute path."""
    return tensor.data_location == onnx.TensorProto.EXTERNAL and os.path.isabs(_location(tensor))


def tensor_array(tensor: onnx.TensorProto) -> np.ndarray:
    """The values of an initializer; of a mapped one, a read-only memory map of its bytes in the file."""
    if not mapped(tensor):
        return numpy_helper.to_array(tensor)
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    shape = tuple(tensor.dims)
    if not _tensor_nbytes(tensor):
        return np.zeros(shape, dtype=dtype)
    return np.memmap(_location(tensor), dtype=dtype, mode="r", offset=int(_external_fields(tensor).get("offset", 0)),
                     shape=shape)


def inlined(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with its mapped tensors' bytes held in the proto (a copy; `model` itself when none is
    mapped): for a process that may not have the data file, such as a Ray worker on another machine."""
    if not any(mapped(t) for t in model.graph.initializer):
        return model
    return _with_initializers(model, [_inline(t) if mapped(t) else t for t in model.graph.initializer])


def _inline(tensor: onnx.TensorProto) -> onnx.TensorProto:
    whole = onnx.TensorProto()
    whole.CopyFrom(tensor)
    whole.ClearField("external_data")
    whole.ClearField("data_location")
    whole.raw_data = np.ascontiguousarray(tensor_array(tensor)).tobytes()
    return whole


def _external_fields(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def _tensor_nbytes(tensor: onnx.TensorProto) -> int:
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return itemsize * int(np.prod(tensor.dims, dtype=np.int64))


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
    changed |= _name_nodes(model.graph) > 0
    return model, changed or model.ir_version != before


def _name_nodes(graph: onnx.GraphProto) -> int:
    """Give each nameless node its first output's name (made unique): groups, plans, reports and --exclude
    name nodes, and nameless ones could not be told apart. How many were named."""
    taken = {node.name for node in graph.node if node.name}
    named = 0
    for node in graph.node:
        if node.name or not node.output:
            continue
        name, suffix = node.output[0] or node.op_type, 1
        while name in taken:
            name, suffix = f"{node.output[0] or node.op_type}_{suffix}", suffix + 1
        node.name = name
        taken.add(name)
        named += 1
    return named


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
            shape = tensor_array(known[node.input[0]]).astype(np.int64)
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
    return fill.size == 1 and _small_enough(shape)


def _small_enough(shape: np.ndarray) -> bool:
    """Whether a tensor of this shape (a 1-D array of dims) may be made as an initializer."""
    return shape.ndim == 1 and shape.min(initial=0) >= 0 and np.prod(shape, dtype=np.float64) <= FOLD_MAX_ELEMENTS


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
        if attr.name == "sparse_value" and _small_enough(np.array(attr.sparse_tensor.dims, np.int64)):
            return dense_tensor(attr.sparse_tensor)
    return None  # string constants stay as nodes


def dense_tensor(sparse: onnx.SparseTensorProto) -> onnx.TensorProto:
    """The dense form of a sparse tensor (indices linear [NNZ] or coordinates [NNZ, rank], any int type)."""
    values, indices = numpy_helper.to_array(sparse.values), numpy_helper.to_array(sparse.indices).astype(np.int64)
    dense = np.zeros(tuple(sparse.dims), dtype=values.dtype)
    try:
        if indices.size and indices.min() < 0:
            raise IndexError("negative index")
        if indices.ndim == 1:
            dense.reshape(-1)[indices] = values
        else:
            dense[tuple(indices.T)] = values
    except (IndexError, ValueError):
        raise ModelError(f"sparse constant '{sparse.values.name}': its {indices.shape[0]} indices do not fit its "
                         f"dims {list(sparse.dims)} or its values: the file is corrupt; re-export it") from None
    return numpy_helper.from_array(dense, sparse.values.name)


# ---------------------------------------------------------------- graphsurgeon graphs of mapped models


class MappedValues(gs.ir.tensor.LazyValues):
    """The lazy values of a mapped initializer: loaded as a read-only memory map of its file."""

    def load(self):
        values = tensor_array(self.tensor)
        if isinstance(values, np.memmap):
            values.mapped_from = self.tensor  # what `export_graph` writes back while the map is unchanged
        return values


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """`gs.import_onnx`, mapped initializers read through memory maps when their values are asked for."""
    graph = gs.import_onnx(model)
    for tensor in graph.tensors().values():
        lazy = tensor._values if isinstance(tensor, gs.Constant) else None
        if isinstance(lazy, gs.ir.tensor.LazyValues) and mapped(lazy.tensor):
            tensor._values = MappedValues(lazy.tensor)
            tensor.data_location = None  # else graphsurgeon marks the values that replace the map as external
    return graph


def unload_maps(graph: gs.Graph) -> None:
    """Constants whose values are still their memory map go back to lazy values: the map is closed and
    the pages read through it no longer count as our memory (a rewrite maps one tensor at a time)."""
    for tensor in graph.tensors().values():
        source = getattr(tensor._values, "mapped_from", None) if isinstance(tensor, gs.Constant) else None
        if source is not None:
            tensor._values = MappedValues(source)


def fold_constants(graph: gs.Graph) -> None:
    """Evaluate subgraphs that depend only on constants (weights reshaped, transposed or cast by the
    exporter) so that handlers and ops/rules see constant weights. Shapes are not folded: dynamic dims stay dynamic.
    An Identity of a constant is bypassed first: its readers read the constant itself, which stays one tensor
    (torch's exporter shares a weight of identical layers that way; folding would store it once per Identity)."""
    _bypass_constant_identities(graph)
    if not any(node.inputs and all(isinstance(t, gs.Constant) for t in node.inputs) for node in graph.nodes):
        return  # nothing computes from constants alone
    loaded = _load_mapped_fold_inputs(graph)
    try:
        graph.fold_constants(fold_shapes=False, error_ok=False, size_threshold=FOLD_LIMIT_BYTES).cleanup()
    except Exception as exc:  # folding is an optimisation of the analysis, never a requirement
        log.info("constant folding skipped: %s", first_line(exc))
    for constant, lazy in loaded:  # mapped again: their pages need not stay our memory
        constant._values = lazy


def _load_mapped_fold_inputs(graph: gs.Graph) -> list[tuple[gs.Constant, gs.ir.tensor.LazyValues]]:
    """graphsurgeon folds by running onnxruntime on the part of the graph computed from constants alone, and
    onnxruntime refuses a mapped tensor there (its location is absolute): every model with external data had
    its folding skipped. The mapped constants that part reads are read into memory for the fold; returns
    them with their lazy values, to map them again after it."""
    loaded = []
    foldable = {name for name, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    changed = True
    while changed:  # the nodes in any order: until no more tensors are found computable from constants
        changed = False
        for node in graph.nodes:
            if node.outputs[0].name in foldable or not all(t.name in foldable for t in node.inputs if t.name):
                continue
            foldable.update(t.name for t in node.outputs)
            changed = True
            for t in node.inputs:
                lazy = t._values if isinstance(t, gs.Constant) else None
                if isinstance(lazy, gs.ir.tensor.LazyValues) and mapped(lazy.tensor):
                    t.values = np.array(tensor_array(lazy.tensor))
                    loaded.append((t, lazy))
    return loaded


def _bypass_constant_identities(graph: gs.Graph) -> None:
    outputs = {t.name for t in graph.outputs}
    bypassed = False
    for node in graph.nodes:
        if node.op != "Identity" or len(node.inputs) != 1 or not isinstance(node.inputs[0], gs.Constant):
            continue
        constant, result = node.inputs[0], node.outputs[0]
        if result.name in outputs:
            continue
        for reader in list(result.outputs):
            for i, tensor in enumerate(reader.inputs):
                if tensor is result:
                    reader.inputs[i] = constant
                    bypassed = True
    if bypassed:
        graph.cleanup()


def transposed_copies(graph: gs.Graph) -> list[tuple[gs.Constant, gs.Constant]]:
    """(copy, source) for every 2-D float constant read in the graph that equals another one transposed: a
    weight tied through a Transpose (a language model's output layer reading its embedding table) is stored
    twice once the Transpose is folded, by `fold_constants` or by the exporter. The source is the one met
    first. Candidates are found by their 4x4 corner (one dict lookup each, not a comparison per pair)."""
    matrices = [t for t in graph.tensors().values()  # the shape first: other constants are not loaded here
                if isinstance(t, gs.Constant) and t.outputs and len(t.shape) == 2 and min(t.shape) > 1
                and isinstance(t.values, np.ndarray) and t.values.dtype.kind == "f"]
    by_corner: dict[tuple, list[gs.Constant]] = {}
    for t in matrices:
        by_corner.setdefault(_corner(t.values), []).append(t)
    pairs, paired = [], set()
    for source in matrices:
        if id(source) in paired:
            continue
        for copy in by_corner.get(_corner(source.values.T), []):
            if copy is not source and id(copy) not in paired and _transposed(copy.values, source.values):
                pairs.append((copy, source))
                paired.update((id(copy), id(source)))
    return pairs


def _corner(matrix: np.ndarray) -> tuple:
    return matrix.shape, matrix.dtype.str, np.ascontiguousarray(matrix[:4, :4]).tobytes()


def _transposed(a: np.ndarray, b: np.ndarray) -> bool:
    """a == b^T, and neither a symmetric matrix nor one of a single value (an identity, zeros: layers can
    start so), which unrelated weights share without being tied."""
    if a.dtype != b.dtype or not np.array_equal(a, b.T) or not (a != a.flat[0]).any():
        return False
    return not (a.shape[0] == a.shape[1] and np.array_equal(a, a.T))


def export_graph(graph: gs.Graph) -> onnx.ModelProto:
    """`gs.export_onnx`, a mapped initializer whose values are still its memory map written as the same
    mapped tensor (a reference to the file, not a copy of its bytes)."""
    unload_maps(graph)
    return gs.export_onnx(graph)


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
    """Size serialized with every weight inline (a mapped tensor counted as if its bytes were in the proto,
    so the size does not depend on where its data file is). Computed from the tensors' sizes (protobuf
    sizes a message by serializing it: a transient copy of every weight, and an error over 2 GB): the
    model without initializers is sized, then each tensor added as a field of the graph."""
    shell = _with_initializers(model, [])
    graph = shell.graph.ByteSize()
    tensors = graph + sum(_field_bytes(_serialized_bytes(t)) for t in model.graph.initializer)
    return shell.ByteSize() - _field_bytes(graph) + _field_bytes(tensors)


PACKED_4BIT = {getattr(onnx.TensorProto, name) for name in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, name)}


def _serialized_bytes(tensor: onnx.TensorProto) -> int:
    """A tensor's serialized size; with raw data, from its dims (the data is not copied to size it); a
    mapped one as if its bytes were raw data."""
    if not mapped(tensor) and (not tensor.HasField("raw_data") or _tensor_nbytes(tensor) < EXTERNAL_MIN_BYTES):
        return tensor.ByteSize()
    shell = onnx.TensorProto()
    for field in tensor.DESCRIPTOR.fields:  # not ListFields: it would copy raw_data out
        value = getattr(tensor, field.name) if field.name not in ("raw_data", "external_data", "data_location") else None
        if value is not None and (len(value) if field.is_repeated else tensor.HasField(field.name)):
            _copy_field(shell, field, value)
    count = int(np.prod(tensor.dims, dtype=np.int64))
    raw = (count + 1) // 2 if tensor.data_type in PACKED_4BIT else _tensor_nbytes(tensor)
    return shell.ByteSize() + _field_bytes(raw)


def _field_bytes(length: int) -> int:
    """A length-delimited field of `length` bytes whose tag takes one byte (field numbers under 16)."""
    return 1 + max(1, (length.bit_length() + 6) // 7) + length


def check_output_path(out: str | os.PathLike, inp: str | os.PathLike | None = None) -> None:
    """Refuse OUT == IN and unwritable destinations before any work is done."""
    out = Path(out)
    if inp is not None and Path(inp).exists() and out.exists() and os.path.samefile(inp, out):
        raise UsageError(f"output '{out}' is the input model: choose another output path, the input is never overwritten")
    if inp is not None and out.resolve() == Path(inp).resolve():
        raise UsageError(f"output '{out}' is the input model: choose another output path, the input is never overwritten")
    if inp is not None and Path(inp).is_file() and out.resolve().parent == Path(inp).resolve().parent:
        taken = _data_files(inp)
        for target in (out, out.parent / (out.name + ".data")):  # what `write_model` may write
            if target.resolve() in taken:
                raise UsageError(f"output '{out}' would overwrite '{target.name}', the input model's external data: "
                                 "choose another output name or folder, the input is never overwritten")
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
    staging = staging_path(path.resolve().parent)
    try:
        staging.mkdir()
        staged = write_model(model, staging / path.name, copy_mapped=True)  # the model file first
        written = [path.parent / file.name for file in staged]
        stale = [file for file in _data_files_of(path) if file not in written]
        publish(list(zip(staged, written))[::-1])
        for file in stale:  # the replaced output's weights, which the new output does not read
            file.unlink(missing_ok=True)
        return written
    except OSError as exc:
        raise UsageError(f"cannot write '{path}' ({exc.strerror or exc}): free space or choose another output path") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _data_files_of(path: Path) -> list[Path]:
    """'<name>.data' beside `path` when the model file there (if any) reads it: the file `save_model`
    writes a large output's weights to."""
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 -- no file, or not a model: nothing of ours to replace
        return []
    data = f"{path.name}.data"
    return [path.parent / data] if any(_location(t) == data for t in _external_tensors(model)) else []


def serializable(model: onnx.ModelProto) -> bool:
    """Whether `model` is whole as one protobuf message: no mapped tensors, and under protobuf's limit."""
    return not any(mapped(t) for t in model.graph.initializer) and model_size_bytes(model) < EXTERNAL_DATA_THRESHOLD


def write_model(model: onnx.ModelProto, path: Path, copy_mapped: bool = False,
                external_above: int = EXTERNAL_DATA_THRESHOLD) -> list[Path]:
    """Write `model` to `path` (not atomically); returns the files written. A model with mapped tensors
    or over `external_above` bytes gets its tensors over EXTERNAL_MIN_BYTES written one by one to
    '<name>.data' (`model` is not changed). Mapped tensors are read from a link to their file beside
    `path` (`_link`: onnxruntime refuses absolute locations), or with `copy_mapped` (an output, or a model
    for the checker, which refuses links) copied into '<name>.data'."""
    if serializable(model) and model_size_bytes(model) < external_above:
        path.write_bytes(model.SerializeToString())
        return [path]
    data_path = path.parent / (path.name + ".data")
    written, links, tensors = [path], {}, []
    with open(data_path, "wb") as data:
        for tensor in model.graph.initializer:
            if mapped(tensor) and not copy_mapped:
                source = _location(tensor)
                if source not in links:
                    links[source] = path.parent / f"{path.name}.{len(links)}.data"
                    _link(Path(source), links[source])
                    written.append(links[source])
                tensors.append(_external_copy(tensor, links[source].name, int(_external_fields(tensor)["offset"])))
            elif mapped(tensor) or (_tensor_nbytes(tensor) >= EXTERNAL_MIN_BYTES and tensor.data_type != onnx.TensorProto.STRING):
                data.seek(-data.tell() % EXTERNAL_ALIGN, os.SEEK_CUR)  # page-aligned: onnxruntime maps it
                tensors.append(_external_copy(tensor, data_path.name, data.tell()))
                _write_tensor_bytes(tensor, data)
            else:
                tensors.append(tensor)
        data.truncate()
    if data_path.stat().st_size:
        written.append(data_path)
    else:
        data_path.unlink()
    path.write_bytes(_with_initializers(model, tensors).SerializeToString())
    return written


EXTERNAL_MIN_BYTES = 1024  # smaller tensors of a model written with external data stay in the .onnx file
EXTERNAL_ALIGN = 4096
COPY_CHUNK_BYTES = 64 << 20


def _external_copy(tensor: onnx.TensorProto, location: str, offset: int) -> onnx.TensorProto:
    """`tensor`'s name, type and dims, its data at `offset` in `location` (a file beside the model)."""
    copy = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims, doc_string=tensor.doc_string)
    copy.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(_tensor_nbytes(tensor)))):
        entry = copy.external_data.add()
        entry.key, entry.value = key, value
    return copy


def _write_tensor_bytes(tensor: onnx.TensorProto, out) -> None:
    """Append the tensor's bytes to `out`: a mapped one copied from its file in chunks, never whole."""
    if not mapped(tensor):
        out.write(tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes())
        return
    left = _tensor_nbytes(tensor)
    with open(_location(tensor), "rb") as source:
        source.seek(int(_external_fields(tensor).get("offset", 0)))
        while left:
            chunk = source.read(min(left, COPY_CHUNK_BYTES))
            if not chunk:
                raise ModelError(f"the external data of tensor '{tensor.name}' was truncated while the model was written: "
                                 "leave the input's data file unchanged during the run and run again")
            out.write(chunk)
            left -= len(chunk)


def _link(source: Path, target: Path) -> None:
    """A hard link (onnxruntime refuses a symbolic link out of the model's folder), else a copy."""
    target.unlink(missing_ok=True)  # written again to the same path
    try:
        os.link(source, target)
    except OSError:  # another file system
        shutil.copyfile(source, target)


def _with_initializers(model: onnx.ModelProto, initializers: list) -> onnx.ModelProto:
    """A new proto with `model`'s fields but these graph initializers (the old ones are not copied)."""
    out = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(out, field, value)
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _copy_field(out.graph, field, value)
    out.graph.initializer.extend(initializers)
    return out


def _copy_field(message, field, value) -> None:
    if field.is_repeated:
        getattr(message, field.name).extend(value)
    elif field.message_type is not None:
        getattr(message, field.name).CopyFrom(value)
    else:
        setattr(message, field.name, value)


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


def has_external_data(path: str | os.PathLike) -> bool:
    """Whether the model file at `path` keeps initializers in external data (a file over
    INLINE_CHECK_BYTES holds its weights itself and is not parsed to find out)."""
    path = Path(path)
    if path.stat().st_size > INLINE_CHECK_BYTES:
        return False
    return bool(_external_tensors(onnx.load(str(path), load_external_data=False)))


def _data_files(path: str | os.PathLike) -> set[Path]:
    """The external data files (resolved) that the model file at `path` names; none when it holds its
    weights itself (see `has_external_data`) or cannot be read (loading it then says why)."""
    try:
        if not has_external_data(path):
            return set()
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - a broken file is refused, with its reason, when it is loaded
        return set()
    return {(Path(path).parent / _location(t)).resolve() for t in _external_tensors(model)}


INLINE_CHECK_BYTES = 64 << 20


def _location(tensor: onnx.TensorProto) -> str:
    return next((e.value for e in tensor.external_data if e.key == "location"), "")
