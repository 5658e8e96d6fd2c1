"""A second conversion route: the PyTorch module -> TFLite with litert-torch, quantized by ai-edge-quantizer.

No ONNX: litert-torch traces the ``nn.Module`` with ``torch.export`` and lowers it to a float32 TFLite
model; ai-edge-quantizer (AEQ) then quantizes that model with the recipe of the target's precision:

- ``int8``: static int8 (activations asymmetric per tensor, weights symmetric per channel, or per tensor with
  ``per_channel=False``), calibrated on the representative dataset; AEQ quantizes the graph input and output
  too, so the model takes and returns int8 tensors with no QUANTIZE/DEQUANTIZE ops.
- ``int16x8``: the same with int16 (symmetric) activations and I/O.
- ``dynamic``: int8 weights, float32 activations (dynamic-range kernels quantize them on the fly).
- ``fp16``: float16 weights with DEQUANTIZE ops to float32 (AEQ's float-casting algorithm).
- ``fp32``: the litert-torch model as it is.

Layout: the traced module is ``model(x.permute(0, 3, 1, 2))``, so the TFLite input is NHWC, what device code
feeds; litert-torch's layout pass folds the permute into the converted graph (no TRANSPOSE op in zoo:refcnn or
in small 3-channel CNNs; the int8 models stay fully int8).

Batch: the model is exported at a fixed batch of 1, so ``TfliteRunner`` evaluates it one image at a time
(zoo:refcnn: 10,000 test images in about 1-2 s on XNNPACK). litert-torch 0.10 cannot lower ``nn.Flatten`` (a
view) nor ``nn.AdaptiveAvgPool2d`` (``as_strided``) with a symbolic batch, so a dynamic batch fails on nearly
every CNN head; ``TRY_DYNAMIC_BATCH`` tries it first (swapping ``AdaptiveAvgPool2d(1)`` for the equal mean).

Calibration takes the min and max of each activation over the whole representative dataset, as TFLiteConverter
does, not AEQ's default moving average (see :func:`_calibrate`).

AEQ quantizes the ops it has an int8 policy for and silently leaves the others in float between QUANTIZE and
DEQUANTIZE ops (measured: ELU, LeakyReLU, Softplus, Mish); the inspect stage checks the result against the
precision's contract (``fully_int8`` for int8), as for the onnx2tf route.
"""
from __future__ import annotations

import copy
import os
import re
import time
import warnings
from pathlib import Path

import numpy as np

from pipeline import quiet
from pipeline.conversion import TfliteArtifact, refuse_float_nodes
from pipeline.errors import ConversionError
from pipeline.precisions import get_precision
from pipeline.inputs.preprocessing import Preprocessing

# precision -> what ai-edge-quantizer is asked to do (quoted in conversion errors)
RECIPES = {
    "fp32": "no quantization (the float32 litert-torch model)",
    "fp16": "weight-only float casting to float16 (explicit DEQUANTIZE to float32)",
    "dynamic": "dynamic range: int8 weights, float32 activations quantized on the fly",
    "int16x8": "static: int16 activations and I/O, int8 weights, calibrated",
    "int8": "static: int8 activations and I/O, int8 weights, calibrated",
}
# litert-torch 0.10 lowers nn.Flatten (a view) and adaptive pooling (as_strided) only with concrete shapes, so a
# dynamic batch fails on nearly every CNN head (measured: zoo:refcnn, each attempt ~2.5 s); off by default.
TRY_DYNAMIC_BATCH = False
CALIB_BATCH = 32  # calibration batch of a dynamic-batch model (min/max statistics do not depend on it)


