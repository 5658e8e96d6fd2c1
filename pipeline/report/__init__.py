"""The one Report: a typed, versioned JSON document that export and evaluate write (and study, zoo_table and the
benchmarks stamp with the same ``schema_version`` style, "MAJOR.MINOR").

Schema history (README "report.json"): 1.0, the first; 1.1, every gate carries ``required`` (the accuracy gates
had none). Readers of 1.0 files keep working: :meth:`Report.from_dict` reads both.
"""
from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Any

SCHEMA_VERSION = "1.1"
_PACKAGES = ("torch", "tensorflow", "tf-keras", "onnx", "onnx2tf", "onnxruntime", "ai-edge-litert", "numpy")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in _PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


@dataclass(frozen=True)
class Gate:
    """One pass/fail check of a report: the measured ``value`` against its ``limit``; ``reason`` says why it
    failed (or what it means), ``details`` holds the gate's own extra fields (rule, group, images, ...)."""

    passed: bool
    value: Any = None
    limit: Any = None
    required: bool = True
    reason: str | None = None
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d: dict = {"required": self.required, "value": self.value}
        if self.limit is not None:
            d["limit"] = self.limit
        d["passed"] = bool(self.passed)
        if self.reason is not None:
            d["reason"] = self.reason
        return d | {k: v for k, v in self.details.items() if k not in d}

    @classmethod
    def from_dict(cls, d: dict) -> "Gate":
        known = {"required", "value", "limit", "passed", "reason"}
        return cls(passed=bool(d.get("passed", True)), value=d.get("value"), limit=d.get("limit"),
                   required=bool(d.get("required", True)), reason=d.get("reason"),
                   details={k: v for k, v in d.items() if k not in known})

    def with_(self, **changes) -> "Gate":
        """This gate with fields replaced; unknown names go to ``details``."""
        own = {f.name for f in fields(self)} - {"details"}
        kw = {k: v for k, v in changes.items() if k in own}
        extra = {k: v for k, v in changes.items() if k not in own}
        return Gate(**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "details"} | kw,
                    details=self.details | extra)


@dataclass
class Report:
    kind: str  # "export", "evaluate"
    target: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    versions: dict = field(default_factory=versions)
    preprocessing: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    onnx: dict = field(default_factory=dict)
    conversion: dict = field(default_factory=dict)
    quantization: dict = field(default_factory=dict)
    runtime: dict = field(default_factory=dict)
    artifacts: dict = field(default_factory=dict)
    accuracy: dict = field(default_factory=dict)
    timings_s: dict = field(default_factory=dict)
    gates: dict[str, Gate] = field(default_factory=dict)
    warnings: list = field(default_factory=list)  # what a reader must not miss even when every gate passes
    config: dict = field(default_factory=dict)
    sections: dict = field(default_factory=dict)  # later capabilities add named sections here (top-level keys)
    schema_version: str = SCHEMA_VERSION

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates.values())

    def failed(self) -> list[str]:
        return [k for k, g in self.gates.items() if not g.passed]

    def to_dict(self) -> dict:
        d = {}
        for f in fields(self):
            if f.name in ("sections", "gates", "schema_version"):
                continue
            d[f.name] = getattr(self, f.name)
        d["gates"] = {k: g.to_dict() for k, g in self.gates.items()}
        d["passed"] = self.passed
        d.update(self.sections)
        d["schema_version"] = self.schema_version
        return _clean(d)

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        """A report read back (``pipeline.evaluate``): known keys to fields, gates to :class:`Gate`, every other
        top-level key to ``sections``. ``passed`` is not read: it follows from the gates."""
        own = {f.name for f in fields(cls)} - {"sections", "gates"}
        kw = {k: d[k] for k in own if k in d}
        gates = {str(k): Gate.from_dict(g) for k, g in (d.get("gates") or {}).items()}
        rest = {k: v for k, v in d.items() if k not in own and k not in ("gates", "passed")}
        return cls(**kw, gates=gates, sections=rest)

    def write_json(self, path: Path) -> None:
        """Only the JSON document, to ``path`` (the benchmarks' result files)."""
        tmp = path.with_name(path.name + ".part")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    def write(self, out_dir: Path) -> None:
        """The one writer of an export's or evaluate's report: ``out_dir``/report.json and report.html, rendered
        first, written to temp files, then renamed into place. The folder is created here; on failure, the temp
        files and the folders this call created are removed, and an OSError is one OutputError line."""
        from pipeline.errors import OutputError
        from pipeline.report import html
        d = self.to_dict()
        contents = {"report.html": html.render(d), "report.json": json.dumps(d, indent=2) + "\n"}
        missing = []
        p = out_dir.absolute()
        while not p.exists() and p != p.parent:
            missing.append(p)
            p = p.parent
        created: list[Path] = []
        tmps: list[Path] = []
        try:
            for folder in reversed(missing):
                folder.mkdir()
                created.append(folder)
            for name, text in contents.items():
                tmp = out_dir / f".{name}.{os.getpid()}.part"
                tmps.append(tmp)
                tmp.write_text(text, encoding="utf-8")
            for name, tmp in zip(contents, tmps):
                os.replace(tmp, out_dir / name)
        except BaseException as e:
            for tmp in tmps:
                try:
                    tmp.unlink(missing_ok=True)
                except OSError:
                    pass
            for folder in reversed(created):
                try:
                    folder.rmdir()
                except OSError:
                    pass
            if isinstance(e, OSError):
                raise OutputError(f"cannot write the report to {out_dir} ({e.strerror or e}); pass a writable "
                                  "--out") from None
            raise


def _clean(v):
    """JSON-safe: Paths to str, tuples to lists, NaN/inf to None."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, "item") and callable(v.item):  # numpy scalar
        return _clean(v.item())
    return v
