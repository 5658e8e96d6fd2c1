"""Route ``onnx2tf-flatbuffer``: onnx2tf 2.x with its TensorFlow-free ``flatbuffer_direct`` backend.

onnx2tf 2.x lowers the ONNX graph to its own IR and writes the TFLite flatbuffer itself (no TensorFlow, no
TFLiteConverter). Its integer models are calibrated: it runs the float32 model it wrote on LiteRT over the
calibration samples, records every tensor's min/max and quantizes strictly (a tensor it cannot quantize
is an error, not a float leftover). This route feeds it OUR representative samples (already preprocessed
float32, written as one ``.npy`` in the model's TFLite input layout, passed as
``custom_input_op_name_np_data_path`` with mean 0 and std 1 so onnx2tf does not normalise them again), so
it never uses, nor tries to download, sample data of its own.

Installation. onnx2tf 2.x declares Python >= 3.12 and pins exact versions of packages the venv already has,
so ``./setup.sh`` installs onnx2tf==2.6.9 (+ onnxsim, sne4onnx) without their declared dependencies into
``.venv/routes/onnx2tf2``. Nothing in this process imports it: each conversion runs in a child Python
(the venv's interpreter) with that folder first on ``PYTHONPATH`` and its ``bin/`` (the ``onnxsim``
executable onnx2tf calls) first on ``PATH``.

The child, in its own temporary folder inside the TMPDIR this process has (removed afterwards, whatever
happens; the child's TMPDIR points inside it too):

- gets a copy of the ONNX file (onnxsim rewrites its input in place) and the calibration ``.npy``;
- cannot reach the network, by two locks: a ``sitecustomize.py`` on its ``PYTHONPATH`` makes
  ``socket.getaddrinfo``, ``socket.create_connection`` and IP ``connect``/``connect_ex``/``sendto`` raise
  ``OSError`` (in the child and in the ``onnxsim`` subprocesses it starts, which inherit the path); and,
  where ``unshare -n`` (or ``unshare -r -n``) works, it runs in a new network namespace that has no interface
  but a down loopback. ``NETWORK_BLOCK`` says which locks this host gives;
- is killed (its whole process group) after ``timeout_s`` (30 min by default).

Errors are one line: a child killed by a signal names it ("onnx2tf 2.x died with SIGABRT while converting
model.onnx"); a failed conversion gives the cause from its log (the ONNX node and op type onnx2tf stopped on,
when it says), never a traceback.

Precisions (``pipeline/precisions.py``) this route offers, where flatbuffer_direct writes a model that meets the
rung's contract: ``int8`` (``*_full_integer_quant.tflite``: int8 activations, int8 input and output,
per-channel or per-tensor weights), ``fp32`` (``*_float32.tflite``) and ``dynamic``
(``*_dynamic_range_quant.tflite``). Not offered (a ConversionError saying so): ``fp16`` (its float16 model has
float16 activations and float16 input and output, not the fp16 rung's float16 weights with float32
activations and I/O) and ``int16x8`` (its int16-activation model meets the rung's dtypes but gave wrong outputs
on LiteRT: measured on a small CNN with onnx2tf 2.6.9, 72% top-1 agreement with FP32 and every output
saturated on the reference kernels).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from functools import lru_cache
from pathlib import Path

import numpy as np

from pipeline.conversion import TfliteArtifact, refuse_float_nodes
from pipeline.errors import ConversionError
from pipeline.conversion.onnx_export import OnnxArtifact
from pipeline.precisions import get_precision
from pipeline.inputs.preprocessing import Preprocessing

ONNX2TF_VERSION = "2.6.9"
_REPO = Path(__file__).resolve().parents[2]
DEFAULT_ROUTE_DIR = _REPO / ".venv" / "routes" / "onnx2tf2"
DEFAULT_TIMEOUT_S = 30 * 60.0
FIXED_BATCH_WHY = ("onnx2tf 2.6.9's flatbuffer_direct pads a dynamic-batch input through SHAPE/FILL ops, which strict "
                   "int8 refuses (FILL); at a fixed batch of 1 it does not: the deployed model takes one image at a "
                   "time, as devices run it")

# precision -> (what the child asks onnx2tf for, the file of its output folder that is our model)
_OUTPUTS = {
    "int8": ("integer", "full_integer_quant"),
    "fp32": ("float", "float32"),
    "dynamic": ("dynamic", "dynamic_range_quant"),
}
_NOT_OFFERED = {
    "fp16": "its float16 model has float16 activations and float16 input/output, not the fp16 rung's float16 "
            "weights with float32 activations and I/O",
    "int16x8": "its int16-activation model (onnx2tf 2.6.9) gave wrong outputs on LiteRT in our checks",
}

_SITECUSTOMIZE = textwrap.dedent('''
    """Network lock of the onnx2tf-flatbuffer conversion child (pipeline/conversion/onnx2tf_flatbuffer.py)."""
    from pipeline.conversion.offline import block_network
    block_network("network access is blocked in the onnx2tf-flatbuffer conversion child")
''')


_CHILD = textwrap.dedent('''
    import json, sys, traceback
    args = json.load(open(sys.argv[1]))
    try:
        import onnx2tf
        version = getattr(onnx2tf, "__version__", "?")
        if not str(version).startswith("2."):
            print(f"ROUTE_ERROR: imported onnx2tf {version} from {onnx2tf.__file__}, not 2.x", flush=True)
            sys.exit(3)
        kw = dict(input_onnx_file_path=args["onnx"], output_folder_path=args["out"],
                  tflite_backend="flatbuffer_direct", non_verbose=not args["verbose"],
                  not_use_onnxsim=not args["simplify"],
                  verbosity="info" if args["verbose"] else "error")
        if args["kind"] == "integer":
            try:  # two workarounds for onnx2tf 2.6.9 (the pinned version; a test stand-in has no tflite_builder)
                from onnx2tf import tflite_builder
                from onnx2tf.tflite_builder import quantization
            except ImportError:
                tflite_builder = quantization = None
            if quantization is not None and hasattr(quantization, "_quantize_bias_tensor"):
                # it gives an int32 bias its weights' quantized_dimension (3 for a depthwise conv), which LiteRT
                # rejects ("quantized_dimension must be in range [0, 1)"): a rank-1 bias is quantized along 0
                quantize_bias = quantization._quantize_bias_tensor
                def _quantize_bias_tensor(*, tensor, **kw):
                    quantize_bias(tensor=tensor, **kw)
                    q = tensor.quantization
                    if q is not None and not 0 <= q.quantized_dimension < max(1, len(tensor.shape)):
                        q.quantized_dimension = 0
                quantization._quantize_bias_tensor = _quantize_bias_tensor
            if tflite_builder is not None and hasattr(tflite_builder, "strict_int16_activation_skip_reasons"):
                # the int16-activation variants it also builds are not the model asked for (and their depthwise
                # biases fail its own validation, "bias->type != kTfLiteInt64")
                tflite_builder.strict_int16_activation_skip_reasons = (
                    lambda model_ir: ["not requested: the pipeline asked for the full int8 model"])
            kw.update(output_integer_quantized_tflite=True, quant_type=args["quant_type"],
                      input_quant_dtype="int8", output_quant_dtype="int8",
                      custom_input_op_name_np_data_path=[[args["input_name"], args["calib"], 0.0, 1.0]])
        elif args["kind"] == "dynamic":
            kw.update(output_dynamic_range_quantized_tflite=True, quant_type=args["quant_type"])
        onnx2tf.convert(**kw)
    except SystemExit:
        raise
    except BaseException as e:
        traceback.print_exc()
        chain = [e]  # the innermost cause says what failed ("flatbuffer_direct fast path failed." wraps it)
        while chain[-1].__cause__ is not None and len(chain) < 20:
            chain.append(chain[-1].__cause__)
        root = chain[-1]
        first = " ".join(ln.strip() for ln in str(root).strip().splitlines()[:2])
        print(f"ROUTE_ERROR: {type(root).__name__}: {first}", flush=True)
        sys.exit(1)
''')


@lru_cache(maxsize=1)
def _unshare_prefix() -> tuple[str, ...]:
    """``unshare -n`` (or ``unshare -r -n`` without root) when it works on this host, else ()."""
    exe = shutil.which("unshare")
    if not exe:
        return ()
    for prefix in ((exe, "-n"), (exe, "-r", "-n")):
        try:
            if subprocess.run([*prefix, "true"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=10).returncode == 0:
                return prefix
        except (OSError, subprocess.SubprocessError):
            pass
    return ()


def network_block() -> str:
    """Which network locks a conversion child gets on this host."""
    prefix = _unshare_prefix()
    if not prefix:
        return "sitecustomize socket lock"
    return f"sitecustomize socket lock + {' '.join(['unshare', *prefix[1:]])} (new network namespace)"


def child_command(argv: list[str], block_dir: Path) -> tuple[list[str], dict]:
    """The command and environment that run ``python argv...`` the way a conversion child runs (network locked,
    ``block_dir`` holding the sitecustomize.py lock): used by the route and by its tests."""
    block_dir.mkdir(parents=True, exist_ok=True)
    (block_dir / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(block_dir)
    env["PYTHONNOUSERSITE"] = "1"
    return [*_unshare_prefix(), sys.executable, *argv], env


def _signal_name(returncode: int) -> str | None:
    sig = -returncode if returncode < 0 else (returncode - 128 if 128 < returncode < 160 else 0)
    if sig <= 0:
        return None
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


class Onnx2TfFlatbufferConverter:
    """onnx2tf 2.x, flatbuffer_direct backend, in a network-locked child process."""

    name = "onnx2tf-flatbuffer"

    def __init__(self, route_dir: Path | None = None, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.route_dir = Path(route_dir) if route_dir is not None else DEFAULT_ROUTE_DIR
        self.timeout_s = float(timeout_s)

    def _check_installed(self) -> None:
        if not (self.route_dir / "onnx2tf" / "__init__.py").is_file():
            raise ConversionError(f"onnx2tf {ONNX2TF_VERSION} (route {self.name}) is not installed in "
                                  f"{self.route_dir}; run ./setup.sh --install-only")

    def preload(self, verbose: bool = False) -> None:
        self._check_installed()

    def convert(self, onnx: OnnxArtifact, representative: np.ndarray, pre: Preprocessing, *,
                per_channel: bool = True, out_path: Path, verbose: bool = False,
                precision: str = "int8",
                float_fallback: bool = False, float_nodes: tuple = ()) -> TfliteArtifact:
        refuse_float_nodes(self.name, float_nodes)  # float_fallback alone: a fully-int8 model is one
        prec = get_precision(precision, error=ConversionError)
        if prec.name in _NOT_OFFERED or prec.name not in _OUTPUTS:
            why = _NOT_OFFERED.get(prec.name, "flatbuffer_direct writes no model of that kind")
            raise ConversionError(f"route {self.name} does not offer precision {prec.name}: {why}; "
                                  "use the onnx2tf route (--converter onnx2tf) for it")
        self._check_installed()
        kind, suffix = _OUTPUTS[prec.name]
        out_path = Path(out_path)
        timings: dict[str, float] = {}
        samples = np.ascontiguousarray(representative, np.float32) if kind == "integer" else None
        if samples is not None and (samples.ndim != 4 or tuple(samples.shape[1:]) != tuple(pre.input_shape)):
            raise ConversionError(f"representative samples have shape {samples.shape}, expected N x "
                                  f"{'x'.join(map(str, pre.input_shape))} (N x C x H x W)")
        work = Path(tempfile.mkdtemp(prefix="onnx2tf2-"))
        try:
            src, records = onnx.path, []
            if kind == "integer" and onnx.dynamic_batch:
                from pipeline.conversion.rewrites import fixed_batch_record
                try:
                    records.append(fixed_batch_record(onnx.path, work / "fixed_batch.onnx", samples[:8],
                                                      why=FIXED_BATCH_WHY))
                    src = work / "fixed_batch.onnx"
                except Exception:  # noqa: BLE001  (onnxruntime cannot run it: onnx2tf gets the graph as it is)
                    pass
            from pipeline.conversion.rewrites import convert_with_rewrites
            (work / "rw").mkdir()
            (blob, layout), more = convert_with_rewrites(
                lambda path: self._convert_path(work, path, onnx.input_name, samples, kind, suffix, per_channel,
                                                verbose, pre, timings, simplify=path == src,
                                                shown=onnx.path.name),
                src, np.ascontiguousarray(samples[:8] if samples is not None else np.zeros((1, *pre.input_shape),
                                                                                          np.float32)),
                work / "rw")
            records += more
        finally:
            shutil.rmtree(work, ignore_errors=True)
        tmp = out_path.with_name(out_path.name + ".part")
        tmp.write_bytes(blob)
        os.replace(tmp, out_path)
        return TfliteArtifact(path=out_path, bytes=len(blob), converter=self.name, input_layout=layout,
                              calibration_samples=int(len(samples)) if samples is not None else 0,
                              timings_s={k: round(v, 3) for k, v in timings.items()}, rewrites=tuple(records))

    def _convert_path(self, work: Path, src: Path, input_name: str, samples, kind: str, suffix: str,
                      per_channel: bool, verbose: bool, pre: Preprocessing, timings: dict,
                      simplify: bool, shown: str) -> tuple[bytes, str]:
        """One conversion of the ONNX file ``src``: the model's bytes and its input layout. ``simplify=False``
        (a graph our rewrites changed): onnx2tf skips onnxsim, whose optimizer fuses a Pad back into the next
        MaxPool and so undoes ``maxpool_pad`` (resnet18 then stops on PADV2 again)."""
        n = len(list(work.glob("try*")))
        # onnx2tf's calibration feeds the samples to the TFLite model it wrote, in that model's input layout:
        # onnx2tf makes a 4-D image input NHWC, so NHWC goes first; should the model come out NCHW, it is
        # converted again with NCHW samples (the first model's statistics came from mis-shaped inputs).
        layout_guess = "NHWC"
        blob, layout = None, None
        for attempt in range(2):
            t0 = time.perf_counter()
            model = self._run_child(work / f"try{n + attempt}", src, input_name, samples, layout_guess, kind,
                                    suffix, per_channel, verbose, simplify, shown)
            timings["onnx2tf_s"] = timings.get("onnx2tf_s", 0.0) + time.perf_counter() - t0
            layout = _input_layout(model, pre.input_shape)
            if samples is None or layout == layout_guess:
                blob = model.read_bytes()
                break
            layout_guess = layout
        if blob is None:
            raise ConversionError(f"onnx2tf 2.x gave a {layout} input for {layout_guess} calibration samples "
                                  f"and the other way round converting {shown}")
        return blob, layout

    def _run_child(self, d: Path, onnx_path: Path, input_name: str, samples: np.ndarray | None, layout: str,
                   kind: str, suffix: str, per_channel: bool, verbose: bool, simplify: bool = True,
                   shown: str | None = None) -> Path:
        shown = shown or onnx_path.name  # the file name messages give (the user's, not a rewritten copy's)
        d.mkdir(parents=True)
        (d / "tmp").mkdir()
        src = d / "model.onnx"  # a copy: onnxsim rewrites its input file in place
        shutil.copyfile(onnx_path, src)
        ext = onnx_path.with_name(onnx_path.name + ".data")
        if ext.exists():
            shutil.copyfile(ext, d / ext.name)
        calib = None
        if samples is not None:
            calib = d / "calibration.npy"
            np.save(calib, np.transpose(samples, (0, 2, 3, 1)) if layout == "NHWC" else samples, allow_pickle=False)
        args = {"onnx": str(src), "out": str(d / "out"), "kind": kind, "verbose": bool(verbose),
                "quant_type": "per-channel" if per_channel else "per-tensor", "input_name": input_name,
                "calib": str(calib) if calib else None, "simplify": bool(simplify)}
        (d / "args.json").write_text(json.dumps(args))
        (d / "child.py").write_text(_CHILD)
        cmd, env = child_command([str(d / "child.py"), str(d / "args.json")], d / "lock")
        env["PYTHONPATH"] = os.pathsep.join([str(self.route_dir), env["PYTHONPATH"]])
        env["PATH"] = os.pathsep.join([str(self.route_dir / "bin"), env.get("PATH", os.defpath)])
        env["TMPDIR"] = str(d / "tmp")
        env["TQDM_DISABLE"] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        log_path = d / "log.txt"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, cwd=d, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=self.timeout_s)
            except BaseException:  # timeout, Ctrl-C: the whole group (onnxsim included) goes
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
                if isinstance(sys.exc_info()[1], subprocess.TimeoutExpired):
                    raise ConversionError(f"onnx2tf 2.x did not finish converting {shown} within "
                                          f"{self.timeout_s:.0f} s; it was killed") from None
                raise
            if rc != 0:  # an onnxsim subprocess left behind by a child that died or failed
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        text = log_path.read_text(errors="replace")
        if verbose:
            sys.stderr.write(text)
        sig = _signal_name(rc)
        if sig:
            raise ConversionError(f"onnx2tf 2.x died with {sig} while converting {shown}; "
                                  "re-run with -v to see its output")
        model = d / "out" / f"model_{suffix}.tflite"
        if rc != 0 or not model.is_file():
            raise ConversionError(describe_failure(text, src if src.exists() else onnx_path, shown, rc))
        return model


def _input_layout(model: Path, chw: tuple[int, int, int]) -> str:
    from pipeline.tflite.inspect import inspect
    shape = tuple(int(v) for v in inspect(model).inputs[0].shape[1:])
    c, h, w = chw
    if shape == (h, w, c):
        return "NHWC"
    if shape == (c, h, w):
        return "NCHW"
    raise ConversionError(f"onnx2tf 2.x produced input shape {shape}, which matches neither {tuple(chw)} (C,H,W) "
                          "nor its NHWC form")


def describe_failure(log: str, onnx_path: Path, name: str, rc: int) -> str:
    """One line from a failed child's log: the cause, and the ONNX node (op type) it stopped on when known."""
    import re
    text = re.sub(r"\x1b\[[0-9;]*m", "", log or "")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    reason = next((ln[len("ROUTE_ERROR: "):] for ln in reversed(lines) if ln.startswith("ROUTE_ERROR: ")), None)
    if reason is None:  # onnx2tf logged an error and called sys.exit
        errs = [ln for ln in lines if re.search(r"\b(ERROR|Error|error)\b", ln) and not ln.startswith("Traceback")]
        reason = errs[-1] if errs else (lines[-1] if lines else f"exit code {rc}, no output")
    reason = re.sub(r"^(ERROR:|\[ERROR\])\s*", "", reason)
    reason = re.sub(r"\s*See instructions: \S+", "", reason)[:300]
    try:
        import onnx
        nodes = [(n.name, n.op_type) for n in onnx.load(str(onnx_path), load_external_data=False).graph.node]
    except Exception:  # noqa: BLE001
        nodes = []
    custom = re.search(r"unresolved custom op: ONNX_(\w+)", reason)
    if custom:  # flatbuffer_direct wrote an ONNX op it has no builtin for as a custom op LiteRT cannot run
        op = custom.group(1)
        hits = [n for n, t in nodes if t.upper() == op.upper()]
        op_type = next((t for _, t in nodes if t.upper() == op.upper()), op)
        what = f"ONNX node {hits[0]} ({op_type})" if hits else f"ONNX op {op_type}"
        return (f"onnx2tf 2.x cannot convert {name}: no TFLite builtin op for the {what}; it wrote the custom op "
                f"ONNX_{op}, which LiteRT cannot run; replace that op in the model or use the onnx2tf route")
    named = re.findall(r"onnx_op_name:\s*(\S+)", text) or re.findall(r"node(?:_name)?[=:]\s*'?([\w./:-]+)", text)
    if named:
        node = named[-1].rstrip(",.'")
        op_type = next((t for n, t in nodes if n == node), None)
        if node not in reason:
            return f"onnx2tf 2.x cannot convert {name} at ONNX node {node}" + (f" ({op_type})" if op_type else "") \
                + f": {reason}"
    return f"onnx2tf 2.x cannot convert {name}: {reason}"
