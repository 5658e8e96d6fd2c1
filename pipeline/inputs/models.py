"""Model sources for ``--model``.

- ``zoo:NAME``: a built-in model with shipped weights;
- ``path/to/model.onnx``: an ONNX file (its FP32 reference is then onnxruntime);
- ``package.module:factory`` (+ ``--weights state_dict.pt``): any importable factory;
- ``path/to/model.pt``: a TorchScript archive saved with ``torch.jit.save``.

Weights are only ever read with ``torch.load(..., weights_only=True)``: a pickle is never
executed.
"""
from __future__ import annotations

import importlib
import os
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ModelError


@dataclass
class LoadedModel:
    """A model ready for export: a torch module, or an ONNX file for ONNX sources."""

    spec: str
    kind: str  # "zoo", "factory", "torchscript" or "onnx"
    module: Any = None  # torch.nn.Module (or ScriptModule) in eval mode; None for ONNX
    onnx_path: Path | None = None
    input_shape: tuple[int, int, int] | None = None  # C,H,W when known from the model itself
    num_classes: int | None = None
    mean: tuple[float, ...] | None = None  # normalisation the model was trained with, if known
    std: tuple[float, ...] | None = None
    description: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def reference_runtime(self) -> str:
        return "onnxruntime" if self.kind == "onnx" else "pytorch"

    def describe(self) -> dict:
        d = {"spec": self.spec, "kind": self.kind, "fp32_reference": self.reference_runtime,
             "description": self.description, "num_classes": self.num_classes}
        if self.module is not None:
            d["parameters"] = int(sum(p.numel() for p in self.module.parameters()))
        d.update({k: v for k, v in self.extra.items() if not k.startswith("_")})
        return d


def load(spec: str, weights: str | None = None) -> LoadedModel:
    if spec.startswith("zoo:"):
        if weights:
            return _with_weights(_load_zoo(spec[4:], shipped=False), weights, spec)
        return _load_zoo(spec[4:])
    path = Path(spec)
    if spec.lower().endswith(".onnx"):
        if weights:
            raise ModelError("--weights does not apply to an ONNX model; drop --weights")
        return _load_onnx(path)
    if spec.lower().endswith((".pt", ".pth", ".ptl", ".torchscript")):
        if weights:
            raise ModelError("--weights does not apply to a TorchScript file; use --model package.module:factory --weights FILE")
        return _load_torchscript(path)
    if ":" in spec and not os.path.exists(spec):
        return _load_factory(spec, weights)
    if path.exists():
        raise ModelError(f"cannot tell what kind of model {spec} is; pass a .onnx file, a TorchScript .pt file, "
                         "zoo:NAME or package.module:factory")
    raise ModelError(f"model {spec!r} not found; pass zoo:NAME, path/to/model.onnx, path/to/model.pt "
                     "or package.module:factory --weights state_dict.pt")


# --------------------------------------------------------------------------- zoo

def _load_zoo(name: str, shipped: bool = True) -> LoadedModel:
    from pipeline import zoo
    entry = zoo.get_entry(name)
    module = entry.factory()
    if shipped:
        if not entry.weights_path.is_file():
            raise ModelError(f"zoo:{name} has no shipped weights at {entry.weights_path}; "
                             f"train them with python -m pipeline.train zoo:{name}")
        _load_state_dict(module, entry.weights_path, f"zoo:{name}")
    module.eval()
    record = entry.training_record() or {}
    return LoadedModel(
        spec=f"zoo:{name}", kind="zoo", module=module, input_shape=entry.input_shape,
        num_classes=entry.num_classes, mean=entry.mean, std=entry.std, description=entry.description,
        extra={"trained_fp32_top1": record.get("fp32_test_top1"), "weights": str(entry.weights_path)},
    )


def _with_weights(loaded: LoadedModel, weights: str, spec: str) -> LoadedModel:
    _load_state_dict(loaded.module, Path(weights), spec)
    loaded.module.eval()
    loaded.extra["weights"] = weights
    return loaded


# --------------------------------------------------------------------------- factory

