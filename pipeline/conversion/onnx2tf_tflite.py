"""Stage 2: ONNX -> fully-int8 TFLite, calibrated on the representative dataset.

The conversion route sits behind the :class:`Converter` interface so a second route
(litert-torch + ai-edge-quantizer) can join later. The built-in route uses onnx2tf only for
what it is good at, turning the ONNX graph into an NHWC Keras graph in memory (no onnxsim
subprocesses, no SavedModel write, no pile of variants), then runs TFLiteConverter's
full-int8 pass once, with int8 built-ins only, so a model that cannot be fully int8 fails
instead of silently keeping float ops. Other targets pick another rung of the precision
ladder (fp32, fp16, dynamic-range, int16x8): each precision's converter settings are in its
entry of the registry (:mod:`pipeline.precisions`); the inspect stage checks that the result
meets that precision's contract.
"""
from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.conversion import TfliteArtifact
from pipeline.conversion.offline import onnx2tf_sample_images
from pipeline.errors import ConversionError, PipelineError
from pipeline.conversion.onnx_export import OnnxArtifact
from pipeline.precisions import Precision, get_precision
from pipeline.inputs.preprocessing import Preprocessing
from pipeline import quiet
def _short(e: BaseException) -> str:
    s = str(e).strip()
    if not s:
        return type(e).__name__
    lines = [ln.strip() for ln in s.splitlines() if ln.strip()]
    # TFLiteConverter errors put the useful line ("'tf.X' op is neither a custom op nor ...") late.
    useful = [ln for ln in lines if "op is neither" in ln or "not supported" in ln.lower() or "error:" in ln]
    if useful:
        msg = useful[0]
        if "'tf.Erf' op" in msg:
            msg += " (Erf comes from GELU: nn.GELU(approximate='tanh') converts to int8)"
        return msg[:300]
    # Keras call failures ("in user code:", a traceback, then "ValueError: Exception encountered when calling
    # layer ..." and the reason on the next line)
    for i, ln in enumerate(lines):
        if re.match(r"^\w*(Error|Exception): ", ln):
            if "Exception encountered when calling layer" in ln and i + 1 < len(lines):
                ln = ln.rstrip(".") + ": " + lines[i + 1]
            return re.sub(r" for '\{\{node [^']*'", "", ln)[:300]
    return lines[0][:300]


def _div_runs(art: TfliteArtifact, x: np.ndarray) -> TfliteArtifact:
    """A model with a DIV is run once on a few real inputs here, inside the conversion: LiteRT's int8
    DIV refuses a divisor at its zero point only at run time, and the rewrite that gets around it (``div_guard``)
    is tried only after a conversion that failed with that message."""
    from pipeline.tflite.inspect import inspect
    from pipeline.runtime.litert import TfliteRunner
    if "DIV" not in inspect(art.path).ops:
        return art
    try:
        TfliteRunner(art.path, kernels="xnnpack", threads=1, batch_size=1, input_layout=art.input_layout).run(x)
    except PipelineError as e:
        raise ConversionError(str(e)) from None
    return art


