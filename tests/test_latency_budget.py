"""--target-latency / --target-speedup / --predict-latency on a fake timer: the layers' timings are synthetic and
a model's "measured" latency is a function of its MACs, so the rounds are deterministic (speed figures are
bench/'s)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import onnxprune.speed as speed
import onnxprune.validate.result as result_module
from onnxprune import PruneConfig, prune, workdir
from onnxprune.config import check_config
from onnxprune.cli import main
from onnxprune.errors import UsageError
from onnxprune.plan import Plan
from onnxprune.report import latency_model_line
from onnxprune.validate import latency_model as lm

MODELS = Path(__file__).resolve().parents[1] / "models"
MNIST, CALIB = MODELS / "mnist_resnet.onnx", MODELS / "mnist_calib.npz"
REMAINDER_MS = 1.0  # what the other ops cost


def conv_widths(model) -> dict[str, tuple[int, int]]:
    """(input channels, output channels) of each Conv, by name."""
    weights = {t.name: t.dims for t in model.graph.initializer}
    return {n.name: (weights[n.input[1]][1], weights[n.input[1]][0]) for n in model.graph.node if n.op_type == "Conv"}


ORIGINAL = conv_widths(onnx.load(str(MNIST)))


def fake_ms(model) -> float:
    """A model's "measured" ms: the other ops' REMAINDER_MS, and per Conv 1 ms at full width, of which 0.3 ms
    stay and 0.7 ms scale with its channels in steps of 8."""
    total = REMAINDER_MS
    for name, (c_in, c_out) in conv_widths(model).items():
        full_in, full_out = ORIGINAL[name]
        p_in, p_out = min(np.ceil(c_in / 8) * 8, full_in) / full_in, min(np.ceil(c_out / 8) * 8, full_out) / full_out
        total += 0.3 + 0.7 * p_in * p_out
    return float(total)


FULL_MS = fake_ms(onnx.load(str(MNIST)))


STEPS = {}  # layer name -> the channel step of its synthetic timings, when not 8


def fake_fit(layer, threads):
    """Synthetic timings in which all of every layer's 1 ms scales with its channels, in steps of 8 (or
    `STEPS`): the model predicts more saved than `fake_ms` measures."""
    k_in, k_out = lm.sample_counts(layer.c_in, layer.c_out)
    step = STEPS.get(layer.name, 8)
    p_in, p_out = np.ceil(k_in / step) * step / layer.c_in, np.ceil(k_out / step) * step / layer.c_out
    cost = 1.0 if layer.name in ORIGINAL else 0.0  # the Gemm head costs nothing in `fake_ms`
    return lm.fit_layer(layer.name, layer.c_in, layer.c_out, k_in, k_out, cost * p_in * p_out)


@pytest.fixture
def fake_timer(monkeypatch):
    calls = {"layers": 0}

    def fits(layers, threads, cache, timer=None, write=True):
        def counted(layer, threads):
            calls["layers"] += 1
            return fake_fit(layer, threads)
        return lm.layer_fits(layers, threads, cache, counted, write)

    def compare(original_session, pruned, feed, config):
        after = fake_ms(pruned)
        return {"before": {"median_ms": FULL_MS, "p90_ms": 0.0},
                "after": {"median_ms": after, "p90_ms": 0.0}, "speedup": (FULL_MS) / after,
                "runs": 1, "warmup": 0, "threads": config.threads, "batch": 1}

    monkeypatch.setattr(speed, "layer_fits", fits)
    monkeypatch.setattr(speed, "compare_latency", compare)
    monkeypatch.setattr(result_module, "compare_latency", compare)
    monkeypatch.setattr(speed, "time_runs", lambda sessions, feed, config, clock=None: {
        name: np.full(3, (FULL_MS) / 1e3) for name in sessions})
    return calls


def test_the_rounds_tighten_until_the_measured_speedup_is_met(fake_timer):
    report = prune(str(MNIST), PruneConfig(calibration=str(CALIB), target_speedup=1.5, recover="none")).report
    latency = report["latency"]
    rounds = latency["rounds"]
    within = 1 + speed.TOLERANCE
    assert rounds[0]["measured_ms"] > rounds[0]["target_ms"] * within  # the fake over-promises: round 1 misses
    assert latency["met"] and rounds[-1]["measured_ms"] <= rounds[-1]["target_ms"] * within
    assert len(rounds) <= speed.ROUNDS
    assert rounds[1]["limit_ms"] < rounds[0]["predicted_ms"]
    assert latency["speedup"] >= 1.5 / within
    measured_share = latency["after"]["median_ms"] / latency["before"]["median_ms"]
    assert latency["prediction_error"] == pytest.approx(latency["predicted_ms"] / latency["model_original_ms"] / measured_share - 1)
    assert report["scoring"]["budget"]["unit"] == "ms"


def test_a_result_much_faster_than_the_goal_is_loosened_and_the_slowest_that_met_it_kept(fake_timer, monkeypatch):
    def generous(original_session, pruned, feed, config):  # saves twice what fake_ms says: the model under-promises
        after = FULL_MS - 2 * (FULL_MS - fake_ms(pruned))
        return {"before": {"median_ms": FULL_MS, "p90_ms": 0.0}, "after": {"median_ms": after, "p90_ms": 0.0},
                "speedup": FULL_MS / after, "runs": 1, "warmup": 0, "threads": config.threads, "batch": 1}

    monkeypatch.setattr(speed, "compare_latency", generous)
    monkeypatch.setattr(result_module, "compare_latency", generous)
    aims, choose = [], speed.choose  # every allocation's predicted-ms limit, measured or not
    monkeypatch.setattr(speed, "choose", lambda *a, target, **k: aims.append(target.limit) or choose(*a, target=target, **k))
    latency = prune(str(MNIST), PruneConfig(scorer="l1", round_to=1, target_speedup=1.25)).report["latency"]
    rounds = latency["rounds"]
    fast = [i for i, r in enumerate(rounds[:-1]) if r["measured_ms"] < r["target_ms"] * (1 - speed.TOLERANCE)]
    assert fast and all(rounds[i + 1]["limit_ms"] > rounds[i]["predicted_ms"] for i in fast)  # then aims slower
    too_fast, too_slow = rounds  # round 2 overshoots: the third aims between the two ...
    assert too_slow["measured_ms"] > too_slow["target_ms"] * (1 + speed.TOLERANCE)
    assert len(aims) == 3 and too_fast["predicted_ms"] < aims[2] < too_slow["predicted_ms"]
    # ... where the ratio search finds round 1's allocation again: not cut and measured a second time
    met = [r["measured_ms"] for r in rounds if r["measured_ms"] <= r["target_ms"] * (1 + speed.TOLERANCE)]
    assert latency["met"] and rounds[latency["chosen_round"]]["measured_ms"] == max(met)
    assert latency["after"]["median_ms"] == max(met)


def test_the_chosen_round_s_cut_model_is_the_result_not_cut_again(fake_timer, monkeypatch):
    import onnxprune.pipeline as pipeline

    cuts = []
    original_rewrite = speed.rewrite_channels
    monkeypatch.setattr(speed, "rewrite_channels", lambda *a: cuts.append(original_rewrite(*a)) or cuts[-1])
    monkeypatch.setattr(pipeline, "rewrite_channels", lambda *a: pytest.fail("the chosen round was cut again"))
    result = prune(str(MNIST), PruneConfig(scorer="l1", round_to=1, target_speedup=1.25, recover="none"))
    chosen = cuts[result.report["latency"]["chosen_round"]][0]
    assert conv_widths(result.model) == conv_widths(chosen)
    assert fake_ms(result.model) == result.report["latency"]["after"]["median_ms"]


def test_a_target_latency_in_ms_is_met_with_the_ratio_scorer_too(fake_timer):
    report = prune(str(MNIST), PruneConfig(scorer="l1", target_latency=7.0)).report
    assert report["latency"]["met"] and report["latency"]["after"]["median_ms"] <= 7.0 * (1 + speed.TOLERANCE)
    assert report["scoring"]["budget"]["unit"] == "ms"


def test_an_unreachable_target_exits_1_naming_what_was_reached_and_writes_nothing(fake_timer, tmp_path):
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, [str(MNIST), str(out), "--target-speedup", "50"])
    assert result.exit_code == 1, result.output
    assert "--target-speedup 50 is out of reach" in result.output and "speed-up over the original" in result.output
    assert list(tmp_path.iterdir()) == []


def test_the_cli_caches_the_fits_beside_the_output_and_a_plan_in_run_reuses_them(fake_timer, tmp_path):
    out, plan = tmp_path / "out.onnx", tmp_path / "plan.json"
    args = [str(MNIST), str(out), "--target-speedup", "1.3", "--scorer", "l1", "--report", str(tmp_path / "r.json")]
    result = CliRunner().invoke(main, args + ["--plan-out", str(plan)])
    assert result.exit_code == 0, result.output
    layers = fake_timer["layers"]
    assert (tmp_path / "out.latency.json").exists() and layers > 0 and "predicted" in result.output
    result = CliRunner().invoke(main, [str(MNIST), str(out), "--plan-in", str(plan), "--predict-latency", "--report",
                                       str(tmp_path / "r2.json")])
    assert result.exit_code == 0, result.output
    again = json.loads((tmp_path / "r2.json").read_text())["latency"]
    first = json.loads((tmp_path / "r.json").read_text())["latency"]
    assert fake_timer["layers"] == layers and again["model"]["cached"]
    assert again["predicted_ms"] == pytest.approx(first["predicted_ms"])
    result = CliRunner().invoke(main, [str(MNIST), str(out), "--plan-in", str(plan), "--predict-latency",
                                       "--threads", "2"])
    assert result.exit_code == 0 and fake_timer["layers"] == 2 * layers  # other threads: measured anew


def test_a_failed_gate_writes_no_latency_cache_either(fake_timer, tmp_path):
    result = CliRunner().invoke(main, [str(MNIST), str(tmp_path / "out.onnx"), "--target-speedup", "1.3",
                                       "--scorer", "l1", "--min-cosine", "0.999999"])
    assert result.exit_code == 1, result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("options, message", [
    (dict(target_latency=5.0, target_speedup=2.0), "give one"),
    (dict(target_speedup=1.0), "above 1"),
    (dict(target_latency=0.0), "milliseconds"),
    (dict(target_speedup=2.0, target_macs=0.5), "--target-macs"),
    (dict(target_speedup=2.0, filters=0.3), "--filters"),
    (dict(target_speedup=2.0, steps=2), "--steps"),
    (dict(predict_latency=True, steps=2), "one step"),
    (dict(round_to="auto", steps=2), "one step"),
    (dict(round_to="auto", plan=Plan()), "--plan-in fixes them"),
    (dict(round_to="eight"), "auto"),
    (dict(round_to=0), "positive"),
])
def test_latency_options_that_clash_are_refused_before_any_work(options, message):
    with pytest.raises(UsageError, match=message):
        prune("does-not-exist.onnx", PruneConfig(**options))


def test_the_cli_s_target_latency_is_met_and_reported(fake_timer, tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    result = CliRunner().invoke(main, [str(MNIST), str(out), "--target-latency", "7", "--scorer", "l1",
                                       "--report", str(report)])
    assert result.exit_code == 0, result.output
    latency = json.loads(report.read_text())["latency"]
    assert latency["asked"] == "--target-latency 7 ms" and latency["met"] and "--target-latency 7 ms" in result.output
    assert out.exists() and (tmp_path / "out.latency.json").exists()


def test_the_cli_refuses_clashing_latency_options_with_exit_2(tmp_path):
    result = CliRunner().invoke(main, [str(MNIST), str(tmp_path / "out.onnx"), "--target-latency", "5",
                                       "--target-speedup", "2"])
    assert result.exit_code == 2, result.output
    assert "give one" in result.output and list(tmp_path.iterdir()) == []


def test_round_to_auto_keeps_the_multiple_the_timings_step_at(fake_timer, tmp_path, monkeypatch):
    """layer3/conv1 steps at 16, the others at 8: its 64 output channels are kept in sixteens (39 of 64 -> 32,
    not 40), the others in eights; the fits are cached like a latency target's."""
    monkeypatch.setitem(STEPS, "/layer3/conv1/Conv", 16)
    out, report, plan = tmp_path / "out.onnx", tmp_path / "r.json", tmp_path / "plan.json"
    result = CliRunner().invoke(main, [str(MNIST), str(out), "--filters", "0.4", "--scorer", "l1", "--round-to", "auto",
                                       "--report", str(report), "--plan-out", str(plan)])
    assert result.exit_code == 0, result.output
    written = json.loads(report.read_text())
    kept = {tuple(g["sources"]): len(g["keep"]) for g in json.loads(plan.read_text())["groups"]}
    assert kept[("/layer3/conv1/Conv",)] == 32 and kept[("/layer2/conv1/Conv",)] == 16  # 32 - 12 = 20 -> 16
    assert written["config"]["round_to"] == "auto" and written["latency"]["round_to"] == {"8": 4, "16": 2}
    assert "round-to  auto: groups rounded to the measured multiple: 4 at 8, 2 at 16" in result.output
    assert (tmp_path / "out.latency.json").exists() and fake_timer["layers"] > 0
    result = CliRunner().invoke(main, [str(MNIST), str(out), "--round-to", "sixteen"])
    assert result.exit_code == 2 and "neither a positive number" in result.output


