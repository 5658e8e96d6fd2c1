"""Stage 1: PyTorch -> ONNX with a dynamic batch dimension, checked and compared with PyTorch."""
from __future__ import annotations

import contextlib
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import ExportError
from pipeline.inputs.models import LoadedModel, run_fp32

OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


@dataclass(frozen=True)
class OnnxArtifact:
    path: Path
    bytes: int
    opset: int | None
    input_name: str
    output_name: str
    dynamic_batch: bool
    max_abs_error: float | None  # ONNX (onnxruntime) vs PyTorch on the sample inputs
    tolerance: float | None
    samples: int
    source: str  # "exported" or "given"
    reused: bool = False  # copied from an earlier target of the same multi-target call (stages/reuse.py)
    rewrites: tuple = ()  # export-time substitutions that made torch.onnx.export succeed (dicts; see below)

    def describe(self) -> dict:
        from pipeline.stages.reuse import Reuse
        return {"path": self.path.name, "bytes": self.bytes, "opset": self.opset, "input_name": self.input_name,
                "output_name": self.output_name, "dynamic_batch": self.dynamic_batch,
                "max_abs_error_vs_pytorch": self.max_abs_error, "tolerance": self.tolerance,
                "compared_samples": self.samples, "source": self.source} | ({"reused": Reuse.NOTE} if self.reused else {}) \
            | ({"rewrites": [dict(r) for r in self.rewrites]} if self.rewrites else {})


