"""Stage ``firmware``: TFLite-Micro targets only: the microcontroller firmware package, ``firmware/`` and
``firmware.zip`` (the writer: :mod:`pipeline.device.firmware`): the model as a C array, its op resolver, the settings
and preprocessing as C, one sample and a main that checks it on the board."""
from __future__ import annotations

from pathlib import Path


def firmware(work: Path, tflite, insp, micro, preprocessing: dict, inputs, *, model_spec: str):
    """``micro``: the micro stage's MicroResult (None on LiteRT targets: nothing to write)."""
    if micro is None:
        return None
    from pipeline.device.firmware import write_firmware
    return write_firmware(work, tflite.path, insp, micro, preprocessing, inputs.raw_test, inputs.x_test,
                          inputs.labels, target=inputs.target, model_spec=model_spec,
                          class_names=inputs.dataset.class_names)


def attach(report, result) -> None:
    """The ``firmware`` section, its artifact entry and any warning into the export's report."""
    if result is None:
        return
    d = result.describe()
    report.sections["firmware"] = d
    report.artifacts["firmware"] = {"path": d["path"], "zip": d["zip"], "zip_bytes": d["zip_bytes"],
                                    "files": d["files"]}
    report.warnings.extend(result.warnings)
