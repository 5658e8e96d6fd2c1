"""Helpers for regression tests of converted models: TFLite against PyTorch, and against goldens.

Differences are measured in quantization steps of the TFLite output tensor (its ``scale``):
a fully-int8 model can only be compared with its float original up to a few steps, and a
tolerance in steps means the same thing for every model.

    from pipeline.testing import assert_tflite_matches_torch
    assert_tflite_matches_torch(model, "model_int8.tflite", x, max_steps=4)

``inputs`` are float32 N×C×H×W arrays, exactly what the PyTorch model takes (already
normalised). The helper moves them to the TFLite input layout (NHWC for onnx2tf output),
quantizes them with the input tensor's scale and zero point, runs LiteRT's kernels and
dequantizes the outputs (all through :mod:`pipeline.runtime.litert`).

Golden outputs (``write_golden`` / ``assert_tflite_matches_golden``) store the raw integer
outputs of a ``.tflite`` on fixed inputs, and a copy of that ``.tflite``. Two checks follow:

- the stored model must give the stored outputs exactly (integer kernels are deterministic):
  a LiteRT upgrade that changes the kernels fails it, on any host;
- a fresh conversion must come within a few output steps of them. Not exactly: the converter
  calibrates with float kernels that take host-specific code paths, so the same model, data
  and versions give a byte-different ``.tflite`` on another CPU (measured here: Intel Xeon vs
  AMD EPYC, both AVX-512, same pins: different bytes for every zoo model, raw outputs at most
  2 steps apart on the golden inputs). Same bytes (``golden_model_sha256``) do give the same outputs.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import UsageError

GOLDEN_INPUTS = "inputs.npy"
GOLDEN_META = "meta.json"
GOLDEN_MODEL = "model.tflite"


@dataclass(frozen=True)
class OutputComparison:
    """TFLite vs a reference on the same inputs; differences in output quantization steps."""

    max_abs_diff: float
    max_steps: float  # largest |difference| / output scale
    where: tuple[int, int]  # (sample index, output index) of the largest difference
    reference_value: float  # the reference output there
    tflite_value: float  # the dequantized TFLite output there
    output_scale: float
    output_zero_point: int
    samples: int
    outputs_per_sample: int
    top1_agreement: float  # argmax agreement per sample (outputs flattened per sample)
    reference: np.ndarray  # [N, K] float32
    tflite: np.ndarray  # [N, K] dequantized float32
    kernels: str
    threads: int
    reference_name: str = "PyTorch"

    def exceeding(self, max_steps: float) -> tuple[int, int]:
        """(outputs, samples) whose difference is above ``max_steps`` steps."""
        over = np.abs(self.reference.astype(np.float64) - self.tflite) / self.output_scale > max_steps
        return int(over.sum()), int(over.any(axis=1).sum())

    def describe(self, max_steps: float | None = None) -> str:
        s, k = self.where
        text = (f"TFLite ({self.kernels} kernels, {self.threads} thread{'s' if self.threads != 1 else ''}) differs "
                f"from {self.reference_name} by up to {self.max_abs_diff:.6g} = {self.max_steps:.2f} output quantization "
                f"steps (scale {self.output_scale:.6g}) at sample {s}, output {k} ({self.reference_name} "
                f"{self.reference_value:.6g}, "
                f"TFLite {self.tflite_value:.6g})")
        if max_steps is not None:
            n_out, n_smp = self.exceeding(max_steps)
            text += (f"; limit {max_steps:g} steps: {n_out} of {self.samples * self.outputs_per_sample} outputs in "
                     f"{n_smp} of {self.samples} samples exceed it")
        return text + f"; top-1 agrees on {self.top1_agreement:.2%} of {self.samples} samples"


def _as_float_nchw(inputs) -> np.ndarray:
    try:
        import torch
        if isinstance(inputs, torch.Tensor):
            inputs = inputs.detach().cpu().numpy()
    except ImportError:  # numpy-only environments can still compare against goldens
        pass
    x = np.asarray(inputs)
    if x.ndim != 4:
        raise UsageError(f"inputs have shape {tuple(x.shape)}; pass a float32 batch N×C×H×W as the PyTorch model takes it")
    if not np.issubdtype(x.dtype, np.floating):
        raise UsageError(f"inputs are {x.dtype}; pass normalised float32 model inputs, not raw images")
    if len(x) == 0:
        raise UsageError("inputs hold no samples; pass at least one")
    return np.ascontiguousarray(x, np.float32)


def _runner(tflite_path, x: np.ndarray, kernels: str, threads: int, input_layout: str | None):
    from pipeline.runtime.litert import TfliteRunner
    path = Path(tflite_path)
    if not path.is_file():
        raise UsageError(f"{path} does not exist; pass the path of a .tflite file")
    runner = TfliteRunner(path, kernels=kernels, threads=threads, batch_size=min(len(x), 256), input_layout="NHWC")
    shape = tuple(int(v) for v in runner.inp["shape"][1:])
    c, h, w = x.shape[1:]
    if input_layout is None:
        if shape == (h, w, c):
            input_layout = "NHWC"  # also when C == H == W: onnx2tf output is NHWC
        elif shape == (c, h, w):
            input_layout = "NCHW"
        else:
            raise UsageError(f"inputs are C×H×W = {c}×{h}×{w} but the TFLite model takes {'×'.join(map(str, shape))} "
                             "per sample (neither NHWC nor NCHW of it); pass inputs of the model's size")
    elif input_layout not in ("NHWC", "NCHW"):
        raise UsageError(f"input_layout {input_layout!r} is neither 'NHWC' nor 'NCHW'")
    runner.input_layout = input_layout
    scale, zero_point = runner.out_scale, runner.out_zp
    if not np.issubdtype(runner.out["dtype"], np.integer) or not scale:
        raise UsageError(f"the TFLite output is {np.dtype(runner.out['dtype']).name} without quantization, so there "
                         "is no quantization step to measure in; compare a quantized (int8/int16) model")
    return runner, float(scale), int(zero_point)


def compare_tflite_torch(model, tflite_path, inputs, *, kernels: str = "xnnpack", threads: int = 1,
                         input_layout: str | None = None) -> OutputComparison:
    """Run ``inputs`` through the PyTorch ``model`` and the ``.tflite`` and measure where they differ."""
    import torch
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"model is a {type(model).__name__}, not a torch.nn.Module")
    if model.training:
        raise UsageError("the PyTorch model is in training mode (dropout, batch statistics); call model.eval() first")
    x = _as_float_nchw(inputs)
    runner, scale, zp = _runner(tflite_path, x, kernels, threads, input_layout)
    outs = []
    with torch.inference_mode():
        for i in range(0, len(x), 256):
            out = model(torch.from_numpy(x[i:i + 256]))
            out = out[0] if isinstance(out, (tuple, list)) else out
            if not isinstance(out, torch.Tensor):
                raise UsageError(f"the PyTorch model returned {type(out).__name__}; it must return an output tensor")
            outs.append(out.float().numpy().reshape(len(out), -1))
    ref = np.concatenate(outs)
    got = runner.run(x).outputs
    if ref.shape != got.shape:
        raise UsageError(f"PyTorch gives {ref.shape[1]} outputs per sample but the TFLite model {got.shape[1]}; "
                         "compare a model with its own conversion")
    return _comparison(ref, got, scale, zp, kernels, threads)


def _comparison(ref: np.ndarray, got: np.ndarray, scale: float, zp: int, kernels: str, threads: int) -> OutputComparison:
    diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    s, k = np.unravel_index(int(np.argmax(diff)), diff.shape)
    return OutputComparison(
        max_abs_diff=float(diff[s, k]), max_steps=float(diff[s, k] / scale), where=(int(s), int(k)),
        reference_value=float(ref[s, k]), tflite_value=float(got[s, k]), output_scale=scale, output_zero_point=zp,
        samples=int(ref.shape[0]), outputs_per_sample=int(ref.shape[1]),
        top1_agreement=float(np.mean(ref.argmax(1) == got.argmax(1))),
        reference=ref.astype(np.float32), tflite=got.astype(np.float32), kernels=kernels, threads=threads,
    )


def assert_tflite_matches_torch(model, tflite_path, inputs, max_steps: float, *, kernels: str = "xnnpack",
                                threads: int = 1, input_layout: str | None = None) -> OutputComparison:
    """Fail unless every TFLite output is within ``max_steps`` output quantization steps of PyTorch's.

    ``inputs``: float32 N×C×H×W (numpy or torch), as the PyTorch model takes them. Returns the
    :class:`OutputComparison` when it passes; the AssertionError says the largest difference, where
    (sample, output) and in how many steps. There is no default ``max_steps``: how far an int8
    model may drift from its float original depends on its depth, so state the bound per model.
    """
    if max_steps < 0:
        raise UsageError(f"max_steps {max_steps} is negative; pass the largest allowed difference in output steps")
    cmp = compare_tflite_torch(model, tflite_path, inputs, kernels=kernels, threads=threads, input_layout=input_layout)
    if not cmp.max_steps <= max_steps:
        raise AssertionError(cmp.describe(max_steps))
    return cmp


# --------------------------------------------------------------------------- goldens

def run_tflite_raw(tflite_path, inputs, *, kernels: str = "ref", threads: int = 1,
                   input_layout: str | None = None) -> tuple[np.ndarray, float, int]:
    """The raw integer outputs [N, K] of the ``.tflite`` on float N×C×H×W inputs, with the output scale/zero point."""
    x = _as_float_nchw(inputs)
    runner, scale, zp = _runner(tflite_path, x, kernels, threads, input_layout)
    raw = runner.run(x).raw_outputs
    return raw.reshape(len(x), -1), scale, zp


def golden_outputs_file(kernels: str) -> str:
    return f"int8_outputs_{kernels}.npy"


def _write_atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
    with os.fdopen(fd, "wb") as f:
        write(f)
    os.chmod(tmp, 0o644)  # mkstemp makes the file private; goldens are plain repository files
    os.replace(tmp, path)


def write_golden(folder, tflite_path, inputs, *, kernels: tuple[tuple[str, int], ...] = (("ref", 1),),
                 meta: dict | None = None) -> Path:
    """Store ``inputs``, the ``.tflite`` and its raw outputs on the inputs for each (kernels, threads) in ``folder``.

    Files: ``inputs.npy`` (float32 N×C×H×W), ``model.tflite`` (a copy; sha256 in the meta),
    ``int8_outputs_<kernels>.npy`` (raw integer outputs [N, K]) and ``meta.json`` (output scale/zero
    point, kernels, threads, host, plus ``meta``).
    """
    from pipeline.runtime.litert import host_description
    x = _as_float_nchw(inputs)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_bytes = Path(tflite_path).read_bytes()
    record = {"samples": int(len(x)), "inputs": GOLDEN_INPUTS, "outputs": {}, "written_on": host_description(),
              "model_file": GOLDEN_MODEL, "golden_model_sha256": hashlib.sha256(model_bytes).hexdigest()}
    for name, threads in kernels:
        raw, scale, zp = run_tflite_raw(tflite_path, x, kernels=name, threads=threads)
        record.update(output_scale=scale, output_zero_point=zp, output_dtype=raw.dtype.name)
        record["outputs"][name] = {"file": golden_outputs_file(name), "threads": threads}
        _write_atomic(folder / golden_outputs_file(name), lambda f, raw=raw: np.save(f, raw, allow_pickle=False))
    record.update(meta or {})
    _write_atomic(folder / GOLDEN_INPUTS, lambda f: np.save(f, x, allow_pickle=False))
    _write_atomic(folder / GOLDEN_MODEL, lambda f: f.write(model_bytes))
    _write_atomic(folder / GOLDEN_META, lambda f: f.write((json.dumps(record, indent=2) + "\n").encode()))
    return folder


def load_golden(folder) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
    """(inputs, {kernels: raw int outputs}, meta) of a golden folder; arrays are read with allow_pickle=False."""
    folder = Path(folder)
    if not (folder / GOLDEN_META).is_file() or not (folder / GOLDEN_INPUTS).is_file():
        raise UsageError(f"golden folder {folder} lacks {GOLDEN_META} or {GOLDEN_INPUTS}; write it with write_golden")
    meta = json.loads((folder / GOLDEN_META).read_text())
    x = np.load(folder / GOLDEN_INPUTS, allow_pickle=False)
    outputs = {k: np.load(folder / v["file"], allow_pickle=False) for k, v in meta.get("outputs", {}).items()}
    return x, outputs, meta


def golden_model(folder) -> Path:
    """The ``.tflite`` a golden folder's outputs were written with, checked against the sha256 in its meta."""
    folder = Path(folder)
    _, _, meta = load_golden(folder)
    path = folder / meta.get("model_file", GOLDEN_MODEL)
    if not path.is_file() or "golden_model_sha256" not in meta:
        raise UsageError(f"golden folder {folder} holds no copy of its model; rewrite it with write_golden")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != meta["golden_model_sha256"]:
        raise AssertionError(f"{path} has sha256 {digest[:12]}... but {GOLDEN_META} records "
                             f"{meta['golden_model_sha256'][:12]}...; the golden folder was edited: rewrite it")
    return path


