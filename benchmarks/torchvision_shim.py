"""Import torchvision 0.28 next to the CPU build of torch 2.13 (benchmarks and tests only).

torchvision 0.28.0 exists on PyPI only as a CUDA build. Installed beside the CPU torch (``pip install
'.[bench]'``: it depends on ``torch==2.13.0`` alone, which the CPU build satisfies), its compiled
extension ``torchvision/_C.so`` does not load, and ``import torchvision`` then fails in
``torchvision/_meta_registrations.py`` with ``RuntimeError: operator torchvision::nms does not exist``:
it registers fake (meta) kernels for operators whose schemas only the extension defines.

:func:`import_torchvision` defines the missing operator *schemas* (no kernels) with ``torch.library``
first, only those not already there (a working extension defines them all and nothing is done), then
imports torchvision. Everything the classification models use (conv, pooling, ...) is plain torch; only
the detection ops (``torchvision.ops.nms``, ``roi_align``, ...) stay unusable and raise as before.

The pipeline's runtime never imports this module.
"""
from __future__ import annotations

import importlib
import re
import sys

# Schemas as torchvision's C++ extension (csrc/ops/*.cpp) declares them.
SCHEMAS: dict[str, str] = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align": ("roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
                  "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor"),
    "_roi_align_backward": ("_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, "
                            "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, "
                            "SymInt height, SymInt width, int sampling_ratio, bool aligned) -> Tensor"),
    "roi_pool": ("roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
                 "SymInt pooled_width) -> (Tensor, Tensor)"),
    "ps_roi_align": ("ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
                     "SymInt pooled_width, int sampling_ratio) -> (Tensor, Tensor)"),
    "ps_roi_pool": ("ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
                    "SymInt pooled_width) -> (Tensor, Tensor)"),
    "deform_conv2d": ("deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, "
                      "SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, "
                      "SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) -> Tensor"),
    "box_iou_rotated": "box_iou_rotated(Tensor boxes1, Tensor boxes2) -> Tensor",
}
# Asked for by ``import torchvision`` when its extension is missing (found by trying).
NEEDED_AT_IMPORT = ("nms", "qnms")

_LIB = None  # the torch.library.Library holding our definitions: must stay alive, or they are dropped
DEFINED: list[str] = []  # what this process defined (empty when the extension loaded)


def _has_op(name: str) -> bool:
    import torch
    try:
        getattr(torch.ops.torchvision, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def _define(name: str) -> None:
    global _LIB
    import torch.library
    if name not in SCHEMAS:
        raise RuntimeError(f"import torchvision needs operator torchvision::{name}, whose schema "
                           "benchmarks/torchvision_shim.py does not know: add it to SCHEMAS")
    if _has_op(name):
        return
    if _LIB is None:
        _LIB = torch.library.Library("torchvision", "FRAGMENT")
    _LIB.define(SCHEMAS[name])
    DEFINED.append(name)


def _purge() -> None:
    for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[mod]


def import_torchvision():
    """Return the torchvision module, defining the operator schemas its missing extension would have."""
    if "torchvision" in sys.modules and hasattr(sys.modules["torchvision"], "models"):
        return sys.modules["torchvision"]
    import torch  # noqa: F401
    for name in NEEDED_AT_IMPORT:
        _define(name)
    for _ in range(len(SCHEMAS) + 1):
        try:
            return importlib.import_module("torchvision")
        except RuntimeError as e:
            m = re.search(r"operator torchvision::(\w+) does not exist", str(e))
            if not m:
                raise
            _purge()
            _define(m.group(1))
    raise RuntimeError("import torchvision kept asking for operator schemas")


def import_timm():
    """timm imports torchvision: go through the shim first."""
    import_torchvision()
    return importlib.import_module("timm")
