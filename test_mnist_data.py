"""Tests of examples/mnist_data.py: IDX parsing, npz/folder loading, and the
checked, cached download against a local http.server (no real network)."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import importlib
import importlib.util
import struct
import threading
from pathlib import Path

import numpy as np
import pytest


def _mnist_module():
    path = Path(__file__).resolve().parent / "examples" / "mnist_data.py"
    spec = importlib.util.spec_from_file_location("mnist_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mnist_data = _mnist_module()


def _mnist_idx(a: np.ndarray) -> bytes:
    """IDX bytes of a uint8 array: 00 00 08 ndim, big-endian sizes, payload."""
    return bytes([0, 0, 8, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


def _mnist_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, 5, dtype=np.uint8),
        "x_test": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, 3, dtype=np.uint8),
    }


def _mnist_write_folder(folder: Path, arrays: dict[str, np.ndarray], gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for key, base in mnist_data.FILES.items():
        raw = _mnist_idx(arrays[key])
        if gz:
            (folder / f"{base}.gz").write_bytes(gzip.compress(raw, mtime=0))
        else:
            (folder / base).write_bytes(raw)


def _mnist_md5s(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.glob("*.gz")}


def _mnist_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for key in want:
        assert got[key].dtype == np.uint8
        np.testing.assert_array_equal(got[key], want[key])


class _MnistHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def _mnist_server(tmp_path):
    """Serve tmp_path/www on 127.0.0.1; yields (base_url, www folder, request paths)."""
    www = tmp_path / "www"
    www.mkdir()
    requests: list[str] = []

    class Handler(_MnistHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            super().do_GET()

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(www))
    )
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/mnist/", www, requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_mnist_download_parse_checksum_and_cache_reuse(_mnist_server, tmp_path):
    url, www, requests = _mnist_server
    arrays = _mnist_arrays()
    _mnist_write_folder(www / "mnist", arrays, gz=True)
    md5 = _mnist_md5s(www / "mnist")
    cache = tmp_path / "cache"
    got = mnist_data.load_mnist(None, cache=cache, base_url=url, md5=md5)
    _mnist_equal(got, arrays)
    assert sorted(requests) == sorted(f"/mnist/{n}" for n in md5)
    assert sorted(p.name for p in cache.iterdir()) == sorted(md5)  # no temp files left
    again = mnist_data.load_mnist(None, cache=cache, base_url=url, md5=md5)
    _mnist_equal(again, arrays)
    assert len(requests) == 4  # second call: all from the cache


def test_mnist_cache_dir_from_env(_mnist_server, tmp_path, monkeypatch):
    url, www, _ = _mnist_server
    _mnist_write_folder(www / "mnist", _mnist_arrays(1), gz=True)
    monkeypatch.setenv("DLFS_DATA", str(tmp_path / "envcache"))
    assert mnist_data.cache_dir() == tmp_path / "envcache" / "mnist"
    mnist_data.load_mnist(None, base_url=url, md5=_mnist_md5s(www / "mnist"))
    assert len(list((tmp_path / "envcache" / "mnist").glob("*.gz"))) == 4


def test_mnist_corrupt_download_is_not_cached(_mnist_server, tmp_path):
    url, www, _ = _mnist_server
    _mnist_write_folder(www / "mnist", _mnist_arrays(), gz=True)
    md5 = _mnist_md5s(www / "mnist")
    bad = www / "mnist" / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:-10])  # truncated in transit
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"checksum mismatch.*t10k-images.*not cached"):
        mnist_data.load_mnist(None, cache=cache, base_url=url, md5=md5)
    assert not (cache / bad.name).exists()
    assert not [p for p in cache.iterdir() if p.name.endswith(".part")]
    # the real published checksums never match the tiny files either
    with pytest.raises(ValueError, match="checksum mismatch"):
        mnist_data.download_mnist(tmp_path / "cache2", base_url=url)
    assert list((tmp_path / "cache2").iterdir()) == []


def test_mnist_damaged_cache_file_is_downloaded_again(_mnist_server, tmp_path):
    url, www, requests = _mnist_server
    arrays = _mnist_arrays()
    _mnist_write_folder(www / "mnist", arrays, gz=True)
    md5 = _mnist_md5s(www / "mnist")
    cache = tmp_path / "cache"
    mnist_data.download_mnist(cache, base_url=url, md5=md5)
    (cache / "train-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    _mnist_equal(mnist_data.load_mnist(None, cache=cache, base_url=url, md5=md5), arrays)
    assert requests.count("/mnist/train-labels-idx1-ubyte.gz") == 2
    assert len(requests) == 5


def test_mnist_unreachable_mirror_falls_back_then_errors(_mnist_server, tmp_path):
    url, www, _ = _mnist_server
    arrays = _mnist_arrays()
    _mnist_write_folder(www / "mnist", arrays, gz=True)
    md5 = _mnist_md5s(www / "mnist")
    missing = url.replace("/mnist/", "/nothing-here/")
    got = mnist_data.load_mnist(None, cache=tmp_path / "c1", base_url=[missing, url], md5=md5)
    _mnist_equal(got, arrays)
    with pytest.raises(OSError, match="could not download train-images"):
        mnist_data.download_mnist(tmp_path / "c2", base_url=missing, md5=md5)
    assert list((tmp_path / "c2").iterdir()) == []


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_folder(tmp_path, gz):
    arrays = _mnist_arrays(2)
    _mnist_write_folder(tmp_path / "idx", arrays, gz=gz)
    _mnist_equal(mnist_data.load_mnist(tmp_path / "idx"), arrays)
    _mnist_equal(mnist_data.load_mnist(str(tmp_path / "idx")), arrays)


def test_mnist_idx_folder_missing_file(tmp_path):
    _mnist_write_folder(tmp_path / "idx", _mnist_arrays(), gz=False)
    (tmp_path / "idx" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        mnist_data.load_mnist(tmp_path / "idx")
    with pytest.raises(FileNotFoundError, match="not found"):
        mnist_data.load_mnist(tmp_path / "nope.npz")


def test_mnist_npz(tmp_path):
    arrays = _mnist_arrays(3)
    np.savez(tmp_path / "m.npz", **arrays)
    _mnist_equal(mnist_data.load_mnist(tmp_path / "m.npz"), arrays)
    np.savez(tmp_path / "bad.npz", **{k: v for k, v in arrays.items() if k != "y_test"})
    with pytest.raises(ValueError, match=r"missing arrays.*y_test"):
        mnist_data.load_mnist(tmp_path / "bad.npz")
    np.savez(tmp_path / "short.npz", **{**arrays, "y_train": arrays["y_train"][:2]})
    with pytest.raises(ValueError, match="y_train must have shape"):
        mnist_data.load_mnist(tmp_path / "short.npz")
    np.savez(tmp_path / "float.npz", **{**arrays, "x_test": arrays["x_test"] / 255.0})
    with pytest.raises(TypeError, match="x_test must be uint8"):
        mnist_data.load_mnist(tmp_path / "float.npz")


def test_mnist_parse_idx_validates_header_and_length():
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw = _mnist_idx(a)
    np.testing.assert_array_equal(mnist_data.parse_idx(raw), a)
    with pytest.raises(ValueError, match="payload truncated"):
        mnist_data.parse_idx(raw[:-1], "imgs")
    with pytest.raises(ValueError, match="trailing bytes"):
        mnist_data.parse_idx(raw + b"\0")
    with pytest.raises(ValueError, match="truncated IDX header"):
        mnist_data.parse_idx(raw[:9])
    with pytest.raises(ValueError, match="not an IDX file"):
        mnist_data.parse_idx(b"\x1f\x8b" + raw[2:])
    with pytest.raises(ValueError, match="unknown IDX data type"):
        mnist_data.parse_idx(b"\0\0\x07" + raw[3:])
    with pytest.raises(ValueError, match="0 dimensions"):
        mnist_data.parse_idx(b"\0\0\x08\0")
    big = np.array([1, -2, 300], dtype=">i4")
    got = mnist_data.parse_idx(b"\0\0\x0c\x01" + struct.pack(">I", 3) + big.tobytes())
    np.testing.assert_array_equal(got, [1, -2, 300])
    assert got.dtype == np.int32 and got.dtype.isnative


def test_mnist_truncated_idx_file_in_folder(tmp_path):
    _mnist_write_folder(tmp_path / "plain", _mnist_arrays(), gz=False)
    f = tmp_path / "plain" / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"train-images.*payload truncated"):
        mnist_data.load_mnist(tmp_path / "plain")
    _mnist_write_folder(tmp_path / "gz", _mnist_arrays(), gz=True)
    g = tmp_path / "gz" / "train-labels-idx1-ubyte.gz"
    g.write_bytes(g.read_bytes()[:-12])  # cut into the gzip stream
    with pytest.raises(ValueError, match=r"train-labels.*(truncated|corrupt)"):
        mnist_data.load_mnist(tmp_path / "gz")


def test_mnist_prepare():
    arrays = _mnist_arrays(4)
    x_train, y_train, x_test, y_test = mnist_data.prepare(arrays)
    assert x_train.shape == (5, 784) and x_train.dtype == np.float32
    assert x_test.shape == (3, 784) and x_test.min() >= 0.0 and x_test.max() <= 1.0
    assert y_train.dtype == np.int64 and y_test.dtype == np.int64
    np.testing.assert_array_equal(y_test, arrays["y_test"])
    np.testing.assert_allclose(x_train[0], arrays["x_train"][0].ravel() / 255.0, rtol=1e-6)
    images = mnist_data.prepare(arrays, flatten=False, standardize=True)[0]
    assert images.shape == (5, 1, 28, 28) and images.dtype == np.float32
    np.testing.assert_allclose(
        images[0, 0], (arrays["x_train"][0] / 255.0 - 0.1307) / 0.3081, rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="images must be uint8"):
        mnist_data.images_to_float(np.zeros((2, 4, 4), dtype=np.float32))


@pytest.mark.parametrize("preset", ["default", "tutorial"])
def test_mnist_mlp_example_smoke(tmp_path, monkeypatch, capsys, preset):
    """The example runs end to end on a tiny generated npz and prints key=value lines."""
    rng = np.random.default_rng(5)
    arrays = {
        "x_train": rng.integers(0, 256, (40, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, 40, dtype=np.uint8),
        "x_test": rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, 10, dtype=np.uint8),
    }
    np.savez(tmp_path / "tiny.npz", **arrays)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent / "examples"))
    mnist_mlp = importlib.import_module("mnist_mlp")
    args = ["--data", str(tmp_path / "tiny.npz"), "--epochs", "2", "--val-size", "8"]
    result = mnist_mlp.main([*args, "--preset", preset])
    out = capsys.readouterr().out
    assert f"test_acc={result['test_acc']:.4f}" in out
    assert f"epochs={result['epochs']}" in out and "train_s=" in out
    assert 0.0 <= result["test_acc"] <= 1.0 and 1 <= result["epochs"] <= 2
