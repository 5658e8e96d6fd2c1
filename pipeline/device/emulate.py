"""The device bundle's check on an emulated Arm CPU: the Raspberry Pi's own aarch64 wheels and kernels, no board.

``qemu-aarch64-static`` (Debian's qemu-user-static) runs an aarch64 Python 3.11 from a folder used as its
sysroot (``-L ROOT``: no chroot, no binfmt_misc, no root rights): Debian bookworm arm64 packages (the base of
Raspberry Pi OS 64-bit) plus PyPI's aarch64 wheels of numpy and ai-edge-litert at the versions the bundle's
``requirements.txt`` pins. The bundle's ``pi_benchmark.py --check-only`` then runs there as it would on the
board, and its per-kernel comparison with the host's recorded outputs is the result.

What is emulated, and how (each fact checked on this project's machines, README "Check on an emulated
Raspberry Pi"):

- the user-space is built once into the cache (``DEFAULT_CACHE_DIR/userspace/<key>``), in a temporary folder
  renamed into place when complete (a killed build leaves no half root; its leftovers are removed by the next
  build), and rebuilt only when missing or corrupt. The Debian index is verified with ``gpgv`` against
  Debian's archive keyring, every ``.deb`` against the index's sha256. Only this step uses the network;
- each device gets a small layer (``DEFAULT_CACHE_DIR/<device>/<key>``): links to the user-space, a
  ``proc/cpuinfo`` describing its cores and a ``sys/devices/system/cpu`` tree. ai-edge-litert 2.3.0 dies of
  SIGSEGV in the Interpreter constructor when ``/proc/cpuinfo`` is the x86 host's (its CPU detection finds no
  Arm core). qemu-user looks every absolute path up in ``-L ROOT`` first (the host's path when ROOT lacks it),
  so ``ROOT/proc/cpuinfo`` is what the emulated process reads; building a layer checks that from inside;
- qemu-user hands ``execve`` to the host kernel untranslated, so the aarch64 ``python3.11`` cannot start its
  own subprocesses (pi_benchmark.py runs each kernel family in one) without binfmt_misc. The layer's
  ``python3`` is a host shell script that starts qemu again, and the emulated Python is given that script as
  its ``argv[0]``, hence as ``sys.executable``;
- the CPU is qemu's model of the core (``-cpu cortex-a72`` / ``cortex-a76``): its instruction set and the
  feature bits (HWCAP) it announces, which is what LiteRT and XNNPACK choose their kernels by. Timings under
  emulation mean nothing and are never reported.

Library code: raises :class:`pipeline.errors.EmulatorError` (exit 2, one line) when the emulator cannot be
made to run, :class:`pipeline.errors.DataError` for a bundle that is not intact; a check that ran and
differs is a result with ``passed`` False.
"""
from __future__ import annotations

import difflib
import hashlib
import io
import json
import lzma
import os
import posixpath
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import DataError, EmulatorError, UsageError

DEFAULT_CACHE_DIR = "~/.cache/edge-int8-pipeline/emulate"
SCHEMA_VERSION = "1.0"

# The user-space: Debian 12 "bookworm" (the base of Raspberry Pi OS 64-bit), its Python 3.11 and glibc 2.36.
MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
DEB_ARCH = "arm64"
PYTHON = "3.11"
GLIBC = (2, 36)
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
# What the check needs: the interpreter, the C++ runtime the manylinux wheels link to (libstdc++, libgcc_s),
# and base-files for /etc/os-release. Their dependencies are resolved from the index.
PACKAGES = ("python3.11", "libstdc++6", "base-files")
WHEELS = ("ai-edge-litert", "numpy")  # the bundle's requirements.txt pins both
KERNELS = ("xnnpack", "builtin", "ref")  # pi_benchmark.py's kernel families
QEMU = ("qemu-aarch64-static", "qemu-aarch64")
CHECK_TIMEOUT_S = 1800
DOWNLOAD_TIMEOUT_S = 120
NOT_A_LATENCY = "emulated: wall time of this host's emulator, not a latency of the device"

_MANIFEST = ".emulated-userspace.json"
_LAYER_MANIFEST = "layer.json"
_BUILD_PREFIX = ".build-"
_NET_FIX = "the root is built once and needs deb.debian.org and PyPI; check the network, then run again"


# --------------------------------------------------------------------------- the emulated devices

@dataclass(frozen=True)
class EmulatedDevice:
    """An Arm device as emulated: qemu's CPU model plus the ``/proc/cpuinfo`` and cpufreq facts of the board."""

    name: str
    description: str
    qemu_cpu: str  # qemu-aarch64 -cpu
    core: str
    cores: int
    cpu_variant: str  # /proc/cpuinfo fields of the real board (MIDR_EL1)
    cpu_part: str
    cpu_revision: int
    features: str  # /proc/cpuinfo "Features" as the board's kernel prints them
    max_khz: int
    min_khz: int
    label: str  # what this check stands for, printed with every result

    def cpuinfo(self) -> str:
        stanza = ("processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: {f}\nCPU implementer\t: 0x41\n"
                  "CPU architecture: 8\nCPU variant\t: {v}\nCPU part\t: {p}\nCPU revision\t: {r}\n\n")
        return "".join(stanza.format(i=i, f=self.features, v=self.cpu_variant, p=self.cpu_part, r=self.cpu_revision)
                       for i in range(self.cores))

    def describe(self) -> dict:
        return {"name": self.name, "description": self.description, "qemu_cpu": self.qemu_cpu, "core": self.core,
                "cores": self.cores, "cpuinfo": {"implementer": "0x41", "variant": self.cpu_variant,
                                                 "part": self.cpu_part, "revision": self.cpu_revision,
                                                 "features": self.features},
                "cpufreq_khz": {"min": self.min_khz, "max": self.max_khz}, "label": self.label}


_A76_FEATURES = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop "
                 "asimddp")
