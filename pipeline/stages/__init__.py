"""The export's stages, one module per stage, each named as the stage is named in report.json ``timings_s``.

Each stage is a function from typed inputs to a frozen artifact; ``pipeline/export.py`` holds the literal line
that calls them in order (:func:`pipeline.export.line`) and :class:`pipeline.stages.runner.Steps` times each.

    prepare      model, data, preprocessing record, representative dataset      -> Inputs
    export_onnx  PyTorch -> ONNX (dynamic batch), checked against PyTorch         -> OnnxArtifact
    convert      ONNX -> TFLite at the target's precision, calibrated             -> TfliteArtifact
    inspect      flatbuffer: ops, dtypes, quantization; the precision contract    -> TfliteInspection
    run          the TFLite model on the target's LiteRT kernels, FP32 alongside   -> RunOutputs
    micro        TFLite-Micro targets: arena, flash, TFLM vs LiteRT               -> MicroResult | None
    compare      top-1, drop, agreement, errors in output steps                   -> Comparison
    debug_layers --debug-layers or a failed accuracy gate: error per layer        -> dict | None
    recover      --recover and a failed accuracy gate: repair, convert again      -> Recovery | None
    sanity       FP32 above chance; the preprocessing probe                        -> SanityCheck
    latency      LiteRT targets: batch-1 host latency                              -> dict | None
    report       the typed Report with its gates                                   -> Report
    bundle       the device bundle (bundle/, bundle.tar.gz)                        -> BundleArtifact
    firmware     TFLite-Micro targets: the firmware package (firmware/, .zip)     -> FirmwareArtifact | None
    emulate      --emulate DEVICE: the bundle's check on an emulated Arm CPU      -> EmulationResult | None
    reliability  --reliability: calibration drift, flips, shifts and two gates     -> ReliabilityResult | None
    write        report.json, report.html, predictions.npz                        -> None
"""
