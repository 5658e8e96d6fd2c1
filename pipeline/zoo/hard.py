"""Hard cases for README "When int8 hurts": zoo architectures fine-tuned so that int8 really hurts them.

The zoo's own models all quantize well (drops of a few tenths of a point, even with per-tensor weights), so the
layer-wise debugger and the recovery tools are built and tested on models where int8 fails for the reasons the
literature names. Each is the zoo model of the same architecture, fine-tuned from its shipped weights with the
recipe in ``benchmarks/hard_cases.py`` (seeded; the record beside the weights says how it was made). Nothing is
edited by hand in the weights or at export: the pathology comes out of training.

- ``mobilenetv2-deadch``: zoo:mobilenetv2 fine-tuned with a learning-rate spike (AdamW at 0.05 for 150 steps,
  then 150 steps at 1e-3). The spike kills ReLU6 channels; a depthwise conv behind a dead channel sees a constant
  input, its BatchNorm running variance decays to ~0, and folding BN multiplies that channel's weights by up to
  1/sqrt(eps), about 300x: the depthwise weight ranges then spread 200-600x, as in ImageNet MobileNetV2
  (Nagel et al. 2019, Fig. 2). With per-channel weights int8 is fine; with one scale per tensor (``--per-tensor``)
  the small channels round to zero and the model collapses.
"""
from __future__ import annotations

from pipeline.zoo import FASHION_MNIST, register_model
from pipeline.zoo.mobilenetv2 import MobileNetV2

register_model(
    "mobilenetv2-deadch",
    **FASHION_MNIST,
    description="hard case: zoo:mobilenetv2 fine-tuned with a learning-rate spike (dead ReLU6 channels, depthwise "
                "weight ranges 200-600x apart after BN folding)",
    hard_case="per-tensor weights: dead channels leave depthwise weight ranges hundreds of times apart",
)(MobileNetV2)
