"""Command line: parse, call the library, print, map errors to exit codes. No pruning logic here."""

from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path

import click

from . import __version__
from .errors import InternalError, OnnxPruneError, UsageError
from .io import check_output_path, parse_input_shape, save_model
from .pipeline import PruneConfig, inspect, prune
from .plan import Plan
from .report import format_inspect, format_summary, write_json_atomic


class DefaultToPrune(click.Group):
    """`onnxprune IN OUT ...` means `onnxprune prune IN OUT ...`."""

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


def _shapes(values) -> dict[str, list[int]]:
    return dict(parse_input_shape(v) for v in values)


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _fail(exc: BaseException, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    if isinstance(exc, OnnxPruneError):
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    if isinstance(exc, InternalError):
        click.echo(f"internal error: {exc} (a bug in onnxprune: please report it; --debug shows the traceback)", err=True)
        sys.exit(InternalError.exit_code)
    detail = str(exc).splitlines()[0] if str(exc) else ""
    click.echo(f"internal error: {type(exc).__name__}: {detail} (a bug in onnxprune: please report it; "
               "--debug shows the traceback)", err=True)
    sys.exit(InternalError.exit_code)


common_options = [
    click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:DIMS",
                 help="Static shape for a dynamic input, e.g. input:1x3x224x224 (repeatable)."),
    click.option("--exclude", multiple=True, metavar="PATTERN",
                 help="Leave groups touching nodes whose name matches this glob whole (repeatable)."),
    click.option("-v", "--verbose", count=True, help="More log output (-vv for debug)."),
    click.option("-q", "--quiet", is_flag=True, help="Print errors only."),
    click.option("--debug", is_flag=True, help="Show tracebacks on errors."),
]


def with_common(fn):
    for option in reversed(common_options):
        fn = option(fn)
    return fn


@main.command("prune")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--filters", type=click.FloatRange(0, 1, max_open=True), default=0.5, show_default=True,
              help="Fraction of channels to remove from each prunable group (of all of them with --global).")
@click.option("--global", "global_ranking", is_flag=True, help="Rank channels of all groups together.")
@click.option("--scorer", type=click.Choice(["l1", "l2", "bn", "random"]), default="l1", show_default=True,
              help="Channel importance: filter L1/L2 norm, BatchNorm |gamma|, or random.")
@click.option("--round-to", type=click.IntRange(min=1), default=None,
              help="Keep channel counts at multiples of N [default: 8 for groups of 16+ channels].")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="Calibration data (.npz named after the inputs, or .npy) for validation.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), default=None, help="Write the JSON report here.")
@click.option("--plan-out", type=click.Path(path_type=Path), default=None, help="Write the kept channels as a JSON plan.")
@click.option("--plan-in", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Apply a plan from --plan-out instead of scoring.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for every random choice.")
@with_common
def prune_command(model, output, filters, global_ranking, scorer, round_to, calib, report_path, plan_out, plan_in,
                  seed, input_shapes, exclude, verbose, quiet, debug):
    """Remove channels from MODEL, validate with onnxruntime, write OUTPUT."""
    _setup_logging(verbose, quiet)
    try:
        check_output_path(output, model)
        for extra in (report_path, plan_out):
            if extra is not None:
                check_output_path(extra, model)
        plan = _read_plan(plan_in) if plan_in else None
        config = PruneConfig(filters=filters, global_ranking=global_ranking, scorer=scorer, round_to=round_to,
                             exclude=tuple(exclude), input_shapes=_shapes(input_shapes), calibration=calib,
                             seed=seed, plan=plan)
        result = prune(model, config)
        save_model(result.model, output)
        if report_path:
            write_json_atomic(report_path, result.report)
        if plan_out:
            write_json_atomic(plan_out, json.loads(result.plan.to_json()))
    except Exception as exc:  # noqa: BLE001 - every failure maps to an exit code
        _fail(exc, debug)
    if not quiet:
        click.echo(format_summary(result.report, model, output))


def _read_plan(path: Path) -> Plan:
    try:
        return Plan.from_json(path.read_text())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"cannot read plan '{path}' ({exc}): give a file written by --plan-out") from None


@main.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@with_common
def inspect_command(model, as_json, input_shapes, exclude, verbose, quiet, debug):
    """Show MODEL's channel groups, what blocks them, coverage, params and MACs."""
    _setup_logging(verbose, quiet)
    try:
        info = inspect(model, _shapes(input_shapes), tuple(exclude))
    except Exception as exc:  # noqa: BLE001
        _fail(exc, debug)
    click.echo(json.dumps(info, indent=1) if as_json else format_inspect(info, model))


if __name__ == "__main__":
    main()