class Onnx2TfConverter:
    """onnx2tf (in memory, to an NHWC Keras graph) + TFLiteConverter at the target's precision."""

    name = "onnx2tf+tflite-converter"

    def preload(self, verbose: bool = False) -> None:
        with quiet.captured(verbose):
            import onnx2tf  # noqa: F401
            import tensorflow  # noqa: F401
            import tf_keras  # noqa: F401

    def convert(self, onnx: OnnxArtifact, representative: np.ndarray, pre: Preprocessing, *,
                per_channel: bool = True, out_path: Path, verbose: bool = False,
                precision: str = "int8", rewrite: bool = True, float_fallback: bool = False,
                float_nodes: tuple[str, ...] = ()) -> TfliteArtifact:
        """Converts ``onnx`` after the exact rewrites of ``ALWAYS_REWRITES`` (patterns onnx2tf 1.28 turns into
        wrong or aborting int8 models); when that conversion fails, once more after the other rewrites of
        :mod:`pipeline.conversion.rewrites` that match. The artifact records every rewrite applied, with its
        measured effect on the FP32 outputs, and why. ``rewrite=False``: onnx2tf 1.28 on the graph as it is.

        ``float_fallback`` (an int8 target that allows float ops): int8 with float fallback, as TFLiteConverter
        does without the TFLITE_BUILTINS_INT8 restriction (an op with no int8 kernel stays float between a
        DEQUANTIZE and a QUANTIZE; graph input and output stay int8), and the ops whose output tensors are named
        in ``float_nodes`` (names in the converted model) are kept in float too (the MLIR quantizer's deny list:
        calibrate, then quantize with ``denylisted_nodes``)."""
        import dataclasses

        from pipeline.conversion.rewrites import convert_with_rewrites
        if float_nodes and not float_fallback:
            raise ConversionError("float_nodes given for a target that does not allow float fallback; choose "
                                  "--target tflite-int8-float-fallback")
        args = dict(per_channel=per_channel, out_path=out_path, verbose=verbose, precision=precision,
                    dynamic_batch=onnx.dynamic_batch, float_fallback=float_fallback, float_nodes=tuple(float_nodes))
        if not rewrite:
            return self._convert(onnx.path, representative, pre, **args)
        check = np.ascontiguousarray(representative[:32], np.float32)
        with tempfile.TemporaryDirectory(prefix="onnx2tf-rw-") as rw:
            try:
                art, done = convert_with_rewrites(
                    lambda src: _div_runs(self._convert(src, representative, pre, **args), check[:4]),
                    onnx.path, check, Path(rw), values=representative)
            except ConversionError as failed:
                if not onnx.dynamic_batch:
                    raise
                art, done = self._fixed_batch(onnx, representative, pre, check, Path(rw), args, failed)
        return dataclasses.replace(art, rewrites=tuple(done))

    def _fixed_batch(self, onnx: OnnxArtifact, representative, pre: Preprocessing, check, rw: Path, args: dict,
                     failed: ConversionError):
        """The last try of a dynamic-batch graph that failed with every rewrite: the same graph at a fixed batch
        of 1 (onnx2tf 1.28 mishandles some ops only under the dynamic batch: attention reshapes, LayerNorm,
        GroupNorm, ConvTranspose). Recorded as the rewrite ``fixed_batch`` with its measured FP32 difference; the
        run stage then feeds one image at a time. Raises the first failure, with this try's, if it fails too."""
        from pipeline.conversion.rewrites import convert_with_rewrites, fixed_batch_record
        why = f"the dynamic-batch graph failed to convert: {str(failed)[:200]}"
        (rw / "fb").mkdir()
        try:
            rec = fixed_batch_record(onnx.path, rw / "fb" / "fixed_batch.onnx", check[:8], why=why)
        except Exception as e:  # noqa: BLE001  (a RewriteError, or onnxruntime cannot run it at batch 1)
            raise ConversionError(f"{failed} (at a fixed batch of 1 it could not be checked either: "
                                  f"{str(e)[:160]})") from None
        try:
            art, done = convert_with_rewrites(
                lambda src: _div_runs(self._convert(src, representative, pre, **{**args, "dynamic_batch": False}),
                                      check[:4]),
                rw / "fb" / "fixed_batch.onnx", check[:8], rw / "fb", values=representative)
        except ConversionError as again:
            raise ConversionError(f"{failed} (at a fixed batch of 1 too: {str(again)[:200]})") from None
        return art, [rec, *done]

    def _convert(self, src: Path, representative: np.ndarray, pre: Preprocessing, *, per_channel: bool,
                 out_path: Path, verbose: bool, precision: str, dynamic_batch: bool, float_fallback: bool = False,
                 float_nodes: tuple[str, ...] = ()) -> TfliteArtifact:
        """One conversion of the ONNX graph ``src`` (``dynamic_batch``: whether its batch axis is dynamic)."""
        prec = get_precision(precision, error=ConversionError)
        calibrated = prec.representative_dataset
        timings = {}
        failure: Exception | None = None
        with tempfile.TemporaryDirectory(prefix="onnx2tf-") as work, quiet.captured(verbose) as cap:
            if not dynamic_batch:  # onnx2tf reads (or else downloads) them only for a fixed batch
                onnx2tf_sample_images(Path(work), representative)
            try:
                t0 = time.perf_counter()
                import onnx2tf
                import tensorflow as tf
                timings["import_s"] = time.perf_counter() - t0
                def attempt(src: Path, tag: str):
                    t0 = time.perf_counter()
                    # Keras numbers layer names per process (tf.nn.relu_9, ...) and the names end up in the
                    # flatbuffer: without a reset, a second conversion in the same process writes a larger,
                    # byte-different file than the CLI would (same numbers, longer tensor names).
                    import tf_keras
                    tf_keras.backend.clear_session()
                    here, given = os.getcwd(), constants_as_initializers(src, Path(work) / f"in{tag}.onnx")
                    try:
                        # in the temporary folder, which holds onnx2tf's sample images (conversion/offline.py)
                        os.chdir(work)
                        keras_model = onnx2tf.convert(
                            input_onnx_file_path=str(Path(here) / given),
                            output_folder_path=work,
                            disable_model_save=True, not_use_onnxsim=True, non_verbose=not verbose,
                            verbosity="debug" if verbose else "error",
                        )
                    except SystemExit:
                        raise ConversionError("onnx2tf could not convert the ONNX graph") from None
                    finally:
                        os.chdir(here)
                    timings["onnx2tf_s"] = timings.get("onnx2tf_s", 0.0) + time.perf_counter() - t0
                    if keras_model is None or len(keras_model.inputs) != 1:
                        raise ConversionError("onnx2tf returned no single-input model")
                    layout = _input_layout(tuple(keras_model.inputs[0].shape[1:]), pre.input_shape)
                    samples = np.transpose(representative, (0, 2, 3, 1)) if layout == "NHWC" else representative
                    samples = np.ascontiguousarray(samples, np.float32)

                    t0 = time.perf_counter()
                    spec = keras_model.inputs[0]
                    fn = tf.function(lambda x: keras_model(x),
                                     input_signature=[tf.TensorSpec(spec.shape, tf.float32, name="input")])
                    conv = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], keras_model)
                    # Calibration batches: min/max statistics do not depend on batching (checked: byte-identical
                    # models), and batches of 32 calibrate several times faster than one sample at a time.
                    calib_batch = 32 if spec.shape[0] is None else 1
                    _configure(conv, tf, prec, samples, per_channel, calib_batch, float_fallback)
                    try:
                        blob = (_quantize_with_fallback(conv, tf, prec, float_nodes) if float_fallback
                                else conv.convert())
                    except ConversionError:
                        raise
                    except Exception as e:
                        if prec.fully_int8_required and not float_fallback:
                            raise ConversionError(
                                f"TFLiteConverter cannot make this model fully int8: {_short(e)}; replace the op with an "
                                "int8-supported one (see the TFLite int8 op list) or choose a float target"
                            ) from None
                        raise ConversionError(
                            f"TFLiteConverter cannot convert this model to {precision} ({prec.converter.summary}): "
                            f"{_short(e)}; replace the op or choose another precision (python -m pipeline.export "
                            "--list-targets)") from None
                    key = f"tflite_{precision}_s"
                    timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0
                    return blob, layout, samples

                def intact(blob: bytes, layout: str, tag: str) -> bool:
                    check = Path(work) / f"check{tag}.tflite"
                    check.write_bytes(blob)
                    return batch_axis_intact(check, layout, pre.input_shape)

                blob, layout, samples = attempt(src, "")
                folded_used = False
                if not intact(blob, layout, ""):
                    # onnx2tf applied a pad (or reshape) computed by a shape subgraph to the batch axis; with the
                    # subgraph folded to constants (what onnxsim, which we skip for speed, would do) it converts.
                    # If the second try fails too, the first model stands and the run stage says what is wrong.
                    t0 = time.perf_counter()
                    try:
                        folded = fold_constants(src, Path(work) / "folded.onnx")
                        second = attempt(folded, "_folded")
                    except Exception:  # noqa: BLE001
                        second = None
                    timings["fold_and_reconvert_s"] = time.perf_counter() - t0
                    if second is not None and intact(second[0], second[1], "_folded"):
                        (blob, layout, samples), folded_used = second, True
            except ConversionError:
                raise
            except Exception as e:  # described below, once onnx2tf's captured log (naming the node) is complete
                failure = e
        if failure is not None:
            raise ConversionError(_describe_failure(failure, cap.text, src)) from None
        tmp = out_path.with_name(out_path.name + ".part")
        tmp.write_bytes(blob)
        os.replace(tmp, out_path)
        return TfliteArtifact(path=out_path, bytes=len(blob), converter=self.name, input_layout=layout,
                              calibration_samples=int(len(samples)) if calibrated else 0,
                              timings_s={k: round(v, 3) for k, v in timings.items()}, constant_folded=folded_used,
                              float_nodes=tuple(float_nodes))