def _copy_given(model: LoadedModel, out_path: Path) -> int:
    """Copy a given ONNX file to ``out_path``; return the bytes of external data written beside it.

    A model with external data (checked by ``models.external_data_files``: inside the model's folder) is
    written self-contained, all tensors inline, so the export folder can be moved; a model over protobuf's
    2 GB limit keeps its tensors in one file beside it, ``model.onnx.data``."""
    import onnx
    if not model.extra.get("external_data"):
        shutil.copyfile(model.onnx_path, out_path)
        return 0
    proto = onnx.load(str(model.onnx_path))  # reads the external data into the tensors
    if proto.ByteSize() < onnx.checker.MAXIMUM_PROTOBUF:
        onnx.save_model(proto, str(out_path))
        return 0
    data = out_path.with_name(out_path.name + ".data")
    onnx.save_model(proto, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    return data.stat().st_size


def _first_output(module):
    """Wrap a model returning (logits, aux, ...) so that the graph has one output: the logits."""
    import torch

    class FirstOutput(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)[0]

    return FirstOutput(module).eval()


def _pool_matrix(n_in: int, n_out: int):
    """Row i averages input positions [floor(i*n_in/n_out), ceil((i+1)*n_in/n_out)): PyTorch's adaptive bins."""
    import torch
    m = torch.zeros(n_out, n_in)
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


ADAPTIVE_POOL = {
    "name": "adaptive_avg_pool_matmul",
    "why": "torch.onnx.export has no AdaptiveAvgPool2d whose output size does not divide the input size (alexnet's "
           "6x6 pool on a 64x64 input); at the export's fixed spatial size the pool is the linear map "
           "A @ x @ B^T with constant bin-averaging matrices, exported as two MatMuls",
    "exact": True,
}


@contextlib.contextmanager
def _exportable_adaptive_avg_pool():
    """During the export only: F.adaptive_avg_pool2d (which nn.AdaptiveAvgPool2d calls) as two constant MatMuls
    when the output size does not divide the input size; every other call is left to PyTorch. Counts the calls
    it replaced in the yielded list."""
    import torch.nn.functional as F
    original = F.adaptive_avg_pool2d
    replaced: list[tuple] = []

    def pool(x, output_size):
        h, w = int(x.shape[-2]), int(x.shape[-1])
        oh, ow = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        oh, ow = oh or h, ow or w
        if h % oh == 0 and w % ow == 0:
            return original(x, output_size)
        replaced.append(((h, w), (oh, ow)))
        a, b = _pool_matrix(h, oh).to(x.dtype), _pool_matrix(w, ow).to(x.dtype)
        return (a @ x) @ b.t()

    F.adaptive_avg_pool2d = pool
    try:
        yield replaced
    finally:
        F.adaptive_avg_pool2d = original


def tolerance_for(reference: np.ndarray) -> float:
    """FP32 ONNX should match PyTorch to float rounding: 1e-4 plus 1e-4 of the output range."""
    return 1e-4 + 1e-4 * float(np.abs(reference).max())


CHECK_BATCH_BYTES = 1 << 24


def export_onnx(model: LoadedModel, sample: np.ndarray, out_path: Path) -> OnnxArtifact:
    """Write ``out_path`` (model.onnx). ``sample`` is a small batch of real preprocessed inputs."""
    import onnx
    import onnxruntime as ort

    if model.kind == "onnx":
        data_bytes = _copy_given(model, out_path)
        proto = onnx.load(str(out_path), load_external_data=False)
        dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
        return OnnxArtifact(
            path=out_path, bytes=out_path.stat().st_size + data_bytes, opset=model.extra.get("opset"),
            input_name=model.extra["input_name"], output_name=proto.graph.output[0].name,
            dynamic_batch=not dim0.HasField("dim_value"), max_abs_error=None, tolerance=None, samples=0,
            source="given",
        )

    import torch
    dummy = torch.from_numpy(np.ascontiguousarray(sample[:2]))
    module = model.module
    if model.extra.get("outputs_returned", 1) > 1:  # export only the logits the FP32 reference uses
        module = _first_output(model.module)

    def export(substitute: bool) -> list:
        with warnings.catch_warnings(), (_exportable_adaptive_avg_pool() if substitute
                                         else contextlib.nullcontext([])) as replaced:
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, (dummy,), str(out_path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=OPSET, do_constant_folding=True, dynamo=False,
            )
        return replaced

    replaced: list = []
    try:
        try:
            export(False)
        except Exception as e:
            if isinstance(e, OSError) or "adaptive_avg_pool2d" not in str(e):
                raise
            replaced = export(True)  # only when needed; the check against PyTorch below measures it
    except OSError:  # writing the file failed (a full disk): the caller says so, not "export failed"
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()[0][:240] if str(e).strip() else type(e).__name__
        raise ExportError(f"torch.onnx.export failed for {model.spec}: {msg}") from None
    try:
        onnx.checker.check_model(str(out_path))
    except Exception as e:
        raise ExportError(f"the exported ONNX model fails onnx.checker: {str(e).strip()[:240]}") from None

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(out_path), so, providers=["CPUExecutionProvider"])
    # in batches of about 16 MiB of input (all 256 at once held every activation of a 3x224x224 net: gigabytes)
    bs = max(1, min(len(sample), CHECK_BATCH_BYTES // max(sample[:1].nbytes, 1)))
    got = np.concatenate([sess.run(None, {INPUT_NAME: sample[i:i + bs]})[0] for i in range(0, len(sample), bs)])
    ref = run_fp32(model, sample, batch_size=bs)
    err = float(np.abs(got.astype(np.float64) - ref).max())
    tol = tolerance_for(ref)
    if not err <= tol:
        raise ExportError(
            f"ONNX outputs differ from PyTorch by up to {err:.3g} (tolerance {tol:.3g}) on {len(sample)} inputs; "
            "the model likely has export-unsafe code (data-dependent control flow or training-mode layers)"
        )
    rewrites = ()
    if replaced:
        shapes = sorted({f"{h}x{w}->{oh}x{ow}" for (h, w), (oh, ow) in replaced})
        rewrites = ({**ADAPTIVE_POOL, "pools": len(replaced), "shapes": shapes, "max_abs_diff": err,
                     "tolerance": tol, "samples": len(sample)},)
    return OnnxArtifact(
        path=out_path, bytes=out_path.stat().st_size, opset=OPSET, input_name=INPUT_NAME,
        output_name=OUTPUT_NAME, dynamic_batch=True, max_abs_error=err, tolerance=tol, samples=len(sample),
        source="exported", rewrites=rewrites,
    )
