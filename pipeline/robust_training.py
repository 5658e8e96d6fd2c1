"""Training for robustness to quantization: three techniques, hooked into :mod:`pipeline.train` by its flags.

- ``--qat``: quantization-aware fine-tuning. The model is traced with ``torch.fx`` and rewritten so that its
  forward pass computes what the deployed int8 TFLite model computes (the scheme of :mod:`pipeline.simulate`,
  whose quantizer functions are reused here): every conv/linear followed by a BatchNorm uses the folded weights
  ``w' = w * g``, ``b' = (b - mean) * g + beta`` (``g = gamma / sqrt(var + eps)``, BatchNorm frozen: running
  statistics fixed, gamma and beta trained), fake-quantized per output channel, symmetric, on [-127, 127]
  (``simulate.quantize_weight``); activations are fake-quantized per tensor, asymmetric, on [-128, 127] with the
  nudged zero point (``simulate.activation_qparams`` and ``simulate.fake_quantize``) at the model input and at the
  output of every conv/linear, add/sub/mul and average pooling, *after* a ReLU/ReLU6 that is its only consumer
  (as TFLite fuses them). Ranges: moving min/max (the first batch's min/max, then an exponential moving average
  with decay ``EMA_DECAY``). Gradients: straight-through estimator (identity inside the range, zero outside).
  The training form shares its Parameters with the plain model, so what is written is the plain float
  state_dict of the zoo architecture; the pipeline exports and calibrates it as usual.
- ``--symreg LAMBDA``: :func:`symmetry_penalty` added to the loss (formula there).
- ``--satnl``: every ``nn.ReLU`` module becomes :class:`SatReLU`, ``clamp(x, 0, alpha)`` with one learned bound
  ``alpha`` per layer (PACT); the deployable factories are ``pipeline.robust_training:satnl_<zoo name>``.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.errors import ModelError
from pipeline.simulate import activation_qparams, fake_quantize, quantize_weight

EMA_DECAY = 0.99  # moving min/max of the activation ranges during QAT
SATNL_INIT_QUANTILE = 0.999  # alpha starts at this quantile of the layer's ReLU output on training images
SATNL_INIT_SAMPLES = 1000


@dataclass(frozen=True)
class RobustOptions:
    """What :mod:`pipeline.train` was asked for; all off: plain training."""

    qat: bool = False
    symreg: float = 0.0
    satnl: bool = False

    @property
    def any(self) -> bool:
        return self.qat or self.symreg > 0 or self.satnl

    def describe(self) -> dict:
        return {"qat": self.qat, "symreg": self.symreg, "satnl": self.satnl}


# --------------------------------------------------------------------------- SymReg


def weight_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The weights of every conv and linear layer (the tensors the converter quantizes per output channel)."""
    return [m.weight for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]


def channel_asymmetry(w: torch.Tensor) -> torch.Tensor:
    """Per output channel c: ``a_c = (max(w_c) + min(w_c)) / max|w_c|`` in [-1, 1] (0: a symmetric range).

    ``|a_c| / 2`` is the share of the symmetric grid [-max|w_c|, max|w_c|] that no weight of channel c uses."""
    flat = w.reshape(w.shape[0], -1)
    hi, lo = flat.amax(1), flat.amin(1)
    amax = torch.maximum(hi, -lo).clamp_min(1e-12)
    return (hi + lo) / amax


def symmetry_penalty(model: nn.Module, lam: float) -> torch.Tensor:
    """``lam * sum_layers mean_c a_c^2`` with ``a_c`` of :func:`channel_asymmetry`.

    Invariant to a positive or negative scale of each channel, so BatchNorm folding (``w * g``) does not change it
    and it pulls on the folded weights the converter quantizes as much as on the raw ones; its gradient reaches
    the channel's largest and smallest weight (subgradient of max/min)."""
    terms = [channel_asymmetry(w).pow(2).mean() for w in weight_tensors(model)]
    return lam * torch.stack(terms).sum() if terms else torch.zeros(())


