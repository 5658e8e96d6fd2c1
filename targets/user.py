"""Budgets the user gives: ``--ram``/``--flash`` over a TFLite-Micro target, or a whole board (``--target-file``).

A board file is TOML (read with ``tomllib``) or JSON (a ``.json`` name), one table of these keys:

    name = "myboard"            # required: letters, digits, '.', '_', '-' (it names the export folder)
    core = "cortex-m4"          # required: cortex-m0plus, cortex-m3, cortex-m4, cortex-m7, cortex-m33, cortex-m55
    ram = "256KiB"              # required: RAM for the tensor arena, bytes or a size with a unit
    flash = "1MiB"              # required: flash for the model
    clock_mhz = 80              # optional (shown, never used to estimate latency)
    arena_margin = 0.25         # optional, in [0, 1): headroom on the measured arena (default 0.25)
    flash_margin = 0.25         # optional, in [0, 1): headroom on the model's flash (default 0.25)
    kernels = "cmsis-nn"        # optional: the TFLite-Micro kernels the firmware is built with (or "reference")
    description = "..."         # optional: one line shown in the report

Sizes are integers (bytes) or strings with a unit: B, KB/MB/GB (powers of 1000), KiB/MiB/GiB (powers of 1024).
Every problem is one ``TargetError`` (or ``UsageError`` for a flag) line, exit 2, before anything runs.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import TargetError, UsageError

UNITS = {"b": 1, "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3}
_SIZE = re.compile(r"^\s*([+-]?\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
# A microcontroller's RAM or flash above this is a typo (or not a microcontroller).
MAX_BYTES = 1 << 40
MAX_FILE_BYTES = 64 * 1024

# key -> what it holds, for messages and for "did you mean"
BOARD_KEYS = {
    "name": "the board's name", "core": "the Arm core", "ram": "RAM budget", "flash": "flash budget",
    "clock_mhz": "clock in MHz", "arena_margin": "arena headroom in [0, 1)", "flash_margin": "flash headroom in [0, 1)",
    "kernels": "TFLite-Micro kernels of the firmware", "description": "one line about the board",
}
REQUIRED = ("name", "core", "ram", "flash")
DEFAULT_MARGIN = 0.25  # the built-in microcontroller profiles' policy (targets/profiles.py)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def parse_size(value, what: str, error=UsageError) -> int:
    """Bytes from an integer or a string such as "256KiB", "1MiB", "1MB" or "4096"; ``error`` names ``what``."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise error(f"{what} = {value!r} is not a size; give bytes as an integer or a string with a unit, "
                    "e.g. \"256KiB\" or \"1MB\"")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE.match(value)
        if not m:
            raise error(f"{what} {value!r} is not a size; write a number and a unit, e.g. 256KiB, 1MiB, 1MB or "
                        "4096 (bytes)")
        number, unit = m.group(1), m.group(2).lower()
        if unit in ("k", "m", "g"):
            u, power = unit.upper(), " kmg".index(unit)
            raise error(f"{what} {value!r} is ambiguous; write {number}{u}iB ({float(number) * 1024 ** power:,.0f} B) "
                        f"or {number}{u}B ({float(number) * 1000 ** power:,.0f} B)")
        if unit not in UNITS and unit != "":
            raise error(f"{what} {value!r} has an unknown unit {m.group(2)!r}; units: B, KB, MB, GB (x1000), KiB, MiB, "
                        "GiB (x1024), e.g. 256KiB")
        exact = float(number) * UNITS.get(unit, 1)
        if not math.isclose(exact, round(exact), abs_tol=1e-6):
            raise error(f"{what} {value!r} is not a whole number of bytes ({exact:,.3f} B)")
        n = int(round(exact))
    if n <= 0:
        raise error(f"{what} {value!r} is not a positive size; a budget must be at least 1 byte")
    if n > MAX_BYTES:
        raise error(f"{what} {value!r} is {n:,} B, above 1 TiB: not a microcontroller budget (check the unit)")
    return n


