"""Storing zeroed weights so the file shrinks: ONNX `sparse_initializer` (values and indices of the
non-zeros), per initializer, where that is smaller than the dense tensor.

onnxruntime (1.32) loads sparse initializers with int8, int16, int32 or int64 indices (uint8 and uint16 are
refused), either linear (one index per value, into the flattened tensor) or as coordinates ([nnz, rank]);
it makes them dense at load time, so outputs are those of the dense model to the bit. The ONNX checker
accepts only int64 indices, and its shape inference does not see sparse initializers: the stored file
fails `onnx.checker` while onnxruntime runs it (validation checks the dense model before it is stored).
Each tensor takes the smallest of: dense, linear indices in the smallest signed type holding its size,
coordinates in the smallest holding its largest dimension.
"""

from __future__ import annotations

import gzip

import numpy as np
import onnx
from onnx import helper, numpy_helper

INDEX_TYPES = (np.int8, np.int16, np.int32, np.int64)  # what onnxruntime accepts, smallest first


def smallest_index_type(largest: int) -> type:
    return next(t for t in INDEX_TYPES if largest <= np.iinfo(t).max)


def sparse_form(values: np.ndarray, name: str) -> onnx.SparseTensorProto | None:
    """The sparse tensor of `values`, with the smaller index form, or None when dense is as small."""
    flat = values.reshape(-1)
    nonzero = np.flatnonzero(flat)
    linear_type = smallest_index_type(max(flat.size - 1, 0))
    coord_type = smallest_index_type(max(max(values.shape, default=1) - 1, 0))
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


def store_sparse(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """A copy of `model` with every numeric initializer (float, or a quantized model's int8) that is smaller sparse moved to
    `sparse_initializer`, and the report's storage figures (bytes dense and stored, each also gzipped)."""
    stored = onnx.ModelProto()
    stored.CopyFrom(model)
    kept, moved, index_types = [], [], set()
    for tensor in stored.graph.initializer:
        values = numpy_helper.to_array(tensor) if tensor.data_location != onnx.TensorProto.EXTERNAL else None
        sparse = sparse_form(values, tensor.name) if values is not None and values.dtype.kind in "fiu" else None
        if sparse is None:
            kept.append(tensor)
        else:
            moved.append(sparse)
            index_types.add(helper.tensor_dtype_to_np_dtype(sparse.indices.data_type).name)
    del stored.graph.initializer[:]
    stored.graph.initializer.extend(kept)
    stored.graph.sparse_initializer.extend(moved)
    if stored.ir_version < 4 and moved:
        stored.ir_version = 4  # sparse initializers are IR 4 and later
    dense, data = model.SerializeToString(), stored.SerializeToString()
    return stored, {"dense_bytes": len(dense), "dense_gzip_bytes": _gzipped(dense), "stored_bytes": len(data),
                    "gzip_bytes": _gzipped(data), "sparse_initializers": len(moved), "index_types": sorted(index_types)}


def _gzipped(data: bytes) -> int:
    return len(gzip.compress(data, compresslevel=9, mtime=0))