def asymmetry_stats(model: nn.Module) -> dict:
    """Mean |a_c| and mean wasted share of the weight grid over every channel of every conv/linear layer."""
    weights = weight_tensors(model)
    if not weights:
        return None
    with torch.no_grad():
        a = torch.cat([channel_asymmetry(w.detach()).abs() for w in weights])
    return {"mean_abs_asymmetry": float(a.mean()), "wasted_grid_share": float(a.mean() / 2), "channels": int(a.numel())}


# --------------------------------------------------------------------------- SatNL


class SatReLU(nn.Module):
    """``clamp(x, 0, alpha)`` with a learned bound ``alpha`` (PACT: ``d y / d alpha = 1`` where ``x >= alpha``).

    Training mode computes ``minimum(relu(x), alpha)`` (so alpha gets its gradient); eval mode computes
    ``hardtanh(x, 0, bound)`` with ``bound`` the Python float of alpha taken when the module is put in eval mode or
    loaded, so ``torch.export``/ONNX see a constant clip (ONNX ``Clip``, TFLite MINIMUM/RELU or RELU6)."""

    def __init__(self, alpha: float = 6.0):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))
        self.bound = float(alpha)

    def train(self, mode: bool = True):
        if not mode:
            self.bound = float(self.alpha.detach())
        return super().train(mode)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.bound = float(self.alpha.detach())

    def forward(self, x):
        if self.training:
            return torch.minimum(F.relu(x), self.alpha)
        return F.hardtanh(x, 0.0, self.bound)

    def extra_repr(self) -> str:
        return f"alpha={float(self.alpha.detach()):.4g}"


def to_satnl(model: nn.Module, alpha: float = 6.0) -> nn.Module:
    """Replace every ``nn.ReLU`` module of ``model`` (in place) by a :class:`SatReLU`; returns the model."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.ReLU):
            setattr(model, name, SatReLU(alpha))
        else:
            to_satnl(child, alpha)
    return model


@torch.no_grad()
def init_satnl_bounds(model: nn.Module, x: np.ndarray, quantile: float = SATNL_INIT_QUANTILE) -> dict:
    """Set each SatReLU's alpha to ``quantile`` of its input's positive part on ``x`` (the shipped model's
    activation scale, so fine-tuning starts clipping only the top ``1 - quantile``)."""
    seen: dict[str, float] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, SatReLU):
            def hook(mod, inp, out, name=name):
                v = F.relu(inp[0]).flatten().float()
                v = v[v > 0]
                seen[name] = float(torch.quantile(v[:1_000_000], quantile)) if v.numel() else 1.0
            hooks.append(m.register_forward_hook(hook))
    was = model.training
    model.eval()
    for m in model.modules():  # no clipping while measuring
        if isinstance(m, SatReLU):
            m.bound = float("inf")
    try:
        model(torch.from_numpy(np.asarray(x[:SATNL_INIT_SAMPLES], np.float32)))
    finally:
        for h in hooks:
            h.remove()
    for name, m in model.named_modules():
        if isinstance(m, SatReLU):
            m.alpha.fill_(max(seen.get(name, 6.0), 1e-3))
    model.train(was)
    if not was:
        model.eval()
    return {k: round(v, 4) for k, v in seen.items()}


def satnl_bounds(model: nn.Module) -> dict:
    return {n: round(float(m.alpha.detach()), 4) for n, m in model.named_modules() if isinstance(m, SatReLU)}


def satnl_factory(zoo_name: str):
    """The deployable SatNL form of a zoo model: its architecture with every ReLU module a SatReLU."""
    from pipeline import zoo
    entry = zoo.get_entry(zoo_name)

    def factory() -> nn.Module:
        return to_satnl(entry.factory())
    factory.__name__ = f"satnl_{zoo_name}"
    return factory


def __getattr__(name: str):  # pipeline.robust_training:satnl_refcnn etc., as package.module:factory specs
    if name.startswith("satnl_"):
        from pipeline import zoo
        if name[6:] in zoo.list_models(include_unshipped=True):
            return satnl_factory(name[6:])
    raise AttributeError(name)


# --------------------------------------------------------------------------- QAT


class ActivationFakeQuant(nn.Module):
    """Per-tensor asymmetric int8 fake quantization with moving min/max ranges and a clipped straight-through
    estimator: forward ``fake_quantize(clamp(x, lo_q, hi_q))``, backward 1 inside [lo_q, hi_q], 0 outside."""

    def __init__(self, bits: int = 8, decay: float = EMA_DECAY):
        super().__init__()
        self.bits, self.decay = bits, decay
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("hi", torch.tensor(0.0))
        self.register_buffer("seen", torch.tensor(False))

    def qparams(self):
        return activation_qparams(float(self.lo), float(self.hi), self.bits)

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                lo, hi = x.detach().amin(), x.detach().amax()
                if not bool(self.seen):
                    self.lo.copy_(lo), self.hi.copy_(hi), self.seen.fill_(True)
                else:
                    self.lo.mul_(self.decay).add_((1 - self.decay) * lo)
                    self.hi.mul_(self.decay).add_((1 - self.decay) * hi)
        if not bool(self.seen):
            return x
        qp = self.qparams()
        lo_q, hi_q = (qp.qmin - qp.zero_point) * qp.scale, (qp.qmax - qp.zero_point) * qp.scale
        xc = torch.clamp(x, lo_q, hi_q)
        return xc + (fake_quantize(xc.detach().clone(), qp) - xc).detach()


def fake_quant_weight(w: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Per-output-channel symmetric fake quantization on [-(2^(b-1) - 1), 2^(b-1) - 1] (simulate.quantize_weight),
    straight-through: the scale is max|w_c| / qmax, so no weight is clipped and the gradient is the identity."""
    wq, _ = quantize_weight(w.detach(), bits, per_channel=True)
    return w + (wq.to(w.dtype) - w).detach()


