"""No conversion touches the network.

onnx2tf 1.28 downloads a sample-image file from GitHub during conversion when the model has a fixed batch of at
most 20 and a 3-channel NHWC input (``download_test_image_data``: a dummy inference it checks ops with), unless
the file lies in the current folder. Conversions therefore run with the network blocked (:func:`block_network`:
in the conversion worker, and as the sitecustomize of the onnx2tf-flatbuffer child) and, for onnx2tf 1.28, in a
temporary folder holding that file made from the export's own representative samples
(:func:`onnx2tf_sample_images`), so the dummy inference sees real inputs and nothing is fetched.
"""
from __future__ import annotations

import socket
from pathlib import Path

import numpy as np

ONNX2TF_SAMPLE_FILE = "calibration_image_sample_data_20x128x128x3_float32.npy"


def block_network(message: str = "network access is blocked during a conversion") -> None:
    """From now on, in this process: name lookups, and IPv4/IPv6 connects and sends, raise OSError(message).
    Local sockets (the worker's pipe to the export) keep working."""
    def refuse(*args, **kwargs):
        raise OSError(message)

    def guard(orig):
        def guarded(self, *args, **kwargs):
            if self.family in (socket.AF_INET, socket.AF_INET6):
                raise OSError(message)
            return orig(self, *args, **kwargs)
        return guarded

    for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "create_connection"):
        setattr(socket, name, refuse)
    for name in ("connect", "connect_ex", "sendto"):
        setattr(socket.socket, name, guard(getattr(socket.socket, name)))


def onnx2tf_sample_images(folder: Path, representative: np.ndarray) -> Path:
    """``folder``/ONNX2TF_SAMPLE_FILE: 20 images of 128×128×3 float32 (the shape onnx2tf 1.28 expects there) taken
    from the representative samples (N×C×H×W, preprocessed), resized by nearest neighbour; channels are repeated
    or cut to 3. onnx2tf only runs them through the model as a dummy inference."""
    x = np.asarray(representative, np.float32)
    idx = np.arange(20) % len(x)
    x = x[idx]
    x = x[:, np.arange(3) % x.shape[1]]  # 3 channels
    rows = (np.arange(128) * x.shape[2]) // 128
    cols = (np.arange(128) * x.shape[3]) // 128
    x = x[:, :, rows][:, :, :, cols]
    out = folder / ONNX2TF_SAMPLE_FILE
    np.save(out, np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1))), allow_pickle=False)
    return out