def test_a_sweep_measures_the_latency_model_once_and_reuses_the_cache_beside_its_report(fake_timer, tmp_path):
    args = ["sweep", str(MNIST), "--filters", "0.3,0.5", "--scorer", "l1", "--round-to", "auto", "--no-sensitivity"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    once = fake_timer["layers"]
    assert once == len(lm.timed_layers(analyze(MNIST)))
    assert not list(workdir.run_folder().glob("sweep-*"))  # the sweep's own cache is gone (temp_folder("sweep-"))
    report = tmp_path / "sweep.json"
    result = CliRunner().invoke(main, args + ["--report", str(report)])
    assert result.exit_code == 0 and fake_timer["layers"] == 2 * once
    assert (tmp_path / "sweep.latency.json").exists()
    result = CliRunner().invoke(main, args + ["--report", str(report)])
    assert result.exit_code == 0 and fake_timer["layers"] == 2 * once  # the cache beside the report
    assert all(row["speedup"] is not None for row in json.loads(report.read_text())["settings"])


def analyze(path):
    from onnxprune.loading import load
    from onnxprune.stages import analyze_model

    return analyze_model(load(str(path), {}))


def test_a_target_predicted_out_of_reach_is_measured_before_it_is_refused(fake_timer, monkeypatch):
    """The original measured at 3x its compared time (a loaded machine): the fits' savings predict at most
    1.4x, the cut floor measures 2.5x, so 2x is met in the rounds."""
    monkeypatch.setattr(speed, "time_runs", lambda sessions, feed, config, clock=None: {
        name: np.full(3, 3 * FULL_MS / 1e3) for name in sessions})
    latency = prune(str(MNIST), PruneConfig(scorer="l1", target_speedup=2.0, recover="none")).report["latency"]
    first = latency["rounds"][0]
    assert first["predicted_ms"] > first["limit_ms"]  # the floor, predicted short of the goal
    assert latency["met"] and latency["speedup"] >= 2.0 / (1 + speed.TOLERANCE)


def test_a_target_in_wall_ms_is_brought_to_the_model_s_cpu_clock(fake_timer, monkeypatch):
    """At one thread the model's times are CPU time: on a machine where the original's wall time is twice
    its CPU time, --target-latency's first allocation aims at half the milliseconds asked."""
    import time

    def runs(sessions, feed, config, clock=time.perf_counter):
        wall = clock is time.perf_counter
        return {name: np.full(3, (2 if wall else 1) * FULL_MS / 1e3) for name in sessions}

    monkeypatch.setattr(speed, "time_runs", runs)
    latency = prune(str(MNIST), PruneConfig(scorer="l1", target_latency=8.0)).report["latency"]
    assert latency["model_original_ms"] == pytest.approx(FULL_MS)
    assert latency["rounds"][0]["limit_ms"] == pytest.approx(4.0)


def test_a_ray_worker_without_the_drivers_cache_folder_keeps_its_fits_in_its_own_run_folder(fake_timer, tmp_path):
    """`sweep --ray --round-to auto`: the sweep's latency cache is a file on the driver's machine; a worker
    on another machine (here: the folder gone) measures and caches the fits in its own run folder."""
    from onnxprune.baseline import prepare
    from onnxprune.sweep import run_setting

    config = PruneConfig(scorer="l1", round_to="auto", latency_cache=tmp_path / "driver" / "sweep.latency.json")
    outcome = run_setting((prepare(str(MNIST), config), config, False), {"filters": 0.3})
    assert outcome["error"] is None and outcome["row"]["macs_kept"] < 1 and fake_timer["layers"] > 0
    local = workdir.run_folder() / "sweep.latency.json"
    assert local.exists() and not (tmp_path / "driver").exists()
    local.unlink()


def test_with_sparsity_the_steps_are_the_weights_so_the_channel_options_of_one_step_are_accepted(fake_timer):
    """--sparsity makes --steps the weights' schedule and prunes channels in one step: --round-to auto (and
    the other one-step channel options) are not refused; the channels follow the measured multiples."""
    for options in (dict(predict_latency=True), dict(target_speedup=1.2, filters=None)):
        check_config(PruneConfig(sparsity=0.3, steps=2, **options))
    report = prune(str(MNIST), PruneConfig(filters=0.4, scorer="l1", round_to="auto", sparsity=0.3,
                                           sparsity_method="magnitude", steps=2, recover="none")).report
    assert report["config"]["round_to"] == "auto" and report["latency"]["round_to"]
    assert [round(s["target"], 3) for s in report["sparsity"]["schedule"]["each"]] == [round(1 - 0.7 ** 0.5, 3), 0.3]


def test_a_round_that_saved_a_small_share_of_its_prediction_does_not_send_the_next_to_the_floor(fake_timer, monkeypatch):
    """The machine saves a quarter of what `fake_ms` saves (the model over-promises about 6x): scaled by the
    whole shortfall the next round would aim past every group's floor; it aims at GROWTH times the first
    round's predicted saving instead."""
    def stingy(original_session, pruned, feed, config):
        after = FULL_MS - 0.25 * (FULL_MS - fake_ms(pruned))
        return {"before": {"median_ms": FULL_MS, "p90_ms": 0.0}, "after": {"median_ms": after, "p90_ms": 0.0},
                "speedup": FULL_MS / after, "runs": 1, "warmup": 0, "threads": config.threads, "batch": 1}

    monkeypatch.setattr(speed, "compare_latency", stingy)
    monkeypatch.setattr(result_module, "compare_latency", stingy)
    latency = prune(str(MNIST), PruneConfig(scorer="l1", round_to=1, target_speedup=1.1, recover="none")).report["latency"]
    first, second = latency["rounds"][:2]
    original = latency["model_original_ms"]
    assert first["measured_ms"] > first["target_ms"] * (1 + speed.TOLERANCE)
    assert second["limit_ms"] == pytest.approx(original - speed.GROWTH * (original - first["predicted_ms"]))


def test_the_report_shows_the_layers_that_save_most_with_their_kept_channels_and_predicted_ms(fake_timer):
    result = prune(str(MNIST), PruneConfig(scorer="l1", round_to=1, target_speedup=1.25, recover="none"))
    layers = result.report["latency"]["layers"]
    savings = [r["full_ms"] - r["predicted_ms"] for r in layers]
    assert layers and savings == sorted(savings, reverse=True) and savings[0] > 0
    pruned = conv_widths(result.model)
    convs = [r for r in layers if r["name"] in ORIGINAL]
    assert convs
    for row in convs:
        assert (row["channels_in"][1], row["channels_out"][1]) == ORIGINAL[row["name"]]
        assert (row["channels_in"][0], row["channels_out"][0]) == pruned[row["name"]]


def test_a_missed_round_predicted_no_saving_is_scaled_by_goal_over_measured_not_repeated():
    """Predicted slower than the original (fits that rise when cut): no saving to multiply by GROWTH; the
    next limit is the prediction scaled by goal / measured."""
    budget = speed.LatencyBudget(None, None, original_ms=10.0, target_ms=8.0, asked="--target-speedup 1.25",
                                 cached=True, limit_ms=8.0)
    limit = budget.retargeted(predicted=10.5, before=10.0, after=10.2, goal=8.0)
    assert limit == pytest.approx(10.5 * 8.0 / 10.2)


def test_predictions_start_from_the_rewritten_model_timed_beside_the_original(tmp_path, monkeypatch):
    """A model ops/rules rewrites (a written-out hard swish): the original as given is what the speed-up is
    over, the rewritten full-width model what the cut saves from; layers that save nothing predict it."""
    from tests.test_rules import hard_swish

    path = tmp_path / "hard_swish.onnx"
    onnx.save(hard_swish(), str(path))
    timed = {"original": 10.0, "simplified": 8.0}
    monkeypatch.setattr(speed, "time_runs", lambda sessions, feed, config, clock=None: {
        name: np.full(3, timed[name] / 1e3) for name in sessions})

    def free_layers(layers, threads, cache, timer=None, write=True):  # every layer's time flat: nothing saved
        return lm.layer_fits(layers, threads, cache, lambda layer, t: lm.fit_layer(
            layer.name, layer.c_in, layer.c_out, *lm.sample_counts(layer.c_in, layer.c_out),
            np.zeros(len(lm.sample_counts(layer.c_in, layer.c_out)[0]))), write)

    monkeypatch.setattr(speed, "layer_fits", free_layers)
    report = prune(str(path), PruneConfig(scorer="l1", filters=0.5, round_to=1, predict_latency=True)).report
    latency = report["latency"]
    assert report["simplified"] == {"hard_swish": 1}
    assert latency["model_original_ms"] == pytest.approx(10.0)
    assert latency["model_simplified_ms"] == pytest.approx(8.0)
    assert latency["predicted_ms"] == pytest.approx(8.0) and latency["predicted_speedup"] == pytest.approx(1.25)
    plain = prune(str(path), PruneConfig(scorer="l1", filters=0.5, round_to=1, predict_latency=True,
                                         simplify=False)).report["latency"]
    assert plain["model_simplified_ms"] == pytest.approx(10.0) and plain["predicted_ms"] == pytest.approx(10.0)


def test_a_final_timing_that_misses_the_goal_the_round_met_is_said(fake_timer, monkeypatch):
    config = PruneConfig(calibration=str(CALIB), target_speedup=1.5, recover="none")
    assert prune(str(MNIST), config).report["latency"]["met_in_final_timing"] is True

    def noisy(original_session, pruned, feed, config):  # the final timing on a busier machine
        after = fake_ms(pruned) * 1.3
        return {"before": {"median_ms": FULL_MS, "p90_ms": 0.0}, "after": {"median_ms": after, "p90_ms": 0.0},
                "speedup": FULL_MS / after, "runs": 1, "warmup": 0, "threads": config.threads, "batch": 1}

    monkeypatch.setattr(result_module, "compare_latency", noisy)
    result = prune(str(MNIST), config)
    latency = result.report["latency"]
    assert latency["met"] and latency["met_in_final_timing"] is False
    assert "missed in the final timing" in latency_model_line(latency)


def blocked_conv_model(padded: int | None):
    """What onnxruntime's optimizer makes of `channel_block`'s Conv of 36 output channels: its weight padded to
    `padded` output channels in the blocked layout, or (None) left a plain Conv."""
    weight = onnx.numpy_helper.from_array(np.zeros((padded or 36, 32, 1, 1), np.float32), "w")
    node = onnx.helper.make_node("Conv", ["x", "w"], ["y"], domain=lm.BLOCKED_DOMAIN if padded else "")
    return onnx.helper.make_model(onnx.helper.make_graph([node], "g", [], [], [weight]))


@pytest.mark.parametrize(("padded", "block"), [(48, 16), (40, 8), (36, 4), (64, 32), (None, 1)])
def test_the_channel_block_is_read_off_the_padding_of_onnxruntime_s_blocked_conv(monkeypatch, padded, block):
    monkeypatch.setattr(lm, "optimized", lambda model: blocked_conv_model(padded))
    assert lm.channel_block.__wrapped__() == block  # not the cached answer of this machine


def test_a_latency_target_without_round_to_keeps_multiples_of_the_machine_s_channel_block(fake_timer, monkeypatch, tmp_path):
    """On a machine whose onnxruntime pads channels to 16 (AVX-512), a latency target cuts the groups that can be cut
    at 16 to multiples of 16 (a count between them computes the padded channels all the same), the rest as by
    default; on one that pads to 8, to the default multiples of 8."""
    out, report, plan = tmp_path / "out.onnx", tmp_path / "r.json", tmp_path / "plan.json"
    kept = {}
    for block in (16, 8):
        monkeypatch.setattr(speed, "channel_block", lambda: block)
        result = CliRunner().invoke(main, [str(MNIST), str(out), "--calib", str(CALIB), "--target-speedup", "1.5",
                                           "--recover", "none", "--report", str(report), "--plan-out", str(plan)])
        assert result.exit_code == 0, result.output
        latency = json.loads(report.read_text())["latency"]
        kept[block] = {g["channels"]: len(g["keep"]) for g in json.loads(plan.read_text())["groups"]}
        if block == 16:
            assert latency["round_to_by"] == "block" and latency["round_to"] == {"16": 4}
            assert "round-to  16 for 4 group(s) of Convs (onnxruntime's channel block on this machine)" in result.output
        else:
            assert "round_to" not in latency
    assert all(k % 16 == 0 for c, k in kept[16].items() if c >= 32) and all(k % 8 == 0 for k in kept[8].values())
    assert any(k % 16 for k in kept[8].values())  # the default's eights, which the block rounds away
