"""Stage ``emulate`` (``--emulate DEVICE``): the device bundle just written, checked on an emulated Arm CPU with the
device's own aarch64 wheels and kernels (:mod:`pipeline.device.emulate`). Outputs only: no timing of it is a
latency. The result goes into report.json as the section ``emulation`` with one gate."""
from __future__ import annotations

from pathlib import Path

from pipeline.errors import TargetError

# LiteRT targets whose model runs on an Arm application processor: the bundle's Pi script applies to them.
ARM_TARGETS = ("rpi4", "rpi5", "android-arm64", "tflite-int8")


def check_target(device: str | None, target_name: str) -> None:
    """Before the export starts: ``--emulate`` needs a known device and an Arm LiteRT target (UsageError /
    TargetError, one line, exit 2)."""
    if device is None:
        return
    from pipeline.device.emulate import get_device
    get_device(device)
    if target_name not in ARM_TARGETS:
        raise TargetError(f"--emulate {device} checks a LiteRT model on an Arm CPU; target {target_name} is not one "
                          f"(use --target {' or '.join(ARM_TARGETS)})")


def emulate(device: str | None, bundle_dir: Path, target, *, cache_dir, log=None):
    """The bundle's check on the emulated ``device``: an :class:`pipeline.device.emulate.EmulationResult`, or None
    without ``--emulate``. The aarch64 root is built on first use (network), then reused from ``cache_dir``."""
    if device is None:
        return None
    check_target(device, target.name)
    from pipeline.device.emulate import check_bundle
    return check_bundle(Path(bundle_dir), device, cache_dir=cache_dir, log=log)


def gates(result) -> dict:
    """``emulated_device_matches_host``: every kernel family on the emulated CPU within the bundle's tolerance of the
    host's recorded outputs (pi_benchmark.py's rule: largest difference <= tolerance steps, no top-1 change the
    host's margin cannot explain)."""
    from pipeline.report import Gate
    if result is None:
        return {}
    per_kernel = {k.kernels: {"top1_agreement": k.top1_agreement, "max_diff_steps": k.max_diff_steps,
                              "samples": k.samples, "passed": k.passed} for k in result.kernels}
    rt = result.runtime
    what = (f"{result.device.name} emulated (qemu -cpu {result.device.qemu_cpu}, {rt.get('runtime')} "
            f"{rt.get('runtime_version')} aarch64) vs the host's recorded outputs: ")
    if result.passed:
        reason = what + ", ".join(f"{k} max {v['max_diff_steps']} step(s), top-1 {v['top1_agreement']:.2%}"
                                  for k, v in per_kernel.items())
    else:
        reason = what + "; ".join(result.failures)
    return {"emulated_device_matches_host": Gate(
        passed=result.passed, value=result.max_diff_steps, limit=result.tolerance_steps, reason=reason,
        details={"device": result.device.name, "kernels": per_kernel, "label": result.device.label})}


def attach(report, result) -> None:
    """The ``emulation`` section and its gate into the export's report (nothing without ``--emulate``)."""
    if result is None:
        return
    report.sections["emulation"] = result.describe()
    report.gates.update(gates(result))
