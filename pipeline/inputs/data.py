"""Datasets: Fashion-MNIST from IDX files, or a user's .npz.

Images are kept raw (uint8 or float32) in NCHW order; :mod:`pipeline.inputs.preprocessing`
turns them into model input. The layout the data arrived in is recorded.
"""
from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import DataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_NAMES_SOURCE = "the Fashion-MNIST names"  # built in: a mismatch drops them instead of failing
_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
CLASS_NAMES_KEY = "class_names"  # optional in a user's .npz: a 1-D unicode array, one name per class
MAX_CLASS_NAME_CHARS = 256


@dataclass(frozen=True)
class Dataset:
    """Raw images in NCHW order (uint8 or float32) with integer labels."""

    name: str
    origin: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source_layout: str  # "NHW", "NCHW" or "NHWC"
    class_names: tuple[str, ...] | None = None  # one per class (index order), or None: classes shown by index
    # where the names came from, said in errors and in the report: "--class-names", "the .npz's class_names
    # array", "the Fashion-MNIST names" (built in), or "report.json data.class_names" (pipeline.evaluate)
    class_names_source: str | None = None

    @property
    def source_dtype(self) -> str:
        return "uint8" if self.x_train.dtype == np.uint8 else "float32"

    @property
    def scale(self) -> float:
        return 1.0 / 255.0 if self.x_train.dtype == np.uint8 else 1.0

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.x_train.shape[1:])  # type: ignore[return-value]

    def describe(self) -> dict:
        d = {
            "name": self.name,
            "origin": self.origin,
            "train_size": int(len(self.y_train)),
            "test_size": int(len(self.y_test)),
            "source_layout": self.source_layout,
            "source_dtype": self.source_dtype,
            "sample_shape_chw": list(self.sample_shape),
        }
        if self.class_names is not None:
            d["class_names"] = list(self.class_names)
            d["class_names_source"] = self.class_names_source
        return d

    def with_class_names(self, names, source: str) -> "Dataset":
        """This dataset with ``names`` (checked: :func:`check_class_names`) from ``source``."""
        from dataclasses import replace
        return replace(self, class_names=check_class_names(names, source), class_names_source=source)

    def label(self, c: int) -> str:
        """Class ``c`` as shown to people: its name when known, else its index."""
        names = self.class_names
        return names[c] if names is not None and 0 <= c < len(names) else str(c)


def check_class_names(names, source: str) -> tuple[str, ...]:
    """One name per class, in index order: non-empty, distinct, printable, at most MAX_CLASS_NAME_CHARS characters
    (DataError naming ``source`` otherwise)."""
    fix = "give one distinct, non-empty name per class in index order"
    if isinstance(names, (str, bytes)) or not hasattr(names, "__iter__"):
        raise DataError(f"{source} is {type(names).__name__}, not a list of class names; {fix}")
    out = []
    for i, n in enumerate(names):
        if not isinstance(n, str):
            raise DataError(f"{source}: name {i} is {type(n).__name__}, not text; {fix}")
        n = n.strip()
        if not n:
            raise DataError(f"{source}: name {i} is empty; {fix}")
        if len(n) > MAX_CLASS_NAME_CHARS:
            raise DataError(f"{source}: name {i} has {len(n)} characters (at most {MAX_CLASS_NAME_CHARS}); {fix}")
        if not n.isprintable():
            raise DataError(f"{source}: name {i} ({n!r}) holds control characters; {fix}")
        out.append(n)
    if not out:
        raise DataError(f"{source} holds no names; {fix}")
    seen: dict[str, int] = {}
    for i, n in enumerate(out):
        if n in seen:
            raise DataError(f"{source} names class {seen[n]} and class {i} both {n!r}; {fix}")
        seen[n] = i
    return tuple(out)


def parse_class_names(text: str) -> tuple[str, ...]:
    """``--class-names a,b,...``: comma-separated names (spaces around each dropped), checked."""
    return check_class_names(text.split(","), "--class-names")


