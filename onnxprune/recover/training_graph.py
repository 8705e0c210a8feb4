"""Graph preparation for onnxruntime training, without onnxruntime-training itself.

- which initializers are trainable parameters (weights, biases, scales; not BatchNorm statistics),
- which ops between those parameters and the loss have no gradient in onnxruntime-training (probed),
- exact rewrites that make a model trainable there: BatchNormalization folded into the convolution before
  it (else written as Mul + Add), and HardSigmoid, HardSwish, LayerNormalization (and Clip before opset
  12) spelled out in ops that have gradients (put back after training),
- static input shapes for the gradients of pooling ops, whose onnxruntime kernels size their outputs from
  the shapes recorded in the graph (AveragePool is spelled as a depthwise Conv, which has no such need),
- the teacher (the original model) merged beside the student, for distillation, with its BatchNorm folded
  (onnxruntime-training runs every BatchNormalization of a training graph on batch statistics).
"""

from __future__ import annotations

import fnmatch

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import UsageError

TEACHER_PREFIX = "teacher/"
DECOMPOSED = "/decomposed/"  # marks the nodes and tensors of a spelled-out op

# Op types whose gradient onnxruntime-training 1.19.2 builds and runs on CPU, probed one by one (a
# parameter, then the op, then an MSE loss, then a training step). Failing: LayerNormalization (needs its
# optional outputs), LSTM and GRU (their gradient ops reject the forward outputs), ConvTranspose (no CPU
# kernel for ConvTransposeGrad); never registered: HardSwish, HardSigmoid, Elu, Selu, Softplus, Mish,
# PRelu, InstanceNormalization, GlobalMaxPool, ReduceMax, Einsum, DepthToSpace, SpaceToDepth, CumSum,
# Floor, Sign. HardSigmoid, HardSwish and LayerNormalization are spelled out instead (below).
GRADIENT_OPS = frozenset("""
    Abs Add AveragePool BatchNormalization Cast Clip Concat Conv Cos Div Dropout Erf Exp Expand
    Flatten Gather GatherElements GatherND Gelu Gemm GlobalAveragePool Identity LeakyRelu Log LogSoftmax MatMul
    Max MaxPool Min Mul Neg Pad Pow Reciprocal ReduceL2 ReduceMean ReduceSum Relu Reshape Resize Sigmoid Sin
    Slice Softmax Split Sqrt Squeeze Sub Tanh Tile TopK Transpose Unsqueeze Where
""".split())
# Where a float constant input is a trainable parameter (BatchNorm's running statistics are not).
PARAMETER_INPUTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (0, 1),
                    "BatchNormalization": (1, 2), "LayerNormalization": (1, 2), "InstanceNormalization": (1, 2),
                    "Add": (0, 1), "Sub": (0, 1), "Mul": (0, 1)}
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
# Gradient kernels of onnxruntime-training 1.19.2 that size their output from the shape recorded in the graph
# when the session is created, not from their inputs (pool_gradient_op.cc): MaxPoolGrad takes every dim but
# the batch from it, AveragePoolGrad every dim. A dynamic dim is recorded as 0, so the kernel makes an empty
# gradient and then scatters into it out of bounds: a segfault in the first training step (the PP-OCR
# direction classifier's MaxPool, whose H and W are dynamic), or "Can broadcast 0 by 0 or 1" in the next op
# (the PP-OCR recognizer's AveragePool). {op: first dim that must be static}.
STATIC_SHAPE_GRADIENTS = {"MaxPool": 1, "AveragePool": 0}


