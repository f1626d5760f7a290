"""MNIST loading for the dlfs examples: npz, IDX files, or a checked download.

    from mnist_data import load_mnist, prepare
    data = load_mnist(None)          # download once to $DLFS_DATA or ~/.cache/dlfs
    data = load_mnist("mnist.npz")   # x_train, y_train, x_test, y_test
    data = load_mnist("idx_folder")  # the four standard IDX files, .gz or not
    x_train, y_train, x_test, y_test = prepare(data)  # float32 (N, 784) in [0, 1], int64

``load_mnist`` returns uint8 arrays ``x_train (60000, 28, 28)``, ``y_train
(60000,)``, ``x_test (10000, 28, 28)``, ``y_test (10000,)``.  Downloads go to
a temporary file in the cache folder and are moved into place only after
their md5 checksum matches, so a corrupt or truncated download is never
cached.  Standard library and numpy only.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

# Mirrors of the original files (yann.lecun.com often refuses downloads); tried in order.
BASE_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MIRRORS = (BASE_URL, "https://storage.googleapis.com/cvdf-datasets/mnist/")

#: array name -> standard IDX file name (without ``.gz``)
FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}

#: published md5 checksums of the four ``.gz`` files
MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}

KEYS = tuple(FILES)

# IDX type byte -> big-endian numpy dtype
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


# ------------------------------------------------------------------ IDX format


def parse_idx(raw: bytes, name: str = "IDX data") -> np.ndarray:
    """Decode one IDX file (already un-gzipped): magic ``00 00 type ndim``,
    ``ndim`` big-endian uint32 sizes, then exactly prod(sizes) items.

    Raises ValueError naming ``name`` on a bad magic number, an unknown type,
    zero dimensions, or a payload that is shorter (truncated) or longer than
    the header says.  Returns a native-endian array of shape ``sizes``.
    """
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise TypeError(f"raw must be bytes, got {type(raw).__name__}")
    raw = bytes(raw)
    if len(raw) < 4:
        raise ValueError(f"{name}: truncated IDX header ({len(raw)} bytes, need at least 4)")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"{name}: not an IDX file (magic number starts with {raw[:2].hex()}, expected 0000)"
        )
    dtype = _IDX_DTYPES.get(raw[2])
    if dtype is None:
        raise ValueError(f"{name}: unknown IDX data type 0x{raw[2]:02x}")
    ndim = raw[3]
    if ndim == 0:
        raise ValueError(f"{name}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(
            f"{name}: truncated IDX header ({len(raw)} bytes, need {header} for {ndim} dims)"
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - header
    if got != expected:
        what = "truncated" if got < expected else "has trailing bytes"
        raise ValueError(
            f"{name}: IDX payload {what}: header says shape {shape} ({expected} bytes), "
            f"got {got} bytes"
        )
    return (
        np.frombuffer(raw, dtype=dtype, offset=header)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file, gzipped (detected by its magic bytes) or plain."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, gzip.BadGzipFile) as err:
            raise ValueError(f"{path}: corrupt or truncated gzip file ({err})") from None
    return parse_idx(raw, str(path))


def _find_idx(folder: Path, base: str) -> Path:
    # Also accept the common variant with a dot (train-images.idx3-ubyte).
    dotted = base.replace("-idx", ".idx")
    for stem in (base, dotted):
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"{folder}: no {base} or {base}.gz found")


def load_idx_folder(folder: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The four standard IDX files (each optionally ``.gz``) from ``folder``."""
    folder = Path(folder)
    return _check_mnist({k: read_idx(_find_idx(folder, base)) for k, base in FILES.items()}, folder)


def load_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """``x_train, y_train, x_test, y_test`` from an ``.npz`` (loaded without pickle)."""
    # Open the file ourselves: np.load(path) leaks its handle when a damaged zip fails.
    with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
        missing = [k for k in KEYS if k not in z.files]
        if missing:
            raise ValueError(f"{path}: missing arrays {missing}; it has {sorted(z.files)}")
        return _check_mnist({k: z[k] for k in KEYS}, path)


def _check_mnist(data: Mapping[str, np.ndarray], source: object) -> dict[str, np.ndarray]:
    """Shapes (N, H, W) / (N,), uint8 images, matching lengths, labels in 0..9 (as uint8)."""
    out = {}
    for split in ("train", "test"):
        x, y = np.asarray(data[f"x_{split}"]), np.asarray(data[f"y_{split}"])
        if x.ndim != 3:
            raise ValueError(f"{source}: x_{split} must have shape (N, H, W), got {x.shape}")
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(
                f"{source}: y_{split} must have shape ({len(x)},) to match x_{split}, got {y.shape}"
            )
        if x.dtype != np.uint8:
            raise TypeError(f"{source}: x_{split} must be uint8, got dtype {x.dtype}")
        if not np.issubdtype(y.dtype, np.integer):
            raise TypeError(f"{source}: y_{split} must be integer labels, got dtype {y.dtype}")
        if y.size and (y.min() < 0 or y.max() > 9):
            raise ValueError(
                f"{source}: y_{split} labels must be in 0..9, got {y.min()}..{y.max()}"
            )
        out[f"x_{split}"], out[f"y_{split}"] = x, y.astype(np.uint8, copy=False)
    if out["x_train"].shape[1:] != out["x_test"].shape[1:]:
        raise ValueError(
            f"{source}: train and test images differ in size: "
            f"{out['x_train'].shape[1:]} vs {out['x_test'].shape[1:]}"
        )
    return out


