"""Stage 1: PyTorch -> ONNX with a dynamic batch dimension, checked and compared with PyTorch."""
from __future__ import annotations

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

    def describe(self) -> dict:
        from pipeline.stages.reuse import Reuse
        return {"path": self.path.name, "bytes": self.bytes, "opset": self.opset, "input_name": self.input_name,
                "output_name": self.output_name, "dynamic_batch": self.dynamic_batch,
                "max_abs_error_vs_pytorch": self.max_abs_error, "tolerance": self.tolerance,
                "compared_samples": self.samples, "source": self.source} | ({"reused": Reuse.NOTE} if self.reused else {})


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


def tolerance_for(reference: np.ndarray) -> float:
    """FP32 ONNX should match PyTorch to float rounding: 1e-4 plus 1e-4 of the output range."""
    return 1e-4 + 1e-4 * float(np.abs(reference).max())


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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, (dummy,), str(out_path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=OPSET, do_constant_folding=True, dynamo=False,
            )
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
    got = sess.run(None, {INPUT_NAME: sample})[0]
    ref = run_fp32(model, sample, batch_size=len(sample))
    err = float(np.abs(got.astype(np.float64) - ref).max())
    tol = tolerance_for(ref)
    if not err <= tol:
        raise ExportError(
            f"ONNX outputs differ from PyTorch by up to {err:.3g} (tolerance {tol:.3g}) on {len(sample)} inputs; "
            "the model likely has export-unsafe code (data-dependent control flow or training-mode layers)"
        )
    return OnnxArtifact(
        path=out_path, bytes=out_path.stat().st_size, opset=OPSET, input_name=INPUT_NAME,
        output_name=OUTPUT_NAME, dynamic_batch=True, max_abs_error=err, tolerance=tol, samples=len(sample),
        source="exported",
    )
