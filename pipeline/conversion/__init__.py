"""Conversion routes: ONNX or PyTorch -> TFLite at a target's precision, each behind the Converter interface."""
