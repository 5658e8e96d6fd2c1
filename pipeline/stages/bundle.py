"""Stage ``bundle``: the device bundle, ``bundle/`` and ``bundle.tar.gz`` (the writer: :mod:`pipeline.device.bundle`):
the model, the preprocessing record, sample inputs with the host's outputs, and the Pi script."""
from __future__ import annotations

from pathlib import Path


def bundle(work: Path, tflite, preprocessing: dict, inputs, *, model_spec: str):
    """``preprocessing``: the report's preprocessing record (with the TFLite input layout)."""
    from pipeline.device.bundle import write_bundle
    from pipeline.device.firmware import FIRMWARE_DIR
    return write_bundle(work, tflite.path, tflite.input_layout, preprocessing, inputs.raw_test, inputs.x_test,
                        inputs.labels, model_spec=model_spec, target=inputs.target.name,
                        class_names=inputs.dataset.class_names,
                        firmware=FIRMWARE_DIR if inputs.target.is_micro else None)
