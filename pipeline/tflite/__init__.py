"""The .tflite file itself: reading its flatbuffer (ops, tensors, quantization) and its metadata entries."""
