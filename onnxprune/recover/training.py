"""Fine-tuning through onnxruntime's training artifacts, and distillation from the original model.

`export_training` writes the four artifacts onnxruntime's training API runs (training, eval and
optimizer models, and a checkpoint), so a pruned model can be fine-tuned where the data is: a server,
or a phone with onnxruntime's on-device training. With a teacher (the original model) the teacher is
built into the training graph as constants and the loss compares the student's outputs with the
teacher's, so training needs inputs only, no labels. `finetune` runs such distillation steps on the
calibration data and returns the fine-tuned inference model. The graph preparation (what is trained,
BatchNorm folding, ops spelled out for their gradients, the teacher merge) is in `training_graph`.

onnxruntime-training replaces the `onnxruntime` package and needs onnx<=1.17, so it lives in its own
environment (INSTALL); everything here checks for it first and says how to get it.

The training steps run in a child process (`_CHILD`): a native crash of onnxruntime-training there (it
has segfaulted on real models) becomes a one-line error instead of taking the user's run down with it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import InternalError, ModelError, UsageError
from ..io import EXTERNAL_DATA_THRESHOLD, inlined, model_size_bytes
from ..workdir import publish, staging_path, temp_folder
from . import FINETUNE_LR
from .masks import HeldWeights
from .training_graph import (TEACHER_PREFIX, copy_model, decompose_for_training, dim_values, dynamic_pool_inputs,
                             float_outputs, fold_batchnorm, opset_of, ops_without_gradient, restore_decomposed,
                             teacher_for_training, trainable_parameters, with_input_shapes, with_teacher)

log = logging.getLogger(__name__)

INSTALL = ("python3 -m venv .venv-train && .venv-train/bin/pip install onnxruntime-training-cpu==1.19.2 onnx==1.17.0 "
           "torch==2.13.0 numpy click tqdm onnx-graphsurgeon && .venv-train/bin/pip install --no-deps -e .")
LOSSES = ("mse", "ce")
MANIFEST = "onnxprune_training.json"
# What the child process runs (argv[1]: the directory with the artifacts and the job); tests replace it.
_CHILD = "import sys; from onnxprune.recover.training import _child_main; sys.exit(_child_main(sys.argv[1]))"


class TrainingUnavailable(UsageError):
    """onnxruntime-training is not installed in this environment."""


class NotTrainable(ModelError):
    """The model has ops onnxruntime-training cannot differentiate, or nothing to train."""


def require_training():
    """The onnxruntime training modules, or a one-line error saying how to install them."""
    try:
        from onnxruntime.training import api, artifacts, onnxblock
    except ImportError:
        raise TrainingUnavailable(
            "onnxruntime-training is not installed here (it replaces onnxruntime and needs onnx<=1.17, so it "
            f"gets its own environment): {INSTALL}; then run onnxprune from .venv-train") from None
    return api, artifacts, onnxblock


def loss_block(onnxblock, loss: str, outputs: list[str], teacher: bool, opset: int):
    """An onnxblock computing the loss from the student's `outputs` (and the teacher's, when present)."""
    if not teacher:
        block = onnxblock.loss.MSELoss() if loss == "mse" else onnxblock.loss.CrossEntropyLoss()
        first = outputs[0]

        class FirstOutput(onnxblock.Block):
            def build(self, *_):
                return block(first)

        return FirstOutput()

    class Distillation(onnxblock.Block):
        """mse: sum over the float outputs of mean((student - teacher)^2); ce: cross-entropy of the first
        output's softmax against the teacher's, averaged over samples and positions."""

        def build(self, *_):
            graph = self.base.graph
            name = onnxblock._graph_utils.generate_graph_name

            def node(op, inputs, **attrs):
                out = name(f"distill_{op.lower()}")
                graph.node.append(helper.make_node(op, inputs, [out], name=name(op), **attrs))
                return out

            if loss == "mse":
                terms = []
                for out in outputs:
                    diff = node("Sub", [out, TEACHER_PREFIX + out])
                    terms.append(node("ReduceMean", [node("Mul", [diff, diff])], keepdims=0))
                total = terms[0]
                for term in terms[1:]:
                    total = node("Add", [total, term])
                return total
            first = outputs[0]
            target = node("Softmax", [TEACHER_PREFIX + first], axis=-1)
            log_prob = node("LogSoftmax", [first], axis=-1)
            if opset >= 13:
                axes = name("distill_axes")
                graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), axes))
                per_sample = node("ReduceSum", [node("Mul", [target, log_prob]), axes], keepdims=0)
            else:
                per_sample = node("ReduceSum", [node("Mul", [target, log_prob])], axes=[-1], keepdims=0)
            return node("Neg", [node("ReduceMean", [per_sample], keepdims=0)])

    return Distillation()


def export_training(model: onnx.ModelProto, directory: str | os.PathLike, loss: str = "mse",
                    teacher: onnx.ModelProto | None = None, frozen: tuple[str, ...] = (),
                    input_shapes: dict[str, list] | None = None) -> dict:
    """Write training/eval/optimizer models and a checkpoint for `model` into `directory`; return the
    manifest (also written there as onnxprune_training.json). `input_shapes` fixes the inputs' dims for
    training ({name: dims}, None for a dim left dynamic, e.g. the batch): MaxPool's gradient needs every
    dim but the batch static, and a model with such a pool and dynamic dims is refused without them."""
    _, artifacts, onnxblock = require_training()
    if loss not in LOSSES:
        raise UsageError(f"unknown loss '{loss}': choose one of {', '.join(LOSSES)}")
    model, teacher = trainable_copies(model, teacher)
    model = with_input_shapes(model, input_shapes or {})
    model, folded = fold_batchnorm(model)
    model, spelled_out = decompose_for_training(model)
    outputs = float_outputs(model)
    if not outputs:
        raise NotTrainable("the model has no floating-point output to compute a loss on")
    trainable, frozen_names = trainable_parameters(model, frozen)
    if not trainable:
        raise NotTrainable("no trainable parameters are left (all frozen, or the weights are not initializers): "
                           "loosen --frozen")
    loss_outputs = outputs if loss == "mse" and teacher is not None else outputs[:1]
    missing = ops_without_gradient(model, trainable, loss_outputs)
    if missing:
        listed = ", ".join(f"{op} (e.g. '{node}')" for op, node in missing.items())
        raise NotTrainable(f"onnxruntime-training has no gradient for {listed} between the trainable parameters "
                           "and the outputs: freeze the layers before them with --frozen PATTERN, or fine-tune "
                           "in the framework the model came from")
    pools = dynamic_pool_inputs(model, trainable, loss_outputs)
    if pools:
        op, (node, shape) = next(iter(pools.items()))
        dynamic = ", ".join(f"'{i.name}' {_dims(i)}" for i in model.graph.input)
        raise NotTrainable(f"{op} '{node}' gets an input of dynamic shape {shape} (from {dynamic}), and "
                           f"onnxruntime-training's {op} gradient needs it static (it would crash): give static "
                           "input shapes (--input-shape NAME:DIMS; Python: input_shapes={name: dims}), or use `onnxprune finetune`, "
                           "which trains at the calibration data's shape")
    if teacher is not None:
        teacher = teacher_for_training(teacher)
    base = with_teacher(model, teacher) if teacher is not None else copy_model(model)
    base.ir_version = min(base.ir_version, onnx.IR_VERSION)
    block = loss_block(onnxblock, loss, loss_outputs, teacher is not None, opset_of(model))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = staging_path(directory)
    staging.mkdir()
    try:
        try:
            with native_stderr_logged():
                artifacts.generate_artifacts(base, requires_grad=trainable, frozen_params=frozen_names, loss=block,
                                             optimizer=artifacts.OptimType.AdamW, artifact_directory=staging)
        except Exception as exc:  # onnxruntime's C++ errors: keep the line that names the op
            raise NotTrainable(f"onnxruntime-training could not build the training graph: {_reason(exc)}") from None
        manifest = {"inputs": [i.name for i in model.graph.input], "outputs": [o.name for o in model.graph.output],
                    "input_shapes": {i.name: dim_values(i.type.tensor_type.shape.dim) for i in model.graph.input},
                    "loss": loss, "loss_outputs": loss_outputs, "teacher": teacher is not None,
                    "targets": [] if teacher is not None else (["target"] if loss == "mse" else ["labels"]),
                    "trainable": trainable, "frozen": frozen_names, "batchnorm_folded": folded,
                    "spelled_out": spelled_out}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        items = sorted(staging.iterdir(), key=lambda item: item.name == MANIFEST)  # the manifest last
        publish([(item, directory / item.name) for item in items])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


@contextmanager
def native_stderr_logged():
    """Builds onnxruntime-training's graphs with the process's stderr in an anonymous file: its C++ graph
    passes print every transformer at info level whatever the logger's severity. Their lines are logged
    at debug level."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode(errors="replace")
            if text:
                log.debug("onnxruntime-training printed: %s", text[-2000:])


