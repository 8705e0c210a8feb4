"""What every pruning of one model shares, computed once: `prepare` loads the model and its data,
and `Baseline` keeps them with the original's outputs, sessions and scores for every run on it."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

import onnx

from .calib import CalibrationSet, fixed_batch, input_specs, load_calibration, synthetic
from .calib.data import can_hold_out
from .config import PruneConfig, fits_calibration
from .errors import ModelError, UsageError
from .io import inlined, load_model
from .loading import Loaded, load, releasable, released_model, unparsed
from .runtime import is_onnxruntime_error, run_batch_size, session, short_message
from .scoring import score
from .validate import run_model
from .validate.compare import check_output_axes
from .validate.gates import check_channel_gate, check_gate_requirements
from .validate.labels import load_labels

SYNTHETIC_SAMPLES = 8

# output element types that may be floating-point (UNDEFINED: not declared)
MAYBE_FLOATING = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                  onnx.TensorProto.UNDEFINED}


@dataclass
class Baseline:
    """What every pruning of one model shares, computed once: the loaded model, the calibration and
    evaluation data, and (on first use) the original's outputs and sessions. `prepare` makes one; a
    sweep passes it to `prune` for each setting instead of a path, so nothing is loaded or run twice."""

    loaded: Loaded
    specs: list
    calibration: CalibrationSet
    evaluation: CalibrationSet  # validation data: the calibration data unless other data was given
    output_axes: dict[str, int] = field(default_factory=dict)  # channel axis of outputs where it is not 1
    in_sample: CalibrationSet | None = None  # when `evaluation` is the calibration's held-out part: the rest,
    # the samples fits use (see `fit_data`), for the in-sample figure beside the held-out one
    evaluation_fitted: bool = False  # fits used the evaluation samples themselves (no hold-out was possible)
    _reference: dict | None = None
    _reference_in_sample: dict | None = None
    _sessions: dict = field(default_factory=dict)
    _scores: dict = field(default_factory=dict)

    @property
    def held_out(self) -> bool:
        """Whether `evaluation` is the calibration's held-out part, absent from every fit."""
        return self.in_sample is not None

    @property
    def fit_data(self) -> CalibrationSet:
        """The calibration samples fits may use: all but the held-out ones when fidelity is measured on those."""
        return self.in_sample if self.held_out else self.calibration

    @property
    def fixed_batch(self) -> int | None:
        return fixed_batch(self.specs)

    @property
    def run_batch(self) -> int:
        """Samples per onnxruntime run of the original (see `runtime.run_batch_size`)."""
        return run_batch_size(self.fixed_batch, self.loaded.shapes)

    @property
    def largest_batch(self) -> int:
        """The model's fixed batch, else runtime.MAX_BATCH: for stages that bound their memory themselves
        (low-rank calibration) or train in batches (fine-tuning)."""
        return run_batch_size(self.fixed_batch)

    def session(self, threads: int = 0):
        """A session of the original for latency measurement."""
        if threads not in self._sessions:
            self._sessions[threads] = session(self.loaded.runnable, threads=threads, timed=True)
        return self._sessions[threads]

    def scores(self, analysis, scorer: str, context, config: PruneConfig) -> dict:
        """`score(...)`, computed once per scorer and scoring options: the scores (and the statistics a
        scorer leaves in `context`) depend on the original model and data only, not on the ratio.
        While they are computed, a large model from a file is not held parsed (`released_model`)."""
        key = (scorer, config.seed, config.calib_batch, config.pfp_points, tuple(config.exclude), config.hidden,
               context.allocating)
        if key not in self._scores:
            before = len(context.notes)
            with released_model(self.loaded, analysis.graph) as model:
                context.model = model
                scores = score(analysis, scorer, context)
            context.model = self.loaded.model
            self._scores[key] = copy.deepcopy((scores, context.allocation, context.notes[before:]))
            return scores
        scores, context.allocation, notes = copy.deepcopy(self._scores[key])
        context.notes.extend(notes)
        return scores

    def reference(self) -> dict:
        """The original model's outputs on the evaluation data (and on the in-sample part with it)."""
        if self._reference is None:  # a session not kept for later holds no memory after this
            try:
                sess = self._sessions.get(0) or session(self.loaded.runnable)
                self._reference = run_model(sess, self.evaluation, self.run_batch, "original outputs")
                if self.held_out:
                    self._reference_in_sample = run_model(sess, self.in_sample, self.run_batch, "original outputs, in-sample")
            except Exception as exc:
                if not is_onnxruntime_error(exc):
                    raise
                advice = "the model is broken: fix or re-export it" if self.evaluation.source == "synthetic" else \
                    "check that the data fits the model's inputs"
                raise ModelError(f"onnxruntime cannot run the model on the {self.evaluation.source} data "
                                 f"({short_message(exc)}): {advice}") from None
        return self._reference

    def held_out_reference(self) -> dict | None:
        """The original's outputs on the calibration's held-out samples, when `evaluation` is them (else None)."""
        return self.reference() if self.held_out else None

    def reference_in_sample(self) -> dict:
        """The original model's outputs on the samples fits use (with a held-out evaluation only)."""
        self.reference()
        return self._reference_in_sample

    def pruned_to(self, model: onnx.ModelProto) -> "Baseline":
        """A baseline for the next step of --steps: `model` (a pruned copy of this one's) with the same data,
        scored from scratch (its reference outputs are not needed: every step is compared with the
        original's)."""
        return Baseline(load(model, self.loaded.input_shapes, vetted=True, simplify=False), self.specs, self.calibration,
                        self.evaluation, self.output_axes, self.in_sample, self.evaluation_fitted)

    def portable(self) -> "Baseline":
        """This baseline as another machine can take it (a sweep's Ray workers): the model in memory
        instead of a file path they may not have, the data already read, and none of what each process
        computes for itself (sessions, reference outputs, scores). Mapped weights are read into the model:
        the data file is on this machine only; so is the model as given, when ops.rules rewrote it."""
        given = self.loaded.given
        if self.loaded.simplified and self.loaded.path is not None:
            given = inlined(load_model(self.loaded.path))
        return Baseline(replace(self.loaded, model=inlined(self.loaded.model), file=None, given=given), self.specs,
                        self.calibration, self.evaluation, self.output_axes, self.in_sample, self.evaluation_fitted)

    def single_batch(self) -> dict:
        """One feed (batch 1, or the model's fixed batch) for latency and the .ort check."""
        size = min(self.fixed_batch or 1, self.evaluation.count)
        return next(self.evaluation.batches(size))


