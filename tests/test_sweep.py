"""`onnxprune sweep`: a table (JSON) and a plot (PNG) over settings, per-group sensitivity, one data load."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import onnxprune.baseline as baseline_module
import onnxprune.sweep as sweep_module
from onnxprune import PruneConfig
from onnxprune.cli import main
from onnxprune.errors import UsageError
from onnxprune.sweep import settings_grid, sweep

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "mnist_resnet.onnx"
CALIB = ROOT / "models" / "mnist_calib.npz"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def sweep_files(tmp_path_factory):
    """One sweep of the default model, labelled by its calibration split, with JSON and (if possible) PNG."""
    tmp = tmp_path_factory.mktemp("sweep")
    table, plot = tmp / "sweep.json", tmp / "sweep.png"
    plot_args = ["--plot", plot] if _has_matplotlib() else []
    result = invoke("sweep", MODEL, "--eval", CALIB, "--filters", "0.25,0.5", "--latency", "--latency-runs", 3,
                    "--report", table, *plot_args)
    assert result.exit_code == 0, result.output
    return result, json.loads(table.read_text()), plot


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_sweep_table_has_a_row_per_setting(sweep_files):
    result, table, _ = sweep_files
    assert table["kind"] == "sweep" and table["schema_version"] >= 1 and table["metric"] == "accuracy"
    assert [row["filters"] for row in table["settings"]] == [0.25, 0.5]
    light, heavy = table["settings"]
    assert 0 < heavy["macs_kept"] < light["macs_kept"] < 1 and heavy["params"] < light["params"]
    for row in table["settings"]:
        assert row["macs_kept"] == pytest.approx(row["macs"] / table["baseline"]["macs"])
        assert 0 <= row["accuracy"] <= 1 and row["speedup"] > 0 and row["latency_ms"] > 0
        assert row["accuracy_drop"] == pytest.approx(table["baseline"]["accuracy"] - row["accuracy"])
    assert table["baseline"]["accuracy"] == pytest.approx(251 / 256)  # models/README.md
    assert "filters" in result.output and "sensitivity" in result.output


def test_sensitivity_prunes_each_group_alone(sweep_files):
    """A group pruned alone removes fewer MACs than the whole setting, and each pruned group has a curve."""
    _, table, _ = sweep_files
    settings = {row["filters"]: row for row in table["settings"]}
    assert table["sensitivity"]
    for curve in table["sensitivity"]:
        for point in curve["points"]:
            assert point["channels_after"] < curve["channels"]
            assert settings[point["filters"]]["macs_kept"] < point["macs_kept"] < 1
    # at 50% every prunable group of the MNIST ResNet is pruned (models/README.md: six groups)
    at_half = [c for c in table["sensitivity"] if any(p["filters"] == 0.5 for p in c["points"])]
    assert len(at_half) == 6


def test_sweep_png(sweep_files):
    if not _has_matplotlib():
        pytest.skip("matplotlib is not installed (pip install 'onnxprune[plot]')")
    _, _, plot = sweep_files
    data = plot.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_without_matplotlib_the_plot_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    result = invoke("sweep", MODEL, "--filters", "0.5", "--report", tmp_path / "s.json", "--plot", tmp_path / "s.png")
    assert result.exit_code == 2 and "pip install 'onnxprune[plot]'" in result.output
    assert not (tmp_path / "s.json").exists() and not (tmp_path / "s.png").exists()


def test_one_data_load_and_one_reference_pass_serve_every_setting(tmp_path, monkeypatch):
    """The model and calibration data are read once, channels are scored once (a data-informed scorer's
    activation pass included), and the original model runs once over the data (over its two parts: the
    held-out samples and the rest), however many settings and sensitivity runs there are."""
    calib = tmp_path / "calib16.npz"
    with np.load(CALIB) as data:
        np.savez(calib, input=data["input"][:16], labels=data["labels"][:16])
    counts = {"load": 0, "load_calibration": 0, "score": 0, "original_runs": 0}
    baselines = []

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    def capture_prepare(*args, **kwargs):
        baselines.append(real_prepare(*args, **kwargs))
        return baselines[-1]

    original_sessions = []

    def recording_session(model, *args, **kwargs):
        sess = real_session(model, *args, **kwargs)
        if str(model) == str(MODEL):  # a session of the original, read from its file
            original_sessions.append(sess)
        return sess

    def counting_run_model(sess, *args, **kwargs):
        if any(sess is s for s in original_sessions):
            counts["original_runs"] += 1
        return real_run_model(sess, *args, **kwargs)

    real_prepare, real_run_model, real_session = sweep_module.prepare, baseline_module.run_model, baseline_module.session
    monkeypatch.setattr(baseline_module, "session", recording_session)
    monkeypatch.setattr(baseline_module, "load", counting("load", baseline_module.load))
    monkeypatch.setattr(baseline_module, "load_calibration", counting("load_calibration", baseline_module.load_calibration))
    monkeypatch.setattr(baseline_module, "score", counting("score", baseline_module.score))
    monkeypatch.setattr(sweep_module, "prepare", capture_prepare)
    monkeypatch.setattr(baseline_module, "run_model", counting_run_model)
    table = sweep(str(MODEL), PruneConfig(calibration=str(calib)), settings_grid([0.2, 0.25]))
    runs = len(table["settings"]) + sum(len(c["points"]) for c in table["sensitivity"])
    assert runs >= 4
    assert counts == {"load": 1, "load_calibration": 1, "score": 1, "original_runs": 2}
    assert len(baselines) == 1 and baselines[0].held_out


def test_rank_settings_extend_the_grid():
    assert settings_grid(None) == [{"filters": f} for f in sweep_module.DEFAULT_FILTERS]
    if "rank" not in PruneConfig.__dataclass_fields__:
        with pytest.raises(UsageError, match="--rank needs low-rank"):
            settings_grid([0.1], [0.5])
        return
    assert settings_grid(None, [0.5, "auto"]) == [{"filters": 0.0, "rank": 0.5}, {"filters": 0.0, "rank": "auto"}]
    assert settings_grid([0.1, 0.2], [0.5]) == [{"filters": 0.1, "rank": 0.5}, {"filters": 0.2, "rank": 0.5}]


@pytest.mark.skipif("rank" not in PruneConfig.__dataclass_fields__, reason="no low-rank support")
def test_rank_sweep_through_the_cli(tmp_path):
    table_path = tmp_path / "s.json"
    result = invoke("sweep", MODEL, "--rank", "0.5", "--report", table_path)
    assert result.exit_code == 0, result.output
    row, = json.loads(table_path.read_text())["settings"]
    assert row["filters"] == 0.0 and row["rank"] == 0.5 and row["macs_kept"] < 1


@pytest.mark.skipif("rank" not in PruneConfig.__dataclass_fields__, reason="no low-rank support")
def test_a_setting_that_changes_nothing_is_a_row_saying_so(tmp_path):
    """At rank 0.99 no layer gets cheaper, so that setting prunes nothing: the sweep goes on and its row
    says why, instead of the whole sweep failing."""
    table_path = tmp_path / "s.json"
    result = invoke("sweep", MODEL, "--rank", "0.5,0.99", "--no-sensitivity", "--report", table_path)
    assert result.exit_code == 0, result.output
    ok, nothing = json.loads(table_path.read_text())["settings"]
    assert ok["rank"] == 0.5 and ok["macs_kept"] < 1 and "error" not in ok
    assert nothing["rank"] == 0.99 and "factoriz" in nothing["error"] and "macs_kept" not in nothing
    assert "not pruned:" in result.output
    alone = invoke("sweep", MODEL, "--rank", "0.99", "--no-sensitivity")
    assert alone.exit_code == 3 and "factoriz" in alone.output


@pytest.mark.parametrize("values", ["0.1,1.5", "0.1,abc", ","])
def test_bad_filter_lists_are_usage_errors(values):
    result = invoke("sweep", MODEL, "--filters", values)
    assert result.exit_code == 2 and "--filters" in result.output


def test_without_ray_the_ray_option_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    result = invoke("sweep", MODEL, "--filters", "0.5", "--report", tmp_path / "s.json", "--ray", "auto")
    assert result.exit_code == 2 and "pip install 'onnxprune[ray]'" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "s.json").exists()


def test_a_model_too_big_for_one_protobuf_message_is_not_shipped_to_ray(monkeypatch):
    monkeypatch.setattr(sweep_module, "EXTERNAL_DATA_THRESHOLD", 1000)  # the MNIST model as if it were 2 GB
    with pytest.raises(UsageError, match="without --ray"):
        sweep(str(MODEL), PruneConfig(), settings_grid([0.5]), ray="auto")


def test_what_ray_workers_get_holds_the_weights_not_paths_to_this_machines_data_file(tmp_path):
    """`Baseline.portable` (shipped to Ray workers, maybe on other machines): a model with external data,
    read here through memory maps of its data file, travels with its weights; a worker without the file
    prunes it as this machine does."""
    import onnx

    import models
    from onnxprune import io
    from onnxprune.baseline import prepare
    from onnxprune.sweep import run_setting

    source = tmp_path / "ext.onnx"
    onnx.save_model(models.residual(), str(source), save_as_external_data=True, location="ext.data", size_threshold=0)
    config = PruneConfig(seed=3)
    here = prepare(str(source), config)
    assert any(io.mapped(t) for t in here.loaded.model.graph.initializer)
    shipped = here.portable()
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in shipped.loaded.model.graph.initializer)
    for mine, theirs in zip(here.loaded.model.graph.initializer, shipped.loaded.model.graph.initializer):
        np.testing.assert_array_equal(io.tensor_array(mine), io.tensor_array(theirs))
    sizes = {io.model_size_bytes(here.loaded.model), io.model_size_bytes(shipped.loaded.model)}
    assert sizes == {shipped.loaded.model.ByteSize()}  # the size reported does not depend on where the weights are
    local = run_setting((here, config, False), {"filters": 0.5})["row"]
    (tmp_path / "ext.data").rename(tmp_path / "elsewhere.data")  # as on another machine
    remote = run_setting((shipped, config, False), {"filters": 0.5})["row"]
    assert remote == local
