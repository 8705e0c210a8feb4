"""Storing zeroed weights so the file shrinks: each numeric initializer that is smaller so becomes a
`Constant` node whose `sparse_value` holds the non-zero values and their indices.

The Constant form, not the graph's `sparse_initializer`: ONNX shape inference types a sparse initializer
as a sparse tensor, which no Conv, Gemm or MatMul takes, so `onnx.checker.check_model(full_check=True)`
refuses it whatever its indices; a Constant's output is a dense tensor. onnxruntime (1.32) makes both
dense at load time, so the outputs are those of the dense model to the bit.

Index types (`INDEX_FORMS`): "int64", the only one the ONNX checker accepts (linear: one index per value
into the flattened tensor; coordinates, [nnz, rank], are never smaller), valid ONNX for every runtime;
or "smallest": int8, int16 or int32 when they hold the tensor's size (linear) or its largest dimension
(coordinates), whichever form is smaller. onnxruntime loads these (uint8 and uint16 it refuses), the ONNX
checker refuses them. Either way a tensor stays dense when its sparse form at that index width, Constant
node included, is not smaller.
"""

from __future__ import annotations

import gzip

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..io import dense_tensor

INDEX_FORMS = ("int64", "smallest")
INDEX_TYPES = (np.int8, np.int16, np.int32, np.int64)  # what onnxruntime accepts, smallest first
SPARSE_OPSET = 11  # Constant's sparse_value


def smallest_index_type(largest: int) -> type:
    return next(t for t in INDEX_TYPES if largest <= np.iinfo(t).max)


def sparse_form(values: np.ndarray, name: str, index: str = "int64") -> onnx.SparseTensorProto | None:
    """The sparse tensor of `values` with `index` indices (see INDEX_FORMS), or None when dense is as small."""
    flat = values.reshape(-1)
    nonzero = np.flatnonzero(flat)
    smallest = index == "smallest"
    linear_type = smallest_index_type(max(flat.size - 1, 0)) if smallest else np.int64
    coord_type = smallest_index_type(max(max(values.shape, default=1) - 1, 0)) if smallest else np.int64
    linear_bytes = np.dtype(linear_type).itemsize
    coord_bytes = np.dtype(coord_type).itemsize * max(values.ndim, 1)
    sparse_bytes = len(nonzero) * (values.itemsize + min(linear_bytes, coord_bytes))
    if sparse_bytes >= values.nbytes:
        return None
    if linear_bytes <= coord_bytes:
        indices = nonzero.astype(linear_type)
    else:
        indices = np.stack(np.unravel_index(nonzero, values.shape), axis=1).astype(coord_type)
    return helper.make_sparse_tensor(numpy_helper.from_array(flat[nonzero], name),
                                     numpy_helper.from_array(indices, f"{name}_indices"), list(values.shape))


def store_sparse(model: onnx.ModelProto, index: str = "int64") -> tuple[onnx.ModelProto, dict]:
    """A copy of `model` with every numeric initializer (float, or a quantized model's int8) that is smaller
    sparse turned into a Constant node with that `sparse_value`, and the report's storage figures (bytes
    dense and stored, each also gzipped). Initializers that are also graph inputs stay (a Constant's output
    cannot be an input), and so does all of a model whose default opset predates sparse Constants."""
    stored = onnx.ModelProto()
    stored.CopyFrom(model)
    inputs = {i.name for i in stored.graph.input}
    opset = next((o.version for o in stored.opset_import if o.domain in ("", "ai.onnx")), 0)
    kept, constants, index_types = [], [], set()
    for tensor in stored.graph.initializer:
        sparse = None
        if opset >= SPARSE_OPSET and tensor.name not in inputs and tensor.data_location != onnx.TensorProto.EXTERNAL:
            values = numpy_helper.to_array(tensor)
            sparse = sparse_form(values, tensor.name, index) if values.dtype.kind in "fiu" else None
        node = None if sparse is None else helper.make_node("Constant", [], [tensor.name],
                                                            name=f"{tensor.name}_sparse", sparse_value=sparse)
        if node is None or node.ByteSize() >= tensor.ByteSize():  # a small tensor: the node's names cost more
            kept.append(tensor)
        else:
            constants.append(node)
            index_types.add(helper.tensor_dtype_to_np_dtype(sparse.indices.data_type).name)
    del stored.graph.initializer[:]
    stored.graph.initializer.extend(kept)
    nodes = constants + list(stored.graph.node)  # the Constants first: the graph stays topologically sorted
    del stored.graph.node[:]
    stored.graph.node.extend(nodes)
    dense, data = model.SerializeToString(), stored.SerializeToString()
    return stored, {"dense_bytes": len(dense), "dense_gzip_bytes": _gzipped(dense), "stored_bytes": len(data),
                    "gzip_bytes": _gzipped(data), "sparse_tensors": len(constants), "index": index,
                    "index_types": sorted(index_types)}


def dense_initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every initializer of `model` as an array, those stored sparse (Constant nodes with a sparse_value,
    or sparse initializers) made dense."""
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    sparse = {t.values.name: t for t in model.graph.sparse_initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            sparse.update({node.output[0]: a.sparse_tensor for a in node.attribute if a.name == "sparse_value"})
    weights.update({name: numpy_helper.to_array(dense_tensor(tensor)) for name, tensor in sparse.items()})
    return weights


def densified(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` stored by `store_sparse` with its sparse Constants back as dense initializers."""
    dense = onnx.ModelProto()
    dense.CopyFrom(model)
    weights = dense_initializers(dense)
    for node in [n for n in dense.graph.node if n.op_type == "Constant" and n.attribute[0].name == "sparse_value"]:
        dense.graph.node.remove(node)
        dense.graph.initializer.append(numpy_helper.from_array(weights[node.output[0]], node.output[0]))
    return dense


def _gzipped(data: bytes) -> int:
    return len(gzip.compress(data, compresslevel=9, mtime=0))