def assert_tflite_matches_golden(tflite_path, folder, *, kernels: str = "ref", max_steps: int = 0,
                                 output_scale_rtol: float = 1e-6) -> np.ndarray:
    """Fail unless the ``.tflite``'s raw outputs on the golden inputs are within ``max_steps`` of the golden ones
    written for ``kernels`` (run with the thread count the golden was written with), and its output scale within
    ``output_scale_rtol`` (relative) of the golden's, zero point equal. Returns the raw outputs."""
    x, outputs, meta = load_golden(folder)
    if kernels not in outputs:
        raise UsageError(f"golden folder {folder} holds outputs for {', '.join(outputs) or 'no kernels'}, not "
                         f"{kernels!r}; write them with write_golden(..., kernels=(({kernels!r}, threads),))")
    golden = outputs[kernels]
    raw, scale, zp = run_tflite_raw(tflite_path, x, kernels=kernels, threads=meta["outputs"][kernels]["threads"])
    if raw.shape != golden.shape or raw.dtype != golden.dtype:
        raise AssertionError(f"outputs are {raw.dtype}{list(raw.shape)} but the golden {folder} holds "
                             f"{golden.dtype}{list(golden.shape)}")
    problems = []
    if not np.isclose(scale, meta["output_scale"], rtol=output_scale_rtol, atol=0) or zp != meta["output_zero_point"]:
        problems.append(f"output quantization changed: scale {scale:.8g} zero point {zp} vs golden "
                        f"{meta['output_scale']:.8g} / {meta['output_zero_point']}")
    diff = np.abs(raw.astype(np.int64) - golden.astype(np.int64))
    if diff.max() > max_steps:
        s, k = np.unravel_index(int(np.argmax(diff)), diff.shape)
        problems.append(f"raw outputs differ by up to {int(diff.max())} step(s) (limit {max_steps}) at sample {s}, "
                        f"output {k} ({int(raw[s, k])} vs golden {int(golden[s, k])}); {int((diff > max_steps).sum())} "
                        f"of {diff.size} outputs exceed the limit")
    if problems:
        versions = meta.get("versions")
        raise AssertionError(f"{Path(tflite_path).name} on {kernels} kernels vs golden {folder}: " + "; ".join(problems)
                             + (f" (golden written with {versions} on {meta.get('written_on')})" if versions else "")
                             + "; if the change is intended, regenerate the goldens")
    return raw
