"""Command line: parse, call the library, print, map errors to exit codes. No pruning logic here.

Options come in groups (`OptionGroup`), each setting its own part of `PruneConfig`; every command runs
inside one error handler (`command`) and the commands that write a model share one tail (`finish`).
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import sys
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import click

from . import progress
from .calib.data import is_loader_script
from .cluster import require_ray
from .config import PFP_MODES, PruneConfig
from .errors import InternalError, OnnxPruneError, UsageError, ValidationFailed
from .io import check_output_path, load_model, parse_input_shape, save_model
from .lowrank import DEFAULT_MAX_ERROR, check_rank
from .pipeline import prune
from .plan import Plan
from .recover import FINETUNE_LR, METHODS as RECOVERY_METHODS
from .recover.training import LOSSES, export_training, require_training
from .report import (format_finetune_summary, format_inspect, format_markdown, format_summary, title,
                     write_bytes_atomic, write_json_atomic)
from .scoring import SCORERS
from .quantize import FORMATS as QUANTIZE_FORMATS
from .sparsity import METHODS as SPARSITY_METHODS
from .sparsity.storage import INDEX_FORMS
from .sweep import format_table, parse_values, plot_png, require_matplotlib, settings_grid, sweep
from .validate.compare import parse_output_axes
from .validate.gates import Gates, describe, failed_checks
from .validate.latency import DEFAULT_RUNS, DEFAULT_THREADS, DEFAULT_WARMUP, LatencyConfig
from .version import __version__
from .workflows import finetune, inspect
from .limits import DEFAULT_ERROR as DEFAULT_LIMIT_ERROR, format_limits, limits, plot_limits


class DefaultToPrune(click.Group):
    """`onnxprune IN OUT ...` means `onnxprune prune IN OUT ...`; a usage error is one line, as every error."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            where = f": see '{exc.ctx.command_path} --help'" if getattr(exc, "ctx", None) is not None else ""
            click.echo(f"error: {exc.format_message().rstrip('.')}{where}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["prune", *args]
        return super().parse_args(ctx, args)


@click.group(cls=DefaultToPrune, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnxprune")
def main():
    """Make ONNX models smaller and faster by removing channels, validated with onnxruntime.

    \b
      onnxprune in.onnx out.onnx --filters 0.5      (same as: onnxprune prune ...)
      onnxprune inspect in.onnx
    """


# ---------------------------------------------------------------- option groups


@dataclass
class OptionGroup:
    """Click options and the PruneConfig fields they set (`config`: parsed values -> fields)."""

    options: list
    config: Callable[[dict], dict] = lambda values: {}

    def __call__(self, fn):
        for option in reversed(self.options):
            fn = option(fn)
        return fn


def config_from(values: dict, *groups: OptionGroup, **fields) -> PruneConfig:
    """The PruneConfig that `groups` make of the parsed `values`, plus `fields`."""
    for group in groups:
        fields.update(group.config(values))
    return PruneConfig(**fields)


def _fraction(name: str, help: str):
    return click.option(name, type=click.FloatRange(0, 1), default=None, metavar="X", help=help)


def _input_shapes(values) -> dict[str, list[int]]:
    return dict(parse_input_shape(v) for v in values)


LOGGING = OptionGroup([
    click.option("-v", "--verbose", count=True, help="More log output (-vv for debug)."),
    click.option("-q", "--quiet", is_flag=True, help="Print errors only."),
    click.option("--debug", is_flag=True, help="Show tracebacks on errors."),
])

INPUT_SHAPES = OptionGroup([
    click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:DIMS",
                 help="Static shape for a dynamic input, e.g. input:1x3x224x224 (repeatable)."),
], lambda v: {"input_shapes": _input_shapes(v["input_shapes"])})

EXCLUDE = OptionGroup([
    click.option("--exclude", multiple=True, metavar="PATTERN",
                 help="Leave groups touching nodes whose name matches this glob whole (repeatable)."),
    click.option("--hidden", is_flag=True,
                 help="Also prune the hidden size (a transformer's residual width) through LayerNormalization: "
                      "inexact, LayerNorm's statistics change; outputs carrying it keep their width, zeros where removed."),
    click.option("--no-simplify", "simplify", is_flag=True, flag_value=False, default=True,
                 help="Keep the graph's op patterns as they are: by default, arithmetic with per-channel constants "
                      "after a Conv (or before one that pads nothing) is folded into it and a hard swish written out "
                      "in four ops becomes one or two."),
], lambda v: {"exclude": tuple(v["exclude"]), "hidden": v["hidden"], "simplify": v["simplify"]})

SEED = OptionGroup([
    click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed for every random choice."),
], lambda v: {"seed": v["seed"]})

class RoundTo(click.ParamType):
    name = "round_to"

    def convert(self, value, param, ctx):
        if value == "auto" or isinstance(value, int):
            return value
        if str(value).isdigit() and int(value) >= 1:
            return int(value)
        self.fail(f"{value!r} is neither a positive number of channels nor auto", param, ctx)


CHANNELS = OptionGroup([
    click.option("--global", "global_ranking", is_flag=True, help="Rank channels of all groups together."),
    click.option("--scorer", type=click.Choice(sorted(SCORERS)), default=None,
                 help="Channel importance: obs (reconstruction-aware: what least squares can best do without, "
                      "budgets by error per MAC), pfp (Provable Filter Pruning: sensitivity on the calibration "
                      "data, with per-layer budgets), wanda (|W| x input norm), activation (mean |a|), filter "
                      "L1/L2 norm, BatchNorm |gamma|, or random [default: obs with --calib or "
                      "--data-loader-script, else l1]."),
    click.option("--round-to", type=RoundTo(), default=None, metavar="N|auto",
                 help="Keep channel counts at multiples of N, or per group at the multiple the latency model "
                      "measured fastest (auto; builds it like --predict-latency) [default: 8 for groups of 16+ "
                      "channels; with a latency target, a Conv's at onnxruntime's channel block on this machine when "
                      "larger, 16 with AVX-512]."),
], lambda v: {"global_ranking": v["global_ranking"], "scorer": v["scorer"], "round_to": v["round_to"]})


def _calibration_config(v: dict) -> dict:
    script, calib = v["data_loader_script"], v["calib"]
    if script is not None and calib is not None:
        raise UsageError("give calibration data once: --calib or --data-loader-script, not both")
    if script is not None and not is_loader_script(script):
        raise UsageError(f"--data-loader-script '{script}': give it as file.py:function")
    return {"calibration": script if script is not None else calib, "preprocess": v["preprocess"],
            "calib_samples": v["calib_samples"], "calib_batch": v["calib_batch"], "pfp_mode": v["pfp_mode"]}


CALIBRATION = OptionGroup([
    click.option("--calib", type=click.Path(path_type=Path), default=None,
                 help="Calibration data for scoring, recovery and validation: .npz (arrays named after the inputs, "
                      "optional labels), .npy (one-input model) or a directory of images (see --preprocess)."),
    click.option("--data-loader-script", default=None, metavar="FILE.py:FUNC",
                 help="Calibration data from a Python function (no arguments) returning feed dicts "
                      "{input name: array}: an iterable, a generator or an object with get_next()."),
    click.option("--preprocess", default=None, metavar="SPEC",
                 help="For a --calib (and --eval) directory of images: a preset (imagenet, imagenet-caffe, unit, symmetric) "
                      "and/or key=value pairs: size=HxW, resize=F, layout=nchw|nhwc, color=rgb|bgr|gray, "
                      "scale=F, mean=A/B/C, std=A/B/C [default: unit = pixels/255 at the model's size]."),
    click.option("--calib-samples", type=click.IntRange(min=1), default=None, metavar="N",
                 help="Use at most N calibration samples."),
    click.option("--calib-batch", type=click.IntRange(min=1), default=None, metavar="N",
                 help="Samples per activation-capture batch [default: from a 96 MB activation budget, <= 32]."),
    click.option("--pfp-mode", type=click.Choice(PFP_MODES), default="topk", show_default=True,
                 help="pfp: keep the most sensitive channels, or sample them as the paper does and re-weight "
                      "the kept ones (count / (m p)) in the next layers."),
], _calibration_config)


LOWRANK = OptionGroup([
    click.option("--rank", default=None, metavar="R|auto",
                 help="Factorize Conv/Gemm/MatMul layers after channel pruning: keep fraction R of each layer's "
                      "rank, or 'auto' (smallest rank within --lowrank-error, or meeting --target-macs)."),
    click.option("--lowrank-error", type=float, default=DEFAULT_MAX_ERROR, show_default=True, metavar="E",
                 help="With --rank auto: largest relative output error of each factorized layer, in (0, 1)."),
    click.option("--target-macs", type=float, default=None, metavar="F",
                 help="Fraction of the original MACs to keep, in (0, 1]. With --rank auto the ranks are chosen to "
                      "meet it (after --filters, if given), minimizing the worst layer error."),
], lambda v: {"rank": check_rank(v["rank"]) if v["rank"] is not None else None, "lowrank_error": v["lowrank_error"], "target_macs": v["target_macs"]})

SPARSITY = OptionGroup([
    click.option("--sparsity", type=float, default=None, metavar="S",
                 help="Zero share S of the weights of Conv/Gemm/MatMul layers (after channel pruning and recovery; "
                      "alone it removes no channel), each layer's share from one global budget."),
    click.option("--sparsity-pattern", default=None, metavar="P",
                 help="unstructured, N:M (N weights kept of every M consecutive inputs, e.g. 2:4) or block:RxC "
                      "(whole blocks of R outputs by C inputs) [default: unstructured]."),
    click.option("--sparsity-method", type=click.Choice(SPARSITY_METHODS), default=None,
                 help="Which weights go: the OBS saliency with the optimal update of the rest (needs --calib), or "
                      "magnitude [default: obs with --calib, else magnitude]."),
    click.option("--splicing", is_flag=True,
                 help="With --sparsity and --finetune-steps: during fine-tuning, zeroed weights whose magnitude "
                      "rises above the layer's upper threshold come back and kept ones below its lower threshold go "
                      "(Dynamic Network Surgery); without it the zeros are held."),
    click.option("--sparse-index", type=click.Choice(INDEX_FORMS), default="int64", show_default=True,
                 help="Index type of the weights stored sparse: int64, valid ONNX for every runtime, or the "
                      "smallest that holds each tensor's size (int8-int32: a smaller file that only onnxruntime "
                      "loads; onnx.checker refuses it)."),
    click.option("--quantize", type=click.Choice(QUANTIZE_FORMATS), default=None,
                 help="Then quantize the result with onnxruntime's static QDQ quantization (int8 weights per channel, "
                      "int8 activations with ranges from the calibration data); validated and gated as the output, "
                      "the pruned-only figures beside it."),
    click.option("--quantize-exclude", multiple=True, metavar="NODE",
                 help="With --quantize: leave the nodes matching this name glob float (repeatable); the report's "
                      "quantize.worst_layers names the nodes that lose most."),
], lambda v: {"quantize_exclude": tuple(v["quantize_exclude"]), "sparsity": v["sparsity"], "sparsity_pattern": v["sparsity_pattern"],
              "sparsity_method": v["sparsity_method"], "splicing": v["splicing"], "sparse_index": v["sparse_index"],
              "quantize": v["quantize"]})

RECOVERY = OptionGroup([
    click.option("--recover", type=click.Choice(RECOVERY_METHODS), default=None,
                 help="Re-fit the layers whose inputs changed so their outputs match the original's on the "
                      "calibration data: least squares, biases only, or not [default: lstsq with --calib, else none]."),
    click.option("--steps", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
                 help="Reach the target in N prune-and-recover steps (each 1/N of the way, geometrically), "
                      "re-scoring the pruned model and re-fitting it to the original after each. With --sparsity "
                      "the steps raise the weights' sparsity (channels are pruned in one step)."),
    click.option("--finetune-steps", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
                 help="Then run N distillation steps towards the original through onnxruntime-training "
                      "(needs its own environment; the error says how to set it up); with --steps, after "
                      "every step."),
    click.option("--finetune-lr", type=click.FloatRange(min=0, min_open=True), default=FINETUNE_LR, show_default=True,
                 help="AdamW learning rate of --finetune-steps."),
], lambda v: {"recover": v["recover"], "steps": v["steps"], "finetune_steps": v["finetune_steps"],
              "finetune_lr": v["finetune_lr"]})


def _evaluation_config(v: dict) -> dict:
    latency = None
    implied = [v.get(k) for k in ("min_speedup", "target_latency", "target_speedup")]
    modelled = v.get("predict_latency") or v.get("round_to") == "auto"  # the latency model is built
    if v["latency"] or modelled or any(x is not None for x in implied):  # measured with these too
        latency = LatencyConfig(runs=v["latency_runs"], warmup=v["latency_warmup"], threads=v["threads"])
    return {"evaluation": v["eval_data"], "labels": v["labels"], "latency": latency,
            "output_axes": parse_output_axes(v["output_axes"])}


EVALUATION = OptionGroup([
    click.option("--eval", "eval_data", type=click.Path(path_type=Path), default=None,
                 help="Validate and evaluate on this data (.npz/.npy, or a directory of images read as --preprocess "
                      "says) instead of the calibration data."),
    click.option("--labels", "labels", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 help="Class labels for the evaluation data (.npy, or .npz with 'labels'): accuracy and per-class recall."),
    click.option("--output-axis", "output_axes", multiple=True, metavar="NAME:AXIS",
                 help="The channel axis of output NAME for per-channel fidelity, where it is not axis 1, e.g. "
                      "out:3 for NHWC (repeatable)."),
    click.option("--latency", is_flag=True, help="Measure onnxruntime CPU latency before and after."),
    click.option("--latency-runs", type=click.IntRange(min=1), default=DEFAULT_RUNS, show_default=True,
                 help="Timed runs per model (median reported), after the warm-up runs."),
    click.option("--latency-warmup", type=click.IntRange(min=0), default=DEFAULT_WARMUP, show_default=True),
    click.option("--threads", type=click.IntRange(min=0), default=DEFAULT_THREADS, show_default=True,
                 help="onnxruntime intra-op threads for the latency measurement and the latency model "
                      "(0: onnxruntime's default)."),
], _evaluation_config)

LATENCY_BUDGET = OptionGroup([
    click.option("--target-latency", type=float, default=None, metavar="MS",
                 help="Prune to this measured onnxruntime CPU latency (--threads) instead of a channel or MACs "
                      "budget: each layer is timed at a few widths, the channels go where error per ms saved is "
                      "lowest, and the result is measured (a few rounds if it misses). Implies --latency."),
    click.option("--target-speedup", type=float, default=None, metavar="X",
                 help="Likewise, to X times faster than the original measured in the same run."),
    click.option("--predict-latency", is_flag=True,
                 help="Build the latency model and report its prediction beside the measured latency."),
], lambda v: {"target_latency": v["target_latency"], "target_speedup": v["target_speedup"],
              "predict_latency": v["predict_latency"]})

GATES = OptionGroup([
    _fraction("--min-cosine", "Fail unless every output's cosine similarity to the original's is at least X."),
    _fraction("--min-top1-agreement", "Fail unless top-1 agreement with the original is at least X (classifiers)."),
    _fraction("--max-accuracy-drop", "Fail if accuracy drops by more than X, e.g. 0.01 = one point (needs labels)."),
    click.option("--min-speedup", type=click.FloatRange(min=0), default=None, metavar="X",
                 help="Fail unless measured latency before/after is at least X (implies --latency)."),
    _fraction("--max-macs", "Fail unless the result keeps at most fraction X of the original's MACs."),
    click.option("--max-channel-error", type=click.FloatRange(min=0), default=None, metavar="X",
                 help="Fail if any channel of any output has a relative L2 error above X (see --output-axis)."),
    click.option("--keep-failed", is_flag=True, help="Write the output even when a gate fails (exit code stays 1)."),
    click.option("--mobile", is_flag=True, help="Run onnxruntime's mobile usability check and write OUTPUT's .ort beside it."),
    click.option("--summary-md", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 help="Write a Markdown summary (for a CI job page) here."),
], lambda v: {"gates": Gates(v["min_cosine"], v["min_top1_agreement"], v["max_accuracy_drop"], v["min_speedup"],
                             v["max_macs"], v["max_channel_error"]), "mobile": v["mobile"]})

TRAINING = OptionGroup([
    click.option("--loss", type=click.Choice(LOSSES), default="mse", show_default=True,
                 help="Loss: mean squared error, or cross-entropy (against the teacher's softmax with --teacher, "
                      "else against integer labels)."),
    click.option("--frozen", multiple=True, metavar="PATTERN",
                 help="Do not train parameters whose initializer name matches this glob (repeatable)."),
])


# ---------------------------------------------------------------- the error handler and the shared tail


def command(fn):
    """Run a command body with logging set up, every failure mapped to one line and its exit code."""

    @functools.wraps(fn)
    def run(*args, verbose: int, quiet: bool, debug: bool, **values):
        _setup_output(verbose, quiet)
        _exit_on_terminate()
        try:
            fn(*args, quiet=quiet, **values)
        except Exception as exc:  # noqa: BLE001 - every failure maps to an exit code
            _fail(exc, debug)

    return LOGGING(run)


def _exit_on_terminate() -> None:
    """SIGTERM (a CI job cancelled, `timeout`) ends the run as an error does, unwinding it, so its
    temporary files and staged outputs are removed (Python's default would stop it where it stands)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)


def _terminated(signum, frame) -> None:
    click.echo("error: terminated (SIGTERM): nothing written, temporary files removed", err=True)
    raise SystemExit(128 + signum)


def _setup_output(verbose: int, quiet: bool) -> None:
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # onnxruntime's optimizer warnings are noise to our users
    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    progress.enabled = not quiet


def _fail(exc: BaseException, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    if isinstance(exc, OnnxPruneError):
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    detail = f"{exc}" if isinstance(exc, InternalError) else \
        f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    click.echo(f"internal error: {detail} (a bug in onnxprune: please report it; --debug shows the traceback)", err=True)
    sys.exit(InternalError.exit_code)


def check_outputs(inputs: list, *outputs) -> None:
    """Every output path that is given is writable and overwrites none of `inputs`."""
    for output in outputs:
        if output is not None:
            for source in inputs:
                check_output_path(output, source)


def ort_path(output: Path) -> Path:
    return output.with_suffix(".ort")


def finish(result, model: Path, output: Path, values: dict, summary: Callable[[dict, Path, Path], str],
           report_path=None, plan_out=None) -> None:
    """The end of every command that writes a model: the model (and its .ort) unless a gate failed
    without --keep-failed, the Markdown summary, the JSON report and plan, the terminal `summary` (of the
    report with `output_written`), and exit code 1 when a gate failed."""
    failed = failed_checks(result.report)
    written = not failed or values["keep_failed"]
    if written:
        save_model(result.model, output)
        if result.ort_model is not None:
            write_bytes_atomic(ort_path(output), result.ort_model)
            result.report["mobile"]["ort"]["file"] = str(ort_path(output))
    result.report["output_written"] = written
    if values["summary_md"]:
        write_bytes_atomic(values["summary_md"], format_markdown(result.report, model, output).encode())
    if report_path:
        write_json_atomic(report_path, result.report)
    if plan_out:
        write_json_atomic(plan_out, json.loads(result.plan.to_json()))
    if not values["quiet"]:
        click.echo(summary(result.report, model, output))
    if failed:
        where = "the output was written anyway (--keep-failed)" if written else \
            "the output was not written (--keep-failed writes it anyway)"
        raise ValidationFailed(f"validation failed: {'; '.join(describe(c) for c in failed)}; {where}")


# ---------------------------------------------------------------- commands


@main.command("prune")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--filters", type=float, default=None, metavar="R",
              help="Fraction of channels to remove from each prunable group (of all of them with --global), "
                   "in [0, 1) [default: 0.5, or 0 with --rank, --sparsity or --target-macs].")
@CHANNELS
@click.option("--report", "report_path", type=click.Path(path_type=Path), default=None, help="Write the JSON report here.")
@click.option("--plan-out", type=click.Path(path_type=Path), default=None, help="Write the kept channels as a JSON plan.")
@click.option("--plan-in", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Apply a plan from --plan-out instead of scoring.")
@SEED
@CALIBRATION
@LOWRANK
@SPARSITY
@RECOVERY
@EVALUATION
@LATENCY_BUDGET
@GATES
@INPUT_SHAPES
@EXCLUDE
@command
def prune_command(model, output, filters, report_path, plan_out, plan_in, **values):
    """Remove channels from MODEL, validate with onnxruntime, write OUTPUT."""
    check_outputs([model], output, report_path, plan_out, values["summary_md"],
                  ort_path(output) if values["mobile"] else None)
    config = config_from(values, CHANNELS, SEED, CALIBRATION, LOWRANK, SPARSITY, RECOVERY, EVALUATION, LATENCY_BUDGET,
                         GATES, INPUT_SHAPES, EXCLUDE, filters=filters, plan=_read_plan(plan_in) if plan_in else None,
                         latency_cache=latency_cache_path(output))
    result = prune(model, config)
    finish(result, model, output, values, format_summary, report_path, plan_out)


def latency_cache_path(output: Path) -> Path:
    """The latency model's cache beside OUTPUT: out.onnx -> out.latency.json."""
    return output.with_suffix(".latency.json")


def _read_plan(path: Path) -> Plan:
    try:
        return Plan.from_json(path.read_text())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"cannot read plan '{path}' ({exc}): give a file written by --plan-out") from None