def _load_factory(spec: str, weights: str | None) -> LoadedModel:
    # The module the user named is found from the current folder, as `python -m` finds it; the folder is on
    # sys.path only while the model is built, so nothing imported later is shadowed by files that lie here.
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return _build_factory(spec, weights)
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _build_factory(spec: str, weights: str | None) -> LoadedModel:
    import torch.nn as nn
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise ModelError(f"--model {spec!r} is not package.module:factory")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        raise ModelError(f"cannot import module {mod_name!r} ({e}); check the name and run from the folder "
                         "that holds it (the current directory is importable)") from None
    except Exception as e:  # the user's module raised while importing
        raise ModelError(f"importing {mod_name!r} failed: {type(e).__name__}: {e}") from None
    factory = mod
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ModelError(f"module {mod_name!r} has no attribute {attr!r}; pass package.module:factory naming "
                             "a function or class that returns an nn.Module")
        factory = getattr(factory, part)
    if isinstance(factory, nn.Module):
        module = factory
    elif callable(factory):
        try:
            module = factory()
        except Exception as e:
            raise ModelError(f"calling {spec}() failed: {type(e).__name__}: {e}; the factory must take no "
                             "required arguments") from None
    else:
        raise ModelError(f"{spec} is not callable; pass a function or class returning an nn.Module")
    if not isinstance(module, nn.Module):
        raise ModelError(f"{spec}() returned {type(module).__name__}, not a torch.nn.Module; "
                         "the factory must return an nn.Module")
    if weights:
        _load_state_dict(module, Path(weights), spec)
    module.eval()
    return LoadedModel(spec=spec, kind="factory", module=module, description=f"factory {spec}",
                       extra={"weights": weights})


