#!/usr/bin/env bash
# One command on a fresh Debian machine: install everything, then run the main job on its default
# (zoo:refcnn on Fashion-MNIST -> fully-int8 TFLite, verified on LiteRT's kernels).
#   ./setup.sh                 install + run `python -m pipeline.export` (extra args are passed to it)
#   ./setup.sh --install-only  install only (what CI uses before running the tests)
#   ./setup.sh --with-emulation  also build, once, the aarch64 root that `python -m pipeline.device_check --emulate`
#                              runs the Pi bundle's check in (Debian arm64 packages and aarch64 wheels, about 50 MB
#                              of downloads, cached in ~/.cache/edge-int8-pipeline/emulate); combines with the above
set -euo pipefail
cd "$(dirname "$0")"

RUN_JOB=1
WITH_EMULATION=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --install-only) RUN_JOB=0; shift ;;
    --with-emulation) WITH_EMULATION=1; shift ;;
    *) break ;;
  esac
done

SUDO=""
if [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
can_apt() { command -v apt-get >/dev/null 2>&1 && { [[ $(id -u) -eq 0 ]] || [[ -n "$SUDO" ]]; }; }

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      PY="$cand"; break
    fi
  done
fi

APT_PKGS=()
[[ -d /usr/share/datasets/fashion-mnist ]] || APT_PKGS+=(dataset-fashion-mnist)
# Devices before you have one: arm-none-eabi-gcc compiles the microcontroller firmware package's model and
# constants for the board's -mcpu; qemu-aarch64-static runs the Raspberry Pi bundle's check on the Pi's own
# aarch64 wheels (python -m pipeline.device_check --emulate).
command -v arm-none-eabi-gcc >/dev/null 2>&1 || APT_PKGS+=(gcc-arm-none-eabi)
command -v qemu-aarch64-static >/dev/null 2>&1 || APT_PKGS+=(qemu-user-static)
if [[ -z "$PY" ]]; then APT_PKGS+=(python3 python3-venv python3-dev); fi
if [[ -n "$PY" ]] && ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then APT_PKGS+=(python3-venv); fi
if (( ${#APT_PKGS[@]} )); then
  if can_apt; then
    echo "setup: apt-get install ${APT_PKGS[*]}" >&2
    $SUDO apt-get update -qq >/dev/null || true
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${APT_PKGS[@]}" >/dev/null \
      || echo "setup: could not install ${APT_PKGS[*]} with apt-get" >&2
  else
    echo "setup: cannot run apt-get here (need root or sudo) for: ${APT_PKGS[*]}" >&2
  fi
fi
if [[ -z "$PY" ]]; then
  command -v python3.11 >/dev/null 2>&1 && PY=python3.11
  [[ -z "$PY" ]] && python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null && PY=python3
fi
if [[ -z "$PY" ]]; then
  echo "setup: Python 3.11 is required (onnx2tf 1.28 and tensorflow 2.21 pins); install python3.11 or set PYTHON=/path/to/python3.11" >&2
  exit 2
fi

if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv with $PY" >&2
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
echo "setup: installing Python dependencies into .venv (pinned in pyproject.toml)" >&2
.venv/bin/python -m pip install -q -e ".[dev,bench,ray]"

# >>> route onnx2tf-flatbuffer: onnx2tf 2.x (flatbuffer_direct backend) in its own folder >>>
# onnx2tf 2.x declares Python >= 3.12 and pins exact versions of packages the venv already has (numpy, onnx,
# onnxruntime, ai-edge-litert, ...), so it goes, without its declared dependencies, into .venv/routes/onnx2tf2
# beside the venv's onnx2tf 1.28 (the default route), with only what it imports that the venv lacks:
# onnxsim (its `onnxsim` executable lands in bin/) and sne4onnx. Only the conversion child process of
# pipeline/conversion/onnx2tf_flatbuffer.py puts this folder first on its PYTHONPATH (and its bin/ on PATH).
# Not installed (the routes' ops that need them fail): opencv-python (only onnx2tf's ImageDecoder op),
# onnxoptimizer (not imported), torch/tensorflow extras (the flatbuffer_direct backend needs neither).
ROUTE_ONNX2TF2_DIR=.venv/routes/onnx2tf2
ROUTE_ONNX2TF2_PKGS=(onnx2tf==2.6.9 onnxsim==0.6.5 sne4onnx==2.0.1)
if [[ "$(cat "$ROUTE_ONNX2TF2_DIR/.pinned" 2>/dev/null)" != "${ROUTE_ONNX2TF2_PKGS[*]}" ]]; then
  echo "setup: installing ${ROUTE_ONNX2TF2_PKGS[*]} into $ROUTE_ONNX2TF2_DIR (route onnx2tf-flatbuffer)" >&2
  rm -rf "$ROUTE_ONNX2TF2_DIR.tmp"
  .venv/bin/python -m pip install -q --no-deps --ignore-requires-python --only-binary=:all: \
    --target "$ROUTE_ONNX2TF2_DIR.tmp" "${ROUTE_ONNX2TF2_PKGS[@]}"
  echo "${ROUTE_ONNX2TF2_PKGS[*]}" > "$ROUTE_ONNX2TF2_DIR.tmp/.pinned"
  rm -rf "$ROUTE_ONNX2TF2_DIR"
  mv "$ROUTE_ONNX2TF2_DIR.tmp" "$ROUTE_ONNX2TF2_DIR"
fi
# <<< route onnx2tf-flatbuffer <<<

if [[ ! -d /usr/share/datasets/fashion-mnist ]]; then
  echo "setup: Fashion-MNIST is not installed. Install the Debian package dataset-fashion-mnist," >&2
  echo "       or pass --data-dir DIR (a folder with the four IDX files) or --data your.npz to the export." >&2
fi

if (( WITH_EMULATION )); then
  # The aarch64 root of the emulated Pi check, built once (network: deb.debian.org and PyPI), then offline.
  echo "setup: building the aarch64 root for python -m pipeline.device_check --emulate (once; cached)" >&2
  .venv/bin/python -c 'import sys; from pipeline.device.emulate import prepare
prepare(log=lambda m, file=None: print(m, file=sys.stderr))'
fi

if (( RUN_JOB )); then
  # The default job re-runs into its own folder (refcnn-tflite-int8/): an earlier run of it is replaced
  # (--overwrite never deletes a file an export did not write). With arguments, the user decides.
  if (( $# == 0 )); then set -- --overwrite; fi
  echo "setup: running python -m pipeline.export $*" >&2
  exec .venv/bin/python -m pipeline.export "$@"
fi