def trainable_copies(model: onnx.ModelProto, teacher: onnx.ModelProto | None):
    """`model` and `teacher` with their weights in the proto: onnxruntime-training builds its graphs from one
    protobuf holding both, so memory-mapped external weights are read in, and together over protobuf's 2 GB
    limit they are refused."""
    size = model_size_bytes(model) + (model_size_bytes(teacher) if teacher is not None else 0)
    if size > EXTERNAL_DATA_THRESHOLD:
        raise NotTrainable(f"the weights to train with ({size / 1e9:.1f} GB, the teacher's included) exceed the 2 GB "
                           "onnxruntime-training builds its training graph in: fine-tune in the framework the model "
                           "came from, or prune without --finetune-steps")
    return inlined(model), (inlined(teacher) if teacher is not None else None)


def _dims(value) -> str:
    dims = value.type.tensor_type.shape.dim
    return "[" + ", ".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in dims) + "]"


def _reason(exc: Exception) -> str:
    text = str(exc)
    for marker in ("has not been registered:", "is invalid", "was false."):
        for line in text.splitlines():
            if marker in line:
                return line.split(" ", 1)[-1][-300:]
    return (text.splitlines() or [type(exc).__name__])[0][-300:]


# ---------------------------------------------------------------- fine-tuning


def finetune(model: onnx.ModelProto, teacher: onnx.ModelProto, calibration, steps: int, lr: float = FINETUNE_LR,
             batch_size: int = 32, seed: int = 0, loss: str = "mse", frozen: tuple[str, ...] = (),
             masked: tuple[str, ...] = (), dense: dict[str, np.ndarray] | None = None):
    """`steps` AdamW distillation steps of `model` towards `teacher` on `calibration` (shuffled with
    `seed`), in a child process; (fine-tuned inference model, report section). The zeros of the
    initializers named in `masked` stay zero (`masks.HeldWeights`); with `dense` (their weights before
    pruning, by name) they are spliced instead: weights may come back and go (Dynamic Network Surgery)."""
    require_training()
    if steps < 1:
        raise UsageError(f"--finetune-steps {steps}: give a positive number of steps")
    shapes = {name: [None] + list(array.shape[1:]) for name, array in calibration.arrays.items()}
    with temp_folder("finetune-") as tmp:
        manifest = export_training(model, tmp, loss, teacher, frozen, input_shapes=shapes)
        missing = sorted(set(masked) - set(manifest["trainable"]))
        if missing:
            raise InternalError(f"masked weights are not trainable parameters: {missing[:3]}")
        tuned, before, after, losses, held = _train_in_child(Path(tmp), manifest, calibration, steps, lr, batch_size,
                                                             seed, masked, dense)
    tuned = _restore_metadata(restore_decomposed(_drop_unused(tuned), model), model)
    report = {"steps": steps, "lr": lr, "batch_size": batch_size, "loss": loss, "teacher": "original model",
              "loss_before": before, "loss_after": after, "first_step_loss": losses[0], "last_step_loss": losses[-1],
              "trainable_parameters": len(manifest["trainable"]), "frozen_parameters": len(manifest["frozen"]),
              "batchnorm_folded": manifest["batchnorm_folded"]}
    if held:
        report["masks"] = held
    return tuned, report