@dataclass(frozen=True)
class UserBudget:
    """What the user said about the device: ``--ram``/``--flash`` bytes over a registered TFLite-Micro target, or a
    board file (``board``: its validated keys, sizes in bytes). ``given_by`` says how, for the report."""

    given_by: str
    ram_bytes: int | None = None
    flash_bytes: int | None = None
    board: dict | None = None
    path: str | None = None  # the board file, absolute


def from_flags(target: str | None, ram: str | None, flash: str | None, target_file: str | None,
               default_target: str) -> tuple[str, UserBudget | None]:
    """The target name and the user's budget from ``--target``, ``--ram``, ``--flash`` and ``--target-file``
    (``target`` None: not given). Raises one line for a bad size, a bad board file or a flag that does not apply."""
    from pipeline import targets
    ram_b = parse_size(ram, "--ram") if ram is not None else None
    flash_b = parse_size(flash, "--flash") if flash is not None else None
    flags = " ".join(f"--{k} {v}" for k, v in (("ram", ram), ("flash", flash)) if v is not None)
    if target_file is not None:
        path = Path(target_file)
        board = read_board(path)
        if target is not None and target != board["name"]:
            raise UsageError(f"--target {target} conflicts with --target-file {target_file}, which defines board "
                             f"{board['name']!r}; drop --target (or pass --target {board['name']})")
        given = f"--target-file {path.absolute()}" + (f" {flags}" if flags else "")
        return board["name"], UserBudget(given_by=given, ram_bytes=ram_b, flash_bytes=flash_b, board=board,
                                          path=str(path.absolute()))
    name = target if target is not None else default_target
    if ram_b is None and flash_b is None:
        return name, None
    if "," in name:
        raise UsageError(f"{flags} applies to one TFLite-Micro target; pass a single --target (not {name})")
    t = targets.get_target(name)
    if not t.is_micro:
        micro = ", ".join(n for n in targets.list_targets() if targets.get_target(n).is_micro)
        raise UsageError(f"{flags.split()[0]} applies to TFLite-Micro targets ({micro} or a --target-file board); "
                         f"{name} runs on LiteRT, where no RAM or flash budget is checked")
    return name, UserBudget(given_by=flags, ram_bytes=ram_b, flash_bytes=flash_b)