@main.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--limits", "show_limits", is_flag=True,
              help="Per channel group and per layer, the largest share removable at --limit-error, and the whole "
                   "model's curves (needs --calib).")
@click.option("--limit-error", type=float, default=DEFAULT_LIMIT_ERROR, show_default=True, metavar="E",
              help="With --limits: the relative L2 output error allowed.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --limits: write the error curves as a PNG here (needs matplotlib).")
@SEED
@CALIBRATION
@INPUT_SHAPES
@EXCLUDE
@command
def inspect_command(model, as_json, show_limits, limit_error, plot_path, input_shapes, exclude, hidden, simplify, quiet,
                    **values):
    """Show MODEL's channel groups, what blocks them, coverage, params and MACs."""
    if not show_limits:
        if plot_path or values["calib"] or values["data_loader_script"]:
            raise UsageError("--calib and --plot belong to --limits: add --limits, or leave them out")
        info = inspect(model, _input_shapes(input_shapes), tuple(exclude), hidden, simplify)
        click.echo(json.dumps(info, indent=1) if as_json else format_inspect(info, model))
        return
    check_outputs([model], plot_path)
    if plot_path:
        require_matplotlib()
    config = config_from({**values, "input_shapes": input_shapes, "exclude": exclude, "hidden": hidden,
                          "simplify": simplify}, SEED, CALIBRATION,
                         INPUT_SHAPES, EXCLUDE)
    table = limits(model, config, limit_error)
    if plot_path:
        write_bytes_atomic(plot_path, plot_limits(table))
    click.echo(json.dumps(table, indent=1) if as_json else format_limits(table))