DEVICES: dict[str, EmulatedDevice] = {d.name: d for d in (
    EmulatedDevice(
        name="rpi4", description="Raspberry Pi 4B (BCM2711, 4x Cortex-A72)", qemu_cpu="cortex-a72",
        core="Cortex-A72", cores=4, cpu_variant="0x0", cpu_part="0xd08", cpu_revision=3,
        features="fp asimd evtstrm crc32 cpuid", max_khz=1500000, min_khz=600000,
        label="Raspberry Pi 4's CPU (Cortex-A72) emulated by qemu: Debian 12 arm64 user-space, the aarch64 wheels "
              "pip installs on the Pi"),
    EmulatedDevice(
        name="rpi5", description="Raspberry Pi 5 (BCM2712, 4x Cortex-A76)", qemu_cpu="cortex-a76",
        core="Cortex-A76", cores=4, cpu_variant="0x4", cpu_part="0xd0b", cpu_revision=1,
        features=_A76_FEATURES, max_khz=2400000, min_khz=1500000,
        label="Raspberry Pi 5's CPU (Cortex-A76) emulated by qemu: Debian 12 arm64 user-space, the aarch64 wheels "
              "pip installs on the Pi"),
    # No Android build of ai-edge-litert exists for Python. What this runs is the Linux wheel on the CPU class of a
    # phone's big cores: the same TFLite and XNNPACK kernel source, picked by the same CPU features (dot product
    # on A76), not the Android binary. Its label says so wherever the result is shown.
    EmulatedDevice(
        name="android-arm64", description="64-bit Android phone, big cores (Cortex-A76 class)",
        qemu_cpu="cortex-a76", core="Cortex-A76", cores=4, cpu_variant="0x4", cpu_part="0xd0b", cpu_revision=1,
        features=_A76_FEATURES, max_khz=2400000, min_khz=1500000,
        label="NOT Android: the Linux aarch64 wheel of ai-edge-litert (manylinux, glibc) on an emulated Cortex-A76, "
              "the same TFLite/XNNPACK kernel code an Android build compiles, chosen by the same CPU features; the "
              "Android build itself (NDK, bionic, the LiteRT AAR, NNAPI/GPU delegates) is not exercised"),
)}