def load(spec: str, data_dir: str | None = None, expected_chw: tuple[int, int, int] | None = None) -> Dataset:
    """Load ``fashion-mnist`` or ``path/to/data.npz``."""
    if spec == "fashion-mnist":
        return load_fashion_mnist(Path(data_dir) if data_dir else FASHION_MNIST_DIR)
    if spec.endswith(".npz") or os.path.exists(spec):
        return load_npz(Path(spec), expected_chw)
    raise DataError(
        f"--data {spec!r} is neither 'fashion-mnist' nor an existing .npz file; "
        "pass --data fashion-mnist or --data path/to/data.npz"
    )


# --------------------------------------------------------------------------- IDX

_IDX_NDIM = {"x": 3, "y": 1}  # images N x H x W, labels N


def _read_idx(path: Path, ndim: int | None = None) -> np.ndarray:
    """An unsigned-byte IDX file, its header checked against the file's size and the memory before reading."""
    from pipeline.inputs.safe_arrays import available_memory, human_bytes
    fix = "reinstall dataset-fashion-mnist or pass --data-dir DIR holding the four IDX files"
    gz = path.suffix == ".gz"
    try:
        f = gzip.open(path, "rb") if gz else open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot read IDX file {path} ({e.strerror or e}); {fix}") from None
    try:
        with f:
            head = _read_exactly(f, 4)
            if len(head) < 4 or head[:3] != b"\x00\x00\x08":
                raise DataError(f"{path} is not an unsigned-byte IDX file; pass --data-dir pointing at the "
                                "Fashion-MNIST IDX files")
            nd = head[3]
            if nd == 0 or (ndim is not None and nd != ndim):
                want = f"{ndim}-D" if ndim else "at least 1-D"
                raise DataError(f"{path} declares a {nd}-D array but must hold a {want} one; {fix}")
            raw_dims = _read_exactly(f, 4 * nd)
            if len(raw_dims) < 4 * nd:
                raise DataError(f"{path} is truncated inside its header; {fix}")
            dims = [int.from_bytes(raw_dims[4 * i: 4 * i + 4], "big") for i in range(nd)]
            count = 1
            for d in dims:
                count *= d
            shape = "x".join(map(str, dims))
            if not gz:
                held = os.fstat(f.fileno()).st_size - 4 - 4 * nd
                if held != count:
                    raise DataError(f"{path} declares {shape} bytes ({human_bytes(count)}) but holds "
                                    f"{human_bytes(held)} after its header ({'truncated, or its header is wrong' if held < count else 'more than it declares'}); {fix}")
            if count > available_memory():
                raise DataError(f"{path} declares {shape} bytes ({human_bytes(count)}), more than the "
                                f"{human_bytes(available_memory())} of memory available; {fix}")
            buf = bytearray(count)
            got = f.readinto(memoryview(buf)) if count else 0
            while 0 < got < count:
                n = f.readinto(memoryview(buf)[got:])
                if not n:
                    break
                got += n
            if got < count:
                raise DataError(f"{path} is truncated: its header declares {shape} bytes ({human_bytes(count)}) but "
                                f"only {human_bytes(got)} follow; {fix}")
            if f.read(1):
                raise DataError(f"{path} holds more data than its header declares ({shape}); {fix}")
    except DataError:
        raise
    except (OSError, EOFError, zlib.error) as e:  # a damaged gzip stream
        raise DataError(f"cannot read IDX file {path} ({type(e).__name__}: {e}); {fix}") from None
    return np.frombuffer(buf, dtype=np.uint8).reshape(dims)


def _read_exactly(f, n: int) -> bytes:
    out = b""
    while len(out) < n:
        b = f.read(n - len(out))
        if not b:
            break
        out += b
    return out