def _train_in_child(directory: Path, manifest: dict, calibration, steps: int, lr: float, batch_size: int, seed: int,
                    masked: tuple[str, ...] = (), dense: dict[str, np.ndarray] | None = None):
    """`_train` in a child process on the artifacts in `directory`; a crash there (a signal) or a failure of
    onnxruntime-training becomes a one-line NotTrainable, a bug of ours an InternalError."""
    arrays = calibration.arrays  # a part of a set copies its samples on every read
    names = list(arrays)
    np.savez(directory / "data.npz", *[arrays[name] for name in names])  # arr_0, arr_1, ...
    if dense is not None:
        np.savez(directory / "dense.npz", **dense)
    (directory / "job.json").write_text(json.dumps({"steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed,
                                                    "names": names, "masked": list(masked),
                                                    "splicing": dense is not None}))
    root = str(Path(__file__).resolve().parents[2])  # so the child imports this very onnxprune
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    started = time.perf_counter()
    child = subprocess.run([sys.executable, "-c", _CHILD, str(directory)], env=env, capture_output=True,
                           text=True, errors="replace")
    log.debug("fine-tuning child process: exit code %s after %.2f s; its stderr ends: %s", child.returncode,
              time.perf_counter() - started, child.stderr[-2000:])
    result_path = directory / "result.json"
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    if child.returncode < 0:
        try:
            name = signal.Signals(-child.returncode).name
        except ValueError:
            name = f"signal {-child.returncode}"
        raise NotTrainable(f"onnxruntime-training crashed ({name}) running this model's training steps; nothing was "
                           "written: prune without fine-tuning (--finetune-steps 0), or write training artifacts "
                           "with `onnxprune export-training` and fine-tune them elsewhere")
    if child.returncode != 0 or "error" in result:
        if result.get("kind") == "runtime":  # onnxruntime-training's own failures while running the graph
            raise NotTrainable(f"onnxruntime-training failed to run this model's training graph ({result['error']}): "
                               "fine-tune it in the framework it came from")
        if result.get("kind") == "internal":
            raise InternalError(f"fine-tuning failed: {result['error']}")
        last = (child.stderr.strip().splitlines() or ["no output"])[-1][-300:]
        raise NotTrainable(f"the fine-tuning process exited with code {child.returncode} ({last}): prune without "
                           "fine-tuning (--finetune-steps 0), or fine-tune with `onnxprune export-training` artifacts")
    tuned = onnx.load(str(directory / "finetuned.onnx"))
    return tuned, result["before"], result["after"], result["losses"], result.get("masks")