def _quantize_with_fallback(conv, tf, prec: Precision, float_nodes: tuple[str, ...]) -> bytes:
    """Int8 with float fallback: calibrate (a float model carrying the activation ranges), then quantize with the
    MLIR quantizer, int8 graph input and output, the ops writing ``float_nodes`` left in float. A name that is
    not an op output of the calibrated model is refused (the quantizer would ignore it silently)."""
    from tensorflow.lite.python import convert as tfl_convert
    conv.experimental_mlir_quantizer = True
    conv._experimental_calibrate_only = True
    calibrated = conv.convert()
    if float_nodes:
        known = op_output_names(calibrated)
        unknown = [n for n in float_nodes if n not in known]
        if unknown:
            raise ConversionError(f"no op of the converted model writes {unknown[0]!r} (float layers are named by "
                                  "their TFLite output tensor, as report.json layer_errors lists them)")
    io = getattr(tf, prec.converter.io_dtype or "float32")
    return bytes(tfl_convert.mlir_quantize(
        calibrated, disable_per_channel=conv._experimental_disable_per_channel, fully_quantize=True,
        input_data_type=io, output_data_type=io, denylisted_nodes=list(float_nodes) or None))


def op_output_names(blob: bytes) -> set[str]:
    """The output tensor names of every op of a .tflite model (its bytes)."""
    from ai_edge_litert import schema_py_generated as fb
    m = fb.Model.GetRootAsModel(blob, 0)
    names = set()
    for g in range(m.SubgraphsLength()):
        sg = m.Subgraphs(g)
        for i in range(sg.OperatorsLength()):
            op = sg.Operators(i)
            for j in range(op.OutputsLength()):
                t = op.Outputs(j)
                if t >= 0:
                    names.add(sg.Tensors(t).Name().decode("utf-8", "replace"))
    return names


