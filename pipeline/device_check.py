"""``python -m pipeline.device_check OUT --emulate rpi4``: the export's device bundle checked on an emulated Arm CPU.

Runs the bundle's ``pi_benchmark.py --check-only`` on the device's own aarch64 wheels and kernels under qemu-user
(:mod:`pipeline.device.emulate`), and reports per kernel family (xnnpack, builtin, ref) the top-1 agreement with
the host's recorded outputs and the largest difference in output quantization steps. Emulated timings mean nothing:
none is reported as a latency.

Exit status: 0 the check passed; 1 it ran and the outputs differ beyond the bundle's tolerance (or the emulated
interpreter crashed); 2 bad input (not an export folder, no or a changed bundle, unknown device) or an emulator
that cannot be built or started. Writes nothing into OUT; ``--json PATH`` writes the result there.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pipeline.errors import DataError, OutputError


def _kernels(text: str) -> tuple[str, ...]:
    from pipeline.device.emulate import KERNELS
    names = tuple(dict.fromkeys(v.strip().lower() for v in text.split(",") if v.strip()))
    if names == ("all",):
        return KERNELS
    bad = [n for n in names if n not in KERNELS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {','.join(KERNELS)} (or all)")
    return names


def build_parser() -> argparse.ArgumentParser:
    from pipeline.cli import Parser, emulated_device
    from pipeline.device.emulate import DEFAULT_CACHE_DIR, DEVICES, KERNELS
    p = Parser(prog="python -m pipeline.device_check",
               description="Check an export's device bundle on an emulated Arm CPU (qemu-user): the device's own "
                           "aarch64 wheels and kernels against the host's recorded outputs. Outputs only: "
                           "emulated timings mean nothing and are never reported.")
    p.add_argument("out", help="an export folder (written by python -m pipeline.export; holds report.json and bundle/)")
    p.add_argument("--emulate", required=True, type=emulated_device, metavar="DEVICE",
                   help=f"the device to emulate: {', '.join(DEVICES)} (android-arm64 runs the Linux aarch64 wheel on "
                        "a Cortex-A76 and says so: no Android build exists for Python)")
    p.add_argument("--kernels", type=_kernels, default=KERNELS,
                   help=f"kernel families to check, comma-separated (default {','.join(KERNELS)})")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, metavar="DIR",
                   help="where the aarch64 root is built once and kept (default %(default)s)")
    p.add_argument("--rebuild", action="store_true", help="build the aarch64 root again even when the cached one is "
                                                          "complete")
    p.add_argument("--json", metavar="PATH", help="write the result as JSON to PATH")
    p.add_argument("-v", "--verbose", action="store_true", help="show the emulated script's own output")
    return p


def bundle_folder(out: Path) -> Path:
    """OUT's bundle/, after checking OUT is an export folder (its report.json read as pipeline.evaluate reads it)."""
    from pipeline.evaluate import _read_report
    _read_report(out)  # UsageError: not a folder; DataError: no or a malformed report.json
    b = out / "bundle"
    if not (b / "bundle.json").is_file():
        raise DataError(f"{out} holds no device bundle (bundle/bundle.json); re-run python -m pipeline.export "
                        "with this version")
    return b


def _check_json_path(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"--json {path} is a folder; pass a file path")
    parent = p.absolute().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write --json {path}: the folder {parent} is missing or not writable")
    return p


def run(argv: list[str] | None):
    from pipeline.device.emulate import check_bundle
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    json_path = _check_json_path(args.json) if args.json else None
    bundle = bundle_folder(out)
    result = check_bundle(bundle, args.emulate, cache_dir=args.cache_dir, kernels=args.kernels,
                          rebuild=args.rebuild, log=print, verbose=args.verbose)
    if json_path is not None:
        doc = {**result.describe(), "export": str(out)}
        tmp = json_path.with_name(json_path.name + ".part")
        try:
            tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, json_path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"cannot write --json {json_path} ({e.strerror or e}); pass a writable path") from None
    return result, json_path


def _pct(v) -> str:
    return "n/a" if v is None else f"{100.0 * v:.2f}%"


def summary(result, json_path: Path | None) -> str:
    d = result.device
    rt = result.runtime
    wheels = ", ".join(f"{w['name']} {w['version']}" for w in result.wheels)
    us = result.userspace
    lines = [
        f"device     {d.name}: {d.description}",
        f"emulated   qemu -cpu {d.qemu_cpu} ({d.core} x{d.cores}; HWCAP {' '.join(result.hwcaps) or 'n/a'})",
        f"           {result.qemu.get('version')}",
        f"user-space {us['distribution']}, Python {rt.get('python')}, wheels {wheels} (aarch64)",
        f"runtime    {rt.get('runtime')} {rt.get('runtime_version')}, numpy {rt.get('numpy')} on {rt.get('machine')}",
        f"note       {d.label}",
        f"bundle     {result.bundle} ({result.model_spec}); script: {result.script.get('ran')}",
        "",
        f"{'kernels':<9} {'samples':>7} {'top-1 agreement':>16} {'max diff (steps)':>17} "
        f"{'values differing':>17}  result",
    ]
    for k in result.kernels:
        lines.append(f"{k.kernels:<9} {k.samples:>7} {_pct(k.top1_agreement):>16} "
                     f"{'n/a' if k.max_diff_steps is None else k.max_diff_steps:>17} {_pct(k.values_differing):>17}  "
                     f"{'ok' if k.passed else 'FAIL'}{' (' + k.error + ')' if k.error else ''}")
    if not result.kernels:
        lines.append("(no kernel family finished)")
    pp = result.preprocessing
    if pp:
        lines.append(f"preprocessing record rebuilds the int8 inputs: {'yes' if pp.get('passed') else 'NO'} "
                     f"(max {pp.get('max_diff_steps')} steps)")
    lines.append(f"tolerance  {result.tolerance_steps} output step(s) (the bundle's)")
    lines.append("check      " + ("PASS" if result.passed else "FAIL: " + "; ".join(result.failures)))
    w = result.wall_seconds
    lines.append(f"wall time  root {w.get('root')} s, check {w.get('check')} s (emulated: this host's emulator, "
                 "not a latency of the device)")
    if json_path is not None:
        lines.append(f"wrote      {json_path}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from pipeline.cli import run_main

    def show(res) -> int:
        result, json_path = res
        print(summary(result, json_path))
        return 0 if result.passed else 1

    return run_main(lambda: run(argv), then=show,
                    interrupted_note="; nothing was written into OUT, and a root being built was discarded")


if __name__ == "__main__":
    sys.exit(main())