def trainable_parameters(model: onnx.ModelProto, frozen: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """(trainable, frozen) initializer names: float constants at weight/bias/scale positions with more
    than one element; those matching a `frozen` glob are frozen instead."""
    inits = {t.name: t for t in model.graph.initializer}
    names = []
    for node in model.graph.node:
        for index in PARAMETER_INPUTS.get(node.op_type, ()):
            if index < len(node.input) and node.input[index] in inits and DECOMPOSED not in node.input[index]:
                tensor = inits[node.input[index]]
                if tensor.data_type in FLOAT_TYPES and int(np.prod(tensor.dims, dtype=np.int64)) > 1:
                    names.append(tensor.name)
    names = list(dict.fromkeys(names))
    is_frozen = [any(fnmatch.fnmatchcase(n, p) for p in frozen) for n in names]
    return ([n for n, f in zip(names, is_frozen) if not f], [n for n, f in zip(names, is_frozen) if f])


def ops_without_gradient(model: onnx.ModelProto, trainable: list[str], loss_inputs: list[str]) -> dict[str, str]:
    """{op type: an example node} for nodes between a trainable parameter and the loss whose gradient
    onnxruntime-training cannot build. Integer/bool tensors (shapes, masks) carry no gradient."""
    missing = {}
    for node in gradient_path(model, trainable, loss_inputs):
        if node.op_type not in GRADIENT_OPS and node.domain in ("", "ai.onnx"):
            missing.setdefault(node.op_type, node.name or node.output[0])
    return dict(sorted(missing.items()))


def gradient_path(model: onnx.ModelProto, trainable: list[str], loss_inputs: list[str]) -> list[onnx.NodeProto]:
    """The nodes whose gradient training needs: fed (through float tensors) by a trainable parameter, and
    feeding the loss; in reverse graph order."""
    types = _tensor_types(model)
    reached = set(trainable)
    on_path = []
    for node in model.graph.node:
        if any(name in reached for name in node.input):
            floats = [o for o in node.output if o and types.get(o, TensorProto.FLOAT) in FLOAT_TYPES]
            reached.update(floats)
            if floats:
                on_path.append(node)
    needed = set(loss_inputs)
    path = []
    for node in reversed(on_path):
        if any(o in needed for o in node.output):
            needed.update(node.input)
            path.append(node)
    return path


def dynamic_pool_inputs(model: onnx.ModelProto, trainable: list[str], loss_inputs: list[str]) -> dict[str, tuple]:
    """{op type: (node, input shape)} for the MaxPool/AveragePool nodes on the gradient path whose input has
    a dim that onnxruntime-training's gradient kernel needs static but that is dynamic here (see
    STATIC_SHAPE_GRADIENTS); the shape lists ints and '?' for the dynamic dims."""
    shapes = _tensor_shapes(model)
    found = {}
    for node in reversed(gradient_path(model, trainable, loss_inputs)):
        first = STATIC_SHAPE_GRADIENTS.get(node.op_type)
        if first is None or node.domain not in ("", "ai.onnx") or node.op_type in found:
            continue
        dims = shapes.get(node.input[0])  # unknown (inference failed): not refused, the child process guards
        shape = ["?" if d is None else d for d in dim_values(dims or [])]
        if "?" in shape[first:]:
            found[node.op_type] = (node.name or node.output[0], shape)
    return found


def dim_values(dims) -> list[int | None]:
    """A shape's dims (TensorShapeProto dims) as ints, None for the dynamic ones."""
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]


def with_input_shapes(model: onnx.ModelProto, shapes: dict[str, list]) -> onnx.ModelProto:
    """A copy whose inputs have the given dims (None keeps a dim as it is), so that shape inference gives
    every tensor its static size; dims declared negative (an exporter's -1 for "dynamic", invalid ONNX)
    become named dynamic dims, and stale intermediate shapes (value_info) are dropped."""
    model = copy_model(model)
    values = [(v, shapes.get(v.name)) for v in model.graph.input] + [(v, None) for v in model.graph.output]
    for value, given in values:
        dims = value.type.tensor_type.shape.dim if value.type.HasField("tensor_type") else []
        if given is not None and len(given) != len(dims):
            raise UsageError(f"input '{value.name}' has {len(dims)} dims, the shape given for it {len(given)}")
        for i, dim in enumerate(dims):
            if given is not None and given[i] is not None:
                dim.Clear()
                dim.dim_value = int(given[i])
            elif dim.HasField("dim_value") and dim.dim_value < 0:
                dim.Clear()
                dim.dim_param = f"{value.name}_dim{i}"
    del model.graph.value_info[:]
    return model


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # types are a refinement; unknown tensors count as float
        inferred = model
    values = list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)
    types = {v.name: v.type.tensor_type.elem_type for v in values if v.type.HasField("tensor_type")}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return types


def float_outputs(model: onnx.ModelProto) -> list[str]:
    return [o.name for o in model.graph.output if o.type.tensor_type.elem_type in FLOAT_TYPES]


