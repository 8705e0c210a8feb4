"""A model loaded once, and its memory: `Loaded` (the parsed model, its shapes, size and cost, and
the file it came from) and the means to free the parsed copy of a large model while onnxruntime runs it
from its file (`unparsed`, `released_model`, `detach_constants`)."""

from __future__ import annotations

import gc
import logging
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from .calib import fixed_batch, input_specs, synthetic
from .io import ModelFile, load_model_file, model_size_bytes, normalize_model, resolve_input_shapes
from .ops.rules import rewritten_model, simplify_model
from .runtime import first_run, release_free_memory
from .shapes import complete_shapes, static_shapes, unknown_shapes
from .validate import model_cost
from .vetting import vet_model

log = logging.getLogger(__name__)

RELOAD_ABOVE_BYTES = 32 << 20  # below this, parsing a model twice costs more than its memory is worth


@dataclass
class Loaded:
    """A normalised model with its static input shapes and inferred tensor shapes."""

    model: onnx.ModelProto
    input_shapes: dict[str, list[int]]
    shapes: dict[str, tuple]
    size_bytes: int
    cost: dict = field(default_factory=dict)  # params and MACs, computed once
    given_cost: dict = field(default_factory=dict)  # the same of the model as given (before ops.rules rewrote it)
    file: ModelFile | None = None  # the file it came from: sessions and capture passes read it there
    simplified: dict = field(default_factory=dict)  # the rewrites of ops.rules made on loading, count per rule
    given: onnx.ModelProto | None = None  # the model as given in memory, when `model` is its rewritten form

    @property
    def path(self) -> Path | None:
        return self.file.path if self.file is not None else None

    @property
    def runnable(self):
        """The model as given (its file, else its proto): what reference outputs and the "before" latency
        run, so that the rewrites of ops.rules are measured with the rest."""
        if self.path is not None:
            return self.path
        return self.given if self.given is not None else self.model


def load(model: onnx.ModelProto | str | os.PathLike, input_shapes=None, vetted: bool = False,
         runs: bool = True, simplify: bool = True) -> Loaded:
    """The model loaded; unless `vetted` (a model onnxprune made), checked first where the ONNX checker
    does not look (`vetting.vet_model`) and, when onnxruntime will run it (`runs`, or to complete its
    shapes), run once in a child process (`first_session`). `simplify`: rewritten by `ops.rules`."""
    if isinstance(model, onnx.ModelProto):
        proto, size, file = normalize_model(model), model_size_bytes(model), None
    else:
        proto, size, file = load_model_file(model)
    resolved = resolve_input_shapes(proto, input_shapes)
    loaded = Loaded(proto, resolved, static_shapes(proto, resolved), size, file=file)
    del proto  # `first_session` may free the parsed model
    if not vetted:
        vet_model(loaded.model, loaded.shapes)
        if runs or unknown_shapes(loaded.model, loaded.shapes):
            first_session(loaded)
    loaded.shapes = complete_shapes(loaded.model, resolved, loaded.shapes)
    loaded.cost = loaded.given_cost = model_cost(loaded.model, resolved, loaded.shapes)
    if simplify:  # after vetting: the rules read weights a broken model may not have
        rewrite(loaded, model if isinstance(model, onnx.ModelProto) else None)
    return loaded


def rewrite(loaded: Loaded, given: onnx.ModelProto | None) -> None:
    """`loaded` rewritten by `ops.rules` in place (its model, shapes, cost; its file rewritten again when
    read), the model as given kept where it has no file (`given`)."""
    rewritten, counts = simplify_model(loaded.model, loaded.shapes)
    if not counts:
        return
    given_shapes = loaded.shapes
    shapes = {**loaded.shapes, **static_shapes(rewritten, loaded.input_shapes)}  # a tensor a rule made: inferred
    loaded.model, loaded.simplified, loaded.given = rewritten, counts, given
    loaded.shapes = complete_shapes(rewritten, loaded.input_shapes, shapes)
    loaded.cost = model_cost(rewritten, loaded.input_shapes, loaded.shapes)
    if loaded.file is not None:
        loaded.file = replace(loaded.file, verbatim=False, rewrite=partial(rewritten_model, shapes=given_shapes))


def first_session(loaded: Loaded) -> None:
    """The model's first onnxruntime session, and one run on a synthetic sample, in a child process: a native
    crash there, or a model onnxruntime refuses, is a one-line ModelError (`runtime.first_run`). A large
    model from a file is not held parsed meanwhile."""
    specs = input_specs(loaded.model, loaded.input_shapes)
    feeds = synthetic(specs, fixed_batch(specs) or 1, seed=0).arrays
    with unparsed(loaded) if releasable(loaded) else nullcontext():
        failure = first_run(loaded.runnable, feeds)
    if failure:
        log.info("onnxruntime could not run the model on a synthetic sample (%s)", failure)


def releasable(loaded: Loaded) -> bool:
    """Whether `loaded.model` is worth freeing while onnxruntime runs it: a large model from a file."""
    return loaded.model is not None and loaded.file is not None and loaded.size_bytes > RELOAD_ABOVE_BYTES


@contextmanager
def unparsed(loaded: Loaded):
    """`loaded.model` is None while the block runs (its memory handed back), parsed again from its file
    afterwards, also when the block raises."""
    loaded.model = None
    gc.collect()
    release_free_memory()
    try:
        yield
    finally:
        gc.collect()
        release_free_memory()  # what the block freed (an onnxruntime session), before parsing again
        loaded.model = loaded.file.load()


@contextmanager
def released_model(loaded: Loaded, graph: gs.Graph):
    """While the block runs, a model from a file above RELOAD_ABOVE_BYTES is not held parsed:
    `loaded.model` is None, `graph` (imported from it) is detached from it, and the block gets the
    `io.ModelFile` to read it from (capture passes accept either); afterwards the file is parsed again.
    Otherwise the block gets `loaded.model` and nothing changes. During a capture pass the weights are
    then held once by us (the graph's arrays) and once by onnxruntime, not also as a parsed proto."""
    if not releasable(loaded):
        yield loaded.model
        return
    detach_constants(graph)
    with unparsed(loaded):
        yield loaded.file


def detach_constants(graph: gs.Graph) -> None:
    """Make `graph` hold no part of the proto it was imported from: constants not yet loaded keep a
    copy of their TensorProto (what export writes back, unchanged), and the opset imports are copied.
    A message inside a python protobuf keeps the whole parsed model alive, whatever else is freed."""
    seen = set()

    def constant(tensor) -> None:
        lazy = tensor._values if isinstance(tensor, gs.Constant) else None
        if isinstance(lazy, gs.ir.tensor.LazyValues) and id(lazy) not in seen:
            seen.add(id(lazy))
            copy = lazy.tensor = _copied(lazy.tensor)
            if hasattr(lazy.shape, "extend"):  # graphsurgeon keeps the tensor's dims container as the shape
                lazy.shape = (copy.values if isinstance(copy, onnx.SparseTensorProto) else copy).dims

    def visit(value) -> None:
        if isinstance(value, gs.Graph):
            walk(value)
        elif isinstance(value, gs.Tensor):
            constant(value)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    def walk(g: gs.Graph) -> None:
        if id(g) in seen:
            return
        seen.add(id(g))
        g.import_domains = copied_messages(g.import_domains)
        for tensor in g.tensors().values():
            constant(tensor)
        for node in g.nodes:
            for value in node.attrs.values():
                visit(value)
        for function in getattr(g, "functions", []):
            walk(function)

    walk(graph)


def _copied(message):
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


def copied_messages(messages):
    return None if messages is None else [_copied(m) for m in messages]