def _load_state_dict(module, path: Path, spec: str) -> None:
    import torch
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist; pass --weights path/to/state_dict.pt")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ModelError(f"cannot read weights {path} ({e.strerror}); check the path and its permissions") from None
    if path.suffix.lower() == ".onnx" or (head[:1] == b"\x08" and not head.startswith(b"\x80")):
        raise ModelError(f"{path} is not a PyTorch state dict (it looks like an ONNX model); pass it as "
                         "--model path/to/model.onnx without --weights")
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save: a zip, or a legacy pickle
        raise ModelError(f"{path} is not a file written by torch.save; save the weights with "
                         "torch.save(model.state_dict(), path)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ModelError(f"{path} is not a plain state dict (it is malformed, or needs arbitrary pickled objects, "
                         "which are never loaded); save it with torch.save(model.state_dict(), path)") from None
    except Exception as e:  # malformed data: torch's restricted unpickler raises KeyError, IndexError, ...
        raise ModelError(f"cannot read weights {path} ({type(e).__name__}: not a readable torch.save file); save "
                         "them with torch.save(model.state_dict(), path)") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ModelError(f"{path} is not a state dict of tensors; save it with torch.save(model.state_dict(), path)")
    try:
        module.load_state_dict(obj, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = " ".join(first[1:3]) if len(first) > 1 else first[0]
        raise ModelError(f"weights {path} do not fit {spec}: {detail[:300]}; pass the weights saved from this "
                         "architecture") from None
    except Exception as e:  # noqa: BLE001  (a module's own _load_from_state_dict may raise anything)
        detail = (str(e).strip().splitlines() or [""])[0][:300]
        raise ModelError(f"{spec} refused the weights {path} ({type(e).__name__}: {detail}); save them with "
                         "torch.save(model.state_dict(), path), which keeps the state dict's _metadata (versions "
                         "some modules check)") from None


# --------------------------------------------------------------------------- TorchScript

def _load_torchscript(path: Path) -> LoadedModel:
    import torch
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist; check the path")
    if not os.access(path, os.R_OK):
        raise ModelError(f"model file {path} is not readable; fix its permissions")
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        raise ModelError(f"{path} is not a TorchScript archive ({type(e).__name__}); save it with torch.jit.save, "
                         "or for a state dict pass --model package.module:factory --weights FILE") from None
    module.eval()
    return LoadedModel(spec=str(path), kind="torchscript", module=module, description=f"TorchScript {path.name}")


# --------------------------------------------------------------------------- ONNX

def _load_onnx(path: Path) -> LoadedModel:
    import onnx
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist; check the path")
    if not os.access(path, os.R_OK):
        raise ModelError(f"model file {path} is not readable; fix its permissions")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ModelError(f"{path} is not a valid ONNX model ({msg}); re-export it with torch.onnx.export") from None
    external = external_data_files(proto, path)
    try:
        # With external data the checker reads the files beside the model (and handles models over 2 GB).
        onnx.checker.check_model(str(path) if external else proto)
    except Exception as e:
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ModelError(f"{path} is not a valid ONNX model ({msg}); re-export it with torch.onnx.export") from None
    graph_inputs = [i for i in proto.graph.input if i.name not in {init.name for init in proto.graph.initializer}]
    if len(graph_inputs) != 1 or len(proto.graph.output) != 1:
        raise ModelError(f"{path} has {len(graph_inputs)} inputs and {len(proto.graph.output)} outputs; "
                         "the pipeline handles image classifiers with one input and one output")
    dims = graph_inputs[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    input_shape = None
    if len(shape) == 4 and all(v for v in shape[1:]):
        input_shape = tuple(int(v) for v in shape[1:])
    elem = graph_inputs[0].type.tensor_type.elem_type
    if elem != onnx.TensorProto.FLOAT:
        raise ModelError(f"{path} takes {onnx.TensorProto.DataType.Name(elem)} input; the pipeline needs a float32 image input")
    out_dims = proto.graph.output[0].type.tensor_type.shape.dim
    num_classes = out_dims[-1].dim_value if len(out_dims) == 2 and out_dims[-1].HasField("dim_value") else None
    return LoadedModel(
        spec=str(path), kind="onnx", onnx_path=path, input_shape=input_shape, num_classes=num_classes,
        description=f"ONNX {path.name}",
        extra={"input_name": graph_inputs[0].name, "batch_dim": shape[0] if shape else None,
               "opset": max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=None),
               **({"external_data": {"files": sorted(external), "bytes": sum(external.values())}} if external else {})},
    )


def external_data_files(proto, path: Path) -> dict[str, int]:
    """The external data files a model (loaded without its external data) names, with their sizes.

    Each must be a relative path to a regular file inside the model's folder or a subfolder (not a symbolic
    link: onnx refuses those), and must hold every tensor's ``offset + length``. Anything else is a ModelError:
    a location that is absolute or leaves the folder is refused, never read."""
    from onnx import TensorProto
    from onnx.external_data_helper import _get_all_tensors
    folder = path.absolute().parent  # onnx and onnxruntime look beside the path as given
    real = folder.resolve()
    files: dict[str, int] = {}
    for t in _get_all_tensors(proto):
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        where = f"{path}: tensor {t.name!r} keeps its data in {loc!r}"
        if not loc:
            raise ModelError(f"{path}: tensor {t.name!r} is marked as external data but names no file; re-save the "
                             "model with onnx.save_model(model, path, save_as_external_data=True)")
        if os.path.isabs(loc) or loc.startswith(("/", "\\")) or (len(loc) > 1 and loc[1] == ":"):
            raise ModelError(f"{where}, an absolute path; external data must live in the model's folder {folder} or "
                             "below it, named by a relative path - move the file there and re-save the model")
        target = folder / loc
        if not target.resolve().is_relative_to(real):
            raise ModelError(f"{where}, which leaves the model's folder {folder}; external data must live in that "
                             "folder or below it - move the file there and re-save the model")
        if Path(os.path.normpath(real / loc)) != target.resolve():
            raise ModelError(f"{where}, a symbolic link; onnx refuses linked external data - copy the file there "
                             "instead of linking it")
        if not target.is_file():
            raise ModelError(f"{where}, which is missing from {folder}; copy the model together with its "
                             "external data files")
        size = target.stat().st_size
        try:
            offset, length = int(info.get("offset") or 0), int(info["length"]) if "length" in info else None
        except ValueError:
            raise ModelError(f"{where} at a malformed offset/length; re-save the model") from None
        if offset < 0 or (length is not None and (length < 0 or offset + length > size)):
            raise ModelError(f"{where} at bytes {offset}..{offset + (length or 0)}, but the file holds {size} bytes "
                             "(truncated); copy the external data file again")
        files[target.resolve().relative_to(real).as_posix()] = size
    return files


# --------------------------------------------------------------------------- probing and FP32 runs

def ort_load_reason(e: BaseException) -> str:
    """The useful part of an onnxruntime load error (it wraps the reason in a C++ location and signature)."""
    import re
    s = " ".join(str(e).split())
    s = s.split(" failed:", 1)[1] if " failed:" in s else s
    s = re.sub(r"^\s*\S+\.(?:cc|h|cpp):\d+ .*?\) ", "", s).strip()
    return (s or type(e).__name__)[:220]


def probe(model: LoadedModel, input_shape: tuple[int, int, int]) -> int:
    """Run a dummy batch to check the input shape fits; return the number of classes."""
    x = np.zeros((2, *input_shape), np.float32)
    if model.kind == "onnx":
        try:
            _ort_session(model)
        except Exception as e:
            reason = ort_load_reason(e)
            fix = ("save it with an IR version onnxruntime supports (e.g. model.ir_version = 10 before onnx.save)"
                   if "IR version" in reason else "re-export the model with a released opset (e.g. "
                   "torch.onnx.export(..., opset_version=17)) and only standard ONNX ops")
            raise ModelError(f"onnxruntime cannot load {model.spec}: {reason}; {fix}") from None
    try:
        out = run_fp32(model, x, batch_size=2)
    except ModelError:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ModelError(f"input shape {','.join(map(str, input_shape))} does not fit {model.spec} ({msg}); "
                         "pass the right --input-shape C,H,W") from None
    if out.ndim != 2 or out.shape[0] != 2:
        raise ModelError(f"{model.spec} returns shape {tuple(out.shape[1:])} per sample; the pipeline needs a "
                         "classifier returning one logit vector [N, classes]")
    return int(out.shape[1])


def run_fp32(model: LoadedModel, x: np.ndarray, batch_size: int = 512, progress=None) -> np.ndarray:
    """FP32 reference outputs (PyTorch, or onnxruntime for ONNX sources) on float32 NCHW input."""
    outs = []
    if model.kind == "onnx":
        sess = _ort_session(model)
        name = sess.get_inputs()[0].name
        bs = batch_size if model.extra.get("batch_dim") in (None, 0) else int(model.extra["batch_dim"])
        for i in range(0, len(x), bs):
            chunk = x[i:i + bs]
            if len(chunk) < bs and model.extra.get("batch_dim") not in (None, 0):
                chunk = np.concatenate([chunk, np.zeros((bs - len(chunk), *chunk.shape[1:]), chunk.dtype)])
                outs.append(sess.run(None, {name: chunk})[0][: len(x) - i])
            else:
                outs.append(sess.run(None, {name: chunk})[0])
            if progress:
                progress(min(bs, len(x) - i))
        return np.concatenate(outs).astype(np.float32)
    import torch
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            out = model.module(torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size])))
            if isinstance(out, (tuple, list)) and len(out) > 0:
                # (logits, aux, ...): the first output is the classifier's; export_onnx exports only it
                model.extra["outputs_returned"] = len(out)
                model.extra["output_used"] = "first"
                out = out[0]
            if not isinstance(out, torch.Tensor):
                raise ModelError(f"{model.spec} returned {type(out).__name__}; it must return a logits tensor")
            outs.append(out.float().numpy())
            if progress:
                progress(min(batch_size, len(x) - i))
    return np.concatenate(outs)


def onnx_reference(path: Path) -> LoadedModel:
    """The exported ONNX model as an FP32 reference run by onnxruntime."""
    return LoadedModel(spec=str(path), kind="onnx", onnx_path=Path(path), description=f"ONNX {Path(path).name}",
                       extra={"batch_dim": None})


def _ort_session(model: LoadedModel):
    sess = model.extra.get("_session")
    if sess is None:
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = os.cpu_count() or 1
        # No busy-waiting: spinning worker threads collapse throughput when the cores are shared.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(model.onnx_path), so, providers=["CPUExecutionProvider"])
        model.extra["_session"] = sess
    return sess