# ---------------------------------------------------------------- the training graph


def fold_batchnorm(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy where every inference-mode BatchNormalization is folded into the Conv before it (when that
    Conv feeds only it), else written as Mul + Add by per-channel constants. onnxruntime-training would
    otherwise train BatchNorm on batch statistics while inference uses the running ones; with a few
    hundred samples that mismatch undoes the fine-tuning. The folded model computes the same outputs."""
    model = copy_model(model)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    graph_outputs = {o.name for o in graph.output}
    ranks = {k: len(v) for k, v in _tensor_shapes(model).items()}
    kept, folded = [], 0
    for node in graph.node:
        values = [numpy_helper.to_array(inits[n]) if n in inits else None for n in node.input[1:5]]
        trains = any(a.name == "training_mode" and a.i for a in node.attribute)
        if node.op_type != "BatchNormalization" or len(values) < 4 or any(v is None for v in values) or trains:
            kept.append(node)
            continue
        gamma, beta, mean, var = (v.astype(np.float64) for v in values)
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        scale = gamma / np.sqrt(var + eps)
        shift = beta - mean * scale
        conv = producer.get(node.input[0])
        if conv is not None and _fold_into_conv(graph, conv, node, scale, shift, inits, users, graph_outputs):
            folded += 1
            continue
        rank = ranks.get(node.input[0])
        if rank is None:
            kept.append(node)  # rank unknown: leave it (trained on batch statistics)
            continue
        shape = [len(scale)] + [1] * (rank - 2)
        scale_name, shift_name = f"{node.output[0]}_scale", f"{node.output[0]}_shift"
        graph.initializer.extend([numpy_helper.from_array(scale.reshape(shape).astype(np.float32), scale_name),
                                  numpy_helper.from_array(shift.reshape(shape).astype(np.float32), shift_name)])
        scaled = f"{node.output[0]}_scaled"
        kept.append(helper.make_node("Mul", [node.input[0], scale_name], [scaled], name=f"{node.name}_scale"))
        kept.append(helper.make_node("Add", [scaled, shift_name], [node.output[0]], name=f"{node.name}_shift"))
        folded += 1
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for node in graph.node for name in node.input}
    initializers = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    return model, folded


def _fold_into_conv(graph, conv, bn, scale, shift, inits, users, graph_outputs) -> bool:
    """Scale the Conv's filters and bias in place of `bn`; False when the Conv cannot take it."""
    out = conv.output[0]
    if (conv.op_type != "Conv" or users.get(out, 0) != 1 or out in graph_outputs or len(conv.input) < 2
            or conv.input[1] not in inits or users.get(conv.input[1], 0) != 1):
        return False
    has_bias = len(conv.input) > 2 and conv.input[2] != ""
    if has_bias and (conv.input[2] not in inits or users.get(conv.input[2], 0) != 1):
        return False
    weight_tensor = inits[conv.input[1]]
    weight = numpy_helper.to_array(weight_tensor).astype(np.float64)
    bias = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if has_bias else np.zeros(len(scale))
    dtype = helper.tensor_dtype_to_np_dtype(weight_tensor.data_type)
    weight_tensor.CopyFrom(numpy_helper.from_array(
        (weight * scale.reshape([-1] + [1] * (weight.ndim - 1))).astype(dtype), weight_tensor.name))
    new_bias = (bias * scale + shift).astype(dtype)
    if has_bias:
        inits[conv.input[2]].CopyFrom(numpy_helper.from_array(new_bias, conv.input[2]))
    else:
        name = f"{conv.name or out}.bias"
        name = name if name not in inits else f"{out}_folded_bias"
        conv.input.append(name)
        graph.initializer.append(numpy_helper.from_array(new_bias, name))
    conv.output[0] = bn.output[0]
    return True


def _tensor_shapes(model: onnx.ModelProto) -> dict[str, list]:
    try:  # data propagation sees through Shape -> Slice -> Concat -> Reshape chains
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:
            return {}
    values = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    return {v.name: list(v.type.tensor_type.shape.dim) for v in values
            if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}



def teacher_for_training(teacher: onnx.ModelProto) -> onnx.ModelProto:
    """The teacher as it must enter a training graph to compute its inference outputs there: onnxruntime-
    training turns every BatchNormalization of the graph into its training form (batch statistics), the
    teacher's too, and runs Dropout, so BatchNorm is folded (`fold_batchnorm`) and Dropout becomes Identity."""
    teacher, _ = fold_batchnorm(teacher)
    for node in teacher.graph.node:
        if node.op_type == "Dropout" and node.domain in ("", "ai.onnx") and len([o for o in node.output if o]) == 1:
            node.op_type = "Identity"
            del node.input[1:]
            del node.attribute[:]
    return teacher


def with_teacher(student: onnx.ModelProto, teacher: onnx.ModelProto) -> onnx.ModelProto:
    """The student with the teacher's graph beside it (names prefixed, weights as constants, same inputs)."""
    if opset_of(student) != opset_of(teacher):
        raise UsageError(f"the teacher uses opset {opset_of(teacher)}, the model opset {opset_of(student)}: "
                         "give the original model the pruned one was made from")
    student_inputs = {i.name for i in student.graph.input}
    missing = [i.name for i in teacher.graph.input if i.name not in student_inputs]
    if missing:
        raise UsageError(f"the teacher's input '{missing[0]}' is not an input of the model: give the original "
                         "model the pruned one was made from")
    prefixed = onnx.compose.add_prefix(teacher, TEACHER_PREFIX)
    renamed = {TEACHER_PREFIX + i.name: i.name for i in teacher.graph.input}
    merged = onnx.ModelProto()
    merged.CopyFrom(student)
    for node in prefixed.graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
        merged.graph.node.append(node)
    merged.graph.initializer.extend(prefixed.graph.initializer)
    return merged


def opset_of(model: onnx.ModelProto) -> int:
    return next(i.version for i in model.opset_import if i.domain in ("", "ai.onnx"))


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


# ---------------------------------------------------------------- ops spelled out for training


def decompose_for_training(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """A copy where HardSigmoid, HardSwish, LayerNormalization (one output, last axis) and, below opset
    12, Clip are written in ops onnxruntime-training can differentiate (Mul, Add, Min, Max, ReduceMean,
    Sub, Sqrt, Div), and AveragePool as a depthwise Conv of constant weights 1/kernel size (whose gradient,
    unlike AveragePool's, works with a dynamic batch: see STATIC_SHAPE_GRADIENTS), with the same outputs;
    `restore_decomposed` puts the original ops back. Returns (model, {op: count})."""
    model = copy_model(model)
    graph = model.graph
    opset = opset_of(model)
    shapes = {}
    if any(n.op_type == "AveragePool" for n in graph.node):  # the Conv's weights are float32: only float pools
        types = _tensor_types(model)
        shapes = {k: v for k, v in _tensor_shapes(model).items() if types.get(k) == TensorProto.FLOAT}
    kept, counts = [], {}
    for node in graph.node:
        spelled = _spell_out(node, opset, graph.initializer, shapes)
        if spelled is None:
            kept.append(node)
            continue
        kept.extend(spelled)
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    del graph.node[:]
    graph.node.extend(kept)
    return model, counts


SPELLED_OUT = ("HardSigmoid", "HardSwish", "LayerNormalization", "Clip", "AveragePool")


def _spell_out(node: onnx.NodeProto, opset: int, initializers, shapes) -> list[onnx.NodeProto] | None:
    if node.domain not in ("", "ai.onnx") or node.op_type not in SPELLED_OUT:
        return None
    if node.op_type == "Clip" and (opset >= 12 or len(node.input) < 2):
        return None  # Clip's gradient needs opset 12 (LessOrEqual); before that it becomes Min and Max
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "AveragePool":
        return _average_pool_as_conv(node, attrs, initializers, shapes)
    base = (node.name or node.output[0]) + DECOMPOSED
    nodes: list[onnx.NodeProto] = []

    def const(name, value, dtype=np.float32):
        initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), base + name))
        return base + name

    def op(op_type, inputs, output=None, **kwargs):
        out = output or f"{base}t{len(nodes)}"
        nodes.append(helper.make_node(op_type, inputs, [out], name=f"{base}{len(nodes)}", **kwargs))
        return out

    def hard_sigmoid(x, alpha, beta, output=None):
        linear = op("Add", [op("Mul", [x, const("alpha", alpha)]), const("beta", beta)])
        return op("Max", [op("Min", [linear, const("one", 1.0)]), const("zero", 0.0)], output)

    if node.op_type == "Clip":
        low, high = (node.input[i] if i < len(node.input) else "" for i in (1, 2))
        capped = op("Min", [node.input[0], high], None if low else node.output[0]) if high else node.input[0]
        if low:
            op("Max", [capped, low], node.output[0])
        if not nodes:
            op("Identity", [node.input[0]], node.output[0])
    elif node.op_type == "HardSigmoid":
        hard_sigmoid(node.input[0], attrs.get("alpha", 0.2), attrs.get("beta", 0.5), node.output[0])
    elif node.op_type == "HardSwish":
        op("Mul", [node.input[0], hard_sigmoid(node.input[0], 1 / 6, 0.5)], node.output[0])
    else:
        if attrs.get("axis", -1) != -1 or len([o for o in node.output if o]) != 1:
            return None
        if opset >= 18:
            reduce = {"inputs": [const("axes", [-1], np.int64)], "attrs": {}}
        else:
            reduce = {"inputs": [], "attrs": {"axes": [-1]}}
        x = node.input[0]
        centred = op("Sub", [x, op("ReduceMean", [x, *reduce["inputs"]], **reduce["attrs"])])
        variance = op("ReduceMean", [op("Mul", [centred, centred]), *reduce["inputs"]], **reduce["attrs"])
        std = op("Sqrt", [op("Add", [variance, const("epsilon", attrs.get("epsilon", 1e-5))])])
        has_bias = len(node.input) > 2 and node.input[2]
        scaled = op("Mul", [op("Div", [centred, std]), node.input[1]], None if has_bias else node.output[0])
        if has_bias:
            op("Add", [scaled, node.input[2]], node.output[0])
    return nodes