def _describe_failure(e: Exception, log: str, onnx_path: Path) -> str:
    """One line for a failed onnx2tf/TFLiteConverter run, naming the ONNX node when onnx2tf's log does."""
    log = re.sub(r"\x1b\[[0-9;]*m", "", log or "")
    fix = ("replace that op in the model with one onnx2tf supports, or try another route (--converter litert-torch "
           "or onnx2tf-flatbuffer)")
    missing = re.search(r"No module named '?onnx2tf\.ops\.(\w+)", str(e))
    if missing:
        return f"onnx2tf has no converter for the ONNX op {missing.group(1)}; {fix}"
    named = re.findall(r"onnx_op_name: (\S+)", log)
    if named:
        node = named[-1]
        op_type = None
        try:
            import onnx
            graph = onnx.load(str(onnx_path), load_external_data=False).graph
            op_type = next((n.op_type for n in graph.node if n.name == node), None)
        except Exception:
            pass
        what = f"{node} ({op_type})" if op_type else node
        reason = _short(e).split(" Tensor [")[0].strip()[:160]  # TF pastes whole tensors into some messages
        return f"onnx2tf cannot convert the ONNX node {what}: {reason}; {fix}"
    return f"ONNX -> TFLite conversion failed: {_short(e)}; another route (--converter litert-torch or onnx2tf-flatbuffer) may convert it; -v shows the converter's own log"