def _find_idx(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        p = folder / name
        if p.is_file():
            return p
    raise DataError(
        f"Fashion-MNIST file {stem}[.gz] not found in {folder}; install the Debian package "
        f"dataset-fashion-mnist or pass --data-dir DIR holding the four IDX files"
    )


def load_fashion_mnist(folder: Path) -> Dataset:
    arrays = {key: _read_idx(_find_idx(folder, stem), _IDX_NDIM[key[0]]) for key, stem in _IDX_FILES.items()}
    for split in ("train", "test"):
        if len(arrays[f"x_{split}"]) != len(arrays[f"y_{split}"]):
            raise DataError(f"Fashion-MNIST {split} images and labels differ in count in {folder}; reinstall the dataset")
        if 0 in arrays[f"x_{split}"].shape:
            raise DataError(f"Fashion-MNIST {split} images in {folder} are empty (shape "
                            f"{'x'.join(map(str, arrays[f'x_{split}'].shape))}); reinstall the dataset")
    return Dataset(
        name="fashion-mnist",
        origin=str(folder),
        x_train=arrays["x_train"][:, None, :, :],
        y_train=arrays["y_train"].astype(np.int64),
        x_test=arrays["x_test"][:, None, :, :],
        y_test=arrays["y_test"].astype(np.int64),
        source_layout="NHW",
        class_names=FASHION_MNIST_CLASSES,
        class_names_source=FASHION_MNIST_NAMES_SOURCE,
    )


# --------------------------------------------------------------------------- NPZ

_CHANNEL_COUNTS = (1, 2, 3, 4)


def detect_layout(shape: tuple[int, ...], expected_chw: tuple[int, int, int] | None = None) -> str:
    """Return "NHW", "NCHW" or "NHWC" for an image array's shape."""
    if len(shape) == 3:
        return "NHW"
    if len(shape) != 4:
        raise DataError(f"images have shape {tuple(shape)}; expected N×H×W, N×C×H×W or N×H×W×C")
    if expected_chw is not None:
        c, h, w = expected_chw
        if tuple(shape[1:]) == (c, h, w):
            return "NCHW"
        if tuple(shape[1:]) == (h, w, c):
            return "NHWC"
    first, last = shape[1] in _CHANNEL_COUNTS, shape[3] in _CHANNEL_COUNTS
    if first and not last:
        return "NCHW"
    if last and not first:
        return "NHWC"
    if first and last:  # e.g. 3×3×3: tie-break on the smaller axis being channels
        return "NCHW" if shape[1] <= shape[3] else "NHWC"
    raise DataError(
        f"cannot tell the channel axis of images shaped {tuple(shape)}: neither axis 1 nor axis 3 "
        f"holds 1-4 channels; store images as N×H×W, N×C×H×W or N×H×W×C"
    )


def _to_nchw(x: np.ndarray, layout: str) -> np.ndarray:
    if layout == "NHW":
        return x[:, None, :, :]
    if layout == "NHWC":
        return np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))
    return x


