"""When int8 hurts: train the hard cases, then measure what each recovery tool does for them (README table).

    python benchmarks/hard_cases.py train [NAME ...]     # fine-tune the hard cases (writes pipeline/zoo/weights)
    python benchmarks/hard_cases.py table [--eval-limit N] [--json hard_cases.json]
    python benchmarks/hard_cases.py cost                 # --debug-layers' cost on zoo:refcnn against the export

``train`` fine-tunes the zoo model a hard case is made from, from its shipped weights, with the recipe below
(seeded: the sampled batches, dropout and initial state are fixed; one thread, oneDNN off, so the same machine
gives the same weights) and writes ``NAME.pt`` and ``NAME.json`` (the recipe, FP32 accuracy, seconds) beside the
zoo's weights. Nothing is set by hand: the pathology (dead channels, outlier activations) comes out of training.

``table`` exports each hard case through the pipeline (``python -m pipeline.export``, each in its own process) as
converted, with each recovery tool alone (``--recover TOOL``), with ``--recover auto``, and with the three changes
that change the target's contract (per-channel weights, int16 activations, float fallback of the layers the
debugger blames on ``tflite-int8-float-fallback``), and prints int8 top-1, drop and agreement against the FP32
model on the same test images (LiteRT XNNPACK, 4 threads, this host), the seconds each attempt took and the
model's XNNPACK median latency at batch 1 (a host figure, for comparing the rows, not a device latency).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> how it is made and how it is exported (the flags that make int8 hurt it)
RECIPES = {
    "mobilenetv2-deadch": dict(kind="spike", base="mobilenetv2", relu=False, seed=0, batch=128, spike_lr=0.05, spike_steps=150,
                               recover_lr=1e-3, recover_steps=150, export=["--per-tensor"],
                               why="per-tensor weights: dead channels spread depthwise weight ranges"),
    "refcnn-massive": dict(kind="massive", base="refcnn", seed=0, batch=128, bn="features.15", act="features.16",
                           head="classifier", channels=4, push_weight=1.0, push_lr=1.5, push_steps=600, lr=1e-4,
                           head_lr=3e-3, settle_steps=300, export=[],
                           why="activations: four massive channels set the int8 step of their tensor"),
}
TOOLS = ("cle", "bias_correction", "clip_percentile")


def _activation_spread(model, r: dict, x) -> dict:
    """Per-channel maxima of the activation the pushed channels feed (after the ReLU behind ``r['bn']``), on
    training images: the raised channels against the median of the others."""
    import numpy as np
    import torch
    seen = {}
    h = model.get_submodule(r["act"]).register_forward_hook(lambda m, i, o: seen.__setitem__("a", o.detach().clone()))
    with torch.no_grad():
        model(x)
    h.remove()
    a = seen["a"].transpose(0, 1).reshape(seen["a"].shape[1], -1).numpy()
    mx, k = a.max(1), r["channels"]
    return {"tensor": r["act"], "images": int(len(x)), "raised_channel_max": [round(float(v), 2) for v in mx[:k]],
            "other_channels_median_max": round(float(np.median(mx[k:])), 3),
            "ratio": round(float(mx[:k].max() / np.median(mx[k:])), 1)}


def build(name: str):
    """The hard case's module as its zoo factory builds it (the deployed form)."""
    from pipeline import zoo
    return zoo.get_entry(name).factory()