def _representative_dataset(samples: np.ndarray, batch: int):
    return lambda: ([samples[i:i + batch]] for i in range(0, len(samples), batch))


def _configure(conv, tf, precision: Precision, samples: np.ndarray, per_channel: bool, calib_batch: int = 1,
               float_fallback: bool = False) -> None:
    """Set up TFLiteConverter for one precision (its ``converter`` settings); ``float_fallback``: without the
    integer-only op set, so an op with no int8 kernel stays float instead of failing the conversion."""
    s = precision.converter
    if s.optimize:
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if s.supported_types:
        conv.target_spec.supported_types = [getattr(tf, t) for t in s.supported_types]
    if s.ops_set and not float_fallback:
        conv.target_spec.supported_ops = [getattr(tf.lite.OpsSet, s.ops_set)]
    if s.io_dtype:
        conv.inference_input_type = getattr(tf, s.io_dtype)
        conv.inference_output_type = getattr(tf, s.io_dtype)
    if precision.representative_dataset:  # calibrated (without one, activations are quantized on the fly)
        conv.representative_dataset = _representative_dataset(samples, calib_batch)
        conv._experimental_disable_per_channel = not per_channel


def batch_axis_intact(path: Path, input_layout: str, input_chw: tuple[int, int, int]) -> bool:
    """Whether a converted model gives one output row per input row, on LiteRT's built-in kernels at batch 2 (or
    its fixed batch): ``TfliteRunner.run`` refuses a model whose output rows do not match, as one whose
    conversion applied a pad or reshape to the batch axis."""
    from pipeline.errors import PipelineError
    from pipeline.runtime.litert import TfliteRunner
    try:
        runner = TfliteRunner(path, kernels="builtin", threads=1, batch_size=2, input_layout=input_layout)
        runner.run(np.zeros((2, *input_chw), np.float32))
    except PipelineError:
        return False
    return True


def fold_constants(src: Path, dst: Path) -> Path:
    """``src`` with its constant subgraphs (shape computations) folded, by onnxruntime's basic graph optimizer."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    return dst


def constants_as_initializers(src: Path, dst: Path) -> Path:
    """Write ``src`` to ``dst`` with every tensor-valued top-level Constant node made an initializer.

    torch.onnx.export feeds the starts/ends/axes/steps of Slice (and other shape operands)
    from Constant nodes. onnx2tf 1.28 maps an NCHW axis to NHWC only when those operands are
    initializers (as onnxsim, which we skip for speed, would leave them), so a channel slice
    ``x[:, 0::2]`` fed by Constant nodes was applied to the H axis instead (found with
    ShuffleNetV2's channel split: a wrong shape at best, a silently wrong model at worst).
    Returns ``src`` itself when there is nothing to move.
    """
    import onnx
    proto = onnx.load(str(src))
    keep, moved = [], 0
    for node in proto.graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            proto.graph.initializer.append(tensor)
            moved += 1
        else:
            keep.append(node)
    if not moved:
        return src
    del proto.graph.node[:]
    proto.graph.node.extend(keep)
    large = proto.ByteSize() >= onnx.checker.MAXIMUM_PROTOBUF  # over 2 GB: tensors in a file beside dst
    onnx.save(proto, str(dst), save_as_external_data=large, all_tensors_to_one_file=True, location=dst.name + ".data")
    return dst


def _input_layout(keras_shape: tuple, chw: tuple[int, int, int]) -> str:
    c, h, w = chw
    if keras_shape == (h, w, c):
        return "NHWC"
    if keras_shape == (c, h, w):
        return "NCHW"
    raise ConversionError(f"onnx2tf produced input shape {keras_shape}, which matches neither {chw} (C,H,W) nor its NHWC form")