# ------------------------------------------------------------------ download


def cache_dir() -> Path:
    """``$DLFS_DATA/mnist`` if set, else ``~/.cache/dlfs/mnist``."""
    root = os.environ.get("DLFS_DATA") or Path.home() / ".cache" / "dlfs"
    return Path(root) / "mnist"


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch(url: str, dest: Path, md5: str, timeout: float) -> None:
    """Stream ``url`` into a temp file next to ``dest``; move it to ``dest``
    only when its md5 is ``md5``.  Nothing is left behind on failure."""
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        h = hashlib.md5()
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as r:
            for chunk in iter(lambda: r.read(1 << 16), b""):
                h.update(chunk)
                f.write(chunk)
        if h.hexdigest() != md5:
            raise ValueError(
                f"checksum mismatch for {url}: expected md5 {md5}, got {h.hexdigest()} "
                f"({tmp.stat().st_size} bytes); the file was not cached"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def download_mnist(
    cache: str | os.PathLike[str] | None = None,
    *,
    base_url: str | Sequence[str] = MIRRORS,
    md5: Mapping[str, str] = MD5,
    timeout: float = 60.0,
) -> Path:
    """Make sure the four ``.gz`` files are in ``cache`` (default ``cache_dir()``)
    with the given md5 checksums, downloading missing or damaged ones from
    ``base_url`` (a URL prefix, or several tried in order).  Returns the folder.

    Raises ValueError on a checksum mismatch and OSError when no mirror
    answers; in both cases the bad file is not kept.
    """
    folder = Path(cache) if cache is not None else cache_dir()
    urls = [base_url] if isinstance(base_url, str) else list(base_url)
    if not urls:
        raise ValueError("base_url must name at least one URL prefix")
    folder.mkdir(parents=True, exist_ok=True)
    for base in FILES.values():
        name = f"{base}.gz"
        if name not in md5:
            raise ValueError(f"md5 has no checksum for {name}; it has {sorted(md5)}")
        dest = folder / name
        if dest.is_file() and _md5(dest) == md5[name]:
            continue
        errors = []
        for prefix in urls:
            url = prefix.rstrip("/") + "/" + name
            try:
                _fetch(url, dest, md5[name], timeout)
                break
            # URLError/HTTPError/timeouts are OSErrors; IncompleteRead is an HTTPException.
            except (OSError, ValueError, http.client.HTTPException) as err:
                if isinstance(err, urllib.error.HTTPError):
                    err.close()  # an HTTPError holds the open response
                errors.append(err)
        else:
            detail = "; ".join(str(e) for e in errors)
            kind = ValueError if all(isinstance(e, ValueError) for e in errors) else OSError
            raise kind(f"could not download {name} into {folder}: {detail}")
    return folder


def load_mnist(
    data: str | os.PathLike[str] | None,
    *,
    cache: str | os.PathLike[str] | None = None,
    base_url: str | Sequence[str] = MIRRORS,
    md5: Mapping[str, str] = MD5,
) -> dict[str, np.ndarray]:
    """MNIST as uint8 arrays ``x_train (N, 28, 28), y_train (N,), x_test, y_test``.

    ``data`` is an ``.npz`` file, a folder of IDX files, or None to download
    (checked and cached; see ``download_mnist``).
    """
    if data is None:
        return load_idx_folder(download_mnist(cache, base_url=base_url, md5=md5))
    path = Path(data)
    if path.is_dir():
        return load_idx_folder(path)
    if path.is_file():
        return load_npz(path)
    raise FileNotFoundError(f"data must be an .npz file or a folder of IDX files; {path} not found")


# ------------------------------------------------------------- preprocessing

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # pixel statistics of the training set, in [0, 1]


def images_to_float(
    images: np.ndarray, *, flatten: bool = True, standardize: bool = False
) -> np.ndarray:
    """uint8 images (N, H, W) -> float32 (N, H*W) (or (N, 1, H, W) when not
    ``flatten``) scaled to [0, 1]; with ``standardize``, (x - 0.1307) / 0.3081."""
    images = np.asarray(images)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W), got {images.dtype} {images.shape}")
    x = images.astype(np.float32) / np.float32(255.0)
    if standardize:
        x = (x - np.float32(MNIST_MEAN)) / np.float32(MNIST_STD)
    n, h, w = images.shape
    return x.reshape(n, h * w) if flatten else x.reshape(n, 1, h, w)


def prepare(
    data: Mapping[str, np.ndarray], *, flatten: bool = True, standardize: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``load_mnist`` output -> (x_train, y_train, x_test, y_test) with float32
    images (see ``images_to_float``) and int64 labels."""
    return (
        images_to_float(data["x_train"], flatten=flatten, standardize=standardize),
        np.asarray(data["y_train"]).astype(np.int64),
        images_to_float(data["x_test"], flatten=flatten, standardize=standardize),
        np.asarray(data["y_test"]).astype(np.int64),
    )
