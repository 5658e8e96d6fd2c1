"""Stage ``sanity``: is the FP32 reference itself sane? FP32 top-1 above chance (a gate, first in the report)
and the preprocessing probe (:mod:`pipeline.reliability.sanity`). A broken FP32 model makes every int8 figure moot."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.report import Gate


@dataclass(frozen=True)
class SanityCheck:
    gate: Gate  # fp32_above_chance
    probe: dict  # FP32 top-1 under the preprocessing in use and the usual alternatives
    weights_missing: bool  # a factory built without --weights: random initialisation

    def warnings(self) -> list[str]:
        from pipeline.reliability.sanity import suggestion
        out = []
        if self.weights_missing:
            out.append("the factory was built without --weights: its weights are a random initialisation")
        if self.gate.passed and self.probe.get("better"):
            out.append("another preprocessing is clearly better: " + suggestion(self.probe["better"]))
        return out


def sanity(inputs, ran, cmp, *, batch_size: int, weights_given: bool) -> SanityCheck:
    """``inputs``: prepare's Inputs; ``ran``: RunOutputs (its FP32 model and logits are the probe's 'in use'
    row); ``cmp``: the compare stage's Comparison."""
    from pipeline.inputs import models
    from pipeline.reliability import sanity as checks
    probe = checks.probe(lambda x: models.run_fp32(ran.fp32_model, x, batch_size=batch_size), inputs.raw_test,
                         inputs.labels, inputs.pre, inputs.model.mean, inputs.model.std,
                         train_stats=checks.train_statistics(inputs.dataset.x_train, inputs.pre.scale),
                         n=checks.probe_images(int(inputs.x_test[0].size)), in_use_logits=ran.fp32)
    weights_missing = inputs.model.kind == "factory" and not weights_given
    gate = checks.fp32_gate(cmp.fp32_top1, inputs.labels, probe, weights_missing)
    return SanityCheck(gate=gate, probe=probe, weights_missing=weights_missing)