class FoldedQuantLayer(nn.Module):
    """A conv or linear with the BatchNorm after it folded in (frozen statistics) and fake-quantized weights.

    Holds the original modules, so training it trains the plain model's Parameters."""

    def __init__(self, layer: nn.Module, bn: nn.BatchNorm2d | None):
        super().__init__()
        self.layer, self.bn = layer, bn

    def folded(self):
        w = self.layer.weight
        b = self.layer.bias if self.layer.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
        if self.bn is None:
            return w, b
        bn = self.bn
        g = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
        beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        return w * g.reshape((-1,) + (1,) * (w.dim() - 1)), (b - bn.running_mean) * g + beta

    def forward(self, x):
        w, b = self.folded()
        wq = fake_quant_weight(w)
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, wq, b)
        c = self.layer
        return F.conv2d(x, wq, b, c.stride, c.padding, c.dilation, c.groups)


_ACT_MODULES = (nn.ReLU, nn.ReLU6, SatReLU)
_ACT_FUNCTIONS = {F.relu, torch.relu, F.relu6}
_ELEMENTWISE = {operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul, operator.iadd}
_POOL_FUNCTIONS = {F.adaptive_avg_pool2d, F.avg_pool2d, torch.mean}


def _is_activation(gm, node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _ACT_MODULES)
    if node.op == "call_function":
        return node.target in _ACT_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def qat_model(model: nn.Module) -> nn.Module:
    """The training form of ``model`` for QAT (a ``torch.fx.GraphModule`` sharing its Parameters): BN folded and
    frozen, weights and activations fake-quantized as the deployed int8 model is (module docstring)."""
    import torch.fx as fx

    class Tracer(fx.Tracer):  # SatReLU stays one node, recognised as a fusable activation
        def is_leaf_module(self, m, qualname):
            return isinstance(m, SatReLU) or super().is_leaf_module(m, qualname)
    try:
        tracer = Tracer()
        gm = fx.GraphModule(model, tracer.trace(model), type(model).__name__)
    except Exception as e:  # noqa: BLE001 - any tracing failure is the model's
        raise ModelError(f"--qat needs a model torch.fx can trace; {type(model).__name__} cannot be "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    graph = gm.graph
    n_fq = 0

    def insert_fq(after) -> None:
        nonlocal n_fq
        name = f"qat_fq{n_fq}"
        n_fq += 1
        gm.add_submodule(name, ActivationFakeQuant())
        with graph.inserting_after(after):
            q = graph.call_module(name, (after,))
        after.replace_all_uses_with(q, delete_user_cb=lambda u: u is not q)

    points = []
    for node in list(graph.nodes):
        producer = None
        if node.op == "placeholder":
            producer = node
        elif node.op == "call_module":
            m = gm.get_submodule(node.target)
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                users = list(node.users)
                bn = None
                if len(users) == 1 and users[0].op == "call_module" and isinstance(
                        gm.get_submodule(users[0].target), nn.BatchNorm2d):
                    bn_node = users[0]
                    bn = gm.get_submodule(bn_node.target)
                    bn_node.replace_all_uses_with(node)
                    graph.erase_node(bn_node)
                name = f"qat_{node.target.replace('.', '_')}"
                gm.add_submodule(name, FoldedQuantLayer(m, bn))
                node.target = name
                producer = node
            elif isinstance(m, (nn.AdaptiveAvgPool2d, nn.AvgPool2d)):
                producer = node
            elif isinstance(m, _ACT_MODULES):
                producer = node  # an activation no op fused (fused ones are skipped below)
        elif node.op == "call_function" and (node.target in _ELEMENTWISE or node.target in _POOL_FUNCTIONS):
            producer = node
        elif node.op == "call_method" and node.target in ("add", "add_", "mean"):
            producer = node
        if producer is not None:
            points.append(producer)
    fused = set()
    ends = []
    for p in points:
        if p in fused:
            continue
        users = list(p.users)
        end = p
        if p.op != "placeholder" and len(users) == 1 and _is_activation(gm, users[0]):
            end = users[0]
            fused.add(end)
        ends.append(end)
    for end in ends:
        insert_fq(end)
    graph.lint()
    gm.recompile()
    for m in gm.modules():  # BatchNorm frozen: running statistics fixed (eval mode) even while training
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    gm.qat_points = n_fq
    return gm


def freeze_batchnorm(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


# --------------------------------------------------------------------------- the hooks pipeline.train calls


@dataclass
class Prepared:
    """The module to optimise (``train_form``) and the plain module whose state_dict is written (``plain``)."""

    train_form: nn.Module
    plain: nn.Module
    record: dict


def prepare(model: nn.Module, options: RobustOptions, x_train: np.ndarray) -> Prepared:
    """Apply ``options`` to a freshly built (or loaded) ``model`` before its optimizer is made."""
    record: dict = {"options": options.describe()}
    if not options.any:  # plain training: the model as it is
        return Prepared(model, model, record)
    if options.satnl:
        if not any(isinstance(m, SatReLU) for m in model.modules()):
            to_satnl(model)
        record["satnl_initial_bounds"] = init_satnl_bounds(model, x_train)
    record["weights_before"] = asymmetry_stats(model)
    if options.qat:
        gm = qat_model(model)
        record["qat_points"] = gm.qat_points
        return Prepared(gm, model, record)
    return Prepared(model, model, record)


def train_mode(prepared: Prepared) -> None:
    """``model.train()`` for one epoch, with BatchNorm kept frozen under QAT."""
    prepared.train_form.train()
    if prepared.record["options"]["qat"]:
        freeze_batchnorm(prepared.train_form)


def penalty(prepared: Prepared, options: RobustOptions) -> torch.Tensor | float:
    """What to add to the loss (0.0 without --symreg)."""
    return symmetry_penalty(prepared.plain, options.symreg) if options.symreg > 0 else 0.0


def finish(prepared: Prepared) -> tuple[nn.Module, dict]:
    """The plain model to write, and what the record notes about the techniques."""
    rec = dict(prepared.record)
    if not RobustOptions(**rec["options"]).any:
        return prepared.plain.eval(), rec
    rec["weights_after"] = asymmetry_stats(prepared.plain)
    if any(isinstance(m, SatReLU) for m in prepared.plain.modules()):
        rec["satnl_bounds"] = satnl_bounds(prepared.plain)
    if isinstance(prepared.train_form, torch.fx.GraphModule) and prepared.record["options"]["qat"]:
        rec["qat_ranges"] = {n: [round(float(m.lo), 4), round(float(m.hi), 4)]
                             for n, m in prepared.train_form.named_modules() if isinstance(m, ActivationFakeQuant)}
    return prepared.plain.eval(), rec
