"""The architecture benchmark's plumbing: torchvision imports through the shim, the registry builds its models."""
import pytest

torch = pytest.importorskip("torch")


def _bench_installed() -> bool:
    import importlib.util
    return importlib.util.find_spec("torchvision") is not None and importlib.util.find_spec("timm") is not None


pytestmark = pytest.mark.skipif(not _bench_installed(), reason="needs the bench extra: pip install -e '.[bench]'")


def test_shim_imports_torchvision():
    from benchmarks.torchvision_shim import import_timm, import_torchvision
    tv = import_torchvision()
    assert hasattr(tv.models, "resnet18")
    assert hasattr(torch.ops.torchvision, "nms")  # defined by the shim, or by a working extension
    assert import_timm().__version__


def test_registry_builds_30_models_and_two_run():
    from benchmarks import arch_models
    assert len(arch_models.ARCHS) >= 30
    for name in arch_models.ARCHS:
        model = getattr(arch_models, name)()
        assert isinstance(model, torch.nn.Module), name
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    for name in ("mobilenet_v3_small", "mobilevit_xxs"):  # one torchvision, one timm
        with torch.no_grad():
            y = getattr(arch_models, name)()(x)
        assert tuple(y.shape) == (2, arch_models.NUM_CLASSES), name
        assert torch.isfinite(y).all(), name


def test_factories_are_seeded():
    from benchmarks import arch_models
    a, b = arch_models.squeezenet1_1(), arch_models.squeezenet1_1()
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
