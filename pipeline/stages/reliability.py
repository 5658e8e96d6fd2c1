"""Stage ``reliability`` (``--reliability``): calibration drift, temperature scaling, flips, per-class drops and
the corruption suite, with two more gates (:mod:`pipeline.reliability.suite`). It reuses the run stage's clean-test
logits, so the clean figures are the ones in predictions.npz."""
from __future__ import annotations

from pathlib import Path


def reliability(rcfg, inputs, tflite, ran, *, model_spec: str, weights: str | None, batch_size: int,
                fp32_onnx: Path | None, progress: bool):
    """``rcfg``: ReliabilityConfig; ``fp32_onnx``: model.onnx when the FP32 side runs on onnxruntime."""
    from pipeline.evaluate import held_out_from_training
    from pipeline.reliability.engine import ModelPair
    from pipeline.reliability.suite import evaluate, held_out_split
    pair = ModelPair(model_spec=model_spec, weights=weights, tflite_path=str(Path(tflite.path).resolve()),
                     input_layout=tflite.input_layout, kernels=inputs.target.run_kernels, preprocessing=inputs.pre,
                     batch_size=batch_size, fp32_onnx=str(fp32_onnx.resolve()) if fp32_onnx else None)
    return evaluate(pair, inputs.dataset, inputs.n, rcfg, clean={"fp32": ran.fp32, "int8": ran.tflite.outputs},
                    loaded_model=inputs.model, held_out_from_training=held_out_from_training(inputs.model),
                    clean_from_fp32_onnx=fp32_onnx is not None, held_out=held_out_split(weights, inputs.dataset),
                    runtime_note="clean-test logits from the run stage (the arrays in predictions.npz)",
                    progress=progress)


def attach(report, result) -> None:
    """The reliability sections and gates into the export's report."""
    if result is None:
        return
    report.sections.update(result.sections)
    report.gates.update(result.gates)