def _child_main(directory: str) -> int:
    """The child process: run the job in `directory` (artifacts, data.npz, job.json), write finetuned.onnx
    and result.json (losses, or the error)."""
    from ..calib import CalibrationSet

    directory = Path(directory)
    try:
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)
        api, _, _ = require_training()
        job = json.loads((directory / "job.json").read_text())
        manifest = json.loads((directory / MANIFEST).read_text())
        with np.load(directory / "data.npz") as data:
            calibration = CalibrationSet({name: data[f"arr_{i}"] for i, name in enumerate(job["names"])})
        dense = None
        if job.get("splicing"):
            with np.load(directory / "dense.npz") as stored:
                dense = {name: stored[name] for name in stored.files}
        before, after, losses, held = _train(api, directory, manifest, calibration, job["steps"], job["lr"],
                                             job["batch_size"], job["seed"], job.get("masked", []), dense)
        result = {"before": before, "after": after, "losses": losses, "masks": held}
    except RuntimeError as exc:  # onnxruntime's errors (Fail, RuntimeException, ...) derive from it
        result = {"kind": "runtime", "error": _reason(exc)}
    except Exception as exc:  # noqa: BLE001 -- reported by the parent as an internal error
        result = {"kind": "internal", "error": f"{type(exc).__name__}: {exc}"[:500]}
    (directory / "result.json").write_text(json.dumps(result))
    return 1 if "error" in result else 0