def prepare(model, config: PruneConfig | None = None) -> Baseline:
    """Load `model` and its data once (input shapes, calibration, evaluation, labels from `config`)."""
    config = config or PruneConfig()
    loaded = load(model, config.input_shapes, simplify=config.simplify)
    specs = input_specs(loaded.model, loaded.input_shapes)
    calibration = _calibration(config, specs)
    evaluation = _evaluation(config, specs, calibration)
    check_gate_requirements(config.gates, evaluation.labels is not None)
    output_shapes = {o.name: loaded.shapes.get(o.name) for o in loaded.model.graph.output}
    check_output_axes(config.output_axes, output_shapes)
    check_channel_gate(config.gates, {o.name: (output_shapes[o.name], o.type.tensor_type.elem_type in MAYBE_FLOATING)
                                      for o in loaded.model.graph.output}, config.output_axes)
    fitted = config.evaluation is None and fits_calibration(config, calibration)
    in_sample = None
    if fitted and can_hold_out(calibration, fixed_batch(specs)):
        evaluation, in_sample = evaluation.part(held=True), evaluation.part(held=False)
    baseline = Baseline(loaded, specs, calibration, evaluation, dict(config.output_axes), in_sample,
                        fitted and in_sample is None)
    if releasable(loaded):
        # onnxruntime needs about 3x a model's size to run it; with our parsed copy alive too, that
        # would be the job's peak. Run the original from its file without our copy, then parse again.
        with unparsed(loaded):
            baseline.reference()
    return baseline


def _calibration(config: PruneConfig, specs) -> CalibrationSet:
    data = config.calibration
    if data is None:  # whole batches of a model whose batch is fixed
        batch = fixed_batch(specs) or 1
        return synthetic(specs, -(-SYNTHETIC_SAMPLES // batch) * batch, config.seed)
    return load_calibration(data, specs, preprocess=config.preprocess, samples=config.calib_samples)


def _evaluation(config: PruneConfig, specs, calibration: CalibrationSet) -> CalibrationSet:
    data = config.evaluation
    if data is None:
        data = calibration
    elif not isinstance(data, CalibrationSet):
        data = load_calibration(data, specs, preprocess=config.preprocess)  # images as the calibration's
        data.source = "evaluation"
    if config.labels is not None:
        if data.source == "synthetic":
            raise UsageError("--labels needs the inputs they label: give them with --calib or --eval")
        data = CalibrationSet(data.arrays, load_labels(config.labels, data.count), data.source)
    return data