@main.command("sweep")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--filters", "filters_list", default=None, metavar="R,R,...",
              help="Comma-separated fractions of channels to remove, one setting each "
                   "[default: 0.1,0.2,0.3,0.4,0.5, or 0 with --rank].")
@click.option("--rank", "ranks_list", default=None, metavar="R,R,...",
              help="Comma-separated low-rank settings, crossed with --filters.")
@CHANNELS
@SEED
@click.option("--no-sensitivity", is_flag=True, help="Skip per-group sensitivity (each group pruned alone).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the sweep table as JSON here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a PNG plot here (needs matplotlib: pip install 'onnxprune[plot]').")
@click.option("--ray", "ray_address", default=None, metavar="auto|ADDRESS",
              help="Run the settings as tasks on a Ray cluster: 'auto' (RAY_ADDRESS, the cluster running here, "
                   "else a new local one) or the cluster's address (needs pip install 'onnxprune[ray]').")
@CALIBRATION
@RECOVERY
@EVALUATION
@INPUT_SHAPES
@EXCLUDE
@command
def sweep_command(model, filters_list, ranks_list, no_sensitivity, report_path, plot_path, ray_address, **values):
    """Prune MODEL at several settings; tabulate fidelity, accuracy, MACs, params, latency, sensitivity."""
    check_outputs([model], report_path, plot_path)
    if plot_path:
        require_matplotlib()
    if ray_address:
        require_ray()
    settings = settings_grid(parse_values(filters_list, "--filters") if filters_list else None,
                             parse_values(ranks_list, "--rank") if ranks_list else None)
    config = config_from(values, CHANNELS, SEED, CALIBRATION, RECOVERY, EVALUATION, INPUT_SHAPES, EXCLUDE,
                         latency_cache=latency_cache_path(report_path) if report_path else None)
    table = sweep(model, config, settings, sensitivity=not no_sensitivity, ray=ray_address)
    if report_path:
        write_json_atomic(report_path, table)
    if plot_path:
        write_bytes_atomic(plot_path, plot_png(table))
    if not values["quiet"]:
        click.echo(format_table(table))