def _train(api, directory: Path, manifest: dict, calibration, steps: int, lr: float, batch_size: int, seed: int,
           masked: list[str] = (), dense: dict[str, np.ndarray] | None = None):
    """Run the steps through the artifacts in `directory` and write finetuned.onnx there; (loss before,
    after, step losses, the held masks' summary or None). The `masked` parameters' masks are re-applied
    after every optimizer step (spliced with `dense`)."""
    state = api.CheckpointState.load_checkpoint(str(directory / "checkpoint"))
    module = api.Module(str(directory / "training_model.onnx"), state, str(directory / "eval_model.onnx"))
    optimizer = api.Optimizer(str(directory / "optimizer_model.onnx"), module)
    optimizer.set_learning_rate(lr)
    inputs = manifest["inputs"]
    held = HeldWeights(state.parameters, list(masked), dense) if masked else None
    before = _eval_loss(module, calibration, batch_size, inputs)
    module.train()
    losses = []
    for feed in _shuffled_batches(calibration, batch_size, steps, seed):
        losses.append(float(module(*[feed[n] for n in inputs])))
        optimizer.step()
        module.lazy_reset_grad()
        if held is not None:
            held.after_step()
    after = _eval_loss(module, calibration, batch_size, inputs)
    module.export_model_for_inferencing(str(directory / "finetuned.onnx"), manifest["outputs"])
    return before, after, losses, held.summary() if held is not None else None


def _shuffled_batches(calibration, batch_size: int, steps: int, seed: int):
    rng = np.random.default_rng(seed)
    count, arrays = calibration.count, calibration.arrays  # read once: a part copies its samples on every read
    size = min(batch_size, count)
    done = 0
    while done < steps:
        order = rng.permutation(count)
        for start in range(0, count - size + 1, size):
            if done == steps:
                return
            pick = order[start:start + size]
            yield {name: array[pick] for name, array in arrays.items()}
            done += 1


def _eval_loss(module, calibration, batch_size: int, inputs: list[str]) -> float:
    """Mean loss over the calibration data (weighted by batch size) in eval mode."""
    module.eval()
    total = count = 0
    for feed in calibration.batches(batch_size):
        n = len(next(iter(feed.values())))
        total += float(module(*[feed[name] for name in inputs])) * n
        count += n
    return total / max(count, 1)


def _drop_unused(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove nodes and initializers no graph output needs (the teacher's, when export keeps them)."""
    needed = {o.name for o in model.graph.output}
    kept = []
    for node in reversed(model.graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
    if len(kept) == len(model.graph.node):
        return model
    del model.graph.node[:]
    model.graph.node.extend(reversed(kept))
    initializers = [t for t in model.graph.initializer if t.name in needed]
    del model.graph.initializer[:]
    model.graph.initializer.extend(initializers)
    return model


def _restore_metadata(tuned: onnx.ModelProto, model: onnx.ModelProto) -> onnx.ModelProto:
    """Keep the input model's IR version, producer, metadata and I/O declarations; drop the intermediate
    shapes training recorded (at the calibration data's shape, which need not be the only one)."""
    tuned.ir_version = model.ir_version
    del tuned.graph.value_info[:]
    del tuned.metadata_props[:]
    tuned.metadata_props.extend(model.metadata_props)
    for field in ("input", "output"):
        declared = {v.name: v for v in getattr(model.graph, field)}
        values = getattr(tuned.graph, field)
        for value in values:
            if value.name in declared:
                value.CopyFrom(declared[value.name])
    return tuned
