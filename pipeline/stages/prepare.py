"""Stage ``prepare``: load and check the model, the data, the preprocessing record and the representative
dataset, before anything is converted. Every bad input of these ends here, as one UsageError/DataError line."""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import UsageError
from pipeline.inputs.preprocessing import Preprocessing


@dataclass(frozen=True)
class Inputs:
    """What every later stage reads: the resolved target, model, data and representative dataset."""

    target: object  # targets.Target
    model: object  # models.LoadedModel
    dataset: object  # data.Dataset
    pre: Preprocessing
    calib: object  # calib_data's CalibSet: the representative dataset
    x_test: np.ndarray  # the evaluated test images, preprocessed: float32 N×C×H×W
    progress: bool  # progress bars on (a terminal, not -v)

    @property
    def n(self) -> int:
        return len(self.x_test)

    @property
    def labels(self) -> np.ndarray:
        return self.dataset.y_test[: self.n]

    @property
    def raw_test(self) -> np.ndarray:
        return self.dataset.x_test[: self.n]


def prepare(cfg, log=print) -> Inputs:
    """``cfg``: the export's ExportConfig."""
    from pipeline.calib_data import CalibContext, build
    from pipeline.inputs import data as data_mod
    from pipeline.inputs import models
    from pipeline.inputs import preprocessing
    from pipeline.export import export_target
    target = export_target(cfg)  # with --ram/--flash/--target-file: the user's; --per-tensor applied
    if cfg.calib_size is not None and cfg.calib_size <= 0:
        raise UsageError(f"--calib-size {cfg.calib_size} gives an empty representative dataset; pass at least 1 "
                         "(100-500 recommended)")
    if cfg.batch_size <= 0:
        raise UsageError("--batch-size must be at least 1")
    model = models.load(cfg.model, cfg.weights)
    ds = data_mod.load(cfg.data, cfg.data_dir, cfg.input_shape or model.input_shape)
    if cfg.input_shape and model.input_shape and tuple(cfg.input_shape) != tuple(model.input_shape):
        raise UsageError(f"--input-shape {','.join(map(str, cfg.input_shape))} does not fit {model.spec}, which "
                         f"takes {','.join(map(str, model.input_shape))}; drop --input-shape or fix it")
    input_shape = tuple(cfg.input_shape or model.input_shape or ds.sample_shape)
    num_classes = models.probe(model, input_shape)
    if model.num_classes is None:
        model.num_classes = num_classes
    if model.extra.get("outputs_returned", 1) > 1:
        log(f"warning: {model.spec} returns {model.extra['outputs_returned']} outputs; the first is taken as the "
            "logits and only it is exported and compared (return one tensor to silence this)", file=sys.stderr)
    if cfg.class_names is not None:  # --class-names: over the data's own names
        ds = ds.with_class_names(cfg.class_names, "--class-names")
    data_mod.check_fits(ds, input_shape, num_classes)
    ds = data_mod.check_class_count(ds, num_classes)
    if cfg.reliability is not None:  # the validation split and the corruption suite must fit the data: say so now
        from pipeline.reliability.corruptions import check_corruptible
        from pipeline.reliability.suite import resolve_val_size
        resolve_val_size(cfg.reliability.val_size, len(ds.y_train))
        if cfg.reliability.corruptions:
            check_corruptible(input_shape)
    mean = preprocessing.per_channel(cfg.mean if cfg.mean is not None else model.mean, input_shape[0], 0.0, "mean")
    std = preprocessing.per_channel(cfg.std if cfg.std is not None else model.std, input_shape[0], 1.0, "std")
    if any(s <= 0 for s in std):
        raise UsageError("--std values must be positive")
    pre = Preprocessing(
        input_shape=input_shape, source_layout=ds.source_layout, source_dtype=ds.source_dtype,
        scale=ds.scale, mean=mean, std=std,
        raw_range=(0.0, 255.0) if ds.source_dtype == "uint8" else (float(ds.x_train.min()), float(ds.x_train.max())),
    )
    ctx = CalibContext(x_train=ds.x_train, y_train=ds.y_train, preprocessing=pre, dataset_name=ds.name,
                       cache_dir=Path(cfg.calib_cache).expanduser() if cfg.calib_cache else None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        calib = build(cfg.calib, ctx, cfg.calib_size, cfg.seed)
    for w in caught:
        log(f"warning: {w.message}", file=sys.stderr)
    if len(calib) < target.min_calibration_samples and not caught:
        log(f"warning: {len(calib)} calibration samples is below the target's minimum of "
            f"{target.min_calibration_samples}", file=sys.stderr)
    n_eval = len(ds.x_test) if cfg.eval_limit is None else min(cfg.eval_limit, len(ds.x_test))
    if n_eval <= 0:
        raise UsageError("--eval-limit must be at least 1")
    x_test = preprocessing.apply(ds.x_test[:n_eval], pre)
    np.random.seed(cfg.seed)
    return Inputs(target=target, model=model, dataset=ds, pre=pre, calib=calib, x_test=x_test,
                  progress=not cfg.verbose and sys.stderr.isatty())
