"""Stage ``debug_layers``: where int8 hurts, layer by layer (:mod:`pipeline.debug.layers`).

Runs when ``--debug-layers`` asks, and by itself when an accuracy gate fails (``max_drop_pp`` or
``min_agreement``); a passing export without the flag pays nothing. It converts the same ONNX model by the same
route at float32 (the reference whose tensors carry the same names), then compares every activation of the
converted model with it on the first test inputs. When ``--recover`` later replaces the model, this section still
describes the model as first converted: what went wrong, before the fix.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

SAMPLES = 64
SAMPLES_LARGE = 8  # the fewest, for large inputs (samples)


def samples(values_per_image: int) -> int:
    """How many test images the layer-wise comparison keeps every tensor of (both models, and the ONNX graph's):
    SAMPLES up to 3x64x64 inputs, fewer above (64 images of 3x224x224 efficientnet_b0 took the export to 18 GB),
    at least SAMPLES_LARGE."""
    return int(min(max(SAMPLES * (3 * 64 * 64) // max(values_per_image, 1), SAMPLES_LARGE), SAMPLES))


def route_key(converter_name: str) -> str:
    """The registry key (``routes()``) of the route whose display name is ``converter_name``."""
    from pipeline.conversion import routes
    for key, route in routes().items():
        if route.name == converter_name or key == converter_name:
            return key
    raise KeyError(converter_name)


def float_reference(route: str, onnx, representative, pre, *, source, in_process: bool, verbose: bool,
                    dest: Path):
    """The same model converted by ``route`` at float32 into ``dest`` (a TfliteArtifact)."""
    from pipeline.stages.convert import _route
    kwargs = dict(per_channel=True, out_path=dest, verbose=verbose, precision="fp32")
    art, _ = _route(route, onnx, representative, pre, source, None, in_process, kwargs, check=None)
    return art


def needed(asked: bool, cmp, max_drop_pp: float, min_agreement: float) -> str | None:
    """Why the stage runs (None: it does not)."""
    from pipeline.reliability.metrics import accuracy_gates
    if asked:
        return "asked (--debug-layers)"
    failed = [n for n, g in accuracy_gates(cmp, max_drop_pp, min_agreement).items() if not g.passed]
    return (f"the {' and '.join(failed)} gate{'s' if len(failed) > 1 else ''} failed") if failed else None


def debug_layers(why: str, onnx, tfl, representative, pre, x_test, *, source, in_process: bool, verbose: bool,
                 log=None) -> dict:
    """The ``layer_errors`` section: the describe() of :func:`pipeline.debug.layers.layer_errors`, with how the
    float reference was made and why the stage ran."""
    from pipeline.debug.layers import layer_errors
    if tfl.preprocessing is None or tfl.input_layout not in ("NHWC", "NCHW"):
        raise ValueError("the converted model carries no deployment record")
    t0 = time.perf_counter()
    key = route_key(tfl.converter)
    with tempfile.TemporaryDirectory(prefix="edge-int8-debug-") as tmp:
        ref = float_reference(key, onnx, representative, pre, source=source, in_process=in_process,
                              verbose=verbose, dest=Path(tmp) / "model_fp32.tflite")
        t_ref = time.perf_counter() - t0
        res = layer_errors(tfl.path, ref.path, onnx.path, x_test, input_layout=tfl.input_layout,
                           samples=samples(int(x_test[0].size)))
    d = res.describe()
    d["ran_because"] = why
    d["float_reference"] = (f"the same {'model' if key == 'litert-torch' else 'ONNX model'} converted by route "
                            f"{key} at float32 ({t_ref:.1f} s), not written to the folder")
    d["stage_seconds"] = round(time.perf_counter() - t0, 3)
    return d


def attach(report, section: dict | None, recovered: bool = False) -> None:
    if section is None:
        return
    if recovered:
        section = {**section, "describes": "the model as first converted, before --recover replaced it"}
    report.sections["layer_errors"] = section
