"""Running .tflite models on real kernels: LiteRT (XNNPACK, built-in, reference) and TFLite-Micro."""