@main.command("export-training")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--teacher", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Train against this model's outputs (the original, for distillation: no labels needed).")
@TRAINING
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:DIMS",
              help="Shape to train at, e.g. x:1x3x48x192 (repeatable): onnxruntime's pooling gradients need "
                   "static dims.")
@command
def export_training_command(model, directory, teacher, loss, frozen, input_shapes, quiet):
    """Write onnxruntime training artifacts for MODEL into DIRECTORY (needs onnxruntime-training)."""
    require_training()
    teacher_model = load_model(teacher) if teacher else None
    manifest = export_training(load_model(model), directory, loss, teacher_model, tuple(frozen),
                               input_shapes=_input_shapes(input_shapes) or None)
    if quiet:
        return
    target = "the teacher's outputs (no labels needed)" if manifest["teacher"] else f"a '{manifest['targets'][0]}' input"
    click.echo(title(f"training artifacts for {model} in {directory}") + "\n"
               f"  files     training_model.onnx, eval_model.onnx, optimizer_model.onnx (AdamW), checkpoint\n"
               f"  loss      {loss} of {', '.join(manifest['loss_outputs'])} against {target}\n"
               f"  params    {len(manifest['trainable'])} trainable, {len(manifest['frozen'])} frozen"
               + (f"; {manifest['batchnorm_folded']} BatchNormalization folded (frozen statistics)"
                  if manifest["batchnorm_folded"] else ""))


@main.command("finetune")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--teacher", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The original model whose outputs MODEL learns to reproduce.")
@click.option("--calib", type=click.Path(path_type=Path), required=True, help="Inputs to train on (.npz or .npy).")
@click.option("--steps", type=click.IntRange(min=1), default=100, show_default=True, help="Distillation steps.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=FINETUNE_LR, show_default=True,
              help="AdamW learning rate.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), default=None, help="Write the JSON report here.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the batch order.")
@TRAINING
@EVALUATION
@GATES
@INPUT_SHAPES
@command
def finetune_command(model, output, teacher, calib, steps, lr, report_path, seed, loss, frozen, **values):
    """Distil TEACHER into MODEL on the calibration inputs, validate like prune, write OUTPUT."""
    require_training()
    check_outputs([model, teacher], output, report_path, values["summary_md"])
    config = config_from(values, EVALUATION, GATES, INPUT_SHAPES, calibration=calib, seed=seed, finetune_steps=steps,
                         finetune_lr=lr)
    result = finetune(model, teacher, config, loss=loss, frozen=tuple(frozen))
    finish(result, model, output, values, format_finetune_summary, report_path)


if __name__ == "__main__":
    main()