def get_device(name: str) -> EmulatedDevice:
    """The emulated device ``name``; an unknown name is a UsageError with a "did you mean"."""
    if name in DEVICES:
        return DEVICES[name]
    close = difflib.get_close_matches(str(name), list(DEVICES), n=2, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise UsageError(f"no emulated device {name!r}; {hint}choose one of {', '.join(DEVICES)}")


# --------------------------------------------------------------------------- the bundle

@dataclass(frozen=True)
class Bundle:
    folder: Path
    manifest: dict
    model: Path
    script: Path  # the bundle's pi_benchmark.py
    wheels: tuple[tuple[str, str], ...]  # (name, version) from requirements.txt, for Python 3.11
    verified: tuple[str, ...]  # the files whose sha256 matched bundle.json


BUNDLE_FIX = "copy the bundle again, or re-run python -m pipeline.export"


def read_bundle(folder: Path) -> Bundle:
    """A device bundle, checked intact before anything runs: bundle.json read with the received-folder rules,
    every file it records a sha256 for present inside the folder with that digest, and the wheel versions of
    requirements.txt. DataError (exit 2, one line) otherwise."""
    from pipeline import jsonio
    folder = Path(folder).absolute()
    mpath = folder / "bundle.json"
    if not mpath.is_file():
        raise DataError(f"{folder} holds no bundle.json: not a device bundle; {BUNDLE_FIX}")
    m = jsonio.read_object(mpath, BUNDLE_FIX)
    f = jsonio.Fields(m, str(mpath), BUNDLE_FIX)
    if m.get("kind") != "device_bundle":
        raise DataError(f"{mpath} is not a device bundle manifest (kind {m.get('kind')!r}); {BUNDLE_FIX}")
    model = f.section("model").path_inside("path", folder, required=True)
    digests = f.section("sha256")
    verified = []
    for name in sorted(m["sha256"]):
        want = digests.sha256(name)
        p = jsonio.inside(folder, name)
        if p is None:
            raise DataError(f"{mpath}: sha256 names {name!r}, a path that leaves the bundle folder; {BUNDLE_FIX}")
        if not p.is_file():
            raise DataError(f"the bundle's {name} is missing; {BUNDLE_FIX}")
        if jsonio.sha256_file(p) != want:
            raise DataError(f"the bundle's {name} changed: its sha256 is not the one bundle.json records; "
                            f"{BUNDLE_FIX}")
        verified.append(name)
    if model.name not in verified:
        raise DataError(f"{mpath} records no sha256 for the model {model.name}; {BUNDLE_FIX}")
    script = folder / "pi_benchmark.py"
    if not script.is_file() or script.is_symlink():
        raise DataError(f"the bundle has no pi_benchmark.py; {BUNDLE_FIX}")
    return Bundle(folder=folder, manifest=m, model=model, script=script,
                  wheels=requirements_pins(folder / "requirements.txt"), verified=tuple(verified))


_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([0-9][0-9A-Za-z.+!-]*)\s*(?:;\s*(.+))?$")
_MARKER = re.compile(r"""^python_version\s*(<=|>=|==|!=|<|>)\s*["'](\d+(?:\.\d+)*)["']$""")


def requirements_pins(path: Path, python: str = PYTHON) -> tuple[tuple[str, str], ...]:
    """(name, version) of WHEELS as ``requirements.txt`` pins them for ``python``: ``name==version``, optionally
    with one ``python_version`` marker. Other lines (comments, other packages) are not used."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read the bundle's {path.name} ({getattr(e, 'strerror', None) or type(e).__name__}); "
                        f"{BUNDLE_FIX}") from None
    py = tuple(int(v) for v in python.split("."))
    pins: dict[str, str] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        m = _PIN.match(line)
        if not m:
            continue
        name = re.sub(r"[-_.]+", "-", m.group(1)).lower()
        if name not in WHEELS:
            continue
        if m.group(3):
            mk = _MARKER.match(m.group(3).strip())
            if mk is None:
                raise DataError(f"the bundle's {path.name}: cannot evaluate the marker {m.group(3)!r} of {name}; "
                                f"{BUNDLE_FIX}")
            op, ver = mk.group(1), tuple(int(v) for v in mk.group(2).split("."))
            if not {"<": py < ver, "<=": py <= ver, ">": py > ver, ">=": py >= ver, "==": py[:len(ver)] == ver,
                    "!=": py[:len(ver)] != ver}[op]:
                continue
        pins.setdefault(name, m.group(2))
    missing = [w for w in WHEELS if w not in pins]
    if missing:
        raise DataError(f"the bundle's {path.name} pins no {' and no '.join(missing)} version for Python {python} "
                        f"(name==version); {BUNDLE_FIX}")
    return tuple((w, pins[w]) for w in WHEELS)


# --------------------------------------------------------------------------- the user-space (built once, cached)

def userspace_key(wheels) -> str:
    return f"{SUITE}-{DEB_ARCH}-py{PYTHON}-" + "-".join(f"{n}-{v}" for n, v in wheels)


def _log(log, msg: str) -> None:
    if log is not None:
        log(f"emulate: {msg}", file=sys.stderr)


def _fetch(url: str, what: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as r:
            return r.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise EmulatorError(f"cannot download {what} from {url} ({reason}); {_NET_FIX}") from None


def _verified_release(tmp: Path) -> str:
    """The signed text of the suite's InRelease, checked by gpgv against Debian's archive keyring."""
    gpgv = shutil.which("gpgv")
    if gpgv is None or not KEYRING.is_file():
        raise EmulatorError("gpgv and Debian's archive keyring are needed to verify the Debian index; "
                            "apt-get install gpgv debian-archive-keyring")
    url = f"{MIRROR}/dists/{SUITE}/InRelease"
    (tmp / "InRelease").write_bytes(_fetch(url, "the Debian index"))
    p = subprocess.run([gpgv, "--keyring", str(KEYRING), "--output", str(tmp / "Release"), str(tmp / "InRelease")],
                       capture_output=True, text=True)
    if p.returncode != 0:
        why = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise EmulatorError(f"the signature of {url} does not verify with {KEYRING} ({why}); a proxy may have "
                            "changed it: run again on a network that reaches deb.debian.org")
    return (tmp / "Release").read_text(encoding="utf-8", errors="replace")


def _packages_index(release: str) -> dict[str, dict]:
    path = f"main/binary-{DEB_ARCH}/Packages.xz"
    fields = _release_fields(release)
    if fields.get("Codename") != SUITE:
        raise EmulatorError(f"the Debian index of {SUITE} names the codename {fields.get('Codename')!r}; the mirror "
                            f"{MIRROR} serves another suite")
    want = None
    for line in fields.get("SHA256", "").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == path:
            want = (parts[0], int(parts[1]))
    if want is None:
        raise EmulatorError(f"the {SUITE} index lists no {path}; the mirror {MIRROR} lacks {DEB_ARCH}")
    raw = _fetch(f"{MIRROR}/dists/{SUITE}/{path}", f"the {DEB_ARCH} package index")
    if len(raw) != want[1] or hashlib.sha256(raw).hexdigest() != want[0]:
        raise EmulatorError(f"{MIRROR}/dists/{SUITE}/{path} does not match the sha256 of the signed index; run again "
                            "(a proxy or a mirror in sync may have served another file)")
    return parse_packages(lzma.decompress(raw).decode("utf-8", "replace"))


def _release_fields(text: str) -> dict[str, str]:
    """Deb822 fields of one stanza; continuation lines kept (joined with newlines)."""
    out: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        if line[:1] in (" ", "\t") and key:
            out[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, v = line.partition(":")
            out[key] = v.strip()
    return out


def parse_packages(text: str) -> dict[str, dict]:
    """A Packages index: package name -> its fields (the first stanza of each name)."""
    pkgs: dict[str, dict] = {}
    for stanza in text.split("\n\n"):
        f = {}
        for line in stanza.splitlines():
            if line[:1] in (" ", "\t") or ":" not in line:
                continue
            k, _, v = line.partition(":")
            f[k] = v.strip()
        if "Package" in f:
            pkgs.setdefault(f["Package"], f)
    return pkgs


def resolve(pkgs: dict[str, dict], wanted) -> list[str]:
    """The wanted packages and everything they (Pre-)Depend on, from one suite's index: the first alternative
    that the index holds (a real package before one that only Provides it); versions are the suite's own."""
    provides: dict[str, list[str]] = {}
    for name, f in pkgs.items():
        for p in f.get("Provides", "").split(","):
            p = p.strip().split(" ")[0]
            if p:
                provides.setdefault(p, []).append(name)

    def real(name):
        return name if name in pkgs else (provides.get(name) or [None])[0]

    out: list[str] = []
    todo = list(wanted)
    while todo:
        name = real(todo.pop(0))
        if name is None or name in out:
            continue
        out.append(name)
        for fld in ("Pre-Depends", "Depends"):
            for dep in filter(None, (d.strip() for d in pkgs[name].get(fld, "").split(","))):
                alts = [a.strip().split(" ")[0].split(":")[0] for a in dep.split("|")]
                if any(real(a) in out for a in alts):
                    continue
                found = next((real(a) for a in alts if real(a) is not None), None)
                if found is None:
                    raise EmulatorError(f"cannot resolve {name}'s dependency {dep!r} from the {SUITE} {DEB_ARCH} "
                                        "index; the mirror's index is incomplete: run again later")
                todo.append(found)
    return out


_MERGED = ("bin", "sbin", "lib")  # bookworm is merged-/usr: /bin -> usr/bin, /lib -> usr/lib, /sbin -> usr/sbin


def _guest_path(name: str) -> str:
    """A tar member name (``./usr/bin/x``) as an absolute guest path; ``..`` cannot climb above ``/``."""
    return posixpath.normpath("/" + (name[2:] if name.startswith("./") else name).lstrip("/"))


def _merged(p: str) -> str:
    """An absolute guest path with the merged-/usr layout applied."""
    p = _guest_path(p)
    for top in _MERGED:
        if p == f"/{top}" or p.startswith(f"/{top}/"):
            return "/usr" + p
    return p


def _deb_data(blob: bytes, what: str) -> bytes:
    """The data.tar.* member of a .deb (an ar archive)."""
    if not blob.startswith(b"!<arch>\n"):
        raise EmulatorError(f"{what} is not a Debian package (no ar header); run again")
    pos = 8
    while pos + 60 <= len(blob):
        head = blob[pos:pos + 60]
        name = head[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(head[48:58].decode("ascii").strip() or 0)
        if name.startswith("data.tar"):
            return blob[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
    raise EmulatorError(f"{what} holds no data.tar member; run again")


def extract_deb(blob: bytes, root: Path, what: str) -> None:
    """Unpack a .deb's files into ``root`` as ``dpkg -x`` would, with the merged-/usr layout, every symlink made
    relative inside ``root`` (an absolute target would point at the host's file), no device nodes, no setuid."""
    try:
        tar = tarfile.open(fileobj=io.BytesIO(_deb_data(blob, what)), mode="r:*")
    except (tarfile.TarError, lzma.LZMAError, EOFError) as e:
        raise EmulatorError(f"cannot unpack {what} ({type(e).__name__}: {e}); run again") from None
    with tar:
        for m in tar:
            src = _guest_path(m.name)
            if src == "/":
                continue
            dst = _merged(src)
            dest = root / dst.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            if m.isdir():  # as dpkg: a symlink to a folder already there stays
                if dest.is_dir():
                    continue
                if dest.is_symlink() or dest.exists():
                    dest.unlink()
                dest.mkdir()
                os.chmod(dest, 0o755)
                continue
            if dest.is_symlink() or dest.is_file():
                dest.unlink()
            if m.issym():
                target = m.linkname if m.linkname.startswith("/") else posixpath.join(posixpath.dirname(src),
                                                                                      m.linkname)
                os.symlink(posixpath.relpath(_merged(target), posixpath.dirname(dst)), dest)
            elif m.islnk():
                shutil.copy2(root / _merged(m.linkname).lstrip("/"), dest)
            elif m.isfile():
                with tar.extractfile(m) as r, open(dest, "wb") as w:
                    shutil.copyfileobj(r, w)
                os.chmod(dest, (m.mode & 0o755) | 0o644)


def extract_wheel(path: Path, site: Path) -> None:
    """A wheel into ``site`` (what pip does for these wheels): its files, the ``.data/purelib|platlib`` folders
    merged in, its scripts and headers left out. Names are checked to stay inside ``site``."""
    site.mkdir(parents=True, exist_ok=True)
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise EmulatorError(f"cannot open the wheel {path.name} ({type(e).__name__}); run again") from None
    with z:
        for info in z.infolist():
            name = posixpath.normpath(info.filename)
            if name.startswith(("/", "..")) or info.is_dir():
                continue
            parts = name.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                name = "/".join(parts[2:])
            dest = site / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as r, open(dest, "wb") as w:
                shutil.copyfileobj(r, w)
            os.chmod(dest, 0o755 if (info.external_attr >> 16) & 0o111 else 0o644)


def _download_wheels(wheels, dest: Path) -> list[Path]:
    """The aarch64 CPython 3.11 wheels pip on the board would pick (any manylinux up to bookworm's glibc 2.36)."""
    platforms = [f"manylinux_{GLIBC[0]}_{y}_aarch64" for y in range(GLIBC[1], 16, -1)] + ["manylinux2014_aarch64"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "--python-version", PYTHON, "--implementation", "cp", "--abi", "cp" + PYTHON.replace(".", ""),
           "--abi", "abi3", "--abi", "none", "-d", str(dest)]
    for p in platforms:
        cmd += ["--platform", p]
    cmd += [f"{n}=={v}" for n, v in wheels]
    p = subprocess.run(cmd, capture_output=True, text=True)
    got = sorted(dest.glob("*.whl"))
    if p.returncode != 0 or len(got) != len(wheels):
        lines = [ln for ln in (p.stderr + p.stdout).splitlines() if ln.startswith("ERROR")] or p.stderr.splitlines()
        why = (lines or ["no output"])[0].strip()
        raise EmulatorError(f"pip could not download the aarch64 wheels {', '.join(f'{n}=={v}' for n, v in wheels)} "
                            f"for Python {PYTHON} ({why}); {_NET_FIX}")
    return got


def _tree_size(root: Path) -> tuple[int, int]:
    """(regular files, bytes) under ``root``, symlinks not followed, ``__pycache__`` folders left out (bytecode an
    emulated Python run by hand may add is not a change of the root)."""
    n = size = 0
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x != "__pycache__"]
        for name in files:
            st = os.lstat(os.path.join(d, name))
            if not os.path.islink(os.path.join(d, name)):
                n += 1
                size += st.st_size
    return n, size


_ESSENTIAL = ("usr/bin/python3.11", "usr/lib/ld-linux-aarch64.so.1", "usr/lib/python3.11/os.py",
              "usr/lib/python3/dist-packages/numpy/__init__.py",
              "usr/lib/python3/dist-packages/ai_edge_litert/interpreter.py")


def userspace_state(root: Path, key: str) -> tuple[str, dict | None]:
    """("ok", manifest), ("missing", None) or ("corrupt", None): the manifest is the build's last write, and the
    files it counted must all be there at their size."""
    if not root.exists():
        return "missing", None
    try:
        m = json.loads((root / _MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "corrupt", None
    if not isinstance(m, dict) or m.get("key") != key or m.get("schema_version") != SCHEMA_VERSION:
        return "corrupt", None
    if not all((root / e).exists() for e in _ESSENTIAL):
        return "corrupt", None
    n, size = _tree_size(root)
    if (n - 1, size - (root / _MANIFEST).stat().st_size) != (m.get("files"), m.get("bytes")):
        return "corrupt", None
    return "ok", m


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_builds(folder: Path) -> None:
    """Temporary folders of builds whose process is gone (killed): never a root, removed."""
    for p in folder.glob(f"{_BUILD_PREFIX}*"):
        m = re.match(rf"{re.escape(_BUILD_PREFIX)}(?:.*-)?(\d+)-[^-]+$", p.name)
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move the complete folder ``tmp`` to ``final`` in one rename; an older ``final`` is moved aside first."""
    if final.exists() or final.is_symlink():
        trash = final.with_name(f"{_BUILD_PREFIX}old-{final.name}-{os.getpid()}-{os.urandom(3).hex()}")
        try:
            os.rename(final, trash)
        except FileNotFoundError:
            trash = None
    else:
        trash = None
    os.rename(tmp, final)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


@dataclass(frozen=True)
class Userspace:
    root: Path
    key: str
    manifest: dict
    built: bool  # built by this call (else found in the cache)
    seconds: float


def ensure_userspace(wheels, cache_dir: Path, *, rebuild: bool = False, log=None) -> Userspace:
    """The aarch64 user-space for these wheels: the cached one when complete, else built (once) and cached."""
    t0 = time.perf_counter()
    key = userspace_key(wheels)
    folder = Path(cache_dir).expanduser().absolute() / "userspace"
    final = folder / key
    state, manifest = userspace_state(final, key)
    if state == "ok" and not rebuild:
        return Userspace(final, key, manifest, False, time.perf_counter() - t0)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=_BUILD_PREFIX + "probe-", dir=folder)
        os.rmdir(probe)
    except OSError as e:
        raise EmulatorError(f"cannot write the emulator cache {folder} ({e.strerror or e}); pass a writable "
                            "--cache-dir") from None
    _remove_stale_builds(folder)
    _log(log, f"{'rebuilding' if state == 'ok' else 'building' if state == 'missing' else 'rebuilding the corrupt'} "
              f"aarch64 user-space {key} in {final} (once; downloads about 50 MB)")
    tmp = folder / f"{_BUILD_PREFIX}{key}-{os.getpid()}-{os.urandom(3).hex()}"
    tmp.mkdir()
    try:
        manifest = _build(tmp, key, wheels, log)
        manifest["build_seconds"] = round(time.perf_counter() - t0, 1)
        (tmp / "root" / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        state_now, _ = userspace_state(final, key)
        if state_now == "ok" and not rebuild:  # another process finished the same build meanwhile: keep its root
            shutil.rmtree(tmp, ignore_errors=True)
            return ensure_userspace(wheels, cache_dir, log=log)
        _replace_dir(tmp / "root", final)
    except OSError as e:
        raise EmulatorError(f"cannot build the emulator root in {folder} ({e.strerror or e}); free some disk space "
                            "or pass another --cache-dir") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log(log, f"built {key}: {manifest['files']} files, {manifest['bytes'] / 2**20:.0f} MiB, "
              f"{manifest['build_seconds']:.1f} s")
    return Userspace(final, key, manifest, True, time.perf_counter() - t0)


def _build(tmp: Path, key: str, wheels, log) -> dict:
    root = tmp / "root"
    root.mkdir()
    release = _verified_release(tmp)
    pkgs = _packages_index(release)
    names = resolve(pkgs, PACKAGES)
    total = sum(int(pkgs[n].get("Size", 0)) for n in names)
    _log(log, f"{len(names)} Debian {SUITE} {DEB_ARCH} packages ({total / 2**20:.1f} MiB), sha256-checked against "
              "the signed index")

    def fetch(name):
        f = pkgs[name]
        url = f"{MIRROR}/{f['Filename']}"
        blob = _fetch(url, f"{name} {f['Version']}")
        if len(blob) != int(f.get("Size", -1)) or hashlib.sha256(blob).hexdigest() != f.get("SHA256"):
            raise EmulatorError(f"{url} does not match the sha256 of the signed {SUITE} index; run again (a proxy "
                                "or a mirror in sync may have served another file)")
        return name, blob

    with ThreadPoolExecutor(4) as pool:
        for name, blob in pool.map(fetch, names):
            extract_deb(blob, root, f"{name} {pkgs[name]['Version']}")
    for top in _MERGED:
        if not (root / top).exists():
            os.symlink(f"usr/{top}", root / top)
    for d in ("proc", "sys", "dev", "tmp", "run"):  # the device layer provides proc/ and sys/; the rest is the host's
        if (root / d).is_dir() and not (root / d).is_symlink():
            shutil.rmtree(root / d)
    # No ld.so cache or preload list of its own would make the emulated loader read the host's x86 ones.
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc/ld.so.cache").write_bytes(b"")
    (root / "etc/ld.so.preload").write_bytes(b"")

    _log(log, f"wheels {', '.join(f'{n} {v}' for n, v in wheels)} (aarch64, CPython {PYTHON}) from PyPI")
    wdir = tmp / "wheels"
    wdir.mkdir()
    site = root / "usr/lib/python3/dist-packages"
    got = {}
    for w in _download_wheels(wheels, wdir):
        extract_wheel(w, site)
        dist = re.sub(r"[-_.]+", "-", w.name.split("-", 1)[0]).lower()  # name-version-tags.whl
        got[dist] = {"file": w.name, "sha256": hashlib.sha256(w.read_bytes()).hexdigest(), "bytes": w.stat().st_size}
    rel = _release_fields(release)
    n, size = _tree_size(root)
    return {
        "kind": "emulated_userspace", "schema_version": SCHEMA_VERSION, "key": key,
        "distribution": {"name": "Debian", "codename": SUITE, "version": rel.get("Version"), "arch": DEB_ARCH,
                         "mirror": MIRROR, "index_date": rel.get("Date"),
                         "verified": f"InRelease signature (gpgv, {KEYRING.name}); each .deb's sha256 from the index"},
        "python": PYTHON, "glibc": ".".join(map(str, GLIBC)),
        "packages": [{"name": p, "version": pkgs[p]["Version"], "sha256": pkgs[p]["SHA256"]} for p in names],
        "wheels": [{"name": nm, "version": v, **got.get(nm, {"file": None, "sha256": None})} for nm, v in wheels],
        "files": n, "bytes": size,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# --------------------------------------------------------------------------- the device layer

def qemu_binary() -> Path:
    for name in QEMU:
        p = shutil.which(name)
        if p:
            return Path(p)
    raise EmulatorError("qemu-aarch64-static is not installed; apt-get install qemu-user-static (or run ./setup.sh)")


def qemu_version(qemu: Path) -> str:
    try:
        out = subprocess.run([str(qemu), "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (out.strip().splitlines() or ["unknown"])[0]


_WRAPPER = """#!/bin/sh
# The emulated Python 3.11 (aarch64) of this folder. Written by pipeline/device/emulate.py.
# qemu-user does not translate execve, so this host script is the emulated Python's own argv[0]
# (sys.executable): a subprocess of it starts the emulator again, with this folder as its root.
here=$(cd "$(dirname "$0")" && pwd -P)
export PYTHONDONTWRITEBYTECODE=1
exec {qemu} -L "$here" -cpu {cpu} -0 "$here/python3" "$here/usr/bin/python3.11" "$@"
"""

# Run inside the emulator when a layer is made: what the emulated process sees.
_PROBE = r"""
import json, os, platform, struct, sys
def read(p):
    try:
        with open(p) as f:
            return f.read()
    except OSError:
        return None
aux = {}
try:
    raw = open("/proc/self/auxv", "rb").read()
    aux = dict(struct.iter_unpack("<QQ", raw[:len(raw) // 16 * 16]))
except OSError:
    pass
ver = {}
for name, mod in (("numpy", "numpy"), ("ai-edge-litert", "ai_edge_litert.interpreter")):
    try:
        __import__(mod)
        from importlib import metadata
        ver[name] = metadata.version(name)
    except Exception as e:
        ver[name] = "error: %s: %s" % (type(e).__name__, e)
parts = sorted({l.split(":", 1)[1].strip() for l in (read("/proc/cpuinfo") or "").splitlines()
                if l.startswith("CPU part")})
print(json.dumps({"machine": platform.machine(), "python": platform.python_version(), "executable": sys.executable,
                  "cpu_parts": parts, "possible": (read("/sys/devices/system/cpu/possible") or "").strip(),
                  "hwcap": aux.get(16, 0), "hwcap2": aux.get(26, 0), "versions": ver,
                  "os": [l.split("=", 1)[1].strip('"') for l in (read("/etc/os-release") or "").splitlines()
                         if l.startswith("PRETTY_NAME=")]}))
"""

# Linux arm64 HWCAP / HWCAP2 bits (arch/arm64/include/uapi/asm/hwcap.h), as /proc/cpuinfo names them.
HWCAP = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop "
         "sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg").split()
HWCAP2 = ("dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm svef32mm svef64mm svebf16 "
          "i8mm bf16 dgh rng bti").split()


def hwcap_names(hwcap: int, hwcap2: int) -> list[str]:
    return ([n for i, n in enumerate(HWCAP) if hwcap >> i & 1] + [n for i, n in enumerate(HWCAP2) if hwcap2 >> i & 1])


def _write_cpu_files(layer: Path, device: EmulatedDevice) -> None:
    (layer / "proc").mkdir()
    (layer / "proc/cpuinfo").write_text(device.cpuinfo(), encoding="ascii")
    cpu = layer / "sys/devices/system/cpu"
    cpu.mkdir(parents=True)
    span = f"0-{device.cores - 1}"
    for name, value in (("possible", span), ("present", span), ("online", span), ("offline", ""),
                        ("kernel_max", str(device.cores - 1))):
        (cpu / name).write_text(value + "\n")
    for i in range(device.cores):
        freq = cpu / f"cpu{i}/cpufreq"
        freq.mkdir(parents=True)
        for name, value in (("cpuinfo_max_freq", device.max_khz), ("cpuinfo_min_freq", device.min_khz),
                            ("scaling_max_freq", device.max_khz), ("scaling_min_freq", device.min_khz)):
            (freq / name).write_text(f"{value}\n")
        topo = cpu / f"cpu{i}/topology"
        topo.mkdir()
        for name, value in (("core_id", i), ("physical_package_id", 0), ("cluster_id", 0),
                            ("core_siblings_list", span), ("package_cpus_list", span), ("cluster_cpus_list", span),
                            ("thread_siblings_list", i), ("core_cpus_list", i)):
            (topo / name).write_text(f"{value}\n")


@dataclass(frozen=True)
class Layer:
    folder: Path
    python: Path  # the wrapper: run it like python3
    probe: dict  # what the emulated process saw when the layer was made


def ensure_layer(device: EmulatedDevice, userspace: Userspace, cache_dir: Path, qemu: Path, *, log=None) -> Layer:
    """``cache/<device>/<key>``: links to the user-space, the device's proc/cpuinfo and cpu tree, the wrapper.
    Made (in a temporary folder, then renamed) when missing or not matching; checked from inside when made."""
    folder = Path(cache_dir).expanduser().absolute() / device.name
    final = folder / userspace.key
    spec = {"schema_version": SCHEMA_VERSION, "device": device.describe(), "userspace": userspace.key,
            "userspace_built_at": userspace.manifest.get("built_at"), "qemu": str(qemu)}
    wrapper = _WRAPPER.format(qemu=shlex.quote(str(qemu)), cpu=shlex.quote(device.qemu_cpu))
    try:
        have = json.loads((final / _LAYER_MANIFEST).read_text(encoding="utf-8"))
        if (have.get("spec") == spec and (final / "python3").read_text() == wrapper
                and (final / "proc/cpuinfo").read_text(encoding="ascii") == device.cpuinfo()):
            return Layer(final, final / "python3", have["probe"])
    except (OSError, ValueError, AttributeError, KeyError, UnicodeDecodeError):
        pass
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _remove_stale_builds(folder)
        tmp = folder / f"{_BUILD_PREFIX}{userspace.key}-{os.getpid()}-{os.urandom(3).hex()}"
        tmp.mkdir()
    except OSError as e:
        raise EmulatorError(f"cannot write the emulator cache {folder} ({e.strerror or e}); pass a writable "
                            "--cache-dir") from None
    try:
        for entry in sorted(os.listdir(userspace.root)):
            if entry != _MANIFEST:
                os.symlink(os.path.relpath(userspace.root / entry, tmp), tmp / entry)
        _write_cpu_files(tmp, device)
        (tmp / "python3").write_text(wrapper)
        os.chmod(tmp / "python3", 0o755)
        probe = _probe(tmp / "python3", device)
        (tmp / _LAYER_MANIFEST).write_text(json.dumps({"spec": spec, "probe": probe}, indent=2) + "\n")
        _replace_dir(tmp, final)
    except OSError as e:
        raise EmulatorError(f"cannot write the emulator cache {folder} ({e.strerror or e}); pass a writable "
                            "--cache-dir") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log(log, f"{device.name}: qemu -cpu {device.qemu_cpu} sees {device.core} x{device.cores} "
              f"(HWCAP: {' '.join(probe['hwcaps'])})")
    return Layer(final, final / "python3", probe)


def _guest_env(tmpdir: str) -> dict:
    """The emulated process's whole environment: nothing of the host's Python setup leaks in."""
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TMPDIR": tmpdir,
            "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1", "HOME": tmpdir}


def _no_core_dumps() -> None:  # a crashing emulated process must not leave a qemu core file in the folder
    import resource
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _probe(python: Path, device: EmulatedDevice) -> dict:
    with tempfile.TemporaryDirectory(prefix="emulate-probe-") as tmpdir:
        try:
            p = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, timeout=300,
                               env=_guest_env(tmpdir), cwd=tmpdir, preexec_fn=_no_core_dumps)
        except (OSError, subprocess.SubprocessError) as e:
            raise EmulatorError(f"cannot start the emulated Python ({e}); apt-get install qemu-user-static") from None
    try:
        seen = json.loads(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        why = (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
        raise EmulatorError(f"the emulated Python 3.11 does not start ({why}); delete the cache folder and run "
                            "again (--rebuild)") from None
    if seen.get("cpu_parts") != [device.cpu_part] or seen.get("possible") != f"0-{device.cores - 1}":
        raise EmulatorError(f"qemu-aarch64 did not redirect /proc/cpuinfo and /sys/devices/system/cpu into the root "
                            f"(the emulated process read CPU parts {seen.get('cpu_parts')}, cpus "
                            f"{seen.get('possible')!r}); LiteRT would crash on the host's: use Debian's "
                            "qemu-user-static (its -L looks paths up in the root first)")
    bad = {k: v for k, v in seen.get("versions", {}).items() if str(v).startswith("error")}
    if bad or seen.get("machine") != "aarch64":
        raise EmulatorError(f"the emulated Python cannot import {', '.join(bad) or 'its modules'} "
                            f"({'; '.join(bad.values())[:200]}); run again with --rebuild")
    seen["hwcaps"] = hwcap_names(int(seen.pop("hwcap", 0)), int(seen.pop("hwcap2", 0)))
    return seen


def prepare(cache_dir: Path | str = DEFAULT_CACHE_DIR, devices=tuple(DEVICES), *, log=None) -> list[Layer]:
    """Build (or find) the aarch64 root for the wheels this version's bundles pin, and each device's layer: what
    ``./setup.sh --with-emulation`` runs, so that later checks need no network."""
    import tempfile as _tf

    from pipeline.device.bundle import REQUIREMENTS
    with _tf.TemporaryDirectory(prefix="emulate-prepare-") as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(REQUIREMENTS, encoding="utf-8")
        wheels = requirements_pins(req)
    qemu = qemu_binary()
    cache = Path(cache_dir).expanduser().absolute()
    us = ensure_userspace(wheels, cache, log=log)
    return [ensure_layer(get_device(d), us, cache, qemu, log=log) for d in devices]


# --------------------------------------------------------------------------- the check

@dataclass(frozen=True)
class KernelCheck:
    """One kernel family on the emulated CPU against the host's recorded outputs (pi_benchmark.py's figures)."""

    kernels: str
    samples: int
    top1_agreement: float | None
    flips: int | None
    flips_beyond_tolerance: int | None
    max_diff_steps: float | None
    values_differing: float | None
    passed: bool
    compared_with: str | None = None
    error: str | None = None

    @classmethod
    def from_row(cls, r: dict) -> "KernelCheck":
        return cls(kernels=str(r.get("kernels")), samples=int(r.get("samples") or 0),
                   top1_agreement=r.get("top1_agreement"), flips=r.get("flips"),
                   flips_beyond_tolerance=r.get("flips_beyond_tolerance"), max_diff_steps=r.get("max_diff_steps"),
                   values_differing=r.get("values_differing"), passed=bool(r.get("passed")),
                   compared_with=r.get("compared_with"), error=r.get("error"))

    def describe(self) -> dict:
        d = {"kernels": self.kernels, "samples": self.samples, "compared_with": self.compared_with,
             "top1_agreement": self.top1_agreement, "flips": self.flips,
             "flips_beyond_tolerance": self.flips_beyond_tolerance, "max_diff_steps": self.max_diff_steps,
             "values_differing": self.values_differing, "passed": self.passed}
        return d | ({"error": self.error} if self.error else {})


@dataclass(frozen=True)
class EmulationResult:
    """The bundle's check on one emulated device. ``passed``: every kernel family within the bundle's tolerance
    (pi_benchmark.py's rule); False also when the emulated interpreter crashed (``error``)."""

    device: EmulatedDevice
    bundle: str
    model_spec: str | None
    kernels: tuple[KernelCheck, ...]
    tolerance_steps: float | None
    passed: bool
    failures: tuple[str, ...]
    runtime: dict  # as the emulated script reports them: python, numpy, runtime, runtime_version
    wheels: tuple[dict, ...]
    userspace: dict
    qemu: dict
    hwcaps: tuple[str, ...]
    script: dict
    preprocessing: dict | None = None
    error: str | None = None
    wall_seconds: dict = field(default_factory=dict)

    @property
    def max_diff_steps(self) -> float | None:
        vals = [k.max_diff_steps for k in self.kernels if k.max_diff_steps is not None]
        return max(vals) if vals else None

    def describe(self) -> dict:
        """The report's ``emulation`` section (JSON-safe)."""
        return {
            "kind": "emulated_device_check", "schema_version": SCHEMA_VERSION,
            "device": self.device.describe(),
            "emulator": {**self.qemu, "hwcaps_seen": list(self.hwcaps)},
            "userspace": dict(self.userspace),
            "wheels": [dict(w) for w in self.wheels],
            "runtime": dict(self.runtime),
            "bundle": self.bundle, "model_spec": self.model_spec, "script": dict(self.script),
            "tolerance_steps": self.tolerance_steps,
            "kernels": [k.describe() for k in self.kernels],
            "preprocessing": self.preprocessing,
            "max_diff_steps": self.max_diff_steps,
            "passed": self.passed, "failures": list(self.failures),
            **({"error": self.error} if self.error else {}),
            "outputs_only": "emulation checks outputs; its timings mean nothing and none is reported as a latency",
            "wall_seconds": dict(self.wall_seconds), "wall_seconds_are": NOT_A_LATENCY,
        }


_CHECKOUT_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "pi_benchmark.py"


def _script_to_run(bundle: Bundle) -> tuple[Path, dict]:
    """The bundle's pi_benchmark.py when it is this checkout's (byte for byte); else this checkout's own copy: a
    received folder is data, never code to run (bundle.json records no digest of the script)."""
    from pipeline.jsonio import sha256_file
    got = sha256_file(bundle.script)
    ours = sha256_file(_CHECKOUT_SCRIPT) if _CHECKOUT_SCRIPT.is_file() else None
    if got == ours:
        return bundle.script, {"ran": "the bundle's pi_benchmark.py (identical to this checkout's)", "sha256": got}
    if ours is None:
        raise EmulatorError(f"the bundle's pi_benchmark.py differs from this checkout's and "
                            f"{_CHECKOUT_SCRIPT} is missing; run from the source tree")
    return _CHECKOUT_SCRIPT, {"ran": "this checkout's benchmarks/pi_benchmark.py: the bundle's copy differs (an "
                                     "export of another version, or edited) and code from a received folder is "
                                     "never run", "sha256": ours, "bundle_sha256": got}


def check_bundle(bundle_dir: Path, device_name: str, *, cache_dir: Path | str = DEFAULT_CACHE_DIR,
                 kernels=KERNELS, rebuild: bool = False, timeout_s: float = CHECK_TIMEOUT_S, log=None,
                 verbose: bool = False) -> EmulationResult:
    """Check the device bundle in ``bundle_dir`` on the emulated ``device_name``: build (or reuse) the root, run
    the bundle's ``pi_benchmark.py --check-only`` under qemu, return its per-kernel comparison."""
    device = get_device(device_name)
    bad = [k for k in kernels if k not in KERNELS]
    if not kernels or bad:
        raise UsageError(f"kernels {','.join(bad) or 'none'}: choose from {','.join(KERNELS)}")
    bundle = read_bundle(Path(bundle_dir))
    qemu = qemu_binary()
    cache = Path(cache_dir).expanduser().absolute()
    t0 = time.perf_counter()
    us = ensure_userspace(bundle.wheels, cache, rebuild=rebuild, log=log)
    layer = ensure_layer(device, us, cache, qemu, log=log)
    t_root = time.perf_counter() - t0
    script, script_info = _script_to_run(bundle)
    _log(log, f"{device.name}: running {script.name} --check-only ({','.join(kernels)}) under qemu -cpu "
              f"{device.qemu_cpu} (emulated: takes a while, timings are not reported)")
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="emulate-check-") as tmpdir:
        out_json = Path(tmpdir) / "check.json"
        cmd = [str(layer.python), str(script), str(bundle.model), "--check-only", "--kernels", ",".join(kernels),
               "--threads", "1", "--json", str(out_json)]
        rc, stdout, stderr = _run(cmd, tmpdir, timeout_s)
        if verbose and log is not None:
            for line in (stdout + stderr).splitlines():
                log(f"  [emulated] {line}", file=sys.stderr)
        doc = None
        if out_json.is_file():
            try:
                doc = json.loads(out_json.read_text(encoding="utf-8"))
            except ValueError:
                doc = None
    t_check = time.perf_counter() - t1
    error_line = next((ln[len("error:"):].strip() for ln in reversed(stderr.splitlines()) if ln.startswith("error:")),
                      None)
    if rc == 2:
        raise DataError(f"the emulated pi_benchmark.py refused the bundle: {error_line or 'exit status 2'}")
    if rc is None:
        error = f"the emulated check did not finish within {timeout_s:.0f} s (emulation is slow: a large model or " \
                "many samples); it was stopped"
    elif rc not in (0, 1) or (doc is None and rc == 1):
        tail = error_line or ("; ".join(stderr.strip().splitlines()[-2:])[:300] or f"exit status {rc}")
        error = f"the emulated check failed ({'killed by signal %d' % -rc if rc < 0 else tail})"
    elif doc is None or not isinstance(doc.get("check"), dict):
        error = "the emulated check wrote no result; run with -v to see its output"
    else:
        error = None
    c = (doc or {}).get("check") or {}
    rows = tuple(KernelCheck.from_row(r) for r in c.get("kernels", []) if isinstance(r, dict))
    failures = tuple(str(f) for f in c.get("failures", [])) + ((error,) if error else ())
    versions = (doc or {}).get("versions") or {}
    probe = layer.probe
    return EmulationResult(
        device=device, bundle=str(bundle.folder), model_spec=bundle.manifest.get("model_spec"), kernels=rows,
        tolerance_steps=c.get("tolerance_steps"), passed=error is None and bool(c.get("passed")) and rc == 0,
        failures=failures,
        runtime={"python": versions.get("python", probe.get("python")), "numpy": versions.get("numpy"),
                 "runtime": versions.get("runtime"), "runtime_version": versions.get("runtime_version"),
                 "machine": ((doc or {}).get("device") or {}).get("machine", probe.get("machine")),
                 "os": (probe.get("os") or [None])[0]},
        wheels=tuple({"name": w["name"], "version": w["version"], "file": w["file"], "sha256": w["sha256"]}
                     for w in us.manifest.get("wheels", [])),
        userspace={"key": us.key, "root": str(us.root), "built_now": us.built,
                   "distribution": f"Debian {us.manifest['distribution'].get('version')} "
                                   f"{us.manifest['distribution'].get('codename')} {DEB_ARCH}",
                   "packages": len(us.manifest.get("packages", [])), "files": us.manifest.get("files"),
                   "bytes": us.manifest.get("bytes"), "build_seconds": us.manifest.get("build_seconds")},
        qemu={"binary": str(qemu), "version": qemu_version(qemu), "cpu": device.qemu_cpu,
              "root_redirects": "/proc/cpuinfo and /sys/devices/system/cpu read from the root (checked from inside)"},
        hwcaps=tuple(probe.get("hwcaps", [])), script=script_info, preprocessing=c.get("preprocessing"),
        error=error, wall_seconds={"root": round(t_root, 1), "check": round(t_check, 1)})


def _run(cmd: list[str], cwd: str, timeout_s: float) -> tuple[int | None, str, str]:
    """Run the emulated check in its own process group (its workers are emulators too), all of it stopped on a
    timeout, Ctrl-C or SIGTERM. rc None: timed out."""
    try:
        p = subprocess.Popen(cmd, cwd=cwd, env=_guest_env(cwd), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, errors="replace", start_new_session=True, preexec_fn=_no_core_dumps)
    except OSError as e:
        raise EmulatorError(f"cannot start the emulator ({e.strerror or e}); apt-get install qemu-user-static") \
            from None
    try:
        out, err = p.communicate(timeout=timeout_s)
        return p.returncode, out, err
    except subprocess.TimeoutExpired:
        _kill_group(p)
        out, err = p.communicate()
        return None, out, err
    except BaseException:
        _kill_group(p)
        p.communicate()
        raise


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