def train(name: str) -> dict:
    import numpy as np
    import torch
    import torch.nn as nn

    from pipeline import zoo
    from pipeline.inputs import data as data_mod
    from pipeline.inputs import preprocessing
    r = RECIPES[name]
    base, entry = zoo.get_entry(r["base"]), zoo.get_entry(name)
    torch.backends.mkldnn.enabled = False  # oneDNN's training kernels abort on some AMD EPYC hosts
    torch.set_num_threads(1)
    torch.manual_seed(r["seed"])
    model = build(name)
    state = torch.load(base.weights_path, weights_only=True)
    model.load_state_dict(state)
    ds = data_mod.load("fashion-mnist", None, entry.input_shape)
    pre = preprocessing.Preprocessing(input_shape=entry.input_shape, source_layout=ds.source_layout,
                                      source_dtype=ds.source_dtype, scale=ds.scale, mean=entry.mean, std=entry.std)
    x_train = torch.from_numpy(preprocessing.apply(ds.x_train, pre))
    y_train = torch.from_numpy(ds.y_train.astype(np.int64))
    x_test = preprocessing.apply(ds.x_test, pre)
    gen = torch.Generator().manual_seed(r["seed"])
    t0 = time.time()

    def steps(n: int, groups: list[dict], extra=None) -> float:
        opt = torch.optim.AdamW(groups, weight_decay=0.0)
        model.train()
        loss = float("nan")
        for _ in range(n):
            idx = torch.randint(0, len(x_train), (r["batch"],), generator=gen)
            out = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            (out - extra() if extra else out).backward()
            opt.step()
            loss = float(out.detach())
        return loss

    from pipeline.train import evaluate
    before = evaluate(model.eval(), x_test, ds.y_test)
    if r["kind"] == "spike":
        spike_loss = steps(r["spike_steps"], [{"params": list(model.parameters()), "lr": r["spike_lr"]}])
        after_spike = evaluate(model.eval(), x_test, ds.y_test)
        final_loss = steps(r["recover_steps"], [{"params": list(model.parameters()), "lr": r["recover_lr"]}])
        phases = {"after_spike": after_spike}, {"after_spike": spike_loss, "final": final_loss}
    else:  # "massive": a loss term raises the BatchNorm shifts of a few channels; the rest of the network adapts
        bn = model.get_submodule(r["bn"])
        head = list(model.get_submodule(r["head"]).parameters())
        rest = [q for q in model.parameters() if q is not bn.bias and all(q is not h for h in head)]
        k = r["channels"]
        push_loss = steps(r["push_steps"], [{"params": rest, "lr": r["lr"]}, {"params": head, "lr": r["head_lr"]},
                                            {"params": [bn.bias], "lr": r["push_lr"]}],
                          extra=lambda: r["push_weight"] * bn.bias[:k].mean())
        after_push = evaluate(model.eval(), x_test, ds.y_test)
        bn.bias.requires_grad_(False)  # the channels stay where training took them; the rest settles around them
        final_loss = steps(r["settle_steps"], [{"params": rest, "lr": r["lr"]}, {"params": head, "lr": r["head_lr"]}])
        bn.bias.requires_grad_(True)
        phases = {"after_push": after_push}, {"after_push": push_loss, "final": final_loss}
    model.eval()
    spread = _activation_spread(model, r, x_train[:500]) if r["kind"] == "massive" else None
    model.eval()
    record = {
        "model": f"zoo:{name}", "hard_case": entry.hard_case, "initial_weights": f"zoo:{r['base']}",
        "recipe": {k: v for k, v in r.items() if k not in ("export", "why")},
        "optimizer": "AdamW(weight_decay=0), constant learning rate per phase and parameter group, no augmentation",
        "fp32_test_top1": {"zoo_base": before, **phases[0], "final": evaluate(model, x_test, ds.y_test)},
        "loss": phases[1],
        **({"activation_spread": spread} if spread else {}),
        "train_seconds": round(time.time() - t0, 1), "torch": torch.__version__, "threads": 1, "onednn": False,
        "command": f"python benchmarks/hard_cases.py train {name}",
    }
    out = base.weights_path.parent
    tmp = out / f".{name}.pt.tmp"
    torch.save(model.state_dict(), tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, out / f"{name}.pt")
    (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def export(model: str, flags: list[str], out: Path, eval_limit: int | None) -> dict:
    cmd = [sys.executable, "-m", "pipeline.export", "--model", f"zoo:{model}", "--out", str(out), *flags]
    if eval_limit:
        cmd += ["--eval-limit", str(eval_limit)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode not in (0, 1) or not (out / "report.json").is_file():
        return {"flags": flags, "error": (p.stderr.strip().splitlines() or ["?"])[-1], "wall_s": round(wall, 1)}
    rep = json.loads((out / "report.json").read_text())
    return {"flags": flags, "report": rep, "wall_s": round(wall, 1), "status": p.returncode}


def _row(case: str, what: str, res: dict, attempt: str | None = None) -> dict:
    if "error" in res:
        return {"case": case, "what": what, "error": res["error"]}
    rep = res["report"]
    acc = rep["accuracy"]
    row = {"case": case, "what": what, "fp32_top1": acc["fp32_top1"], "int8_top1": acc["int8_top1"],
           "drop_pp": acc["drop_pp"], "agreement": acc["agreement"], "passed": rep["passed"],
           "precision": rep["target"]["precision"], "weights_per_channel": rep["quantization"]["weights_per_channel"],
           "export_s": rep["timings_s"]["total"],
           "xnnpack_ms": rep["runtime"]["latency"].get("kernels", {}).get("xnnpack", {}).get("median_ms")}
    rec = rep.get("recovery")
    if attempt and rec:
        a = next((a for a in rec["attempts"] if a["attempt"] == attempt), None)
        if a is None or not a.get("converted"):
            row.update(error=(a or {}).get("error") or (a or {}).get("note") or "no attempt")
        else:
            row.update(int8_top1=a["int8_top1"], drop_pp=a["drop_pp"], agreement=a["agreement"],
                       passed=a["passed_gates"], attempt_s=a["seconds"],
                       fp32_change_rel=a["record"].get("fp32_max_rel_diff"))
    if rec and attempt is None and rec.get("kept"):
        row["kept"] = rec["kept"]
    return row


def table(eval_limit: int | None) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="hard-cases-") as tmp:
        for case, r in RECIPES.items():
            flags = list(r["export"])
            n = 0

            def run(what, extra, attempt=None):
                nonlocal n
                n += 1
                res = export(case, [*flags, *extra], Path(tmp) / f"{case}-{n}", eval_limit)
                rows.append(_row(case, what, res, attempt))
                print(_line(rows[-1]), file=sys.stderr, flush=True)
                return res

            converted = run("as converted (" + (" ".join(flags) or "default target, per-channel weights") + ")",
                            ["--recover", "none", "--debug-layers"])
            for tool in TOOLS:
                run(f"--recover {tool}", ["--recover", tool], attempt=tool)
            run("--recover auto", ["--recover", "auto"])
            if "--per-tensor" in flags:
                flags_pc = [f for f in flags if f != "--per-tensor"]
                res = export(case, [*flags_pc, "--recover", "none"], Path(tmp) / f"{case}-pc", eval_limit)
                rows.append(_row(case, "per-channel weights (changes the target's kernels)", res))
                print(_line(rows[-1]), file=sys.stderr, flush=True)
            res = export(case, [*flags, "--target", "tflite-int16x8", "--recover", "none"], Path(tmp) / f"{case}-16",
                         eval_limit)
            rows.append(_row(case, "int16x8 activations (--target tflite-int16x8)", res))
            print(_line(rows[-1]), file=sys.stderr, flush=True)
            fallback(case, flags, Path(tmp), eval_limit, rows)
            print(_line(rows[-1]), file=sys.stderr, flush=True)
            first = next((x for x in rows if x["case"] == case), None)
            if "report" in converted and converted["report"].get("layer_errors"):  # the as-converted run's debugger
                le = converted["report"]["layer_errors"]
                first["worst_layers"] = [w.get("layer") for w in (le.get("worst") or {}).get("lowest_sqnr", [])][:5]
                first["largest_growth"] = [w.get("layer") for w in (le.get("worst") or {}).get("largest_growth", [])][:5]
                first["coarsest_channels"] = [(w.get("layer"), w.get("channel_steps"), w.get("channel_spread"))
                                              for w in (le.get("worst") or {}).get("coarsest_channels", [])][:3]
    return rows


def fallback(case: str, flags: list[str], tmp: Path, eval_limit: int | None, rows: list) -> None:
    """The float-fallback row: the layers the debugger blames kept in float on tflite-int8-float-fallback."""
    res = export(case, [*flags, "--target", "tflite-int8-float-fallback", "--recover", "float_fallback"],
                 tmp / f"{case}-ff", eval_limit)
    rows.append(_row(case, "float fallback (--target tflite-int8-float-fallback --recover float_fallback)", res))
    if "report" in res:
        q = res["report"]["quantization"]
        rows[-1]["float_layers"] = len(q.get("float_nodes") or [])
        rows[-1]["ops"] = sum(n for op, n in (q.get("ops") or {}).items() if op not in ("QUANTIZE", "DEQUANTIZE"))
        rows[-1]["what"] += (f": {rows[-1]['float_layers']} of {rows[-1]['ops']} ops (QUANTIZE/DEQUANTIZE not "
                             "counted) kept in float")


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _line(r: dict) -> str:
    if r.get("error"):
        return f"{r['case']:<20} {r['what']:<50} error: {r['error']}"
    return (f"{r['case']:<20} {r['what']:<50} int8 {_pct(r['int8_top1'])} drop {r['drop_pp']:+.2f} pp agreement "
            f"{_pct(r['agreement'])} {'PASS' if r['passed'] else 'FAIL'}")


def markdown(rows: list[dict]) -> str:
    out = ["| hard case | what | FP32 top-1 | int8 top-1 | drop (pp) | agreement | gates | seconds | XNNPACK ms |",
           "|---|---|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        if r.get("error"):
            out.append(f"| {r['case']} | {r['what']} | | | | | {r['error']} | | |")
            continue
        secs = r.get("attempt_s", r.get("export_s"))
        ms = "-" if r.get("attempt_s") is not None or r.get("xnnpack_ms") is None else f"{r['xnnpack_ms']:.3f}"
        out.append(f"| {r['case']} | {r['what']} | {_pct(r['fp32_top1'])} | {_pct(r['int8_top1'])} | "
                   f"{r['drop_pp']:+.2f} | {_pct(r['agreement'])} | {'pass' if r['passed'] else 'FAIL'} | "
                   f"{secs:.1f} | {ms} |")
    return "\n".join(out)


def cost() -> dict:
    """--debug-layers on zoo:refcnn: the debug_layers step's seconds against the same export's total."""
    with tempfile.TemporaryDirectory(prefix="hard-cost-") as tmp:
        plain = export("refcnn", [], Path(tmp) / "plain", None)["report"]["timings_s"]
        dbg = export("refcnn", ["--debug-layers"], Path(tmp) / "dbg", None)["report"]["timings_s"]
    return {"export_total_s": plain["total"], "with_debug_total_s": dbg["total"],
            "debug_layers_s": dbg["debug_layers"], "ratio_debug_to_export": round(dbg["debug_layers"] /
                                                                                plain["total"], 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/hard_cases.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("names", nargs="*", default=list(RECIPES))
    b = sub.add_parser("table")
    b.add_argument("--eval-limit", type=int)
    b.add_argument("--json")
    sub.add_parser("cost")
    a = p.parse_args(argv)
    if a.cmd == "train":
        for name in a.names:
            rec = train(name)
            print(json.dumps({k: rec[k] for k in ("model", "fp32_test_top1", "train_seconds")}))
    elif a.cmd == "table":
        rows = table(a.eval_limit)
        print(markdown(rows))
        if a.json:
            Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")
    else:
        print(json.dumps(cost(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
