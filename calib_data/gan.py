"""``--calib gan[:default|tiny]``: samples of a class-conditional DCGAN trained here on the training split.

The data-free-at-deployment route of Masouris et al. (arXiv 2305.06052): a GAN trained once on the task's own
training images stands in for them at calibration time. Their GANs are StyleGAN2-ADA and its distilled student
DiStyleGAN on CIFAR-10; ours is the small DCGAN of :mod:`pipeline.gan` (``default``: 2 epochs on the whole training
split, a few minutes on CPU; ``tiny``: 1 epoch on 6000 images at lr 1e-3, for tests and ``--quick`` studies).

- The generator is trained with the calibration ``--seed`` and cached under ``<calib cache>/gan/`` by
  (data, seed, configuration); with ``--calib-cache off`` it is trained in memory every time.
- Sample ``i`` is conditioned on class ``i mod K`` (balanced, as the paper's 500 images per class); its noise is
  drawn from the seed. Generator outputs in [-1, 1] are mapped linearly onto the data's raw range (rounded to whole
  grey levels for uint8 data) and normalised once with :func:`pipeline.inputs.preprocessing.apply`.
- The set itself is cached like every generated set (:mod:`calib_data.cache`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import CalibrationError

from pipeline.calib_data import ArraySource, CalibContext, did_you_mean, finish_raw, generated_size, raw_bounds, register_source
from pipeline.calib_data.cache import cached

VERSION = 1  # bump when the sampling changes (the generator's own version is pipeline.gan.VERSION)


def gan_context(ctx: CalibContext) -> tuple[np.ndarray, int]:
    """(labels as int64, number of classes) of the training split, checked."""
    y = np.asarray(ctx.y_train)
    if len(y) == 0 or len(ctx.x_train) == 0:
        raise CalibrationError("the training split is empty; --calib gan trains its GAN on it")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise CalibrationError("--calib gan needs integer class labels 0..K-1 in the training split")
    return y.astype(np.int64), int(y.max()) + 1


@register_source("gan")
def gan(ctx: CalibContext, size: int | None, seed: int, arg: str | None) -> ArraySource:
    """Class-balanced samples of a class-conditional DCGAN trained on the training split."""
    from pipeline import gan as gan_mod
    size = generated_size(size)
    preset = arg or "default"
    if preset not in gan_mod.PRESETS:
        raise CalibrationError(did_you_mean("GAN preset", preset, gan_mod.PRESETS) + " (--calib gan or gan:tiny)")
    cfg = gan_mod.PRESETS[preset]
    pre = ctx.preprocessing
    spec = "gan" if preset == "default" else f"gan:{preset}"

    def make() -> ArraySource:
        y, k = gan_context(ctx)
        lo, hi = raw_bounds(pre)
        gan_dir = Path(ctx.cache_dir).expanduser() / "gan" if ctx.cache_dir is not None else None
        G, info = gan_mod.trained_generator(ctx.x_train, y, ctx.dataset_name, (lo, hi), seed, cfg, gan_dir)
        labels = gan_mod.conditioned_labels(size, k)
        raw = gan_mod.from_unit(gan_mod.sample(G, labels, seed), (lo, hi)).astype(np.float64)
        return ArraySource(
            name=spec, samples=finish_raw(raw, pre), seed=seed, preprocessing=pre,
            origin=(f"generated: class-conditional DCGAN ({preset} preset) trained here on the {ctx.dataset_name} "
                    f"training split with seed {seed}; sample i conditioned on class i mod {k}"),
            extra={"split": None, "conditioned_on": f"class i mod {k}",
                   "generator": {"version": VERSION, "gan_version": gan_mod.VERSION, "preset": preset,
                                 "config": cfg.to_dict(), "weights": info["cache"], "training": info["training"]}},
        )

    return cached(ctx, spec, size, seed, f"{VERSION}-{gan_mod.VERSION}-{preset}", make)