def load_npz(path: Path, expected_chw: tuple[int, int, int] | None = None) -> Dataset:
    from pipeline.inputs.safe_arrays import load_npz as safe_load_npz
    if not path.exists():
        raise DataError(f"data file {path} does not exist; pass --data path/to/data.npz or --data fashion-mnist")
    arrays = safe_load_npz(path, NPZ_KEYS, what=str(path), error=DataError, optional=(CLASS_NAMES_KEY,))
    names = arrays.pop(CLASS_NAMES_KEY, None)
    for k in NPZ_KEYS:
        if arrays[k].dtype == object or arrays[k].dtype.kind not in "biuf":
            raise DataError(f"{path}: array {k} has dtype {arrays[k].dtype}; store numeric arrays")
    xs = {}
    layouts = set()
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim not in (3, 4):
            raise DataError(f"{path}: x_{split} has shape {x.shape}; expected N×H×W, N×C×H×W or N×H×W×C images")
        if 0 in x.shape[1:]:
            raise DataError(f"{path}: x_{split} has shape {x.shape}, images with no pixels; store real images")
        if y.ndim != 1:
            raise DataError(f"{path}: y_{split} has shape {y.shape}; labels must be a 1-D array of class indices")
        if len(x) != len(y):
            raise DataError(f"{path}: x_{split} has {len(x)} images but y_{split} has {len(y)} labels; they must match")
        if len(x) == 0:
            raise DataError(f"{path}: x_{split} is empty; both splits need images")
        if y.dtype.kind == "f":
            if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
                raise DataError(f"{path}: y_{split} holds non-integer labels; store integer class indices")
        if np.any(y < 0):
            raise DataError(f"{path}: y_{split} holds negative labels; labels must be class indices 0..K-1")
        if len(y) and y.max() >= 2 ** 31:
            raise DataError(f"{path}: y_{split} holds labels up to {y.max():.6g}; labels must be class indices 0..K-1")
        if x.dtype.kind == "b":
            raise DataError(f"{path}: x_{split} is a bool array; store images as uint8 (0..255) or float32")
        if x.dtype.kind == "f":
            if not np.all(np.isfinite(x)):
                raise DataError(f"{path}: x_{split} holds NaN or inf; clean the images before exporting")
            x = x.astype(np.float32, copy=False)
        elif x.dtype != np.uint8:
            if x.min() < 0 or x.max() > 255:
                raise DataError(f"{path}: x_{split} is {x.dtype} with values outside 0..255; store uint8 or float32 images")
            x = x.astype(np.uint8)
        layout = detect_layout(x.shape, expected_chw)
        layouts.add(layout)
        xs[split] = _to_nchw(x, layout)
    if len(layouts) != 1:
        raise DataError(f"{path}: x_train and x_test have different layouts ({', '.join(sorted(layouts))}); store both alike")
    if xs["train"].shape[1:] != xs["test"].shape[1:]:
        raise DataError(f"{path}: train images are {xs['train'].shape[1:]} but test images are {xs['test'].shape[1:]}; they must match")
    if xs["train"].dtype != xs["test"].dtype:
        raise DataError(f"{path}: x_train is {xs['train'].dtype} but x_test is {xs['test'].dtype}; store both alike")
    names_source = f"{path}: array {CLASS_NAMES_KEY}"
    return Dataset(
        name=path.stem,
        origin=str(path),
        x_train=xs["train"],
        y_train=arrays["y_train"].astype(np.int64),
        x_test=xs["test"],
        y_test=arrays["y_test"].astype(np.int64),
        source_layout=layouts.pop(),
        class_names=None if names is None else check_class_names([str(v) for v in names.tolist()], names_source),
        class_names_source=None if names is None else names_source,
    )


def check_fits(ds: Dataset, input_chw: tuple[int, int, int], num_classes: int) -> None:
    """Fail clearly when the images or labels do not fit the model."""
    if tuple(ds.sample_shape) != tuple(input_chw):
        got, want = "x".join(map(str, ds.sample_shape)), "x".join(map(str, input_chw))
        if ds.sample_shape[0] != input_chw[0]:
            fix = (f"convert the images to {input_chw[0]} channel{'s' if input_chw[0] != 1 else ''} "
                   f"(e.g. grayscale/RGB) or use a model that takes {ds.sample_shape[0]}")
        else:
            fix = f"resize the images to {input_chw[1]}x{input_chw[2]}, or pass --input-shape if the model takes any size"
        raise DataError(f"images are {got} (C×H×W) but the model takes {want}; {fix}")
    if num_classes < 2:
        raise DataError(f"the model has {num_classes} output per image; classification needs one output per class "
                        "(a binary model with one sigmoid logit z: return torch.cat([torch.zeros_like(z), z], 1), whose "
                        "softmax is [1 - sigmoid(z), sigmoid(z)])")
    for split, y in (("y_train", ds.y_train), ("y_test", ds.y_test)):
        hi = int(y.max()) if len(y) else -1
        if hi >= num_classes:
            raise DataError(f"{ds.name}: {split} labels go up to {hi} but the model has {num_classes} outputs; labels "
                            f"must lie in 0..{num_classes - 1} (pass data labelled for this model, or the model for "
                            "this data)")
    check_class_count(ds, num_classes)


def check_class_count(ds: Dataset, num_classes: int) -> Dataset:
    """The class names must name every class of the model: DataError (exit 2) naming both counts otherwise.
    Returns the dataset, without the built-in Fashion-MNIST names when they do not fit (another model's classes:
    shown by index then)."""
    names = ds.class_names
    if names is None or len(names) == num_classes:
        return ds
    if ds.class_names_source == FASHION_MNIST_NAMES_SOURCE:
        from dataclasses import replace
        return replace(ds, class_names=None, class_names_source=None)
    raise DataError(f"{ds.class_names_source} gives {len(names)} class name{'s' if len(names) != 1 else ''} but the "
                    f"model has {num_classes} classes (outputs); give exactly {num_classes} names, one per class in "
                    "index order")
