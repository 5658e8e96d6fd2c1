"""When int8 hurts: the shipped hard case collapses with per-tensor weights, the layer-wise debugger names its
depthwise layers, and ``--recover auto`` brings it back within the default gates (real conversions, real LiteRT
kernels; README "When int8 hurts")."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from pipeline import zoo

ROOT = Path(__file__).resolve().parents[1]
CASE = "mobilenetv2-deadch"
MASSIVE = "refcnn-massive"
EVAL = "1000"


def _export(out: Path, *flags: str, case: str = CASE, per_tensor: bool = True
            ) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "pipeline.export", "--model", f"zoo:{case}",
                        *(["--per-tensor"] if per_tensor else []), "--eval-limit", EVAL, "--out", str(out), *flags],
                       cwd=out.parent, env=env, capture_output=True, text=True, timeout=1800)
    rep = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else {}
    return p, rep


@pytest.fixture(scope="module")
def collapsed(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("hurt") / "out")


@pytest.fixture(scope="module")
def recovered(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("recovered") / "out", "--recover", "auto")


@pytest.mark.parametrize("case,base", [(CASE, "mobilenetv2"), (MASSIVE, "refcnn")])
def test_hard_cases_are_zoo_models_left_out_of_the_zoo_lists(case, base):
    assert case not in zoo.list_models() and case in zoo.list_models(hard_cases=True)
    e = zoo.get_entry(case)
    assert e.hard_case and e.weights_path.is_file()
    rec = json.loads(e.record_path.read_text())
    assert rec["initial_weights"] == f"zoo:{base}" and rec["fp32_test_top1"]["final"] > 0.80


def test_the_massive_channels_come_out_of_training():
    """The record's figures are the shipped weights' own: four channels after the last block's ReLU reach
    hundreds of times the other channels' maxima on training images, with no weight set by hand."""
    import torch
    e = zoo.get_entry(MASSIVE)
    rec = json.loads(e.record_path.read_text())
    model = e.factory().eval()
    model.load_state_dict(torch.load(e.weights_path, weights_only=True))
    bn = model.get_submodule(rec["recipe"]["bn"])
    k = rec["recipe"]["channels"]
    assert float(bn.bias[:k].min()) > 50 * float(bn.bias[k:].abs().max())  # trained up far beyond the others
    assert rec["activation_spread"]["ratio"] > 100 and rec["recipe"]["push_steps"] > 0


@pytest.mark.slow
def test_per_tensor_weights_collapse_and_the_debugger_names_depthwise_layers(collapsed):
    p, rep = collapsed
    assert p.returncode == 1, p.stderr[-2000:]
    assert rep["quantization"]["weights_per_channel"] is False
    assert rep["accuracy"]["drop_pp"] > 30 and not rep["gates"]["max_drop_pp"]["passed"]
    le = rep["layer_errors"]  # ran by itself: a gate failed
    assert "gate" in le["ran_because"] and le["counts"]["onnx_named"] >= 20
    model = onnx.load(str(p.args[p.args.index("--out") + 1]) + "/model.onnx")
    groups = {n.name: next((a.i for a in n.attribute if a.name == "group"), 1) for n in model.graph.node
              if n.op_type == "Conv"}
    worst = le["worst"]["lowest_sqnr"][:5] + le["worst"]["largest_growth"][:5]
    assert any(groups.get(w["layer"], 1) > 1 for w in worst), worst  # a depthwise conv among the worst
    assert "worst SQNR" in p.stdout and "layer_errors" in rep


@pytest.mark.slow
def test_recover_auto_passes_the_default_gates_with_cle(recovered, collapsed):
    p, rep = recovered
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    rc = rep["recovery"]
    assert rc["kept"] == "cle" and rc["attempts"][0]["passed_gates"] is True
    assert rc["attempts"][0]["record"]["fp32_max_rel_diff"] < 1e-4  # equalization kept the FP32 model
    assert rep["accuracy"]["drop_pp"] <= 1.0 and rep["accuracy"]["agreement"] >= 0.98
    assert rep["quantization"]["weights_per_channel"] is False and rep["quantization"]["fully_int8"] is True
    assert rc["before"]["drop_pp"] == collapsed[1]["accuracy"]["drop_pp"]
    out = Path(p.args[p.args.index("--out") + 1])
    assert (out / "model_recovered.onnx").is_file()
    assert any(n["tool"] == "int16x8 activations" for n in rc["not_tried"])


@pytest.mark.slow
def test_massive_activations_collapse_per_channel_int8_and_cle_with_bias_absorption_repairs_it(tmp_path):
    """The activation hard case: the default target (per-channel weights) collapses; the debugger's tensor SQNR
    hides the cause, its channel figures name it; --recover auto keeps CLE, whose bias absorption moves the
    massive channels' constant part into the classifier."""
    p, rep = _export(tmp_path / "as-is", case=MASSIVE, per_tensor=False)
    assert p.returncode == 1, p.stderr[-2000:]
    assert rep["quantization"]["weights_per_channel"] is True and rep["accuracy"]["drop_pp"] > 20
    coarse = rep["layer_errors"]["worst"]["coarsest_channels"]
    assert coarse[0]["channel_steps"] < 2 and coarse[0]["channel_spread"] > 100
    assert {c["layer"] for c in coarse[:3]} & {"/features/features.14/Conv", "/features/features.17/GlobalAveragePool"}
    assert "coarse channels:" in p.stdout
    p, rep = _export(tmp_path / "recovered", "--recover", "auto", case=MASSIVE, per_tensor=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    rc = rep["recovery"]
    assert rc["kept"] == "cle" and rep["accuracy"]["drop_pp"] <= 1.0 and rep["accuracy"]["agreement"] >= 0.98
    absorbed = rc["attempts"][0]["record"]["bias_absorption"]["absorbed"]
    assert any(a["conv1"] == "/features/features.14/Conv" and a["channels"] >= 4 for a in absorbed), absorbed
    assert rc["attempts"][0]["record"]["fp32_max_rel_diff"] < 1e-4


@pytest.mark.slow
def test_a_tool_that_lowers_agreement_is_dropped_from_the_recovery_chain(tmp_path):
    """clip_percentile makes refcnn-massive worse (measured 12.6% agreement against 48.5% as converted): with
    ``--recover clip_percentile,cle`` it is dropped, and CLE starts from the original graph, not from the clipped
    one (before, the second attempt was clip_percentile+cle)."""
    p, rep = _export(tmp_path / "chain", "--recover", "clip_percentile,cle", case=MASSIVE, per_tensor=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    first, second = rep["recovery"]["attempts"]
    assert first["tool"] == "clip_percentile" and first["converted"] and not first["passed_gates"]
    assert first["agreement"] < 0.5 and "dropped" in first
    assert second["attempt"] == "cle" and second["passed_gates"] and rep["recovery"]["kept"] == "cle"
    assert rep["accuracy"]["agreement"] >= 0.98