def read_board(path: Path) -> dict:
    """A board file's keys, validated: sizes in bytes, margins and defaults filled in. TargetError otherwise."""
    where = str(path)
    try:
        if path.is_dir():
            raise TargetError(f"--target-file {where} is a folder; pass a .toml or .json board file")
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise TargetError(f"cannot read --target-file {where} ({e.strerror or e}); pass a readable board file") \
            from None
    if len(data) > MAX_FILE_BYTES:
        raise TargetError(f"--target-file {where} is larger than {MAX_FILE_BYTES // 1024} KiB; a board file is a "
                          "few lines of TOML or JSON")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise TargetError(f"--target-file {where} is not UTF-8 text; save it as UTF-8 TOML or JSON") from None
    if path.suffix.lower() == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise TargetError(f"{where} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    else:
        import tomllib
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise TargetError(f"{where} is not valid TOML ({e}); see README 'Your own board' for an example") \
                from None
    if not isinstance(raw, dict):
        raise TargetError(f"{where} holds a {type(raw).__name__}, not a table of board keys (name, core, ram, flash)")
    return validate_board(raw, where)


def validate_board(raw: dict, where: str) -> dict:
    from pipeline.targets import CORES, FIRMWARE_KERNELS, list_targets
    for k in raw:
        if k not in BOARD_KEYS:
            close = difflib.get_close_matches(str(k), list(BOARD_KEYS), n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise TargetError(f"{where}: unknown key {k!r}; {hint}a board file takes {', '.join(BOARD_KEYS)}")
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise TargetError(f"{where}: missing {', '.join(missing)} ({'; '.join(BOARD_KEYS[k] for k in missing)}); "
                          f"a board needs {', '.join(REQUIRED)}")
    name = raw["name"]
    if not isinstance(name, str) or not _NAME.match(name):
        raise TargetError(f"{where}: name {name!r} must be 1-64 letters, digits, '.', '_' or '-' (it names the "
                          "export folder)")
    if name in list_targets():
        raise TargetError(f"{where}: name {name!r} is a built-in target; name your board otherwise (or use "
                          f"--target {name} --ram SIZE --flash SIZE)")
    core = raw["core"]
    if not isinstance(core, str) or core.lower() not in CORES:
        close = difflib.get_close_matches(str(core).lower(), list(CORES), n=2, cutoff=0.5)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise TargetError(f"{where}: unknown core {core!r}; {hint}choose one of {', '.join(CORES)}")
    board = {"name": name, "core": core.lower(),
             "ram_bytes": parse_size(raw["ram"], f"{where}: ram", TargetError),
             "flash_bytes": parse_size(raw["flash"], f"{where}: flash", TargetError)}
    clock = raw.get("clock_mhz")
    if clock is not None:
        if isinstance(clock, bool) or not isinstance(clock, (int, float)) or not math.isfinite(clock) or clock <= 0 \
                or clock > 10_000 or (isinstance(clock, float) and not clock.is_integer()):
            raise TargetError(f"{where}: clock_mhz {clock!r} is not a whole positive number of MHz (e.g. 80)")
        clock = int(clock)
    board["clock_mhz"] = clock
    for key in ("arena_margin", "flash_margin"):
        v = raw.get(key, DEFAULT_MARGIN)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v < 1:
            raise TargetError(f"{where}: {key} {v!r} is outside [0, 1); give the headroom as a fraction, e.g. 0.25 "
                              "for 25%")
        board[key] = float(v)
    kernels = raw.get("kernels", "cmsis-nn")
    if kernels not in FIRMWARE_KERNELS:
        raise TargetError(f"{where}: kernels {kernels!r} is not one of {', '.join(FIRMWARE_KERNELS)}")
    board["kernels"] = kernels
    desc = raw.get("description")
    if desc is not None and (not isinstance(desc, str) or len(desc) > 200 or "\n" in desc):
        raise TargetError(f"{where}: description must be one line of text (at most 200 characters)")
    board["description"] = desc
    return board


def apply(name: str, user: UserBudget, base):
    """The Target for ``user``: ``base`` (the registered ``name``) with the user's budgets, or the user's board."""
    from pipeline.targets import CORES, Target, _check, get_target
    if user.board is None:
        if base is None:
            get_target(name)  # raises the registry's "unknown target" line
        t = dataclasses.replace(
            base, ram_bytes=user.ram_bytes if user.ram_bytes is not None else base.ram_bytes,
            flash_bytes=user.flash_bytes if user.flash_bytes is not None else base.flash_bytes,
            device=f"your {base.core} board ({user.given_by})", budget_source="user", budget_given_by=user.given_by,
            references=(f"budgets given by the user ({user.given_by}); everything else from the {base.name} profile "
                        f"({base.device}), whose sources follow", *base.references))
        _check(t)
        return t
    b = user.board
    if name != b["name"]:
        raise TargetError(f"target {name!r} is not the board {b['name']!r} of {user.path}")
    core = CORES[b["core"]]
    clock = f" @ {b['clock_mhz']} MHz" if b["clock_mhz"] else ""
    device = f"{b['name']} (your board), {core.name}{clock}"
    t = Target(
        name=b["name"],
        description=b["description"] or f"your board {b['name']} ({user.path}): fully-int8 on TFLite-Micro, RAM "
                                         "and flash checked",
        device=device, precision="int8", runtime="tflite-micro", kernels="tflm-reference", litert_kernels="builtin",
        threads=1, clock_mhz=b["clock_mhz"],
        ram_bytes=user.ram_bytes if user.ram_bytes is not None else b["ram_bytes"],
        flash_bytes=user.flash_bytes if user.flash_bytes is not None else b["flash_bytes"],
        arena_margin=b["arena_margin"], flash_margin=b["flash_margin"], core=core.name,
        firmware_kernels=b["kernels"], budget_source="user", budget_given_by=user.given_by,
        references=(f"RAM, flash, core, clock and margins from the board file {user.path} (given by the user, not "
                    "checked against a datasheet)",
                    "arena_bytes is measured by TFLite-Micro's RecordingMicroAllocator in the tflite-micro Python "
                    "wheel on this host; flash_bytes is the .tflite size"),
    )
    _check(t)
    return t
