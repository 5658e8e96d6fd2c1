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
- ``refcnn-massive``: zoo:refcnn fine-tuned with a loss term that rewards four channels of its last conv block
  for a large BatchNorm shift (the term is minus the mean of those four shifts; Adam moves them about 1.5 per
  step for 600 steps), while the rest of the network and the classifier keep learning the task, then 300 more
  steps with those shifts held. The four channels become "massive activations" (Sun et al. 2024; the high
  biases of Nagel et al. 2019, section 4.1.2): nearly constant, hundreds of times the other channels' maxima.
  One int8 scale per activation tensor must then cover them, and the other channels' values fall below half a
  step: the default (per-channel weights) int8 model collapses. Bias absorption moves the constant part into
  the classifier's bias, which is exact here (global pooling and a linear layer follow, no padding).
"""
from __future__ import annotations

from pipeline.zoo import FASHION_MNIST, register_model
from pipeline.zoo.mobilenetv2 import MobileNetV2
from pipeline.zoo.refcnn import RefCNN

register_model(
    "mobilenetv2-deadch",
    **FASHION_MNIST,
    description="hard case: zoo:mobilenetv2 fine-tuned with a learning-rate spike (dead ReLU6 channels, depthwise "
                "weight ranges 200-600x apart after BN folding)",
    hard_case="per-tensor weights: dead channels leave depthwise weight ranges hundreds of times apart",
)(MobileNetV2)


@register_model(
    "refcnn-massive",
    **FASHION_MNIST,
    description="hard case: zoo:refcnn fine-tuned so four channels of its last block carry massive, nearly "
                "constant activations (hundreds of times the others)",
    hard_case="activations: four massive channels set one activation tensor's int8 step for all its channels",
)
def refcnn_massive():
    return RefCNN(in_channels=1, num_classes=10, width=32)