def _one_line(e: BaseException, limit: int = 300) -> str:
    """The meaningful line of an exception from torch.export, the litert-torch lowering or AEQ."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    for ln in lines:  # torch.export: "Unsupported: ..." / "Could not guard on data-dependent expression ..."
        if ln.startswith(("Unsupported", "Could not", "Constraints violated", "Dynamic control flow")):
            return ln[:limit]
    first = lines[0]
    name = type(e).__name__
    return (first if first.startswith(name) else f"{name}: {first}")[:limit]


def _nhwc_input(model):
    """``model(x.permute(0, 3, 1, 2))``: the TFLite input becomes NHWC."""
    import torch.nn as nn

    class NhwcInput(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x.permute(0, 3, 1, 2))

    # litert-torch names tensors by module path: keep this wrapper's part short ("nhwc.NhwcInput/...")
    NhwcInput.__module__, NhwcInput.__qualname__ = "nhwc", "NhwcInput"
    return NhwcInput(model).eval()


def _global_pools_as_mean(model):
    """A copy of ``model`` with every ``nn.AdaptiveAvgPool2d(1)`` replaced by the equal mean over H and W
    (litert-torch 0.10 lowers adaptive pooling through ``as_strided``, which fails with a symbolic batch);
    ``model`` itself when it has none."""
    import torch.nn as nn

    class GlobalMean(nn.Module):
        def forward(self, x):
            return x.mean(dim=(-2, -1), keepdim=True)

    def is_global(m):
        if not isinstance(m, nn.AdaptiveAvgPool2d):
            return False
        size = m.output_size
        return size == 1 or (isinstance(size, (tuple, list)) and tuple(size) == (1, 1))

    if not any(is_global(m) for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if is_global(child):
                setattr(parent, name, GlobalMean())
    return model.eval()


class LiteRtTorchConverter:
    """litert-torch (torch.export -> float TFLite, NHWC input) + ai-edge-quantizer at the target's precision."""

    name = "litert-torch"
    needs = "torch"  # converts the nn.Module (``convert_torch``), not the ONNX file

    def preload(self, verbose: bool = False) -> None:
        with quiet.captured(verbose):
            import litert_torch  # noqa: F401
            import torch  # noqa: F401
            from ai_edge_quantizer import quantizer  # noqa: F401
            from ai_edge_litert.interpreter import Interpreter  # noqa: F401

    def convert(self, onnx, representative, pre, **kwargs) -> TfliteArtifact:
        raise ConversionError("the litert-torch route converts the PyTorch module, not an ONNX file: call "
                              "convert_torch(model, ...) (an ONNX or TorchScript model needs the onnx2tf converter)")

    def convert_torch(self, model, representative: np.ndarray, pre: Preprocessing, *, per_channel: bool = True,
                      out_path: Path, verbose: bool = False, precision: str = "int8",
                      float_fallback: bool = False, float_nodes: tuple = ()) -> TfliteArtifact:
        refuse_float_nodes(self.name, float_nodes)  # float_fallback alone: a fully-int8 model is one
        prec = get_precision(precision, error=ConversionError)
        if prec.name not in RECIPES:
            raise ConversionError(f"the litert-torch route has no ai-edge-quantizer recipe for precision {prec.name!r} "
                                  f"(it offers {', '.join(RECIPES)}); use the onnx2tf converter for this target")
        chw = tuple(int(v) for v in pre.input_shape)
        rep = np.asarray(representative, np.float32)
        fits = rep.ndim == 4 and tuple(rep.shape[1:]) == chw and len(rep) > 0
        if prec.representative_dataset and not fits:
            raise ConversionError(f"the representative dataset has shape {tuple(rep.shape)}; the litert-torch route "
                                  f"needs N x {chw[0]} x {chw[1]} x {chw[2]} (N >= 1) float32 samples")
        # NHWC samples: calibration data, and the example the export traces with (zeros without samples)
        samples = (np.ascontiguousarray(np.transpose(rep, (0, 2, 3, 1))) if fits
                   else np.zeros((2, chw[1], chw[2], chw[0]), np.float32))
        timings: dict[str, float] = {}
        with quiet.captured(verbose):
            t0 = time.perf_counter()
            try:
                import litert_torch
                import torch
                from ai_edge_quantizer import qtyping, quantizer
                from ai_edge_litert.interpreter import Interpreter
            except Exception as e:  # noqa: BLE001
                raise ConversionError(f"cannot import the litert-torch converter: {_one_line(e)}; re-run ./setup.sh "
                                      "to reinstall the pinned packages") from None
            timings["import_s"] = time.perf_counter() - t0

            blob, dynamic = self._export(litert_torch, torch, model, samples, timings)
            count = 0
            if prec.name != "fp32":
                t0 = time.perf_counter()
                qt = quantizer.Quantizer(bytearray(blob))
                gran = qtyping.QuantGranularity.CHANNELWISE if per_channel else qtyping.QuantGranularity.TENSORWISE
                ops = qtyping.TFLOperationName.ALL_SUPPORTED
                if prec.name in ("int8", "int16x8"):
                    qt.add_static_config(".*", ops, activation_num_bits=8 if prec.name == "int8" else 16,
                                         weight_num_bits=8, weight_granularity=gran)
                elif prec.name == "dynamic":
                    qt.add_dynamic_config(".*", ops, num_bits=8, granularity=gran)
                else:  # fp16
                    from ai_edge_quantizer import algorithm_manager
                    qt.add_weight_only_config(".*", ops, num_bits=16, granularity=gran,
                                              algorithm_key=algorithm_manager.AlgorithmName.FLOAT_CASTING)
                calibration = None
                try:
                    if qt.need_calibration:
                        calibration = _calibrate(Interpreter, blob, qt, samples, CALIB_BATCH if dynamic else 1)
                        count = len(samples)
                        timings["calibrate_s"] = time.perf_counter() - t0
                        t0 = time.perf_counter()
                    with warnings.catch_warnings():
                        warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors.*")
                        blob = bytes(qt.quantize(calibration, enable_progress_report=False).quantized_model)
                except ConversionError:
                    raise
                except Exception as e:  # noqa: BLE001
                    raise ConversionError(f"ai-edge-quantizer cannot quantize this model to {prec.name} "
                                          f"({RECIPES[prec.name]}): {_one_line(e)}") from None
                timings["quantize_s"] = time.perf_counter() - t0
        tmp = out_path.with_name(out_path.name + ".part")
        tmp.write_bytes(blob)
        os.replace(tmp, out_path)
        return TfliteArtifact(path=out_path, bytes=len(blob), converter=self.name, input_layout="NHWC",
                              calibration_samples=count, timings_s={k: round(v, 3) for k, v in timings.items()})

    @staticmethod
    def _export(litert_torch, torch, model, samples, timings) -> tuple[bytes, bool]:
        """The float32 TFLite model (NHWC input) and whether its batch dimension is dynamic."""
        if not isinstance(model, torch.nn.Module):
            raise ConversionError(f"the litert-torch route converts a torch.nn.Module, got {type(model).__name__}")
        example = torch.from_numpy(np.ascontiguousarray(np.concatenate([samples[:2], samples[:2]])[:2], np.float32))
        t0 = time.perf_counter()
        if TRY_DYNAMIC_BATCH:
            try:
                traced = _nhwc_input(_global_pools_as_mean(model.eval()))
                batch = torch.export.Dim("batch", min=1, max=65536)
                blob = litert_torch.convert(traced, (example,), dynamic_shapes=({0: batch},)).model_content()
                timings["litert_torch_s"] = time.perf_counter() - t0
                return bytes(blob), True
            except Exception:  # noqa: BLE001  (nn.Flatten and adaptive pooling fail with a symbolic batch)
                pass
            timings["dynamic_batch_attempt_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
        try:
            traced = _nhwc_input(model.eval())
            blob = litert_torch.convert(traced, (example[:1],)).model_content()
        except ConversionError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ConversionError(f"litert-torch cannot convert this model: {_one_line(e)}") from None
        timings["litert_torch_s"] = time.perf_counter() - t0
        return bytes(blob), False


def _calibrate(Interpreter, blob: bytes, qt, samples: np.ndarray, step: int) -> dict:
    """Activation ranges for ``qt``'s recipe: the min and max over all ``samples`` (as TFLiteConverter's
    calibration does). AEQ's own ``Quantizer.calibrate`` keeps an exponential moving average (weight 0.95 on
    the old value) of each step's min/max, which with one sample per step forgets all but the last ~20 samples:
    measured on zoo:refcnn, its ranges clipped activations of test images (max output error 119 steps)."""
    from ai_edge_quantizer import calibrator, recipe_manager
    from ai_edge_quantizer.utils import qsv_utils
    sig_key, in_name = _signature(Interpreter, blob)
    recipes = recipe_manager.RecipeManager()
    recipes.load_quantization_recipe(qt.get_quantization_recipe())
    with warnings.catch_warnings():  # LiteRT warns that keeping every tensor (what calibration reads) is for debugging
        warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors.*")
        cal = calibrator.Calibrator(bytearray(blob), num_threads=max(1, min(4, os.cpu_count() or 1)),
                                    qsv_update_func=qsv_utils.min_max_update)
        cal.calibrate({sig_key: [{in_name: samples[i:i + step]} for i in range(0, len(samples), step)]}, recipes)
        return cal.get_model_qsvs()


def _signature(Interpreter, blob: bytes) -> tuple[str, str]:
    """(signature key, input name) of the converted model's single input, as AEQ's calibration wants them."""
    sigs = Interpreter(model_content=blob).get_signature_list()
    if len(sigs) != 1:
        raise ConversionError(f"the litert-torch model has {len(sigs)} signatures; expected one")
    key, sig = next(iter(sigs.items()))
    if len(sig["inputs"]) != 1:
        raise ConversionError(f"the litert-torch model has {len(sig['inputs'])} inputs; the pipeline supports one")
    return key, sig["inputs"][0]