def _average_pool_as_conv(node, attrs, initializers, shapes) -> list[onnx.NodeProto] | None:
    """AveragePool as a depthwise Conv with weights 1/kernel size: exact when every window is whole
    (no padding, or padding counted, and no ceil_mode), and the channel count is known; else None."""
    dims = shapes.get(node.input[0])
    kernel = list(attrs.get("kernel_shape", []))
    pads = list(attrs.get("pads", [0] * 2 * len(kernel)))
    whole = attrs.get("count_include_pad", 0) == 1 or not any(pads)
    if (not kernel or dims is None or len(dims) != len(kernel) + 2 or not dims[1].HasField("dim_value")
            or dims[1].dim_value < 1 or attrs.get("ceil_mode", 0) or not whole
            or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID", "NOTSET", "VALID")):
        return None
    channels = dims[1].dim_value
    base = (node.name or node.output[0]) + DECOMPOSED
    weight = np.full([channels, 1] + kernel, 1.0 / float(np.prod(kernel)), np.float32)
    initializers.append(numpy_helper.from_array(weight, base + "weight"))
    conv_attrs = {"kernel_shape": kernel, "group": channels, "strides": attrs.get("strides", [1] * len(kernel))}
    if attrs.get("auto_pad", b"NOTSET") in (b"VALID", "VALID"):
        conv_attrs["auto_pad"] = "VALID"
    else:
        conv_attrs["pads"] = pads
    if "dilations" in attrs:
        conv_attrs["dilations"] = attrs["dilations"]
    return [helper.make_node("Conv", [node.input[0], base + "weight"], [node.output[0]], name=base + "0",
                             **conv_attrs)]


def restore_decomposed(model: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    """Put back, in `model`, the original op of every op `decompose_for_training` spelled out (their
    inputs, e.g. a LayerNormalization's trained scale and bias, keep their names)."""
    originals = {(n.name or n.output[0]): n for n in original.graph.node}
    nodes, placed = [], set()
    for node in model.graph.node:
        if DECOMPOSED not in node.name:
            nodes.append(node)
            continue
        base = node.name.split(DECOMPOSED)[0]
        if base not in placed:
            nodes.append(originals[base])
            placed.add(base)
    restored = copy_model(model)
    del restored.graph.node[:]
    restored.graph.node.extend(nodes)
    used = {name for n in nodes for name in n.input}
    initializers = [t for t in restored.graph.initializer if t.name in used]
    del restored.graph.initializer[:]
    restored.graph.initializer.extend(initializers)
    return restored
