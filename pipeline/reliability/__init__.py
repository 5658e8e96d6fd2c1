"""How far the quantized model can be trusted: accuracy metrics, confidence calibration (ECE and temperature
scaling), prediction flips, the corruption suite and shifted sets, the FP32 sanity checks, and the parallel
engine that runs both models over them (``suite.evaluate`` puts them together)."""
