"""Property tests for dlfs (GUIDE section 4): layers, losses, network builder,
optimizers, schedules, training, metrics and data utilities.

Hypothesis draws sizes and a seed; arrays are built with numpy from the seed.
Gradients are checked against central differences in float64.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import decimal
import errno
import functools
import gzip
import hashlib
import html.parser
import http.server
import importlib
import importlib.util
import inspect
import io
import json
import math
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import types
import warnings
import zipfile
import zlib
from pathlib import Path

import attrs
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import dlfs

HERE = Path(__file__).resolve().parent

SEEDS = st.integers(0, 2**32 - 1)
SIZES = st.integers(1, 8)
DTYPES = st.sampled_from([np.float32, np.float64])


# -------- helpers and strategies: arrays, layer cases, reference math, fakes


def _away_from_zero(rng: np.random.Generator, shape: tuple[int, ...], gap: float = 1e-3):
    """Values in +-[gap + 0.01, 2]: at least ``gap`` from the kink at 0."""
    magnitude = rng.uniform(gap + 0.01, 2.0, shape)
    return magnitude * rng.choice([-1.0, 1.0], shape)


def _spread(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Per channel (axis 1), distinct values at least 0.5/m apart: BatchNorm's
    batch variance stays away from 0, so finite differences stay accurate."""
    c = shape[1]
    m = math.prod(shape) // c
    cols = np.stack([rng.permutation(m) + rng.uniform(0, 0.5, m) for _ in range(c)], axis=1)
    cols = (cols - cols.mean(axis=0)) / m * rng.uniform(0.5, 3.0) + rng.normal()
    return np.moveaxis(cols.reshape(shape[0], *shape[2:], c), -1, 1)


def _arrays(layer) -> list[np.ndarray]:
    """Every array field of an attrs layer (parameters and state)."""
    return [
        getattr(layer, f.name)
        for f in attrs.fields(type(layer))
        if isinstance(getattr(layer, f.name), np.ndarray)
    ]


def _make_case(name: str, seed: int, n: int, d: int, dtype):
    """(layer, x, ctx, expected output shape) for one layer configuration."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    ctx_train = dlfs.train_context(seed % 1000)
    if name == "Dense":
        d_out = int(rng.integers(1, 9))
        layer = dlfs.Dense.init(seed, d, d_out, bias_init=dlfs.normal, dtype=dt)
        return layer, rng.standard_normal((n, d)).astype(dt), dlfs.EVAL, (n, d_out)
    if name in ("ReLU", "LeakyReLU", "ELU"):
        layer = {"ReLU": dlfs.ReLU(), "LeakyReLU": dlfs.LeakyReLU(0.1), "ELU": dlfs.ELU(0.7)}[name]
        return layer, _away_from_zero(rng, (n, d)).astype(dt), dlfs.EVAL, (n, d)
    simple = {
        "Linear": dlfs.Linear(),
        "Sigmoid": dlfs.Sigmoid(),
        "Tanh": dlfs.Tanh(),
        "GELU": dlfs.GELU(),
        "SiLU": dlfs.SiLU(),
        "Softmax": dlfs.Softmax(),
    }
    if name in simple:
        x = (2 * rng.standard_normal((n, d))).astype(dt)
        return simple[name], x, dlfs.EVAL, (n, d)
    if name == "Dropout-train":
        x = rng.standard_normal((n, d)).astype(dt)
        return dlfs.Dropout(0.3), x, ctx_train, (n, d)
    if name == "Dropout-eval":
        x = rng.standard_normal((n, d)).astype(dt)
        return dlfs.Dropout(0.3), x, dlfs.EVAL, (n, d)
    if name == "Flatten":
        c, h = min(d, 3), int(rng.integers(1, 5))
        x = rng.standard_normal((n, c, h, 2)).astype(dt)
        return dlfs.Flatten(), x, dlfs.EVAL, (n, c * h * 2)
    if name.startswith("BatchNorm"):
        four_d = name.endswith("4d")
        c = min(d, 3) if four_d else d
        layer = dlfs.BatchNorm(
            rng.uniform(0.5, 2.0, c).astype(dt),
            rng.standard_normal(c).astype(dt),
            rng.standard_normal(c).astype(dt),
            rng.uniform(0.5, 2.0, c).astype(dt),
        )
        if four_d:
            shape = (n, c, int(rng.integers(2, 5)), int(rng.integers(1, 4)))
        else:
            shape = (max(n, 2), c)
        x = _spread(rng, shape).astype(dt)
        ctx = dlfs.EVAL if name.startswith("BatchNorm-eval") else ctx_train
        return layer, x, ctx, shape
    if name in ("RNN", "LSTM", "GRU"):
        t, h, seqs = int(rng.integers(1, 6)), int(rng.integers(1, 9)), bool(rng.integers(2))
        layer = _recurrent(name, seed, d, h, dt, return_sequences=seqs)
        x = rng.standard_normal((n, t, d)).astype(dt)
        return layer, x, dlfs.EVAL, (n, t, h) if seqs else (n, h)
    if name == "Dense-seq":
        t, d_out = int(rng.integers(1, 6)), int(rng.integers(1, 9))
        layer = dlfs.Dense.init(seed, d, d_out, bias_init=dlfs.normal, dtype=dt)
        return layer, rng.standard_normal((n, t, d)).astype(dt), dlfs.EVAL, (n, t, d_out)
    raise AssertionError(name)


def _recurrent(kind: str, seed: int, d: int, h: int, dtype, return_sequences: bool = False):
    """An RNN/LSTM/GRU (D -> H) with every weight and bias drawn N(0, 0.7^2) from ``seed``."""
    layer = getattr(dlfs, kind).init(seed, d, h, return_sequences=return_sequences, dtype=dtype)
    rng = np.random.default_rng(seed + 1)
    return layer.with_params(
        [(0.7 * rng.standard_normal(p.shape)).astype(dtype) for p in layer.params()]
    )


LAYER_CASES = [
    "Dense",
    "Linear",
    "Sigmoid",
    "Tanh",
    "ReLU",
    "LeakyReLU",
    "ELU",
    "GELU",
    "SiLU",
    "Softmax",
    "Dropout-train",
    "Dropout-eval",
    "Flatten",
    "BatchNorm-train-2d",
    "BatchNorm-train-4d",
    "BatchNorm-eval-2d",
    "BatchNorm-eval-4d",
    "RNN",
    "LSTM",
    "GRU",
    "Dense-seq",
]


def _bn_expected(layer, x):
    axes = (0,) if x.ndim == 2 else (0, 2, 3)
    shape = (1, -1) if x.ndim == 2 else (1, -1, 1, 1)
    n = x.size // x.shape[1]
    bm, bv = x.mean(axis=axes), x.var(axis=axes)
    y = (x - bm.reshape(shape)) / np.sqrt(bv.reshape(shape) + layer.eps)
    y = y * layer.gamma.reshape(shape) + layer.beta.reshape(shape)
    m = layer.momentum
    run_mean = (1 - m) * layer.mean + m * bm
    run_var = (1 - m) * layer.var + m * bv * n / (n - 1)
    return y, run_mean, run_var


def _log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _problem(dtype=np.float64):
    """A fixed small problem: params ((w, b),) and a quadratic loss's gradient."""
    rng = np.random.default_rng(42)
    w, b = rng.standard_normal((3, 2)), rng.standard_normal(2)
    cw, cb = rng.standard_normal((3, 2)), rng.standard_normal(2)
    noise = [rng.standard_normal((3, 2)) for _ in range(3)]

    def grad(params, t):
        w_, b_ = params
        return (2 * (w_ - cw) + noise[t], 3 * (b_ - cb) * np.abs(b_))

    return (w.astype(dtype), b.astype(dtype)), grad


def _reference(name, lr, wd, steps=3):
    """PyTorch's documented update rules (GUIDE section 7), in plain numpy."""
    (w, b), grad = _problem()
    params = [w.copy(), b.copy()]
    mu, alpha, b1, b2 = 0.9, 0.99, 0.9, 0.999
    slots = {k: [np.zeros_like(p) for p in params] for k in ("buf", "sum", "m", "v")}
    out = []
    for t in range(1, steps + 1):
        grads = list(grad(params, t - 1))
        if name != "AdamW":
            grads = [g + wd * p for g, p in zip(grads, params)]
        new = []
        for i, (p, g) in enumerate(zip(params, grads)):
            if name == "SGD":
                p = p - lr * g
            elif name in ("Momentum", "Nesterov"):
                buf = g.copy() if t == 1 else mu * slots["buf"][i] + g
                slots["buf"][i] = buf
                p = p - lr * (g + mu * buf if name == "Nesterov" else buf)
            elif name == "AdaGrad":
                slots["sum"][i] = slots["sum"][i] + g * g
                p = p - lr * g / (np.sqrt(slots["sum"][i]) + 1e-10)
            elif name == "RMSProp":
                slots["v"][i] = alpha * slots["v"][i] + (1 - alpha) * g * g
                p = p - lr * g / (np.sqrt(slots["v"][i]) + 1e-8)
            else:  # Adam, AdamW
                if name == "AdamW":
                    p = p * (1 - lr * wd)
                m = slots["m"][i] = b1 * slots["m"][i] + (1 - b1) * g
                v = slots["v"][i] = b2 * slots["v"][i] + (1 - b2) * g * g
                denom = np.sqrt(v) / math.sqrt(1 - b2**t) + 1e-8
                p = p - lr / (1 - b1**t) * m / denom
            new.append(p)
        params = new
        out.append([p.copy() for p in params])
    return out


def _make_opt(name, lr, wd):
    cls = {
        "SGD": dlfs.SGD,
        "Momentum": dlfs.Momentum,
        "Nesterov": dlfs.Nesterov,
        "AdaGrad": dlfs.AdaGrad,
        "RMSProp": dlfs.RMSProp,
        "Adam": dlfs.Adam,
        "AdamW": dlfs.AdamW,
    }[name]
    return cls(lr=lr, weight_decay=wd)


OPTIMIZERS = ["SGD", "Momentum", "Nesterov", "AdaGrad", "RMSProp", "Adam", "AdamW"]


def _boston_like():
    return dlfs.network(
        0, 13, [dlfs.dense(13, dlfs.Sigmoid()), dlfs.dense(1)], dlfs.MeanSquaredError()
    )


def _regression(seed=0, n=64, d=3, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(dtype)
    y = (x @ np.array([[1.0], [-2.0], [0.5]])[:d] + 0.3).astype(dtype)
    return x, y


def _linear_net(key=0, dtype=np.float32, hidden=True):
    layers = [dlfs.dense(8, dlfs.Tanh()), dlfs.dense(1)] if hidden else [dlfs.dense(1)]
    return dlfs.network(key, 3, layers, dlfs.MeanSquaredError(), dtype=dtype)


def _snapshot(x):
    """A comparable copy of an array (dtype, shape, exact bytes) or any other value (repr)."""
    if isinstance(x, np.ndarray):
        return (x.dtype, x.shape, x.tolist() if x.dtype == object else x.tobytes())
    return repr(x)


def _net_arrays(net):
    return [a for layer in net.layers for a in _arrays(layer)]


def _record_config(obj: object) -> dict:
    return {
        f.name: getattr(obj, f.name)
        for f in attrs.fields(type(obj))
        if not isinstance(getattr(obj, f.name), np.ndarray)
    }


def _assert_same_net(a: dlfs.Network, b: dlfs.Network) -> None:
    """Same architecture, configuration and bit-identical (read-only) arrays."""
    assert a.input_shape == b.input_shape
    assert type(a.loss) is type(b.loss)
    assert _record_config(a.loss) == _record_config(b.loss)
    _assert_same_layers(a.layers, b.layers)


def _assert_same_layers(a: tuple, b: tuple) -> None:
    """Same layer types, configuration and bit-identical (read-only) arrays; the
    sub-layers of a Residual or TiedEmbedding alike."""
    assert len(a) == len(b)
    for la, lb in zip(a, b):
        assert type(la) is type(lb)
        if isinstance(la, dlfs._CHAINS):
            _assert_same_layers(la.layers, lb.layers)
        config = {k: v for k, v in _record_config(la).items() if k != "layers"}
        assert config == {k: v for k, v in _record_config(lb).items() if k != "layers"}
        for f in attrs.fields(type(la)):
            u, v = getattr(la, f.name), getattr(lb, f.name)
            if isinstance(u, np.ndarray):
                assert u.dtype == v.dtype and u.shape == v.shape
                assert u.tobytes() == v.tobytes()
                assert not v.flags.writeable


def _imported(nodes) -> set[str]:
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names}


def _readme_blocks(name: str = "README.md") -> list[str]:
    readme = HERE / name
    if not readme.is_file():
        pytest.fail(f"{name} not found next to the tests ({readme})")
    return re.findall(r"^```python[ \t]*\n(.*?)^```", readme.read_text(), re.M | re.S)


_TRUST_ACTIVATIONS = (
    None,
    dlfs.Linear(),
    dlfs.Sigmoid(),
    dlfs.Tanh(),
    dlfs.ReLU(),
    dlfs.LeakyReLU(0.2),
    dlfs.ELU(0.7),
    dlfs.GELU(),
    dlfs.SiLU(),
)


def _trust_net(
    seed: int,
    n_in: int,
    widths: list[int],
    acts: list[int],
    dtype: type,
    loss: str,
    extras: list[int],
) -> dlfs.Network:
    """A small Dense net; ``extras[i]`` adds Dropout (1), BatchNorm with
    non-default config and running statistics (2), or nothing (0)."""
    rng = np.random.default_rng(seed)
    layers: list = []
    for width, act, extra in zip(widths, acts, extras):
        layers.append(dlfs.dense(width, _TRUST_ACTIVATIONS[act % len(_TRUST_ACTIVATIONS)]))
        if extra == 1:
            layers.append(dlfs.Dropout(float(rng.uniform(0, 0.9))))
        elif extra == 2:
            bn = dlfs.BatchNorm.init(
                width,
                momentum=float(rng.uniform()),
                eps=float(rng.uniform(1e-6, 1e-2)),
                dtype=dtype,
            )
            stats = dict(
                mean=rng.standard_normal(width).astype(dtype),
                var=rng.uniform(0.5, 2, width).astype(dtype),
                gamma=rng.uniform(0.5, 2, width).astype(dtype),
            )
            layers.append(attrs.evolve(bn, **stats))
    losses = {
        "mse": (dlfs.MeanSquaredError(), 2),
        "sce": (dlfs.SoftmaxCrossEntropy(float(rng.uniform(0, 0.3))), 3),
        "bce": (dlfs.BinaryCrossEntropy(), 1),
    }
    loss_obj, n_out = losses[loss]
    return dlfs.network(seed, n_in, [*layers, dlfs.dense(n_out)], loss_obj, dtype=dtype)


def _trust_targets(net: dlfs.Network, n: int, rng: np.random.Generator) -> np.ndarray:
    if isinstance(net.loss, dlfs.SoftmaxCrossEntropy):
        return rng.integers(0, net.output_shape[0], n)
    if isinstance(net.loss, dlfs.BinaryCrossEntropy):
        return (rng.random((n, *net.output_shape)) > 0.5).astype(net.dtype)
    return rng.standard_normal((n, *net.output_shape)).astype(net.dtype)


def _trust_assert_same_opt_state(a: dlfs.OptState, b: dlfs.OptState) -> None:
    assert (a.count, a.lr) == (b.count, b.lr)
    leaves_a = [x for tree in a.slots for layer in tree for x in layer]
    leaves_b = [x for tree in b.slots for layer in tree for x in layer]
    assert len(leaves_a) == len(leaves_b)
    for u, v in zip(leaves_a, leaves_b):
        assert u.dtype == v.dtype and u.tobytes() == v.tobytes()


def _trust_trained(seed: int = 0) -> tuple[dlfs.Network, dlfs.Adam, dlfs.OptState]:
    """A small SCE net with BatchNorm/Dropout after two Adam steps (non-trivial state)."""
    net = _trust_net(seed, 4, [5, 3], [4, 2], np.float32, "sce", [2, 1])
    opt = dlfs.Adam(1e-2)
    state = dlfs.TrainState.create(net, opt, seed)
    rng = np.random.default_rng(seed)
    for _ in range(2):
        x = rng.standard_normal((6, 4)).astype(np.float32)
        state = dlfs.train_step(state, (x, _trust_targets(net, 6, rng)))
    return state.net, opt, state.opt_state


def _trust_raw(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _trust_structure(raw: dict[str, np.ndarray]) -> dict:
    return json.loads(raw["__dlfs_structure__"].tobytes().decode())


def _trust_with_structure(raw: dict[str, np.ndarray], structure: dict) -> dict[str, np.ndarray]:
    text = json.dumps(structure).encode()
    return {**raw, "__dlfs_structure__": np.frombuffer(text, dtype=np.uint8)}


@pytest.fixture(scope="module")
def _trust_ckpt_bytes():
    net, _, ostate = _trust_trained()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "c.npz")
        dlfs.save(path, net, ostate, meta={"k": 1})
        with open(path, "rb") as f:
            return f.read(), dlfs.load(path)


def _trust_load_bytes(data: bytes):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "c.npz")
        with open(path, "wb") as f:
            f.write(data)
        return dlfs.load(path)


_TRUST_PICKLE_RAN: list[int] = []


def _trust_mark() -> int:
    _TRUST_PICKLE_RAN.append(1)
    return 1


class _TrustBoom:
    def __reduce__(self):
        return (_trust_mark, ())


def _trust_tamper(kind: str, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    s = _trust_structure(raw)
    w = "net.layers.0.w"
    if kind == "renamed":
        raw = {("net.layers.0.W" if k == w else k): v for k, v in raw.items()}
    elif kind == "missing":
        raw = {k: v for k, v in raw.items() if k != w}
    elif kind == "extra":
        raw = {**raw, "extra": np.zeros(2)}
    elif kind == "pickle_extra":
        raw = {**raw, "boom": np.array([_TrustBoom()], dtype=object)}
    elif kind == "pickle_replace":
        raw = {**raw, w: np.array([_TrustBoom()], dtype=object)}
    elif kind == "pickle_structure":
        raw = {**raw, "__dlfs_structure__": np.array([_TrustBoom()], dtype=object)}
    elif kind == "int_array":
        raw = {**raw, w: raw[w].astype(np.int32)}
    elif kind == "shape":
        raw = {**raw, w: raw[w][:1]}
    elif kind == "grown":  # far more bytes than described: refused before it is read
        raw = {**raw, w: np.zeros((1 << 15, raw[w].shape[1]), raw[w].dtype)}
    elif kind == "dtype":
        raw = {**raw, w: raw[w].astype(np.float64)}
    elif kind == "values":
        raw = {**raw, w: raw[w] + 1}
    elif kind == "json_shape":
        s["arrays"][w]["shape"] = [1, 1]
        raw = _trust_with_structure(raw, s)
    elif kind == "json_dtype":
        s["arrays"][w]["dtype"] = "object"
        raw = _trust_with_structure(raw, s)
    elif kind == "newer":
        s["version"] = 99
        raw = _trust_with_structure(raw, s)
    elif kind == "unknown_layer":
        s["networks"]["net"]["layers"][1]["type"] = "os.system"
        raw = _trust_with_structure(raw, s)
    elif kind == "bad_config":
        s["networks"]["net"]["layers"].append({"type": "Dropout", "config": {"p": 7}, "arrays": {}})
        raw = _trust_with_structure(raw, s)
    elif kind == "unknown_field":
        s["networks"]["net"]["layers"][1]["config"]["evil"] = 1
        raw = _trust_with_structure(raw, s)
    elif kind == "not_json":
        raw = {**raw, "__dlfs_structure__": np.frombuffer(b"{oops", dtype=np.uint8)}
    elif kind == "no_structure":
        raw = {k: v for k, v in raw.items() if k != "__dlfs_structure__"}
    return raw


def _trust_fit_data(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((40, 4)).astype(np.float32)
    y = (x @ rng.standard_normal((4, 3)) > 0).argmax(axis=1)
    return x, y


_TRUST_DTYPES = ("float32", "float64", "int64", "uint8", "bool", "complex128", "object", "<U2")


@st.composite
def _trust_arrays(draw):
    """Mostly plausible, often wrong arrays: odd dtypes, shapes, NaN/inf, empty;
    shape () gives a numpy scalar or a 0-d array."""
    dtype = draw(st.sampled_from(_TRUST_DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=3)))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    a = rng.standard_normal(shape) * 3
    special = draw(st.sampled_from([None, np.nan, np.inf, -np.inf, 1e308]))
    if special is not None and a.size:
        a.flat[draw(st.integers(0, a.size - 1))] = special
    with np.errstate(all="ignore"):
        if dtype in ("int64", "uint8"):
            a = np.nan_to_num(np.abs(a)).astype(dtype)
        elif dtype == "<U2":
            a = a.astype(str).astype(dtype)
        else:
            a = a.astype(dtype)
    return np.asarray(a) if not shape and draw(st.booleans()) else a


_TRUST_BAD_NUMBERS = st.one_of(
    st.sampled_from([0, -1, 1e300, -1e300, float("nan"), float("inf"), "x", None, True]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**70), 2**70),
)


def _trust_call(draw, target: str, args: list):
    """The call for ``target`` with bad inputs ``args`` (a list of arrays/numbers)."""
    net = _trust_net(0, 3, [4], [4], np.float32, "sce", [2])
    mse_net = _trust_net(0, 3, [4], [2], np.float64, "mse", [1])
    a, b, n = args
    size = min(n, 64) if isinstance(n, int) else n  # sizes stay small: no giant allocations
    opt = dlfs.Adam()
    calls = {
        "predict": lambda: net.predict(a),
        "predict_bs": lambda: mse_net.predict(np.zeros((3, 3)), batch_size=n),
        "forward": lambda: mse_net.forward(a),
        "loss_and_grads": lambda: net.loss_and_grads(a, b),
        "fit": lambda: dlfs.fit(net, opt, a, b, epochs=1),
        "fit_hyper": lambda: dlfs.fit(
            mse_net, dlfs.SGD(0.01), np.ones((4, 3)), np.ones((4, 2)), epochs=1, batch_size=n
        ),
        "fit_lr": lambda: dlfs.fit(
            mse_net, dlfs.SGD(n), np.ones((4, 3)), np.ones((4, 2)), epochs=2, batch_size=2
        ),
        "train_step": lambda: dlfs.train_step(dlfs.TrainState.create(net, opt), (a, b)),
        "mse": lambda: dlfs.MeanSquaredError().forward(a, b),
        "sce": lambda: dlfs.SoftmaxCrossEntropy().forward(a, b),
        "bce": lambda: dlfs.BinaryCrossEntropy().forward(a, b),
        "mae": lambda: dlfs.mae(a, b),
        "rmse": lambda: dlfs.rmse(a, b),
        "accuracy": lambda: dlfs.accuracy(a, b),
        "update": lambda: opt.update(((a, b), ()), opt.init(((a, b), ())), ((a, b), ())),
        "update_state": lambda: opt.update(
            net.params(), dlfs.SGD().init(net.params()), net.params()
        ),
        "optimizers": lambda: draw(
            st.sampled_from([dlfs.SGD, dlfs.Adam, dlfs.RMSProp, dlfs.AdaGrad, dlfs.Momentum])
        )(n),
        "layers": lambda: draw(
            st.sampled_from([dlfs.Dropout, dlfs.LeakyReLU, dlfs.ELU, dlfs.ClipByGlobalNorm])
        )(n),
        "batch_norm": lambda: dlfs.BatchNorm.init(3, momentum=n),
        "dense": lambda: dlfs.Dense(a, b),
        "network": lambda: dlfs.network(0, (3,), [dlfs.dense(4), dlfs.BatchNorm.init(size)], None),
        "network_shape": lambda: dlfs.network(0, size, [dlfs.dense(2)], dlfs.MeanSquaredError()),
        "one_hot": lambda: dlfs.one_hot(a, 3),
        "permute": lambda: dlfs.permute(0, a, b),
        "to_2d": lambda: dlfs.to_2d(a),
        "save": lambda: dlfs.save(os.devnull if n is None else n, a),
        "recurrent": lambda: dlfs.LSTM.init(0, 3, 2, return_sequences=True).forward(a),
        "scan": lambda: dlfs.GRU.init(0, 3, 2).scan(a, b),
        "backward_scan": lambda: dlfs.RNN.init(0, 3, 2).backward_scan(
            dlfs.RNN.init(0, 3, 2).scan(np.ones((2, 3, 3), np.float32))[2], a, b
        ),
        "embedding": lambda: dlfs.Embedding.init(0, 4, 2).forward(a),
        "recurrent_spec": lambda: dlfs.network(
            0, (3, 2), [dlfs.lstm(size)], dlfs.MeanSquaredError()
        ),
    }
    return calls[target]


# Python's and numpy's own wording: a dlfs check was missing and an internal error leaked out.
_INTERNAL_ERRORS = (
    "unsized object",
    "object of type",
    "'NoneType'",
    "has no len",
    "not subscriptable",
    "unsupported operand",
    "is not iterable",
    "cannot unpack",
    "values to unpack",
    "could not be broadcast",
    "ufunc",
    "out of bounds",
    "invalid literal",
    "could not convert",
    "not supported between instances",
    "positional argument",
    "unhashable type",
    "setting an array element",
    "zero-size array",
    "not aligned",
    "input operand",
    "math domain error",
    "cannot convert float",
    "cannot be interpreted as",
    "only integer scalar arrays",
    "truth value of an array",
)


def _assert_clear_error(err: Exception) -> None:
    """A dlfs validation error: says what it expects (``... must ...``/``expects``), and is not
    an internal Python/numpy error that escaped validation."""
    message = str(err)
    assert message.strip(), f"{type(err).__name__} with an empty message"
    assert "must" in message or "expect" in message, f"unclear error: {message!r}"
    leaked = [m for m in _INTERNAL_ERRORS if m in message.lower()]
    assert not leaked, f"internal error leaked out of validation: {type(err).__name__}: {message}"


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
    for key, base in dlfs._MNIST_FILES.items():
        raw = _mnist_idx(arrays[key])
        if gz:
            (folder / f"{base}.gz").write_bytes(gzip.compress(raw, mtime=0))
        else:
            (folder / base).write_bytes(raw)


def _mnist_publish(www: Path, arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """Write ``arrays`` as gzipped IDX files under ``www/mnist``; their md5s by file name."""
    _mnist_write_folder(www / "mnist", arrays, gz=True)
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in (www / "mnist").glob("*.gz")}


def _mnist_equal(got, want: dict[str, np.ndarray], flatten: bool = False) -> None:
    """``load_mnist``'s ((x_train, y_train), (x_test, y_test)) against the uint8 arrays."""
    (x_train, y_train), (x_test, y_test) = got
    for x, key in ((x_train, "x_train"), (x_test, "x_test")):
        n = len(want[key])
        assert x.dtype == np.float32 and x.shape == ((n, 784) if flatten else (n, 1, 28, 28))
        expected = want[key].astype(np.float32) / np.float32(255)
        np.testing.assert_array_equal(x.reshape(n, 28, 28), expected)
    for y, key in ((y_train, "y_train"), (y_test, "y_test")):
        assert y.dtype == np.int64
        np.testing.assert_array_equal(y, want[key])


class _MnistHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def _mnist_server(tmp_path, monkeypatch):
    """Serve tmp_path/www on 127.0.0.1 as dlfs's only MNIST mirror; yields
    (base_url, www folder, request paths, publish) where ``publish(arrays)``
    writes the files and makes their md5s the ones dlfs checks against."""
    www = tmp_path / "www"
    www.mkdir()
    requests: list[str] = []

    class Handler(_MnistHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            super().do_GET()

    def publish(arrays: dict[str, np.ndarray]) -> dict[str, str]:
        md5 = _mnist_publish(www, arrays)
        monkeypatch.setattr(dlfs, "_MNIST_MD5", md5)
        return md5

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(www))
    )
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/mnist/"
    monkeypatch.setattr(dlfs, "_MNIST_MIRRORS", (url,))
    monkeypatch.delenv("DLFS_DATA", raising=False)
    try:
        yield url, www, requests, publish
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _example(name: str, monkeypatch: pytest.MonkeyPatch):
    """Import ``examples/<name>.py`` (examples import each other by name)."""
    monkeypatch.syspath_prepend(str(HERE / "examples"))
    return importlib.import_module(name)


def _tiny_mnist_npz(folder: Path) -> Path:
    """A random MNIST-shaped npz: 40 training and 10 test images."""
    rng = np.random.default_rng(5)
    arrays = {
        "x_train": rng.integers(0, 256, (40, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, 40, dtype=np.uint8),
        "x_test": rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, 10, dtype=np.uint8),
    }
    np.savez(folder / "tiny.npz", **arrays)
    return folder / "tiny.npz"


def _key_values(out: str) -> dict[str, str]:
    """The ``key=value`` lines of an example's output (lines with spaces are prose)."""
    pairs = (line.split("=", 1) for line in out.splitlines() if re.fullmatch(r"\w+=\S+", line))
    return dict(pairs)


_CONV_DTYPES = [np.float32, np.float64]


def _conv_reference(
    x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: tuple[int, int], pads: tuple
) -> np.ndarray:
    """Plain nested-loop cross-correlation, the definition written out."""
    (top, bottom), (left, right) = pads
    n, c_in, h, wd = x.shape
    c_out, _, kh, kw = w.shape
    xp = np.zeros((n, c_in, h + top + bottom, wd + left + right))
    xp[:, :, top : top + h, left : left + wd] = x
    ho = (xp.shape[2] - kh) // stride[0] + 1
    wo = (xp.shape[3] - kw) // stride[1] + 1
    y = np.zeros((n, c_out, ho, wo))
    for s in range(n):
        for o in range(c_out):
            for p in range(ho):
                for q in range(wo):
                    acc = b[o]
                    for c in range(c_in):
                        for i in range(kh):
                            for j in range(kw):
                                acc += (
                                    w[o, c, i, j] * xp[s, c, p * stride[0] + i, q * stride[1] + j]
                                )
                    y[s, o, p, q] = acc
    return y


def _conv_pool_reference(x: np.ndarray, size: tuple, stride: tuple, reduce) -> np.ndarray:
    n, c, h, w = x.shape
    ho, wo = (h - size[0]) // stride[0] + 1, (w - size[1]) // stride[1] + 1
    y = np.zeros((n, c, ho, wo))
    for p in range(ho):
        for q in range(wo):
            win = x[
                :,
                :,
                p * stride[0] : p * stride[0] + size[0],
                q * stride[1] : q * stride[1] + size[1],
            ]
            y[:, :, p, q] = reduce(win.reshape(n, c, -1), axis=-1)
    return y


@st.composite
def _conv_cases(draw: st.DrawFn) -> dict:
    """Batch 1-4, channels 1-3, sides 4-9, a kernel that fits, stride, padding."""
    n, c_in, c_out = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    h, w = draw(st.integers(4, 9)), draw(st.integers(4, 9))
    stride = draw(st.sampled_from([1, 2, 3, (1, 2), (2, 1)]))
    options = ["valid", 0, 1, 2, (1, 0), ((0, 1), (2, 0))]
    if stride == 1:
        options.append("same")
    padding = draw(st.sampled_from(options))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))  # <= 4 <= side: always fits
    return {
        "n": n,
        "c_in": c_in,
        "c_out": c_out,
        "hw": (h, w),
        "kernel": (kh, kw),
        "stride": stride,
        "padding": padding,
        "seed": draw(st.integers(0, 2**16)),
    }


def _conv_build(case: dict, dtype) -> tuple[dlfs.Conv2D, np.ndarray]:
    rng = np.random.default_rng(case["seed"])
    conv = dlfs.Conv2D.init(
        case["seed"],
        case["c_in"],
        case["c_out"],
        case["kernel"],
        stride=case["stride"],
        padding=case["padding"],
        bias_init=dlfs.normal,
        dtype=dtype,
    )
    x = rng.standard_normal((case["n"], case["c_in"], *case["hw"])).astype(dtype)
    return conv, x


@st.composite
def _conv_pool_cases(draw: st.DrawFn) -> dict:
    return {
        "shape": (
            draw(st.integers(1, 4)),
            draw(st.integers(1, 3)),
            draw(st.integers(4, 9)),
            draw(st.integers(4, 9)),
        ),
        "size": draw(st.sampled_from([1, 2, 3, 4, (2, 3), (3, 1)])),  # fits: sides >= 4
        "stride": draw(st.sampled_from([None, 1, 2, 3, (1, 2)])),
        "seed": draw(st.integers(0, 2**16)),
    }


def _conv_distinct(shape: tuple, seed: int) -> np.ndarray:
    """Distinct values: a permutation of 0..n-1 plus jitter in [0, 0.5), so every
    gap is >= 0.5, far above the gradient check's perturbation (eps = 1e-6)."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    return (rng.permutation(n) + rng.random(n) * 0.5).reshape(shape)


def _cnn_pass(net: dlfs.Network, x: np.ndarray) -> list[np.ndarray]:
    """Output, input gradient and every parameter gradient of one forward/backward."""
    out, caches, _ = net.forward(x)
    dy = np.random.default_rng(1).standard_normal(out.shape).astype(out.dtype)
    dx, grads = net.backward(caches, dy)
    return [out, dx, *(g for layer in grads for g in layer)]


def _small_cnn() -> dlfs.Network:
    specs = [
        dlfs.conv2d(4, 3, padding="same", activation=dlfs.ReLU()),
        dlfs.MaxPool2D(2),
        dlfs.conv2d(5, 3, padding=1),  # a "same" grid too, no activation
        dlfs.MaxPool2D(2, stride=1),  # overlapping windows
        dlfs.conv2d(3, 2, stride=(1, 2), padding="valid"),  # the strided path
        dlfs.Flatten(),
        dlfs.dense(3),
    ]
    return dlfs.network(0, (2, 8, 8), specs, dlfs.SoftmaxCrossEntropy(), dtype=np.float64)


@attrs.frozen(eq=False)
class _PoisonedDense:
    """A Dense whose weight gradient is multiplied by ``bad`` (NaN or inf)."""

    inner: dlfs.Dense
    bad: float

    def params(self):
        return self.inner.params()

    def with_params(self, params):
        return _PoisonedDense(self.inner.with_params(params), self.bad)

    def output_shape(self, in_shape):
        return self.inner.output_shape(in_shape)

    def forward(self, x, ctx=dlfs.EVAL):
        y, cache, _ = self.inner.forward(x, ctx)
        return y, cache, self

    def backward(self, cache, dy):
        dx, (dw, db) = self.inner.backward(cache, dy)
        return dx, (dw * dw.dtype.type(self.bad), db)


_I11_KW = dict(batch_size=8, seed=5)  # 40 rows: 5 steps an epoch


def _i11_net():
    """Dropout and BatchNorm (keys and state per step) with Adam (moments): nothing
    about resuming or interrupting is trivial."""
    return _trust_net(3, 4, [6, 5], [4, 2], np.float32, "sce", [1, 2])


def _i11_by_hand(net, opt, x, y, steps, *, batch_size=8, seed=5):
    """Exactly ``steps`` steps of what fit does, from the public pieces: fit splits
    its seed into a shuffle key and a step key; epoch e shuffles with shuffle_key + (e,)."""
    shuffle_key, step_key = dlfs.split(seed, 2)
    state = dlfs.TrainState.create(net, opt, step_key)
    epoch = 0
    while state.step < steps:
        epoch += 1
        for batch in dlfs.batches(x, y, batch_size, key=shuffle_key + (epoch,)):
            if state.step == steps:
                break
            state = dlfs.train_step(state, batch)
    return state.net


def _i11_interrupt_source(monkeypatch, after: int) -> None:
    """Make fit's data source raise KeyboardInterrupt when asked for batch ``after + 1``."""
    real, served = dlfs._epoch_batches, [0]

    def source(*args, **kwargs):
        for batch in real(*args, **kwargs):
            if served[0] == after:
                raise KeyboardInterrupt
            served[0] += 1
            yield batch

    monkeypatch.setattr(dlfs, "_epoch_batches", source)


class _HTMLTable(html.parser.HTMLParser):
    """Collects a table's caption, header cells and rows of data cells (as text)."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.table = {"caption": "", "header": [], "rows": []}
        self._text: list[str] | None = None

    def handle_starttag(self, tag, attrs_):
        self.tags.append(tag)
        if tag == "tr" and "tbody" in self.tags:
            self.table["rows"].append([])
        if tag in ("td", "th", "caption"):
            self._text = []

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        assert self.tags and self.tags[-1] == tag, f"unbalanced </{tag}>"
        self.tags.pop()
        if tag in ("td", "th", "caption"):
            text, self._text = "".join(self._text), None
            if tag == "caption":
                self.table["caption"] = text
            elif tag == "th":
                self.table["header"].append(text)
            else:
                self.table["rows"][-1].append(text)


def _parse_html(markup: str) -> dict:
    parser = _HTMLTable()
    parser.feed(markup)
    parser.close()
    assert parser.tags == [] and markup.startswith("<table>")
    return parser.table


def _i11_mnist_like(n=6):
    rng = np.random.default_rng(0)
    return rng.random((n, 1, 4, 4), dtype=np.float32), rng.integers(0, 10, n)


_NOTEBOOK = HERE / "examples" / "quickstart.ipynb"


@attrs.frozen
class _HalfCE:
    """A user's own loss: half of softmax cross-entropy (dlfs knows nothing of it)."""

    def forward(self, logits, target):
        loss, cache = dlfs.SoftmaxCrossEntropy().forward(logits, target)
        return loss / 2, cache

    def backward(self, cache):
        return dlfs.SoftmaxCrossEntropy().backward(cache) / 2


def _pickle_copies(obj) -> list:
    """``obj`` through pickle (protocol 2, and 5 as Dask uses) and copy.deepcopy."""
    protocols = (2, pickle.HIGHEST_PROTOCOL)
    return [pickle.loads(pickle.dumps(obj, protocol=p)) for p in protocols] + [copy.deepcopy(obj)]


def _any_layer(name: str, seed: int, n: int, d: int, dtype):
    """A layer of every kind: LAYER_CASES' and the convolution and pools."""
    if name == "Conv2D":
        return dlfs.Conv2D.init(
            seed, d, n, (2, 3), stride=(1, 2), padding=(1, 0), bias_init=dlfs.normal, dtype=dtype
        )
    if name in ("MaxPool2D", "AvgPool2D"):
        return getattr(dlfs, name)((n % 3 + 1, 2), stride=(1, d % 2 + 1))
    return _make_case(name, seed, n, d, dtype)[0]


class _ThreadComm:
    """An in-process stand-in for an MPI communicator: rank ``rank`` of a group of
    threads.  Allreduce sums the ranks' buffers in rank order (every rank gets the
    same bits) and keeps every buffer sent, by rank, in ``group["sent"]``."""

    def __init__(self, group: dict, rank: int) -> None:
        self.group, self.rank = group, rank

    def Get_rank(self) -> int:  # noqa: N802 (mpi4py's names)
        return self.rank

    def Get_size(self) -> int:  # noqa: N802
        return self.group["size"]

    def Allreduce(self, sendbuf: np.ndarray, recvbuf: np.ndarray) -> None:  # noqa: N802
        g = self.group
        assert sendbuf.ndim == 1 and sendbuf.flags.c_contiguous and recvbuf.dtype == sendbuf.dtype
        g["bufs"][self.rank] = sendbuf.copy()
        g["sent"][self.rank].append(g["bufs"][self.rank])
        g["barrier"].wait()
        recvbuf[...] = functools.reduce(np.add, g["bufs"])
        g["barrier"].wait()  # nobody overwrites a buffer before every rank has summed


def _comm_group(size: int) -> dict:
    return {
        "size": size,
        "bufs": [None] * size,
        "sent": [[] for _ in range(size)],
        "barrier": threading.Barrier(size, timeout=20),
    }


def _run_ranks(size: int, fn) -> tuple[list, dict]:
    """``fn(comm)`` on ``size`` threads, one per rank: (results by rank, the group)."""
    group = _comm_group(size)
    results, errors = [None] * size, [None] * size

    def run(rank: int) -> None:
        try:
            results[rank] = fn(_ThreadComm(group, rank))
        except BaseException as err:  # re-raised below, in the test's thread
            errors[rank] = err
            group["barrier"].abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [e for e in errors if e is not None]  # the cause first, then broken barriers
    failed.sort(key=lambda e: isinstance(e, threading.BrokenBarrierError))
    if failed:
        raise failed[0]
    return results, group


def _dp_problem(kind: str, dtype=np.float64, n: int = 95):
    """(network, x, y) for the equality checks: an MLP or a small CNN (no dropout),
    or the MLP with Dropout / BatchNorm."""
    rng = np.random.default_rng(11)
    relu = dlfs.ReLU()
    if kind == "cnn":
        layers = [
            dlfs.conv2d(3, 3, padding="same", activation=relu),
            dlfs.MaxPool2D(2),
            dlfs.Flatten(),
            dlfs.dense(4),
        ]
        shape = (1, 6, 6)
    else:
        extra = {"dropout": [dlfs.Dropout(0.3)], "bn": [dlfs.batch_norm()]}.get(kind, [])
        layers = [dlfs.dense(8, dlfs.Tanh()), *extra, dlfs.dense(6, relu), dlfs.dense(4)]
        shape = (5,)
    net = dlfs.network(3, shape, layers, dlfs.SoftmaxCrossEntropy(), dtype=dtype)
    x = rng.standard_normal((n, *shape)).astype(dtype)
    return net, x, rng.integers(0, 4, n)


def _dp_optimizer(comm=None):
    """Clipping after the all-reduce, then Adam: the same chain with or without it."""
    parts = (dlfs.ClipByGlobalNorm(2.0), dlfs.Adam(0.02))
    return dlfs.chain(*parts) if comm is None else dlfs.chain(dlfs.AllReduce(comm), *parts)


def _dp_train(net, x, y, comm=None, *, batch_size=10, epochs=2) -> dlfs.TrainState:
    """``epochs`` shuffled epochs: train_step in one process, data_parallel_step under
    ``comm`` (95 rows, batch 10: 20 steps whose last batches have 5 rows)."""
    step = (
        dlfs.train_step if comm is None else functools.partial(dlfs.data_parallel_step, comm=comm)
    )
    state = dlfs.TrainState.create(net, _dp_optimizer(comm), key=7)
    for epoch in range(epochs):
        state = functools.reduce(step, dlfs.batches(x, y, batch_size, key=(5, epoch)), state)
    return state


def _assert_close_params(got: dlfs.Network, want: dlfs.Network, rtol: float) -> None:
    """Every parameter array within ``rtol`` of ``want``'s, relative to its largest entry."""
    for g, w in zip(got._flat_params(), want._flat_params()):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert np.abs(g - w).max() <= rtol * np.abs(w).max(), np.abs(g - w).max()


def _mpi_worker(out_dir: str) -> None:
    """Run under ``mpiexec -n R``: train every problem data-parallel over
    MPI.COMM_WORLD and save each rank's parameters to ``out_dir``."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    for kind in ("mlp", "cnn"):
        net, x, y = _dp_problem(kind)
        state = _dp_train(net, x, y, comm)
        loss = dlfs.global_mean_loss(state, comm)
        arrays = {f"p{i}": p for i, p in enumerate(state.net._flat_params())}
        np.savez(Path(out_dir) / f"{kind}_rank{comm.Get_rank()}.npz", loss=loss, **arrays)


def _mpiexec() -> Path:
    """The mpiexec next to this Python (the mpich wheel's), or skip."""
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed (pip install -e '.[distributed]')")
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        pytest.skip(f"no mpiexec next to {sys.executable} (the mpich wheel installs one)")
    return mpiexec


def _run_mpi(n: int, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    cmd = [str(_mpiexec()), "-n", str(n), sys.executable, "-m", "mpi4py", *args]  # errors abort
    result = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _mpi_save_fit(out: Path, name: str, rank: int, result) -> None:
    """A fit result of one rank: its parameters (npz) and its history (json)."""
    net, history = result
    np.savez(out / f"{name}_rank{rank}.npz", *net._flat_params())
    record = {"records": [list(attrs.astuple(r)) for r in history.records]}
    record.update(stop=history.stop_reason, steps=history.steps, best=history.best_epoch)
    (out / f"{name}_rank{rank}.json").write_text(json.dumps(record))


def _mpi_load_fit(out: Path, name: str, rank: int) -> tuple[list[bytes], dict]:
    with np.load(out / f"{name}_rank{rank}.npz") as saved:
        arrays = [saved[k].tobytes() for k in saved.files]
    return arrays, json.loads((out / f"{name}_rank{rank}.json").read_text())


def _mpi_fit_worker(out_dir: str) -> None:
    """Run under ``mpiexec -n 2``: fit(comm=) 4 epochs straight; 2 epochs with a
    checkpoint then resumed to 4; a Ctrl-C on rank 1 alone while its step 6 runs, with a
    checkpoint, then resumed to 4.  Each rank saves each result."""
    import warnings

    from mpi4py import MPI

    comm, out = MPI.COMM_WORLD, Path(out_dir)
    rank = comm.Get_rank()
    net, x, y = _dp_problem("dropout", n=40)
    kw = dict(batch_size=8, seed=3, validation=(x[:8], y[:8]), comm=comm)

    def fit(epochs: int, **extra):
        return dlfs.fit(net, dlfs.Adam(0.01), x, y, epochs=epochs, **kw, **extra)

    _mpi_save_fit(out, "straight", rank, fit(4))
    fit(2, checkpoint=out / "two.npz")
    _mpi_save_fit(out, "resumed", rank, fit(4, resume=out / "two.npz"))
    real_step = dlfs.data_parallel_step

    def step(state, batch, comm):
        if rank == 1 and state.step == 6:
            signal.raise_signal(signal.SIGINT)  # as mpiexec forwards Ctrl-C, on one rank
        return real_step(state, batch, comm)

    dlfs.data_parallel_step = step
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        _mpi_save_fit(out, "interrupted", rank, fit(4, checkpoint=out / "int.npz"))
    dlfs.data_parallel_step = real_step
    _mpi_save_fit(out, "after", rank, fit(4, resume=out / "int.npz"))


def _mpi_sigint_worker(out_dir: str) -> None:
    """Run under ``mpiexec -n 2``: fit(comm=) for far too many epochs; rank 0's progress
    bar writes ``started`` after step 3 so that the test can send Ctrl-C to mpiexec."""
    import warnings

    from mpi4py import MPI

    comm, out = MPI.COMM_WORLD, Path(out_dir)
    net, x, y = _dp_problem("mlp", n=16)
    bar = _bar_factory(at=3, then=lambda: (out / "started").write_text(""))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        result = dlfs.fit(
            net, dlfs.SGD(0.01), x, y, epochs=10**6, batch_size=8, progress=bar, comm=comm,
            checkpoint=out / "run.npz",
        )  # fmt: skip
    _mpi_save_fit(out, "run", comm.Get_rank(), result)


def _fit_on_ranks(size: int, net, x, y, optimizer=None, **kw) -> tuple[list, dict]:
    """``fit(..., comm=)`` on ``size`` thread ranks (Adam(0.01) unless given):
    ([(network, history)] by rank, the group)."""

    def rank(comm):
        return dlfs.fit(net, optimizer or dlfs.Adam(0.01), x, y, comm=comm, **kw)

    return _run_ranks(size, rank)


def _assert_ranks_agree(results) -> None:
    for got, history in results:
        _assert_same_net(got, results[0][0])
        assert history == results[0][1]


def _interrupt() -> None:
    raise KeyboardInterrupt


def _bar_factory(made: list | None = None, at: int | None = None, then=_interrupt) -> type:
    """A tqdm-like progress factory (update, close): each bar it makes goes in ``made``,
    and once ``at`` steps are done the bar calls ``then()`` (by default it raises
    KeyboardInterrupt)."""

    class Bar:
        def __init__(self, total, desc):
            self.total, self.desc, self.n, self.closed = total, desc, 0, False
            if made is not None:
                made.append(self)

        def update(self, k):
            self.n += k
            if self.n == at:
                then()

        def close(self):
            self.closed = True

    return Bar


def _boston_without_sklearn(boston) -> tuple[np.ndarray, ...]:
    """The shipped Boston file, standardized, first 350 rows to train (numpy only)."""
    raw = np.genfromtxt(boston.DATA, delimiter=",", skip_header=2)
    x = (raw[:, :13] - raw[:, :13].mean(axis=0)) / raw[:, :13].std(axis=0)
    y = dlfs.to_2d(raw[:, 13])
    return x[:350], x[350:], y[:350], y[350:]


_KINDS = ["RNN", "LSTM", "GRU"]


def _state(kind: str, rng: np.random.Generator, n: int, h: int, dtype=np.float64):
    """A random initial state: h, or (h, c) for an LSTM."""
    parts = tuple(
        rng.standard_normal((n, h)).astype(dtype) for _ in range(2 if kind == "LSTM" else 1)
    )
    return parts if kind == "LSTM" else parts[0]


def _parts(kind: str, state) -> tuple:
    """A state (or state gradient) as a tuple: (h,) or (h, c)."""
    return tuple(state) if kind == "LSTM" else (state,)


def _torch_layer(torch, kind: str, d: int, h: int):
    """A torch nn.RNN/LSTM/GRU (batch_first, float64) with every weight drawn N(0, 0.5^2)."""
    module = getattr(torch.nn, kind)(d, h, batch_first=True).double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return module


def _from_torch(kind: str, module, h: int):
    """The docstrings' mapping PyTorch -> dlfs."""
    w_ih, w_hh, b_ih, b_hh = (
        getattr(module, n).detach().numpy()
        for n in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
    )
    if kind == "GRU":
        b = b_ih + np.concatenate([b_hh[: 2 * h], np.zeros(h)])
        return dlfs.GRU(w_ih.T, w_hh.T, b, b_hh[2 * h :], return_sequences=True)
    return getattr(dlfs, kind)(w_ih.T, w_hh.T, b_ih + b_hh, return_sequences=True)


def _to_torch(torch, layer, module) -> None:
    """The docstrings' mapping dlfs -> PyTorch, written into ``module``."""
    h = layer.n_hidden
    b_hh = np.zeros_like(layer.b)
    if isinstance(layer, dlfs.GRU):
        b_hh[2 * h :] = layer.b_hn
    with torch.no_grad():
        for name, value in [
            ("weight_ih_l0", layer.w_ih.T),
            ("weight_hh_l0", layer.w_hh.T),
            ("bias_ih_l0", layer.b),
            ("bias_hh_l0", b_hh),
        ]:
            getattr(module, name).copy_(torch.from_numpy(np.array(value)))  # a writeable copy


def _char_lm(dtype=np.float64, cell=dlfs.gru):
    """ids (N, 6) -> Embedding(7, 4) -> cell(5, sequences) -> Dense(7) per step."""
    return dlfs.network(
        2,
        (6,),
        [dlfs.embedding(7, 4), cell(5, return_sequences=True), dlfs.dense(7)],
        dlfs.SoftmaxCrossEntropy(),
        dtype=dtype,
    )


def _hard_net(dtype=np.float32) -> dlfs.Network:
    return dlfs.network(
        0, 3, [dlfs.dense(2, dlfs.LeakyReLU(0.1))], dlfs.MeanSquaredError(), dtype=dtype
    )


def _hard_nested(depth: int) -> list:
    """A list nested ``depth`` levels below the top one: [[...[]...]]."""
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def _hard_self_referencing() -> dict:
    loop: dict = {}
    loop["again"] = loop
    return loop


def _hard_structure_size(tmp_path, meta: dict) -> int:
    """Bytes of the JSON description ``save`` writes for ``_hard_net()`` with ``meta``."""
    path = tmp_path / "probe.npz"
    dlfs.save(path, _hard_net(), meta=meta)
    size = _trust_raw(path)["__dlfs_structure__"].size
    path.unlink()
    return size


def _hard_layers(s: dict) -> list:
    return s["networks"]["net"]["layers"]


_W = "net.layers.0.w"

# (what to break in the JSON description, words the message must contain)
_HARD_DAMAGE = {
    "version_text": (lambda s: s.update(version="1"), "structure.version must be an integer"),
    "version_bool": (lambda s: s.update(version=True), "got a boolean"),
    "version_zero": (lambda s: s.update(version=0), "version must be >= 1"),
    "networks_list": (lambda s: s.update(networks=[]), "structure.networks must be an object"),
    "networks_extra": (
        lambda s: s["networks"].update(evil=s["networks"]["net"]),
        r"must be 'net' and optionally 'best', got \['evil', 'net'\]",
    ),
    "networks_only_best": (
        lambda s: s["networks"].update(best=s["networks"].pop("net")),
        r"must be 'net' and optionally 'best', got \['best'\]",
    ),
    "layers_object": (
        lambda s: s["networks"]["net"].update(layers={}),
        "networks.net.layers must be a list, got an object",
    ),
    "layer_number": (lambda s: _hard_layers(s).__setitem__(0, 3), r"layers\[0\] must be an object"),
    "layer_no_type": (lambda s: _hard_layers(s)[0].pop("type"), "must have a 'type' entry"),
    "layer_type_int": (lambda s: _hard_layers(s)[0].update(type=3), r"\.type must be a string"),
    "config_list": (lambda s: _hard_layers(s)[0].update(config=[]), r"\.config must be an object"),
    "layer_arrays_list": (
        lambda s: _hard_layers(s)[0].update(arrays=["w"]),
        r"\.arrays must be an object",
    ),
    "array_ref_int": (
        lambda s: _hard_layers(s)[0]["arrays"].update(w=3),
        r"arrays\['w'\] must be a string, got an integer",
    ),
    "array_ref_unknown": (
        lambda s: _hard_layers(s)[0]["arrays"].update(w="nope"),
        "names 'nope', which the file does not hold",
    ),
    "field_missing": (
        lambda s: _hard_layers(s)[0]["arrays"].pop("w"),
        r"must give Dense's fields \['w'\], got \['b'\]",
    ),
    "config_bad_value": (
        lambda s: _hard_layers(s)[1]["config"].update(alpha="x"),
        r"layers\[1\] \(LeakyReLU\): alpha must be a number, got str",
    ),
    "input_shape_text": (
        lambda s: s["networks"]["net"].update(input_shape="3"),
        "input_shape must be a list, got a string",
    ),
    "input_shape_items": (
        lambda s: s["networks"]["net"].update(input_shape=[3.5]),
        r"input_shape\[0\] must be an integer, got a number",
    ),
    "input_shape_chain": (
        lambda s: s["networks"]["net"].update(input_shape=[4]),
        "Dense expects inputs of shape",
    ),
    "loss_missing": (lambda s: s["networks"]["net"].pop("loss"), "must have a 'loss' entry"),
    "loss_list": (lambda s: s["networks"]["net"].update(loss=[]), r"\.loss must be an object"),
    "opt_missing": (lambda s: s.pop("opt_state"), "must have an 'opt_state' entry"),
    "opt_list": (lambda s: s.update(opt_state=[]), "opt_state must be an object, got a list"),
    "opt_count_text": (lambda s: s["opt_state"].update(count="0"), "count must be an integer"),
    "opt_count_negative": (lambda s: s["opt_state"].update(count=-1), "count >= 0"),
    "opt_lr_nan": (lambda s: s["opt_state"].update(lr=math.nan), "finite lr"),
    "opt_lr_text": (lambda s: s["opt_state"].update(lr="0.1"), "lr must be a number"),
    "opt_slots_object": (lambda s: s["opt_state"].update(slots={}), "slots must be a list"),
    "opt_slot_text": (
        lambda s: s["opt_state"]["slots"].__setitem__(0, "x"),
        r"slots\[0\] must be a list",
    ),
    "opt_slot_layer": (
        lambda s: s["opt_state"]["slots"][0].__setitem__(0, 5),
        r"slots\[0\]\[0\] must be a list",
    ),
    "opt_slot_name": (
        lambda s: s["opt_state"]["slots"][0][0].__setitem__(0, 5),
        r"slots\[0\]\[0\]\[0\] must be a string",
    ),
    "opt_slot_unknown": (
        lambda s: s["opt_state"]["slots"][0][0].__setitem__(0, "nope"),
        "names 'nope', which the file does not hold",
    ),
    "meta_list": (lambda s: s.update(meta=[]), "structure.meta must be an object, got a list"),
    "meta_missing": (lambda s: s.pop("meta"), "must have a 'meta' entry"),
    "dlfs_version_int": (lambda s: s.update(dlfs_version=3), "dlfs_version must be a string"),
    "arrays_list": (lambda s: s.update(arrays=[]), "structure.arrays must be an object"),
    "array_entry_list": (
        lambda s: s["arrays"].update({_W: []}),
        rf"arrays\['{_W}'\] must be an object",
    ),
    "array_shape_text": (
        lambda s: s["arrays"][_W].update(shape="x"),
        r"\.shape must be a list, got a string",
    ),
    "array_shape_negative": (
        lambda s: s["arrays"][_W].update(shape=[-3, 2]),
        r"shape must hold sizes >= 0, got \[-3, 2\]",
    ),
    "array_crc_text": (lambda s: s["arrays"][_W].update(crc32="x"), "crc32 must be an integer"),
    "array_dtype_int": (lambda s: s["arrays"][_W].update(dtype=4), "dtype must be a string"),
    "array_used_twice": (
        lambda s: s["opt_state"]["slots"][0][0].__setitem__(0, _W),
        "refers to its arrays inconsistently",
    ),
}


def _hard_npy_bytes(a: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, a)
    return buffer.getvalue()


def _hard_write_zip(path, members: list[tuple[str, bytes]]) -> None:
    with (
        warnings.catch_warnings(),  # zipfile warns about a duplicate name: that is the point
        zipfile.ZipFile(path, "w") as z,
    ):
        warnings.simplefilter("ignore")
        for name, data in members:
            z.writestr(name, data)


def _hard_fit_kwargs(epochs: int = 2) -> dict:
    x, y = _regression(n=16)
    return {"net": _linear_net(), "optimizer": dlfs.SGD(0.01), "x": x, "y": y, "epochs": epochs}


class _HardEpochs:
    """A ``progress`` factory that records the epochs fit started."""

    def __init__(self):
        self.started: list[str] = []

    def __call__(self, total, desc):
        self.started.append(desc)
        return self

    def update(self, k):
        pass

    def close(self):
        pass


_HARD_KILLED_SAVE = """
import os, sys, numpy as np
sys.path.insert(0, sys.argv[1])
import dlfs

def killed(file, arrays):
    np.savez(file, **arrays)
    file.flush()
    os.kill(os.getpid(), 9)  # SIGKILL mid-save: no except, no finally runs

dlfs._write_npz = killed
dlfs.save(sys.argv[2], dlfs.network(0, 3, [dlfs.dense(2)], dlfs.MeanSquaredError()))
"""


# argv: worktree, checkpoint path, "go" file (or "-": no waiting), network key
_WAITING_SAVE = """
import os, sys, time, numpy as np
sys.path.insert(0, sys.argv[1])
import dlfs

def waiting(file, arrays):
    np.savez(file, **arrays)
    while not os.path.exists(sys.argv[3]):  # mid-save until the test says go
        time.sleep(0.01)

if sys.argv[3] != "-":
    dlfs._write_npz = waiting
dlfs.save(sys.argv[2], dlfs.network(int(sys.argv[4]), 3, [dlfs.dense(2)], dlfs.MeanSquaredError()))
"""


# References in 40-digit decimal arithmetic; inputs are the float32/float64 grid
# values themselves (exact in Decimal), so the reference is the exact function
# of the input the layer received.
_DEC = decimal.Context(prec=40)


def _dec_sigmoid(x: decimal.Decimal) -> decimal.Decimal:
    if x >= 0:
        return _DEC.divide(1, 1 + _DEC.exp(-x))
    e = _DEC.exp(x)
    return _DEC.divide(e, 1 + e)


def _dec_log1p(e: decimal.Decimal) -> decimal.Decimal:
    """log(1 + e) to 40 digits also for tiny e (1 + e keeps all of e's digits)."""
    wide = decimal.Context(prec=_DEC.prec + max(0, -e.adjusted()))
    return wide.ln(wide.add(1, e))


def _dec_tanh(x: decimal.Decimal) -> decimal.Decimal:
    e = _DEC.exp(-2 * abs(x))
    t = _DEC.divide(1 - e, 1 + e)
    return t if x >= 0 else -t


_GELU_C = decimal.Decimal(2 / math.pi).sqrt(_DEC)  # the float64 constant dlfs uses, in Decimal


def _dec_gelu_parts(x: decimal.Decimal) -> tuple:
    """(2u, sigmoid(2u), 1 - sigmoid(2u), du/dx * 2) of the tanh-form GELU."""
    two_u = 2 * _GELU_C * (x + decimal.Decimal("0.044715") * x**3)
    two_du = 2 * _GELU_C * (1 + 3 * decimal.Decimal("0.044715") * x * x)
    return two_u, _dec_sigmoid(two_u), _dec_sigmoid(-two_u), two_du


def _tail_refs(name: str, x: decimal.Decimal) -> tuple[float, float, float, float]:
    """(value, gradient, value tolerance in eps, absolute gradient tolerance in eps)
    for activation ``name`` at ``x``.  Values keep relative precision; gradients
    are bounded by the magnitude of their terms: sums cancel (SiLU, GELU), and
    slopes taken from the cached output as PyTorch does (Sigmoid's y (1 - y),
    Tanh's 1 - y^2) round where y rounds to 1."""
    one = decimal.Decimal(1)
    if name == "Sigmoid":  # the slope y (1 - y) from the cached y: 1 - y rounds near 1
        s = _dec_sigmoid(x)
        g = s * _dec_sigmoid(-x)
        return float(s), float(g), 4.0, 4 * float(s)
    if name == "SiLU":
        s, c = _dec_sigmoid(x), _dec_sigmoid(-x)
        return float(x * s), float(s * (1 + x * c)), 4.0, 4 * float(s + abs(x * s * c))
    if name == "Tanh":
        t = _dec_tanh(x)
        return float(t), float(1 - t * t), 4.0, 4 * float(1 + t * t)
    if name == "ELU":
        if x > 0:
            return float(x), 1.0, 4.0, 4.0
        slope = decimal.Decimal("0.7") * _DEC.exp(x)
        return float(slope - decimal.Decimal("0.7")), float(slope), 4.0, 4 * float(slope)
    if name == "LeakyReLU":
        slope = one if x > 0 else decimal.Decimal("0.1")
        return float(slope * x), float(slope), 1.0, float(slope)
    if name == "GELU":
        # 2u is rounded in working precision: sigmoid(2u) then carries a relative
        # error of |2u| (1 - sigmoid(2u)) ulps, the conditioning of its argument.
        two_u, s, c, two_du = _dec_gelu_parts(x)
        cond = 4 * (1 + float(abs(two_u)))
        terms = float(abs(s) + abs(x * s * c * two_du))
        return float(x * s), float(s + x * s * c * two_du), cond, cond * terms
    raise AssertionError(name)


_TAIL_LAYERS = {
    "Sigmoid": dlfs.Sigmoid(),
    "SiLU": dlfs.SiLU(),
    "Tanh": dlfs.Tanh(),
    "ELU": dlfs.ELU(0.7),
    "LeakyReLU": dlfs.LeakyReLU(0.1),
    "GELU": dlfs.GELU(),
}


def _tail_grid(dtype) -> np.ndarray:
    """[-80, 80] for float32, [-700, 700] for float64, plus small magnitudes near 0."""
    if dtype == np.float32:
        wide, small = np.linspace(-80, 80, 321), np.geomspace(1e-6, 1, 13)
    else:
        wide = np.concatenate([np.linspace(-700, 700, 141), np.linspace(-40, 40, 161)])
        small = np.geomspace(1e-12, 1, 13)
    return np.concatenate([wide, small, -small, [0.0]]).astype(dtype)


def _wrong_layer_grads(layer, x, ctx, fix):
    """check_grads on ``layer`` with ``fix(dx, grads, cache, dy)`` applied to its backward."""
    n = len(layer.params())

    def f(x, *ps):
        lay = layer.with_params(ps) if n else layer
        y, cache, _ = lay.forward(x, ctx)

        def vjp(dy):
            dx, grads = lay.backward(cache, dy)
            return fix(dx, list(grads), cache, dy)

        return y, vjp

    return dlfs.check_grads(f, [x, *layer.params()], key=5)


def _bn_without_mean_term(layer):
    def fix(dx, grads, cache, dy):
        xhat, inv, _ = cache
        dxhat = dy * layer.gamma
        return [(dxhat - xhat * (dxhat * xhat).mean(0)) * inv, *grads]

    return fix


def _sensitivity_cases():
    rng = np.random.default_rng(3)
    dense = dlfs.Dense(rng.standard_normal((4, 4)), rng.standard_normal(4))
    x = rng.standard_normal((5, 4))
    bn = dlfs.BatchNorm(rng.uniform(0.5, 2, 4), rng.standard_normal(4), np.zeros(4), np.ones(4))
    pool_x = _conv_distinct((2, 3, 7, 7), 47)
    off = 1 + 1e-3
    return {
        "dense_dw_off_1e-3": (dense, x, dlfs.EVAL, lambda dx, g, c, dy: [dx, g[0] * off, g[1]]),
        "dense_dx_off_1e-3": (dense, x, dlfs.EVAL, lambda dx, g, c, dy: [dx * off, *g]),
        "dense_transposed_w": (dense, x, dlfs.EVAL, lambda dx, g, c, dy: [dy @ dense.w, *g]),
        "dense_missing_db": (dense, x, dlfs.EVAL, lambda dx, g, c, dy: [dx, g[0], 0 * g[1]]),
        "sigmoid_off_1e-3": (dlfs.Sigmoid(), x, dlfs.EVAL, lambda dx, g, c, dy: [dx * off]),
        "bn_missing_mean_term": (bn, x, dlfs.train_context(0), _bn_without_mean_term(bn)),
        "maxpool_off_1e-3": (
            dlfs.MaxPool2D(3, 1),
            pool_x,
            dlfs.EVAL,
            lambda dx, g, c, dy: [dx * off],
        ),
    }


def _hard_lookalikes(a: np.ndarray) -> dict:
    return {
        "matrix": np.asmatrix(a) if a.ndim == 2 else None,
        "masked": np.ma.masked_array(a, mask=np.zeros(a.shape, bool)),
        "unknown subclass": a.view(type("Sub", (np.ndarray,), {})),
    }


class _HalfOptimizer:
    """Has ``init`` but no ``update``."""

    def init(self, params):
        return dlfs.OptState(0, 0.1)


def _hard_moments(a: np.ndarray) -> tuple[float, float, int]:
    a = a.astype(np.float64).ravel()
    return float(a.mean()), float(a.var()), a.size


def _hard_schedule(active_steps: tuple[int, ...]):
    """A learning rate of 0.05 at the given steps and 0 elsewhere: with one batch
    per epoch, the validation loss improves exactly in those epochs (+1)."""
    return lambda step: 0.05 if step in active_steps else 0.0


def _hard_stop_run(active_steps, patience, **kw):
    x, y = _regression(n=16)
    net = _linear_net(hidden=False)
    return dlfs.fit(
        net,
        dlfs.SGD(_hard_schedule(active_steps)),
        x,
        y,
        epochs=12,
        batch_size=16,
        validation=(x, y),
        early_stopping=True,
        patience=patience,
        **kw,
    )


class _IdentityOptimizer:
    """A user's optimizer that checks nothing itself: returns the params."""

    def init(self, params):
        return dlfs.OptState(0, 0.0)

    def update(self, grads, state, params):
        return params, state


class _L1Loss:
    """A user's loss (not one fit knows): mean |p - t|."""

    def forward(self, pred, target):
        diff = pred - target
        return np.abs(diff).mean(), (np.sign(diff), diff.size)

    def backward(self, cache):
        sign, n = cache
        return sign / n


_SPEED_OPTIMIZERS = {
    "sgd": lambda: dlfs.SGD(0.05),
    "sgd-wd": lambda: dlfs.SGD(0.05, weight_decay=0.01),
    "momentum": lambda: dlfs.Momentum(0.05),
    "nesterov": lambda: dlfs.Nesterov(0.05),
    "adagrad": lambda: dlfs.AdaGrad(0.05),
    "rmsprop": lambda: dlfs.RMSProp(0.01),
    "adam": lambda: dlfs.Adam(0.01),
    "adamw": lambda: dlfs.AdamW(0.01),
    "chain": lambda: dlfs.chain(dlfs.ClipByGlobalNorm(0.5), dlfs.Adam(0.01), dlfs.MaxNorm(1.0)),
    "chain-sgd": lambda: dlfs.chain(dlfs.WeightDecay(0.01), dlfs.SGD(dlfs.StepDecay(0.1, 2))),
}


def _speed_batches(net: dlfs.Network, seed: int, n: int, steps: int) -> list:
    rng = np.random.default_rng(seed)
    shape = (n, *net.input_shape)
    return [
        (rng.standard_normal(shape).astype(net.dtype), _trust_targets(net, n, rng))
        for _ in range(steps)
    ]


def _speed_conv_net(seed: int, dtype) -> dlfs.Network:
    layers = [
        dlfs.conv2d(3, 3, padding=1, activation=dlfs.ReLU()),
        dlfs.MaxPool2D(2),
        dlfs.Flatten(),
        dlfs.dense(5, dlfs.ReLU()),
        dlfs.Dropout(0.3),
        dlfs.dense(3),
    ]
    return dlfs.network(seed, (2, 6, 6), layers, dlfs.SoftmaxCrossEntropy(), dtype=dtype)


class _UsersScale:
    """A user's layer (not dlfs's own): y = x * s, with one parameter s (D,)."""

    def __init__(self, s: np.ndarray, bad_grads: bool = False) -> None:
        self.s, self.bad_grads = s, bad_grads

    def params(self):
        return (self.s,)

    def with_params(self, params):
        return _UsersScale(params[0], self.bad_grads)

    def forward(self, x, ctx=dlfs.EVAL):
        return x * self.s, x, self

    def backward(self, cache, dy):
        ds = (dy * cache).sum(axis=0)
        return dy * self.s, ((ds[:-1] if self.bad_grads else ds),)

    def output_shape(self, in_shape):
        return tuple(in_shape)


class _UsersCounter:
    """A user's parameter-free layer with state: its forward in training returns
    a new layer that has counted one more pass."""

    def __init__(self, passes: int = 0) -> None:
        self.passes = passes

    def params(self):
        return ()

    def with_params(self, params):
        return self

    def forward(self, x, ctx=dlfs.EVAL):
        return x, None, _UsersCounter(self.passes + ctx.train)

    def backward(self, cache, dy):
        return dy, ()

    def output_shape(self, in_shape):
        return tuple(in_shape)


def test_users_layers_anywhere_get_their_gradients_and_keep_their_state():
    """A network's plan by layer types (which layer gets a key, which works in place,
    where the gradients start) takes a user's layer as unknown: one with parameters
    before dlfs's first still gets its gradient, and one that returns a new version
    of itself is kept in the new network, wherever it stands."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    dense, s = dlfs.Dense.init(0, 3, 2, dtype=np.float64), rng.standard_normal(3)
    net = dlfs.Network([_UsersScale(s), dense], dlfs.MeanSquaredError(), (3,))
    _, grads, _ = net.loss_and_grads(x, y, dlfs.train_context(0))
    dp = 2 * ((x * s) @ dense.w + dense.b - y) / len(x)
    np.testing.assert_allclose(grads[0][0], ((dp @ dense.w.T) * x).sum(axis=0), rtol=1e-12)
    net = dlfs.Network(
        [_UsersCounter(), dense, dlfs.ReLU(), _UsersCounter(5)], dlfs.MeanSquaredError(), (3,)
    )
    state = dlfs.train_step(dlfs.TrainState.create(net, dlfs.SGD(0.1)), (x, y))
    assert [getattr(layer, "passes", None) for layer in state.net.layers] == [1, None, None, 6]
    assert [layer.passes for layer in net.layers[::3]] == [0, 5]


class _UsersSGD:
    """A user's optimizer (duck-typed init/update)."""

    def init(self, params):
        return ()

    def update(self, grads, state, params):
        return dlfs._tree_map(lambda p, g: p - 0.1 * g, params, grads), state


def _speed_snapshot(*arrays) -> list:
    return [_snapshot(a) for a in arrays]


def _small_cnn_state(key: int = 0) -> dlfs.TrainState:
    specs = [
        dlfs.conv2d(3, 3, padding="same", activation=dlfs.ReLU()),
        dlfs.MaxPool2D(2),
        dlfs.conv2d(4, 3, padding=1, activation=dlfs.ReLU()),
        dlfs.MaxPool2D(2, stride=1),
        dlfs.Flatten(),
        dlfs.dense(3),
    ]
    net = dlfs.network(key, (2, 8, 8), specs, dlfs.SoftmaxCrossEntropy(), dtype=np.float32)
    return dlfs.TrainState.create(net, dlfs.SGD(0.1), key=key)


def _leaves(params: tuple) -> list[np.ndarray]:
    return [p for layer in params for p in layer]


_BANNER = re.compile(r"^# -{3,} (\S.*)$", re.M)


def _top_level_names(tree: ast.Module) -> dict[str, int]:
    """Line of each top-level definition or assignment in a module."""
    lines: dict[str, int] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            lines.setdefault(node.name, node.lineno)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    lines.setdefault(target.id, node.lineno)
    return lines


def _own_layer_block() -> str:
    (block,) = [b for b in _readme_blocks() if "class Swish" in b]
    return block


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler (KeyboardInterrupt), as in a terminal or a notebook,
    for one test: a job a shell starts in the background inherits SIGINT ignored, and
    then there is no Ctrl-C for fit to record."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


# ---- validation: bad input is refused by name (fuzz, look-alikes, construction)


def test_complex_hyperparameter_rejected_by_name():
    with pytest.raises(TypeError, match="lr"):
        dlfs.SGD(lr=np.complex128(0.1))


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_public_api_fuzz(data):
    target = data.draw(
        st.sampled_from(
            [
                "predict",
                "predict_bs",
                "forward",
                "loss_and_grads",
                "fit",
                "fit_hyper",
                "fit_lr",
                "train_step",
                "mse",
                "sce",
                "bce",
                "mae",
                "rmse",
                "accuracy",
                "update",
                "update_state",
                "optimizers",
                "layers",
                "batch_norm",
                "dense",
                "network",
                "network_shape",
                "one_hot",
                "permute",
                "to_2d",
                "save",
                "recurrent",
                "scan",
                "backward_scan",
                "embedding",
                "recurrent_spec",
            ]
        )
    )
    args = [data.draw(_trust_arrays()), data.draw(_trust_arrays()), data.draw(_TRUST_BAD_NUMBERS)]
    before = [_snapshot(x) for x in args]
    call = _trust_call(data.draw, target, args)
    with np.errstate(all="ignore"):
        try:
            call()
        except (ValueError, TypeError) as err:
            _assert_clear_error(err)
        except dlfs.NonFiniteError:  # huge learning rates / NaN data in a raw step
            assert target in ("fit_lr", "train_step")
    assert [_snapshot(x) for x in args] == before


def test_finite_check_of_a_large_input_sees_every_row():
    """Large inputs are checked for NaN/inf in chunks of rows (no whole-array mask)."""
    net = dlfs.network(0, 784, [dlfs.dense(2)], dlfs.SoftmaxCrossEntropy())
    x = np.zeros((1500, 784), np.float32)  # 1.2M elements: more than one chunk
    assert net.predict(x).shape == (1500, 2)
    for row, value in [(0, np.nan), (1337, np.inf), (1499, -np.inf)]:
        bad = x.copy()
        bad[row, 783] = value
        with pytest.raises(ValueError, match="NaN or inf"):
            net.predict(bad)


def test_messages_name_the_axes_and_the_value_given():
    with pytest.raises(ValueError, match=r"logits must have shape \(N, K\), got \(4,\)"):
        dlfs.SoftmaxCrossEntropy().forward(np.zeros(4), np.zeros(4, int))
    with pytest.raises(TypeError, match=r"got -1$"):
        dlfs.make_rng(-1)


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_ndarray_subclasses_are_refused_by_name():
    net = dlfs.network(0, 3, [dlfs.dense(2)], dlfs.SoftmaxCrossEntropy())
    x = np.ones((4, 3), np.float32)
    y = np.array([0, 1, 0, 1])
    scores = np.ones((4, 2), np.float32)
    for kind, bad in _hard_lookalikes(x).items():
        calls = {
            "x": [
                lambda b=bad: net.predict(b),
                lambda b=bad: net.forward(b),
                lambda b=bad: dlfs.Sigmoid().forward(b),
                lambda b=bad: dlfs.fit(net, dlfs.SGD(), b, y, epochs=1),
                lambda b=bad: dlfs.batches(b, y, 2),
            ],
            "w": [lambda b=bad: dlfs.Dense(b, np.zeros(3, np.float32))],
            "arrays[0]": [lambda b=bad: dlfs.permute(0, b)],
            "a": [lambda b=bad, k=kind: dlfs.to_2d(b if k == "matrix" else b[:, 0])],
        }
        for name, fns in calls.items():
            for fn in fns:
                with pytest.raises(TypeError, match=rf"{re.escape(name)} must be a (plain )?numpy"):
                    fn()
    for bad in _hard_lookalikes(scores).values():
        for fn, name in [
            (lambda b=bad: dlfs.accuracy(b, y), "pred"),
            (lambda b=bad: dlfs.accuracy(scores, b), "target"),
            (lambda b=bad: dlfs.mae(scores, b), "target"),
            (lambda b=bad: dlfs.MeanSquaredError().forward(b, scores), "pred"),
            (lambda b=bad: dlfs.SoftmaxCrossEntropy().forward(b, y), "logits"),
            (lambda b=bad: dlfs.binary_accuracy(scores, b), "target"),
        ]:
            with pytest.raises(TypeError, match=rf"{name} must be a (plain )?numpy"):
                fn()
    labels = np.array([0, 1, 2])
    for bad in _hard_lookalikes(labels).values():
        if bad is not None:
            with pytest.raises(TypeError, match="labels must be a plain numpy array"):
                dlfs.one_hot(bad, 3)
    params = net.params()
    grads = ((np.asmatrix(params[0][0]), params[0][1]),)
    with pytest.raises(ValueError, match=r"grads\[0\]\[0\] must be an array"):
        dlfs.SGD().update(grads, dlfs.SGD().init(params), params)


def _memmaps(tmp_path, **arrays):
    """Each array saved as .npy and loaded back memory-mapped, read-only ("r")."""
    out = {}
    for name, a in arrays.items():
        np.save(tmp_path / f"{name}.npy", a)
        out[name] = np.load(tmp_path / f"{name}.npy", mmap_mode="r")
        assert type(out[name]) is np.memmap and not out[name].flags.writeable
    return out


def _same_nets(a: dlfs.Network, b: dlfs.Network) -> bool:
    return all(np.array_equal(p, q) for p, q in zip(a._flat_params(), b._flat_params()))


def test_memmap_data_trains_predicts_and_evaluates_bit_identically(tmp_path):
    # data larger than memory comes as np.memmap (np.load(..., mmap_mode="r")): accepted,
    # with the results of its plain copy; matrix and masked arrays stay refused (above)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((37, 4)).astype(np.float32)
    y = rng.integers(0, 3, 37)
    m = _memmaps(tmp_path, x=x, y=y, xv=x[:9], yv=y[:9])
    net = dlfs.network(
        1, 4, [dlfs.dense(5, dlfs.ReLU()), dlfs.dense(3)], dlfs.SoftmaxCrossEntropy()
    )
    kw = dict(epochs=2, batch_size=8, seed=3)
    got, got_h = dlfs.fit(net, dlfs.Adam(1e-2), m["x"], m["y"], validation=(m["xv"], m["yv"]), **kw)
    want, want_h = dlfs.fit(net, dlfs.Adam(1e-2), x, y, validation=(x[:9], y[:9]), **kw)
    assert _same_nets(got, want) and got_h.as_dict() == want_h.as_dict()
    for batch_size in (None, 10):
        p = net.predict(m["x"], batch_size=batch_size)
        assert type(p) is np.ndarray and np.array_equal(p, net.predict(x, batch_size=batch_size))
    assert net.evaluate(m["x"], m["y"]) == net.evaluate(x, y)
    out, _, _ = net.forward(m["x"])
    assert type(out) is np.ndarray and np.array_equal(out, net.forward(x)[0])
    state = dlfs.train_step(dlfs.TrainState.create(net, dlfs.SGD(0.1)), (m["x"], m["y"]))
    plain = dlfs.train_step(dlfs.TrainState.create(net, dlfs.SGD(0.1)), (x, y))
    assert _same_nets(state.net, plain.net)
    for (xb, yb), (xp, yp) in zip(
        dlfs.batches(m["x"], m["y"], 8, key=1), dlfs.batches(x, y, 8, key=1)
    ):
        assert type(xb) is np.ndarray and np.array_equal(xb, xp) and np.array_equal(yb, yp)
    px, py = dlfs.permute(2, m["x"], m["y"])
    assert type(py) is np.ndarray
    assert type(px) is np.ndarray and np.array_equal(px, dlfs.permute(2, x, y)[0])
    # layers: weights loaded memory-mapped become plain read-only copies that save;
    # a sequence (N, T, D) memmap goes through Dense per step; token ids may be mapped too
    w = _memmaps(tmp_path, w=net.layers[0].w, b=net.layers[0].b, seq=x.reshape(37, 1, 4))
    dense = dlfs.Dense(w["w"], w["b"])
    assert type(dense.w) is np.ndarray and not dense.w.flags.writeable
    dlfs.save(tmp_path / "dense.npz", dlfs.Network([dense], dlfs.MeanSquaredError(), (4,)))
    assert np.array_equal(dense.forward(w["seq"])[0], dense.forward(x.reshape(37, 1, 4))[0])
    ids = rng.integers(0, 7, (5, 6))
    lm = _char_lm()
    assert np.array_equal(lm.predict(_memmaps(tmp_path, ids=ids)["ids"]), lm.predict(ids))


def test_array_valued_options_get_a_type_error_by_name():
    option = np.array(["col", "row"])
    cases = [
        (lambda: dlfs.to_2d(np.zeros(3), kind=option), "kind must be the string"),
        (lambda: dlfs.to_2d(np.zeros(3), kind=None), "kind must be the string"),
        (lambda: dlfs.Momentum(0.1, nesterov=np.array(True)), "nesterov"),
        (lambda: dlfs.Dense.init(0, 2, 3, init=np.ones((2, 3))), "init must be an initializer"),
        (lambda: dlfs.Dense.init(0, 2, 3, bias_init="zeros"), "bias_init must be an initializer"),
        (lambda: dlfs.Conv2D.init(0, 1, 2, 3, init=3), "init must be an initializer"),
        (lambda: dlfs.dense(3, init=np.ones(3)), "init must be an initializer"),
        (lambda: dlfs.conv2d(3, 3, bias_init=0.0), "bias_init must be an initializer"),
        (lambda: dlfs.Dense.init(0, 2, 3, init=lambda r, s, d: np.ones(s)), "init.* dtype float32"),
        (lambda: dlfs.Dense.init(0, 2, 3, init=lambda r, s, d: [1.0]), "init.* numpy array"),
    ]
    for call, words in cases:
        with pytest.raises(TypeError, match=words):
            call()
    with pytest.raises(ValueError, match=r"init\(rng, shape, dtype\) must return shape \(2, 3\)"):
        dlfs.Dense.init(0, 2, 3, init=lambda r, s, d: np.ones((3, 2), d))
    with pytest.raises(ValueError, match="kind must be 'col' or 'row'"):
        dlfs.to_2d(np.zeros(3), kind="column")
    assert dlfs.to_2d(np.zeros(3), kind="row").shape == (1, 3)


def test_direct_construction_checks_every_array_against_the_first():
    """A layer built from ready arrays checks each one's shape and dtype against
    the array that fixes them (gamma, w, w_hh): BatchNorm's beta, mean and var,
    Conv2D's b, a recurrent layer's w_ih and b, GRU's b_hn."""
    f32 = np.ones(3, np.float32)
    good = {"gamma": f32, "beta": f32, "mean": f32, "var": f32}
    assert dlfs.BatchNorm(**good).var.dtype == np.float32
    for name in ("beta", "mean", "var"):
        with pytest.raises(ValueError, match=rf"{name} must have shape \(3,\), got \(4,\)"):
            dlfs.BatchNorm(**{**good, name: np.ones(4, np.float32)})
        with pytest.raises(
            TypeError, match=rf"{name} must have dtype float32 \(the network's\), got float64"
        ):
            dlfs.BatchNorm(**{**good, name: np.ones(3)})
    with pytest.raises(ValueError, match=r"gamma must be 1-D \(C,\), got shape \(1, 3\)"):
        dlfs.BatchNorm(**{k: v[None] for k, v in good.items()})
    w = np.ones((2, 1, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"b must have shape \(2,\), got \(3,\)"):
        dlfs.Conv2D(w, f32)
    with pytest.raises(TypeError, match="b must have dtype float32"):
        dlfs.Conv2D(w, np.ones(2))
    rnn = dlfs.GRU.init(0, 4, 3)
    arrays = {"w_ih": rnn.w_ih, "w_hh": rnn.w_hh, "b": rnn.b, "b_hn": rnn.b_hn}
    for name, bad in [("w_ih", rnn.w_ih[:, :-1]), ("b", rnn.b[:-1]), ("b_hn", rnn.b_hn[:-1])]:
        with pytest.raises(ValueError, match=rf"{name} must have shape"):
            dlfs.GRU(**{**arrays, name: bad})
        with pytest.raises(TypeError, match=rf"{name} must have dtype float32"):
            dlfs.GRU(**{**arrays, name: arrays[name].astype(np.float64)})


def test_dense_refuses_inputs_and_dys_of_other_ranks_by_name():
    """Dense's per-call fast path takes only (N, D) rows: 1-D and 4-D x and dy get
    dlfs's messages (mutation seed 1207), never numpy's IndexError or a silent
    GEMM over the wrong axes."""
    dense = dlfs.Dense.init(0, 3, 2)
    for x, shape in [
        (np.ones(3, np.float32), r"\(N, 3\), got \(3,\)"),
        (np.ones((2, 3, 4, 3), np.float32), r"\(N, 3\), got \(2, 3, 4, 3\)"),
    ]:
        with pytest.raises(ValueError, match=rf"x must have shape {shape}"):
            dense.forward(x)
    _, cache, _ = dense.forward(np.ones((4, 3), np.float32))
    for dy in (np.ones(2, np.float32), np.ones((4, 2, 2), np.float32)):
        with pytest.raises(ValueError, match=r"dy must have shape \(4, 2\), got"):
            dense.backward(cache, dy)


def test_construction_time_checks():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 2)).astype(np.float32)
    with pytest.raises(ValueError, match=r"b must have shape \(2,\), got \(3,\)"):
        dlfs.Dense(w, np.zeros(3, np.float32))
    with pytest.raises(TypeError, match="b must have dtype float32"):
        dlfs.Dense(w, np.zeros(2))
    with pytest.raises(ValueError, match="w must be 2-D"):
        dlfs.Dense(np.zeros(3, np.float32), np.zeros(3, np.float32))
    dense = dlfs.Dense(w, np.zeros(2, np.float32))
    _, cache, _ = dense.forward(np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match=r"dy must have shape \(4, 2\), got \(4, 3\)"):
        dense.backward(cache, np.ones((4, 3), np.float32))
    with pytest.raises(TypeError, match=r"layers\[1\] must be a layer"):
        dlfs.Network([dense, "relu"], dlfs.MeanSquaredError(), (3,))
    with pytest.raises(TypeError, match="loss must be a loss"):
        dlfs.Network([dense], dlfs.ReLU(), (3,))
    net = dlfs.Network([dense], dlfs.MeanSquaredError(), (3,))
    with pytest.raises(TypeError, match=r"ctx must be a dlfs\.Context"):
        net.forward(np.ones((4, 3), np.float32), "train")
    with pytest.raises(ValueError, match="caches must be the tuple of 1 caches"):
        net.backward(3, np.ones((4, 2), np.float32))
    with pytest.raises(ValueError, match="caches must be the tuple of 1 caches"):
        net.backward((), np.ones((4, 2), np.float32))
    with pytest.raises(ValueError, match=r"params for ReLU must be a sequence of 0 arrays"):
        dlfs.ReLU().with_params((w,))
    with pytest.raises(ValueError, match="x must have a batch axis"):
        dlfs.ReLU().forward(np.ones((), np.float32))
    with pytest.raises(ValueError, match="chain needs exactly one optimizer, got 0"):
        dlfs.chain(dlfs.ClipByGlobalNorm(1.0), _HalfOptimizer())
    with pytest.raises(TypeError, match="optimizer must have init/update"):
        dlfs.TrainState.create(net, _HalfOptimizer())
    with pytest.raises(ValueError, match="shape must be 2-D or 4-D"):
        dlfs.glorot_normal(np.random.default_rng(0), (2, 3, 4))


def test_large_inputs_are_checked_for_nan_in_every_chunk():
    """Over 2^20 elements _check_finite goes through row chunks: a bad value in
    the first, a middle and the last row is found, with rows of uneven length."""
    for width in (3000, 2**20 + 5):  # many rows per chunk; one row over a chunk
        rows = (2**21) // width + 2
        net = dlfs.network(0, width, [dlfs.dense(1)], dlfs.MeanSquaredError())
        x = np.zeros((rows, width), np.float32)
        assert net.predict(x, batch_size=None).shape == (rows, 1)
        for row in (0, rows // 2, rows - 1):
            bad = x.copy()
            bad[row, width // 3] = np.nan
            with pytest.raises(ValueError, match="x contains NaN or inf"):
                net.predict(bad, batch_size=None)


def test_closed_bounds_accept_their_end_points():
    assert dlfs.BatchNorm.init(2, momentum=1.0).momentum == 1.0
    assert dlfs.BatchNorm.init(2, momentum=0.0).momentum == 0.0
    assert dlfs.SoftmaxCrossEntropy(1.0).label_smoothing == 1.0
    assert dlfs.RMSProp(alpha=1.0).alpha == 1.0 and dlfs.StepDecay(0.1, 2, gamma=1.0)(5) == 0.1
    assert dlfs.LeakyReLU(0.0).alpha == 0.0 and dlfs.Dropout(0.0).p == 0.0
    with pytest.raises(ValueError, match=r"p must be in \[0.0, 1.0\)"):
        dlfs.Dropout(1.0)
    with pytest.raises(ValueError, match=r"momentum must be in \[0.0, 1.0\]"):
        dlfs.BatchNorm.init(2, momentum=1.0 + 1e-12)


def test_more_construction_messages():
    w = np.ones((2, 1, 3, 3), np.float32)
    for padding in [((1, 1), (1, 1), (1, 1)), ((1, 1),)]:
        with pytest.raises(
            ValueError, match=r"padding must be \(\(top, bottom\), \(left, right\)\)"
        ):
            dlfs.Conv2D(w, np.zeros(2, np.float32), padding=padding)
    with pytest.raises(ValueError, match=r"conv2d expects images \(N, C, H, W\)"):
        dlfs.network(0, 5, [dlfs.conv2d(2, 3)], dlfs.MeanSquaredError())
    with pytest.raises(ValueError, match="eps must be in"):
        dlfs.batch_norm(eps=0.0)
    with pytest.raises(ValueError, match="momentum must be in"):
        dlfs.batch_norm(momentum=2.0)
    with pytest.raises(ValueError, match="pred must have a batch axis"):
        dlfs.MeanSquaredError().forward(np.zeros(()), np.zeros(()))
    with pytest.raises(ValueError, match=r"use dlfs.to_2d\(target\) for a column"):
        dlfs.MeanSquaredError().forward(np.zeros((3, 1)), np.zeros(3))
    with pytest.raises(ValueError, match=r"dlfs never broadcasts a loss$"):
        dlfs.MeanSquaredError().forward(np.zeros((3, 1)), np.zeros((3, 2)))


def test_finite_check_of_targets_with_no_columns():
    """A float y of shape (N, 0) has no values to check (the finite check must not
    divide by its row size): the shape check after it names the mistake."""
    net = _hard_net()
    x = np.zeros((4, 3), np.float32)
    with pytest.raises(
        ValueError, match=r"y must have shape \(N, 2\) \(the network.s output\), got \(4, 0\)"
    ):
        net.evaluate(x, np.zeros((4, 0), np.float32))


def test_dense_checks_the_feature_axis_when_rows_equal_features():
    """The fast shape check reads the feature axis: x (3, 4) into Dense(3 -> 2), whose
    row count happens to equal n_in, is refused by name, as is dy (2, 5) of a batch of 2."""
    dense = dlfs.Dense.init(0, 3, 2)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 3\), got \(3, 4\)"):
        dense.forward(np.ones((3, 4), np.float32))
    _, cache, _ = dense.forward(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"dy must have shape \(2, 2\), got \(2, 5\)"):
        dense.backward(cache, np.ones((2, 5), np.float32))


# -------------- randomness: keys, split, make_rng and the train/eval context


def test_keys_and_context():
    assert dlfs.split(7, 2) == ((7, 0), (7, 1))
    a = dlfs.make_rng((7, 0)).standard_normal(3)
    np.testing.assert_array_equal(a, dlfs.make_rng((7, 0)).standard_normal(3))
    assert not np.array_equal(a, dlfs.make_rng(7).standard_normal(3))
    assert dlfs.train_context(3) == dlfs.Context(train=True, key=(3,))
    assert not dlfs.EVAL.train and dlfs.EVAL.key is None


def test_keys_may_hold_numpy_integers():
    assert dlfs.split((np.int64(3), np.uint8(1)), 2) == ((3, 1, 0), (3, 1, 1))
    a = dlfs.make_rng((np.int64(5), 2)).random(3)
    np.testing.assert_array_equal(a, dlfs.make_rng((5, 2)).random(3))
    with pytest.raises(TypeError, match="key must be"):
        dlfs.split((True, 1), 2)


def test_keys_are_plain_ints():
    for key in [(np.int64(3), np.uint8(1)), (3, 1), 3]:
        for sub in dlfs.split(key, 2):
            assert all(type(k) is int for k in sub)
    for bad in [(1.5,), (3, 1.0), (-1,), ()]:
        with pytest.raises(TypeError, match="key must be a non-negative int"):
            dlfs.make_rng(bad)


def test_checked_keys_are_returned_as_they_are():
    """A tuple of non-negative ints is already a key: returned as is (the per-step
    fast path), zeros included, as split's first sub-key has one."""
    for key in ((0,), (7, 0), *dlfs.split((0,), 3), (3, 1)):
        assert dlfs._as_key("key", key) is key


# --------------- display: reprs, HTML tables, summaries and plots for people


def test_summary_and_repr():
    net = _boston_like()
    text = str(net.summary())
    for word in ("Dense", "Sigmoid", "182", "14", "196", "Total"):
        assert word in text
    assert "(N, 13)" in text and "(N, 1)" in text
    assert repr(net.summary()) == text  # a notebook's plain-text view is the table too
    r = repr(net)
    assert r == "Network((13,) -> (1,), 3 layers, 196 params, float32, MeanSquaredError)"
    assert "array" not in repr(net.layers[0]) and "array" not in repr(dlfs.BatchNorm.init(3))


def test_history_repr_html_dict_and_numbers_for_people():
    records = tuple(
        dlfs.EpochRecord(e, 1 / (e + 2), 2 / (e + 3) if e % 2 == 0 else None, 0.5 + e / 1000)
        for e in range(1, 201)
    )
    records = tuple(attrs.evolve(r, val_metric=None) if r.val_loss is None else r for r in records)
    h = dlfs.History(records, best_epoch=200, metric="accuracy", steps=12345)
    text = repr(h)
    assert text == (
        "History(200 epochs, 12,345 steps, completed; train_loss 0.00495, val_loss 0.009852, "
        "val_accuracy 0.7, best epoch 200)"
    )
    columns = h.as_dict()
    assert list(columns) == ["epoch", "train_loss", "val_loss", "val_accuracy"]
    assert all(len(v) == 200 for v in columns.values())
    assert columns["train_loss"][0] == 1 / 3  # full precision in the data
    assert math.isnan(columns["val_loss"][0]) and columns["val_loss"][1] == 2 / 5
    table = _parse_html(h._repr_html_())
    assert table["caption"] == text
    assert table["header"] == ["epoch", "train_loss", "val_loss", "val_accuracy"]
    assert len(table["rows"]) == 21 and table["rows"][10] == ["…"] * 4  # first/last ten
    assert table["rows"][0] == ["1", "0.3333", "", ""] and table["rows"][1][2] == "0.4"
    for n, shown in [(20, 20), (21, 21)]:  # all of 20 epochs; 21 as first ten, "…", last ten
        rows = _parse_html(dlfs.History(records[:n])._repr_html_())["rows"]
        assert len(rows) == shown and (rows[10] == ["…"] * len(rows[0])) == (n > 20), n
    assert dlfs.History().as_dict() == {"epoch": [], "train_loss": []}
    assert repr(dlfs.History()) == "History(0 epochs, 0 steps, completed)"
    assert repr(records[0]) == "EpochRecord(epoch=1, train_loss=0.3333)"
    with pytest.raises(ValueError, match="stop_reason"):
        dlfs.History(stop_reason="bored")


def test_history_plot_returns_a_figure_and_needs_matplotlib(monkeypatch, tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")  # no display needed
    x, y = _trust_fit_data()
    _, h = dlfs.fit(_i11_net(), dlfs.Adam(1e-2), x, y, epochs=3, validation=(x, y))
    fig = h.plot()
    assert type(fig).__name__ == "Figure" and len(fig.axes) == 2
    assert tuple(fig.get_size_inches()) == (9.0, 3.5)  # two panels side by side
    assert fig.axes[1].get_ylabel() == "accuracy"
    assert [len(line.get_xdata()) for line in fig.axes[0].lines][:2] == [3, 3]
    fig.savefig(tmp_path / "h.png")  # renders without pyplot or a display (Agg)
    assert (tmp_path / "h.png").stat().st_size > 1000
    _, h_mse = dlfs.fit(_linear_net(), dlfs.SGD(0.01), *_regression(n=16), epochs=2)
    assert len(h_mse.plot().axes) == 1
    assert tuple(h_mse.plot().get_size_inches()) == (5.0, 3.5)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        h.plot()


def test_network_repr_summary_and_html():
    sys.path.insert(0, str(HERE / "examples"))
    try:
        cnn = importlib.import_module("mnist_cnn").build(0)
    finally:
        sys.path.remove(str(HERE / "examples"))
    text = repr(cnn)
    assert text == (
        "Network((1, 28, 28) -> (10,), 11 layers, 421,642 params, float32, SoftmaxCrossEntropy)"
    )
    summary = cnn.summary()
    assert isinstance(summary, dlfs.Summary) and summary.total == 421642
    lines = str(summary).splitlines()
    assert lines[0] == text and lines[-1] == "Total params: 421,642"
    assert any(line.endswith("401,536") for line in lines)  # 3136 x 128 + 128, separated
    table = _parse_html(cnn._repr_html_())
    assert table["caption"] == text and table["header"] == ["Layer", "Output shape", "Params"]
    assert table["rows"][0] == ["Input", "(N, 1, 28, 28)", ""]
    assert table["rows"][-1] == ["Total params", "", "421,642"]
    assert [r[0] for r in table["rows"][1:-1]] == [repr(layer) for layer in cnn.layers]
    smoothing = dlfs.network(0, 3, [dlfs.dense(2)], dlfs.SoftmaxCrossEntropy(0.1))
    assert repr(smoothing).endswith("float64, SoftmaxCrossEntropy(label_smoothing=0.1))") is False
    assert repr(smoothing).endswith("float32, SoftmaxCrossEntropy(label_smoothing=0.1))")


def test_html_is_escaped():
    @attrs.frozen(eq=False)
    class Sneaky(dlfs.ReLU):
        def __repr__(self):
            return "<script>alert('x & y')</script>"

    net = dlfs.network(0, 3, [dlfs.dense(2), Sneaky()], dlfs.MeanSquaredError())
    markup = net._repr_html_()
    assert "<script>" not in markup and "&lt;script&gt;" in markup
    assert _parse_html(markup)["rows"][2][0] == "<script>alert('x & y')</script>"
    h = dlfs.History(metric="<b>")
    assert "<b>" not in h._repr_html_()


def test_checkpoint_repr_and_html(tmp_path):
    x, y = _regression(n=64)
    net, path = _linear_net(hidden=False), tmp_path / "run.npz"
    kw = dict(batch_size=8, validation=(x[:32], -y[:32]), checkpoint=path)  # val loss rises
    dlfs.fit(net, dlfs.SGD(0.05), x, y, epochs=2, **kw)
    ckpt = dlfs.load(path)
    assert ckpt.best is not None
    text = repr(ckpt)
    assert text == (
        "Checkpoint(Network((3,) -> (1,), 1 layer, 4 params, float32, MeanSquaredError); "
        "with best network; opt_state step 16; fit epoch 2; "
        f"format version 1, written by dlfs {dlfs.__version__})"
    )
    assert len(text) < 200 and "array" not in text
    table = _parse_html(ckpt._repr_html_())
    assert table["header"] == ["field", "value"]
    assert [r[0] for r in table["rows"]] == ["net", "opt_state", "best", "fit", "format"]
    dlfs.save(path, net, meta={"note": "<x>", "run": 3, "long": "y" * 100, "lr": [0.1, 0.01]})
    plain = dlfs.load(path)
    assert repr(plain).endswith(  # keys in the file's (sorted) order, long values cut
        "; meta long='yyyyyyyyyyyyyyyyyyyy..., lr=[0.1, 0.01], note='<x>', run=3; "
        f"format version 1, written by dlfs {dlfs.__version__})"
    )
    rows = dict(_parse_html(plain._repr_html_())["rows"])  # values shown, escaped
    assert rows["meta"].endswith("note='<x>', run=3") and "<x>" not in plain._repr_html_()


def test_summary_table_is_aligned():
    net = dlfs.network(
        0, 13, [dlfs.dense(13, dlfs.Sigmoid()), dlfs.dense(1)], dlfs.MeanSquaredError()
    )
    lines = str(net.summary()).splitlines()
    table = lines[1:-1]  # between the title and the total
    assert len({len(line) for line in table}) == 1  # every row as wide as the rule
    assert sum(line.startswith("Layer") for line in lines) == 1  # the header once


# -------------------- initializers: statistics and documented random streams


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(300, 120), (24, 10, 5, 3)])
def test_initializer_statistics(dtype, shape):
    """Mean, variance and bounds within 5 standard errors of the target
    distribution (fixed seeds: the checks are exact repeats, not flaky)."""
    if len(shape) == 2:
        fan_in, fan_out = shape
    else:
        fan_in, fan_out = shape[1] * shape[2] * shape[3], shape[0] * shape[2] * shape[3]
    rng = np.random.default_rng(11)
    normal_var = {
        dlfs.normal: 1.0,
        dlfs.glorot_normal: 2 / (fan_in + fan_out),
        dlfs.he_normal: 2 / fan_in,
    }
    for init, var in normal_var.items():
        a = init(rng, shape, dtype)
        assert a.dtype == dtype and a.shape == shape
        mean, sample_var, n = _hard_moments(a)
        assert abs(mean) <= 5 * math.sqrt(var / n)
        assert abs(sample_var - var) <= 5 * var * math.sqrt(2 / (n - 1))
    for init, bound in {
        dlfs.glorot_uniform: math.sqrt(6 / (fan_in + fan_out)),
        dlfs.he_uniform: math.sqrt(6 / fan_in),
    }.items():
        a = init(rng, shape, dtype)
        assert a.dtype == dtype and a.shape == shape
        mean, sample_var, n = _hard_moments(a)
        var = bound**2 / 3
        assert np.abs(a).max() <= bound
        assert a.max() >= bound * (1 - 20 / n) and a.min() <= -bound * (1 - 20 / n)
        assert abs(mean) <= 5 * math.sqrt(var / n)
        assert abs(sample_var - var) <= 5 * math.sqrt(4 * bound**4 / (45 * n))
    assert not dlfs.zeros(rng, shape, dtype).any() and dlfs.zeros(rng, shape, dtype).dtype == dtype


def _positive_zero(a: np.ndarray) -> bool:
    """All entries are +0.0: ``==`` and the doctests' NUMBER flag cannot tell -0.0."""
    return not a.any() and not np.signbit(a).any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_zero_dlfs_starts_from_is_a_positive_zero(dtype):
    rng = dlfs.make_rng(0)
    z = dlfs.zeros(rng, (3, 4), dtype)
    assert z.dtype == dtype and z.shape == (3, 4) and _positive_zero(z)
    layers = [
        dlfs.conv2d(2, 3, padding="same"),
        dlfs.batch_norm(),
        dlfs.Flatten(),
        dlfs.dense(4),
        dlfs.batch_norm(),
        dlfs.dense(2),
    ]
    net = dlfs.network(0, (1, 4, 4), layers, dlfs.MeanSquaredError(), dtype=dtype)
    conv, bn2d, _, dense, bn, _ = net.layers
    for a in (conv.b, dense.b, bn2d.beta, bn2d.mean, bn.beta, bn.mean):
        assert a.dtype == dtype and _positive_zero(a)
    assert np.array_equal(bn.var, np.ones(4)) and np.array_equal(bn.gamma, np.ones(4))
    rnn, lstm, gru = (cls.init(0, 3, 2, dtype=dtype) for cls in (dlfs.RNN, dlfs.LSTM, dlfs.GRU))
    assert all(_positive_zero(b) for b in (rnn.b, gru.b, gru.b_hn, lstm.b[:2], lstm.b[4:]))
    assert np.array_equal(lstm.b[2:4], np.ones(2))  # the forget gate's bias starts at 1
    for layer in (rnn, lstm, gru):  # the zero initial state
        assert all(_positive_zero(s) for s in layer._zeros(2))
    params = net.params()
    for opt in (dlfs.Momentum(), dlfs.AdaGrad(), dlfs.RMSProp(), dlfs.Adam()):
        for slot in opt.init(params).slots:
            assert all(_positive_zero(a) for layer in slot for a in layer)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_initializers_draw_their_documented_streams(dtype):
    """Same key, same weights: each initializer is its formula over one documented draw."""
    shape, (fan_in, fan_out) = (5, 7), (5, 7)
    expected = {
        dlfs.normal: lambda g: g.standard_normal(shape, dtype=dtype),
        dlfs.glorot_normal: lambda g: (
            g.standard_normal(shape, dtype=dtype) * math.sqrt(2 / (fan_in + fan_out))
        ),
        dlfs.he_normal: lambda g: g.standard_normal(shape, dtype=dtype) * math.sqrt(2 / fan_in),
        dlfs.glorot_uniform: lambda g: (
            (g.random(shape, dtype=dtype) * 2 - 1) * math.sqrt(6 / (fan_in + fan_out))
        ),
        dlfs.he_uniform: lambda g: (g.random(shape, dtype=dtype) * 2 - 1) * math.sqrt(6 / fan_in),
    }
    for init, formula in expected.items():
        got = init(np.random.default_rng(4), shape, dtype)
        np.testing.assert_array_equal(got, formula(np.random.default_rng(4)))


@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (4, 4)])
def test_orthogonal_is_q_of_the_qr_with_a_positive_diagonal(shape):
    """w is the Q of g = Q R, g a standard normal (max, min) draw, with diag(R) > 0:
    the unique such Q, uniformly distributed (not the sign choice of one LAPACK)."""
    rows, cols = shape
    w = dlfs.orthogonal(np.random.default_rng(4), shape, np.float64)
    g = np.random.default_rng(4).standard_normal((max(shape), min(shape)))
    q = w if rows >= cols else w.T
    assert w.shape == shape and q.shape == g.shape
    np.testing.assert_allclose(q.T @ q, np.eye(min(shape)), atol=1e-12)
    r = q.T @ g  # R = Q^T g: upper triangular, positive diagonal
    np.testing.assert_allclose(np.tril(r, -1), 0.0, atol=1e-12)
    assert np.all(np.diag(r) > 0)


# ---- layers: Dense and friends - shapes, dtypes, gradients, read-only arrays


@pytest.mark.parametrize("name", LAYER_CASES)
@settings(max_examples=30, deadline=None)
@given(seed=SEEDS, n=SIZES, d=SIZES, dtype=DTYPES)
def test_layer_shapes_dtypes_and_purity(name, seed, n, d, dtype):
    layer, x, ctx, out_shape = _make_case(name, seed, n, d, dtype)
    x_copy = x.copy()
    before = [a.copy() for a in _arrays(layer)]

    y, cache, new_layer = layer.forward(x, ctx)

    assert y.shape == out_shape
    assert tuple(layer.output_shape(x.shape[1:])) == out_shape[1:]
    assert y.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(x, x_copy)
    for a, b in zip(_arrays(layer), before):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
        assert not a.flags.writeable
    for a in _arrays(new_layer):
        assert not a.flags.writeable
        assert a.dtype == np.dtype(dtype)
    if not name.startswith("BatchNorm-train"):
        assert new_layer is layer

    dy = np.random.default_rng(seed + 1).standard_normal(y.shape).astype(dtype)
    dy_copy = dy.copy()
    dx, grads = layer.backward(cache, dy)
    dx2, grads2 = layer.backward(cache, dy)
    np.testing.assert_array_equal(dy, dy_copy)
    assert dx.shape == x.shape and dx.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(dx, dx2)
    assert len(grads) == len(layer.params()) == len(grads2)
    for g, g2, p in zip(grads, grads2, layer.params()):
        assert g.shape == p.shape and g.dtype == p.dtype
        np.testing.assert_array_equal(g, g2)
    for a, b in zip(_arrays(layer), before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", LAYER_CASES)
@settings(max_examples=20, deadline=None)
@given(seed=SEEDS, n=SIZES, d=SIZES)
def test_layer_gradients_match_finite_differences(name, seed, n, d):
    layer, x, ctx, _ = _make_case(name, seed, n, d, np.float64)
    err = dlfs.check_layer(layer, x, ctx, key=seed % 997)
    assert err < 1e-5


def test_dense_forward_is_affine():
    rng = np.random.default_rng(1)
    w, b, x = rng.standard_normal((3, 2)), rng.standard_normal(2), rng.standard_normal((4, 3))
    y, _, _ = dlfs.Dense(w, b).forward(x)
    np.testing.assert_allclose(y, x @ w + b, rtol=1e-14)


def test_layer_arrays_are_read_only_and_copied():
    w = np.ones((2, 3))
    layer = dlfs.Dense(w, np.zeros(3))
    w[0, 0] = 5.0  # the caller's array is copied, not aliased
    assert layer.w[0, 0] == 1.0
    with pytest.raises(ValueError, match="read-only"):
        layer.w[0, 0] = 2.0
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        layer.w = np.zeros((2, 3))


def test_layer_bad_input():
    layer = dlfs.Dense.init(0, 3, 2)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 3\)"):
        layer.forward(np.zeros((4, 5), np.float32))
    with pytest.raises(TypeError, match="float32"):
        layer.forward(np.zeros((4, 3), np.float64))
    with pytest.raises(TypeError, match="x must be a float32 or float64"):
        layer.forward(np.zeros((4, 3), np.int64))
    with pytest.raises(TypeError, match="numpy array"):
        layer.forward([[0.0, 0.0, 0.0]])
    with pytest.raises(TypeError, match="x must be a float"):
        dlfs.ReLU().forward(np.zeros((2, 2), complex))
    with pytest.raises(ValueError, match="params"):
        layer.with_params((np.zeros((3, 2), np.float32),))
    with pytest.raises(ValueError, match="shape"):
        layer.with_params((np.zeros((2, 2), np.float32), np.zeros(2, np.float32)))
    with pytest.raises(TypeError, match="dtype"):
        layer.with_params((np.zeros((3, 2)), np.zeros(2)))
    with pytest.raises(TypeError, match="float32 or float64"):
        dlfs.Dense(np.zeros((2, 2), int), np.zeros(2, int))
    with pytest.raises(ValueError, match="alpha"):
        dlfs.LeakyReLU(-1.0)
    with pytest.raises(TypeError, match="dtype"):
        dlfs.Dense.init(0, 2, 2, dtype=np.int32)


def test_read_only_views_of_writeable_arrays_are_copied():
    base = np.ones((2, 3))
    view = base[:]
    view.setflags(write=False)  # read-only, but its base can still change
    layer = dlfs.Dense(view, np.zeros(3))
    base[0, 0] = 5.0
    assert layer.w[0, 0] == 1.0
    owned = np.ones(3)
    owned.setflags(write=False)  # owns its data and is read-only: kept as it is
    assert dlfs.Dense(np.ones((2, 3)), owned).b is owned


def test_softmax_layer_checks_its_input():
    with pytest.raises(ValueError, match=r"x must have shape \(N, K\), got \(3,\)"):
        dlfs.Softmax().forward(np.zeros(3))
    with pytest.raises(TypeError, match="x must be a float32 or float64 array"):
        dlfs.Softmax().forward(np.zeros((2, 3), np.int64))


# --------------------------- activations: formulas, kinks and accurate tails


@pytest.mark.parametrize(
    ("layer", "formula"),
    [
        (dlfs.Linear(), lambda x: x),
        (dlfs.Sigmoid(), lambda x: 1 / (1 + np.exp(-x))),
        (dlfs.Tanh(), np.tanh),
        (dlfs.ReLU(), lambda x: np.where(x > 0, x, 0.0)),
        (dlfs.LeakyReLU(0.2), lambda x: np.where(x > 0, x, 0.2 * x)),
        (dlfs.ELU(0.5), lambda x: np.where(x > 0, x, 0.5 * (np.exp(x) - 1))),
        (
            dlfs.GELU(),
            lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
        ),
        (dlfs.SiLU(), lambda x: x / (1 + np.exp(-x))),
        (dlfs.Softmax(), lambda x: np.exp(x) / np.exp(x).sum(axis=1, keepdims=True)),
    ],
)
def test_activation_values_match_formulas(layer, formula):
    x = _away_from_zero(np.random.default_rng(0), (5, 4)) * 2
    y, _, _ = layer.forward(x)
    np.testing.assert_allclose(y, formula(x), rtol=1e-12, atol=1e-14)


def test_relu_kink_conventions():
    x = np.array([[-1.0, 0.0, 1.0]])
    _, cache, _ = dlfs.ReLU().forward(x)
    np.testing.assert_array_equal(dlfs.ReLU().backward(cache, np.ones_like(x))[0], [[0, 0, 1]])
    leaky = dlfs.LeakyReLU()
    assert leaky.alpha == 0.01
    _, cache, _ = leaky.forward(x)
    np.testing.assert_array_equal(leaky.backward(cache, np.ones_like(x))[0], [[0.01, 0.01, 1]])


@pytest.mark.parametrize("name", sorted(_TAIL_LAYERS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_activation_tails_keep_relative_precision(name, dtype):
    x = _tail_grid(dtype)
    layer = _TAIL_LAYERS[name]
    y, cache, _ = layer.forward(x[None, :])
    dx, _ = layer.backward(cache, np.ones_like(x)[None, :])
    assert y.dtype == dtype and dx.dtype == dtype
    eps, tiny = float(np.finfo(dtype).eps), float(np.finfo(dtype).smallest_normal)
    for xi, yi, gi in zip(x.tolist(), y[0].tolist(), dx[0].tolist()):
        with decimal.localcontext(_DEC):
            value, grad, value_tol, grad_tol = _tail_refs(name, decimal.Decimal(xi))
        if abs(value) >= tiny:
            assert abs(yi - value) <= value_tol * eps * abs(value), (xi, yi, value)
        else:  # below the normal range only absolute precision exists
            assert abs(yi - value) <= tiny, (xi, yi, value)
        assert abs(gi - grad) <= grad_tol * eps + tiny, (xi, gi, grad)


def test_sigmoid_family_is_not_rounded_to_zero_in_the_left_tail():
    x = np.array([[-17.0, -40.0, -80.0]], np.float32)
    s = dlfs.Sigmoid().forward(x)[0]
    assert (s > 0).all() and s[0, 2] == pytest.approx(math.exp(-80), rel=1e-6)
    bce_net = dlfs.Network([dlfs.Linear()], dlfs.BinaryCrossEntropy(), (3,))
    np.testing.assert_allclose(bce_net.predict_proba(x), s, rtol=1e-6)
    silu = dlfs.SiLU().forward(x)[0]
    assert silu[0, 1] == pytest.approx(-40 * math.exp(-40), rel=1e-6)
    gelu = dlfs.GELU().forward(np.array([[-5.0]], np.float32))[0]
    u = math.sqrt(2 / math.pi) * (-5 - 0.044715 * 125)
    assert gelu[0, 0] == pytest.approx(-5 / (1 + math.exp(-2 * u)), rel=1e-5)


def test_softmax_of_extreme_logits():
    x = np.array([[1000.0, -1000.0, 0.0], [-1000.0, -1000.0, -1000.0], [1000.0, 1000.0, -1000.0]])
    for dtype in (np.float32, np.float64):
        y, cache, _ = dlfs.Softmax().forward(x.astype(dtype))
        expected = [[1, 0, 0], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0]]
        np.testing.assert_allclose(y, expected, rtol=4 * np.finfo(dtype).eps, atol=0)
        dy = np.array([[1.0, 2.0, 3.0], [1.0, 0.0, -1.0], [2.0, -2.0, 5.0]], dtype)
        dx, _ = dlfs.Softmax().backward(cache, dy)
        assert np.isfinite(dx).all()
        np.testing.assert_allclose(dx, y * (dy - (dy * y).sum(1, keepdims=True)), atol=1e-6)
        logits = x.astype(dtype)
        loss, _ = dlfs.SoftmaxCrossEntropy().forward(logits, np.array([0, 1, 2]))
        expected_loss = (0 + math.log(3) + 2000 + math.log(2)) / 3
        assert np.isfinite(loss) and loss == pytest.approx(expected_loss, rel=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_small_probabilities_keep_relative_precision(dtype):
    limit = 80 if dtype == np.float32 else 700
    z = np.linspace(0, limit, 41).astype(dtype)
    x = np.stack([z, np.zeros_like(z), -z], axis=1)
    y = dlfs.Softmax().forward(x)[0]
    eps, tiny = float(np.finfo(dtype).eps), float(np.finfo(dtype).smallest_normal)
    for row, out in zip(x.tolist(), y.tolist()):
        with decimal.localcontext(_DEC):
            exps = [_DEC.exp(decimal.Decimal(v) - decimal.Decimal(max(row))) for v in row]
            refs = [float(e / sum(exps)) for e in exps]
        for v, yi, ref in zip(row, out, refs):
            if ref >= tiny:  # exp(z - max) amplifies the rounding of z - max by |z - max|
                assert abs(yi - ref) <= 4 * eps * (1 + abs(v - max(row))) * ref, (row, yi, ref)
            else:
                assert abs(yi) <= tiny


def _math_erf(x: np.ndarray) -> np.ndarray:
    return np.array([math.erf(v) for v in np.asarray(x, np.float64).ravel()]).reshape(x.shape)


def _gelu_exact(x: np.ndarray) -> np.ndarray:
    return dlfs.GELU("none").forward(x)[0]


def _gelu_exact_grad(x: np.ndarray) -> np.ndarray:
    gelu = dlfs.GELU("none")
    return gelu.backward(gelu.forward(x)[1], np.ones_like(x))[0]


def test_erf_float64_matches_math_erf_over_whole_range():
    """Every interval of the msun method and its bounds, subnormals to huge: within 2 ulp."""
    x = np.concatenate(
        [
            np.linspace(-6.0, 6.0, 120_001),
            np.array([0.84375, 1.25, 1 / 0.35, 6.0, 2.0**-28]),
            np.linspace(6.0, 40.0, 1001),
            np.logspace(-310, 300, 6101),  # down to subnormals, up to huge
            np.array([5e-324, 1e-320, 2.2250738585072014e-308, 1.7976931348623157e308]),
        ]
    )
    x = np.concatenate([x, -x])
    want = _math_erf(x)
    assert (np.abs(dlfs._erf(x) - want) / np.spacing(np.abs(want))).max() <= 2.0


@given(st.floats(allow_nan=False, allow_infinity=False, width=64))
def test_erf_float64_matches_math_erf_on_any_float(v):
    got, want = dlfs._erf(np.array([v]))[0], math.erf(v)
    assert abs(got - want) <= 2 * np.spacing(abs(want))
    assert math.copysign(1.0, got) == math.copysign(1.0, want)  # keeps the sign of -0.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_erf_special_values_and_odd_symmetry(dtype):
    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e30, -1e30], dtype=dtype)
    y = dlfs._erf(x)
    np.testing.assert_array_equal(y, np.array([0, 0, 1, -1, np.nan, 1, -1], dtype=dtype))
    np.testing.assert_array_equal(np.signbit(y[:2]), [False, True])
    z = np.random.default_rng(0).standard_normal((3, 50)).astype(dtype) * dtype(3)
    np.testing.assert_array_equal(dlfs._erf(-z), -dlfs._erf(z))
    assert dlfs._erf(z).dtype == dtype and dlfs._erf(z).shape == z.shape


def test_erf_float32_accuracy():
    """float32's one rational: within 4e-7 absolute, never beyond +-1, relative near 0."""
    x = np.concatenate(
        [np.linspace(-5.0, 5.0, 200_001, dtype=np.float32), np.float32([3.8325, 1e-30, 1e-45])]
    )
    y = dlfs._erf(x)
    assert np.abs(y.astype(np.float64) - _math_erf(x)).max() <= 4e-7
    assert np.abs(y).max() <= 1.0
    tiny = np.logspace(-30, -4, 1001, dtype=np.float32)
    assert np.abs(dlfs._erf(tiny).astype(np.float64) / _math_erf(tiny) - 1.0).max() <= 4e-7


@given(seed=st.integers(0, 2**32 - 1), scale=st.sampled_from([0.1, 1.0, 3.0, 10.0]))
def test_exact_gelu_matches_a_math_erf_reference(seed, scale):
    """x Phi(x) in float64 (1 + erf cancels for negative x: the error is relative to
    max(|x|, 1)); float32 within 4e-7 of it; input untouched, dtype kept."""
    x = scale * np.random.default_rng(seed).standard_normal((3, 7))
    want = np.array([0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x.ravel()])
    want = want.reshape(x.shape)
    x.setflags(write=False)
    assert np.all(np.abs(_gelu_exact(x) - want) <= 1e-15 * np.maximum(np.abs(x), 1.0))
    y32 = _gelu_exact(x.astype(np.float32))
    assert y32.dtype == np.float32
    assert np.all(np.abs(y32 - want) <= 4e-7 * np.maximum(np.abs(x), 1.0) + 1e-6 * abs(want))


def test_exact_gelu_slope_at_known_points():
    """d/dx x Phi(x) = Phi(x) + x phi(x): 1/2 at 0, 1 far right, 0 far left."""
    np.testing.assert_array_equal(_gelu_exact_grad(np.array([[0.0, 40.0, -40.0]])), [[0.5, 1, 0]])
    assert repr(dlfs.GELU("none")) == "GELU(approximate='none')" and repr(dlfs.GELU()) == "GELU()"
    with pytest.raises(ValueError, match="approximate"):
        dlfs.GELU("exact")


def test_exact_gelu_matches_torch_float64():
    """Same values and autograd gradient as torch.nn.functional.gelu(approximate="none")."""
    torch = pytest.importorskip("torch", reason="PyTorch is an optional comparison")
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [np.linspace(-40.0, 40.0, 8001)]
        + [scale * rng.standard_normal(2000) for scale in (1e-8, 0.1, 1.0, 3.0, 10.0)]
    )[None]
    t = torch.tensor(x, requires_grad=True)
    y = torch.nn.functional.gelu(t, approximate="none")
    y.backward(torch.ones_like(t))
    tol = 1e-15 * np.maximum(np.abs(x), 1.0)
    assert np.all(np.abs(_gelu_exact(x) - y.detach().numpy()) <= tol)
    assert np.all(np.abs(_gelu_exact_grad(x) - t.grad.numpy()) <= 1e-15)


# --------------------------------- Dropout: drop probability, scale and keys


def test_dropout_identity_cases():
    x = np.random.default_rng(0).standard_normal((6, 5))
    y, _, _ = dlfs.Dropout(0.0).forward(x, dlfs.train_context(1))
    np.testing.assert_array_equal(y, x)
    y, _, _ = dlfs.Dropout(0.5).forward(x, dlfs.EVAL)
    np.testing.assert_array_equal(y, x)
    y, cache, _ = dlfs.Dropout(0.5).forward(x, dlfs.EVAL)
    np.testing.assert_array_equal(dlfs.Dropout(0.5).backward(cache, x)[0], x)


def test_dropout_training_needs_key_and_valid_p():
    x = np.ones((2, 2))
    with pytest.raises(ValueError, match="key"):
        dlfs.Dropout(0.5).forward(x, dlfs.Context(train=True))
    for p in (1.0, -0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="p must be in"):
            dlfs.Dropout(p)
    with pytest.raises(TypeError, match="p must be a number"):
        dlfs.Dropout("0.5")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("p", [0.1, 0.3, 0.7])
def test_dropout_rate_scale_and_key(dtype, p):
    x = np.random.default_rng(2).uniform(1.0, 2.0, (200, 500)).astype(dtype)
    layer = dlfs.Dropout(p)
    y, _, _ = layer.forward(x, dlfs.train_context(5))
    assert y.dtype == np.dtype(dtype)
    dropped = y == 0
    assert abs(dropped.mean() - p) < 0.01
    np.testing.assert_allclose(y[~dropped], x[~dropped] / (1 - p), rtol=1e-6)
    y_same, _, _ = layer.forward(x, dlfs.train_context(5))
    np.testing.assert_array_equal(y, y_same)
    y_other, _, _ = layer.forward(x, dlfs.train_context(6))
    assert not np.array_equal(y, y_other)


# ------------------ BatchNorm: PyTorch's running statistics, train then eval


@pytest.mark.parametrize("shape", [(5, 3), (2, 3, 4, 2), (1, 2, 3, 3)])
@pytest.mark.parametrize("momentum", [0.1, 0.5])
def test_batchnorm_training_matches_pytorch_convention(shape, momentum):
    rng = np.random.default_rng(3)
    c = shape[1]
    layer = dlfs.BatchNorm(
        rng.uniform(0.5, 2, c),
        rng.standard_normal(c),
        rng.standard_normal(c),
        rng.uniform(0.5, 2, c),
        momentum=momentum,
    )
    before = [a.copy() for a in _arrays(layer)]
    x = rng.standard_normal(shape) * 3 + 1
    y, _, new = layer.forward(x, dlfs.train_context(0))
    want_y, want_mean, want_var = _bn_expected(layer, x)
    np.testing.assert_allclose(y, want_y, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(new.mean, want_mean, rtol=1e-12)
    np.testing.assert_allclose(new.var, want_var, rtol=1e-12)
    for a, b in zip(_arrays(layer), before):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(new.gamma, layer.gamma)


def test_batchnorm_init_and_eval_uses_running_stats():
    bn = dlfs.BatchNorm.init(3)
    np.testing.assert_array_equal(bn.var, np.ones(3, np.float32))
    np.testing.assert_array_equal(bn.mean, np.zeros(3, np.float32))
    assert bn.momentum == 0.1 and bn.eps == 1e-5 and bn.gamma.dtype == np.float32
    rng = np.random.default_rng(4)
    layer = dlfs.BatchNorm(
        rng.uniform(0.5, 2, 3), rng.standard_normal(3), rng.standard_normal(3), rng.uniform(1, 2, 3)
    )
    x = rng.standard_normal((4, 3)) * 5
    y, _, same = layer.forward(x, dlfs.EVAL)
    assert same is layer
    want = (x - layer.mean) / np.sqrt(layer.var + layer.eps) * layer.gamma + layer.beta
    np.testing.assert_allclose(y, want, rtol=1e-12)
    # a single row in eval mode is fine (no batch statistics)
    layer.forward(x[:1], dlfs.EVAL)


def test_batchnorm_train_then_eval_sequence():
    bn = dlfs.BatchNorm.init(2, dtype=np.float64)
    rng = np.random.default_rng(5)
    mean, var = np.zeros(2), np.ones(2)
    for _ in range(3):
        x = rng.standard_normal((6, 2)) * 2 + 3
        _, _, bn = bn.forward(x, dlfs.train_context(0))
        mean = 0.9 * mean + 0.1 * x.mean(0)
        var = 0.9 * var + 0.1 * x.var(0, ddof=1)
    np.testing.assert_allclose(bn.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(bn.var, var, rtol=1e-12)


def test_batchnorm_bad_input():
    bn = dlfs.BatchNorm.init(3, dtype=np.float64)
    with pytest.raises(ValueError, match="more than one value"):
        bn.forward(np.ones((1, 3)), dlfs.train_context(0))
    with pytest.raises(ValueError, match="more than one value"):
        bn.forward(np.ones((1, 3, 1, 1)), dlfs.train_context(0))
    with pytest.raises(ValueError, match="BatchNorm with 3 features"):
        bn.forward(np.ones((4, 2)), dlfs.EVAL)
    with pytest.raises(TypeError, match="float64"):
        bn.forward(np.ones((4, 3), np.float32), dlfs.EVAL)
    with pytest.raises(ValueError, match="momentum"):
        dlfs.BatchNorm.init(3, momentum=1.5)
    with pytest.raises(ValueError, match="eps"):
        dlfs.BatchNorm.init(3, eps=0.0)
    with pytest.raises(ValueError, match="n_features"):
        dlfs.BatchNorm.init(0)


def test_batchnorm_parameters_must_be_vectors():
    m = np.ones((2, 3))
    with pytest.raises(ValueError, match=r"gamma must be 1-D \(C,\), got shape \(2, 3\)"):
        dlfs.BatchNorm(m, m * 0, m * 0, m)


# ---- sequences: Embedding, RNN, LSTM, GRU - PyTorch parity, gradients, checks


@pytest.mark.parametrize("kind", _KINDS)
@settings(max_examples=15, deadline=None)
@given(
    seed=SEEDS, n=st.integers(1, 4), t=st.integers(1, 5), d=st.integers(1, 4), h=st.integers(1, 4)
)
def test_scan_gradients_for_input_initial_state_and_weights(kind, seed, n, t, d, h):
    """Finite differences (float64) through ``scan``/``backward_scan``: the loss reads
    every output step and the last state, and moves x, the initial state and every weight."""
    layer = _recurrent(kind, seed, d, h, np.float64)
    rng = np.random.default_rng(seed)
    x, state = rng.standard_normal((n, t, d)), _parts(kind, _state(kind, rng, n, h))

    def f(x, *rest):
        lay = layer.with_params(rest[len(state) :])
        ys, last, cache = lay.scan(x, rest[: len(state)] if kind == "LSTM" else rest[0])
        out = np.concatenate([ys.ravel(), *(p.ravel() for p in _parts(kind, last))])

        def vjp(dy):
            dlast = tuple(p.reshape(n, h) for p in np.split(dy[ys.size :], len(state)))
            dx, d0, grads = lay.backward_scan(
                cache, dy[: ys.size].reshape(ys.shape), dlast if kind == "LSTM" else dlast[0]
            )
            return (dx, *_parts(kind, d0), *grads)

        return out, vjp

    assert dlfs.check_grads(f, [x, *state, *layer.params()], key=seed % 997) < 1e-6


@pytest.mark.parametrize("kind", _KINDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scan_state_and_forward_agree(kind, dtype):
    """forward == scan from zeros; the last state is ys[:, -1]; the state and the input
    are untouched; a state carried across two segments gives the whole sequence's
    outputs, and backward through the segments (the second's d(initial state) fed to the
    first as d(last state)) gives the whole sequence's gradients (truncated BPTT, exact)."""
    rng = np.random.default_rng(3)
    n, t, d, h = 3, 6, 4, 5
    layer = _recurrent(kind, 3, d, h, dtype, return_sequences=True)
    x = rng.standard_normal((n, t, d)).astype(dtype)
    state = _state(kind, rng, n, h, dtype)
    snap = [_snapshot(a) for a in (x, *_parts(kind, state))]
    y, _, same = layer.forward(x)
    ys, last, cache = layer.scan(x, None)
    assert same is layer and y.dtype == np.dtype(dtype) and ys.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(y, ys)
    np.testing.assert_array_equal(_parts(kind, last)[0], ys[:, -1])
    last_only = attrs.evolve(layer, return_sequences=False).forward(x)[0]
    np.testing.assert_array_equal(last_only, ys[:, -1])

    ys, last, cache = layer.scan(x, state)
    ys1, mid, c1 = layer.scan(x[:, :2], state)
    ys2, last2, c2 = layer.scan(x[:, 2:], mid)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == np.float32 else {"rtol": 1e-12}
    np.testing.assert_allclose(np.concatenate([ys1, ys2], axis=1), ys, **tol)
    for a, b in zip(_parts(kind, last2), _parts(kind, last)):
        np.testing.assert_allclose(a, b, **tol)
    assert [_snapshot(a) for a in (x, *_parts(kind, state))] == snap

    dys = rng.standard_normal(ys.shape).astype(dtype)
    dx, d0, grads = layer.backward_scan(cache, dys)
    dx2, dmid, g2 = layer.backward_scan(c2, dys[:, 2:])
    dx1, d0_seg, g1 = layer.backward_scan(c1, dys[:, :2], dmid)
    np.testing.assert_allclose(np.concatenate([dx1, dx2], axis=1), dx, **tol)
    for a, b in zip(_parts(kind, d0_seg), _parts(kind, d0)):
        np.testing.assert_allclose(a, b, **tol)
    for a, b1, b2 in zip(grads, g1, g2):
        assert a.dtype == np.dtype(dtype)
        np.testing.assert_allclose(a, b1 + b2, **tol)
    again = layer.backward_scan(cache, dys)
    for a, b in zip(
        (dx, *_parts(kind, d0), *grads), (again[0], *_parts(kind, again[1]), *again[2])
    ):
        np.testing.assert_array_equal(a, b)


def test_backward_scan_refuses_no_gradient_at_all():
    """dys and dstate may not both be None, nor may an LSTM's dstate be (None, None):
    zero gradients from no upstream gradient would hide a caller's bug.  One part of
    the pair is enough."""
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    for cls, nothing in [
        (dlfs.RNN, None),
        (dlfs.GRU, None),
        (dlfs.LSTM, None),
        (dlfs.LSTM, (None, None)),
    ]:
        layer = cls.init(0, 4, 5)
        _, _, cache = layer.scan(x)
        with pytest.raises(
            ValueError,
            match=re.escape(
                f"backward_scan needs dys or dstate, got dys=None and dstate={nothing!r}"
            ),
        ):
            layer.backward_scan(cache, None, nothing)
    dh = np.ones((2, 5), np.float32)
    dx, (_, dc0), _ = dlfs.LSTM.init(0, 4, 5).backward_scan(cache, None, (None, dh))
    assert dx.shape == x.shape and np.abs(dx).sum() > 0 and dc0.shape == (2, 5)


@pytest.mark.parametrize("kind", _KINDS)
def test_recurrent_layers_match_pytorch(kind):
    """Outputs, last state and every gradient (x, initial state, weights) agree with
    torch.nn.RNN/LSTM/GRU through the weight mapping the docstrings give, both ways."""
    torch = pytest.importorskip("torch")
    n, t, d, h = 3, 7, 4, 5
    rng = np.random.default_rng(1)
    module = _torch_layer(torch, kind, d, h)
    layer = _from_torch(kind, module, h)
    x, state = rng.standard_normal((n, t, d)), _state(kind, rng, n, h)
    xt = torch.tensor(x, requires_grad=True)
    st_t = [torch.tensor(p[None], requires_grad=True) for p in _parts(kind, state)]
    out, last_t = module(xt, tuple(st_t) if kind == "LSTM" else st_t[0])
    ys, last, cache = layer.scan(x, state)
    np.testing.assert_allclose(ys, out.detach().numpy(), rtol=1e-12, atol=1e-12)
    last_t = _parts(kind, last_t)
    for a, b in zip(_parts(kind, last), last_t):
        np.testing.assert_allclose(a, b.detach().numpy()[0], rtol=1e-12, atol=1e-12)

    dys, dlast = rng.standard_normal(ys.shape), rng.standard_normal((n, h))
    loss = (out * torch.from_numpy(dys)).sum() + (last_t[0][0] * torch.from_numpy(dlast)).sum()
    loss.backward()
    dx, d0, (dw_ih, dw_hh, db, *db_hn) = layer.backward_scan(
        cache, dys, (dlast, None) if kind == "LSTM" else dlast
    )
    close = functools.partial(np.testing.assert_allclose, rtol=1e-10, atol=1e-12)
    close(dx, xt.grad.numpy())
    for a, b in zip(_parts(kind, d0), st_t):
        close(a, b.grad.numpy()[0])
    close(dw_ih, module.weight_ih_l0.grad.numpy().T)
    close(dw_hh, module.weight_hh_l0.grad.numpy().T)
    close(db, module.bias_ih_l0.grad.numpy())  # b enters where bias_ih does
    if kind == "GRU":
        close(db_hn[0], module.bias_hh_l0.grad.numpy()[2 * h :])

    # dlfs -> torch, in float32 this time: a freshly drawn dlfs layer
    ours = getattr(dlfs, kind).init(5, d, h, return_sequences=True, dtype=np.float32)
    if kind == "GRU":
        ours = ours.with_params([*ours.params()[:3], np.full(h, 0.3, np.float32)])
    theirs = getattr(torch.nn, kind)(d, h, batch_first=True)
    _to_torch(torch, ours, theirs)
    x32 = x.astype(np.float32)
    with torch.no_grad():
        expected = theirs(torch.from_numpy(x32))[0].numpy()
    np.testing.assert_allclose(ours.forward(x32)[0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", _KINDS)
def test_float32_gradients_match_float64(kind):
    """The float32 scan and its gradients (x, initial state, weights) stay float32 and
    agree with the finite-difference-checked float64 ones to float32 precision."""
    rng = np.random.default_rng(2)
    n, t, d, h = 4, 5, 3, 6
    layer64 = _recurrent(kind, 2, d, h, np.float64)
    layer32 = type(layer64)(*(p.astype(np.float32) for p in layer64.params()))
    x, state = rng.standard_normal((n, t, d)), _state(kind, rng, n, h)
    dys, dlast = rng.standard_normal((n, t, h)), rng.standard_normal((n, h))
    runs = []
    for lay, dt in ((layer64, np.float64), (layer32, np.float32)):
        st32 = tuple(p.astype(dt) for p in _parts(kind, state))
        ys, last, cache = lay.scan(x.astype(dt), st32 if kind == "LSTM" else st32[0])
        dl = dlast.astype(dt)
        dx, d0, grads = lay.backward_scan(cache, dys.astype(dt), (dl, dl) if kind == "LSTM" else dl)
        runs.append([ys, *_parts(kind, last), dx, *_parts(kind, d0), *grads])
    for a, b in zip(*runs):
        assert b.dtype == np.float32 and a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(a).max()))


def test_recurrent_init_conventions():
    """Glorot-uniform w_ih, orthogonal w_hh blocks, zero biases but the LSTM's forget gate
    (forget_bias, default 1.0); same key, same weights."""
    h, d = 6, 4
    for kind, gates in (("RNN", 1), ("LSTM", 4), ("GRU", 3)):
        layer = getattr(dlfs, kind).init(7, d, h, dtype=np.float64)
        assert layer.w_ih.shape == (d, gates * h) and layer.w_hh.shape == (h, gates * h)
        assert np.abs(layer.w_ih).max() <= math.sqrt(6 / (d + gates * h))
        for k in range(gates):
            block = layer.w_hh[:, k * h : (k + 1) * h]
            np.testing.assert_allclose(block.T @ block, np.eye(h), atol=1e-12)
        again = getattr(dlfs, kind).init(7, d, h, dtype=np.float64)
        for a, b in zip(layer.params(), again.params()):
            np.testing.assert_array_equal(a, b)
        expected_b = np.zeros(gates * h)
        if kind == "LSTM":
            expected_b[h : 2 * h] = 1.0
        np.testing.assert_array_equal(layer.b, expected_b)
        assert not layer.return_sequences and layer.w_hh.flags.writeable is False
    assert np.all(dlfs.LSTM.init(0, 2, 3, forget_bias=0.0).b == 0)
    h0, c0 = dlfs.LSTM.init(0, 2, 3).initial_state(4)
    assert h0.shape == c0.shape == (4, 3) and h0.dtype == np.float32 and not h0.any()
    assert dlfs.GRU.init(0, 2, 3, dtype=np.float64).initial_state(2).shape == (2, 3)
    with pytest.raises(ValueError, match="n must be >= 1"):
        dlfs.RNN.init(0, 2, 3).initial_state(0)
    lstm = dlfs.network(0, (5, 2), [dlfs.lstm(3, forget_bias=2.5)], dlfs.MeanSquaredError())
    np.testing.assert_array_equal(lstm.layers[0].b[3:6], 2.5)
    wide = dlfs.orthogonal(dlfs.make_rng(0), (3, 5), np.float32)
    assert wide.dtype == np.float32
    np.testing.assert_allclose(wide @ wide.T, np.eye(3), atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        dlfs.orthogonal(dlfs.make_rng(0), (2, 2, 2))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gate_sigmoid_is_accurate_in_both_tails(dtype):
    z = np.linspace(-80 if dtype == np.float32 else -700, 30, 2001).astype(dtype)
    exact = np.array([1 / (1 + math.exp(-float(v))) for v in z])
    got = dlfs._sigmoid(z)
    assert got.dtype == np.dtype(dtype)
    eps = np.finfo(dtype).eps
    assert np.all(np.abs(got - exact) <= 4 * eps * exact)  # relative, even near 0
    with np.errstate(all="raise"):  # the overflow of exp(-z) far in the tail is silenced
        assert dlfs._sigmoid(np.array([-1e4, 1e4], dtype)).tolist() == [0.0, 1.0]


@pytest.mark.parametrize("kind", _KINDS)
def test_long_sequence_gradient_with_clipping_stays_finite(kind):
    """50 steps, weights three times larger than at init (float32): the network's
    gradients stay finite, and global-norm clipping bounds them."""
    rng = np.random.default_rng(0)
    spec = {"RNN": dlfs.rnn, "LSTM": dlfs.lstm, "GRU": dlfs.gru}[kind]
    net = dlfs.network(0, (50, 2), [spec(16), dlfs.dense(1)], dlfs.MeanSquaredError())
    net = net.with_params([tuple(3 * p for p in layer) for layer in net.params()])
    x = rng.standard_normal((8, 50, 2)).astype(np.float32)
    y = rng.standard_normal((8, 1)).astype(np.float32)
    loss, grads, _ = net.loss_and_grads(x, y)
    assert np.isfinite(loss) and all(np.isfinite(g).all() for layer in grads for g in layer)

    def norm(tree):
        return math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for lay in tree for g in lay))

    clipped = dlfs.ClipByGlobalNorm(1.0)(grads, net.params())
    assert norm(grads) > 1.0 and norm(clipped) <= 1.0 + 1e-5
    assert all(g.dtype == np.float32 for lay in clipped for g in lay)
    opt = dlfs.chain(dlfs.ClipByGlobalNorm(1.0), dlfs.SGD(0.5))
    state = functools.reduce(dlfs.train_step, [(x, y)] * 3, dlfs.TrainState.create(net, opt))
    assert all(np.isfinite(p).all() for layer in state.net.params() for p in layer)


def test_recurrent_bad_input():
    lstm = dlfs.LSTM.init(0, 3, 4)
    x = np.zeros((2, 5, 3), np.float32)
    with pytest.raises(ValueError, match=r"x must have shape \(N, T, 3\)"):
        lstm.forward(np.zeros((2, 5, 4), np.float32))
    with pytest.raises(ValueError, match="x must have shape"):
        lstm.forward(np.zeros((2, 3), np.float32))
    with pytest.raises(TypeError, match="x must have dtype float32"):
        lstm.forward(x.astype(np.float64))
    with pytest.raises(TypeError, match="x must be a float32 or float64"):
        lstm.forward(x.astype(np.int64))
    with pytest.raises(ValueError, match="x must have at least one time step"):
        lstm.forward(np.zeros((2, 0, 3), np.float32))
    for layer in (lstm, dlfs.GRU.init(0, 3, 4), dlfs.RNN.init(0, 3, 4, return_sequences=True)):
        with pytest.raises(ValueError, match="x must have at least one sequence"):
            layer.forward(np.zeros((0, 5, 3), np.float32))
    with pytest.raises(TypeError, match=r"state of an LSTM must be a pair \(h, c\)"):
        lstm.scan(x, np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"state\[1\] must have shape \(2, 4\)"):
        lstm.scan(x, (np.zeros((2, 4), np.float32), np.zeros((3, 4), np.float32)))
    gru = dlfs.GRU.init(0, 3, 4)
    with pytest.raises(ValueError, match=r"state must have shape \(2, 4\)"):
        gru.scan(x, np.zeros((2, 5), np.float32))
    _, _, cache = gru.scan(x)
    with pytest.raises(ValueError, match="needs dys or dstate"):
        gru.backward_scan(cache)
    with pytest.raises(ValueError, match=r"dys must have shape \(2, 5, 4\)"):
        gru.backward_scan(cache, np.zeros((2, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"dy must have shape \(2, 4\)"):
        gru.backward(cache, np.zeros((2, 5, 4), np.float32))
    with pytest.raises(TypeError, match="return_sequences"):
        dlfs.RNN.init(0, 3, 4, return_sequences=1)
    with pytest.raises(TypeError, match="return_sequences"):
        dlfs.lstm(4, return_sequences="yes")
    with pytest.raises(ValueError, match="n_hidden"):
        dlfs.GRU.init(0, 3, 0)
    with pytest.raises(ValueError, match="n_hidden"):
        dlfs.gru(0)
    with pytest.raises(ValueError, match="forget_bias"):
        dlfs.lstm(3, forget_bias=math.inf)
    with pytest.raises(ValueError, match=r"w_hh of LSTM must have shape \(H, 4\*H\)"):
        dlfs.LSTM(np.zeros((3, 12)), np.zeros((3, 9)), np.zeros(12))
    with pytest.raises(ValueError, match=r"b must have shape \(9,\)"):
        dlfs.GRU(np.zeros((2, 9)), np.zeros((3, 9)), np.zeros(8), np.zeros(3))
    with pytest.raises(ValueError, match=r"b_hn must have shape \(3,\)"):
        dlfs.GRU(np.zeros((2, 9)), np.zeros((3, 9)), np.zeros(9), np.zeros(2))
    with pytest.raises(ValueError, match="expects sequences"):
        dlfs.network(0, 4, [dlfs.lstm(3)], dlfs.MeanSquaredError())
    with pytest.raises(ValueError, match=r"LSTM expects sequences of shape \(N, T, 3\)"):
        dlfs.Network([lstm], dlfs.MeanSquaredError(), (5, 2))


def test_embedding_lookup_scatter_add_and_bad_ids():
    rng = np.random.default_rng(0)
    emb = dlfs.Embedding.init(0, 5, 3, dtype=np.float64)
    ids = np.array([[0, 4, 4, 1], [4, 2, 0, 0]])
    y, cache, same = emb.forward(ids)
    assert same is emb and y.shape == (2, 4, 3)
    np.testing.assert_array_equal(y, emb.w[ids])
    dy = rng.standard_normal(y.shape)
    dx, (dw,) = emb.backward(cache, dy)
    expected = np.zeros((5, 3))
    for (i, j), k in np.ndenumerate(ids):
        expected[k] += dy[i, j]  # repeated ids accumulate
    assert dx is None
    np.testing.assert_allclose(dw, expected, rtol=1e-14)
    assert not dw[3].any()  # id 3 never appears

    def f(w):
        lay = emb.with_params([w])
        out, c, _ = lay.forward(ids)
        return out, lambda g: lay.backward(c, g)[1]

    assert dlfs.check_grads(f, [emb.w]) < 1e-8
    e32 = dlfs.Embedding.init(1, 7, 2)
    assert e32.forward(ids[:, :2].astype(np.uint8))[0].dtype == np.float32
    assert e32.output_shape((9,)) == (9, 2) and repr(e32) == "Embedding(7 -> 2, float32)"
    with pytest.raises(TypeError, match="x must be an integer array of token ids"):
        emb.forward(ids.astype(np.float64))
    with pytest.raises(TypeError, match="x must be an integer array"):
        emb.forward(ids > 1)
    with pytest.raises(ValueError, match=r"x must hold ids in \[0, 5\), got values in \[0, 5\]"):
        emb.forward(np.array([[0, 5]]))
    with pytest.raises(ValueError, match=r"x must hold ids in \[0, 5\)"):
        emb.forward(np.array([[-1, 2]]))
    with pytest.raises(ValueError, match="x must not be empty"):
        emb.forward(np.zeros((0, 3), int))
    with pytest.raises(ValueError, match="n_vocab"):
        dlfs.embedding(0, 3)
    with pytest.raises(ValueError, match="w must be 2-D"):
        dlfs.Embedding(np.zeros(3))


@settings(max_examples=30, deadline=None)
@given(
    seed=SEEDS,
    n=SIZES,
    t=SIZES,
    vocab=SIZES,
    dim=SIZES,
    dtype=DTYPES,
    ids=st.sampled_from(["uint8", "int32", "int64"]),
)
def test_embedding_gradient_is_a_scatter_add(seed, n, t, vocab, dim, dtype, ids):
    """dw agrees with np.add.at (repeated ids accumulate) for any id dtype; float32 stays float32."""
    rng = np.random.default_rng(seed)
    emb = dlfs.Embedding.init(seed, vocab, dim, dtype=dtype)
    x = rng.integers(0, vocab, (n, t)).astype(ids)
    y, cache, _ = emb.forward(x)
    assert y.shape == (n, t, dim) and y.dtype == np.dtype(dtype)
    dy = rng.standard_normal(y.shape).astype(dtype)
    (dw,) = emb.backward(cache, dy)[1]
    expected = np.zeros((vocab, dim))
    np.add.at(expected, x.ravel(), dy.reshape(-1, dim).astype(np.float64))
    assert dw.dtype == np.dtype(dtype)
    np.testing.assert_allclose(dw, expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(
    seed=SEEDS,
    n=SIZES,
    t=st.integers(1, 5),
    k=st.integers(2, 6),
    smoothing=st.sampled_from([0, 0.1]),
)
def test_sequence_softmax_cross_entropy_is_the_mean_over_positions(seed, n, t, k, smoothing):
    """(N, T, K) logits = N*T rows: same value and gradient as the flattened rows,
    with labels (N, T) or one-hot (N, T, K); gradient checked by finite differences."""
    rng = np.random.default_rng(seed)
    loss = dlfs.SoftmaxCrossEntropy(smoothing)
    z = 2 * rng.standard_normal((n, t, k))
    labels = rng.integers(0, k, (n, t))
    onehot = np.eye(k)[labels]
    flat, flat_cache = loss.forward(z.reshape(-1, k), labels.reshape(-1))
    for target in (labels, onehot):
        value, cache = loss.forward(z, target)
        assert value == pytest.approx(flat, rel=1e-12)
        g = loss.backward(cache)
        assert g.shape == z.shape
        np.testing.assert_allclose(g.reshape(-1, k), loss.backward(flat_cache), rtol=1e-12)
        assert dlfs.check_loss(loss, z, target, key=seed % 997) < 1e-6
    z32 = z.astype(np.float32)
    value32, cache32 = loss.forward(z32, labels)
    assert value32.dtype == np.float32 and loss.backward(cache32).dtype == np.float32
    acc = dlfs.accuracy(z, labels)
    assert acc == pytest.approx(np.mean(z.argmax(axis=2) == labels))
    assert dlfs.accuracy(z, onehot) == acc


def test_sequence_losses_and_dense_bad_input():
    sce = dlfs.SoftmaxCrossEntropy()
    z = np.zeros((2, 3, 4))
    with pytest.raises(ValueError, match=r"target must have shape \(2, 3\)"):
        sce.forward(z, np.zeros((2, 4), int))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\)"):
        sce.forward(z, np.full((2, 3), 4))
    with pytest.raises(ValueError, match="target must have the same shape"):
        sce.forward(z, np.zeros((2, 3, 3)))
    with pytest.raises(ValueError, match=r"target must have shape \(N, T\)"):
        dlfs.accuracy(z, np.zeros((2, 4), int))
    dense = dlfs.Dense.init(0, 4, 2, dtype=np.float64)
    y, cache, _ = dense.forward(np.ones((2, 3, 4)))
    np.testing.assert_allclose(y, np.ones((2, 3, 4)) @ dense.w + dense.b, rtol=1e-14)
    with pytest.raises(ValueError, match=r"x must have shape \(N, T, 4\)"):
        dense.forward(np.ones((2, 3, 5)))
    with pytest.raises(ValueError, match=r"dy must have shape \(2, 3, 2\)"):
        dense.backward(cache, np.ones((2, 2)))
    with pytest.raises(ValueError, match="Flatten"):
        dlfs.network(0, (2, 3, 4), [dlfs.dense(2)], dlfs.MeanSquaredError())


def test_builder_infers_sequence_shapes_and_network_gradients():
    net = dlfs.network(0, (28, 28), [dlfs.lstm(128), dlfs.dense(10)], dlfs.SoftmaxCrossEntropy())
    assert [type(layer).__name__ for layer in net.layers] == ["LSTM", "Dense"]
    assert net.layers[0].w_ih.shape == (28, 512) and net.output_shape == (10,)
    stacked = dlfs.network(
        1,
        (9, 3),
        [dlfs.rnn(4, return_sequences=True), dlfs.gru(5, return_sequences=True), dlfs.lstm(2)],
        dlfs.MeanSquaredError(),
    )
    assert [layer.n_in for layer in stacked.layers] == [3, 4, 5] and stacked.output_shape == (2,)
    lm = _char_lm()
    assert lm.output_shape == (6, 7)
    assert re.findall(r"\(N, [\d, ]+\)", str(lm.summary())) == [
        "(N, 6)",
        "(N, 6, 4)",
        "(N, 6, 5)",
        "(N, 6, 7)",
    ]
    rng = np.random.default_rng(4)
    x, y = rng.integers(0, 7, (3, 6)), rng.integers(0, 7, (3, 6))
    assert lm.predict(x).shape == (3, 6, 7)
    with pytest.raises(TypeError, match="x must be an integer array of token ids"):
        lm.predict(x.astype(np.float64))
    with pytest.raises(ValueError, match=r"x must have shape \(N, 6\)"):
        lm.predict(x[:, :5])
    sizes = [len(p) for p in lm.params()]
    flat = [p for layer in lm.params() for p in layer]

    def f(*ps):
        it = iter(ps)
        params = tuple(tuple(next(it) for _ in range(s)) for s in sizes)
        loss, grads, _ = lm.with_params(params).loss_and_grads(x, y)
        return np.asarray(loss), lambda dy: [g * dy for layer in grads for g in layer]

    assert dlfs.check_grads(f, flat, key=1) < 1e-6


def test_sequence_network_trains_and_round_trips(tmp_path):
    """A float32 Embedding-LSTM-Dense language model: fit lowers the loss, float32 stays
    float32, and save/load keeps every array bit-exact (and return_sequences)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 7, (32, 6))
    y = np.roll(x, 1, axis=1)  # the previous id: needs one step of memory
    net = _char_lm(np.float32, dlfs.lstm)
    fitted, history = dlfs.fit(net, dlfs.Adam(0.03), x, y, epochs=15, batch_size=8, seed=0)
    assert history.train_loss[-1] < 0.8 * history.train_loss[0]
    assert all(p.dtype == np.float32 for layer in fitted.params() for p in layer)
    mixed = dlfs.network(
        3,
        (5, 2),
        [dlfs.rnn(3, return_sequences=True), dlfs.gru(4, return_sequences=True), dlfs.lstm(2)],
        dlfs.MeanSquaredError(),
    )
    for model, data in ((fitted, x), (mixed, rng.standard_normal((4, 5, 2)).astype(np.float32))):
        dlfs.save(tmp_path / "seq.npz", model)
        loaded = dlfs.load(tmp_path / "seq.npz").net
        _assert_same_net(model, loaded)
        assert loaded.predict(data).tobytes() == model.predict(data).tobytes()


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_sequence_layers_follow_the_same_rules():
    ids = np.array([[0, 1], [2, 0]])
    emb = dlfs.Embedding.init(0, 3, 2)
    with pytest.raises(TypeError, match="x must be a numpy array of integer token ids, got matrix"):
        emb.forward(np.asmatrix(ids))
    with pytest.raises(TypeError, match="w must be a plain numpy array"):
        dlfs.Embedding(np.asmatrix(np.ones((3, 2), np.float32)))
    with pytest.raises(TypeError, match="init must be an initializer"):
        dlfs.Embedding.init(0, 3, 2, init=np.ones((3, 2)))
    lstm = dlfs.LSTM.init(0, 2, 3)
    with pytest.raises(TypeError, match="w_hh must be a float32 or float64 array"):
        dlfs.LSTM(lstm.w_ih, lstm.w_hh.astype(np.int64), lstm.b)


def test_lstm_spec_starts_with_forget_bias_one():
    net = dlfs.network(0, (4, 2), [dlfs.lstm(3)], dlfs.MeanSquaredError())
    b = net.layers[0].b  # gates i, f, g, o
    np.testing.assert_array_equal(b[3:6], 1.0)
    np.testing.assert_array_equal(np.delete(b, np.s_[3:6]), 0.0)


# ----------------- Conv2D: shapes, gradients, nested-loop reference, padding


@pytest.mark.parametrize("dtype", _CONV_DTYPES)
@settings(max_examples=30, deadline=None)
@given(case=_conv_cases())
def test_conv_shape_dtype_untouched(dtype, case):
    conv, x = _conv_build(case, dtype)
    x0, w0, b0 = x.copy(), conv.w.copy(), conv.b.copy()
    y, cache, same = conv.forward(x)
    assert same is conv
    assert y.shape == (x.shape[0], *conv.output_shape(x.shape[1:]))
    assert y.dtype == dtype
    dy = np.random.default_rng(1).standard_normal(y.shape).astype(dtype)
    dx, (dw, db) = conv.backward(cache, dy)
    assert (dx.shape, dw.shape, db.shape) == (x.shape, conv.w.shape, conv.b.shape)
    assert {dx.dtype, dw.dtype, db.dtype} == {np.dtype(dtype)}
    assert all(c.dtype == dtype for c in cache if isinstance(c, np.ndarray))
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(conv.w, w0)
    np.testing.assert_array_equal(conv.b, b0)
    dx2, (dw2, db2) = conv.backward(cache, dy)  # backward twice: same result
    np.testing.assert_array_equal(dx, dx2)
    np.testing.assert_array_equal(dw, dw2)
    np.testing.assert_array_equal(db, db2)
    if dtype == np.float64:
        ref = _conv_reference(x, conv.w, conv.b, conv.stride, conv.padding)
        np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(case=_conv_cases())
def test_conv_gradients(case):
    conv, x = _conv_build(case, np.float64)
    dlfs.check_layer(conv, x, key=case["seed"])  # input, kernel and bias


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "hw"),
    [
        (3, 1, "valid", (6, 7)),
        (3, 2, "valid", (7, 8)),  # stride 2, last row/column dropped
        (3, 2, 1, (8, 8)),
        (4, 1, "same", (6, 5)),  # even kernel: extra row/column bottom/right
        (2, 1, "same", (5, 5)),
        ((3, 2), (2, 1), ((1, 0), (0, 2)), (7, 6)),
    ],
)
def test_conv_matches_nested_loop_reference(kernel, stride, padding, hw):
    rng = np.random.default_rng(42)
    conv = dlfs.Conv2D.init(
        3, 2, 3, kernel, stride=stride, padding=padding, bias_init=dlfs.normal, dtype=np.float64
    )
    x = rng.standard_normal((2, 2, *hw))
    y, _, _ = conv.forward(x)
    ref = _conv_reference(x, conv.w, conv.b, conv.stride, conv.padding)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
    if padding == "same":
        assert y.shape[2:] == hw


def test_conv_offset_reading_only_padding():
    """Kernel column 0 of this layer only ever reads the left padding (found by
    Hypothesis: its input slice once wrapped around to the right edge)."""
    conv = dlfs.Conv2D.init(0, 1, 2, (1, 4), stride=3, padding=((0, 1), (2, 0)), dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((2, 1, 4, 4))
    y, _, _ = conv.forward(x)
    ref = _conv_reference(x, conv.w, conv.b, conv.stride, conv.padding)
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
    dlfs.check_layer(conv, x)


def test_conv_same_even_kernel_pads_bottom_right():
    conv = dlfs.Conv2D.init(0, 1, 1, 4, padding="same")
    assert conv.padding == ((1, 2), (1, 2))
    assert dlfs.Conv2D.init(0, 1, 1, (2, 5), padding="same").padding == ((0, 1), (2, 2))
    # a single one at the top-left of a 4x4 kernel: y[p, q] = x[p - 1, q - 1] (zero outside)
    w = np.zeros((1, 1, 4, 4))
    w[0, 0, 0, 0] = 1.0
    conv = dlfs.Conv2D(w, np.zeros(1), padding="same")
    x = np.arange(1.0, 26.0).reshape(1, 1, 5, 5)
    y, _, _ = conv.forward(x)
    expected = np.zeros((5, 5))
    expected[1:, 1:] = x[0, 0, :-1, :-1]
    np.testing.assert_array_equal(y[0, 0], expected)


def test_conv_float32_stays_float32_in_network():
    net = dlfs.network(
        0,
        (1, 28, 28),
        [
            dlfs.conv2d(8, 3, padding="same", activation=dlfs.ReLU()),
            dlfs.MaxPool2D(2),
            dlfs.Flatten(),
            dlfs.dense(10),
        ],
        dlfs.SoftmaxCrossEntropy(),
    )
    assert net.output_shape == (10,)
    assert [type(layer).__name__ for layer in net.layers] == [
        "Conv2D",
        "ReLU",
        "MaxPool2D",
        "Flatten",
        "Dense",
    ]
    assert net.layers[0].w.shape == (8, 1, 3, 3)
    assert net.layers[4].w.shape == (8 * 14 * 14, 10)
    x = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    loss, grads, _ = net.loss_and_grads(x, np.array([1, 2, 3]))
    assert np.asarray(loss).dtype == np.float32
    assert {g.dtype for layer in grads for g in layer} == {np.dtype(np.float32)}
    state = dlfs.train_step(
        dlfs.TrainState.create(net, dlfs.Adam(1e-3), 0), (x, np.array([1, 2, 3]))
    )
    assert state.net.layers[0].w.dtype == np.float32


def test_conv_builder_infers_channels_and_sizes():
    net = dlfs.network(
        1,
        (3, 9, 8),
        [
            dlfs.conv2d(4, (3, 2), stride=2),
            dlfs.AvgPool2D(2, stride=1),
            dlfs.conv2d(5, 2, activation=dlfs.Tanh()),
        ],
        dlfs.MeanSquaredError(),
        dtype=np.float64,
    )
    # (3, 9, 8) -conv 3x2 s2-> (4, 4, 4) -avg 2 s1-> (4, 3, 3) -conv 2-> (5, 2, 2)
    assert net.output_shape == (5, 2, 2)
    assert net.layers[2].w.shape == (5, 4, 2, 2)
    with pytest.raises(ValueError, match="larger than"):
        dlfs.network(0, (1, 5, 5), [dlfs.conv2d(2, 3), dlfs.conv2d(2, 4)], dlfs.MeanSquaredError())
    with pytest.raises(ValueError, match=r"images \(N, C, H, W\)"):
        dlfs.network(0, 10, [dlfs.conv2d(2, 3)], dlfs.MeanSquaredError())


def test_conv_with_params_keeps_config_and_is_read_only():
    conv = dlfs.Conv2D.init(0, 2, 3, 3, stride=2, padding=1)
    new = conv.with_params((conv.w * 2, conv.b + 1))
    assert (new.stride, new.padding) == ((2, 2), ((1, 1), (1, 1)))
    with pytest.raises(ValueError):
        conv.w[0, 0, 0, 0] = 1.0
    with pytest.raises(ValueError, match=r"params\[0\] must have shape"):
        conv.with_params((conv.w[:1], conv.b))
    assert "Conv2D(2 -> 3, 3x3" in repr(conv)


def test_conv_repr_is_short_and_names_same_padding():
    """A summary row stays narrow: stride only when not 1, "same"/"valid" by name."""
    cases = [
        (dict(kernel=3, padding="same"), 'Conv2D(1 -> 32, 3x3, padding="same", float32)'),
        (dict(kernel=2, padding="same"), 'Conv2D(1 -> 32, 2x2, padding="same", float32)'),
        (dict(kernel=3), "Conv2D(1 -> 32, 3x3, float32)"),
        (dict(kernel=3, stride=2, padding=1), "Conv2D(1 -> 32, 3x3, stride=2, padding=1, float32)"),
        (dict(kernel=3, stride=(1, 2), padding=(1, 0)), "stride=(1, 2), padding=(1, 0)"),
        (dict(kernel=3, padding=((1, 2), (0, 0))), "padding=((1, 2), (0, 0)), float32)"),
    ]
    for kw, want in cases:
        assert want in repr(dlfs.Conv2D.init(0, 1, 32, **kw))
    net = dlfs.network(
        0,
        (1, 28, 28),
        [
            dlfs.conv2d(32, 3, padding="same", activation=dlfs.ReLU()),
            dlfs.Flatten(),
            dlfs.dense(10),
        ],
        dlfs.SoftmaxCrossEntropy(),
    )
    rows = str(net.summary()).splitlines()[1:]
    assert max(map(len, rows)) <= 80, rows


def test_conv_bad_inputs():
    conv = dlfs.Conv2D.init(0, 2, 3, 3)
    good = np.zeros((1, 2, 5, 5), np.float32)
    with pytest.raises(ValueError, match="4-D"):
        conv.forward(np.zeros((2, 5, 5), np.float32))  # wrong rank
    with pytest.raises(ValueError, match="2 input channels"):
        conv.forward(np.zeros((1, 3, 5, 5), np.float32))
    with pytest.raises(ValueError, match="larger than the input"):
        conv.forward(np.zeros((1, 2, 2, 5), np.float32))
    with pytest.raises(TypeError, match="float32"):
        conv.forward(good.astype(np.float64))
    with pytest.raises(TypeError, match="numpy array"):
        conv.forward(good.tolist())
    _, cache, _ = conv.forward(good)
    with pytest.raises(ValueError, match="dy must have shape"):
        conv.backward(cache, np.zeros((1, 3, 4, 4), np.float32))
    for bad_stride in (0, -1, (1, 0)):
        with pytest.raises(ValueError, match="stride"):
            dlfs.Conv2D.init(0, 2, 3, 3, stride=bad_stride)
    with pytest.raises(ValueError, match="kernel"):
        dlfs.Conv2D.init(0, 2, 3, 0)
    for bad_padding in ("full", -1, (1, 2, 3), ((1, 2), (3,))):
        with pytest.raises(ValueError, match="padding"):
            dlfs.Conv2D.init(0, 2, 3, 3, padding=bad_padding)
    with pytest.raises(TypeError, match="padding"):
        dlfs.Conv2D.init(0, 2, 3, 3, padding=1.5)
    with pytest.raises(ValueError, match="stride 1"):
        dlfs.Conv2D.init(0, 2, 3, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="4-D"):
        dlfs.Conv2D(np.zeros((3, 2, 3), np.float32), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="b must have shape"):
        dlfs.Conv2D(np.zeros((3, 2, 3, 3), np.float32), np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="channels"):
        dlfs.conv2d(0, 3)
    with pytest.raises(ValueError, match="padding"):
        dlfs.conv2d(4, 3, padding="full")
    with pytest.raises(TypeError, match="activation"):
        dlfs.conv2d(4, 3, activation="relu")


def test_conv_accepts_non_contiguous_input():
    conv = dlfs.Conv2D.init(0, 2, 3, 3, padding="same", dtype=np.float64)
    base = np.random.default_rng(5).standard_normal((3, 2, 12, 9))
    view = base[:, :, ::2, :]  # planes with gaps between rows
    y, _, _ = conv.forward(view)
    ref = _conv_reference(view, conv.w, conv.b, conv.stride, conv.padding)
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)


def test_conv_and_pool_empty_batch():
    x = np.zeros((0, 2, 5, 5))
    for layer in (dlfs.Conv2D.init(0, 2, 3, 3, padding=1, dtype=np.float64), dlfs.MaxPool2D(2)):
        y, cache, _ = layer.forward(x)
        assert y.shape == (0, *layer.output_shape(x.shape[1:]))
        dx, grads = layer.backward(cache, np.zeros_like(y))
        assert dx.shape == x.shape
        assert all(g.shape == p.shape and not g.any() for g, p in zip(grads, layer.params()))


def test_a_network_skips_the_input_gradient_of_its_first_layer_with_parameters(monkeypatch):
    """Parameter-free layers in front (Flatten, ReLU) do not count as the first layer
    with parameters: training asks that Dense for (dw, db) only, never for its dx,
    and the layers before it are not run backward (survivor 25 of mutation seed 1207)."""
    net = dlfs.network(
        0,
        (2, 3),
        [dlfs.Flatten(), dlfs.ReLU(), dlfs.dense(4), dlfs.dense(2)],
        dlfs.MeanSquaredError(),
    )
    called = []
    for cls in (dlfs.Flatten, dlfs.ReLU, dlfs.Dense):
        backward = cls.backward
        monkeypatch.setattr(
            cls,
            "backward",
            lambda s, c, dy, b=backward: called.append(type(s).__name__) or b(s, c, dy),
        )
    x = np.random.default_rng(0).standard_normal((5, 2, 3)).astype(np.float32)
    _, grads, _ = net.loss_and_grads(x, np.zeros((5, 2), np.float32), dlfs.train_context(0))
    assert called == ["Dense"]  # the last Dense's full backward; the first gives no dx
    _, full = net.backward(net.forward(x, dlfs.train_context(0))[1], 2 * net.predict(x) / 5)
    for g, f in zip(grads, full, strict=True):
        assert all(np.allclose(a, b, rtol=1e-6) for a, b in zip(g, f, strict=True))


def test_conv_param_grads_skip_the_input_gradient(monkeypatch):
    """_param_grads (a network's first layer) gives backward's (dw, db) bit for
    bit without computing dx (no col2im)."""
    conv = dlfs.Conv2D.init(0, 2, 3, 3, padding="same", bias_init=dlfs.normal)
    rng = np.random.default_rng(1)
    y, cache, _ = conv.forward(rng.standard_normal((2, 2, 5, 5)).astype(np.float32))
    dy = rng.standard_normal(y.shape).astype(np.float32)
    _, expected = conv.backward(cache, dy)

    def no_col2im(*args):
        raise AssertionError("dx computed")

    monkeypatch.setattr(dlfs, "_col2im_add", no_col2im)
    got = conv._param_grads(cache, dy)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(got, expected, strict=True))


# ----- pools: max and average, ties to the first maximum, incomplete windows


@pytest.mark.parametrize("pool_cls", [dlfs.MaxPool2D, dlfs.AvgPool2D])
@pytest.mark.parametrize("dtype", _CONV_DTYPES)
@settings(max_examples=25, deadline=None)
@given(case=_conv_pool_cases())
def test_pool_shape_dtype_untouched_and_reference(pool_cls, dtype, case):
    pool = pool_cls(case["size"], case["stride"])
    x = _conv_distinct(case["shape"], case["seed"]).astype(dtype)
    x0 = x.copy()
    y, cache, same = pool.forward(x)
    assert same is pool
    assert y.shape == (x.shape[0], *pool.output_shape(x.shape[1:]))
    assert y.dtype == dtype
    reduce = np.max if pool_cls is dlfs.MaxPool2D else np.mean
    np.testing.assert_allclose(
        y, _conv_pool_reference(x, pool.size, pool.stride, reduce), rtol=1e-6
    )
    dy = np.random.default_rng(2).standard_normal(y.shape).astype(dtype)
    dx, grads = pool.backward(cache, dy)
    assert grads == ()
    assert dx.shape == x.shape and dx.dtype == dtype
    np.testing.assert_array_equal(dx, pool.backward(cache, dy)[0])
    np.testing.assert_array_equal(x, x0)


@pytest.mark.parametrize("pool_cls", [dlfs.MaxPool2D, dlfs.AvgPool2D])
@settings(max_examples=25, deadline=None)
@given(case=_conv_pool_cases())
# issue 14: sum(y dy) cancels to -0.34 while sum|y dy| is 31 596 (a correct gradient failed)
@example(case={"shape": (2, 3, 7, 7), "size": 3, "stride": 1, "seed": 47})
def test_pool_gradients_distinct_values(pool_cls, case):
    pool = pool_cls(case["size"], case["stride"])
    x = _conv_distinct(case["shape"], case["seed"])
    dlfs.check_layer(pool, x, key=case["seed"])


def test_maxpool_tie_goes_to_first_maximum():
    x = np.array(
        [
            [1.0, 3.0, 0.0, 0.0],
            [3.0, 3.0, 0.0, 0.0],
            [2.0, 5.0, 7.0, 1.0],
            [5.0, 0.0, 7.0, 7.0],
        ]
    ).reshape(1, 1, 4, 4)
    pool = dlfs.MaxPool2D(2)
    y, cache, _ = pool.forward(x)
    np.testing.assert_array_equal(y[0, 0], [[3.0, 0.0], [5.0, 7.0]])
    dx, _ = pool.backward(cache, np.array([[[[10.0, 20.0], [30.0, 40.0]]]]))
    expected = np.zeros((4, 4))
    expected[0, 1] = 10.0  # first 3 in row-major order
    expected[0, 2] = 20.0  # all zeros: the top-left one
    expected[2, 1] = 30.0  # 5 at (2, 1) comes before 5 at (3, 0)
    expected[2, 2] = 40.0
    np.testing.assert_array_equal(dx[0, 0], expected)
    # overlapping windows (stride 1): each window still routes to one entry
    y1, cache1, _ = dlfs.MaxPool2D(2, stride=1).forward(np.zeros((1, 1, 3, 3)))
    dx1, _ = dlfs.MaxPool2D(2, stride=1).backward(cache1, np.ones_like(y1))
    np.testing.assert_array_equal(dx1[0, 0], [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])


@pytest.mark.parametrize("size", [2, 3, (2, 3)])
@pytest.mark.parametrize("stride", [None, 1])
def test_maxpool_train_and_eval_route_alike(size, stride):
    """In training the forward notes each window's first maximum; in evaluation
    mode backward finds it from x and y: the same routing, ties included."""
    pool = dlfs.MaxPool2D(size, stride=stride)
    x = np.random.default_rng(7).integers(0, 3, size=(3, 2, 7, 8)).astype(np.float64)  # ties
    y_eval, cache_eval, _ = pool.forward(x)
    y_train, cache_train, _ = pool.forward(x, dlfs.train_context(0))
    assert cache_eval[2] is None and cache_train[2] is not None
    np.testing.assert_array_equal(y_eval, y_train)
    dy = np.random.default_rng(8).standard_normal(y_eval.shape)
    np.testing.assert_array_equal(
        pool.backward(cache_eval, dy)[0], pool.backward(cache_train, dy)[0]
    )


@pytest.mark.parametrize("size", [(17, 17), (1, 300), (300, 1)])
def test_maxpool_windows_of_more_than_256_entries_route_to_their_maximum(size):
    """A window of more than 256 entries notes its maximum's offset in a wider
    integer than uint8, square or not: the gradient reaches the entry past 255."""
    rng = np.random.default_rng(0)
    x = rng.permutation(2 * size[0] * size[1]).astype(np.float64).reshape(2, 1, *size)
    x.reshape(2, -1)[:, -1] = 1e6  # each window's maximum: its last entry
    pool = dlfs.MaxPool2D(size)
    _, cache, _ = pool.forward(x, dlfs.train_context(0))
    dx, _ = pool.backward(cache, np.full((2, 1, 1, 1), 2.0))
    expected = np.zeros_like(x)
    expected.reshape(2, -1)[:, -1] = 2.0
    np.testing.assert_array_equal(dx, expected)


def test_pool_drops_incomplete_windows():
    x = np.arange(2.0 * 7 * 5).reshape(1, 2, 7, 5)
    for pool in (dlfs.MaxPool2D(2), dlfs.AvgPool2D(2)):
        y, cache, _ = pool.forward(x)
        assert y.shape == (1, 2, 3, 2) == (1, *pool.output_shape((2, 7, 5)))
        dx, _ = pool.backward(cache, np.ones_like(y))
        assert not dx[:, :, 6, :].any() and not dx[:, :, :, 4].any()
    assert dlfs.MaxPool2D(3, stride=2).output_shape((1, 9, 8)) == (1, 4, 3)


def test_pool_bad_inputs():
    for pool_cls in (dlfs.MaxPool2D, dlfs.AvgPool2D):
        for bad in (0, -2, (2, 0)):
            with pytest.raises(ValueError, match="size"):
                pool_cls(bad)
            with pytest.raises(ValueError, match="stride"):
                pool_cls(2, stride=bad)
        with pytest.raises(TypeError, match="size"):
            pool_cls(2.0)
        pool = pool_cls(3)
        with pytest.raises(ValueError, match="4-D"):
            pool.forward(np.zeros((2, 6, 6)))
        with pytest.raises(ValueError, match="larger than"):
            pool.forward(np.zeros((1, 1, 2, 6)))
        with pytest.raises(ValueError, match="larger than"):
            pool.output_shape((1, 6, 2))
        with pytest.raises(ValueError, match=r"images \(N, C, H, W\)"):
            pool.output_shape((36,))
        with pytest.raises(TypeError, match="float32 or float64"):
            pool.forward(np.zeros((1, 1, 6, 6), dtype=np.int64))
        _, cache, _ = pool.forward(np.zeros((1, 1, 6, 6)))
        with pytest.raises(ValueError, match="dy must have shape"):
            pool.backward(cache, np.zeros((1, 1, 3, 3)))
        assert pool.params() == () and pool.with_params(()) is pool


def test_pool_window_wider_than_the_input_is_refused():
    x = np.zeros((1, 1, 4, 2), np.float32)
    for pool in (dlfs.MaxPool2D((1, 3)), dlfs.AvgPool2D((1, 3))):
        with pytest.raises(ValueError, match=r"window \(1, 3\) is larger than the input"):
            pool.forward(x)


# ---------- GEMM chunks and patch blocks: only the order of sums changes


def test_dlfs_starts_no_thread_of_its_own():
    """Convolutions, pools and ReLU run on the calling thread (numpy's BLAS has
    its own threads): a CNN's training steps start no Python thread."""
    net = _small_cnn()
    x = np.random.default_rng(0).standard_normal((12, 2, 8, 8))
    y = np.random.default_rng(1).integers(0, net.output_shape[0], 12)
    before = threading.enumerate()
    state = dlfs.TrainState.create(net, dlfs.SGD(0.01))
    functools.reduce(dlfs.train_step, [(x, y)] * 2, state)
    _cnn_pass(net, x)
    assert threading.enumerate() == before


@pytest.mark.parametrize(
    ("gemm_small", "gemm_large"),
    [(5000, None), (100, 20000)],  # a chunk per sample; "large"
)
def test_gemm_chunks_change_only_the_order_of_sums(monkeypatch, gemm_small, gemm_large):
    net = _small_cnn()
    x = np.random.default_rng(3).standard_normal((12, 2, 8, 8))
    whole = _cnn_pass(net, x)
    monkeypatch.setattr(dlfs, "_GEMM_SMALL", gemm_small)
    if gemm_large:
        monkeypatch.setattr(dlfs, "_GEMM_LARGE", gemm_large)
    for a, b in zip(whole, _cnn_pass(net, x), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("padding", ["same", 1, "valid"])
def test_conv_gradients_in_chunks(monkeypatch, padding):
    monkeypatch.setattr(dlfs, "_GEMM_SMALL", 100)  # chunks of one sample
    conv = dlfs.Conv2D.init(1, 2, 3, 3, padding=padding, bias_init=dlfs.normal, dtype=np.float64)
    x = np.random.default_rng(4).standard_normal((5, 2, 6, 7))
    dlfs.check_layer(conv, x)
    pool = dlfs.MaxPool2D(2)
    dlfs.check_layer(pool, _conv_distinct((5, 2, 6, 7), 4))


def test_conv_patch_blocks_of_unequal_size(monkeypatch):
    """Blocks of 2, 2 and 1 samples share one patch buffer sized for the largest."""
    conv = dlfs.Conv2D.init(2, 2, 3, 3, padding="same", bias_init=dlfs.normal, dtype=np.float64)
    per_sample = 2 * 9 * 6 * 7  # patch entries of one sample (C_in kh kw Ho Wo)
    monkeypatch.setattr(dlfs, "_GEMM_SMALL", 3 * per_sample)  # C_out x that: one sample a chunk
    monkeypatch.setattr(dlfs, "_BLOCK", 2 * per_sample)  # two samples a block
    x = np.random.default_rng(6).standard_normal((5, 2, 6, 7))
    y, _, _ = conv.forward(x)
    np.testing.assert_allclose(
        y, _conv_reference(x, conv.w, conv.b, (1, 1), conv.padding), rtol=1e-12
    )
    assert dlfs.check_layer(conv, x) < 1e-7  # input, kernel and bias through the blocks


@pytest.mark.parametrize(
    "per_sample",
    [1, 333_333, dlfs._GEMM_SMALL - 1, dlfs._GEMM_SMALL, dlfs._GEMM_SMALL + 1, 5_000_000],
)
def test_gemm_chunks_are_small_gemms_up_to_the_small_size(per_sample):
    """The batch goes in consecutive pieces; a sample of at most _GEMM_SMALL
    multiply-adds goes in pieces of at most that many (OpenBLAS's small kernels),
    a larger one in equal pieces of about _GEMM_LARGE."""
    for n in (1, 4, 37, 100):
        chunks = dlfs._gemm_chunks(n, per_sample)
        assert [c.start for c in chunks] == [0, *(c.stop for c in chunks[:-1])]
        assert chunks[-1].stop == n
        rows = chunks[0].stop
        assert all(c.stop - c.start == rows for c in chunks[:-1])
        if per_sample <= dlfs._GEMM_SMALL:
            assert rows == min(n, dlfs._GEMM_SMALL // per_sample)
        else:
            pieces = -(-n * per_sample // dlfs._GEMM_LARGE)
            assert len(chunks) <= pieces and rows == -(-n // pieces)


# ---- transformers: LayerNorm, attention, positions, residual and tied blocks


def _rows_apart(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Rows of distinct values at least 0.5 apart before scaling, shifted and scaled:
    each row's variance stays away from 0 (LayerNorm's finite differences stay accurate)."""
    base = np.argsort(rng.random(shape), axis=-1) + rng.uniform(0, 0.5, shape)
    return base * rng.uniform(0.5, 2.0) + rng.normal()


def _randomized(layer, rng: np.random.Generator, dtype):
    """``layer`` with every parameter drawn N(0, 0.5^2): no zero bias or unit scale
    hides a term of the forward pass or a gradient."""
    return layer.with_params(
        [(0.5 * rng.standard_normal(p.shape)).astype(dtype) for p in layer.params()]
    )


XF_CASES = [
    "LayerNorm",
    "LayerNorm-no-bias",
    "LayerNorm-no-scale",
    "LayerNorm-bare",
    "SelfAttention-causal",
    "SelfAttention-non-causal",
    "SelfAttention-no-bias",
    "SelfAttention-dropout",
    "PositionalEmbedding",
    "Residual-dense",
    "Residual-conv",
    "Residual-attention",
    "Residual-nested",
    "Dense-no-bias",
    "Dense-no-bias-seq",
    "GELU-none",
]


def _xf_case(name: str, seed: int, n: int, d: int, dtype):
    """(layer, x, ctx) for one configuration of the transformer section's layers;
    every parameter random, the output shaped like x except for Dense."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    t = int(rng.integers(1, 6))
    if name.startswith("LayerNorm"):
        lead = tuple(int(s) for s in rng.integers(1, 4, int(rng.integers(0, 3))))
        scale, bias = (
            name in ("LayerNorm", "LayerNorm-no-bias"),
            name in ("LayerNorm", "LayerNorm-no-scale"),
        )
        layer = _randomized(dlfs.LayerNorm.init(d, scale=scale, bias=bias, dtype=dt), rng, dt)
        if name == "LayerNorm-bare":
            layer = dlfs.LayerNorm()  # no arrays: any D, the input's dtype
        return layer, _rows_apart(rng, (n, *lead, d)).astype(dt), dlfs.EVAL
    if name.startswith("SelfAttention"):
        heads = seed % 4 + 1
        dim = heads * (d % 2 + 1)
        layer = dlfs.SelfAttention.init(
            seed,
            dim,
            heads,
            causal=name != "SelfAttention-non-causal",
            bias=name != "SelfAttention-no-bias",
            dropout=0.3 if name.endswith("dropout") else 0.0,
            dtype=dt,
        )
        ctx = dlfs.train_context(seed % 1000) if name.endswith("dropout") else dlfs.EVAL
        return _randomized(layer, rng, dt), rng.standard_normal((n, t, dim)).astype(dt), ctx
    if name == "PositionalEmbedding":
        max_len = t + int(rng.integers(0, 3))  # T <= max_len, often shorter
        layer = dlfs.PositionalEmbedding.init(seed, max_len, d, dtype=dt)
        return layer, rng.standard_normal((n, t, d)).astype(dt), dlfs.EVAL
    if name == "Residual-dense":
        hidden = int(rng.integers(1, 9))
        sub = (
            dlfs.Dense.init(seed, d, hidden, bias_init=dlfs.normal, dtype=dt),
            dlfs.Tanh(),
            dlfs.Dense.init(seed + 1, hidden, d, bias=False, dtype=dt),
        )
        return dlfs.Residual(sub), rng.standard_normal((n, t, d)).astype(dt), dlfs.EVAL
    if name == "Residual-conv":
        c, k = min(d, 3), (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
        conv = dlfs.Conv2D.init(seed, c, c, k, padding="same", bias_init=dlfs.normal, dtype=dt)
        x = rng.standard_normal((n, c, int(rng.integers(4, 7)), int(rng.integers(4, 7))))
        return dlfs.Residual((conv, dlfs.Tanh())), x.astype(dt), dlfs.EVAL
    if name == "Residual-attention":
        heads = seed % 4 + 1
        dim = heads * (d % 2 + 1)
        norm = _randomized(dlfs.LayerNorm.init(dim, dtype=dt), rng, dt)
        att = _randomized(dlfs.SelfAttention.init(seed, dim, heads, dtype=dt), rng, dt)
        return dlfs.Residual((norm, att)), _rows_apart(rng, (n, t, dim)).astype(dt), dlfs.EVAL
    if name == "Residual-nested":
        inner = dlfs.Residual((dlfs.Dense.init(seed, d, d, bias=False, dtype=dt), dlfs.Tanh()))
        sub = (inner, dlfs.Dense.init(seed + 1, d, d, bias_init=dlfs.normal, dtype=dt))
        return dlfs.Residual(sub), rng.standard_normal((n, d)).astype(dt), dlfs.EVAL
    if name.startswith("Dense-no-bias"):
        layer = dlfs.Dense.init(seed, d, int(rng.integers(1, 9)), bias=False, dtype=dt)
        shape = (n, t, d) if name.endswith("seq") else (n, d)
        return layer, rng.standard_normal(shape).astype(dt), dlfs.EVAL
    if name == "GELU-none":
        return dlfs.GELU("none"), (2 * rng.standard_normal((n, t, d))).astype(dt), dlfs.EVAL
    raise AssertionError(name)


def _deep_arrays(layer) -> list[np.ndarray]:
    """Every array of a layer and of the layers inside it, at any depth."""
    return [a for sub in dlfs._all_layers([layer]) for a in _arrays(sub)]


def _deep_arrays_net(net: dlfs.Network) -> list[np.ndarray]:
    return [a for layer in net.layers for a in _deep_arrays(layer)]


def _flat_params_check(net: dlfs.Network, x, y, ctx=dlfs.EVAL, key: int = 1) -> float:
    """check_grads of ``net.loss_and_grads`` over every parameter array (float64)."""
    sizes = [len(p) for p in net.params()]

    def f(*ps):
        it = iter(ps)
        params = tuple(tuple(next(it) for _ in range(s)) for s in sizes)
        loss, grads, _ = net.with_params(params).loss_and_grads(x, y, ctx)
        return np.asarray(loss), lambda dy: [g * dy for g in _leaves(grads)]

    return dlfs.check_grads(f, _leaves(net.params()), key=key)


def _pre_ln_block(key: int, t: int, d: int, heads: int, *, causal: bool = True, dtype=np.float64):
    """One pre-LN Transformer block on (N, T, D): x + attn(ln1(x)), then x + mlp(ln2(x))."""
    return dlfs.network(
        key,
        (t, d),
        [
            dlfs.residual([dlfs.layer_norm(), dlfs.self_attention(heads, causal=causal)]),
            dlfs.residual([dlfs.layer_norm(), dlfs.dense(2 * d, dlfs.GELU("none")), dlfs.dense(d)]),
        ],
        dlfs.MeanSquaredError(),
        dtype=dtype,
    )


def _randomized_net(net: dlfs.Network, seed: int) -> dlfs.Network:
    rng = np.random.default_rng(seed)
    return net.with_params(
        tuple(
            tuple((0.5 * rng.standard_normal(p.shape)).astype(p.dtype) for p in ps)
            for ps in net.params()
        )
    )


@pytest.mark.parametrize("name", XF_CASES)
@settings(max_examples=15, deadline=None)
@given(seed=SEEDS, n=SIZES, d=SIZES, dtype=DTYPES)
def test_transformer_layer_shapes_dtypes_and_purity(name, seed, n, d, dtype):
    layer, x, ctx = _xf_case(name, seed, n, d, dtype)
    x_copy = x.copy()
    before = [a.copy() for a in _deep_arrays(layer)]

    y, cache, new_layer = layer.forward(x, ctx)

    out_shape = (*x.shape[:-1], layer.out_features) if name.startswith("Dense") else x.shape
    assert y.shape == out_shape
    assert tuple(layer.output_shape(x.shape[1:])) == out_shape[1:]
    assert y.dtype == np.dtype(dtype)
    assert new_layer is layer
    np.testing.assert_array_equal(x, x_copy)
    dy = np.random.default_rng(seed + 1).standard_normal(y.shape).astype(dtype)
    dy_copy = dy.copy()
    dx, grads = layer.backward(cache, dy)
    dx2, grads2 = layer.backward(cache, dy)
    np.testing.assert_array_equal(dy, dy_copy)
    np.testing.assert_array_equal(x, x_copy)
    assert dx.shape == x.shape and dx.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(dx, dx2)
    assert len(grads) == len(layer.params()) == len(grads2)
    for g, g2, p in zip(grads, grads2, layer.params()):
        assert g.shape == p.shape and g.dtype == p.dtype
        np.testing.assert_array_equal(g, g2)
    after = _deep_arrays(layer)
    assert len(after) == len(before)
    for a, b in zip(after, before):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
        assert not a.flags.writeable


@pytest.mark.parametrize("name", XF_CASES)
@settings(max_examples=10, deadline=None)
@given(seed=SEEDS, n=SIZES, d=SIZES)
def test_transformer_layer_gradients_match_finite_differences(name, seed, n, d):
    """The input and every parameter array, random dy and directions, float64."""
    layer, x, ctx = _xf_case(name, seed, n, d, np.float64)
    assert dlfs.check_layer(layer, x, ctx, key=seed % 997) < 1e-5


@settings(max_examples=20, deadline=None)
@given(seed=SEEDS, n=SIZES, d=SIZES, dtype=DTYPES)
def test_layer_norm_is_pytorchs_formula(seed, n, d, dtype):
    """y = (x - mean) / sqrt(var + 1e-5) * gamma + beta over the last axis, biased variance."""
    rng = np.random.default_rng(seed)
    x = _rows_apart(rng, (n, 2, d))
    gamma, beta = rng.standard_normal((2, d))
    want = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for g, b in ((gamma, beta), (gamma, None), (None, beta), (None, None)):
        layer = dlfs.LayerNorm(
            None if g is None else g.astype(dtype), None if b is None else b.astype(dtype)
        )
        y, _, _ = layer.forward(x.astype(dtype))
        expect = want * (1 if g is None else g) + (0 if b is None else b)
        np.testing.assert_allclose(y, expect, rtol=tol, atol=tol)
        assert len(layer.params()) == (g is not None) + (b is not None)


def _attention_reference(x, w_qkv, b_qkv, w_o, b_o, heads: int, causal: bool) -> np.ndarray:
    """GUIDE section 7's multi-head attention, one sample, one head at a time, in loops."""
    n, t, d = x.shape
    hd = d // heads
    y = np.zeros_like(x)
    for i in range(n):
        qkv = x[i] @ w_qkv + (0 if b_qkv is None else b_qkv)
        q, k, v = qkv[:, :d], qkv[:, d : 2 * d], qkv[:, 2 * d :]
        outs = []
        for h in range(heads):
            cols = slice(h * hd, (h + 1) * hd)
            s = q[:, cols] @ k[:, cols].T / math.sqrt(hd)
            if causal:
                s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
            a = np.exp(s - s.max(axis=1, keepdims=True))
            outs.append(a / a.sum(axis=1, keepdims=True) @ v[:, cols])
        y[i] = np.concatenate(outs, axis=1) @ w_o + (0 if b_o is None else b_o)
    return y


@settings(max_examples=20, deadline=None)
@given(seed=SEEDS, n=SIZES, heads=st.integers(1, 4), hd=st.integers(1, 2), causal=st.booleans())
def test_self_attention_is_the_reference_formula(seed, n, heads, hd, causal):
    """q, k, v in that order, heads of consecutive features, scale 1/sqrt(D/H), mask
    above the diagonal, heads concatenated in order: a per-head loop agrees."""
    rng = np.random.default_rng(seed)
    d, t = heads * hd, int(rng.integers(1, 6))
    for bias in (True, False):
        layer = _randomized(
            dlfs.SelfAttention.init(seed, d, heads, causal=causal, bias=bias, dtype=np.float64),
            rng,
            np.float64,
        )
        x = rng.standard_normal((n, t, d))
        y, _, _ = layer.forward(x)
        want = _attention_reference(
            x, layer.w_qkv, layer.b_qkv, layer.w_o, layer.b_o, heads, causal
        )
        np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)


def test_positional_embedding_and_residual_are_their_formulas():
    rng = np.random.default_rng(3)
    pos = dlfs.PositionalEmbedding(rng.standard_normal((5, 4)))
    x = rng.standard_normal((2, 3, 4))
    assert pos.forward(x)[0].tobytes() == (x + pos.w[:3]).tobytes()  # the first T rows
    dense = dlfs.Dense(rng.standard_normal((4, 4)), rng.standard_normal(4))
    block = dlfs.Residual((dense, dlfs.Tanh()))
    np.testing.assert_allclose(block.forward(x)[0], x + np.tanh(x @ dense.w + dense.b), rtol=1e-14)
    free = dlfs.Dense(dense.w, None)
    assert free.params() == (free.w,) and free.forward(x)[0].tobytes() == (x @ dense.w).tobytes()


@settings(max_examples=20, deadline=None)
@given(seed=SEEDS, rows=SIZES, cols=SIZES, dtype=DTYPES, factor=st.floats(-3, 3))
def test_scaled_initializer_multiplies_the_draw(seed, rows, cols, dtype, factor):
    """scaled(init, f) draws init's numbers from the same generator, times f, same dtype."""
    for init in (dlfs.normal, dlfs.glorot_normal):
        got = dlfs.scaled(init, factor)(np.random.default_rng(seed), (rows, cols), dtype)
        want = init(np.random.default_rng(seed), (rows, cols), dtype)
        assert got.dtype == np.dtype(dtype)
        assert got.tobytes() == (want * np.dtype(dtype).type(factor)).tobytes()
    with pytest.raises(TypeError, match="init must be an initializer"):
        dlfs.scaled(0.02, dlfs.normal)
    with pytest.raises((TypeError, ValueError), match="factor"):
        dlfs.scaled(dlfs.normal, float("nan"))


def test_exact_gelu_is_x_phi_x():
    """GELU("none") = x (1 + erf(x / sqrt 2)) / 2 (PyTorch's nn.GELU()), its
    derivative Phi(x) + x phi(x), against math.erf on a grid."""
    x = np.linspace(-6, 6, 97)
    y, cache, _ = dlfs.GELU("none").forward(x[None])
    want = [v * (1 + math.erf(v / math.sqrt(2))) / 2 for v in x]
    np.testing.assert_allclose(y[0], want, rtol=1e-14, atol=1e-300)
    slope = [
        (1 + math.erf(v / math.sqrt(2))) / 2 + v * math.exp(-v * v / 2) / math.sqrt(2 * math.pi)
        for v in x
    ]
    np.testing.assert_allclose(
        dlfs.GELU("none").backward(cache, np.ones((1, 97)))[0][0], slope, rtol=1e-13, atol=1e-300
    )
    assert dlfs.GELU("none").forward(x[None].astype(np.float32))[0].dtype == np.float32


def _dx_per_position(forward_backward, x: np.ndarray, t: int, seed: int) -> np.ndarray:
    """dL/dx for L = sum(y[:, t] * dy_t): the gradient of position t's output only."""
    y, backward = forward_backward(x)
    dy = np.zeros_like(y)
    dy[:, t] = np.random.default_rng(seed).standard_normal(dy[:, t].shape)
    return backward(dy)


@settings(max_examples=15, deadline=None)
@given(seed=SEEDS, n=SIZES, heads=st.integers(1, 4), t=st.integers(2, 6))
def test_causal_masking_shown_by_gradients(seed, n, heads, t):
    """Causal: d y[:, t] / d x[:, s] is exactly 0 for every s > t and nonzero for some
    s <= t, for one attention layer and a whole pre-LN block; non-causal: later
    positions do reach earlier outputs."""
    rng = np.random.default_rng(seed)
    d = 2 * heads
    x = _rows_apart(rng, (n, t, d))
    for causal in (True, False):
        att = _randomized(
            dlfs.SelfAttention.init(seed, d, heads, causal=causal, dtype=np.float64),
            rng,
            np.float64,
        )
        block = _randomized_net(_pre_ln_block(seed, t, d, heads, causal=causal), seed)

        def run_att(x, att=att):
            y, cache, _ = att.forward(x)
            return y, lambda dy: att.backward(cache, dy)[0]

        def run_block(x, block=block):
            y, caches, _ = block.forward(x)
            return y, lambda dy: block.backward(caches, dy)[0]

        for run in (run_att, run_block):
            for s in range(t):
                dx = _dx_per_position(run, x, s, seed + s)
                assert np.abs(dx[:, : s + 1]).max() > 0
                later = dx[:, s + 1 :]
                if causal:
                    assert not later.any()  # exactly zero, not merely small
                elif s < t - 1:
                    assert np.abs(later).max() > 0


@settings(max_examples=8, deadline=None)
@given(seed=SEEDS, n=st.integers(1, 4), heads=st.integers(1, 2), t=st.integers(1, 4))
def test_pre_ln_block_gradients_match_finite_differences(seed, n, heads, t):
    """A whole pre-LN block: forward/backward for x and every parameter, and
    loss_and_grads of its MSE, against central differences in float64."""
    rng = np.random.default_rng(seed)
    d = 4 * heads  # LayerNorm over 2 features is +-1 and as ill-conditioned as can be
    net = _randomized_net(_pre_ln_block(seed, t, d, heads), seed)
    x, y = _rows_apart(rng, (n, t, d)), rng.standard_normal((n, t, d))
    sizes = [len(p) for p in net.params()]

    def f(x, *ps):
        it = iter(ps)
        lay = net.with_params(tuple(tuple(next(it) for _ in range(s)) for s in sizes))
        out, caches, _ = lay.forward(x)

        def vjp(dy):
            dx, grads = lay.backward(caches, dy)
            return [dx, *_leaves(grads)]

        return out, vjp

    assert dlfs.check_grads(f, [x, *_leaves(net.params())], key=seed % 997) < 1e-6
    assert _flat_params_check(net, x, y, key=seed % 991) < 1e-6


@pytest.mark.parametrize("biases", [False, True])
@settings(max_examples=5, deadline=None)
@given(seed=SEEDS, n=st.integers(1, 4))
def test_tiny_gpt_loss_and_grads_match_finite_differences(biases, seed, n):
    """The whole 1-block GPT (tied embedding, positions, attention, MLP, final
    LayerNorm): the loss's gradient for every parameter array, float64."""
    args = (dlfs.layer_norm(), dlfs.self_attention(2)) if biases else ()
    net = _randomized_net(_tiny_gpt(*args, dtype=np.float64), seed)
    rng = np.random.default_rng(seed)
    x, y = rng.integers(0, 7, (n, 6)), rng.integers(0, 7, (n, 6))
    assert _flat_params_check(net, x, y, key=seed % 997) < 1e-6


def _tied_case(seed: int, n: int, dtype) -> tuple[dlfs.TiedEmbedding, np.ndarray]:
    """A TiedEmbedding (V, D) around positions and a pre-LN attention block, random ids."""
    rng = np.random.default_rng(seed)
    v, heads, t = int(rng.integers(1, 9)), seed % 2 + 1, int(rng.integers(1, 6))
    d = 2 * heads
    dt = np.dtype(dtype)
    sub = (
        dlfs.PositionalEmbedding.init(seed, t + 1, d, dtype=dt),
        dlfs.Residual(
            (
                _randomized(dlfs.LayerNorm.init(d, dtype=dt), rng, dt),
                _randomized(dlfs.SelfAttention.init(seed, d, heads, dtype=dt), rng, dt),
            )
        ),
    )
    tied = dlfs.TiedEmbedding(rng.standard_normal((v, d)).astype(dt), sub)
    return tied, rng.integers(0, v, (n, t))


@settings(max_examples=15, deadline=None)
@given(seed=SEEDS, n=SIZES, dtype=DTYPES)
def test_tied_embedding_shapes_dtypes_purity_and_gradients(seed, n, dtype):
    tied, ids = _tied_case(seed, n, dtype)
    ids_copy, before = ids.copy(), [a.copy() for a in _deep_arrays(tied)]
    logits, cache, new = tied.forward(ids)
    assert new is tied
    assert logits.shape == (*ids.shape, tied.n_vocab) and logits.dtype == np.dtype(dtype)
    assert tied.output_shape(ids.shape[1:]) == (ids.shape[1], tied.n_vocab)
    dy = np.random.default_rng(seed + 1).standard_normal(logits.shape).astype(dtype)
    dx, grads = tied.backward(cache, dy)
    assert dx is None  # ids have no gradient
    np.testing.assert_array_equal(ids, ids_copy)
    assert [(g.shape, g.dtype) for g in grads] == [(p.shape, p.dtype) for p in tied.params()]
    assert all(a.tobytes() == b.tobytes() for a, b in zip(grads, tied.backward(cache, dy)[1]))
    assert all(a.tobytes() == b.tobytes() for a, b in zip(_deep_arrays(tied), before))
    if dtype == np.float64:

        def f(*ps):
            lay = tied.with_params(ps)
            out, cache, _ = lay.forward(ids)
            return out, lambda dy: lay.backward(cache, dy)[1]

        assert dlfs.check_grads(f, list(tied.params()), key=seed % 997) < 1e-6


@settings(max_examples=15, deadline=None)
@given(seed=SEEDS, n=SIZES)
def test_tied_embedding_is_one_parameter_with_the_summed_gradient(seed, n):
    """params() holds ONE (V, D) array; its gradient is the embedding's gradient
    plus the head's of the same model untied by hand: Embedding(w), the same
    sub-chain, Dense(w.T) without bias."""
    tied, ids = _tied_case(seed, n, np.float64)
    assert [p is tied.w for p in tied.params()] == [True] + [False] * (len(tied.params()) - 1)
    gpt = _tiny_gpt()
    assert [p.shape for p in _leaves(gpt.params())].count((7, 8)) == 1
    untied = [dlfs.Embedding(tied.w), *tied.layers, dlfs.Dense(tied.w.T, None)]
    h, caches = ids, []
    for layer in untied:
        h, cache, _ = layer.forward(h)
        caches.append(cache)
    logits, cache, _ = tied.forward(ids)
    np.testing.assert_allclose(logits, h, rtol=1e-12, atol=1e-12)
    dy = np.random.default_rng(seed).standard_normal(logits.shape)
    untied_grads, g = [], dy
    for layer, c in zip(reversed(untied), reversed(caches)):
        g, grads = layer.backward(c, g)
        untied_grads.insert(0, grads)
    _, tied_grads = tied.backward(cache, dy)
    (d_emb,), (d_head,) = untied_grads[0], untied_grads[-1]
    np.testing.assert_allclose(tied_grads[0], d_emb + d_head.T, rtol=1e-12, atol=1e-12)
    assert np.abs(d_emb).max() > 0 and np.abs(d_head).max() > 0  # both uses count
    sub = [g for grads in untied_grads[1:-1] for g in grads]
    for a, b in zip(tied_grads[1:], sub, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def _transformer_nets(dtype=np.float32) -> list[dlfs.Network]:
    """Networks with every new layer: both tiny GPTs, nested Residuals around Dense
    without bias, a LayerNorm without arrays, convolutions and attention."""
    nested = dlfs.network(
        3,
        (5, 4),
        [
            dlfs.residual(
                [
                    dlfs.residual([dlfs.dense(6, dlfs.GELU("none"), bias=False), dlfs.dense(4)]),
                    dlfs.layer_norm(scale=False, bias=False),
                    dlfs.residual(
                        [dlfs.layer_norm(scale=False), dlfs.self_attention(4, causal=False)]
                    ),
                ]
            ),
            dlfs.positional_embedding(7),
            dlfs.layer_norm(bias=False),
            dlfs.dense(3, bias=False),
        ],
        dlfs.MeanSquaredError(),
        dtype=dtype,
    )
    conv = dlfs.network(
        4,
        (2, 5, 5),
        [
            dlfs.residual([dlfs.conv2d(2, 3, padding="same"), dlfs.ReLU()]),
            dlfs.Flatten(),
            dlfs.dense(3),
        ],
        dlfs.SoftmaxCrossEntropy(),
        dtype=dtype,
    )
    biased = _tiny_gpt(dlfs.layer_norm(), dlfs.self_attention(2, dropout=0.1), dtype=dtype)
    return [_tiny_gpt(dtype=dtype), biased, nested, conv]


def _net_input(net: dlfs.Network, rng: np.random.Generator, n: int = 3) -> np.ndarray:
    if net._takes_ids():
        return rng.integers(0, net.output_shape[-1], (n, *net.input_shape))
    return rng.standard_normal((n, *net.input_shape)).astype(net.dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_transformer_networks_save_load_pickle_and_params_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(0)
    for i, net in enumerate(_transformer_nets(dtype)):
        net = _randomized_net(net, i)
        x = _net_input(net, rng)
        path = tmp_path / f"net{i}.npz"
        dlfs.save(path, net)
        loaded = dlfs.load(path).net
        _assert_same_net(net, loaded)  # nested layers, configuration, bits, read-only
        assert net.predict(x).tobytes() == loaded.predict(x).tobytes()
        for copied in _pickle_copies(net):
            _assert_same_net(net, copied)
        _assert_same_net(net, net.with_params(net.params()))
        doubled = tuple(tuple(p * 2 for p in ps) for ps in net.params())
        new = net.with_params(doubled)
        assert [p.tobytes() for p in _leaves(new.params())] == [
            p.tobytes() for p in _leaves(doubled)
        ]
        assert all(not p.flags.writeable for p in _leaves(new.params()))
        assert [p.tobytes() for p in _leaves(net.params())] != [
            p.tobytes() for p in _leaves(new.params())
        ]


def _depths(layers, level: int = 0) -> list[int]:
    """How deep each layer of ``dlfs._all_layers(layers)`` sits inside containers."""
    out = []
    for layer in layers:
        out.append(level)
        if isinstance(layer, dlfs._CHAINS):
            out += _depths(layer.layers, level + 1)
    return out


def test_summary_rows_of_nested_layers():
    """A row per layer at any depth, sub-layers indented below their container,
    whose count is the sum of theirs; the total counts the tied matrix once."""
    for net in _transformer_nets():
        rows = net.summary().rows[1:]
        layers = dlfs._all_layers(net.layers)
        assert len(rows) == len(layers)
        for (name, _, count), layer, depth in zip(rows, layers, _depths(net.layers)):
            assert name == "  " * depth + repr(layer)
            assert count == sum(p.size for p in layer.params())
            if isinstance(layer, dlfs._CHAINS):
                own = layer.w.size if isinstance(layer, dlfs.TiedEmbedding) else 0
                assert count == own + sum(sum(p.size for p in s.params()) for s in layer.layers)
        assert net.summary().total == sum(p.size for p in _leaves(net.params()))
    gpt = _tiny_gpt()
    assert [r[1] for r in gpt.summary().rows[:3]] == ["(N, 6)", "(N, 6, 7)", "(N, 6, 8)"]


def _token_stream(n: int = 400, vocab: int = 7) -> np.ndarray:
    """A learnable stream: a fixed cycle through the vocabulary, each id followed by one."""
    return np.tile(np.random.default_rng(5).permutation(vocab), n // vocab + 1)[:n]


def test_gpt_train_step_is_pure_deterministic_and_learns():
    net = _tiny_gpt(dlfs.layer_norm(), dlfs.self_attention(2, dropout=0.1))
    opt = dlfs.AdamW(1e-2, weight_decay=0.1, weight_decay_mask="matrices")
    ids = _token_stream()
    batches = list(dlfs.random_windows(1, ids, 6, 8, 40))
    state = dlfs.TrainState.create(net, opt, key=2)
    before = [_snapshot(a) for a in [*_deep_arrays_net(net), *batches[0]]]
    first = dlfs.train_step(state, batches[0])
    assert [_snapshot(a) for a in [*_deep_arrays_net(net), *batches[0]]] == before
    assert state.step == 0 and first.step == 1
    kept_opt, kept_net = (
        copy.deepcopy(first.opt_state),
        [_snapshot(a) for a in _deep_arrays_net(first.net)],
    )
    dlfs.train_step(first, batches[1])  # non-zero moments, a trained net: still untouched
    _trust_assert_same_opt_state(first.opt_state, kept_opt)
    assert [_snapshot(a) for a in _deep_arrays_net(first.net)] == kept_net
    for a in _deep_arrays_net(first.net):
        assert not a.flags.writeable and a.dtype == np.float32
    a = functools.reduce(dlfs.train_step, batches[:4], state)
    b = functools.reduce(dlfs.train_step, batches[:4], dlfs.TrainState.create(net, opt, key=2))
    _assert_same_net(a.net, b.net)
    assert a.loss_sum == b.loss_sum
    x, y = batches[0]
    start = net.loss_and_grads(x, y)[0]
    trained = functools.reduce(dlfs.train_step, batches, state).net
    end = trained.loss_and_grads(x, y)[0]
    assert end < 0.3 * start


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weight_decay_mask_decays_matrices_only(dtype):
    """AdamW with zero gradients moves nothing but the decay: under "matrices" the
    1-D arrays stay bit-identical and the 2-D shrink by exactly (1 - lr wd); a
    function chooses its own arrays; "all" shrinks every array."""
    net = _randomized_net(_tiny_gpt(dlfs.layer_norm(), dlfs.self_attention(2), dtype=dtype), 1)
    params = net.params()
    zeros = tuple(tuple(np.zeros_like(p) for p in ps) for ps in params)
    lr, wd = 0.1, 0.3

    def step(mask):
        opt = dlfs.AdamW(lr, weight_decay=wd, weight_decay_mask=mask)
        return _leaves(opt.update(zeros, opt.init(params), params)[0])

    leaves = _leaves(params)
    assert {p.ndim for p in leaves} == {1, 2}
    for p, q in zip(leaves, step("matrices")):
        want = p * (1 - lr * wd) if p.ndim >= 2 else p
        assert q.dtype == p.dtype and q.tobytes() == want.tobytes()
    for p, q in zip(leaves, step("all")):
        assert q.tobytes() == (p * (1 - lr * wd)).tobytes()
    vocab_only = step(lambda p: p.shape == (7, 8))
    for p, q in zip(leaves, vocab_only):
        assert q.tobytes() == (p * (1 - lr * wd) if p.shape == (7, 8) else p).tobytes()
    l2 = dlfs.Adam(lr, weight_decay=wd, weight_decay_mask="matrices")  # coupled L2, masked
    for p, q in zip(leaves, _leaves(l2.update(zeros, l2.init(params), params)[0])):
        assert (q.tobytes() == p.tobytes()) == (p.ndim < 2)
    for bad in ("vectors", 3, None):
        with pytest.raises(ValueError, match="weight_decay_mask"):
            dlfs.AdamW(weight_decay_mask=bad)


@settings(max_examples=20, deadline=None)
@given(seed=SEEDS, extra=st.integers(1, 6), context=SIZES, batch=SIZES, steps=st.integers(0, 4))
def test_random_windows_are_next_token_pairs(seed, extra, context, batch, steps):
    """x = ids[o : o + T], y = ids[o + 1 : o + T + 1], o in [0, L - T); the same key
    the same windows; every offset occurs, the last one reaching the stream's end."""
    ids = np.arange(context + extra, dtype=np.uint8) * 3 % 251  # distinct ids
    out = list(dlfs.random_windows(seed, ids, context, batch, steps))
    assert len(out) == steps
    for x, y in out:
        assert x.shape == y.shape == (batch, context) and x.dtype == y.dtype == np.int64
        offsets = [int(np.flatnonzero(ids == row[0])[0]) for row in x]
        for o, xr, yr in zip(offsets, x, y):
            assert 0 <= o < extra
            assert (xr == ids[o : o + context]).all() and (yr == ids[o + 1 : o + context + 1]).all()
    again = list(dlfs.random_windows(seed, ids, context, batch, steps))
    assert all(a.tobytes() == b.tobytes() for p, q in zip(out, again) for a, b in zip(p, q))
    many = np.concatenate([x[:, 0] for x, _ in dlfs.random_windows(seed, ids, context, 64, 4)])
    assert set(many.tolist()) == set(ids[:extra].tolist())  # the last window ends at ids[-1]


def test_random_windows_draw_new_offsets_per_batch_and_per_key():
    ids = np.arange(1000)
    one = [x for x, _ in dlfs.random_windows(0, ids, 5, 8, 3)]
    assert len({x.tobytes() for x in one}) == 3  # each batch its own offsets
    other = [x for x, _ in dlfs.random_windows(1, ids, 5, 8, 3)]
    assert all(a.tobytes() != b.tobytes() for a, b in zip(one, other))


def test_random_windows_bad_input():
    ids = np.arange(10)
    for kwargs, err, match in [
        ({"context": 10}, ValueError, "ids must hold more than context = 10"),
        ({"ids": np.arange(10.0)}, TypeError, "ids must be an integer array"),
        ({"ids": np.arange(10) - 1}, ValueError, "ids must be non-negative"),
        ({"ids": np.arange(12).reshape(3, 4)}, ValueError, "ids"),
        ({"steps": -1}, ValueError, "steps must be >= 0"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"context": 0}, ValueError, "context"),
        ({"key": "a"}, TypeError, "key"),
    ]:
        args = {"key": 0, "ids": ids, "context": 3, "batch_size": 2, "steps": 1, **kwargs}
        with pytest.raises(err, match=match):
            dlfs.random_windows(**args)


@settings(max_examples=10, deadline=None)
@given(seed=SEEDS, n=st.integers(1, 3), t0=st.integers(1, 9), n_new=st.integers(0, 8))
def test_generate_shapes_keys_greedy_and_cropping(seed, n, t0, n_new):
    net = _randomized_net(
        _tiny_gpt(dlfs.layer_norm(), dlfs.self_attention(2), dtype=np.float64), seed
    )
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, 7, (n, t0))
    prompt_copy = prompt.copy()
    new = dlfs.generate(net, prompt, n_new, key=seed, temperature=0.8, top_k=5)
    assert new.shape == (n, n_new) and new.dtype == np.int64
    assert ((new >= 0) & (new < 7)).all()
    np.testing.assert_array_equal(prompt, prompt_copy)
    again = dlfs.generate(net, prompt, n_new, key=seed, temperature=0.8, top_k=5)
    assert new.tobytes() == again.tobytes()
    cropped = dlfs.generate(net, prompt[:, -6:], n_new, key=seed, temperature=0.8, top_k=5)
    assert new.tobytes() == cropped.tobytes()  # only the last 6 ids (the context) count
    greedy, seq = dlfs.generate(net, prompt, n_new, key=seed, top_k=1), prompt
    for j in range(n_new):
        logits, _, _ = net.layers[0].forward(seq[:, -6:])
        seq = np.concatenate([seq, logits[:, -1].argmax(axis=-1)[:, None]], axis=1)
        assert (greedy[:, j] == seq[:, -1]).all()


def test_generate_samples_differ_by_key_and_follow_temperature():
    net = _randomized_net(_tiny_gpt(dtype=np.float64), 2)
    prompt = np.zeros((4, 3), np.int64)
    samples = [dlfs.generate(net, prompt, 20, key=k) for k in range(3)]
    assert len({s.tobytes() for s in samples}) == 3
    cold = dlfs.generate(net, prompt, 20, key=0, temperature=1e-6)
    assert cold.tobytes() == dlfs.generate(net, prompt, 20, key=0, top_k=1).tobytes()


def test_generate_bad_input():
    net = _tiny_gpt()
    prompt = np.array([[1, 2, 3]])
    for kwargs, err, match in [
        ({"prompt": prompt.astype(np.float64)}, TypeError, "prompt must be an integer array"),
        ({"prompt": [[1, 2]]}, TypeError, "prompt must be a numpy array"),
        ({"prompt": np.array([1, 2])}, ValueError, "prompt must have shape"),
        ({"prompt": np.zeros((1, 0), np.int64)}, ValueError, "prompt"),
        ({"net": _linear_net()}, TypeError, "net must be a language model"),
        ({"net": "gpt"}, TypeError, "net must be a language model"),
        ({"n_new": -1}, ValueError, "n_new"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"top_k": 0}, ValueError, "top_k"),
        ({"key": "k"}, TypeError, "key"),
    ]:
        args = {"net": net, "prompt": prompt, "n_new": 2, "key": 0, **kwargs}
        with pytest.raises(err, match=match):
            dlfs.generate(**args)


def test_generate_names_prompt_ids_out_of_range():
    for prompt in (np.array([[1, 7]]), np.array([[-1, 2]])):
        with pytest.raises(ValueError, match=r"prompt.*\[0, 7\)"):
            dlfs.generate(_tiny_gpt(), prompt, 2, key=0)


def test_transformer_bad_input_is_named():
    f32 = np.float32
    with pytest.raises(ValueError, match=r"x has 5 positions, more than the 4 .*max_len"):
        dlfs.PositionalEmbedding.init(0, 4, 3).forward(np.zeros((2, 5, 3), f32))
    with pytest.raises(ValueError, match=r"T <= 4"):
        dlfs.network(0, (5, 3), [dlfs.positional_embedding(4)], dlfs.MeanSquaredError())
    gpt = _tiny_gpt()
    with pytest.raises(ValueError, match=r"x must have shape \(N, 6\), got \(2, 8\)"):
        gpt.forward(np.zeros((2, 8), np.int64))
    with pytest.raises(ValueError, match=r"x must hold ids in \[0, 7\), got values in \[-1, 3\]"):
        gpt.forward(np.array([[0, 1, 2, 3, -1, 0]]))
    with pytest.raises(ValueError, match=r"x must hold ids in \[0, 7\)"):
        gpt.layers[0].forward(np.full((1, 6), 7))
    with pytest.raises(TypeError, match="x must be an integer array of token ids"):
        gpt.forward(np.zeros((1, 6), f32))
    for make in (
        lambda: dlfs.SelfAttention.init(0, 6, 4),
        lambda: dlfs.network(0, (4, 6), [dlfs.self_attention(4)], dlfs.MeanSquaredError()),
        lambda: dlfs.SelfAttention(np.zeros((6, 18)), np.zeros((6, 6)), n_heads=4),
    ):
        with pytest.raises(ValueError, match=r"divisible by n_heads.*(n_heads=4|n_heads)"):
            make()
    with pytest.raises(
        ValueError, match=r"Residual's layers must keep the shape.*\(N, 4, 6\).*\(N, 4, 3\)"
    ):
        dlfs.network(0, (4, 6), [dlfs.residual([dlfs.dense(3)])], dlfs.MeanSquaredError())
    with pytest.raises(ValueError, match="keep the shape"):
        dlfs.Residual((dlfs.Dense.init(0, 4, 3),)).output_shape((4,))
    with pytest.raises(ValueError, match=r"turned x of shape \(2, 4\) into \(2, 3\)"):
        dlfs.Residual((dlfs.Dense.init(0, 4, 3),)).forward(np.zeros((2, 4), f32))
    with pytest.raises(ValueError, match=r"Residual needs at least one layer"):
        dlfs.Residual(())
    with pytest.raises(
        ValueError, match=r"TiedEmbedding's layers must keep the shape \(N, T, 6\).*\(N, 4, 3\)"
    ):
        dlfs.network(
            0, (4,), [dlfs.tied_embedding(5, 6, [dlfs.dense(3)])], dlfs.SoftmaxCrossEntropy()
        )
    tied = dlfs.TiedEmbedding(np.zeros((5, 6)), (dlfs.Dense.init(0, 6, 3, dtype=np.float64),))
    with pytest.raises(ValueError, match="keep the shape"):
        tied.output_shape((4,))
    with pytest.raises(ValueError, match=r"layers' output must have shape \(2, 4, 6\)"):
        tied.forward(np.zeros((2, 4), np.int64))
    with pytest.raises(TypeError, match=r"layers\[1\] must be a layer"):
        dlfs.Residual((dlfs.Tanh(), "tanh"))
    half = {
        "LayerNorm": (dlfs.LayerNorm.init(3), (2, 3)),
        "LayerNorm-bare": (dlfs.LayerNorm(), (2, 3)),
        "SelfAttention": (dlfs.SelfAttention.init(0, 4, 2), (2, 3, 4)),
        "PositionalEmbedding": (dlfs.PositionalEmbedding.init(0, 4, 3), (2, 3, 3)),
        "Residual": (dlfs.Residual((dlfs.Dense.init(0, 3, 3),)), (2, 3)),
    }
    for layer, shape in half.values():
        with pytest.raises(
            TypeError, match="x must be a float32 or float64 array, got dtype float16"
        ):
            layer.forward(np.zeros(shape, np.float16))
    for layer, shape in list(half.values())[:-1]:
        if layer.params():
            with pytest.raises(TypeError, match="float32"):
                layer.forward(np.zeros(shape, np.float64))
    d64 = dlfs.Dense.init(0, 4, 4, dtype=np.float64)
    with pytest.raises(TypeError, match=r"share one dtype.*float32.*float64"):
        dlfs.Residual((dlfs.Dense.init(0, 4, 4), d64))
    with pytest.raises(TypeError, match=r"share w's dtype float32"):
        dlfs.TiedEmbedding(np.zeros((5, 4), f32), (d64,))
    with pytest.raises(ValueError, match="gamma and beta must be 1-D"):
        dlfs.LayerNorm(np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"beta must have shape \(3,\)"):
        dlfs.LayerNorm(np.ones(3), np.zeros(4))
    with pytest.raises(ValueError, match="dropout"):
        dlfs.self_attention(2, dropout=1.0)
    with pytest.raises(ValueError, match="w must be 2-D"):
        dlfs.PositionalEmbedding(np.zeros(3))
    with pytest.raises(ValueError, match="x must have shape"):
        dlfs.LayerNorm.init(3).forward(np.zeros((2, 4), f32))


def test_sub_layers_draw_their_own_dropout_masks():
    """Each layer of a sub-chain gets its own key, as a network's layers do: two
    Dropout(0.5) in a row keep a quarter of the entries (at 1/0.5^2), not half;
    two blocks of a network draw different masks."""
    x, ctx = np.ones((50, 80)), dlfs.train_context(3)
    fx = dlfs.Residual((dlfs.Dropout(0.5), dlfs.Dropout(0.5))).forward(x, ctx)[0] - x
    assert set(np.unique(fx).tolist()) == {0.0, 4.0}
    assert 0.22 < np.mean(fx == 4.0) < 0.28
    tied = dlfs.TiedEmbedding(np.eye(4), (dlfs.Dropout(0.5), dlfs.Dropout(0.5)))
    logits = tied.forward(np.zeros((50, 80), np.int64), ctx)[0]  # h[0] = 4 or 0
    assert 0.22 < np.mean(logits[..., 0] == 4.0) < 0.28
    blocks = [dlfs.residual([dlfs.Dropout(0.5)]), dlfs.residual([dlfs.Dropout(0.5)])]
    net = dlfs.network(0, 80, blocks, dlfs.MeanSquaredError(), dtype=np.float64)
    y = net.forward(x, ctx)[0]  # (1 + 2 m1)(1 + 2 m2): 3 only where the masks differ
    assert set(np.unique(y).tolist()) == {1.0, 3.0, 9.0}


def _transformer_call(target: str, a, b, n):
    """The call for ``target`` with bad inputs: arrays ``a``, ``b`` and a number ``n``."""
    gpt = _tiny_gpt()
    size = min(n, 64) if isinstance(n, int) and not isinstance(n, bool) else n
    calls = {
        "layer_norm": lambda: dlfs.LayerNorm.init(3).forward(a),
        "layer_norm_bare": lambda: dlfs.LayerNorm().forward(a),
        "layer_norm_arrays": lambda: dlfs.LayerNorm(a, b),
        "attention": lambda: dlfs.SelfAttention.init(0, 4, 2).forward(a),
        "attention_arrays": lambda: dlfs.SelfAttention(a, b),
        "positions": lambda: dlfs.PositionalEmbedding.init(0, 4, 3).forward(a),
        "residual": lambda: dlfs.Residual((dlfs.Dense.init(0, 3, 3),)).forward(a),
        "tied": lambda: dlfs.TiedEmbedding(np.zeros((5, 4), np.float32)).forward(a),
        "gpt_forward": lambda: gpt.forward(a),
        "gpt_loss": lambda: gpt.loss_and_grads(a, b),
        "generate": lambda: dlfs.generate(gpt, a, 2, key=0),
        "generate_n": lambda: dlfs.generate(gpt, np.array([[1, 2]]), size, key=0),
        "generate_temperature": lambda: dlfs.generate(
            gpt, np.array([[1]]), 1, key=0, temperature=n
        ),
        "generate_top_k": lambda: dlfs.generate(gpt, np.array([[1]]), 1, key=0, top_k=n),
        "windows": lambda: list(dlfs.random_windows(0, a, 2, 2, 1)),
        "windows_n": lambda: list(dlfs.random_windows(0, np.arange(100), size, size, 1)),
        "specs": lambda: dlfs.network(
            0,
            (4, 4),
            [
                dlfs.layer_norm(eps=n),
                dlfs.self_attention(size),
                dlfs.positional_embedding(size),
            ],
            dlfs.MeanSquaredError(),
        ),
        "tied_spec": lambda: dlfs.tied_embedding(size, 4),
        "scaled": lambda: dlfs.scaled(dlfs.normal, n)(np.random.default_rng(0), (2, 2)),
        "decay_mask": lambda: dlfs.AdamW(weight_decay_mask=n),
        "inits": lambda: (
            dlfs.LayerNorm.init(size),
            dlfs.SelfAttention.init(0, 4, size),
            dlfs.PositionalEmbedding.init(0, size, 3),
        ),
    }
    return calls[target]


_TRANSFORMER_TARGETS = [
    "layer_norm",
    "layer_norm_bare",
    "layer_norm_arrays",
    "attention",
    "attention_arrays",
    "positions",
    "residual",
    "tied",
    "gpt_forward",
    "gpt_loss",
    "generate",
    "generate_n",
    "generate_temperature",
    "generate_top_k",
    "windows",
    "windows_n",
    "specs",
    "tied_spec",
    "scaled",
    "decay_mask",
    "inits",
]


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_transformer_api_fuzz(data):
    """Odd arrays and numbers into the new layers and functions: a result or a clear
    ValueError/TypeError, never an internal error; the inputs untouched."""
    target = data.draw(st.sampled_from(_TRANSFORMER_TARGETS))
    args = [data.draw(_trust_arrays()), data.draw(_trust_arrays()), data.draw(_TRUST_BAD_NUMBERS)]
    before = [_snapshot(x) for x in args]
    with np.errstate(all="ignore"):
        try:
            _transformer_call(target, *args)()
        except (ValueError, TypeError) as err:
            _assert_clear_error(err)
    assert [_snapshot(x) for x in args] == before


def test_self_attention_arrays_of_any_rank_are_checked():
    for w_qkv in (np.zeros(()), np.zeros((4, 12))):
        for w_o in (np.zeros(()), np.zeros(4), np.zeros((4, 4, 1))):
            with pytest.raises(ValueError, match="w_o") as err:
                dlfs.SelfAttention(w_qkv, w_o)
            _assert_clear_error(err.value)


def test_attention_dropout_needs_a_key_and_uses_it():
    """Dropout on the attention weights: evaluation ignores it, training draws it
    from the context's key (same key, same output; another key, another)."""
    layer = dlfs.SelfAttention.init(0, 4, 2, dropout=0.5, dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((3, 5, 4))
    plain = dlfs.SelfAttention.init(0, 4, 2, dtype=np.float64).forward(x)[0]
    assert layer.forward(x)[0].tobytes() == plain.tobytes()
    a, b, c = (layer.forward(x, dlfs.train_context(k))[0] for k in (1, 1, 2))
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()
    assert a.tobytes() != plain.tobytes()
    with pytest.raises(ValueError, match="key"):
        layer.forward(x, dlfs.Context(train=True))


@pytest.mark.parametrize(
    "call, names, fix",
    [
        (lambda: dlfs.PositionalEmbedding(64), "PositionalEmbedding", "positional_embedding(64)"),
        (lambda: dlfs.LayerNorm(128), "gamma=128", "dlfs.LayerNorm.init(128)"),
        (lambda: dlfs.SelfAttention(128, 4), "SelfAttention", "SelfAttention.init(key, dim"),
        (lambda: dlfs.Residual(64), "layers must be a list of layers", "dlfs.residual([...])"),
        (lambda: dlfs.TiedEmbedding(np.eye(3), 5), "layers must be a list", "tied_embedding("),
    ],
)
def test_transformer_classes_called_keras_style_name_the_spec(call, names, fix):
    """Sizes where a class takes arrays (``LayerNorm(128)``): the spec and init to use."""
    with pytest.raises(TypeError) as info:
        call()
    assert names in str(info.value) and fix in str(info.value), str(info.value)
    _assert_clear_error(info.value)
    assert repr(dlfs.LayerNorm()) == "LayerNorm(scale=False, bias=False, eps=1e-05)"


# ---- transformers against PyTorch (float64, 1e-10): layers, MultiheadAttention, a GPT
# Each test skips where torch is not installed (``pip install -e '.[bench]'``): the
# new layers, forward and every gradient from a random upstream dy, equal PyTorch's
# to 1e-10 in float64; the documented nn.MultiheadAttention mapping; a whole 2-layer
# GPT (loss, every gradient, three clipped AdamW steps) against a nanoGPT-style module.

TORCH_TOL = 1e-10


def _gpt_torch():
    """torch, or skip the calling test (each test asks: no module-level import)."""
    return pytest.importorskip("torch", reason="the PyTorch comparisons need torch")


def _torch_close(ours, theirs, what: str) -> float:
    """|ours - theirs| <= 1e-10 * max(1, max|theirs|) elementwise; returns the max error."""
    theirs = theirs.detach().numpy() if hasattr(theirs, "detach") else np.asarray(theirs)
    ours = np.asarray(ours)
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} != torch's {theirs.shape}"
    err = float(np.abs(ours - theirs).max()) if ours.size else 0.0
    scale = max(1.0, float(np.abs(theirs).max()) if theirs.size else 0.0)
    assert err <= TORCH_TOL * scale, f"{what}: max |dlfs - torch| = {err:.3e} (scale {scale:.3g})"
    return err


def _as_torch(torch, a: np.ndarray, grad: bool = True):
    return torch.tensor(np.array(a), dtype=torch.float64, requires_grad=grad)


def _layer_vs_torch(torch, layer, x: np.ndarray, ref, params: tuple, rng, name: str) -> None:
    """dlfs layer on x against ``ref(x_t, *params_t)``: output, dx and every grad.

    ``params``: the layer's arrays in ``layer.params()``'s order and dlfs's layout
    (``ref`` transposes where torch's layout differs), so torch's gradients compare
    with dlfs's as they are."""
    y, cache, _ = layer.forward(x)
    xt = _as_torch(torch, x)
    pt = [_as_torch(torch, p) for p in params]
    yt = ref(xt, *pt)
    _torch_close(y, yt, f"{name} output")
    dy = rng.standard_normal(y.shape)
    dx, grads = layer.backward(cache, dy)
    (yt * torch.from_numpy(dy)).sum().backward()
    _torch_close(dx, xt.grad, f"{name} dx")
    assert len(grads) == len(layer.params()) == len(pt)
    for i, (g, p) in enumerate(zip(grads, pt)):
        _torch_close(g, p.grad, f"{name} grad of params()[{i}]")


# ------------------------------------------------------------------ LayerNorm


@settings(max_examples=8, deadline=None)
@given(
    lead=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    d=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
@pytest.mark.parametrize(("scale", "bias"), [(True, True), (True, False), (False, False)])
def test_layer_norm_matches_torch(scale, bias, lead, d, seed):
    """dlfs.LayerNorm over the last axis == F.layer_norm(x, (D,), gamma, beta, 1e-5)."""
    torch = _gpt_torch()
    F = torch.nn.functional
    rng = np.random.default_rng(seed)
    layer = dlfs.LayerNorm.init(d, scale=scale, bias=bias, dtype=np.float64)
    fresh = [
        rng.standard_normal(p.shape) + (1.0 if i == 0 and scale else 0.0)
        for i, p in enumerate(layer.params())
    ]
    layer = layer.with_params(fresh)
    x = rng.standard_normal((*lead, d)) * 3 + rng.standard_normal()

    def ref(xt, *ps):
        gamma = ps[0] if scale else None
        beta = ps[-1] if bias else None
        return F.layer_norm(xt, (d,), gamma, beta, 1e-5)

    _layer_vs_torch(torch, layer, x, ref, tuple(fresh), rng, "LayerNorm")


def test_layer_norm_module_mapping():
    """nn.LayerNorm(D, bias=False).weight is gamma (nanoGPT's LayerNorm without bias)."""
    torch = _gpt_torch()
    rng = np.random.default_rng(3)
    d = 6
    gamma = rng.standard_normal(d)
    module = torch.nn.LayerNorm(d, eps=1e-5, bias=False, dtype=torch.float64)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(gamma))
    x = rng.standard_normal((2, 5, d))
    y, _, _ = dlfs.LayerNorm(gamma).forward(x)
    _torch_close(y, module(torch.from_numpy(x)), "LayerNorm vs nn.LayerNorm(bias=False)")


# -------------------------------------------------------------- SelfAttention


def _attention_ref(torch, n_heads: int, causal: bool, bias: bool, explicit: bool):
    """torch: qkv = x W_qkv (+b), heads of D/H, softmax(q k^T / sqrt(D/H)) v, y = O W_o (+b)."""

    F = torch.nn.functional

    def ref(xt, *ps):
        if bias:
            w_qkv, b_qkv, w_o, b_o = ps
        else:
            (w_qkv, w_o), b_qkv, b_o = ps, None, None
        n, t, d = xt.shape
        qkv = xt @ w_qkv + (b_qkv if bias else 0)
        q, k, v = (a.view(n, t, n_heads, d // n_heads).transpose(1, 2) for a in qkv.split(d, 2))
        if explicit:
            att = (q @ k.transpose(-2, -1)) / (d // n_heads) ** 0.5
            if causal:
                mask = torch.ones(t, t, dtype=torch.bool).triu(1)
                att = att.masked_fill(mask, float("-inf"))
            o = att.softmax(-1) @ v
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        o = o.transpose(1, 2).reshape(n, t, d)
        return o @ w_o + (b_o if bias else 0)

    return ref


@settings(max_examples=6, deadline=None)
@given(
    n=st.integers(1, 3),
    t=st.integers(1, 7),
    n_heads=st.integers(1, 4),
    head_dim=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_self_attention_matches_torch(causal, bias, n, t, n_heads, head_dim, seed):
    """SelfAttention == nanoGPT's CausalSelfAttention computed by torch (its
    scaled_dot_product_attention, and the explicit masked softmax), output and grads."""
    torch = _gpt_torch()
    rng = np.random.default_rng(seed)
    d = n_heads * head_dim
    w_qkv, w_o = rng.standard_normal((d, 3 * d)) * 0.7, rng.standard_normal((d, d)) * 0.7
    b_qkv, b_o = (rng.standard_normal(3 * d), rng.standard_normal(d)) if bias else (None, None)
    layer = dlfs.SelfAttention(w_qkv, w_o, b_qkv, b_o, n_heads=n_heads, causal=causal)
    params = (w_qkv, b_qkv, w_o, b_o) if bias else (w_qkv, w_o)
    assert len(layer.params()) == len(params)
    for p, q in zip(layer.params(), params):
        np.testing.assert_array_equal(p, q)  # params() order: (w_qkv, b_qkv?, w_o, b_o?)
    x = rng.standard_normal((n, t, d))
    for explicit in (False, True):
        ref = _attention_ref(torch, n_heads, causal, bias, explicit)
        _layer_vs_torch(torch, layer, x, ref, params, rng, f"SelfAttention(explicit={explicit})")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_self_attention_maps_to_multihead_attention(causal, bias):
    """The documented mapping: nn.MultiheadAttention(D, H, batch_first=True) with
    in_proj_weight = w_qkv.T, in_proj_bias = b_qkv, out_proj.weight = w_o.T,
    out_proj.bias = b_o, and a causal attn_mask gives dlfs's output (and dx)."""
    torch = _gpt_torch()
    rng = np.random.default_rng(7)
    n, t, d, h = 2, 6, 12, 3
    w_qkv, w_o = rng.standard_normal((d, 3 * d)) * 0.5, rng.standard_normal((d, d)) * 0.5
    b_qkv, b_o = (rng.standard_normal(3 * d), rng.standard_normal(d)) if bias else (None, None)
    layer = dlfs.SelfAttention(w_qkv, w_o, b_qkv, b_o, n_heads=h, causal=causal)
    mha = torch.nn.MultiheadAttention(d, h, bias=bias, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.from_numpy(w_qkv.T.copy()))
        mha.out_proj.weight.copy_(torch.from_numpy(w_o.T.copy()))
        if bias:
            mha.in_proj_bias.copy_(torch.from_numpy(b_qkv))
            mha.out_proj.bias.copy_(torch.from_numpy(b_o))
    x = rng.standard_normal((n, t, d))
    xt = _as_torch(torch, x)
    mask = torch.ones(t, t, dtype=torch.bool).triu(1) if causal else None
    yt, _ = mha(xt, xt, xt, attn_mask=mask, need_weights=False)
    y, cache, _ = layer.forward(x)
    _torch_close(y, yt, "SelfAttention vs nn.MultiheadAttention output")
    dy = rng.standard_normal(y.shape)
    (yt * torch.from_numpy(dy)).sum().backward()
    dx, grads = layer.backward(cache, dy)
    _torch_close(dx, xt.grad, "SelfAttention vs nn.MultiheadAttention dx")
    _torch_close(grads[0], mha.in_proj_weight.grad.T, "d w_qkv vs in_proj_weight.grad.T")
    _torch_close(
        grads[-2 if bias else -1], mha.out_proj.weight.grad.T, "d w_o vs out_proj.weight.grad.T"
    )


# ------------------------------------------------- Dense, GELU, positions


@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 5)])
def test_dense_without_bias_matches_torch_linear(shape):
    """Dense(w, None) on (N, D) and (N, T, D) == F.linear(x, w.T): nn.Linear(bias=False)
    holds weight = w.T."""
    torch = _gpt_torch()
    F = torch.nn.functional
    rng = np.random.default_rng(11)
    w = rng.standard_normal((shape[-1], 7))
    layer = dlfs.Dense(w, None)
    assert len(layer.params()) == 1
    _layer_vs_torch(
        torch,
        layer,
        rng.standard_normal(shape),
        lambda xt, wt: F.linear(xt, wt.T),
        (w,),
        rng,
        "Dense(bias=None)",
    )


def test_exact_gelu_matches_torch():
    """GELU(approximate="none") == F.gelu (erf form) over [-40, 40], value and slope."""
    torch = _gpt_torch()
    F = torch.nn.functional
    rng = np.random.default_rng(5)
    x = np.concatenate([np.linspace(-40, 40, 4000), rng.standard_normal(500) * 4])
    x = x.reshape(9, -1)
    _layer_vs_torch(
        torch, dlfs.GELU(approximate="none"), x, lambda xt: F.gelu(xt), (), rng, "GELU(none)"
    )
    _layer_vs_torch(
        torch,
        dlfs.GELU(approximate="tanh"),
        x,
        lambda xt: F.gelu(xt, approximate="tanh"),
        (),
        rng,
        "GELU(tanh)",
    )


@pytest.mark.parametrize("t", [1, 5, 8])
def test_positional_embedding_matches_torch(t):
    """x + w[:T] for T <= T_max; the rows of w beyond T get a zero gradient."""
    torch = _gpt_torch()
    F = torch.nn.functional
    rng = np.random.default_rng(t)
    t_max, d = 8, 4
    w = rng.standard_normal((t_max, d))
    ref = lambda xt, wt: xt + F.embedding(torch.arange(xt.shape[1]), wt)  # noqa: E731
    _layer_vs_torch(
        torch,
        dlfs.PositionalEmbedding(w),
        rng.standard_normal((3, t, d)),
        ref,
        (w,),
        rng,
        "PositionalEmbedding",
    )


# ------------------------------------------------------- Residual, tying


def test_residual_around_dense_chain_matches_torch():
    """Residual((LayerNorm, Dense, GELU, Dense)) == x + f(x); grads flattened in order."""
    torch = _gpt_torch()
    F = torch.nn.functional
    rng = np.random.default_rng(13)
    d, hidden = 5, 9
    gamma, beta = 1 + 0.3 * rng.standard_normal(d), 0.3 * rng.standard_normal(d)
    w1, b1, w2 = (rng.standard_normal(s) * 0.6 for s in ((d, hidden), (hidden,), (hidden, d)))
    layer = dlfs.Residual(
        (
            dlfs.LayerNorm(gamma, beta),
            dlfs.Dense(w1, b1),
            dlfs.GELU(approximate="none"),
            dlfs.Dense(w2, None),
        )
    )

    def ref(xt, g, b, w1t, b1t, w2t):
        h = F.layer_norm(xt, (d,), g, b, 1e-5)
        return xt + F.gelu(h @ w1t + b1t) @ w2t

    _layer_vs_torch(
        torch,
        layer,
        rng.standard_normal((3, 4, d)),
        ref,
        (gamma, beta, w1, b1, w2),
        rng,
        "Residual",
    )


def test_tied_embedding_matches_torch():
    """TiedEmbedding(w, (LayerNorm,)): logits = LN(w[ids]) w^T; the ONE w gets the
    sum of both uses' gradients, as nanoGPT's wte.weight = lm_head.weight."""
    torch = _gpt_torch()
    F = torch.nn.functional
    rng = np.random.default_rng(17)
    v, d, n, t = 11, 6, 3, 5
    w, gamma = rng.standard_normal((v, d)), 1 + 0.3 * rng.standard_normal(d)
    layer = dlfs.TiedEmbedding(w, (dlfs.LayerNorm(gamma),))
    assert len(layer.params()) == 2
    ids = rng.integers(0, v, (n, t))
    y, cache, _ = layer.forward(ids)
    wt, gt = _as_torch(torch, w), _as_torch(torch, gamma)
    yt = F.linear(F.layer_norm(F.embedding(torch.from_numpy(ids), wt), (d,), gt, None, 1e-5), wt)
    _torch_close(y, yt, "TiedEmbedding logits")
    dy = rng.standard_normal(y.shape)
    (yt * torch.from_numpy(dy)).sum().backward()
    _, (dw, dgamma) = layer.backward(cache, dy)
    _torch_close(dw, wt.grad, "TiedEmbedding dw (both uses)")
    _torch_close(dgamma, gt.grad, "TiedEmbedding d gamma")


# ------------------------------------------------------------ a whole GPT


def _gpt(seed: int, v: int, t: int, d: int, n_layer: int, n_heads: int, bias: bool):
    """api22's baby-GPT builder, at any size (float64)."""

    def block():
        return [
            dlfs.residual([dlfs.layer_norm(bias=bias), dlfs.self_attention(n_heads, bias=bias)]),
            dlfs.residual(
                [
                    dlfs.layer_norm(bias=bias),
                    dlfs.dense(4 * d, dlfs.GELU("none"), bias=bias),
                    dlfs.dense(d, bias=bias),
                ]
            ),
        ]

    body = [dlfs.positional_embedding(t)] + [la for _ in range(n_layer) for la in block()]
    return dlfs.network(
        seed,
        (t,),
        [dlfs.tied_embedding(v, d, [*body, dlfs.layer_norm(bias=bias)])],
        dlfs.SoftmaxCrossEntropy(),
        dtype=np.float64,
    )


def gpt_param_names(net) -> list[str]:
    """nanoGPT's state_dict names of ``net.params()[0]``, in order (a tied-embedding GPT)."""
    (tied,) = net.layers
    names, block = ["transformer.wte.weight"], -1

    def ln(layer, prefix):
        return [f"{prefix}.weight"] * (layer.gamma is not None) + [f"{prefix}.bias"] * (
            layer.beta is not None
        )

    for layer in tied.layers:
        if isinstance(layer, dlfs.PositionalEmbedding):
            names.append("transformer.wpe.weight")
        elif isinstance(layer, dlfs.LayerNorm):
            names += ln(layer, "transformer.ln_f")
        elif isinstance(layer, dlfs.Residual):
            subs = layer.layers
            attn = any(isinstance(s, dlfs.SelfAttention) for s in subs)
            block += attn
            p = f"transformer.h.{block}"
            denses = iter(["c_fc", "c_proj"])
            for s in subs:
                if isinstance(s, dlfs.LayerNorm):
                    names += ln(s, f"{p}.ln_1" if attn else f"{p}.ln_2")
                elif isinstance(s, dlfs.SelfAttention):
                    names += [f"{p}.attn.c_attn.weight"] + [f"{p}.attn.c_attn.bias"] * (
                        s.b_qkv is not None
                    )
                    names += [f"{p}.attn.c_proj.weight"] + [f"{p}.attn.c_proj.bias"] * (
                        s.b_o is not None
                    )
                elif isinstance(s, dlfs.Dense):
                    c = next(denses)
                    names += [f"{p}.mlp.{c}.weight"] + [f"{p}.mlp.{c}.bias"] * (s.b is not None)
                else:
                    assert not s.params(), f"unexpected parameters in {s!r}"
        else:
            assert not layer.params(), f"unexpected parameters in {layer!r}"
    assert len(names) == len(tied.params())
    return names


def torch_layout(name: str, a: np.ndarray) -> np.ndarray:
    """dlfs's array -> torch's: Linear weights are (out, in), the transpose of dlfs's."""
    return a.T if a.ndim == 2 and name.split(".")[-2] in ("c_attn", "c_proj", "c_fc") else a


def _torch_gpt(torch, v: int, t: int, d: int, n_layer: int, n_heads: int, bias: bool):
    """nanoGPT's GPT (pre-LN, tied wte/lm_head, learned positions, dropout 0) as
    torch modules with its state_dict names, float64."""
    F = torch.nn.functional

    class _Attn(torch.nn.Module):
        def __init__(self, d, n_heads, bias):
            super().__init__()
            self.c_attn = torch.nn.Linear(d, 3 * d, bias=bias)
            self.c_proj = torch.nn.Linear(d, d, bias=bias)
            self.n_heads = n_heads

        def forward(self, x):
            n, t, d = x.shape
            q, k, v = (
                a.view(n, t, self.n_heads, d // self.n_heads).transpose(1, 2)
                for a in self.c_attn(x).split(d, dim=2)
            )
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(y.transpose(1, 2).contiguous().view(n, t, d))

    class _Block(torch.nn.Module):
        def __init__(self, d, n_heads, bias):
            super().__init__()
            self.ln_1 = torch.nn.LayerNorm(d, bias=bias)
            self.attn = _Attn(d, n_heads, bias)
            self.ln_2 = torch.nn.LayerNorm(d, bias=bias)
            self.mlp = torch.nn.Sequential()
            self.mlp.add_module("c_fc", torch.nn.Linear(d, 4 * d, bias=bias))
            self.mlp.add_module("gelu", torch.nn.GELU())
            self.mlp.add_module("c_proj", torch.nn.Linear(4 * d, d, bias=bias))

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class TorchGPT(torch.nn.Module):
        """nanoGPT's GPT (pre-LN, tied wte/lm_head, learned positions), dropout 0."""

        def __init__(self, v, t, d, n_layer, n_heads, bias):
            super().__init__()
            self.transformer = torch.nn.ModuleDict(
                dict(
                    wte=torch.nn.Embedding(v, d),
                    wpe=torch.nn.Embedding(t, d),
                    h=torch.nn.ModuleList(_Block(d, n_heads, bias) for _ in range(n_layer)),
                    ln_f=torch.nn.LayerNorm(d, bias=bias),
                )
            )
            self.lm_head = torch.nn.Linear(d, v, bias=False)
            self.transformer.wte.weight = self.lm_head.weight

        def forward(self, idx, targets):
            tr = self.transformer
            x = tr.wte(idx) + tr.wpe(torch.arange(idx.shape[1]))
            for block in tr.h:
                x = block(x)
            logits = self.lm_head(tr.ln_f(x))
            return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))

    return TorchGPT(v, t, d, n_layer, n_heads, bias).double()


@pytest.mark.parametrize("bias", [False, True])
def test_two_layer_gpt_loss_and_every_gradient_match_torch(bias):
    """api22's GPT builder (n_layer=2, D=16, 2 heads, T=8, V=11, float64), every
    weight redrawn at random, against a nanoGPT-style torch model holding the same
    weights: the loss and all gradients agree to 1e-10 (the tied matrix once)."""
    torch = _gpt_torch()
    v, t, d, n_layer, n_heads = 11, 8, 16, 2, 2
    rng = np.random.default_rng(19)
    net = _gpt(0, v, t, d, n_layer, n_heads, bias)
    names = gpt_param_names(net)
    fresh = [
        (
            1.0
            if n.endswith("ln_1.weight") or n.endswith("ln_2.weight") or n.endswith("ln_f.weight")
            else 0.0
        )
        + 0.4 * rng.standard_normal(p.shape)
        for n, p in zip(names, net.params()[0])
    ]
    net = net.with_params((tuple(fresh),))
    model = _torch_gpt(torch, v, t, d, n_layer, n_heads, bias)
    own = dict(model.named_parameters())
    assert sorted(own) == sorted(names)  # the tied matrix is one parameter on both sides
    with torch.no_grad():
        for n, a in zip(names, fresh):
            own[n].copy_(torch.from_numpy(np.ascontiguousarray(torch_layout(n, a))))

    x = rng.integers(0, v, (3, t))
    y = rng.integers(0, v, (3, t))
    loss, grads, _ = net.loss_and_grads(x, y)
    loss_t = model(torch.from_numpy(x), torch.from_numpy(y))
    loss_t.backward()
    _torch_close(np.float64(loss), loss_t, "GPT loss")
    assert len(grads) == 1 and len(grads[0]) == len(names)
    for n, g in zip(names, grads[0]):
        _torch_close(g, torch_layout(n, own[n].grad.numpy()), f"GPT grad of {n}")


def test_two_layer_gpt_training_steps_match_torch():
    """Three ``train_step``s with chain(ClipByGlobalNorm(1), AdamW(weight_decay_mask=
    "matrices")) == torch.optim.AdamW with nanoGPT's two param groups (decay on
    ndim >= 2) after clip_grad_norm_(1.0): every step's loss and the final weights."""
    torch = _gpt_torch()
    v, t, d, n_layer, n_heads = 11, 8, 16, 2, 2
    rng = np.random.default_rng(23)
    net = _gpt(0, v, t, d, n_layer, n_heads, False)
    names = gpt_param_names(net)
    fresh = [
        (1.0 if p.ndim == 1 else 0.0) + 0.4 * rng.standard_normal(p.shape) for p in net.params()[0]
    ]
    net = net.with_params((tuple(fresh),))
    model = _torch_gpt(torch, v, t, d, n_layer, n_heads, False)
    own = dict(model.named_parameters())
    with torch.no_grad():
        for n, a in zip(names, fresh):
            own[n].copy_(torch.from_numpy(np.ascontiguousarray(torch_layout(n, a))))
    lr, wd = 1e-2, 0.1
    groups = [
        {"params": [p for p in own.values() if p.dim() >= 2], "weight_decay": wd},
        {"params": [p for p in own.values() if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt_t = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99), eps=1e-8)
    adamw = dlfs.AdamW(lr, b1=0.9, b2=0.99, eps=1e-8, weight_decay=wd, weight_decay_mask="matrices")
    state = dlfs.TrainState.create(net, dlfs.chain(dlfs.ClipByGlobalNorm(1.0), adamw), key=0)
    norms = []
    for _ in range(3):
        x, y = rng.integers(0, v, (4, t)), rng.integers(0, v, (4, t))
        before = state.loss_sum
        state = dlfs.train_step(state, (x, y))
        loss_t = model(torch.from_numpy(x), torch.from_numpy(y))
        loss_t.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
        opt_t.step()
        opt_t.zero_grad(set_to_none=True)
        _torch_close(np.float64((state.loss_sum - before) / len(x)), loss_t, "GPT step loss")
    assert max(norms) > 1.0  # the clipping acted
    for n, p in zip(names, state.net.params()[0]):
        _torch_close(p, torch_layout(n, own[n].detach().numpy()), f"GPT weight {n} after 3 steps")


# ---------- losses: values, gradients, dtypes, stable tails, targets checked


@settings(max_examples=25, deadline=None)
@given(seed=SEEDS, n=SIZES, k=SIZES, dtype=DTYPES)
def test_mse_value_gradient_dtype(seed, n, k, dtype):
    rng = np.random.default_rng(seed)
    pred, target = rng.standard_normal((2, n, k))
    loss = dlfs.MeanSquaredError()
    p32, t32 = pred.astype(dtype), target.astype(dtype)
    p_copy = p32.copy()
    value, cache = loss.forward(p32, t32)
    assert np.asarray(value).dtype == np.dtype(dtype)
    assert loss.backward(cache).dtype == np.dtype(dtype)
    np.testing.assert_array_equal(p32, p_copy)
    value, cache = loss.forward(pred, target)
    np.testing.assert_allclose(value, np.sum((pred - target) ** 2) / n, rtol=1e-12)
    np.testing.assert_allclose(loss.backward(cache), 2 * (pred - target) / n, rtol=1e-12)
    dlfs.check_loss(loss, pred, target, key=seed % 991)


@settings(max_examples=25, deadline=None)
@given(seed=SEEDS, n=SIZES, k=st.integers(2, 8), dtype=DTYPES, smoothing=st.sampled_from([0, 0.1]))
def test_softmax_cross_entropy_value_gradient_dtype(seed, n, k, dtype, smoothing):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n, k)) * 3
    labels = rng.integers(0, k, n)
    onehot = np.eye(k)[labels]
    q = (1 - smoothing) * onehot + smoothing / k
    want = -(q * _log_softmax(logits)).sum() / n
    loss = dlfs.SoftmaxCrossEntropy(label_smoothing=smoothing)
    for target in (labels, onehot):
        value, cache = loss.forward(logits, target)
        np.testing.assert_allclose(value, want, rtol=1e-12)
        dz = loss.backward(cache)
        sm = np.exp(_log_softmax(logits))
        np.testing.assert_allclose(dz, (sm - q) / n, rtol=1e-10, atol=1e-15)
        dlfs.check_loss(loss, logits, target, key=seed % 991)
    z = logits.astype(dtype)
    z_copy = z.copy()
    for target in (labels, onehot.astype(dtype)):
        value, cache = loss.forward(z, target)
        assert np.asarray(value).dtype == np.dtype(dtype)
        assert loss.backward(cache).dtype == np.dtype(dtype)
    np.testing.assert_array_equal(z, z_copy)


@settings(max_examples=25, deadline=None)
@given(seed=SEEDS, n=SIZES, k=SIZES, dtype=DTYPES)
def test_binary_cross_entropy_value_gradient_dtype(seed, n, k, dtype):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n, k)) * 3
    target = rng.uniform(0, 1, (n, k))
    s = 1 / (1 + np.exp(-logits))
    want = -np.mean(target * np.log(s) + (1 - target) * np.log(1 - s))
    loss = dlfs.BinaryCrossEntropy()
    value, cache = loss.forward(logits, target)
    np.testing.assert_allclose(value, want, rtol=1e-10)
    np.testing.assert_allclose(loss.backward(cache), (s - target) / (n * k), rtol=1e-10)
    dlfs.check_loss(loss, logits, target, key=seed % 991)
    value, cache = loss.forward(logits.astype(dtype), target.astype(dtype))
    assert np.asarray(value).dtype == np.dtype(dtype)
    assert loss.backward(cache).dtype == np.dtype(dtype)


def test_bce_is_stable_for_large_logits():
    z = np.array([[1000.0, -1000.0]])
    value, _ = dlfs.BinaryCrossEntropy().forward(z, np.array([[1.0, 0.0]]))
    assert value == 0.0
    value, _ = dlfs.BinaryCrossEntropy().forward(z, np.array([[0.0, 1.0]]))
    np.testing.assert_allclose(value, 1000.0)


def test_loss_bad_input():
    mse = dlfs.MeanSquaredError()
    with pytest.raises(ValueError, match="target must have the same shape"):
        mse.forward(np.zeros((4, 1)), np.zeros(4))
    with pytest.raises(TypeError, match="target must have dtype float64"):
        mse.forward(np.zeros((4, 1)), np.zeros((4, 1), np.float32))
    with pytest.raises(ValueError, match="pred must not be empty"):
        mse.forward(np.zeros((0, 1)), np.zeros((0, 1)))
    sce = dlfs.SoftmaxCrossEntropy()
    logits = np.zeros((3, 4))
    with pytest.raises(ValueError, match="labels must be in"):
        sce.forward(logits, np.array([0, 1, 4]))
    with pytest.raises(ValueError, match="labels must be in"):
        sce.forward(logits, np.array([0, -1, 2]))
    with pytest.raises(ValueError, match="target must have shape"):
        sce.forward(logits, np.array([0, 1]))
    with pytest.raises(ValueError, match="target must have the same shape"):
        sce.forward(logits, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="target must have the same shape"):
        sce.forward(logits, np.zeros(3))
    with pytest.raises(ValueError, match="label_smoothing"):
        dlfs.SoftmaxCrossEntropy(label_smoothing=1.5)
    bce = dlfs.BinaryCrossEntropy()
    with pytest.raises(ValueError, match=r"target must be in \[0, 1\]"):
        bce.forward(np.zeros((2, 1)), np.array([[0.0], [2.0]]))
    with pytest.raises(ValueError, match="target must have the same shape"):
        bce.forward(np.zeros((2, 1)), np.zeros(2))


def test_bce_keeps_the_tails_of_its_sigmoid_and_loss():
    bce = dlfs.BinaryCrossEntropy()
    for dtype in (np.float32, np.float64):
        eps = float(np.finfo(dtype).eps)
        for z in np.linspace(-80, 80, 161).astype(dtype).tolist():
            d = decimal.Decimal(z)
            for t in (1.0, 0.0):
                loss, cache = bce.forward(np.array([z], dtype), np.array([t], dtype))
                with decimal.localcontext(_DEC):
                    ref = max(d, 0) - d * decimal.Decimal(t) + _dec_log1p(_DEC.exp(-abs(d)))
                assert abs(float(loss) - float(ref)) <= 4 * eps * float(ref), (z, t)
            s = float(_dec_sigmoid(d))  # the gradient for t = 0 (the last forward) is sigmoid(z)
            assert abs(float(bce.backward(cache)[0]) - s) <= 4 * eps * s, z


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, -0.5, 1.5])
def test_bce_rejects_targets_outside_0_1_anywhere(bad):
    logits = np.zeros((5, 2), np.float32)
    target = np.full((5, 2), 0.5, np.float32)
    target[-1, -1] = bad  # the last entry
    with pytest.raises(ValueError, match=r"target must be in \[0, 1\] \(no NaN\)"):
        dlfs.BinaryCrossEntropy().forward(logits, target)


@pytest.mark.parametrize(
    "loss", [dlfs.MeanSquaredError(), dlfs.BinaryCrossEntropy(), dlfs.SoftmaxCrossEntropy()]
)
def test_loss_and_grads_checks_targets_as_the_loss_does(loss):
    """The fused in-place loss of a network refuses what the loss's forward
    refuses, with its message: a column (N,) for (N, 1), another dtype, N = 1 too."""
    net = dlfs.Network([dlfs.Dense.init(0, 2, 1)], loss, (2,))  # network() refuses SCE on 1
    for n in (1, 3):
        x = np.ones((n, 2), np.float32)
        for y in (np.ones(n, np.float32), np.ones((n, 1))):
            with pytest.raises((TypeError, ValueError)) as expected:
                loss.forward(net.predict(x), y)
            with pytest.raises(type(expected.value), match=re.escape(str(expected.value))):
                net.loss_and_grads(x, y)


# ------------ networks: the builder infers shapes; params, predict, backward


def test_builder_infers_shapes():
    net = _boston_like()
    kinds = [type(layer).__name__ for layer in net.layers]
    assert kinds == ["Dense", "Sigmoid", "Dense"]
    assert net.layers[0].w.shape == (13, 13) and net.layers[2].w.shape == (13, 1)
    assert net.output_shape == (1,) and net.input_shape == (13,)
    assert net.dtype == np.float32
    conv_like = dlfs.network(
        1,
        (2, 3, 3),
        [
            dlfs.Flatten(),
            dlfs.dense(4, dlfs.ReLU()),
            dlfs.batch_norm(),
            dlfs.Dropout(0.2),
            dlfs.dense(3),
        ],
        dlfs.SoftmaxCrossEntropy(),
        dtype=np.float64,
    )
    assert conv_like.layers[1].w.shape == (18, 4)
    assert conv_like.layers[3].gamma.shape == (4,)
    assert conv_like.output_shape == (3,) and conv_like.dtype == np.float64
    y = conv_like.predict(np.zeros((5, 2, 3, 3)))
    assert y.shape == (5, 3) and y.dtype == np.float64


def test_builder_same_key_same_weights():
    a, b = _boston_like(), _boston_like()
    for pa, pb in zip(a.params(), b.params()):
        for x, y in zip(pa, pb):
            np.testing.assert_array_equal(x, y)
    c = dlfs.network(
        1, 13, [dlfs.dense(13, dlfs.Sigmoid()), dlfs.dense(1)], dlfs.MeanSquaredError()
    )
    assert not np.array_equal(a.layers[0].w, c.layers[0].w)
    # each dense layer gets its own sub-key
    same = dlfs.network(0, 4, [dlfs.dense(4), dlfs.dense(4)], dlfs.MeanSquaredError())
    assert not np.array_equal(same.layers[0].w, same.layers[1].w)


def test_layers_that_do_not_chain_raise():
    mse = dlfs.MeanSquaredError()
    with pytest.raises(ValueError, match="layer 1"):
        dlfs.Network([dlfs.Dense.init(0, 3, 4), dlfs.Dense.init(0, 5, 2)], mse, 3)
    with pytest.raises(ValueError, match="Flatten"):
        dlfs.network(0, (1, 4, 4), [dlfs.dense(3)], mse)
    with pytest.raises(ValueError, match=r"layers\[0\] \(Dense\)"):
        dlfs.network(0, 5, [dlfs.Dense.init(0, 3, 2)], mse)
    with pytest.raises(ValueError, match=r"layers\[1\] \(Dense\)"):  # its real index
        dlfs.network(0, 5, [dlfs.dense(4), dlfs.Dense.init(0, 3, 2)], mse)
    with pytest.raises(TypeError, match="layers"):
        dlfs.network(0, 3, [dlfs.dense(2), "relu"], mse)
    with pytest.raises(TypeError, match="loss"):
        dlfs.network(0, 3, [dlfs.dense(2)], "mse")
    with pytest.raises(TypeError, match="activation"):
        dlfs.dense(3, "sigmoid")
    with pytest.raises(ValueError, match="n_out"):
        dlfs.dense(0)
    with pytest.raises(TypeError, match="dtype"):
        dlfs.network(0, 3, [dlfs.dense(2)], mse, dtype=np.int64)
    with pytest.raises(TypeError, match="input_shape"):
        dlfs.network(0, "13", [dlfs.dense(2)], mse)
    with pytest.raises(ValueError, match="input_shape"):
        dlfs.network(0, 0, [dlfs.dense(2)], mse)
    with pytest.raises(ValueError, match="n_in"):
        dlfs.Dense.init(0, 0, 3)
    with pytest.raises(TypeError, match="one dtype"):
        dlfs.Network([dlfs.Dense.init(0, 3, 2), dlfs.Dense.init(0, 2, 1, dtype=np.float64)], mse, 3)


def test_params_with_params_round_trip():
    net = _boston_like()
    params = net.params()
    assert [len(p) for p in params] == [2, 0, 2]
    again = net.with_params(params)
    for pa, pb in zip(again.params(), params):
        for x, y in zip(pa, pb):
            np.testing.assert_array_equal(x, y)
    doubled = net.with_params(tuple(tuple(2 * a for a in layer) for layer in params))
    np.testing.assert_array_equal(doubled.layers[0].w, 2 * net.layers[0].w)
    assert not doubled.layers[0].w.flags.writeable
    np.testing.assert_array_equal(net.layers[0].w, params[0][0])  # original untouched
    with pytest.raises(ValueError, match="params"):
        net.with_params(params[:2])
    bad_shape = (params[0], (), (np.zeros((13, 2), np.float32), params[2][1]))
    with pytest.raises(ValueError, match="shape"):
        net.with_params(bad_shape)
    bad_dtype = (params[0], (), tuple(a.astype(np.float64) for a in params[2]))
    with pytest.raises(TypeError, match="dtype"):
        net.with_params(bad_dtype)


def test_network_gradients_match_finite_differences():
    net = dlfs.network(
        3,
        4,
        [dlfs.dense(5, dlfs.Tanh()), dlfs.batch_norm(), dlfs.dense(3, dlfs.SiLU()), dlfs.dense(2)],
        dlfs.SoftmaxCrossEntropy(0.1),
        dtype=np.float64,
    )
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((6, 4)), rng.integers(0, 2, 6)
    ctx = dlfs.train_context(0)
    flat = [p for layer in net.params() for p in layer]
    sizes = [len(p) for p in net.params()]

    def unflatten(ps):
        out, i = [], 0
        for s in sizes:
            out.append(tuple(ps[i : i + s]))
            i += s
        return tuple(out)

    def f(*ps):
        loss, grads, _ = net.with_params(unflatten(ps)).loss_and_grads(x, y, ctx)
        return np.asarray(loss), lambda dy: [g * dy for layer in grads for g in layer]

    assert dlfs.check_grads(f, flat, key=1) < 1e-6


def test_predict_bad_input():
    net = _linear_net()
    with pytest.raises(TypeError, match="x must be a float32 or float64"):
        net.predict(np.zeros((2, 3), np.int64))
    with pytest.raises(TypeError, match="x must have dtype float32"):
        net.predict(np.zeros((2, 3), np.float64))
    with pytest.raises(TypeError, match="x must be a float"):
        net.predict(np.zeros((2, 3), object))
    with pytest.raises(TypeError, match="x must be a float"):
        net.predict(np.zeros((2, 3), np.complex64))
    with pytest.raises(TypeError, match="x must be a numpy array"):
        net.predict([[0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match=r"x must have shape \(N, 3\)"):
        net.predict(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"x must have shape"):
        net.predict(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="x must not be empty"):
        net.predict(np.zeros((0, 3), np.float32))
    for bad in (np.nan, np.inf):
        x = np.zeros((2, 3), np.float32)
        x[1, 2] = bad
        with pytest.raises(ValueError, match="x contains NaN or inf"):
            net.predict(x)


def test_predict_batch_size_validated():
    net = _linear_net()
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="batch_size"):
        net.predict(x, batch_size=0)
    with pytest.raises(TypeError, match="batch_size"):
        net.predict(x, batch_size=2.5)
    with pytest.raises(TypeError, match="batch_size"):
        net.predict(x, batch_size="all")


def test_predict_in_batches_matches_whole():
    x, _ = _regression(n=37)
    net = _linear_net()
    np.testing.assert_allclose(
        net.predict(x, batch_size=5), net.predict(x, batch_size=None), rtol=1e-6
    )


def test_softmax_after_image_shape_rejected_at_build():
    with pytest.raises(ValueError, match="Softmax"):
        dlfs.network(0, (1, 4, 4), [dlfs.Softmax()], dlfs.MeanSquaredError())


def test_classifier_helpers():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 4)).astype(np.float32)
    labels = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0)
    sce = dlfs.network(0, 4, [dlfs.dense(3)], dlfs.SoftmaxCrossEntropy())
    p = sce.predict_proba(x, batch_size=7)
    z = sce.predict(x).astype(np.float64)
    want = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    assert p.dtype == np.float32 and p.shape == (30, 3)
    np.testing.assert_allclose(p, want, rtol=1e-6)
    np.testing.assert_array_equal(sce.predict_classes(x), z.argmax(axis=1))
    assert sce.predict_classes(x).dtype == np.int64
    scores = sce.evaluate(x, labels)
    assert scores == {
        "loss": float(sce.loss.forward(sce.predict(x), labels)[0]),
        "accuracy": dlfs.accuracy(sce.predict(x), labels),
    }
    assert all(type(v) is float for v in scores.values())
    assert list(sce.evaluate(x, labels, metric=None)) == ["loss"]
    assert list(sce.evaluate(x, labels, metric=lambda p, t: 0.5)) == ["loss", "metric"]
    with pytest.raises(TypeError, match="metric must be 'auto', None or a callable"):
        sce.evaluate(x, labels, metric=np.zeros(3))
    with pytest.raises(ValueError, match=r"y labels must be in \[0, 3\)"):
        sce.evaluate(x, labels + 1)

    bce = dlfs.network(0, 4, [dlfs.dense(1)], dlfs.BinaryCrossEntropy(), dtype=np.float64)
    big = bce.with_params(((np.full((4, 1), 400.0), np.zeros(1)),))
    far = np.array([[10.0] * 4, [-10.0] * 4])  # logits +-16000: no overflow
    np.testing.assert_array_equal(big.predict_proba(far), [[1.0], [0.0]])
    z1 = bce.predict(x.astype(np.float64))
    np.testing.assert_allclose(bce.predict_proba(x.astype(np.float64)), 1 / (1 + np.exp(-z1)))
    np.testing.assert_array_equal(bce.predict_classes(x.astype(np.float64)), (z1[:, 0] > 0))
    multi = dlfs.network(0, 4, [dlfs.dense(3)], dlfs.BinaryCrossEntropy())
    assert multi.predict_classes(x).shape == (30, 3)
    assert set(bce.evaluate(x.astype(np.float64), (z1 > 0).astype(np.float64))) == {
        "loss",
        "binary_accuracy",
    }

    plain = dlfs.Network([dlfs.Tanh()], dlfs.MeanSquaredError(), 4)  # no parameters, no dtype
    assert plain.evaluate(x, np.tanh(x)) == {"loss": 0.0}  # float32 data set the dtype
    mse = dlfs.network(0, 4, [dlfs.dense(1)], dlfs.MeanSquaredError())
    for method in (mse.predict_proba, mse.predict_classes):
        with pytest.raises(TypeError, match=r"classifier.*MeanSquaredError.*use predict\(x\)"):
            method(x)
    one_hot_mse = dlfs.network(0, 4, [dlfs.dense(3)], dlfs.MeanSquaredError())
    np.testing.assert_array_equal(
        one_hot_mse.predict_classes(x), one_hot_mse.predict(x).argmax(axis=1)
    )
    assert list(mse.evaluate(x, x[:, :1])) == ["loss"]


def test_network_backward_gives_the_input_gradient():
    net = dlfs.network(
        1,
        4,
        [dlfs.dense(5, dlfs.Tanh()), dlfs.batch_norm(), dlfs.dense(3, dlfs.Softmax())],
        dlfs.MeanSquaredError(),
        dtype=np.float64,
    )
    x = np.random.default_rng(2).standard_normal((6, 4))
    ctx = dlfs.train_context(0)

    def f(x):
        y, caches, _ = net.forward(x, ctx)
        return y, lambda dy: (net.backward(caches, dy)[0],)

    assert dlfs.check_grads(f, [x], key=4) < 1e-7
    y, caches, _ = net.forward(x, ctx)
    dy = np.ones_like(y)
    dx, grads = net.backward(caches, dy)
    assert dx.shape == x.shape and [len(g) for g in grads] == [2, 0, 2, 2, 0]


_ELEMENTWISE = [
    dlfs.ReLU(), dlfs.LeakyReLU(), dlfs.Sigmoid(), dlfs.Tanh(), dlfs.ELU(), dlfs.GELU(),
    dlfs.SiLU(), dlfs.Softmax(), dlfs.Linear(), dlfs.Dropout(0.5), dlfs.Flatten(),
    dlfs.BatchNorm(*(np.ones(3, np.float32) for _ in range(4))),
]  # fmt: skip


@pytest.mark.parametrize("layer", _ELEMENTWISE, ids=lambda layer: type(layer).__name__)
def test_layer_backward_refuses_a_dy_it_would_broadcast_or_cast(layer):
    """Every layer's public backward checks dy: a (1, ...) dy is not broadcast over
    the batch (where the cache knows the output's shape: all but Linear and
    evaluation-mode Dropout, whose dx is dy), float16 and integer dy are refused,
    and float64 for float32 where the cache knows the dtype."""
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    for ctx in (dlfs.train_context(0), dlfs.EVAL):
        y, cache, _ = layer.forward(x, ctx)
        identity = isinstance(layer, dlfs.Linear) or (
            isinstance(layer, dlfs.Dropout) and not ctx.train
        )
        if not identity:
            with pytest.raises(ValueError, match=r"dy must have shape \(4, 3\), got \(1, 3\)"):
                layer.backward(cache, np.ones((1, 3), np.float32))
        for dtype in (np.float16, np.int64):
            with pytest.raises(TypeError, match="dy must be a float32 or float64 array"):
                layer.backward(cache, np.ones(y.shape, dtype))
        masked = identity or isinstance(layer, (dlfs.LeakyReLU, dlfs.Flatten))
        if not masked:
            with pytest.raises(TypeError, match="dy must have dtype float32"):
                layer.backward(cache, np.ones(y.shape))
        dx, _ = layer.backward(cache, np.ones(y.shape, np.float32))
        assert dx.shape == x.shape and dx.dtype == np.float32


@pytest.mark.parametrize("last", [dlfs.ReLU(), dlfs.Tanh(), dlfs.Flatten(), dlfs.Dropout(0.5)])
def test_network_backward_refuses_a_dy_of_another_dtype(monkeypatch, last):
    """Network.backward checks dy's dtype against the network's before any layer
    runs: float16 and integer dy are refused (not upcast or truncated), and so is
    float64 for a float32 network, whatever the last layer (these four would not)."""
    net = dlfs.network(0, 2, [dlfs.dense(3), last], dlfs.MeanSquaredError())
    y, caches, _ = net.forward(np.ones((4, 2), np.float32), dlfs.train_context(0))
    dense_backward, reached = dlfs.Dense.backward, []
    monkeypatch.setattr(dlfs.Dense, "backward", lambda *a: reached.append(1) or dense_backward(*a))
    for dtype in (np.float16, np.int64, np.int8):
        with pytest.raises(
            TypeError, match=rf"dy must be a float32 or float64 array, got dtype {np.dtype(dtype)}"
        ):
            net.backward(caches, np.ones(y.shape, dtype))
    with pytest.raises(
        TypeError, match=r"dy must have dtype float32 \(the network's\), got float64"
    ):
        net.backward(caches, np.ones(y.shape))
    assert reached == []  # refused before the layers
    dx, _ = net.backward(caches, np.ones(y.shape, np.float32))
    assert dx.dtype == np.float32 and reached == [1]


def test_network_prediction_helpers_at_their_edges():
    x = np.random.default_rng(7).standard_normal((5, 3)).astype(np.float32)
    net = dlfs.network(0, 3, [dlfs.dense(2), dlfs.Softmax()], dlfs.MeanSquaredError())
    np.testing.assert_allclose(net.predict(x, batch_size=2), net.predict(x), rtol=1e-6)
    flat = dlfs.network(0, (3, 1, 1), [dlfs.Flatten(), dlfs.dense(2)], dlfs.MeanSquaredError())
    images = x.reshape(5, 3, 1, 1)
    np.testing.assert_allclose(flat.predict(images, batch_size=2), flat.predict(images), rtol=1e-6)
    assert inspect.signature(dlfs.Network.predict).parameters["batch_size"].default == 1024
    huge = dlfs.Network([dlfs.Linear()], dlfs.SoftmaxCrossEntropy(), (3,))
    z = np.array([[1000.0, -1000.0, 0.0], [-1000.0, -1000.0, -1000.0]], np.float32)
    np.testing.assert_allclose(huge.predict_proba(z), [[1, 0, 0], [1 / 3, 1 / 3, 1 / 3]], rtol=1e-6)
    bce = dlfs.Network([dlfs.Linear()], dlfs.BinaryCrossEntropy(), (1,))
    logits = np.array([[0.0], [1e-30], [-1e-30]], np.float32)  # z > 0 is class 1, as in metrics
    np.testing.assert_array_equal(bce.predict_classes(logits), [0, 1, 0])
    with pytest.raises(TypeError, match="bias_init must be an initializer"):
        dlfs.dense(3, bias_init=0.0)
    with pytest.raises(TypeError) as info:  # a dtype mistake: no reshape hint
        _hard_net().predict(np.zeros((2, 3)))
    assert "dtype float32" in str(info.value) and "flatten" not in str(info.value)


def test_classifier_helpers_defaults_and_shapes():
    for method in (dlfs.Network.predict_proba, dlfs.Network.predict_classes):
        assert inspect.signature(method).parameters["batch_size"].default == 1024
    assert inspect.signature(dlfs.Network.evaluate).parameters["batch_size"].default == 1024
    grid = dlfs.Network([], dlfs.MeanSquaredError(), (1, 2, 1))  # one output per (1, 2) pixel
    with pytest.raises(TypeError, match="predict_classes must be called on a classifier"):
        grid.predict_classes(np.zeros((3, 1, 2, 1), np.float32))


def test_builders_refuse_dtypes_other_than_float32_and_float64():
    for bad in (np.float16, np.int32, "complex64"):
        msg = f"dtype must be float32 or float64, got {np.dtype(bad)}"
        with pytest.raises(TypeError, match=msg):
            dlfs.Dense.init(0, 2, 3, dtype=bad)
        with pytest.raises(TypeError, match=msg):
            dlfs.network(0, 2, [dlfs.dense(1)], dlfs.MeanSquaredError(), dtype=bad)
        with pytest.raises(TypeError, match=msg):
            dlfs.one_hot(np.array([0, 1]), 2, dtype=bad)


def test_network_layers_must_be_a_list():
    for bad in (dlfs.dense(1), dlfs.ReLU(), "dense", None):
        with pytest.raises(TypeError, match="layers must be a list of layers or specs, got"):
            dlfs.network(0, 2, bad, dlfs.MeanSquaredError())


# ---- optimizers: PyTorch's update rules, float32 state, current lr, checked grads


@pytest.mark.parametrize("wd", [0.0, 0.05])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_first_three_updates_match_pytorch_rules(name, wd):
    lr = 0.1
    opt = _make_opt(name, lr, wd)
    (w, b), grad = _problem()
    params = ((w, b),)
    state = opt.init(params)
    assert state.count == 0 and state.lr == lr
    for t, want in enumerate(_reference(name, lr, wd)):
        grads = (grad(params[0], t),)
        params_copy = [p.copy() for p in params[0]]
        grads_copy = [g.copy() for g in grads[0]]
        new, state = opt.update(grads, state, params)
        for p, c in zip(params[0], params_copy):
            np.testing.assert_array_equal(p, c)
        for g, c in zip(grads[0], grads_copy):
            np.testing.assert_array_equal(g, c)
        assert state.count == t + 1 and state.lr == lr
        for p, expected in zip(new[0], want):
            np.testing.assert_allclose(p, expected, rtol=1e-12, atol=1e-14)
            assert not p.flags.writeable
        params = new


def test_adamw_default_weight_decay_is_pytorch_default():
    assert dlfs.AdamW().weight_decay == 0.01
    assert dlfs.Adam().lr == 1e-3 and dlfs.RMSProp().alpha == 0.99


def test_optimizer_with_schedule_exposes_current_lr():
    sched = dlfs.ExponentialDecay(0.1, 0.5)
    opt = dlfs.SGD(sched)
    (w, b), grad = _problem()
    params = ((w, b),)
    state = opt.init(params)
    assert state.lr == sched(0)
    p_ref = [w.copy(), b.copy()]
    for t in range(3):
        g = grad(params[0], t)
        params, state = opt.update((g,), state, params)
        p_ref = [p - sched(t) * gi for p, gi in zip(p_ref, g)]
        assert state.count == t + 1
        assert state.lr == sched(t)  # the lr of the update just made
        for p, q in zip(params[0], p_ref):
            np.testing.assert_allclose(p, q, rtol=1e-12)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_float32_state_stays_float32(name):
    (w, b), grad = _problem(np.float32)
    opt = _make_opt(name, 0.01, 0.01)
    params = ((w, b),)
    state = opt.init(params)
    for t in range(2):
        g = tuple(a.astype(np.float32) for a in grad(params[0], t))
        params, state = opt.update((g,), state, params)
        for p in params[0]:
            assert p.dtype == np.float32
        for slot in state.slots:
            for layer in slot:
                for a in layer:
                    assert a.dtype == np.float32


def test_optimizer_bad_input():
    params = ((np.zeros((2, 2)), np.zeros(2)),)
    opt = dlfs.Adam()
    state = opt.init(params)
    with pytest.raises(ValueError, match="grads"):
        opt.update(((np.zeros((2, 3)), np.zeros(2)),), state, params)
    with pytest.raises(ValueError, match="grads"):
        opt.update(((np.zeros((2, 2), np.float32), np.zeros(2)),), state, params)
    with pytest.raises(ValueError, match="grads"):
        opt.update((), state, params)
    with pytest.raises(TypeError, match="state"):
        opt.update(((np.zeros((2, 2)), np.zeros(2)),), None, params)
    bad = [
        (dlfs.SGD, {"lr": -0.1}, "lr"),
        (dlfs.SGD, {"lr": math.nan}, "lr"),
        (dlfs.SGD, {"lr": 0.1, "weight_decay": -1}, "weight_decay"),
        (dlfs.Momentum, {"momentum": 1.0}, "momentum"),
        (dlfs.Momentum, {"momentum": -0.5}, "momentum"),
        (dlfs.AdaGrad, {"eps": 0.0}, "eps"),
        (dlfs.RMSProp, {"alpha": 1.5}, "alpha"),
        (dlfs.Adam, {"b1": 1.0}, "b1"),
        (dlfs.Adam, {"b2": -0.1}, "b2"),
        (dlfs.Adam, {"lr": -1e-3}, "lr"),
        (dlfs.AdamW, {"weight_decay": -0.01}, "weight_decay"),
        (dlfs.Constant, {"lr": -1}, "lr"),
        (dlfs.StepDecay, {"lr": 0.1, "step_size": 0}, "step_size"),
        (dlfs.StepDecay, {"lr": 0.1, "step_size": 2, "gamma": 2.0}, "gamma"),
        (dlfs.ExponentialDecay, {"lr": 0.1, "gamma": -0.5}, "gamma"),
        (dlfs.LinearDecay, {"lr": 0.1, "final_lr": -0.1, "steps": 10}, "final_lr"),
        (dlfs.LinearDecay, {"lr": 0.1, "final_lr": 0.0, "steps": 0}, "steps"),
        (dlfs.CosineDecay, {"lr": 0.1, "steps": 10, "warmup": 10}, "warmup"),
        (dlfs.CosineDecay, {"lr": 0.1, "steps": 10, "warmup": -1}, "warmup"),
        (dlfs.ClipByGlobalNorm, {"max_norm": 0.0}, "max_norm"),
        (dlfs.MaxNorm, {"c": -1.0}, "c"),
        (dlfs.WeightDecay, {"weight_decay": -1.0}, "weight_decay"),
    ]
    for cls, kwargs, word in bad:
        with pytest.raises(ValueError, match=word):
            cls(**kwargs)
    with pytest.raises(TypeError, match="lr"):
        dlfs.SGD(lr="0.1")
    with pytest.raises(ValueError, match="lr"):
        dlfs.SGD(lambda t: -1.0)


def test_optimizers_refuse_grads_that_do_not_mirror_the_params():
    net = _hard_net()
    params = net.params()
    w, b = params[0]  # the LeakyReLU after it has no parameters: ()
    for opt in (dlfs.SGD(0.1), dlfs.Adam()):
        state = opt.init(params)
        for grads in [((w,), ()), ([w, b], ()), ((w, b, b), ())]:
            with pytest.raises(ValueError, match=r"grads\[0\] must be a tuple of 2 arrays"):
                opt.update(grads, state, params)


def test_optimizer_states_are_checked_against_the_params():
    net = _hard_net()
    params = net.params()
    other = dlfs.network(0, 4, [dlfs.dense(2)], dlfs.MeanSquaredError()).params()
    grads = tuple(tuple(np.zeros_like(p) for p in layer) for layer in params)
    for opt in (dlfs.Momentum(), dlfs.Adam(), dlfs.RMSProp(), dlfs.AdaGrad()):
        wrong = opt.init(other + ((),))
        with pytest.raises(ValueError, match=r"state.slots\[0\]\[0\]\[0\] must be an array"):
            opt.update(grads, wrong, params)
        with pytest.raises(TypeError, match="params must be a tuple of per-layer tuples"):
            opt.init("params")
        with pytest.raises(TypeError, match=r"params\[0\]\[0\] must be a float"):
            opt.init(((np.ones(2, np.int64),),))


def test_updates_check_the_params():
    params = _hard_net().params()
    grads = tuple(tuple(np.zeros_like(p) for p in layer) for layer in params)
    state = dlfs.SGD().init(params)
    with pytest.raises(TypeError, match="params must be a tuple of per-layer tuples"):
        dlfs.SGD().update(grads, state, list(params))
    ints = tuple(tuple(p.astype(np.int64) for p in layer) for layer in params)
    with pytest.raises(TypeError, match=r"params\[0\]\[0\] must be a float"):
        dlfs.SGD().update(ints, state, ints)


# -------------------------- schedules: formulas, the learning rate of step 0


def test_a_schedule_is_checked_at_step_0():
    """A schedule's learning rate must be a number >= 0 at step 0 (the first update's):
    a negative lr(0) is refused by name, whatever it gives later."""
    with pytest.raises(ValueError, match=r"lr\(0\) must be in \[0\.0, inf\], got -1\.0"):
        dlfs.SGD(lambda t: -1.0 if t == 0 else 0.1)
    assert dlfs.SGD(lambda t: 0.1 if t == 0 else -1.0).lr(0) == 0.1


def test_schedules_match_formulas():
    steps = range(25)
    assert [dlfs.Constant(0.3)(t) for t in steps] == [0.3] * 25
    s = dlfs.StepDecay(1.0, 3, 0.5)
    assert [s(t) for t in steps] == [0.5 ** (t // 3) for t in steps]
    e = dlfs.ExponentialDecay(2.0, 0.9)
    np.testing.assert_allclose([e(t) for t in steps], [2.0 * 0.9**t for t in steps], rtol=1e-15)
    lin = dlfs.LinearDecay(1.0, 0.1, 10)
    want = [1.0 + (0.1 - 1.0) * min(t, 10) / 10 for t in steps]
    np.testing.assert_allclose([lin(t) for t in steps], want, rtol=1e-15)
    assert lin(0) == 1.0 and lin(10) == pytest.approx(0.1) and lin(100) == pytest.approx(0.1)
    cos = dlfs.CosineDecay(1.0, 10, warmup=2, final_lr=0.1)
    want = [
        (t + 1) / 2 if t < 2 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t - 2, 8) / 8))
        for t in steps
    ]
    np.testing.assert_allclose([cos(t) for t in steps], want, rtol=1e-15)
    plain = dlfs.CosineDecay(1.0, 10)
    assert plain(0) == 1.0 and plain(10) == pytest.approx(0.0, abs=1e-15)
    assert dlfs.StepDecay(1.0, 3)(0) == 1.0 and dlfs.ExponentialDecay(1.0, 0.5)(0) == 1.0


def test_initial_state_holds_the_learning_rate_of_step_0():
    schedule = dlfs.StepDecay(1.0, 1, 0.5)  # 1.0 at step 0, 0.5 at step 1
    params = _hard_net().params()
    for opt in (
        dlfs.SGD(schedule),
        dlfs.Momentum(schedule),
        dlfs.Nesterov(schedule),
        dlfs.AdaGrad(schedule),
        dlfs.RMSProp(schedule),
        dlfs.Adam(schedule),
        dlfs.AdamW(schedule),
    ):
        assert opt.init(params).lr == 1.0
    assert (dlfs.Nesterov().lr, dlfs.Nesterov().momentum) == (0.01, 0.9)


def test_cosine_decay_starts_without_warmup_by_default():
    schedule = dlfs.CosineDecay(1.0, 10)
    assert schedule.warmup == 0 and schedule(0) == 1.0
    assert schedule(1) == pytest.approx(0.5 * (1 + math.cos(math.pi / 10)))


def test_step_decay_divides_by_ten_by_default():
    """PyTorch's StepLR default gamma = 0.1: lr, lr/10 after step_size steps, lr/100."""
    sched = dlfs.StepDecay(1.0, 3)
    assert sched.gamma == 0.1
    assert [sched(t) for t in (0, 2, 3, 6)] == [1.0, 1.0, 0.1, 0.1**2]


# ------------- transforms and chain: clipping, weight decay, max-norm, order


def test_clip_by_global_norm():
    g = ((np.array([[3.0, 0.0]]), np.array([4.0])), (np.array([0.0]),))
    params = tuple(tuple(np.zeros_like(a) for a in layer) for layer in g)
    clipped = dlfs.ClipByGlobalNorm(1.0)(g, params)
    scale = 1.0 / (5.0 + 1e-6)
    np.testing.assert_allclose(clipped[0][0], g[0][0] * scale, rtol=1e-15)
    np.testing.assert_allclose(clipped[0][1], g[0][1] * scale, rtol=1e-15)
    kept = dlfs.ClipByGlobalNorm(10.0)(g, params)
    assert kept is g  # within the norm: the gradients as they came, not a copy


def test_weight_decay_transform():
    p = ((np.array([1.0, -2.0]),),)
    g = ((np.array([0.5, 0.5]),),)
    out = dlfs.WeightDecay(0.1)(g, p)
    np.testing.assert_allclose(out[0][0], [0.6, 0.3], rtol=1e-15)


def test_max_norm_columns():
    rng = np.random.default_rng(6)
    w = rng.standard_normal((4, 3))
    w /= np.linalg.norm(w, axis=0)
    w *= np.array([0.5, 2.0, 5.0])
    b = np.array([10.0, 10.0, 10.0])
    ((new_w, new_b),) = dlfs.MaxNorm(1.0)(((w, b),))
    np.testing.assert_array_equal(new_w[:, 0], w[:, 0])
    np.testing.assert_allclose(np.linalg.norm(new_w, axis=0), [0.5, 1.0, 1.0], rtol=1e-12)
    np.testing.assert_allclose(new_w[:, 1:] / w[:, 1:], np.tile([0.5, 0.2], (4, 1)), rtol=1e-12)
    np.testing.assert_array_equal(new_b, b)


def test_chain_order_and_equivalence():
    with pytest.raises(TypeError, match="before the optimizer"):
        dlfs.chain(dlfs.MaxNorm(1.0), dlfs.SGD(0.1))
    with pytest.raises(TypeError, match="after the optimizer"):
        dlfs.chain(dlfs.SGD(0.1), dlfs.ClipByGlobalNorm(1.0))
    with pytest.raises(ValueError, match="exactly one optimizer"):
        dlfs.chain(dlfs.SGD(0.1), dlfs.Adam())
    with pytest.raises(ValueError, match="exactly one optimizer"):
        dlfs.chain(dlfs.ClipByGlobalNorm(1.0))
    (w, b), grad = _problem()
    params = ((w, b),)
    opt = dlfs.chain(
        dlfs.ClipByGlobalNorm(0.5), dlfs.WeightDecay(0.1), dlfs.SGD(0.5), dlfs.MaxNorm(0.3)
    )
    state = opt.init(params)
    assert state.lr == 0.5 and opt.lr == 0.5
    g = grad(params[0], 0)
    new, state = opt.update((g,), state, params)
    assert state.count == 1 and state.lr == 0.5
    norm = math.sqrt(sum(float((a * a).sum()) for a in g))
    clipped = [a * min(1.0, 0.5 / (norm + 1e-6)) for a in g]
    decayed = [c + 0.1 * p for c, p in zip(clipped, (w, b))]
    stepped = [p - 0.5 * d for p, d in zip((w, b), decayed)]
    col = np.linalg.norm(stepped[0], axis=0)
    want_w = np.where(col > 0.3, stepped[0] * 0.3 / col, stepped[0])
    np.testing.assert_allclose(new[0][0], want_w, rtol=1e-12)
    np.testing.assert_allclose(new[0][1], stepped[1], rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_max_norm_conv_kernel_per_output_channel(dtype):
    """A kernel (C_out, C_in, kh, kw): each output channel's incoming weights (axes 1, 2, 3)
    are rescaled to norm c; channels within c and 1-D biases stay bit-identical."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((4, 3, 2, 2))
    w /= np.sqrt((w * w).sum(axis=(1, 2, 3), keepdims=True))
    norms = np.array([0.5, 2.0, 5.0, 0.9])
    w = (w * norms[:, None, None, None]).astype(dtype)
    b = np.array([10.0, -10.0, 10.0, 3.0], dtype=dtype)
    ((new_w, new_b),) = dlfs.MaxNorm(1.0)(((w, b),))
    assert new_w.dtype == dtype and new_w.shape == w.shape and not new_w.flags.writeable
    for k in (0, 3):  # within c: untouched
        assert new_w[k].tobytes() == w[k].tobytes()
    got = np.sqrt((new_w.astype(np.float64) ** 2).sum(axis=(1, 2, 3)))
    rtol = 1e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got[1:3], [1.0, 1.0], rtol=rtol)
    assert np.all(got <= 1.0 + rtol)
    for k, scale in ((1, 0.5), (2, 0.2)):  # one factor per output channel, not per slice
        np.testing.assert_allclose(new_w[k] / w[k], np.full(w[k].shape, scale), rtol=rtol)
    assert new_b.dtype == dtype and new_b.tobytes() == b.tobytes()
    # on a built CNN's parameters: Conv2D kernels and Dense weights constrained, biases not
    net = dlfs.network(
        0, (1, 5, 5), [dlfs.conv2d(3, 3), dlfs.Flatten(), dlfs.dense(2)], dlfs.MeanSquaredError()
    )
    big = net.with_params(tuple(tuple(p * 100 + 1 for p in ps) for ps in net.params()))
    assert [p.shape for ps in big.params() for p in ps] == [(3, 1, 3, 3), (3,), (27, 2), (2,)]
    for old, new in zip(big.params(), dlfs.MaxNorm(0.5)(big.params())):
        for p, q in zip(old, new):
            if p.ndim == 1:
                assert q.tobytes() == p.tobytes()
            else:
                axes = tuple(range(1, p.ndim)) if p.ndim == 4 else (0,)
                q64 = q.astype(np.float64)
                assert np.all(np.sqrt((q64 * q64).sum(axis=axes)) <= 0.5 * (1 + 1e-6))


def test_transforms_check_their_gradients():
    params = ((np.ones((2, 2), np.float32),),)
    bad = ((np.ones((2, 3), np.float32),),)
    ints = ((np.ones((2, 2), np.int64),),)
    for transform in (dlfs.ClipByGlobalNorm(1.0), dlfs.WeightDecay(0.1)):
        with pytest.raises(ValueError, match=r"grads\[0\]\[0\] must be an array of shape"):
            transform(bad, params)
        with pytest.raises(TypeError, match=r"params\[0\]\[0\] must be a float"):
            transform(ints, ints)


class _HalvedClip(dlfs.ClipByGlobalNorm):
    """A user's subclass of a dlfs transform: clips, then halves."""

    def __call__(self, grads, params):
        return tuple(tuple(g / 2 for g in gs) for gs in super().__call__(grads, params))


def test_a_chain_with_a_users_part_runs_the_users_code_at_every_step():
    """A chain is trusted (its parts' unchecked _apply) only when every part is
    dlfs's own: a user's optimizer inside (which has no _apply) and a user's
    subclass of a transform (whose __call__ is its own) run as the user wrote them
    (survivor 36 of mutation seed 1207)."""
    net, x, y = _dp_problem("mlp", n=10)
    calls = []

    class Counting(_IdentityOptimizer):
        def update(self, grads, state, params):
            calls.append(1)
            return dlfs.SGD(0.1).update(grads, state, params)

    for opt in (
        dlfs.chain(dlfs.ClipByGlobalNorm(1.0), Counting()),
        dlfs.chain(_HalvedClip(1.0), dlfs.SGD(0.1)),
    ):
        state = dlfs.TrainState.create(net, opt, key=0)
        got = functools.reduce(dlfs.train_step, [(x, y)] * 2, state)
        want, opt_state = net, opt.init(net.params())
        for _ in range(2):  # the chain by hand: its public update, the user's code
            _, grads, _ = want.loss_and_grads(x, y, dlfs.train_context(0))
            params, opt_state = opt.update(grads, opt_state, want.params())
            want = want.with_params(params)
        _assert_same_net(got.net, want)
    assert len(calls) == 4  # two steps, then two by hand


def test_constraints_and_chains_check_their_inputs():
    w = np.ones((2, 3), np.float32)
    b = np.ones(3, np.float32)  # writeable: MaxNorm leaves 1-D arrays as they are
    params = ((w, b),)
    out = dlfs.MaxNorm(1.0)(params)
    assert out[0][1] is b and b.flags.writeable and not out[0][0].flags.writeable
    with pytest.raises(TypeError, match="params must be a tuple of per-layer tuples"):
        dlfs.MaxNorm(1.0)([(w, b)])
    chained = dlfs.chain(_IdentityOptimizer(), dlfs.MaxNorm(1.0))
    state = chained.init(params)
    with pytest.raises(ValueError, match=r"grads\[0\] must be a tuple of 2 arrays"):
        chained.update(((w,),), state, params)


def test_max_norm_bound_must_be_positive():
    for bad in (0, 0.0, -1.0):
        with pytest.raises(ValueError, match=r"c must be in \(0.0, inf\], got"):
            dlfs.MaxNorm(bad)
    assert dlfs.MaxNorm(1e-9).c == 1e-9


# --------- train_step and train_epoch: pure, deterministic, non-finite named


def test_train_step_is_pure():
    net = dlfs.network(
        0,
        3,
        [dlfs.dense(6, dlfs.ReLU()), dlfs.batch_norm(), dlfs.Dropout(0.3), dlfs.dense(1)],
        dlfs.MeanSquaredError(),
    )
    x, y = _regression()
    before = [_snapshot(a) for a in [*_net_arrays(net), x, y]]
    state = dlfs.TrainState.create(net, dlfs.Adam(0.01), key=1)
    new = dlfs.train_step(state, (x, y))
    assert [_snapshot(a) for a in [*_net_arrays(net), x, y]] == before
    for a in _net_arrays(net) + _net_arrays(new.net):
        assert not a.flags.writeable
    assert new.step == 1 and state.step == 0 and new.opt_state.count == 1
    assert not np.array_equal(new.net.layers[0].w, net.layers[0].w)
    assert not np.array_equal(new.net.layers[2].mean, net.layers[2].mean)
    again = dlfs.train_step(state, (x, y))
    _assert_same_net(again.net, new.net)


def test_reduce_train_step_equals_one_epoch_of_fit():
    x, y = _regression(n=50)
    net = _linear_net()
    opt = dlfs.Adam(0.01)
    seed = 11
    fitted, history = dlfs.fit(net, opt, x, y, epochs=1, batch_size=16, seed=seed, shuffle=False)
    state = dlfs.TrainState.create(net, opt, key=dlfs.split(seed, 2)[1])
    folded = functools.reduce(dlfs.train_step, dlfs.batches(x, y, 16), state)
    _assert_same_net(folded.net, fitted)
    assert folded.step == 4 and folded.seen == 50
    assert history.train_loss[0] == pytest.approx(folded.mean_loss, rel=1e-12)
    epoch = dlfs.train_epoch(state, dlfs.batches(x, y, 16))
    _assert_same_net(epoch.net, fitted)
    again = dlfs.train_epoch(epoch, dlfs.batches(x, y, 16))  # the running loss starts over
    fresh = attrs.evolve(epoch, loss_sum=0.0, seen=0)
    by_hand = functools.reduce(dlfs.train_step, dlfs.batches(x, y, 16), fresh)
    assert (again.seen, again.loss_sum) == (50, by_hand.loss_sum)


def test_train_step_bad_input():
    net = _linear_net()
    x, y = _regression(n=8)
    state = dlfs.TrainState.create(net, dlfs.SGD())
    with pytest.raises(ValueError, match="same length"):
        dlfs.train_step(state, (x, y[:4]))
    with pytest.raises(TypeError, match="dtype float32"):
        dlfs.train_step(state, (x.astype(np.float64), y))
    with pytest.raises(TypeError, match="net"):
        dlfs.TrainState.create("net", dlfs.SGD())
    with pytest.raises(TypeError, match="optimizer"):
        dlfs.TrainState.create(net, 0.1)


@settings(max_examples=15, deadline=None)
@given(
    seed=SEEDS, n=SIZES, lead=st.sampled_from(["dense", "relu", "dropout", "conv"]), dtype=DTYPES
)
def test_loss_and_grads_matches_full_backward(seed, n, lead, dtype):
    """The training path skips the input gradient of the first layer with parameters
    (and the layers before it): its grads are bit-identical to a full backward."""
    rng = np.random.default_rng(seed)
    first = {
        "dense": [],
        "relu": [dlfs.ReLU()],
        "dropout": [dlfs.Dropout(0.3)],
        "conv": [dlfs.conv2d(2, 3, activation=dlfs.ReLU()), dlfs.Flatten()],
    }[lead]
    in_shape = (1, 4, 4) if lead == "conv" else (4,)
    specs = [*first, dlfs.dense(5, dlfs.ReLU()), dlfs.dense(3)]
    net = dlfs.network(seed, in_shape, specs, dlfs.SoftmaxCrossEntropy(), dtype=dtype)
    x = rng.normal(size=(n, *in_shape)).astype(dtype)
    y = rng.integers(0, 3, n)
    ctx = dlfs.train_context((seed, 1))
    loss, grads, _ = net.loss_and_grads(x, y, ctx)
    out, caches, _ = net.forward(x, ctx)
    loss2, cache = net.loss.forward(out, y)
    _, full = net.backward(caches, net.loss.backward(cache))
    assert loss == loss2
    assert len(grads) == len(full) == len(net.layers)
    for gs, fs in zip(grads, full):
        assert len(gs) == len(fs)
        for g, f in zip(gs, fs):
            assert g.dtype == f.dtype and np.array_equal(g, f)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize(
    "opt",
    [dlfs.SGD(0.1), dlfs.Adam(), dlfs.chain(dlfs.ClipByGlobalNorm(1.0), dlfs.Momentum(0.1))],
    ids=["sgd", "adam", "clip+momentum"],
)
def test_train_step_names_a_non_finite_gradient(bad, opt):
    """The loss is finite, a gradient is not: the step raises and keeps the old network."""
    layer = _PoisonedDense(dlfs.Dense.init(0, 3, 2), bad)
    net = dlfs.Network([layer], dlfs.SoftmaxCrossEntropy(), (3,))
    state = dlfs.TrainState.create(net, opt, 0)
    x, y = np.ones((4, 3), np.float32), np.array([0, 1, 0, 1])
    with np.errstate(all="ignore"), pytest.raises(dlfs.NonFiniteError, match="a gradient") as info:
        dlfs.train_step(state, (x, y))
    assert info.value.network is net


def test_mean_loss_is_the_sample_weighted_mean():
    x, y = _regression(n=12)
    net = _linear_net()
    state = dlfs.TrainState.create(net, dlfs.SGD(0.01))
    assert math.isnan(state.mean_loss)
    assert attrs.evolve(state, loss_sum=6.0, seen=4).mean_loss == 1.5
    loss = float(net.loss_and_grads(x, y)[0])
    after = dlfs.train_step(state, (x, y))  # one batch: the loss of the network before the step
    assert after.mean_loss == pytest.approx(loss, rel=1e-6) and after.seen == 12


# ---- trusted steps and in-place paths: the checked step's bits, inputs untouched


@settings(max_examples=15, deadline=None)
@given(
    seed=SEEDS,
    n=st.integers(2, 6),
    widths=st.lists(SIZES, min_size=1, max_size=3),
    acts=st.lists(st.integers(0, 8), min_size=3, max_size=3),
    extras=st.lists(st.integers(0, 2), min_size=3, max_size=3),
    loss=st.sampled_from(["mse", "sce", "bce"]),
    opt=st.sampled_from(sorted(_SPEED_OPTIMIZERS)),
    dtype=DTYPES,
    conv=st.booleans(),
)
def test_a_state_known_to_fit_steps_exactly_as_a_checked_one(
    seed, n, widths, acts, extras, loss, opt, dtype, conv
):
    """TrainState.create's state (and each step's) skips the optimizer's checks and
    works in place; a hand-made one (attrs.evolve drops the mark) is checked in
    full at every step: the two trajectories are bit-identical."""
    if conv:
        net = _speed_conv_net(seed, dtype)
    else:
        net = _trust_net(seed, 3, widths, acts, dtype, loss, extras)
    fast = dlfs.TrainState.create(net, _SPEED_OPTIMIZERS[opt](), seed)
    checked = fast
    assert fast._fits and not attrs.evolve(fast)._fits
    for batch in _speed_batches(net, seed, n, 3):
        fast = dlfs.train_step(fast, batch)
        checked = dlfs.train_step(attrs.evolve(checked), batch)
        assert fast._fits
    _assert_same_net(fast.net, checked.net)
    _trust_assert_same_opt_state(fast.opt_state, checked.opt_state)
    assert (fast.loss_sum, fast.seen, fast.step) == (checked.loss_sum, checked.seen, 3)


def test_a_network_with_a_users_layer_is_checked_at_every_step():
    """Only dlfs's own layers and optimizers are trusted: a user's layer keeps the
    full checks, which still catch its malformed gradients at any step."""
    dense = dlfs.Dense.init(0, 3, 2)
    scale = _UsersScale(np.ones(2, np.float32))
    net = dlfs.Network([dense, scale], dlfs.MeanSquaredError(), (3,))
    state = dlfs.TrainState.create(net, dlfs.SGD(0.1))
    x, y = np.ones((4, 3), np.float32), np.zeros((4, 2), np.float32)
    assert not state._fits
    state = dlfs.train_step(state, (x, y))
    assert not state._fits
    broken = attrs.evolve(
        state, net=dlfs.Network([state.net.layers[0], _UsersScale(scale.s, True)], net.loss, (3,))
    )
    with pytest.raises(ValueError, match=r"grads\[1\]\[0\] must be an array of shape \(2,\)"):
        dlfs.train_step(broken, (x, y))
    assert not dlfs.TrainState.create(
        dlfs.network(0, 3, [dlfs.dense(2)], dlfs.MeanSquaredError()), _UsersSGD()
    )._fits


class _FlatL1Loss(_L1Loss):
    """A user's loss with a bug: its gradient is flattened to (N*D,)."""

    def backward(self, cache):
        return super().backward(cache).ravel()


class _UsersNetwork(dlfs.Network):
    """A user's Network subclass (not dlfs's own class)."""


def test_a_users_loss_or_network_class_is_checked_at_every_step():
    """Trust needs the network, its loss, its layers and the optimizer all to be
    dlfs's own: a user's loss whose gradient has the wrong shape gets the checked
    path's message at the first step, not a silently reshaped network."""
    net = dlfs.network(0, 3, [dlfs.dense(1)], _FlatL1Loss())
    x, y = np.ones((8, 3), np.float32), np.zeros((8, 1), np.float32)
    for opt in (dlfs.Adam(0.01), dlfs.SGD(0.1)):
        state = dlfs.TrainState.create(net, opt)
        assert not state._fits
        with pytest.raises(ValueError, match=r"must have shape \(8, 1\)|of shape \(3, 1\)"):
            dlfs.train_step(state, (x, y))
    plain = dlfs.network(0, 3, [dlfs.dense(1)], dlfs.MeanSquaredError())
    assert dlfs.TrainState.create(plain, dlfs.SGD(0.1))._fits
    sub = _UsersNetwork(plain.layers, plain.loss, plain.input_shape)
    assert not dlfs.TrainState.create(sub, dlfs.SGD(0.1))._fits


def test_step_buffers_follow_this_pythons_reference_counts(monkeypatch):
    """The count that proves a buffer free is measured, not assumed (Python 3.14
    counts a local name's reference differently); where counts prove nothing (no
    getrefcount, or no GIL) it is 0 and steps reuse no buffer, with the same bits."""
    assert dlfs._FREE_REFS == dlfs._free_refs() > 0
    fake = types.SimpleNamespace(getrefcount=lambda a: 7)
    monkeypatch.setattr(dlfs, "sys", fake)
    assert dlfs._free_refs() == 7
    fake._is_gil_enabled = lambda: False
    assert dlfs._free_refs() == 0
    monkeypatch.setattr(dlfs, "sys", types.SimpleNamespace())
    assert dlfs._free_refs() == 0
    monkeypatch.undo()
    net = _speed_conv_net(3, np.float32)
    batches = _speed_batches(net, 3, 4, 3)
    recycled = functools.reduce(
        dlfs.train_step, batches, dlfs.TrainState.create(net, dlfs.SGD(0.1), 3)
    )
    monkeypatch.setattr(dlfs, "_FREE_REFS", 0)
    dlfs._let_go_step_buffers()
    fresh = functools.reduce(
        dlfs.train_step, batches, dlfs.TrainState.create(net, dlfs.SGD(0.1), 3)
    )
    assert dlfs._step_buffers.last == {}  # nothing kept: recycling is off
    _assert_same_net(recycled.net, fresh.net)


class _InterruptOnShape:
    """Stands among a step's buffers; Ctrl-C lands when the cleanup reads its shape."""

    @property
    def shape(self):
        raise KeyboardInterrupt


def test_an_interrupt_in_a_steps_cleanup_leaves_recycling_working():
    """_recycling's cleanup first takes the step's list, so a KeyboardInterrupt in
    the middle of it cannot leave the thread inside a step for good (every later
    array kept, recycling never again): the next step recycles as before."""
    net = _speed_conv_net(4, np.float32)
    batch = _speed_batches(net, 4, 4, 1)[0]
    state = dlfs.TrainState.create(net, dlfs.SGD(0.1), 4)
    buffers = dlfs._step_buffers
    with pytest.raises(KeyboardInterrupt), dlfs._recycling():
        buffers.used.append(_InterruptOnShape())
    assert buffers.used is None
    dlfs.train_step(state, batch)
    assert buffers.used is None and buffers.last  # the step kept its buffers for the next
    dlfs._let_go_step_buffers()


@settings(max_examples=15, deadline=None)
@given(seed=SEEDS, n=SIZES, loss=st.sampled_from(["mse", "sce"]), dtype=DTYPES, conv=st.booleans())
def test_in_place_work_never_touches_the_callers_arrays(seed, n, loss, dtype, conv):
    """ReLU after Dense/Conv2D, the fused loss and SGD work in place only on arrays
    a step made itself: the batch, the input network and what forward returns stay
    as they were, and new parameters share memory with none of them."""
    if conv:
        net = _speed_conv_net(seed, dtype)
    else:
        relu = dlfs.ReLU()
        layers = [dlfs.dense(4, relu), dlfs.dense(3, relu), dlfs.dense(3)]
        loss_obj = dlfs.MeanSquaredError() if loss == "mse" else dlfs.SoftmaxCrossEntropy()
        net = dlfs.network(seed, 5, layers, loss_obj, dtype=dtype)
    ((x, y),) = _speed_batches(net, seed, n, 1)
    before = _speed_snapshot(x, y, *_net_arrays(net))
    state = dlfs.train_step(dlfs.TrainState.create(net, dlfs.SGD(0.1), seed), (x, y))
    net.loss_and_grads(x, y, dlfs.train_context(seed))
    out, caches, _ = net.forward(x, dlfs.train_context(seed))
    net.predict(x)
    assert _speed_snapshot(x, y, *_net_arrays(net)) == before
    for p in (p for layer in state.net.params() for p in layer):
        assert not p.flags.writeable
        assert not any(np.shares_memory(p, a) for a in (x, y, out, *_net_arrays(net)))
    # what forward returned is intact: backward through it matches a layer-by-layer pass
    dy = np.random.default_rng(seed).standard_normal(out.shape).astype(dtype)
    _, grads = net.backward(caches, dy)
    h, by_hand = x, []
    for i, layer in enumerate(net.layers):
        ctx = dlfs.Context(True, (seed, i)) if isinstance(layer, dlfs.Dropout) else dlfs.EVAL
        h, cache, _ = layer.forward(h, ctx)
        by_hand.append(cache)
    assert h.tobytes() == out.tobytes()
    for layer, cache, g in zip(reversed(net.layers), reversed(by_hand), reversed(grads)):
        dy, mine = layer.backward(cache, dy)
        assert all(a.tobytes() == b.tobytes() for a, b in zip(mine, g))


@settings(max_examples=20, deadline=None)
@given(seed=SEEDS, n=SIZES, k=st.integers(2, 6), dtype=DTYPES, kind=st.integers(0, 4))
def test_fused_losses_equal_forward_then_backward(seed, n, k, dtype, kind):
    """A step's fused loss (value and gradient at once, in place on the network's
    own output) gives the bits of forward + backward, and leaves a given output alone."""
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((n, k)) * 3).astype(dtype)
    labels = rng.integers(0, k, n)
    cases = [
        (dlfs.SoftmaxCrossEntropy(), labels),
        (dlfs.SoftmaxCrossEntropy(0.2), labels.astype(np.uint8)),
        (dlfs.SoftmaxCrossEntropy(0.1), dlfs.one_hot(labels, k, dtype=dtype)),
        (dlfs.MeanSquaredError(), rng.standard_normal((n, k)).astype(dtype)),
        (dlfs.BinaryCrossEntropy(), rng.random((n, k)).astype(dtype)),
    ]
    loss, target = cases[kind]
    value, cache = loss.forward(z, target)
    grad = loss.backward(cache)
    kept = z.copy()
    for fresh in (False, True):
        mine = z.copy() if fresh else z
        got_value, got_grad = loss._value_and_grad(mine, target, fresh)
        assert got_value.dtype == value.dtype == dtype and got_value == value
        assert got_grad.dtype == dtype and got_grad.tobytes() == grad.tobytes()
        assert z.tobytes() == kept.tobytes()


def test_labels_are_checked_at_every_step():
    net = dlfs.network(0, 3, [dlfs.dense(4)], dlfs.SoftmaxCrossEntropy())
    state = dlfs.TrainState.create(net, dlfs.SGD(0.1))
    x = np.ones((3, 3), np.float32)
    for bad in ([0, 4, 1], [0, -1, 1], [0, -(2**62), 3]):
        with pytest.raises(ValueError, match=r"labels must be in \[0, 4\), got values in"):
            dlfs.train_step(state, (x, np.array(bad)))
    for good in (np.array([0, 3, 1], ">i8"), np.array([0, 3, 1], np.uint8), np.arange(6)[::2] % 4):
        dlfs.train_step(state, (x, good))


def test_sgd_writes_into_gradients_only_when_told_they_are_its_own():
    params = ((np.ones((2, 3), np.float32), np.zeros(3, np.float32)),)
    for p in params[0]:
        p.setflags(write=False)
    opt = dlfs.SGD(0.5)
    grads = ((np.full((2, 3), 2.0, np.float32), np.ones(3, np.float32)),)
    kept = [g.copy() for g in grads[0]]
    new, _ = opt.update(grads, opt.init(params), params)
    assert all(g.flags.writeable and g.tobytes() == k.tobytes() for g, k in zip(grads[0], kept))
    owned, _ = opt._apply(grads, opt.init(params), params, owned=True)
    assert all(a is g and not a.flags.writeable for a, g in zip(owned[0], grads[0]))
    assert all(a.tobytes() == b.tobytes() for a, b in zip(owned[0], new[0]))


def _tiny_gpt(
    norm: object = None, attention: object = None, dtype: object = np.float32, vocab: int = 7
) -> dlfs.Network:
    """A 1-block pre-LN GPT on ids (N, 6): tied embedding, positions, attention and
    an MLP in residual blocks (bias-free by default), a final LayerNorm."""
    norm = norm or dlfs.layer_norm(bias=False)
    attention = attention or dlfs.self_attention(2, bias=False)
    mlp = [norm, dlfs.dense(16, dlfs.GELU("none"), bias=False), dlfs.dense(8, bias=False)]
    body = [
        dlfs.positional_embedding(6),
        dlfs.residual([norm, attention]),
        dlfs.residual(mlp),
        norm,
    ]
    return dlfs.network(
        0, (6,), [dlfs.tied_embedding(vocab, 8, body)], dlfs.SoftmaxCrossEntropy(), dtype=dtype
    )


def test_renewed_networks_equal_with_params():
    """``_renew`` (no checks, no copies) builds what ``with_params`` builds, for every
    kind of layer with parameters, whose ``_PARAMS`` name params() in order."""
    layers = [
        dlfs.Conv2D.init(1, 2, 3, 3, padding="same"),
        dlfs.BatchNorm.init(3),
        dlfs.Flatten(),
        dlfs.Dense.init(2, 48, 4),
    ]
    nets = [
        dlfs.Network(layers, dlfs.SoftmaxCrossEntropy(), (2, 4, 4)),
        dlfs.network(
            0,
            5,
            [
                dlfs.embedding(7, 3),
                dlfs.gru(4, return_sequences=True),
                dlfs.lstm(3, return_sequences=True),
                dlfs.rnn(2),
            ],
            dlfs.MeanSquaredError(),
        ),
        _tiny_gpt(dlfs.layer_norm(), dlfs.self_attention(2)),  # with biases
        _tiny_gpt(),  # without: params() holds the present arrays only
    ]
    for net in nets:
        for layer in dlfs._all_layers(net.layers):
            if isinstance(layer, dlfs._CHAINS):
                continue
            fields = tuple(getattr(layer, name) for name in getattr(layer, "_PARAMS", ()))
            fields = tuple(a for a in fields if a is not None)
            assert len(fields) == len(layer.params())
            assert all(a is b for a, b in zip(fields, layer.params()))
        new = dlfs._tree_map(lambda p: dlfs._freeze_new(p * 2), net.params())
        _assert_same_net(net._renew(new), net.with_params(new))
    for cls in dlfs._SAVABLE_LAYERS:  # a new layer with parameters must name them
        assert hasattr(cls, "_PARAMS") == (
            cls
            in (
                dlfs.Dense,
                dlfs.Conv2D,
                dlfs.BatchNorm,
                dlfs.Embedding,
                dlfs.RNN,
                dlfs.LSTM,
                dlfs.GRU,
                dlfs.LayerNorm,
                dlfs.SelfAttention,
                dlfs.PositionalEmbedding,
                dlfs.TiedEmbedding,
            )
        )


@pytest.mark.parametrize("size", [3, 70_000])
def test_all_finite_sees_every_nan_and_inf_and_no_false_alarm(size):
    """One dot product per array (small ones together): NaN or inf anywhere is found;
    huge finite values, whose squares overflow, are still finite."""
    rng = np.random.default_rng(size)
    tree = ((rng.standard_normal(size).astype(np.float32), np.ones(2, np.float32)),)
    assert dlfs._all_finite(tree) and dlfs._all_finite(())
    huge = ((np.full(size, 3e38, np.float32),), (np.full(2, -1e300),))
    assert dlfs._all_finite(huge)
    for bad in (np.nan, np.inf, -np.inf):
        for i in (0, size - 1):
            a = tree[0][0].copy()
            a[i] = bad
            assert not dlfs._all_finite(((tree[0][1],), (a,)))


@pytest.mark.parametrize("row", [8, 512])
@pytest.mark.parametrize("layout", ["channel-major", "strided", "rows", "2-D"])
def test_relu_in_place_in_memory_order_equals_relu(monkeypatch, row, layout):
    """ReLU's in-place work runs along the memory of its arrays (a convolution's
    channel-major output as contiguous rows): the same bits as the plain forward
    and backward, whatever the layout."""
    monkeypatch.setattr(dlfs, "_ROW", row)
    rng = np.random.default_rng(row)
    base = rng.standard_normal((3, 5, 8, 6)).astype(np.float32)
    views = {
        "channel-major": lambda a: a.transpose(1, 0, 2, 3),
        "strided": lambda a: a[:, :, ::2, :],  # planes with gaps: no contiguous rows
        "rows": lambda a: a,
        "2-D": lambda a: a.reshape(3, -1),
    }
    x, x_owned = views[layout](base), views[layout](base.copy())
    dy = rng.standard_normal(x.shape[::-1]).astype(np.float32).T  # another memory order
    relu = dlfs.ReLU()
    y, cache, _ = relu.forward(x)
    dx, _ = relu.backward(cache, dy)
    y2, cache2, _ = relu._forward_owned(x_owned)
    dx2, _ = relu._backward_owned(cache2, dy.copy(order="K"))
    assert y2 is x_owned  # in place
    assert np.array_equal(y2, y) and np.array_equal(dx2, dx)
    assert y2.tobytes() == y.tobytes() and dx2.tobytes() == dx.tobytes()


@pytest.mark.parametrize("block", [64, 1 << 18])
@pytest.mark.parametrize("layout", ["channel-major", "rows"])
@pytest.mark.parametrize("size", [2, (2, 3), 3])
def test_tiled_max_pool_equals_a_plain_reference(monkeypatch, block, layout, size):
    """A pool whose stride is its size deinterleaves its windows (by blocks of
    samples): its max and its first-maximum offsets are numpy's max and argmax
    over each window, ties included, incomplete windows dropped."""
    monkeypatch.setattr(dlfs, "_BLOCK", block)
    rng = np.random.default_rng(7)
    base = rng.integers(0, 3, (4, 5, 7, 8)).astype(np.float32)  # many ties
    x = base.transpose(1, 0, 2, 3) if layout == "channel-major" else base
    before = x.copy()
    pool = dlfs.MaxPool2D(size)
    y, (_, _, arg), _ = pool.forward(x, dlfs.train_context(0))
    (kh, kw), (ho, wo) = pool.size, y.shape[2:]
    tiles = x[:, :, : ho * kh, : wo * kw].reshape(*x.shape[:2], ho, kh, wo, kw)
    windows = tiles.transpose(0, 1, 2, 4, 3, 5).reshape(*y.shape, kh * kw)
    assert y.dtype == x.dtype and np.array_equal(y, windows.max(axis=-1))
    assert np.array_equal(arg, windows.argmax(axis=-1))
    assert np.array_equal(x, before)
    y_eval, cache, _ = pool.forward(x)  # no offsets noted: backward finds them
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx, _ = pool.backward(cache, dy)
    dx_train, _ = pool.backward((x, y, arg), dy)
    assert np.array_equal(y_eval, y) and dx.tobytes() == dx_train.tobytes()


def test_recycled_step_buffers_change_no_bit_and_never_reach_the_caller(monkeypatch):
    """A step on a state known to fit takes its conv and pool arrays from the
    buffers of the step before: the same bits as fresh arrays, and none of the
    buffers is shared with anything a step returns."""
    rng = np.random.default_rng(0)
    batches = [
        (rng.standard_normal((5, 2, 8, 8)).astype(np.float32), rng.integers(0, 3, 5))
        for _ in range(4)
    ]
    states, ids = [_small_cnn_state()], []
    for batch in batches:
        states.append(dlfs.train_step(states[-1], batch))
        ids.append({id(a) for pool in dlfs._step_buffers.last.values() for a in pool})
    assert ids[-1] and ids[-1] == ids[-2]  # the same buffers, step after step
    kept = [a for pool in dlfs._step_buffers.last.values() for a in pool]
    for state in states:
        for p in (p for layer in state.net.params() for p in layer):
            assert not p.flags.writeable
            assert not any(np.shares_memory(p, a) for a in kept)
    monkeypatch.setattr(dlfs, "_recycling", contextlib.nullcontext)
    fresh = functools.reduce(dlfs.train_step, batches, _small_cnn_state())
    recycled = states[-1].net.params()
    for a, b in zip(_leaves(fresh.net.params()), _leaves(recycled), strict=True):
        assert a.tobytes() == b.tobytes()
    assert fresh.loss_sum == states[-1].loss_sum
    dlfs.train_epoch(states[0], batches[:2])
    assert not dlfs._step_buffers.last  # an epoch lets its buffers go at its end


def test_a_network_with_a_convolution_or_a_max_pool_recycles_its_step_buffers():
    """Either layer alone is enough for a step to keep its buffers for the next
    (survivor 26 of mutation seed 2311); a network with neither keeps none."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((5, 1, 6, 6)).astype(np.float32), rng.integers(0, 3, 5)
    heads = [dlfs.Flatten(), dlfs.dense(3)]
    for front, recycles in [
        ([dlfs.conv2d(2, 3)], True),
        ([dlfs.MaxPool2D(2)], True),
        ([dlfs.AvgPool2D(2)], False),
    ]:
        net = dlfs.network(0, (1, 6, 6), [*front, *heads], dlfs.SoftmaxCrossEntropy())
        state = dlfs.TrainState.create(net, dlfs.SGD(0.1))
        dlfs.train_step(state, (x, y))
        assert bool(dlfs._step_buffers.last) == recycles, front
        dlfs._let_go_step_buffers()


def test_new_array_hands_out_only_buffers_no_one_holds():
    with dlfs._recycling():
        a = dlfs._new_array((3, 4), np.dtype(np.float64))
    view = a[1:]
    del a
    with dlfs._recycling():
        b = dlfs._new_array((3, 4), np.dtype(np.float64))
        assert not np.shares_memory(b, view)  # a is still seen through the view
    b_id = id(b)
    del b, view
    with dlfs._recycling():
        assert id(dlfs._new_array((3, 4), np.dtype(np.float64))) == b_id  # free now
        outer = dlfs._step_buffers.used
        with dlfs._recycling():  # a step within a step: the outer one recycles
            assert dlfs._step_buffers.used is outer
        assert dlfs._step_buffers.used is outer
    assert dlfs._step_buffers.used is None


@pytest.mark.parametrize("padding", ["same", 1, ((0, 2), (1, 0))])
def test_conv_on_a_channel_major_batch_equals_conv_on_its_copy(monkeypatch, padding):
    """A channel-major input (a pool's output) takes the flat-shift im2col and
    col2im over whole blocks of samples; a C-ordered copy takes them sample by
    sample: the same patches, so the same bits, forward and backward."""
    monkeypatch.setattr(dlfs, "_BLOCK", 3 * 2 * 9 * 42)  # blocks of three samples
    conv = dlfs.Conv2D.init(2, 2, 3, 3, padding=padding, bias_init=dlfs.normal)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 7, 6, 7)).astype(np.float32).transpose(1, 0, 2, 3)
    x_copy = np.ascontiguousarray(x)
    y, cache, _ = conv.forward(x)
    y2, cache2, _ = conv.forward(x_copy)
    assert y.tobytes() == y2.tobytes()
    dy = rng.standard_normal(y.shape).astype(np.float32)
    (dx, grads), (dx2, grads2) = conv.backward(cache, dy), conv.backward(cache2, dy)
    assert dx.tobytes() == dx2.tobytes()
    assert all(g.tobytes() == g2.tobytes() for g, g2 in zip(grads, grads2, strict=True))
    ref = _conv_reference(x_copy.astype(np.float64), conv.w, conv.b, conv.stride, conv.padding)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


# ---- fit: learns, pure, deterministic; history, early stopping, non-finite loss


def test_fit_is_pure_and_deterministic():
    net = dlfs.network(
        0,
        3,
        [dlfs.dense(6, dlfs.ReLU()), dlfs.Dropout(0.2), dlfs.dense(1)],
        dlfs.MeanSquaredError(),
    )
    x, y = _regression()
    xv, yv = _regression(seed=1, n=16)
    before = [_snapshot(a) for a in [*_net_arrays(net), x, y, xv, yv]]
    kwargs = {"epochs": 3, "batch_size": 16, "validation": (xv, yv), "early_stopping": False}
    a, ha = dlfs.fit(net, dlfs.Momentum(0.01), x, y, seed=3, **kwargs)
    assert [_snapshot(arr) for arr in [*_net_arrays(net), x, y, xv, yv]] == before
    b, hb = dlfs.fit(net, dlfs.Momentum(0.01), x, y, seed=3, **kwargs)
    _assert_same_net(a, b)
    assert ha == hb
    c, _ = dlfs.fit(net, dlfs.Momentum(0.01), x, y, seed=4, **kwargs)
    assert not np.array_equal(a.layers[0].w, c.layers[0].w)


def test_fit_loss_decreases_on_learnable_problem():
    x, y = _regression(n=128)
    net = _linear_net()
    start = float(net.loss.forward(net.predict(x), y)[0])
    trained, history = dlfs.fit(net, dlfs.SGD(0.02), x, y, epochs=30, batch_size=16)
    end = float(net.loss.forward(trained.predict(x), y)[0])
    assert end < 0.05 * start
    assert history.train_loss[-1] < history.train_loss[0]


def test_fit_classification_learns_and_reports_accuracy():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((120, 2))
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    net = dlfs.network(
        0,
        2,
        [dlfs.dense(8, dlfs.ReLU()), dlfs.dense(2)],
        dlfs.SoftmaxCrossEntropy(),
        dtype=np.float64,
    )
    trained, history = dlfs.fit(
        net, dlfs.Adam(0.05), x, y, epochs=10, validation=(x, y), early_stopping=False
    )
    assert history.val_metric[-1] > 0.9
    assert history.val_metric[-1] == dlfs.accuracy(trained.predict(x), y)


def test_history_fields():
    x, y = _regression(n=40)
    net = _linear_net()
    _, h = dlfs.fit(
        net, dlfs.SGD(0.01), x, y, epochs=5, eval_every=2, validation=(x, y), early_stopping=False
    )
    assert h.epochs == [1, 2, 3, 4, 5]
    assert len(h.records) == 5 and len(h.train_loss) == 5
    assert [v is None for v in h.val_loss] == [True, False, True, False, False]
    assert h.val_metric == [None] * 5  # no metric for MSE
    assert h.best_epoch in (2, 4, 5) and not h.stopped_early
    assert all(isinstance(v, float) and math.isfinite(v) for v in h.train_loss)
    _, h2 = dlfs.fit(net, dlfs.SGD(0.01), x, y, epochs=2)
    assert h2.val_loss == [None, None] and h2.best_epoch is None


def test_early_stopping_returns_best_evaluated_network():
    # validation targets are the negation of the training targets: the more the
    # network learns, the worse it does on validation, so the val loss rises.
    x, y = _regression(n=64)
    xv, yv = x[:32], -y[:32]
    net = _linear_net(hidden=False)
    seen = []
    kw = dict(batch_size=8, validation=(xv, yv))
    best, h = dlfs.fit(net, dlfs.SGD(0.05), x, y, epochs=20, patience=2, callback=seen.append, **kw)
    assert h.stopped_early and len(h.records) < 20
    losses = [v for v in h.val_loss if v is not None]
    assert losses == [r.val_loss for r in seen]
    assert min(losses) < losses[-1]
    best_val = float(best.loss.forward(best.predict(xv), yv)[0])
    assert best_val == pytest.approx(min(losses), rel=1e-6)
    assert h.val_loss[h.best_epoch - 1] == min(losses)
    last, h_all = dlfs.fit(net, dlfs.SGD(0.05), x, y, epochs=4, early_stopping=False, **kw)
    last_val = float(last.loss.forward(last.predict(xv), yv)[0])
    assert last_val == pytest.approx(h_all.val_loss[-1], rel=1e-6)


def test_non_finite_error_keeps_last_finite_network():
    x, y = _regression(n=32)
    net = _linear_net()
    with np.errstate(all="ignore"), pytest.raises(dlfs.NonFiniteError, match="NaN/inf") as info:
        dlfs.fit(net, dlfs.SGD(1e30), x, y, epochs=3, batch_size=8)
    err = info.value
    assert isinstance(err.network, dlfs.Network)
    assert all(np.isfinite(a).all() for a in _net_arrays(err.network))
    assert err.epoch == 1 and err.step is not None and err.history is not None
    state = dlfs.TrainState.create(net, dlfs.SGD(1e30))
    with np.errstate(all="ignore"), pytest.raises(dlfs.NonFiniteError):
        functools.reduce(dlfs.train_step, dlfs.batches(x, y, 8), state)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_non_finite_keeps_last_finite_network():
    net = _trust_net(0, 4, [6], [4], np.float32, "mse", [1])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 4)).astype(np.float32)
    y = rng.standard_normal((16, 2)).astype(np.float32)
    opt = dlfs.SGD(lambda t: 1e-3 if t < 6 else 1e30)  # 2 steps an epoch; explodes at step 6
    with pytest.raises(dlfs.NonFiniteError, match="epoch") as info:
        dlfs.fit(net, opt, x, y, epochs=10, batch_size=8, validation=(x, y), early_stopping=False)
    err = info.value
    assert err.epoch >= 4 and err.step >= 6
    assert err.history.epochs == list(range(1, err.epoch))
    assert isinstance(err.network, dlfs.Network)
    assert all(np.isfinite(p).all() for layer in err.network.params() for p in layer)
    assert err.network is not net  # trained for several epochs before the blow-up


def test_validation_only_monitors_unless_early_stopping_is_asked_for(capsys):
    x, y = _regression(n=64)
    xv, yv = x[:32], -y[:32]  # validation loss rises as the network learns
    net, opt = _linear_net(hidden=False), dlfs.SGD(0.05)
    kw = dict(batch_size=8, validation=(xv, yv))
    last, h = dlfs.fit(net, opt, x, y, epochs=6, **kw)
    assert h.epochs == [1, 2, 3, 4, 5, 6] and h.stop_reason == "completed"
    assert h.best_epoch < 6  # monitored, yet the last network comes back
    assert float(last.loss.forward(last.predict(xv), yv)[0]) == pytest.approx(h.val_loss[-1])
    best, h_es = dlfs.fit(net, opt, x, y, epochs=6, early_stopping=True, verbose=True, **kw)
    out = capsys.readouterr().out
    assert h_es.stopped_early and h_es.stop_reason == "early_stopping"
    assert len(h_es.records) == h_es.best_epoch + 1  # patience 1: the book's Trainer
    assert f"early stopping after epoch {h_es.epochs[-1]}" in out
    assert f"returning the best network, from epoch {h_es.best_epoch}" in out
    val = float(best.loss.forward(best.predict(xv), yv)[0])
    assert val == pytest.approx(min(v for v in h_es.val_loss if v is not None))
    _, h_p2 = dlfs.fit(net, opt, x, y, epochs=6, patience=2, **kw)
    assert h_p2.stopped_early and len(h_p2.records) == h_p2.best_epoch + 2
    for bad, exc, words in [
        (dict(early_stopping=True), ValueError, r"early_stopping=True.*validation=\(x_val"),
        (dict(patience=3), ValueError, r"patience=N.*validation=\(x_val, y_val\)"),
        (dict(early_stopping="yes"), TypeError, "early_stopping must be a bool"),
    ]:
        with pytest.raises(exc, match=words):
            dlfs.fit(net, opt, x, y, epochs=1, **bad)
    with pytest.raises(ValueError, match="patience=2 asks for early stopping, but early_stopping"):
        dlfs.fit(net, opt, x, y, epochs=1, early_stopping=False, patience=2, **kw)


@pytest.mark.parametrize("patience", [1, 2, 3])
def test_early_stopping_stops_after_patience_evaluations_without_improvement(patience):
    _, history = _hard_stop_run((0,), patience)  # improves in epoch 1 only
    assert history.stopped_early and history.best_epoch == 1
    assert history.epochs == list(range(1, 2 + patience))
    losses = history.val_loss
    assert all(v == losses[0] for v in losses)  # lr 0: equal is not an improvement


def test_early_stopping_counter_resets_on_improvement():
    best, history = _hard_stop_run((0, 2, 5), patience=2)
    # epochs: 1 better, 2 same, 3 better (reset), 4 same, 5 same -> stop at 5;
    # without the reset it would stop at 4, and epoch 6's improvement is never seen.
    assert history.epochs == [1, 2, 3, 4, 5] and history.stopped_early
    assert history.best_epoch == 3
    x, y = _regression(n=16)
    assert float(best.loss.forward(best.predict(x), y)[0]) == history.val_loss[2]
    _, history = _hard_stop_run((0, 2, 4), patience=2)
    assert history.epochs == [1, 2, 3, 4, 5, 6, 7] and history.best_epoch == 5


@pytest.mark.parametrize("batch_size", [32, 1100])
def test_fit_evaluates_validation_as_evaluate_does(batch_size):
    """fit's validation loss and metric are evaluate's for the same network, bit
    for bit: both predict in chunks of max(batch_size, 1024) rows (another split
    may round a few predictions differently), and the metric sees those predictions."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1100, 3)).astype(np.float32)
    y = (x @ np.float32([[1.0], [-2.0], [0.5]])).astype(np.float32)
    net = dlfs.network(
        0, 3, [dlfs.dense(64, dlfs.Sigmoid()), dlfs.dense(1)], dlfs.MeanSquaredError()
    )
    seen = []

    def first_pred(pred, target):
        seen.append(pred.copy())
        return float(pred[0, 0])

    trained, history = dlfs.fit(
        net,
        dlfs.SGD(0.01),
        x[:64],
        y[:64],
        epochs=1,
        batch_size=batch_size,
        validation=(x, y),
        metric=first_pred,
    )
    chunk = max(batch_size, 1024)
    expected = trained.evaluate(x, y, metric=first_pred, batch_size=chunk)
    assert history.records[-1].val_loss == expected["loss"]
    assert history.records[-1].val_metric == expected["first_pred"]
    assert seen[0].tobytes() == trained.predict(x, batch_size=chunk).tobytes()


# ---- fit checks whole data sets before the first step; messages name the fix


def test_fit_bad_input():
    x, y = _regression(n=16)
    net = _linear_net()
    sgd = dlfs.SGD(0.01)
    cases = [
        (
            {"x": np.where(np.arange(48).reshape(16, 3) == 5, np.nan, x)},
            ValueError,
            "x contains NaN",
        ),
        (
            {"y": np.where(np.arange(16).reshape(16, 1) == 3, np.inf, y)},
            ValueError,
            "y contains NaN",
        ),
        ({"x": x[:0], "y": y[:0]}, ValueError, "x must not be empty"),
        ({"x": x.astype(np.float64)}, TypeError, "x must have dtype float32"),
        ({"x": x.astype(np.int32)}, TypeError, "x must be a float"),
        ({"x": x.tolist()}, TypeError, "x must be a numpy array"),
        ({"y": y[:, 0]}, ValueError, r"y must have shape \(N, 1\).*y\[:, None\]"),
        ({"y": y.astype(np.float64)}, TypeError, r"y must have dtype float32.*astype"),
        ({"y": y[:10]}, ValueError, "same length"),
        ({"y": y.astype(np.complex64)}, TypeError, "y must be a float or integer"),
        ({"y": y.tolist()}, TypeError, "y must be a numpy array"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"batch_size": -3}, ValueError, "batch_size"),
        ({"batch_size": 2.5}, TypeError, "batch_size"),
        ({"epochs": 0}, ValueError, "epochs"),
        ({"epochs": -1}, ValueError, "epochs"),
        ({"eval_every": 0}, ValueError, "eval_every"),
        ({"patience": 0}, ValueError, "patience"),
        ({"seed": -1}, TypeError, "seed"),
        ({"validation": [x, y]}, TypeError, "validation"),
        ({"validation": (x, y[:3])}, ValueError, "validation x and y"),
        ({"net": "net"}, TypeError, "net"),
        ({"metric": 3}, TypeError, "metric"),
    ]
    for override, exc, word in cases:
        args = {"net": net, "optimizer": sgd, "x": x, "y": y, "epochs": 1, **override}
        with pytest.raises(exc, match=word):
            dlfs.fit(**args)
    with pytest.raises(ValueError, match="lr"):
        dlfs.fit(net, dlfs.SGD(-0.1), x, y, epochs=1)
    with pytest.raises(TypeError, match="optimizer"):
        dlfs.fit(net, "sgd", x, y, epochs=1)


def test_fit_labels_out_of_range():
    net = dlfs.network(0, 3, [dlfs.dense(4)], dlfs.SoftmaxCrossEntropy())
    x = np.zeros((6, 3), np.float32)
    with pytest.raises(ValueError, match="labels must be in"):
        dlfs.fit(net, dlfs.SGD(), x, np.array([0, 1, 2, 3, 4, 0]), epochs=1)
    with pytest.raises(ValueError, match="labels must be in"):
        dlfs.fit(net, dlfs.SGD(), x, np.array([0, 1, -1, 3, 0, 0]), epochs=1)
    with pytest.raises(ValueError, match=r"y must be integer labels \(N,\) or one-hot"):
        dlfs.fit(net, dlfs.SGD(), x, np.zeros((6, 3), np.float32), epochs=1)


def test_fit_rejects_unusable_inputs_up_front(tmp_path):
    net = _trust_net(0, 3, [4], [4], np.float32, "sce", [0])
    x = np.ones((6, 3), np.float32)
    y = np.array([0, 1, 2, 0, 1, 2])
    with pytest.raises(TypeError, match="astype"):  # never cast silently
        dlfs.fit(net, dlfs.SGD(), x.astype(np.int64), y, epochs=1)
    with pytest.raises(TypeError, match="astype"):
        net.predict(x.astype(np.float64))
    with pytest.raises(ValueError, match="same length"):
        dlfs.fit(net, dlfs.SGD(), x, y[:5], epochs=1)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        dlfs.fit(net, dlfs.SGD(), x, y + 1, epochs=1)
    with pytest.raises(ValueError, match="empty"):
        dlfs.fit(net, dlfs.SGD(), x[:0], y[:0], epochs=1)
    with pytest.raises(FileNotFoundError, match="folder"):
        dlfs.fit(net, dlfs.SGD(), x, y, epochs=1, checkpoint=tmp_path / "no" / "c.npz")
    with pytest.raises(TypeError, match="callback"):
        dlfs.fit(net, dlfs.SGD(), x, y, epochs=1, callback=3)
    with pytest.raises(ValueError, match="layer 1"):
        dlfs.Network([dlfs.Dense.init(0, 3, 4), dlfs.Dense.init(0, 5, 2)], net.loss, (3,))
    with pytest.raises(ValueError, match="moment slots"):
        dlfs.Adam().update(net.params(), dlfs.SGD().init(net.params()), net.params())


@pytest.mark.parametrize(
    ("case", "exc", "names", "fix"),
    [
        ("labels (N, 1)", ValueError, "y holds integer labels of shape (6, 1)", "y.ravel()"),
        ("float labels", TypeError, "y must hold integer class labels", "y.astype(np.int64)"),
        (
            "one-hot float64",
            TypeError,
            "y must have the network's dtype float32, got float64",
            "y.astype(np.float32), or pass integer labels",
        ),
        ("labels for MSE", TypeError, "y holds integer labels", "dlfs.one_hot(y, 10)"),
        ("uint8 images", TypeError, "x must be a float array, got dtype uint8", "/ 255"),
        ("single sample", ValueError, "x must have shape (N, 1, 4, 4)", "x[None]"),
        ("channels last", ValueError, "x looks channels-last", "x.transpose(0, 3, 1, 2)"),
        ("no channel axis", ValueError, "x must have shape (N, 1, 4, 4)", "x[:, None]"),
        ("images for dense", ValueError, "x must have shape (N, 16)", "x.reshape(len(x), -1)"),
        ("activation class", TypeError, "activation must be a layer", "dlfs.ReLU()"),
        ("layer class", TypeError, "layers[1] must be a layer", "dlfs.ReLU()"),
        ("loss class", TypeError, "loss must be a loss", "dlfs.SoftmaxCrossEntropy()"),
        ("optimizer class", TypeError, "optimizer must have init/update", "dlfs.Adam()"),
        ("optimizer function", TypeError, "optimizer must have init/update", "dlfs.AdamW()"),
        ("Dense(10)", TypeError, "Dense(w, b) must be given weight arrays", "dlfs.dense(10)"),
        ("Dense(w)", TypeError, "Dense must be given both w and b", "Dense.init"),
        ("BatchNorm last row", ValueError, "layers[2] (BatchNorm)", "drop_last=True"),
        ("BatchNorm batch 1", ValueError, "layers[2] (BatchNorm)", "batch_size >= 2"),
        (
            "BCE targets",
            TypeError,
            "y must be a float array (float32)",
            "y.astype(np.float32)[:, None]",
        ),
        (
            "validation labels",
            ValueError,
            "validation y holds integer labels",
            "validation y.ravel()",
        ),
    ],
)
def test_common_mistakes_name_the_argument_and_the_fix(case, exc, names, fix):
    x, y = _i11_mnist_like()
    flat = x.reshape(6, 16)
    cnn = dlfs.network(0, (1, 4, 4), [dlfs.Flatten(), dlfs.dense(10)], dlfs.SoftmaxCrossEntropy())
    mlp = dlfs.network(0, 16, [dlfs.dense(10)], dlfs.SoftmaxCrossEntropy())
    mse = dlfs.network(0, 16, [dlfs.dense(10)], dlfs.MeanSquaredError())
    bce = dlfs.network(0, 16, [dlfs.dense(1)], dlfs.BinaryCrossEntropy())
    bn = dlfs.network(
        0, 16, [dlfs.dense(4), dlfs.ReLU(), dlfs.batch_norm(), dlfs.dense(10)], mlp.loss
    )
    sgd = dlfs.SGD()
    calls = {
        "labels (N, 1)": lambda: dlfs.fit(cnn, sgd, x, y[:, None], epochs=1),
        "float labels": lambda: dlfs.fit(cnn, sgd, x, y.astype(np.float32), epochs=1),
        "one-hot float64": lambda: dlfs.fit(cnn, sgd, x, np.eye(10)[y], epochs=1),
        "labels for MSE": lambda: dlfs.fit(mse, sgd, flat, y, epochs=1),
        "uint8 images": lambda: dlfs.fit(cnn, sgd, (x * 255).astype(np.uint8), y, epochs=1),
        "single sample": lambda: cnn.predict(x[0]),
        "channels last": lambda: cnn.predict(x.transpose(0, 2, 3, 1).copy()),
        "no channel axis": lambda: dlfs.fit(cnn, sgd, x[:, 0], y, epochs=1),
        "images for dense": lambda: mlp.evaluate(x, y),
        "activation class": lambda: dlfs.dense(10, dlfs.ReLU),
        "layer class": lambda: dlfs.network(0, 16, [dlfs.dense(4), dlfs.ReLU], mse.loss),
        "loss class": lambda: dlfs.network(0, 16, [dlfs.dense(4)], dlfs.SoftmaxCrossEntropy),
        "optimizer class": lambda: dlfs.fit(mlp, dlfs.Adam, flat, y, epochs=1),
        "optimizer function": lambda: dlfs.fit(mlp, dlfs.AdamW, flat, y, epochs=1),
        "Dense(10)": lambda: dlfs.Dense(10),
        "Dense(w)": lambda: dlfs.Dense(np.zeros((3, 2), np.float32)),
        "BatchNorm last row": lambda: dlfs.fit(bn, sgd, flat[:5], y[:5], epochs=1, batch_size=4),
        "BatchNorm batch 1": lambda: dlfs.fit(bn, sgd, flat, y, epochs=1, batch_size=1),
        "BCE targets": lambda: dlfs.fit(bce, sgd, flat, y % 2, epochs=1),
        "validation labels": lambda: dlfs.fit(
            mlp, sgd, flat, y, epochs=1, validation=(flat, y[:, None])
        ),
    }
    with pytest.raises(exc) as info:
        calls[case]()
    message = str(info.value)
    assert names in message and fix in message, message
    _assert_clear_error(info.value)


def _i21_hand_built_sigmoid_bce():
    layers = (dlfs.Dense.init(0, 4, 1), dlfs.Sigmoid())
    net = dlfs.Network(layers, dlfs.BinaryCrossEntropy(), (4,))  # building it is allowed
    x = np.ones((6, 4), np.float32)
    return dlfs.fit(net, dlfs.SGD(), x, np.ones((6, 1), np.float32), epochs=1)


_I21_MISTAKES = {
    # name: (call, exception, what the message names, the fix it gives)
    "sigmoid before BCE": (
        lambda: dlfs.network(0, 4, [dlfs.dense(1, dlfs.Sigmoid())], dlfs.BinaryCrossEntropy()),
        ValueError,
        "the last layer is Sigmoid(): the loss applies the sigmoid itself",
        "drop the final Sigmoid() (end in dlfs.dense(1) alone) and use net.predict_proba(x)",
    ),
    "softmax before SCE": (
        lambda: dlfs.network(
            0, 4, [dlfs.dense(10), dlfs.Softmax(), dlfs.Dropout(0.5)], dlfs.SoftmaxCrossEntropy()
        ),
        ValueError,
        "layers must end in logits for SoftmaxCrossEntropy, but the last layer is Softmax()",
        "drop the final Softmax() (end in dlfs.dense(10) alone)",
    ),
    "sigmoid before BCE, hand-built, in fit": (
        _i21_hand_built_sigmoid_bce,
        ValueError,
        "layers must end in logits for BinaryCrossEntropy",
        "predict_proba",
    ),
    "SCE on one output": (
        lambda: dlfs.network(0, 4, [dlfs.dense(1)], dlfs.SoftmaxCrossEntropy()),
        ValueError,
        "at least 2 outputs for SoftmaxCrossEntropy",
        "use dense(2) with SoftmaxCrossEntropy (labels 0 and 1), or dense(1) with BinaryCrossEntropy",
    ),
    "Conv2D(8, 3)": (
        lambda: dlfs.Conv2D(8, 3),
        TypeError,
        "dlfs.Conv2D(...) must be given its weight arrays (w, b), got Conv2D(8, 3)",
        "write dlfs.conv2d(8, 3) (it infers the input size), or draw the weights with "
        "dlfs.Conv2D.init(key, c_in, 8, 3)",
    ),
    "LSTM(64)": (
        lambda: dlfs.LSTM(64, return_sequences=True),
        TypeError,
        "dlfs.LSTM(...) must be given its weight arrays (w_ih, w_hh, b)",
        "dlfs.lstm(64, return_sequences=True)",
    ),
    "RNN(64)": (lambda: dlfs.RNN(64), TypeError, "got RNN(64)", "dlfs.rnn(64)"),
    "GRU(64)": (lambda: dlfs.GRU(64), TypeError, "(w_ih, w_hh, b, b_hn)", "dlfs.gru(64)"),
    "Embedding(100, 8)": (
        lambda: dlfs.Embedding(100, 8),
        TypeError,
        "got Embedding(100, 8)",
        "dlfs.embedding(100, 8) (it infers the input size), or draw the weights with "
        "dlfs.Embedding.init(key, 100, 8)",
    ),
    "BatchNorm(8)": (lambda: dlfs.BatchNorm(8), TypeError, "got BatchNorm(8)", "batch_norm()"),
    "BatchNorm()": (lambda: dlfs.BatchNorm(), TypeError, "(gamma, beta, mean, var)", "init(...)"),
    "bad ready layer's real index": (
        lambda: dlfs.network(
            0, 4, [dlfs.dense(3), dlfs.ReLU(), dlfs.MaxPool2D(2)], dlfs.MeanSquaredError()
        ),
        ValueError,
        "layers[2] (MaxPool2D): MaxPool2D expects images",
        "reshape flat inputs",
    ),
    "channels-last input_shape": (
        lambda: dlfs.network(0, (28, 28, 1), [dlfs.conv2d(8, 3)], dlfs.MeanSquaredError()),
        ValueError,
        "input_shape (28, 28, 1) looks channels-last",
        "input_shape=(1, 28, 28), with x of shape (N, 1, 28, 28) (x.transpose(0, 3, 1, 2))",
    ),
    "channels-last RGB input_shape that would build": (
        lambda: dlfs.network(0, (28, 28, 3), [dlfs.conv2d(8, 3)], dlfs.MeanSquaredError()),
        ValueError,
        "input_shape must be channels-first (C, H, W); input_shape (28, 28, 3) looks",
        "input_shape=(3, 28, 28)",
    ),
    "list labels": (
        lambda: dlfs.fit(_I21_SCE, dlfs.SGD(), _I21_X, list(range(10)) * 2, epochs=1),
        TypeError,
        "y must be a numpy array, got list; SoftmaxCrossEntropy takes class labels",
        "np.asarray(y, dtype=np.int64)",
    ),
    "list regression targets": (
        lambda: dlfs.fit(_I21_MSE, dlfs.SGD(), _I21_X, [0.5] * 20, epochs=1),
        TypeError,
        "MeanSquaredError takes float targets",
        "np.asarray(y, dtype=np.float32).reshape(-1, 1)",
    ),
    "pandas-like labels": (
        lambda: dlfs.fit(_I21_SCE, dlfs.SGD(), _I21_X, _Series(np.arange(20) % 10), epochs=1),
        TypeError,
        "y must be a numpy array, got _Series",
        "y.to_numpy(dtype=np.int64)",
    ),
    "pandas-like validation targets": (
        lambda: dlfs.fit(
            _I21_MSE,
            dlfs.SGD(),
            _I21_X,
            np.ones((20, 1), np.float32),
            validation=(_I21_X, _Series(np.ones(20))),
            epochs=1,
        ),
        TypeError,
        "validation y must be a numpy array, got _Series",
        "convert with y.to_numpy(dtype=np.float32).reshape(-1, 1)",
    ),
    "labels 1..10": (
        lambda: dlfs.fit(_I21_SCE, dlfs.SGD(), _I21_X, np.arange(20) % 10 + 1, epochs=1),
        ValueError,
        "y labels must be in [0, 10) for a network with 10 outputs, got values in [1, 10]",
        "they look numbered from 1, pass y - 1",
    ),
    "x and y lengths": (
        lambda: dlfs.fit(_I21_SCE, dlfs.SGD(), _I21_X, np.arange(19) % 10, epochs=1),
        ValueError,
        "x and y must have the same length (one target per sample)",
        "got 20 rows in x and 19 in y",
    ),
    "NaN in x": (
        lambda: dlfs.fit(_I21_SCE, dlfs.SGD(), _i21_nan_x(), np.arange(20) % 10, epochs=1),
        ValueError,
        "x contains NaN or inf",
        "in rows 3, 7 (2 of 20 rows)",
    ),
    "NaN in a later predict chunk": (
        lambda: _I21_SCE.predict(_i21_nan_x()[4:], batch_size=2),
        ValueError,
        "x contains NaN or inf",
        "in row 3;",  # numbered in the whole x, not in its chunk
    ),
    "net.fit": (
        lambda: _I21_SCE.fit(_I21_X, np.arange(20) % 10),
        TypeError,
        "Network.fit must not be used",
        "trained, history = dlfs.fit(net, dlfs.Adam(), x, y, epochs=10)",
    ),
    "validation_data=": (
        lambda: dlfs.fit(
            _I21_SCE,
            dlfs.SGD(),
            _I21_X,
            np.arange(20) % 10,
            epochs=1,
            validation_data=(_I21_X, np.arange(20) % 10),
        ),
        TypeError,
        "fit must not be given validation_data= (a Keras keyword)",
        "dlfs takes validation=(x_val, y_val)",
    ),
    "validation_split=": (
        lambda: dlfs.fit(
            _I21_SCE, dlfs.SGD(), _I21_X, np.arange(20) % 10, epochs=1, validation_split=0.2
        ),
        TypeError,
        "fit must not be given validation_split=",
        "validation=(x[:n], y[:n])",
    ),
    "callbacks=": (
        lambda: dlfs.fit(_I21_SCE, dlfs.SGD(), _I21_X, np.arange(20) % 10, epochs=1, callbacks=[]),
        TypeError,
        "fit must not be given callbacks=",
        "callback=fn",
    ),
    "a misspelt fit keyword": (
        lambda: dlfs.fit(_I21_SCE, dlfs.SGD(), _I21_X, np.arange(20) % 10, epochs=1, batchsize=4),
        TypeError,
        "unexpected keyword argument 'batchsize', it must be one of its own",
        "did you mean batch_size=?",
    ),
    "Adam(learning_rate=...)": (
        lambda: dlfs.Adam(learning_rate=1e-3),
        TypeError,
        "Adam must be given lr=, not learning_rate=",
        "dlfs.Adam(lr=0.001)",
    ),
}


class _Series:
    """A stand-in for a pandas Series (pandas is not a test dependency)."""

    ndim = 1

    def __init__(self, values):
        self.values = values

    def to_numpy(self, dtype=None):
        return np.asarray(self.values, dtype=dtype)


_I21_X = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
_I21_SCE = dlfs.network(0, 4, [dlfs.dense(10)], dlfs.SoftmaxCrossEntropy())
_I21_MSE = dlfs.network(0, 4, [dlfs.dense(1)], dlfs.MeanSquaredError())


def _i21_nan_x():
    x = _I21_X.copy()
    x[3, 1], x[7, 0] = np.nan, np.inf
    return x


def test_keras_names_answered():
    with pytest.raises(AttributeError, match=r"no attribute 'relu': activations are layers"):
        dlfs.relu  # noqa: B018
    with pytest.raises(AttributeError, match=r"dlfs.network\(key, input_shape"):
        dlfs.Sequential  # noqa: B018
    assert not hasattr(dlfs, "relu") and not hasattr(dlfs, "no_such_name")
    # Keras's History.history is accepted: the same columns under Keras's keys
    y = np.arange(20) % 10
    _, h = dlfs.fit(_I21_SCE, dlfs.SGD(), _I21_X, y, epochs=2, validation=(_I21_X, y))
    assert list(h.history) == ["loss", "val_loss", "val_accuracy"]
    assert h.history["loss"] == h.train_loss and h.history["val_accuracy"] == h.val_metric
    _, h = dlfs.fit(_I21_SCE, dlfs.SGD(), _I21_X, y, epochs=1)
    assert h.history == {"loss": h.train_loss}


@pytest.mark.parametrize("case", list(_I21_MISTAKES))
def test_everyday_mistakes_round_two(case):
    call, exc, names, fix = _I21_MISTAKES[case]
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    assert names in message and fix in message, message
    _assert_clear_error(info.value)


def test_logit_loss_heads_that_stay_allowed():
    sce, bce = dlfs.SoftmaxCrossEntropy(), dlfs.BinaryCrossEntropy()
    dlfs.network(0, 4, [dlfs.dense(3, dlfs.Sigmoid()), dlfs.dense(2)], sce)  # hidden sigmoid
    dlfs.network(0, 4, [dlfs.dense(1, dlfs.Sigmoid())], dlfs.MeanSquaredError())
    dlfs.network(0, (3, 5, 5), [dlfs.conv2d(2, 3), dlfs.Flatten(), dlfs.dense(1)], bce)
    dlfs.network(0, (28, 28, 1), [dlfs.Flatten(), dlfs.dense(2)], sce)  # no convolution


def test_input_hints_only_where_they_fit():
    rgb = dlfs.network(0, (3, 4, 4), [dlfs.Flatten(), dlfs.dense(2)], dlfs.MeanSquaredError())
    with pytest.raises(ValueError, match=r"must have shape \(N, 3, 4, 4\), got \(6, 4, 4\)$"):
        rgb.predict(np.zeros((6, 4, 4), np.float32))  # not one channel: no x[:, None]
    with pytest.raises(TypeError, match=r"dtype int64; dlfs never casts silently"):
        rgb.predict(np.zeros((6, 3, 4, 4), np.int64))  # integers, not uint8 pixels: no / 255


def test_fit_checks_whole_data_sets_before_the_first_step(monkeypatch):
    def no_step(state, batch):
        raise AssertionError("training started before the data were checked")

    monkeypatch.setattr(dlfs, "train_step", no_step)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 2)).astype(np.float32)
    t = rng.random((3000, 1), dtype=np.float32)
    bce = dlfs.network(0, 2, [dlfs.dense(1)], dlfs.BinaryCrossEntropy())
    bad = t.copy()
    bad[-1] = 1.5  # only the last row is out of range
    with pytest.raises(ValueError, match=r"y must hold BinaryCrossEntropy targets in \[0, 1\]"):
        dlfs.fit(bce, dlfs.SGD(), x, bad, epochs=1)
    with pytest.raises(ValueError, match=r"got values in \[-0.5, "):
        dlfs.fit(bce, dlfs.SGD(), x, np.where(bad > 1, np.float32(-0.5), bad), epochs=1)
    with pytest.raises(ValueError, match="validation y must hold BinaryCrossEntropy targets"):
        dlfs.fit(bce, dlfs.SGD(), x, t, epochs=1, validation=(x, bad))
    xv = x.copy()
    xv[-1, 1] = np.nan
    with pytest.raises(ValueError, match="validation x contains NaN"):
        dlfs.fit(bce, dlfs.SGD(), x, t, epochs=1, validation=(xv, t))
    labels = rng.integers(0, 3, 3000)
    labels[-1] = 3
    sce = dlfs.network(0, 2, [dlfs.dense(3)], dlfs.SoftmaxCrossEntropy())
    with pytest.raises(ValueError, match=r"validation y labels must be in \[0, 3\)"):
        dlfs.fit(sce, dlfs.SGD(), x, labels % 3, epochs=1, validation=(x, labels))
    for metric in (np.zeros(3), [1, 2], 3):
        with pytest.raises(TypeError, match="metric must be 'auto', None or a callable"):
            dlfs.fit(sce, dlfs.SGD(), x, labels % 3, epochs=1, metric=metric)
    with pytest.raises(ValueError, match="metric must be 'auto'"):
        dlfs.fit(sce, dlfs.SGD(), x, labels % 3, epochs=1, metric="accuracy")


def test_fit_checks_targets_of_a_custom_loss_by_the_loss_and_labels_on_all_rows():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 3)).astype(np.float32)
    labels = rng.integers(0, 4, 50)
    net = dlfs.network(0, 3, [dlfs.dense(4)], _HalfCE())
    _, h = dlfs.fit(net, dlfs.SGD(0.1), x, labels, epochs=2, validation=(x, labels), metric=None)
    assert h.steps == 4 and h.val_loss[-1] > 0
    bad = labels.copy()
    bad[-1] = 4
    with pytest.raises(ValueError, match=r"y labels must be in \[0, 4\) for a network with 4"):
        dlfs.fit(net, dlfs.SGD(0.1), x, bad, epochs=1)
    with pytest.raises(
        ValueError, match=r"y must suit the loss _HalfCE \(checked on its first row\)"
    ):
        dlfs.fit(net, dlfs.SGD(0.1), x, labels[:, None], epochs=1)


def test_fit_checks_labels_in_every_row_before_training():
    net = dlfs.network(0, 3, [dlfs.dense(4)], dlfs.SoftmaxCrossEntropy())
    x = np.zeros((40, 3), np.float32)
    for bad in (4, -1):
        y = np.zeros(40, np.int64)
        y[-1] = bad  # the last row only
        epochs = _HardEpochs()
        with pytest.raises(ValueError, match="labels must be in"):
            dlfs.fit(net, dlfs.SGD(), x, y, epochs=1, batch_size=8, progress=epochs)
        assert epochs.started == []


def test_targets_of_other_losses_are_not_taken_for_labels():
    net = dlfs.network(0, 3, [dlfs.dense(2)], _L1Loss())
    x = np.zeros((4, 3), np.float32)
    y = np.full((4, 2), -5.0, np.float32)  # negative float targets: fine for an L1 loss
    assert net.evaluate(x, y)["loss"] == pytest.approx(5.0)


def test_target_hints_only_where_they_fit():
    net = dlfs.network(0, 3, [dlfs.dense(1)], dlfs.MeanSquaredError())
    x = np.zeros((4, 3), np.float32)
    with pytest.raises(TypeError) as info:
        net.evaluate(x, np.zeros((4, 1), np.int64))
    assert str(info.value).endswith("convert with y.astype(np.float32)")
    with pytest.raises(ValueError) as info:
        net.evaluate(x, np.zeros((4, 3), np.float32))
    assert "[:, None]" not in str(info.value)
    with pytest.raises(ValueError, match=r"use y\[:, None\]"):
        net.evaluate(x, np.zeros(4, np.float32))


def test_integer_targets_for_a_one_output_regression_get_the_cast_not_one_hot():
    """Integer y (N,) for an MSE net with ONE output are numbers to regress, not
    class labels: the message says to cast them into a column, not dlfs.one_hot."""
    net = dlfs.network(0, 3, [dlfs.dense(1)], dlfs.MeanSquaredError())
    x, y = np.ones((4, 3), np.float32), np.array([1, 2, 3, 4])
    with pytest.raises(TypeError, match=r"convert with y\.astype\(np\.float32\)\[:, None\]$"):
        dlfs.fit(net, dlfs.SGD(0.1), x, y, epochs=1)


# --------------------------- fit reports: callbacks, progress bars, printing


def test_verbose_and_progress(capsys):
    x, y = _regression(n=20)
    bars = []

    class Bar:  # the least a progress factory needs: update and close
        def __init__(self, total, desc):
            self.total, self.desc, self.n, self.closed = total, desc, 0, False
            bars.append(self)

        def update(self, k):
            self.n += k

        def close(self):
            self.closed = True

    dlfs.fit(
        _linear_net(), dlfs.SGD(0.01), x, y, epochs=2, batch_size=8, verbose=True, progress=Bar
    )
    out = capsys.readouterr().out
    assert "epoch 1" in out and "train_loss" in out
    assert [(b.total, b.n, b.closed, b.desc) for b in bars] == [(6, 6, True, "fit")]  # one bar


def test_callback_runs_every_epoch_and_can_stop_training(tmp_path, capsys):
    net, opt = _i11_net(), dlfs.Adam(1e-2)
    x, y = _trust_fit_data()
    seen = []
    for answer in (None, 0, "", True, [False]):  # only False itself stops
        seen.clear()

        def callback(record, answer=answer):
            seen.append(record)
            return answer

        _, h = dlfs.fit(net, opt, x, y, epochs=3, callback=callback)
        assert [r.epoch for r in seen] == [1, 2, 3] and h.stop_reason == "completed"
        assert all(r.val_loss is None for r in seen)  # called without validation too

    def stop_at_2(record):
        return np.float64(record.epoch) != 2  # numpy's False stops too

    def raise_at_2(record):
        if record.epoch == 2:
            raise dlfs.StopTraining

    short, h_short = dlfs.fit(net, opt, x, y, epochs=2, **_I11_KW)
    for callback in (stop_at_2, raise_at_2):
        path = tmp_path / f"{callback.__name__}.npz"
        kw = dict(_I11_KW, callback=callback, checkpoint=path, verbose=True)
        got, h = dlfs.fit(net, opt, x, y, epochs=5, **kw)
        assert h.stop_reason == "callback" and h.epochs == [1, 2] and not h.interrupted
        _assert_same_net(got, short)
        assert h.records == h_short.records
        assert "training stopped by the callback after epoch 2" in capsys.readouterr().out
        assert dlfs.load(path).meta["dlfs.fit"]["stop_reason"] == "callback"
        # a resume goes on where the callback stopped, like one uninterrupted call
        resumed, h_resumed = dlfs.fit(net, opt, x, y, epochs=4, resume=path, **_I11_KW)
        straight, h_straight = dlfs.fit(net, opt, x, y, epochs=4, **_I11_KW)
        _assert_same_net(resumed, straight)
        assert h_resumed == h_straight


def test_progress_one_bar_with_running_loss_and_validation():
    x, y = _trust_fit_data()
    bars = []

    class Bar:
        def __init__(self, total, desc):
            self.total, self.desc, self.n, self.closed, self.postfix = total, desc, 0, False, []
            bars.append(self)

        def update(self, k):
            self.n += k

        def set_postfix(self, ordered_dict=None, refresh=True):
            self.postfix.append(dict(ordered_dict))

        def close(self):
            self.closed = True

    _, history = dlfs.fit(
        _i11_net(), dlfs.Adam(1e-2), x, y, epochs=3, validation=(x, y), progress=Bar, **_I11_KW
    )
    (bar,) = bars
    assert (bar.total, bar.n, bar.closed, bar.desc) == (15, 15, True, "fit")
    assert list(bar.postfix[0]) == ["epoch", "loss"] and bar.postfix[0]["epoch"] == "1/3"
    assert list(bar.postfix[-1]) == ["epoch", "loss", "val_loss", "val_accuracy"]
    # 5 steps, then the epoch's own figures, per epoch; the next epoch's steps keep
    # showing the last evaluation's values
    assert len(bar.postfix) == 18
    for e, record in enumerate(history.records, 1):
        shown = {"val_loss": f"{record.val_loss:.4g}", "val_accuracy": f"{record.val_metric:.4g}"}
        end = {"epoch": f"{e}/3", "loss": f"{record.train_loss:.4g}", **shown}
        assert bar.postfix[6 * e - 1] == end
        for step in bar.postfix[6 * e : 6 * e + 5]:
            assert step["epoch"] == f"{e + 1}/3" and step["val_loss"] == shown["val_loss"]
            assert step["val_accuracy"] == shown["val_accuracy"]


def test_progress_true_uses_tqdm_auto_or_prints_a_line_per_epoch(monkeypatch, capsys):
    x, y = _trust_fit_data()
    kw = dict(_I11_KW, epochs=2, validation=(x, y), progress=True)
    pytest.importorskip("tqdm")
    dlfs.fit(_i11_net(), dlfs.Adam(1e-2), x, y, **kw)
    captured = capsys.readouterr()
    assert (
        "fit: 100%" in captured.err and "10/10" in captured.err and "val_accuracy=" in captured.err
    )
    assert captured.out == ""
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    for verbose in (False, True):
        dlfs.fit(_i11_net(), dlfs.Adam(1e-2), x, y, verbose=verbose, **kw)
        out = capsys.readouterr().out.splitlines()
        assert [line.split(":")[0] for line in out] == ["epoch 1", "epoch 2"]  # not twice
    with pytest.raises(TypeError, match='progress must be "auto", True, False, None or a tqdm'):
        dlfs.fit(_i11_net(), dlfs.Adam(), x, y, epochs=1, progress="bar")


class _Stderr(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("where", ["terminal", "pipe", "notebook"])
def test_progress_auto_shows_a_bar_only_where_someone_watches(monkeypatch, capsys, where):
    pytest.importorskip("tqdm")
    x, y = _trust_fit_data()
    err = _Stderr(tty=where == "terminal")
    monkeypatch.setattr(sys, "stderr", err)
    if where == "notebook":

        class ZMQInteractiveShell:  # what get_ipython() returns in a Jupyter kernel
            pass

        fake = types.ModuleType("IPython")
        fake.get_ipython = ZMQInteractiveShell  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "IPython", fake)
        monkeypatch.setitem(sys.modules, "tqdm.auto", importlib.import_module("tqdm.std"))
    dlfs.fit(_i11_net(), dlfs.Adam(1e-2), x, y, epochs=2, **_I11_KW)  # the default: "auto"
    shown = err.getvalue()
    assert ("fit: 100%" in shown) == (where != "pipe"), shown
    assert capsys.readouterr().out == ""


def test_quiet_fit_prints_nothing(capsys, tmp_path):
    x, y = _regression(n=16)
    dlfs.fit(
        _linear_net(),
        dlfs.SGD(0.01),
        x,
        y,
        epochs=3,
        validation=(x, -y),
        early_stopping=True,
        patience=1,
        verbose=False,
        checkpoint=tmp_path / "c.npz",
    )
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


# ---- fit and Ctrl-C: the last completed step is kept, checkpointed, resumed


@pytest.mark.parametrize("where", ["data", "progress", "step"])
@pytest.mark.parametrize("steps", [3, 5, 7])  # mid-epoch 1, end of epoch 1, mid-epoch 2
def test_interrupt_mid_epoch_returns_the_network_of_the_last_completed_step(
    monkeypatch, where, steps
):
    net, opt = _i11_net(), dlfs.Adam(1e-2)
    x, y = _trust_fit_data()
    kw = dict(_I11_KW)
    if where == "data":
        _i11_interrupt_source(monkeypatch, steps)
    elif where == "step":
        real_step = dlfs.train_step

        def step(state, batch):
            if state.step == steps:
                raise KeyboardInterrupt
            return real_step(state, batch)

        monkeypatch.setattr(dlfs, "train_step", step)
    else:

        class Bar:
            def __init__(self, total, desc):
                self.n = 0

            def update(self, k):
                self.n += k
                if self.n == steps:  # the step is done; the bar breaks
                    raise KeyboardInterrupt

            def close(self):
                pass

        kw["progress"] = Bar
    with pytest.warns(UserWarning, match=rf"fit interrupted .*after {steps} steps") as caught:
        got, history = dlfs.fit(net, opt, x, y, epochs=4, **kw)
    assert len(caught) == 1 and "history.interrupted is True" in str(caught[0].message)
    monkeypatch.undo()
    _assert_same_net(got, _i11_by_hand(net, opt, x, y, steps))
    assert history.interrupted and history.stop_reason == "interrupted"
    assert not history.stopped_early and history.steps == steps
    # the recorded epochs only: a bar that breaks at an epoch's last step stops the
    # epoch before its record (a resume from a checkpoint would record it)
    recorded = steps // 5 - (where == "progress" and steps % 5 == 0)
    assert history.epochs == list(range(1, recorded + 1))


def test_interrupt_from_the_callback_checkpoints_first_and_equals_a_shorter_run(tmp_path):
    net, opt = _i11_net(), dlfs.Adam(1e-2)
    x, y = _trust_fit_data()
    path = tmp_path / "run.npz"
    seen = []

    def callback(record):
        seen.append((record.epoch, dlfs.load(path).meta["dlfs.fit"]["epoch"]))
        if record.epoch == 2:
            raise KeyboardInterrupt

    with pytest.warns(UserWarning, match=r"interrupted after epoch 2.*saved to"):
        got, history = dlfs.fit(
            net, opt, x, y, epochs=5, callback=callback, checkpoint=path, **_I11_KW
        )
    assert seen == [(1, 1), (2, 2)]  # the checkpoint was written before the callback ran
    short, h_short = dlfs.fit(net, opt, x, y, epochs=2, **_I11_KW)
    _assert_same_net(got, short)
    assert history.records == h_short.records and history.interrupted
    saved = dlfs.load(path).meta["dlfs.fit"]
    assert (saved["epoch"], saved["batch"], saved["stop_reason"]) == (2, 0, "interrupted")


def test_a_checkpoint_holds_no_best_network_before_the_first_evaluation(tmp_path, monkeypatch):
    # validation without early stopping, Ctrl-C in epoch 1: nothing was evaluated, so
    # the untrained input network must not come back as "best"
    net, opt = _i11_net(), dlfs.Adam(1e-2)
    x, y = _trust_fit_data()
    path = tmp_path / "run.npz"
    _i11_interrupt_source(monkeypatch, 3)
    with pytest.warns(UserWarning, match="interrupted"):
        dlfs.fit(net, opt, x, y, epochs=3, validation=(x, y), checkpoint=path, **_I11_KW)
    ckpt = dlfs.load(path)
    assert ckpt.meta["dlfs.fit"]["best_epoch"] is None and ckpt.best is None
    assert "best" not in repr(ckpt)


def test_interrupted_checkpoint_resumes_bit_identically_mid_epoch(tmp_path, monkeypatch):
    net, opt = _i11_net(), dlfs.Adam(1e-2)
    x, y = _trust_fit_data()
    kw = dict(_I11_KW, validation=(x[:10], y[:10]), patience=3)
    straight, h_straight = dlfs.fit(net, opt, x, y, epochs=4, **kw)
    path = tmp_path / "run.npz"
    _i11_interrupt_source(monkeypatch, 7)  # in epoch 2, after its second step
    with pytest.warns(UserWarning, match="in epoch 2 after step 2 of 5"):
        part, _ = dlfs.fit(net, opt, x, y, epochs=4, checkpoint=path, **kw)
    monkeypatch.undo()
    saved = dlfs.load(path)
    record = saved.meta["dlfs.fit"]
    assert (record["epoch"], record["batch"], record["step"]) == (1, 2, 7)
    assert record["seen"] == 16 and record["loss_sum"] > 0  # the running loss of epoch 2
    _assert_same_net(saved.net, part)
    assert "epoch 1 + 2 steps, interrupted" in repr(saved)
    bars = []
    resumed, h_resumed = dlfs.fit(
        net, opt, x, y, epochs=4, resume=path, progress=_bar_factory(bars), **kw
    )
    _assert_same_net(straight, resumed)
    assert h_resumed == h_straight and h_resumed.stop_reason == "completed"
    assert [(b.total, b.n) for b in bars] == [(13, 13)]  # the 20 - 7 steps left


def test_interrupt_during_evaluation_resumes_with_that_evaluation(tmp_path):
    net, opt = _i11_net(), dlfs.Adam(1e-2)
    x, y = _trust_fit_data()
    calls = [0]

    def metric(pred, target):
        calls[0] += 1
        if calls[0] == 2:  # epoch 2's evaluation
            raise KeyboardInterrupt
        return dlfs.accuracy(pred, target)

    kw = dict(_I11_KW, validation=(x[:10], y[:10]), metric=metric)
    path = tmp_path / "run.npz"
    with pytest.warns(UserWarning, match="after the last step of epoch 2, before its record"):
        got, history = dlfs.fit(net, opt, x, y, epochs=3, checkpoint=path, **kw)
    assert history.epochs == [1] and history.steps == 10
    _assert_same_net(got, _i11_by_hand(net, opt, x, y, 10))
    resumed, h_resumed = dlfs.fit(net, opt, x, y, epochs=3, resume=path, **kw)
    calls[0] = -100  # no more interrupts
    straight, h_straight = dlfs.fit(net, opt, x, y, epochs=3, **kw)
    _assert_same_net(straight, resumed)
    assert h_resumed == h_straight


def test_second_interrupt_during_the_checkpoint_write_aborts(tmp_path, monkeypatch):
    net, opt = _i11_net(), dlfs.Adam(1e-2)
    x, y = _trust_fit_data()
    path = tmp_path / "run.npz"
    dlfs.fit(net, opt, x, y, epochs=1, checkpoint=path, **_I11_KW)
    _i11_interrupt_source(monkeypatch, 7)

    def writer(file, arrays):
        raise KeyboardInterrupt  # Ctrl-C again while fit saves what it has

    monkeypatch.setattr(dlfs, "_write_npz", writer)
    with pytest.raises(KeyboardInterrupt):
        dlfs.fit(net, opt, x, y, epochs=3, checkpoint=path, resume=path, **_I11_KW)
    monkeypatch.undo()
    assert dlfs.load(path).meta["dlfs.fit"]["epoch"] == 1  # the old checkpoint is intact
    assert os.listdir(tmp_path) == ["run.npz"]


# ---- fit with checkpoints: paths checked first, saved on time, resumed bit for bit


@pytest.mark.parametrize("with_validation", [False, True])
def test_resume_is_bit_identical(tmp_path, with_validation):
    net = _trust_net(3, 4, [6, 5], [4, 2], np.float32, "sce", [1, 2])
    opt = dlfs.chain(dlfs.ClipByGlobalNorm(5.0), dlfs.Adam(1e-2))
    x, y = _trust_fit_data()
    kw = dict(batch_size=8, seed=5, shuffle=True)
    if with_validation:
        kw |= dict(validation=(x[:10], y[:10]), patience=10)
    straight, h_straight = dlfs.fit(net, opt, x, y, epochs=4, **kw)
    path = tmp_path / "run.npz"
    dlfs.fit(net, opt, x, y, epochs=2, checkpoint=path, **kw)
    assert dlfs.load(path).meta["dlfs.fit"]["epoch"] == 2
    resumed, h_resumed = dlfs.fit(net, opt, x, y, epochs=4, resume=path, checkpoint=path, **kw)
    _assert_same_net(straight, resumed)
    assert h_straight == h_resumed
    # resuming a finished run trains nothing and returns the same result
    again, h_again = dlfs.fit(net, opt, x, y, epochs=4, resume=path, **kw)
    _assert_same_net(straight, again)
    assert h_again == h_straight


def test_resume_keeps_early_stopping_state(tmp_path):
    net = _trust_net(1, 4, [8], [2], np.float32, "sce", [0])
    x, y = _trust_fit_data(1)
    kw = dict(batch_size=8, validation=(x[:10], y[:10]), patience=2, early_stopping=True)
    opt = dlfs.SGD(3.0)  # large steps: the validation loss wanders, early stopping fires
    straight, hs = dlfs.fit(net, opt, x, y, epochs=12, **kw)
    assert hs.stopped_early and hs.best_epoch < hs.epochs[-1]  # the best net is not the last
    path = tmp_path / "run.npz"
    for total in range(1, 13):  # one epoch per call, each resuming the last
        out, hr = dlfs.fit(
            net, opt, x, y, epochs=total, checkpoint=path, resume=path if total > 1 else None, **kw
        )
        if hr.stopped_early:
            break
    assert hr == hs
    _assert_same_net(straight, out)


def test_resume_rejects_a_different_run(tmp_path):
    net = _trust_net(0, 4, [5], [3], np.float32, "sce", [0])
    x, y = _trust_fit_data()
    path = tmp_path / "run.npz"
    dlfs.fit(net, dlfs.Adam(), x, y, epochs=1, batch_size=8, checkpoint=path)
    for change, match in [
        (dict(batch_size=4), "batch_size"),
        (dict(seed=1), "seed"),
        (dict(shuffle=False), "shuffle"),
        (dict(drop_last=True), "drop_last"),
        (dict(eval_every=2), "eval_every"),
        (dict(validation=(x, y)), "validation"),
    ]:
        kw = dict(batch_size=8, seed=0, shuffle=True) | change
        with pytest.raises(ValueError, match=match):
            dlfs.fit(net, dlfs.Adam(), x, y, epochs=2, resume=path, **kw)
    monitored = tmp_path / "monitored.npz"
    kw = dict(batch_size=8, validation=(x, y))
    dlfs.fit(net, dlfs.Adam(), x, y, epochs=1, checkpoint=monitored, **kw)
    for change in (dict(patience=2), dict(early_stopping=True)):
        with pytest.raises(ValueError, match="early_stopping=False, this call has"):
            dlfs.fit(net, dlfs.Adam(), x, y, epochs=2, resume=monitored, **kw, **change)
    with pytest.raises(ValueError, match="slots"):
        dlfs.fit(net, dlfs.SGD(), x, y, epochs=2, batch_size=8, resume=path)
    other = _trust_net(0, 4, [6], [3], np.float32, "sce", [0])
    with pytest.raises(ValueError, match="not shaped like"):
        dlfs.fit(other, dlfs.Adam(), x, y, epochs=2, batch_size=8, resume=path)
    with pytest.raises(ValueError, match=r"n=40"):
        dlfs.fit(net, dlfs.Adam(), x[:20], y[:20], epochs=2, batch_size=8, resume=path)
    dlfs.fit(net, dlfs.Adam(), x, y, epochs=2, batch_size=8, checkpoint=path)
    with pytest.raises(ValueError, match="past epochs=1"):
        dlfs.fit(net, dlfs.Adam(), x, y, epochs=1, batch_size=8, resume=path)
    plain = tmp_path / "plain.npz"
    dlfs.save(plain, net)
    with pytest.raises(ValueError, match="not written by fit"):
        dlfs.fit(net, dlfs.Adam(), x, y, epochs=2, batch_size=8, resume=plain)


@pytest.mark.parametrize("early_stopping", [False, True])
def test_resume_with_eval_every_dividing_the_split(tmp_path, early_stopping):
    """eval_every=2 and a 2 + 2 split: both calls evaluate where the straight run does, so the
    resumed run matches 4 straight epochs bit for bit, history and best network included."""
    net = _trust_net(3, 4, [6, 5], [4, 2], np.float32, "sce", [1, 2])
    x, y = _trust_fit_data()
    kw = dict(batch_size=8, seed=5, validation=(x[:10], y[:10]), eval_every=2)
    kw["patience"] = 10 if early_stopping else None
    opt = dlfs.Adam(1e-2)
    straight, h_straight = dlfs.fit(net, opt, x, y, epochs=4, **kw)
    assert h_straight.val_loss[0] is None and h_straight.val_loss[2] is None
    assert None not in (h_straight.val_loss[1], h_straight.val_loss[3])
    path = tmp_path / "run.npz"
    dlfs.fit(net, opt, x, y, epochs=2, checkpoint=path, **kw)
    resumed, h_resumed = dlfs.fit(net, opt, x, y, epochs=4, resume=path, **kw)
    _assert_same_net(straight, resumed)
    assert h_resumed == h_straight


def test_resume_with_eval_every_not_dividing_the_split(tmp_path):
    """eval_every=3 and a 2 + 2 split: the first call also evaluates its last epoch (2), as
    fit's docstring says.  Evaluating never changes training, so without early stopping the
    weights still match 4 straight epochs bit for bit; the history has one more evaluation."""
    net = _trust_net(3, 4, [6, 5], [4, 2], np.float32, "sce", [1, 2])
    x, y = _trust_fit_data()
    kw = dict(batch_size=8, seed=5, validation=(x[:10], y[:10]), eval_every=3)
    kw["early_stopping"] = False
    opt = dlfs.Adam(1e-2)
    straight, h_straight = dlfs.fit(net, opt, x, y, epochs=4, **kw)
    path = tmp_path / "run.npz"
    dlfs.fit(net, opt, x, y, epochs=2, checkpoint=path, **kw)
    resumed, h_resumed = dlfs.fit(net, opt, x, y, epochs=4, resume=path, **kw)
    _assert_same_net(straight, resumed)
    assert [v is not None for v in h_straight.val_loss] == [False, False, True, True]
    assert [v is not None for v in h_resumed.val_loss] == [False, True, True, True]
    assert h_resumed.train_loss == h_straight.train_loss
    assert h_resumed.records[2:] == h_straight.records[2:]
    assert h_resumed.records[0] == h_straight.records[0]
    for h in (h_straight, h_resumed):  # the best epoch is over the evaluated ones
        evaluated = {r.epoch: r.val_loss for r in h.records if r.val_loss is not None}
        assert h.best_epoch == min(evaluated, key=evaluated.get)


def test_history_survives_checkpoint_and_resume(tmp_path):
    x, y = _regression(n=64)
    xv, yv = x[:32], -y[:32]
    net, opt = _linear_net(hidden=False), dlfs.SGD(0.05)
    kw = dict(batch_size=8, validation=(xv, yv), patience=1)
    path = tmp_path / "run.npz"
    best, h = dlfs.fit(net, opt, x, y, epochs=10, checkpoint=path, **kw)
    assert h.stopped_early
    again, h_again = dlfs.fit(net, opt, x, y, epochs=10, resume=path, **kw)
    assert h_again == h and h_again.stop_reason == "early_stopping"
    _assert_same_net(again, best)


@pytest.mark.parametrize("kind", ["directory", "long_name", "missing_folder", "trailing_sep"])
def test_fit_checks_the_checkpoint_path_before_the_first_step(tmp_path, kind):
    path = {
        "directory": tmp_path,
        "long_name": tmp_path / ("n" * 300),
        "missing_folder": tmp_path / "no" / "c.npz",
        "trailing_sep": f"{tmp_path}{os.sep}c.npz{os.sep}",
    }[kind]
    exc, words = {
        "directory": (IsADirectoryError, "checkpoint must be a file path, got the directory"),
        "long_name": (ValueError, "checkpoint file name must fit .* 255 bytes, got 300 bytes"),
        "missing_folder": (FileNotFoundError, "checkpoint folder .* does not exist"),
        "trailing_sep": (ValueError, "checkpoint must be a file path, .* ends in a separator"),
    }[kind]
    epochs = _HardEpochs()
    with pytest.raises(exc, match=words):
        dlfs.fit(**_hard_fit_kwargs(), checkpoint=path, progress=epochs)
    assert epochs.started == []
    assert os.listdir(tmp_path) == []
    with pytest.raises(exc, match=words.replace("checkpoint", "path", 1)):
        dlfs.save(path, _hard_net())


def test_fit_checks_the_folder_is_writable_before_the_first_step(tmp_path, monkeypatch):
    def refuse(path):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(dlfs, "_open_temp_beside", refuse)
    epochs = _HardEpochs()
    with pytest.raises(PermissionError, match="checkpoint: cannot create files in"):
        dlfs.fit(**_hard_fit_kwargs(), checkpoint=tmp_path / "c.npz", progress=epochs)
    assert epochs.started == []


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes in read-only folders"
)
def test_fit_refuses_a_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="checkpoint: cannot create files"):
            dlfs.fit(**_hard_fit_kwargs(), checkpoint=folder / "c.npz")
    finally:
        folder.chmod(0o700)


def test_fit_probe_leaves_no_file_behind(tmp_path):
    dlfs.fit(**_hard_fit_kwargs(epochs=1), checkpoint=tmp_path / "c.npz")
    assert os.listdir(tmp_path) == ["c.npz"]


def test_fit_saves_checkpoints_at_exactly_the_right_epochs(tmp_path, monkeypatch):
    saved = []

    def spy(file, arrays):
        structure = json.loads(arrays["__dlfs_structure__"].tobytes())
        saved.append(structure["meta"]["dlfs.fit"]["epoch"])
        np.savez(file, **arrays)

    monkeypatch.setattr(dlfs, "_write_npz", spy)
    path = tmp_path / "c.npz"
    dlfs.fit(**_hard_fit_kwargs(epochs=7), checkpoint=path, checkpoint_every=3)
    assert saved == [3, 6, 7]
    saved.clear()
    _hard_stop_run((0, 2), patience=2, checkpoint=path, checkpoint_every=2)
    assert saved == [2, 4, 5]  # the early stop at epoch 5 is saved too
    saved.clear()
    dlfs.fit(**_hard_fit_kwargs(epochs=3), checkpoint=path)
    assert saved == [1, 2, 3]


def test_resume_mid_epoch_counts_the_started_epoch(tmp_path, monkeypatch):
    net, opt = _i11_net(), dlfs.Adam(1e-2)
    x, y = _trust_fit_data()
    path = tmp_path / "run.npz"
    _i11_interrupt_source(monkeypatch, 7)  # in epoch 2, after its second step
    with pytest.warns(UserWarning, match="in epoch 2 after step 2 of 5"):
        dlfs.fit(net, opt, x, y, epochs=4, checkpoint=path, **_I11_KW)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="resume: the checkpoint is at epoch 2, past epochs=1"):
        dlfs.fit(net, opt, x, y, epochs=1, resume=path, **_I11_KW)


def test_resume_reads_a_hand_edited_fit_record_by_its_rules(tmp_path):
    """A fit record whose position is past the epoch's steps is refused by name;
    one without the running loss (an older checkpoint's) resumes as from zero,
    exactly as one that says loss_sum 0.0 and seen 0; one without drop_last (older
    still) as one that says False; one inside the first epoch (epoch 0) resumes."""
    path = tmp_path / "c.npz"
    net = dlfs.network(0, 3, [dlfs.dense(1)], dlfs.MeanSquaredError())
    x, y = np.ones((16, 3), np.float32), np.linspace(0, 1, 16, dtype=np.float32)[:, None]
    dlfs.fit(net, dlfs.SGD(0.1), x, y, epochs=1, batch_size=4, checkpoint=path)
    ckpt = dlfs.load(path)

    def resume_with(drop=(), **fields):
        meta = copy.deepcopy(ckpt.meta)
        record = meta["dlfs.fit"]
        record.update(fields)
        for name in drop:
            del record[name]
        dlfs.save(path, ckpt.net, ckpt.opt_state, meta=meta)
        return dlfs.fit(net, dlfs.SGD(0.1), x, y, epochs=2, batch_size=4, resume=path)

    with pytest.raises(ValueError, match="batch 9 is past the 4 steps of an epoch"):
        resume_with(batch=9)
    _, missing = resume_with(drop=("loss_sum", "seen"), batch=2)
    _, zero = resume_with(batch=2, loss_sum=0.0, seen=0)
    assert missing.records == zero.records
    _, before_drop_last = resume_with(drop=("drop_last",), batch=2)
    _, kept = resume_with(batch=2)
    assert before_drop_last.records == kept.records
    _, first = resume_with(epoch=0, batch=2, step=2, records=[])
    assert [r.epoch for r in first.records] == [1, 2] and first.steps == 8


# ---- data-parallel training: shard, all-reduce, ranks equal one process, MPI


def test_mpi_two_ranks_equal_single_process(tmp_path):
    """mpiexec -n 2: an MLP and a CNN trained 20 steps data-parallel (shards of 5 + 5 rows,
    and 3 + 2 in each epoch's last batch) match train_step in one process to float64
    rounding, with bit-identical parameters on both ranks and the same mean training loss."""
    code = f"import test_dlfs; test_dlfs._mpi_worker({str(tmp_path)!r})"
    _run_mpi(2, ["-c", code])
    for kind in ("mlp", "cnn"):
        net, x, y = _dp_problem(kind)
        single = _dp_train(net, x, y)
        assert single.step == 20
        ranks = [np.load(tmp_path / f"{kind}_rank{r}.npz") for r in range(2)]
        for name in ranks[0].files:
            assert ranks[0][name].tobytes() == ranks[1][name].tobytes()
        flat = iter(ranks[0][f"p{i}"] for i in range(len(ranks[0].files) - 1))
        got = net.with_params(tuple(tuple(next(flat) for _ in ps) for ps in net.params()))
        _assert_close_params(got, single.net, 1e-12)
        assert abs(float(ranks[0]["loss"]) - single.mean_loss) <= 1e-12 * single.mean_loss


def test_mpi_fit_resumes_bit_identically_and_stops_together(tmp_path):
    """mpiexec -n 2, fit(comm=) with Dropout and Adam: 2 epochs + a resume to 4 equal 4
    straight bit for bit on both ranks (history too); a SIGINT on rank 1 alone while its
    step 6 runs stops both ranks after step 7, rank 0 saves, and the resume equals the
    straight run again."""
    code = f"import test_dlfs; test_dlfs._mpi_fit_worker({str(tmp_path)!r})"
    _run_mpi(2, ["-c", code])
    straight = _mpi_load_fit(tmp_path, "straight", 0)
    assert straight[1]["steps"] == 20 and straight[1]["stop"] == "completed"
    for name in ("straight", "resumed", "after"):
        for rank in (0, 1):
            assert _mpi_load_fit(tmp_path, name, rank) == straight, (name, rank)
    for rank in (0, 1):
        arrays, history = _mpi_load_fit(tmp_path, "interrupted", rank)
        assert (history["stop"], history["steps"], len(history["records"])) == ("interrupted", 7, 1)
        assert arrays == _mpi_load_fit(tmp_path, "interrupted", 0)[0]
    saved = dlfs.load(tmp_path / "int.npz").meta["dlfs.fit"]
    assert (saved["step"], saved["ranks"], saved["stop_reason"]) == (7, 2, "interrupted")
    assert sorted(p.name for p in tmp_path.glob("*.npz.*")) == []  # no temporary files left


def test_mpi_ctrl_c_to_mpiexec_stops_every_rank_after_the_same_step(tmp_path):
    """SIGINT to mpiexec, as Ctrl-C in its terminal: mpiexec forwards it to both ranks,
    which may be at different steps; they stop after the same step, exit cleanly, and
    rank 0's checkpoint holds that step."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    code = f"import test_dlfs; test_dlfs._mpi_sigint_worker({str(tmp_path)!r})"
    cmd = [str(_mpiexec()), "-n", "2", sys.executable, "-m", "mpi4py", "-c", code]
    with subprocess.Popen(
        cmd, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    ) as proc:
        try:
            for _ in range(600):
                if (tmp_path / "started").exists() or proc.poll() is not None:
                    break
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=60)
        finally:
            proc.kill()
    assert proc.returncode == 0, out.decode()
    histories = [_mpi_load_fit(tmp_path, "run", rank)[1] for rank in (0, 1)]
    assert histories[0] == histories[1] and histories[0]["stop"] == "interrupted"
    assert histories[0]["steps"] >= 3
    assert dlfs.load(tmp_path / "run.npz").meta["dlfs.fit"]["step"] == histories[0]["steps"]


@settings(max_examples=25, deadline=None)
@given(size=st.integers(1, 4), seed=SEEDS, dtype=DTYPES)
def test_all_reduce_averages_the_ranks_in_one_packed_call(size, seed, dtype):
    """g <- (1/R) sum_r g_r on every rank, bit-identical across ranks, from ONE Allreduce
    of one contiguous buffer of the gradients' dtype; the result is read-only."""
    net = _dp_problem("cnn", dtype)[0]
    params = net.params()

    def grads_of(rank: int) -> tuple:
        rng = np.random.default_rng((seed, rank))
        return tuple(tuple(rng.standard_normal(p.shape).astype(dtype) for p in ps) for ps in params)

    results, group = _run_ranks(
        size, lambda comm: dlfs.AllReduce(comm)(grads_of(comm.rank), params)
    )
    want = [
        sum(g.astype(np.float64) for g in leaves) / size
        for leaves in zip(*([g for ps in grads_of(r) for g in ps] for r in range(size)))
    ]
    for got in results:
        flat = [g for ps in got for g in ps]
        assert [g.tobytes() for g in flat] == [g.tobytes() for ps in results[0] for g in ps]
        for g, w in zip(flat, want):
            assert g.dtype == dtype and not g.flags.writeable
            np.testing.assert_allclose(g, w, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-6)
    assert [[b.dtype for b in bufs] for bufs in group["sent"]] == [[np.dtype(dtype)]] * size


@pytest.mark.parametrize("rank, size", [(0.0, 2), (True, 2), (0, 2.0), (0, np.float32(2))])
def test_a_comm_must_report_integer_ranks(rank, size):
    """Get_rank and Get_size must be ints (numpy integers too), not floats or bools."""
    comm = _ThreadComm(_comm_group(2), 0)
    comm.Get_rank, comm.Get_size = (lambda: rank), (lambda: size)
    with pytest.raises(ValueError, match=r"comm must report ints 0 <= Get_rank\(\) < Get_size"):
        dlfs.AllReduce(comm)
    comm.Get_rank, comm.Get_size = (lambda: np.int64(0)), (lambda: np.int32(1))
    dlfs.AllReduce(comm)  # numpy integers are ints


def test_all_reduced_gradients_cannot_be_made_writeable():
    """The all-reduce's results are read-only views of one read-only buffer, so not
    even ``setflags(write=True)`` can open them for writing."""
    comm = _ThreadComm(_comm_group(1), 0)
    grads = ((np.ones((2, 3), np.float32), np.ones(3, np.float32)),)
    (out,) = dlfs.AllReduce(comm)(grads, grads)
    for g in out:
        assert not g.flags.writeable
        with pytest.raises(ValueError, match="cannot set WRITEABLE flag"):
            g.setflags(write=True)


def test_fit_checks_the_all_reduce_comm_before_training():
    """fit refuses, by its own argument's name and before any step, an optimizer
    whose AllReduce averages over another communicator than fit's."""
    net, x, y = _dp_problem("mlp", n=16)
    comm, other = _ThreadComm(_comm_group(1), 0), _ThreadComm(_comm_group(1), 0)
    late = dlfs.chain(dlfs.AllReduce(other), dlfs.SGD(0.1))
    with pytest.raises(
        ValueError, match=r"^optimizer must be dlfs\.chain\(dlfs\.AllReduce\(comm\)"
    ):
        dlfs.fit(net, late, x, y, epochs=1, batch_size=8, comm=comm)


def test_all_reduce_validates_comm_and_its_place_in_chain():
    with pytest.raises(TypeError, match=r"comm must be an MPI communicator.*Allreduce, Get_rank"):
        dlfs.AllReduce(object())

    class NoRanks:
        def Allreduce(self, sendbuf, recvbuf):  # noqa: N802
            pass

    with pytest.raises(TypeError, match="NoRanks without Get_rank, Get_size"):
        dlfs.AllReduce(NoRanks())
    with pytest.raises(ValueError, match=r"comm must report ints 0 <= Get_rank\(\) < Get_size\(\)"):
        dlfs.AllReduce(_ThreadComm({"size": 0}, 0))
    comm = _ThreadComm(_comm_group(1), 0)
    dlfs.chain(dlfs.AllReduce(comm), dlfs.ClipByGlobalNorm(1.0), dlfs.SGD())

    class Unhashable(_ThreadComm):  # like mpi4py's communicators
        __hash__ = None

    hash(dlfs.chain(dlfs.AllReduce(Unhashable(_comm_group(1), 0)), dlfs.SGD()))
    with pytest.raises(ValueError, match="AllReduce must be the first element of chain"):
        dlfs.chain(dlfs.ClipByGlobalNorm(1.0), dlfs.AllReduce(comm), dlfs.SGD())
    net = _dp_problem("mlp")[0]
    with pytest.raises(ValueError, match=r"grads\[0\] must be a tuple"):
        dlfs.AllReduce(comm)(((),) * len(net.params()), net.params())
    as_lists = [list(layer) for layer in net.params()]
    with pytest.raises(TypeError, match="params must be a tuple of per-layer tuples"):
        dlfs.AllReduce(comm)(net.params(), as_lists)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 40), size=SIZES)
def test_shard_splits_a_batch_into_contiguous_near_equal_parts(n, size):
    parts = [dlfs.shard(n, r, size) for r in range(size)]
    assert [i for s in parts for i in range(n)[s]] == list(range(n))  # in order, each row once
    assert [s.stop - s.start for s in parts] == [len(a) for a in np.array_split(np.arange(n), size)]


def test_shard_rejects_bad_input():
    with pytest.raises(ValueError, match="rank must be < size = 2, got 2"):
        dlfs.shard(5, 2, 2)
    with pytest.raises(ValueError, match="n must be >= 0, got -1"):
        dlfs.shard(-1, 0, 2)
    with pytest.raises(TypeError, match="size must be an int, got float"):
        dlfs.shard(5, 0, 2.0)


@settings(max_examples=20, deadline=None)
@given(
    size=st.integers(1, 4),
    n=st.integers(1, 24),
    batch_size=SIZES,
    kind=st.sampled_from(["mlp", "cnn"]),
    dtype=DTYPES,
)
def test_data_parallel_step_equals_train_step(size, n, batch_size, kind, dtype):
    """Any number of ranks, shards of unequal size and empty ones (batch < ranks): the
    parameters after two epochs equal train_step's on the global batches to rounding, are
    bit-identical on every rank, and each step made one Allreduce of the dtype."""
    net, x, y = _dp_problem(kind, dtype, n)
    single = _dp_train(net, x, y, batch_size=batch_size)

    def rank(comm):
        state = _dp_train(net, x, y, comm, batch_size=batch_size)
        return state, dlfs.global_mean_loss(state, comm)

    results, group = _run_ranks(size, rank)
    rtol = 1e-4 if dtype == np.float32 else 1e-12
    for state, loss in results:
        assert state.step == single.step
        assert [p.tobytes() for p in state.net._flat_params()] == [
            p.tobytes() for p in results[0][0].net._flat_params()
        ]
        assert loss == results[0][1] and abs(loss - single.mean_loss) <= rtol * single.mean_loss
    _assert_close_params(results[0][0].net, single.net, rtol)
    sent = [[b.dtype for b in bufs] for bufs in group["sent"]]
    assert sent == [[np.dtype(dtype)] * single.step + [np.dtype(np.float64)]] * size


@pytest.mark.parametrize("kind", ["dropout", "bn"])
def test_one_rank_is_train_step_bit_for_bit(kind):
    """With one rank nothing is scaled and the forward key is train_step's: Dropout masks
    and BatchNorm statistics included, the result is bit-identical."""
    net, x, y = _dp_problem(kind, np.float32)
    single = _dp_train(net, x, y)
    ((state, comm),), _ = _run_ranks(1, lambda comm: (_dp_train(net, x, y, comm), comm))
    _assert_same_net(state.net, single.net)
    synced = dlfs.sync_state(state.net, comm)  # the average over one rank: the same
    assert (synced is state.net) == (kind == "dropout")  # a new network only with state
    _assert_same_net(synced, single.net)
    assert (state.loss_sum, state.seen) == (single.loss_sum, single.seen)


def test_dropout_ranks_draw_their_own_masks():
    """Two ranks with Dropout: rank r's masks come from the key (key, step, r), so the run
    differs from one process's (documented) but is reproducible and identical on both ranks."""
    net, x, y = _dp_problem("dropout")
    runs = [_run_ranks(2, lambda comm: _dp_train(net, x, y, comm))[0] for _ in range(2)]
    for state in runs[0] + runs[1]:
        _assert_same_net(state.net, runs[0][0].net)
    single = _dp_train(net, x, y)
    assert not np.allclose(runs[0][0].net._flat_params()[0], single.net._flat_params()[0])
    # the same rows on both ranks: different masks, so different local gradients (and
    # identical ones with p = 0, so the difference is the masks)
    twice = (np.concatenate([x[:5], x[:5]]), np.concatenate([y[:5], y[:5]]))

    def first_buffers(p: float) -> list[bytes]:
        layers = list(net.layers)
        layers[2] = dlfs.Dropout(p)
        dropout_net = dlfs.Network(layers, net.loss, net.input_shape)

        def one_step(comm):
            state = dlfs.TrainState.create(dropout_net, _dp_optimizer(comm), key=7)
            return dlfs.data_parallel_step(state, twice, comm)

        return [bufs[0].tobytes() for bufs in _run_ranks(2, one_step)[1]["sent"]]

    masked, unmasked = first_buffers(0.3), first_buffers(0.0)
    assert masked[0] != masked[1] and unmasked[0] == unmasked[1]


def test_batch_norm_statistics_per_shard_and_sync_state():
    """Two ranks with BatchNorm: batch statistics are each shard's, so the parameters agree on
    both ranks (not with one process's); the running statistics differ per rank until
    sync_state averages them."""
    net, x, y = _dp_problem("bn")
    (a, b), _ = _run_ranks(2, lambda comm: _dp_train(net, x, y, comm))
    assert [p.tobytes() for p in a.net._flat_params()] == [
        p.tobytes() for p in b.net._flat_params()
    ]
    assert not np.allclose(a.net.layers[2].mean, b.net.layers[2].mean)
    synced, _ = _run_ranks(2, lambda comm: dlfs.sync_state((a, b)[comm.rank].net, comm))
    _assert_same_net(synced[0], synced[1])
    for name in ("mean", "var"):
        want = (getattr(a.net.layers[2], name) + getattr(b.net.layers[2], name)) / 2
        np.testing.assert_allclose(getattr(synced[0].layers[2], name), want, rtol=1e-15)


def test_sync_state_running_mean_equals_one_process_with_equal_shards():
    """BatchNorm on the input (statistics independent of the parameters), shards of 5 + 5:
    after sync_state the running mean is the single-process one to rounding; the running
    var is the average of the shards' unbiased variances, as sync_state documents."""
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((100, 5)) * 3 + 1, rng.integers(0, 4, 100)
    net = dlfs.network(
        3, (5,), [dlfs.batch_norm(), dlfs.dense(4)], dlfs.SoftmaxCrossEntropy(), dtype=np.float64
    )
    single = _dp_train(net, x, y, epochs=1)
    synced, _ = _run_ranks(
        2, lambda comm: dlfs.sync_state(_dp_train(net, x, y, comm, epochs=1).net, comm)
    )
    mean, var = np.zeros(5), np.ones(5)
    for xb, _ in dlfs.batches(x, y, 10, key=(5, 0)):
        halves = (xb[:5], xb[5:])
        mean = 0.9 * mean + 0.1 * sum(h.mean(axis=0) for h in halves) / 2
        var = 0.9 * var + 0.1 * sum(h.var(axis=0, ddof=1) for h in halves) / 2
    bn, one = synced[0].layers[0], single.net.layers[0]
    np.testing.assert_allclose(bn.mean, one.mean, rtol=1e-12)
    np.testing.assert_allclose(bn.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(bn.var, var, rtol=1e-12)
    assert not np.allclose(bn.var, one.var, rtol=1e-3)


def test_sync_state_averages_the_state_inside_residual_blocks():
    """A BatchNorm inside a Residual keeps running statistics too: sync_state averages
    them over the ranks as it does a top-level one's (each rank's own values differ)."""
    block = dlfs.residual([dlfs.batch_norm(), dlfs.dense(5)])
    net = dlfs.network(3, (5,), [block, dlfs.dense(4)], dlfs.SoftmaxCrossEntropy())

    def own_then_synced(comm):
        rank = comm.Get_rank()
        x = np.random.default_rng(rank).standard_normal((8, 5)).astype(np.float32) + rank
        _, _, stepped = net.forward(x, dlfs.train_context(0))
        return stepped, dlfs.sync_state(stepped, comm)

    results, _ = _run_ranks(2, own_then_synced)
    (own0, synced0), (own1, synced1) = results
    means = [own.layers[0].layers[0].mean for own in (own0, own1)]
    assert not np.array_equal(*means)
    for synced in (synced0, synced1):
        bn = synced.layers[0].layers[0]
        np.testing.assert_allclose(bn.mean, (means[0] + means[1]) / 2, rtol=1e-6)
        assert not bn.mean.flags.writeable


def test_sync_state_running_mean_is_one_process_only_before_any_batch_norm_or_dropout():
    """With lr 0 (the same parameters in both runs) and equal shards of 5 + 5: the first
    BatchNorm's synced running mean is one process's; the second one's is what
    sync_state promises instead, the ranks' average of their shards' means of its
    input as each rank computed it (after the first BatchNorm normalised each shard
    by its own statistics), and not one process's."""
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((40, 5)) * 2 + 1, rng.integers(0, 3, 40)
    layers = [dlfs.dense(6), dlfs.batch_norm(), dlfs.dense(4, dlfs.Tanh()), dlfs.batch_norm()]
    net = dlfs.network(
        3, (5,), [*layers, dlfs.dense(3)], dlfs.SoftmaxCrossEntropy(), dtype=np.float64
    )
    bns = [i for i, layer in enumerate(net.layers) if isinstance(layer, dlfs.BatchNorm)]

    def train(comm=None):
        sgd = dlfs.SGD(0.0)
        opt = sgd if comm is None else dlfs.chain(dlfs.AllReduce(comm), sgd)
        step = (
            dlfs.train_step
            if comm is None
            else functools.partial(dlfs.data_parallel_step, comm=comm)
        )
        state = functools.reduce(
            step, dlfs.batches(x, y, 10, key=1), dlfs.TrainState.create(net, opt)
        )
        return state.net if comm is None else dlfs.sync_state(state.net, comm)

    one, synced = train(), _run_ranks(2, train)[0][0]
    means = [net.layers[i].mean for i in bns]
    for xb, _ in dlfs.batches(x, y, 10, key=1):
        per_shard = []
        for h in (xb[:5], xb[5:]):
            inputs = []
            for layer in net.layers[: bns[-1] + 1]:
                inputs.append(h)
                h = layer.forward(h, dlfs.train_context(0))[0]
            per_shard.append([inputs[i].mean(axis=0) for i in bns])
        means = [0.9 * m + 0.1 * (a + b) / 2 for m, a, b in zip(means, *per_shard)]
    first, second = (synced.layers[i].mean for i in bns)
    np.testing.assert_allclose(first, one.layers[bns[0]].mean, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(first, means[0], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(second, means[1], rtol=1e-12, atol=1e-14)
    gap = np.abs(second - one.layers[bns[1]].mean).max() / np.abs(one.layers[bns[1]].mean).max()
    assert gap > 0.1  # here about 1.7: the second BatchNorm sees per-shard normalised input
    doc = " ".join(dlfs.sync_state.__doc__.split())
    assert "no BatchNorm or Dropout before it" in doc


def test_a_nan_loss_on_one_rank_stops_every_rank_at_the_same_step():
    """Only rank 1's shard (rows 5..9) holds a bad row, yet both ranks raise at step 0
    instead of rank 0 waiting in the next all-reduce: a NaN input, and a target so large
    that the MSE overflows to inf while its gradient 2 (p - y) / N stays finite (rank 1
    sends NaN gradients whenever its loss is not finite)."""
    net, x, _ = _dp_problem("mlp", n=10)
    net = dlfs.network(3, (5,), [dlfs.dense(4)], dlfs.MeanSquaredError(), dtype=np.float64)
    y = np.zeros((10, 4))
    nan_x, huge_y = x.copy(), y.copy()
    nan_x[7] = np.nan
    huge_y[8] = 1e200

    def run(comm, batch):
        state = dlfs.TrainState.create(net, _dp_optimizer(comm), key=7)
        with pytest.raises(dlfs.NonFiniteError) as err, np.errstate(over="ignore"):
            dlfs.data_parallel_step(state, batch, comm)
        return err.value

    for batch in ((nan_x, y), (x, huge_y)):
        errors, _ = _run_ranks(2, functools.partial(run, batch=batch))
        assert [e.step for e in errors] == [0, 0] and all(e.network is net for e in errors)
        assert "the loss on rank 1 became NaN/inf at step 0" in str(errors[1])
        assert "a gradient or parameter became NaN/inf at step 0" in str(errors[0])


def test_data_parallel_step_rejects_bad_input():
    net, x, y = _dp_problem("mlp", n=10)
    comm = _ThreadComm(_comm_group(1), 0)
    plain = dlfs.TrainState.create(net, dlfs.SGD(), key=0)
    with pytest.raises(ValueError, match=r"optimizer must be dlfs.chain\(dlfs.AllReduce\(comm\)"):
        dlfs.data_parallel_step(plain, (x, y), comm)
    other = dlfs.TrainState.create(net, _dp_optimizer(_ThreadComm(_comm_group(1), 0)))
    with pytest.raises(ValueError, match="with the comm given here"):
        dlfs.data_parallel_step(other, (x, y), comm)
    state = dlfs.TrainState.create(net, _dp_optimizer(comm))
    with pytest.raises(TypeError, match="comm must be an MPI communicator"):
        dlfs.data_parallel_step(state, (x, y), None)
    with pytest.raises(TypeError, match="batch must be a pair"):
        dlfs.data_parallel_step(state, x, comm)
    with pytest.raises(TypeError, match=r"state must be a dlfs\.TrainState"):
        dlfs.data_parallel_step(net, (x, y), comm)
    with pytest.raises(ValueError, match="same length"):
        dlfs.data_parallel_step(state, (x, y[:5]), comm)
    with pytest.raises(TypeError, match=r"net must be a dlfs\.Network"):
        dlfs.sync_state(state, comm)
    with pytest.raises(TypeError, match=r"state must be a dlfs\.TrainState"):
        dlfs.global_mean_loss(net, comm)
    assert comm.group["sent"] == [[]]  # every check came before any Allreduce
    assert math.isnan(dlfs.global_mean_loss(state, comm))
    assert dlfs.sync_state(net, comm) is net  # no state to average: no Allreduce
    assert [[b.dtype for b in bufs] for bufs in comm.group["sent"]] == [[np.float64]]


def test_steps_given_a_network_instead_of_a_train_state_say_how_to_make_one():
    net, x, y = _dp_problem("mlp", n=10)
    comm = _ThreadComm(_comm_group(1), 0)
    calls = {
        "train_step": lambda s: dlfs.train_step(s, (x, y)),
        "train_epoch": lambda s: dlfs.train_epoch(s, [(x, y)]),
        "data_parallel_step": lambda s: dlfs.data_parallel_step(s, (x, y), comm),
        "global_mean_loss": lambda s: dlfs.global_mean_loss(s, comm),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError) as err:
            call(net)
        assert str(err.value) == (
            "state must be a dlfs.TrainState, got Network: make one with "
            "dlfs.TrainState.create(net, optimizer)"
        ), name
        with pytest.raises(TypeError, match=r"^state must be a dlfs\.TrainState, got tuple$"):
            call((net, dlfs.SGD()))
    assert comm.group["sent"] == [[]]
    with pytest.raises(TypeError, match=r"^state must be a dlfs\.TrainState"):  # before comm
        dlfs.data_parallel_step(net, (x, y), "not a comm")


@pytest.mark.parametrize("size", [1, 2, 3])
def test_fit_with_comm_equals_fit_on_every_rank(size):
    """fit(..., comm=) on 1-3 ranks: every rank returns the same network and history,
    equal to one process's to float64 rounding (bit for bit with one rank, Dropout
    included), early stopping at the same epoch.  Collectives: per step the gradients and
    the stop flag; per epoch the training loss, rank 0's validation figures and the stops."""
    net, x, y = _dp_problem("dropout" if size == 1 else "mlp", n=45)
    validation = (x[:9], (y[:9] + 3) % 4)  # labels the network does not learn: it stops early
    kw = dict(epochs=6, batch_size=8, seed=3, validation=validation, patience=2)
    single, h_single = dlfs.fit(net, dlfs.Adam(0.01), x, y, **kw)
    assert h_single.stopped_early and h_single.epochs == [1, 2, 3]
    results, group = _fit_on_ranks(size, net, x, y, **kw)
    _assert_ranks_agree(results)
    got, h = results[0]
    assert (h.epochs, h.best_epoch, h.stop_reason) == ([1, 2, 3], 1, "early_stopping")
    if size == 1:
        _assert_same_net(got, single)
        assert h == h_single
    else:
        _assert_close_params(got, single, 1e-12)
        for name in ("train_loss", "val_loss"):
            np.testing.assert_allclose(getattr(h, name), getattr(h_single, name), rtol=1e-12)
    steps, epochs = h.steps, len(h.epochs)
    assert steps == 18 and [len(sent) for sent in group["sent"]] == [2 * steps + 3 * epochs] * size


def test_fit_with_comm_rank_0_alone_talks_writes_and_calls_back(tmp_path, monkeypatch, capsys):
    """Three ranks: one progress bar, one line per epoch, the callback once per epoch and
    each checkpoint written once, by one thread; the checkpoint keeps every rank's running
    loss of the epoch (40 rows in batches of 8: shards of 3, 3 and 2 rows)."""
    net, x, y = _dp_problem("mlp", n=40)
    bars, records, writers = [], [], []
    real_write = dlfs._write_npz

    def write(file, arrays):
        writers.append(threading.current_thread())
        real_write(file, arrays)

    monkeypatch.setattr(dlfs, "_write_npz", write)
    path = tmp_path / "run.npz"
    kw = dict(epochs=2, batch_size=8, seed=3, verbose=True, progress=_bar_factory(bars))
    results, _ = _fit_on_ranks(
        3, net, x, y, dlfs.SGD(0.1), checkpoint=path, callback=records.append, **kw
    )
    _assert_ranks_agree(results)
    out = capsys.readouterr().out
    assert re.findall(r"^epoch (\d):", out, re.M) == ["1", "2"]
    assert [(b.total, b.n) for b in bars] == [(10, 10)]
    assert records == list(results[0][1].records)
    assert len(writers) == 2 and writers[0] is writers[1]
    saved = dlfs.load(path).meta["dlfs.fit"]
    assert (saved["ranks"], saved["seen"], len(saved["loss_sum"])) == (3, [15, 15, 10], 3)
    assert os.listdir(tmp_path) == ["run.npz"]


def test_fit_with_comm_interrupt_stops_every_rank_and_resumes_bit_identically(tmp_path):
    """A KeyboardInterrupt in rank 0's bar after step 7 (mid-epoch 2): both ranks stop
    after that same step, rank 0 saves, and a two-rank resume equals an uninterrupted
    two-rank run bit for bit (Dropout keys per rank and step; each rank's running loss)."""
    net, x, y = _dp_problem("dropout", n=40)
    kw = dict(epochs=3, batch_size=8, seed=3, validation=(x[:8], y[:8]))
    straight, _ = _fit_on_ranks(2, net, x, y, **kw)
    path = tmp_path / "run.npz"
    with pytest.warns(UserWarning, match="in epoch 2 after step 2 of 5") as caught:
        parts, _ = _fit_on_ranks(2, net, x, y, progress=_bar_factory(at=7), checkpoint=path, **kw)
    assert len(caught) == 1  # rank 0's
    _assert_ranks_agree(parts)
    assert parts[0][1].interrupted and parts[0][1].steps == 7 and parts[0][1].epochs == [1]
    saved = dlfs.load(path)
    assert (saved.meta["dlfs.fit"]["step"], saved.meta["dlfs.fit"]["seen"]) == (7, [8, 8])
    _assert_same_net(saved.net, parts[0][0])
    resumed, _ = _fit_on_ranks(2, net, x, y, resume=path, **kw)
    for (got, h), (want, h_want) in zip(resumed, straight):
        _assert_same_net(got, want)
        assert h == h_want


def test_fit_with_comm_stops_from_rank_0_reach_every_rank():
    """Rank 0's callback (False, StopTraining, KeyboardInterrupt) and an interrupted
    evaluation (its metric runs on rank 0 only) end training on both ranks alike."""
    net, x, y = _dp_problem("mlp", n=40)
    kw = dict(epochs=4, batch_size=8, seed=3)

    def stop_at_2(record):
        return record.epoch != 2

    def raise_at_2(record):
        if record.epoch == 2:
            raise dlfs.StopTraining

    for callback in (stop_at_2, raise_at_2):
        results, _ = _fit_on_ranks(2, net, x, y, callback=callback, **kw)
        _assert_ranks_agree(results)
        assert results[0][1].stop_reason == "callback" and results[0][1].epochs == [1, 2]

    def interrupt_at_2(record):
        if record.epoch == 2:
            raise KeyboardInterrupt

    with pytest.warns(UserWarning, match="interrupted after epoch 2"):
        results, _ = _fit_on_ranks(2, net, x, y, callback=interrupt_at_2, **kw)
    _assert_ranks_agree(results)
    assert results[0][1].interrupted and results[0][1].epochs == [1, 2]
    calls = []

    def metric(pred, target):
        calls.append(threading.current_thread())
        if len(calls) == 2:
            raise KeyboardInterrupt
        return dlfs.accuracy(pred, target)

    validation = (x[:8], y[:8])
    with pytest.warns(UserWarning, match="after the last step of epoch 2, before its record"):
        results, _ = _fit_on_ranks(2, net, x, y, validation=validation, metric=metric, **kw)
    _assert_ranks_agree(results)
    assert results[0][1].epochs == [1] and results[0][1].steps == 10
    assert calls[0] is calls[1]  # one rank evaluates


def test_fit_with_comm_averages_batch_norm_statistics_every_epoch():
    """BatchNorm: fit averages the ranks' running statistics after each epoch (sync_state),
    so both ranks return the same network: the one the public pieces give."""
    net, x, y = _dp_problem("bn", n=40)
    results, _ = _fit_on_ranks(2, net, x, y, epochs=2, batch_size=8, seed=3)
    _assert_ranks_agree(results)

    def by_hand(comm):
        shuffle_key, step_key = dlfs.split(3, 2)  # as fit derives its keys
        optimizer = dlfs.chain(dlfs.AllReduce(comm), dlfs.Adam(0.01))
        state = dlfs.TrainState.create(net, optimizer, step_key)
        step = functools.partial(dlfs.data_parallel_step, comm=comm)
        for epoch in (1, 2):
            state = functools.reduce(step, dlfs.batches(x, y, 8, key=shuffle_key + (epoch,)), state)
            state = attrs.evolve(state, net=dlfs.sync_state(state.net, comm))
        return state.net

    want, _ = _run_ranks(2, by_hand)
    _assert_same_net(results[0][0], want[0])
    assert not np.array_equal(want[0].layers[2].mean, net.layers[2].mean)  # it trained


def test_data_parallel_batch_norm_one_row_shards_are_refused_before_the_first_step():
    # 50 rows in batches of 16 on 2 ranks: the last batch of 2 gives each rank 1 row;
    # every rank refuses before training, as one process refuses a batch of 1
    net, x, y = _dp_problem("bn", n=50)
    calls = []
    with pytest.raises(ValueError) as err:
        _fit_on_ranks(2, net, x, y, epochs=1, batch_size=16, callback=calls.append)
    assert calls == [] and str(err.value) == (
        "layers[2] (BatchNorm) must see at least 2 rows in each training batch on every rank, "
        "but 50 rows in batches of 16 leave a batch of 2, whose shards on 2 ranks have as few "
        "as 1: pass drop_last=True to fit (it skips that batch), or pick another batch_size"
    )
    with pytest.raises(
        ValueError,
        match=r"16 rows in batches of 3 leave a batch of 1, whose .*"
        r"3 ranks have as few as 1: use batch_size >= 6",
    ):
        _fit_on_ranks(3, net, x[:16], y[:16], epochs=1, batch_size=3)
    for size, batch_size in ((2, 17), (3, 8)):  # last batches of 16 and 2: shards of >= 2 rows
        results, _ = _fit_on_ranks(
            size, net, x, y, epochs=1, batch_size=batch_size, drop_last=size == 3
        )
        _assert_ranks_agree(results)

    # data_parallel_step alone: a batch of 3 on 2 ranks (shards of 2 and 1) fails on both
    # ranks before the all-reduce, instead of rank 0 waiting there for rank 1
    def step(comm):
        state = dlfs.TrainState.create(net, _dp_optimizer(comm), key=7)
        with pytest.raises(
            ValueError,
            match=r"layers\[2\] \(BatchNorm\) must see at least 2 rows "
            r"on every rank, but a batch of 3 on 2 ranks has shards of 1: use "
            r"batches of at least 4 rows",
        ):
            dlfs.data_parallel_step(state, (x[:3], y[:3]), comm)
        return comm.group["sent"]

    sent, _ = _run_ranks(2, step)
    assert sent[0] == [[], []]
    # a BatchNorm after a convolution sees H*W values per channel: one-row shards train
    cnn = dlfs.network(
        0, (1, 3, 3), [dlfs.conv2d(2, 2), dlfs.batch_norm(), dlfs.Flatten(), dlfs.dense(1)],
        dlfs.MeanSquaredError(), dtype=np.float64,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    xi, yi = rng.random((5, 1, 3, 3)), rng.random((5, 1))
    _assert_ranks_agree(_fit_on_ranks(2, cnn, xi, yi, epochs=1, batch_size=4)[0])


def test_fit_with_comm_checks_its_optimizer_comm_and_rank_count(tmp_path):
    """fit puts AllReduce(comm) first (a plain optimizer or a chain without it give the
    same run as with it), refuses an AllReduce of another comm or without comm, a bad
    comm, and a resume with another rank count."""
    net, x, y = _dp_problem("mlp", n=24)
    kw = dict(epochs=1, batch_size=8, seed=3)
    clip_adam = (dlfs.ClipByGlobalNorm(2.0), dlfs.Adam(0.02))
    runs = [
        _run_ranks(2, lambda comm, make=make: dlfs.fit(net, make(comm), x, y, comm=comm, **kw))[0]
        for make in (
            lambda comm: dlfs.chain(*clip_adam),
            lambda comm: dlfs.chain(dlfs.AllReduce(comm), *clip_adam),
        )
    ]
    _assert_same_net(runs[0][0][0], runs[1][0][0])
    comm, other = (_ThreadComm(_comm_group(1), 0) for _ in range(2))
    with pytest.raises(ValueError, match=r"optimizer must be dlfs.chain\(dlfs.AllReduce\(comm\)"):
        dlfs.fit(net, dlfs.chain(dlfs.AllReduce(other), dlfs.SGD()), x, y, comm=comm, **kw)
    with pytest.raises(ValueError, match=r"AllReduce.*but fit got no comm"):
        dlfs.fit(net, dlfs.chain(dlfs.AllReduce(comm), dlfs.SGD()), x, y, **kw)
    with pytest.raises(TypeError, match="comm must be an MPI communicator"):
        dlfs.fit(net, dlfs.SGD(), x, y, comm=object(), **kw)
    with pytest.raises(TypeError, match="optimizer must have init/update"):
        dlfs.fit(net, dlfs.SGD, x, y, comm=comm, **kw)
    path = tmp_path / "run.npz"
    _fit_on_ranks(2, net, x, y, checkpoint=path, **kw)
    with pytest.raises(ValueError, match="trained with ranks=2, this call has ranks=1"):
        dlfs.fit(net, dlfs.Adam(0.01), x, y, resume=path, epochs=2, batch_size=8, seed=3)
    with pytest.raises(ValueError, match="trained with ranks=2, this call has ranks=3"):
        _fit_on_ranks(3, net, x, y, resume=path, epochs=2, batch_size=8, seed=3)


def test_fit_with_comm_an_error_in_rank_0s_work_raises_on_every_rank(tmp_path, monkeypatch):
    """A failing checkpoint write, metric or callback on rank 0 raises there and, as a
    RuntimeError naming it, on the other ranks, instead of leaving them in an all-reduce."""
    net, x, y = _dp_problem("mlp", n=16)

    def no_disk(file, arrays):
        raise OSError("disk full")

    def bad_metric(pred, target):
        raise ValueError("bad metric")

    def bad_callback(record):
        raise ValueError("bad callback")

    cases = [
        ({"checkpoint": tmp_path / "run.npz"}, OSError, "writing the checkpoint"),
        ({"validation": (x, y), "metric": bad_metric}, ValueError, "the evaluation"),
        ({"callback": bad_callback}, ValueError, "the callback"),
    ]
    monkeypatch.setattr(dlfs, "_write_npz", no_disk)
    for extra, error, what in cases:

        def rank(comm, extra=extra):
            with pytest.raises(Exception) as err:
                dlfs.fit(net, dlfs.SGD(0.1), x, y, epochs=2, batch_size=8, comm=comm, **extra)
            return err.value

        errors, _ = _run_ranks(2, rank)
        assert type(errors[0]) is error
        assert isinstance(errors[1], RuntimeError) and f"{what}" in str(errors[1])
        assert "failed on rank 0" in str(errors[1])


def test_fit_with_comm_records_sigint_and_stops_after_the_step(monkeypatch, python_sigint):
    """In the main thread under a comm, SIGINT (what mpiexec forwards on Ctrl-C) raises
    nothing mid-step: fit records it and stops after the step, then restores the
    handler; a second SIGINT raises KeyboardInterrupt, which ends fit (it aborts)."""
    net, x, y = _dp_problem("mlp", n=40)
    comm = _ThreadComm(_comm_group(1), 0)
    kw = dict(epochs=3, batch_size=8, seed=3, comm=comm)
    real_step, signals = dlfs.data_parallel_step, []

    def step(state, batch, comm):
        for _ in range(signals[0] if state.step == 6 else 0):
            signal.raise_signal(signal.SIGINT)  # Ctrl-C while the step runs
        return real_step(state, batch, comm)

    monkeypatch.setattr(dlfs, "data_parallel_step", step)
    before = signal.getsignal(signal.SIGINT)
    signals.append(1)
    with pytest.warns(UserWarning, match="in epoch 2 after step 2 of 5"):
        got, history = dlfs.fit(net, dlfs.Adam(0.01), x, y, **kw)
    assert history.interrupted and history.steps == 7
    assert signal.getsignal(signal.SIGINT) is before
    signals[0] = 2
    with pytest.raises(KeyboardInterrupt):
        dlfs.fit(net, dlfs.Adam(0.01), x, y, **kw)
    assert signal.getsignal(signal.SIGINT) is before
    monkeypatch.undo()
    short, _ = dlfs.fit(net, dlfs.Adam(0.01), x, y, epochs=3, batch_size=8, seed=3)
    assert not np.array_equal(got.layers[0].w, short.layers[0].w)  # it did stop early


# ---- Dask: pickled and copied records stay read-only; sweeps equal a plain loop


@pytest.mark.parametrize("name", [*LAYER_CASES, "Conv2D", "MaxPool2D", "AvgPool2D"])
@settings(max_examples=10, deadline=None)
@given(seed=SEEDS, n=SIZES, d=SIZES, dtype=DTYPES)
def test_pickled_and_deep_copied_layers_keep_read_only_arrays(name, seed, n, d, dtype):
    layer = _any_layer(name, seed, n, d, dtype)
    for got in _pickle_copies(layer):
        assert type(got) is type(layer) and _record_config(got) == _record_config(layer)
        arrays = _arrays(got)
        assert len(arrays) == len(_arrays(layer))
        for a, b in zip(arrays, _arrays(layer)):
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
            assert not a.flags.writeable
        assert not hasattr(got, "__dict__")  # still a slotted record


def test_records_with_array_fields_are_array_records():
    """A guard for new layers: every savable layer (and OptState) whose fields hold arrays
    derives from dlfs._ArrayRecord, which keeps them read-only through pickle."""
    for cls in (*dlfs._SAVABLE_LAYERS, dlfs.OptState):
        types = [str(f.type) for f in attrs.fields(cls)]
        holds_arrays = any("ndarray" in t or "NetParams" in t for t in types)
        holds_arrays |= cls in dlfs._CHAINS  # layers of arrays
        assert holds_arrays == issubclass(cls, dlfs._ArrayRecord), cls.__name__


def test_pickled_records_keep_read_only_arrays(tmp_path):
    """A trained TrainState (BatchNorm, Dropout, Adam moments), a CNN, a fit checkpoint
    with its best network, and a History come back equal, every array read-only."""
    net, opt, opt_state = _trust_trained()
    state = dlfs.TrainState(net, opt, opt_state, (3,), 2, 1.5, 12)
    for got in _pickle_copies(state):
        _assert_same_net(got.net, state.net)
        _trust_assert_same_opt_state(got.opt_state, state.opt_state)
        leaves = [a for tree in got.opt_state.slots for layer in tree for a in layer]
        assert leaves and not any(a.flags.writeable for a in leaves)
        assert (got.key, got.step, got.loss_sum, got.seen) == ((3,), 2, 1.5, 12)
    cnn = _dp_problem("cnn", np.float32)[0]
    for got in _pickle_copies(cnn):
        _assert_same_net(got, cnn)
    x, y = _trust_fit_data()
    path = tmp_path / "run.npz"
    validation = (x, (y + 1) % 3)  # the best network is epoch 1's, saved beside the last
    _, history = dlfs.fit(
        _i11_net(), opt, x, y, epochs=2, validation=validation, checkpoint=path, **_I11_KW
    )
    ckpt = dlfs.load(path)
    assert history.best_epoch == 1 and ckpt.best is not None
    for got in _pickle_copies(ckpt):
        _assert_same_net(got.net, ckpt.net)
        _assert_same_net(got.best, ckpt.best)
        _trust_assert_same_opt_state(got.opt_state, ckpt.opt_state)
        assert got.meta == ckpt.meta
    assert all(got == history for got in _pickle_copies(history))


def test_boston_seeds_on_dask_equal_the_sequential_run(monkeypatch, tmp_path):
    """Three seeds as tasks on a LocalCluster of 2 worker processes: every MAE, RMSE,
    network and history is bit-identical to the sequential run's, and so is the CSV."""
    pytest.importorskip("dask.distributed", reason="needs Dask: pip install -e '.[distributed]'")
    pytest.importorskip("tqdm", reason="needs tqdm: pip install -e '.[distributed]'")
    boston = _example("boston", monkeypatch)
    data = _boston_without_sklearn(boston)
    seeds = range(5, 8)
    sequential = boston.run_seeds(data, seeds, 4)
    parallel = boston.run_seeds(data, seeds, 4, workers=2)
    assert len(parallel) == len(sequential) == 3
    for one, other in zip(sequential, parallel):
        assert list(one) == list(other) == list(boston.BOOK)
        for name in boston.BOOK:
            assert one[name][:2] == other[name][:2]  # MAE, RMSE: the same floats
            _assert_same_net(other[name][2], one[name][2])  # read-only after Dask's pickle too
            assert one[name][3] == other[name][3]
    for name, runs in (("seq.csv", sequential), ("dask.csv", parallel)):
        boston.write_runs(tmp_path / name, seeds, runs)
    assert (tmp_path / "seq.csv").read_bytes() == (tmp_path / "dask.csv").read_bytes()
    rows = (tmp_path / "seq.csv").read_text().splitlines()
    assert rows[0] == "seed,model,mae,rmse,best_epoch" and len(rows) == 1 + 3 * 3
    assert rows[1].startswith(f"5,linear,{sequential[0]['linear'][0]!r},")


# ------------ metrics: formulas, accuracy, binary accuracy, confusion matrix


def test_metrics_match_formulas():
    rng = np.random.default_rng(9)
    p, t = rng.standard_normal((2, 10, 2))
    assert dlfs.mae(p, t) == pytest.approx(np.mean(np.abs(p - t)), rel=1e-14)
    assert dlfs.rmse(p, t) == pytest.approx(np.sqrt(np.mean((p - t) ** 2)), rel=1e-14)
    scores = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    labels = np.array([1, 0, 0, 0])
    assert dlfs.accuracy(scores, labels) == 0.75
    assert dlfs.accuracy(scores, np.eye(2)[labels]) == 0.75
    logits = np.array([[2.0], [-1.0], [0.5]])
    assert dlfs.accuracy(logits, np.array([[1.0], [1.0], [1.0]])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="target must have the same shape"):
        dlfs.mae(p, t[:, :1])
    with pytest.raises(ValueError, match="target must have the same shape"):
        dlfs.rmse(p[:, 0], t)
    with pytest.raises(ValueError, match="target must have shape"):
        dlfs.accuracy(scores, labels[:3])
    with pytest.raises(ValueError, match="labels must be in"):
        dlfs.accuracy(scores, np.array([0, 1, 2, 0]))
    with pytest.raises(TypeError, match="pred must be a float"):
        dlfs.mae(p.astype(int), t.astype(int))


def test_binary_accuracy_is_elementwise_for_multilabel_bce():
    logits = np.array([[2.0, -1.0, 0.5], [-0.5, 1.0, -2.0]])
    target = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    assert dlfs.binary_accuracy(logits, target) == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="target must have shape"):
        dlfs.binary_accuracy(logits, target[:, :2])
    # fit's default metric for BCE is the elementwise one, not an argmax over labels
    net = dlfs.network(0, 3, [dlfs.dense(3)], dlfs.BinaryCrossEntropy(), dtype=np.float64)
    x = dlfs.make_rng(2).standard_normal((8, 3))
    y = (x > 0).astype(np.float64)
    trained, history = dlfs.fit(net, dlfs.SGD(0.1), x, y, epochs=1, validation=(x, y))
    expected = dlfs.binary_accuracy(trained.predict(x), y)
    assert history.val_metric[-1] == pytest.approx(expected)


def test_accuracy_rejects_one_hot_of_the_wrong_width():
    scores = np.zeros((4, 5))
    with pytest.raises(ValueError, match="one-hot target must have shape"):
        dlfs.accuracy(scores, np.eye(3)[[0, 1, 2, 0]])


def test_confusion_matrix():
    labels = np.array([0, 1, 2, 2, 1, 0, 2])
    pred = np.array([0, 2, 2, 2, 1, 1, 0])
    want = np.zeros((3, 3), np.int64)
    for t, p in zip(labels, pred):
        want[t, p] += 1
    got = dlfs.confusion_matrix(labels, pred)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(dlfs.confusion_matrix(y_true=labels, y_pred=pred), want)
    scores = np.eye(4, dtype=np.float32)[pred]  # K = 4 from the scores
    np.testing.assert_array_equal(dlfs.confusion_matrix(labels, scores)[:3, :3], want)
    assert dlfs.confusion_matrix(labels, scores).shape == (4, 4)
    assert dlfs.confusion_matrix(labels, pred.astype(np.uint8), n_classes=5).shape == (5, 5)
    for args, exc, words in [
        ((labels, pred, 2), ValueError, r"n_classes must be at least 3"),
        ((labels, scores, 5), ValueError, "match the scores' K=4"),
        ((labels, pred.astype(float)), TypeError, r"y_pred must be integer class ids"),
        ((labels, scores[:, :1]), TypeError, r"predict_classes"),
        ((labels[:3], pred), ValueError, r"y_true must be integer labels of shape \(7,\)"),
        ((labels.astype(float), pred), TypeError, "y_true must be integer"),
        ((labels, pred - 1), ValueError, ">= 0"),
        ((labels, pred.tolist()), TypeError, "y_pred must be a numpy array"),
        ((labels[:0], pred[:0]), ValueError, "y_true must not be empty"),
    ]:
        with pytest.raises(exc, match=words):
            dlfs.confusion_matrix(*args)


def test_confusion_matrix_takes_scikit_learns_order():
    # rows are the true class, as sklearn.metrics.confusion_matrix(y_true, y_pred)
    y_true, y_pred = np.array([0, 0, 0, 1]), np.array([0, 1, 1, 1])
    np.testing.assert_array_equal(dlfs.confusion_matrix(y_true, y_pred), [[1, 2], [0, 1]])
    scores = np.eye(2, dtype=np.float32)[y_pred]
    with pytest.raises(TypeError, match=r"\(y_true, y_pred\), true labels first"):
        dlfs.confusion_matrix(scores, y_true)  # the old (pred, labels) order


def test_accuracy_of_sequences_needs_an_array_of_targets():
    """Sequence scores (N, T, K) with a list of labels: a TypeError naming target."""
    scores = np.zeros((2, 3, 4))
    with pytest.raises(TypeError, match=r"^target must be a numpy array"):
        dlfs.accuracy(scores, [[0, 1, 2], [3, 2, 1]])


def test_load_refuses_a_member_more_than_64_kib_beyond_its_array(tmp_path):
    """An .npy member may hold its array plus a header of at most 64 KiB: one with 70,000
    bytes more is refused by its size before it is read (a loader that allowed more
    would read whatever a crafted file put there)."""
    import zipfile

    path, bad = tmp_path / "net.npz", tmp_path / "bad.npz"
    dlfs.save(path, dlfs.network(0, 3, [dlfs.dense(2)], dlfs.MeanSquaredError()))
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith(".w.npy"):
                data += b"\0" * 70_000
            dst.writestr(info, data)
    with pytest.raises(ValueError, match=r"holds \d+ bytes, expected \d+ plus a header"):
        dlfs.load(bad)


def test_the_malloc_block_stays_under_glibcs_32_mib_ceiling():
    """malloc raises its mmap threshold only to a freed block of at most 32 MiB, header
    and page rounding included: the block dlfs frees at import must stay below that,
    and be large enough to cover a step's arrays (see the comment at _MALLOC_KEEP)."""
    assert dlfs._MALLOC_KEEP >= 16 << 20 and dlfs._MALLOC_KEEP + 4096 + 16 <= 32 << 20


@pytest.mark.parametrize("dtype", ["<U1", "S1", "complex128", "datetime64[D]", "object"])
def test_accuracy_refuses_non_numeric_targets(dtype):
    scores = np.array([[2.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    one_hot = np.array([[1, 0, 0], [0, 1, 0]]).astype(dtype)
    labels = np.array([0, 1]).astype(dtype)
    with pytest.raises(TypeError, match="target must be"):
        dlfs.accuracy(scores, one_hot)
    with pytest.raises(TypeError, match="target must be"):
        dlfs.accuracy(scores, labels)
    with pytest.raises(TypeError, match="target must be"):
        dlfs.binary_accuracy(scores[:, 0], labels)
    with pytest.raises(TypeError, match="target must be"):
        dlfs.accuracy(scores[:, :1], labels[:, None])
    with pytest.raises(TypeError, match="y_true must be integer labels, got dtype"):
        dlfs.confusion_matrix(labels, scores)
    assert dlfs.accuracy(scores, np.array([[1, 0, 0], [0, 1, 0]], bool)) == 1.0


def test_metric_edge_cases():
    with pytest.raises(ValueError, match=r"pred must have shape \(N, K\)"):
        dlfs.accuracy(np.zeros((4, 3, 2, 2)), np.zeros(4, np.int64))
    # a target of exactly 0.5 is label 0 (t > 0.5 is label 1), like a logit of exactly 0
    assert dlfs.binary_accuracy(np.array([-1.0, 0.0]), np.array([0.5, 0.0])) == 1.0
    assert dlfs.binary_accuracy(np.array([1.0]), np.array([0.5])) == 0.0


def test_confusion_matrix_class_count_edges():
    pred, labels = np.array([0, 0, 1]), np.array([0, 2, 1])  # the largest id is a label
    np.testing.assert_array_equal(
        dlfs.confusion_matrix(labels, pred), [[1, 0, 0], [0, 1, 0], [1, 0, 0]]
    )
    assert dlfs.confusion_matrix(labels, pred, n_classes=3).shape == (3, 3)  # exactly enough
    with pytest.raises(ValueError, match="n_classes must be at least 3"):
        dlfs.confusion_matrix(labels, pred, n_classes=2)


# -------------------------- data utilities: to_2d, one_hot, permute, batches


def test_to_2d_and_one_hot():
    a = np.arange(4.0)
    assert dlfs.to_2d(a).shape == (4, 1) and dlfs.to_2d(a, "row").shape == (1, 4)
    np.testing.assert_array_equal(dlfs.to_2d(a)[:, 0], a)
    with pytest.raises(ValueError, match="a must be 1-D"):
        dlfs.to_2d(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="kind"):
        dlfs.to_2d(a, "column")
    oh = dlfs.one_hot(np.array([2, 0, 1]), 3)
    np.testing.assert_array_equal(oh, np.eye(3, dtype=np.float32)[[2, 0, 1]])
    assert oh.dtype == np.float32
    assert dlfs.one_hot(np.array([1]), 2, np.float64).dtype == np.float64
    with pytest.raises(ValueError, match="labels must be in"):
        dlfs.one_hot(np.array([0, 3]), 3)
    with pytest.raises(TypeError, match="labels must be an integer"):
        dlfs.one_hot(np.array([0.0, 1.0]), 3)
    with pytest.raises(ValueError, match="labels must be 1-D"):
        dlfs.one_hot(np.zeros((2, 2), np.int64), 3)
    with pytest.raises(ValueError, match="n_classes"):
        dlfs.one_hot(np.array([0]), 0)


@settings(max_examples=20, deadline=None)
@given(seed=SEEDS, n=st.integers(1, 40), bs=st.integers(1, 12))
def test_permute_and_batches(seed, n, bs):
    x = np.arange(n * 2, dtype=np.float64).reshape(n, 2)
    y = np.arange(n)
    px, py = dlfs.permute(seed, x, y)
    np.testing.assert_array_equal(px[:, 0], 2 * py)  # pairs stay aligned
    assert sorted(py.tolist()) == list(range(n))
    qx, _ = dlfs.permute(seed, x, y)
    np.testing.assert_array_equal(px, qx)
    np.testing.assert_array_equal(x, np.arange(n * 2.0).reshape(n, 2))
    for key in (None, seed):
        got = list(dlfs.batches(x, y, bs, key=key))
        sizes = [len(b[1]) for b in got]
        assert len(got) == -(-n // bs)
        assert all(s == bs for s in sizes[:-1]) and 1 <= sizes[-1] <= bs
        rows = np.concatenate([b[1] for b in got])
        assert sorted(rows.tolist()) == list(range(n))
        for bx, by in got:
            np.testing.assert_array_equal(bx[:, 0], 2 * by)
        if key is None:
            np.testing.assert_array_equal(rows, y)


def test_permute_depends_on_key_and_validates():
    x = np.arange(100)
    assert not np.array_equal(dlfs.permute(1, x)[0], dlfs.permute(2, x)[0])
    with pytest.raises(ValueError, match="first dimension"):
        dlfs.permute(0, np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="at least one array"):
        dlfs.permute(0)
    with pytest.raises(ValueError, match="batch_size"):
        list(dlfs.batches(np.zeros((3, 1)), np.zeros(3), 0))
    with pytest.raises(ValueError, match="same length"):
        dlfs.batches(np.zeros((3, 1)), np.zeros(4), 2)
    with pytest.raises(ValueError, match="same length"):
        dlfs.batches(np.zeros((3, 1)), np.array(1.0), 2)  # 0-d y
    with pytest.raises(TypeError, match="key"):
        dlfs.make_rng(-1)


def test_drop_last_skips_the_short_batch_in_batches_and_fit():
    x, y = _regression(n=10)
    sizes = [len(b[0]) for b in dlfs.batches(x, y, 4, key=1, drop_last=True)]
    assert sizes == [4, 4]
    assert [len(b[0]) for b in dlfs.batches(x, y, 4, drop_last=False)] == [4, 4, 2]
    with pytest.raises(TypeError, match="drop_last must be a bool"):
        dlfs.batches(x, y, 4, drop_last=1)
    bn = dlfs.network(
        0, 3, [dlfs.dense(4), dlfs.batch_norm(), dlfs.dense(1)], dlfs.MeanSquaredError()
    )
    x9, y9 = _regression(n=9)
    with pytest.raises(ValueError, match="leave a batch of 1: pass drop_last=True"):
        dlfs.fit(bn, dlfs.SGD(0.01), x9, y9, epochs=2, batch_size=4)
    _, h = dlfs.fit(bn, dlfs.SGD(0.01), x9, y9, epochs=2, batch_size=4, drop_last=True)
    assert h.steps == 4
    with pytest.raises(ValueError, match="leaves no full batch"):
        dlfs.fit(bn, dlfs.SGD(0.01), x9, y9, epochs=1, batch_size=16, drop_last=True)
    # a BatchNorm after a convolution sees H*W values per channel: one row is enough
    conv = dlfs.network(
        0, (1, 3, 3), [dlfs.conv2d(2, 2), dlfs.batch_norm(), dlfs.Flatten(), dlfs.dense(1)], bn.loss
    )
    rng = np.random.default_rng(0)
    xi, yi = rng.random((5, 1, 3, 3), dtype=np.float32), rng.random((5, 1), dtype=np.float32)
    assert dlfs.fit(conv, dlfs.SGD(0.01), xi, yi, epochs=1, batch_size=4)[1].steps == 2


def test_batches_checks_x():
    y = np.arange(5)
    got = list(dlfs.batches(np.arange(5.0), y, 2))
    assert [b[0].tolist() for b in got] == [[0.0, 1.0], [2.0, 3.0], [4.0]]
    with pytest.raises(ValueError, match="x must have a batch axis"):
        dlfs.batches(np.zeros(()), y, 2)
    with pytest.raises(TypeError, match="x must be a numpy array"):
        dlfs.batches([1.0, 2.0], y[:2], 2)


# ------------------ load_mnist: download, checksum, cache, IDX and npz files


def test_mnist_download_parse_checksum_and_cache_reuse(_mnist_server, tmp_path):
    _, _, requests, publish = _mnist_server
    arrays = _mnist_arrays()
    md5 = publish(arrays)
    cache = tmp_path / "cache"
    _mnist_equal(dlfs.load_mnist(cache_dir=cache), arrays)
    assert sorted(requests) == sorted(f"/mnist/{n}" for n in md5)
    assert sorted(p.name for p in cache.iterdir()) == sorted(md5)  # no temp files left
    _mnist_equal(dlfs.load_mnist(None, cache_dir=str(cache), flatten=True), arrays, flatten=True)
    assert len(requests) == 4  # second call: all from the cache


def test_mnist_cache_dir_from_env_then_home(_mnist_server, tmp_path, monkeypatch):
    _, _, _, publish = _mnist_server
    publish(_mnist_arrays(1))
    monkeypatch.setenv("DLFS_DATA", str(tmp_path / "envcache"))
    dlfs.load_mnist()
    assert len(list((tmp_path / "envcache" / "mnist").glob("*.gz"))) == 4
    monkeypatch.delenv("DLFS_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    dlfs.load_mnist()
    assert len(list((tmp_path / "home" / ".cache" / "dlfs" / "mnist").glob("*.gz"))) == 4


def test_mnist_corrupt_download_is_not_cached(_mnist_server, tmp_path, monkeypatch):
    _, www, _, publish = _mnist_server
    published = dlfs._MNIST_MD5
    publish(_mnist_arrays())
    bad = www / "mnist" / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:-10])  # truncated in transit
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"checksum mismatch.*t10k-images.*not cached"):
        dlfs.load_mnist(cache_dir=cache)
    assert not (cache / bad.name).exists()
    assert not [p for p in cache.iterdir() if p.name.endswith(".part")]
    # the real published checksums never match the tiny files either
    monkeypatch.setattr(dlfs, "_MNIST_MD5", published)
    with pytest.raises(ValueError, match="checksum mismatch"):
        dlfs.load_mnist(cache_dir=tmp_path / "cache2")
    assert not (tmp_path / "cache2").exists()  # nothing cached: no empty folder either


def test_mnist_damaged_cache_file_is_downloaded_again(_mnist_server, tmp_path):
    _, _, requests, publish = _mnist_server
    arrays = _mnist_arrays()
    publish(arrays)
    cache = tmp_path / "cache"
    dlfs.load_mnist(cache_dir=cache)
    (cache / "train-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    _mnist_equal(dlfs.load_mnist(cache_dir=cache), arrays)
    assert requests.count("/mnist/train-labels-idx1-ubyte.gz") == 2
    assert len(requests) == 5


def test_mnist_unreachable_mirror_falls_back_then_errors(_mnist_server, tmp_path, monkeypatch):
    url, _, _, publish = _mnist_server
    arrays = _mnist_arrays()
    publish(arrays)
    missing = url.replace("/mnist/", "/nothing-here/")
    monkeypatch.setattr(dlfs, "_MNIST_MIRRORS", (missing, url))
    _mnist_equal(dlfs.load_mnist(cache_dir=tmp_path / "c1"), arrays)
    monkeypatch.setattr(dlfs, "_MNIST_MIRRORS", (missing,))
    with pytest.raises(OSError, match="could not download train-images") as info:
        dlfs.load_mnist(cache_dir=tmp_path / "c2" / "mnist")
    # the URLs tried, the offline fix, and no empty cache folders left behind
    assert f"tried {missing}train-images-idx3-ubyte.gz: " in str(info.value)
    assert 'dlfs.load_mnist("mnist.npz")' in str(info.value) and "--data" in str(info.value)
    assert "pickle" not in str(info.value) and not (tmp_path / "c2").exists()


def test_mnist_from_a_file_that_is_not_mnist_says_what_was_expected(tmp_path):
    csv = tmp_path / "train.csv"
    csv.write_text("label,pixel0\n5,0\n")
    with pytest.raises(ValueError) as info:
        dlfs.load_mnist(csv)
    message = str(info.value)
    assert "an .npz (a zip of x_train, y_train, x_test, y_test)" in message
    assert "folder of the four IDX files" in message and "pickle" not in message.lower()
    _assert_clear_error(info.value)


def test_mnist_examples_print_a_download_failure_as_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dlfs, "_MNIST_MIRRORS", ("http://127.0.0.1:9/",))  # refused at once
    monkeypatch.setenv("DLFS_DATA", str(tmp_path / "data"))
    for name in ("mnist_mlp", "mnist_cnn", "mnist_lstm"):
        with pytest.raises(SystemExit) as info:
            _example(name, monkeypatch).main(["--epochs", "1"])
        text = str(info.value.code)
        assert text.startswith(f"{name}.py: could not download") and "\n" not in text
        assert "--data PATH" in text
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_folder(tmp_path, gz):
    arrays = _mnist_arrays(2)
    _mnist_write_folder(tmp_path / "idx", arrays, gz=gz)
    _mnist_equal(dlfs.load_mnist(tmp_path / "idx"), arrays)
    _mnist_equal(dlfs.load_mnist(str(tmp_path / "idx"), flatten=True), arrays, flatten=True)


def test_mnist_idx_folder_missing_file(tmp_path):
    _mnist_write_folder(tmp_path / "idx", _mnist_arrays(), gz=False)
    (tmp_path / "idx" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        dlfs.load_mnist(tmp_path / "idx")
    with pytest.raises(FileNotFoundError, match="not found"):
        dlfs.load_mnist(tmp_path / "nope.npz")


def test_mnist_npz(tmp_path):
    arrays = _mnist_arrays(3)
    np.savez(tmp_path / "m.npz", **arrays)
    _mnist_equal(dlfs.load_mnist(tmp_path / "m.npz"), arrays)
    np.savez(tmp_path / "bad.npz", **{k: v for k, v in arrays.items() if k != "y_test"})
    with pytest.raises(ValueError, match=r"missing arrays.*y_test"):
        dlfs.load_mnist(tmp_path / "bad.npz")
    np.savez(tmp_path / "short.npz", **{**arrays, "y_train": arrays["y_train"][:2]})
    with pytest.raises(ValueError, match="y_train must have shape"):
        dlfs.load_mnist(tmp_path / "short.npz")
    np.savez(tmp_path / "float.npz", **{**arrays, "x_test": arrays["x_test"] / 255.0})
    with pytest.raises(TypeError, match="x_test must be uint8"):
        dlfs.load_mnist(tmp_path / "float.npz")
    np.savez(tmp_path / "flabels.npz", **{**arrays, "y_train": arrays["y_train"] * 1.0})
    with pytest.raises(TypeError, match="y_train must be integer labels"):
        dlfs.load_mnist(tmp_path / "flabels.npz")
    for bad in (-1, 10):  # one label out of 0..9, the others in it
        y = arrays["y_test"].astype(np.int16)
        y[-1] = bad
        np.savez(tmp_path / "range.npz", **{**arrays, "y_test": y})
        with pytest.raises(ValueError, match=rf"y_test labels must be in 0..9, got .*{bad}"):
            dlfs.load_mnist(tmp_path / "range.npz")
    with pytest.raises(TypeError, match="flatten"):
        dlfs.load_mnist(tmp_path / "m.npz", flatten="yes")
    with pytest.raises(TypeError, match="path"):
        dlfs.load_mnist(3)


def test_mnist_parse_idx_validates_header_and_length():
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw = _mnist_idx(a)
    np.testing.assert_array_equal(dlfs._parse_idx(raw, "imgs"), a)
    with pytest.raises(ValueError, match="imgs: IDX payload truncated"):
        dlfs._parse_idx(raw[:-1], "imgs")
    with pytest.raises(ValueError, match="trailing bytes"):
        dlfs._parse_idx(raw + b"\0", "imgs")
    with pytest.raises(ValueError, match="truncated IDX header"):
        dlfs._parse_idx(raw[:9], "imgs")
    for magic in (b"\x1f\x8b", b"\x00\x01", b"\x01\x00"):
        with pytest.raises(ValueError, match="not an IDX file"):
            dlfs._parse_idx(magic + raw[2:], "imgs")
    with pytest.raises(ValueError, match="unknown IDX data type"):
        dlfs._parse_idx(b"\0\0\x07" + raw[3:], "imgs")
    with pytest.raises(ValueError, match="0 dimensions"):
        dlfs._parse_idx(b"\0\0\x08\0", "imgs")
    big = np.array([1, -2, 300], dtype=">i4")
    got = dlfs._parse_idx(b"\0\0\x0c\x01" + struct.pack(">I", 3) + big.tobytes(), "ints")
    np.testing.assert_array_equal(got, [1, -2, 300])
    assert got.dtype == np.int32 and got.dtype.isnative


def test_mnist_truncated_idx_file_in_folder(tmp_path):
    _mnist_write_folder(tmp_path / "plain", _mnist_arrays(), gz=False)
    f = tmp_path / "plain" / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"train-images.*payload truncated"):
        dlfs.load_mnist(tmp_path / "plain")
    _mnist_write_folder(tmp_path / "gz", _mnist_arrays(), gz=True)
    g = tmp_path / "gz" / "train-labels-idx1-ubyte.gz"
    g.write_bytes(g.read_bytes()[:-12])  # cut into the gzip stream
    with pytest.raises(ValueError, match=r"train-labels.*(truncated|corrupt)"):
        dlfs.load_mnist(tmp_path / "gz")


def test_mnist_images_fit_an_mlp_and_a_cnn(tmp_path):
    """The two layouts feed dlfs's dense and convolutional networks as they come."""
    np.savez(tmp_path / "m.npz", **_mnist_arrays(4))
    (x_flat, y), _ = dlfs.load_mnist(tmp_path / "m.npz", flatten=True)
    (x_img, _), _ = dlfs.load_mnist(tmp_path / "m.npz")
    mlp = dlfs.network(0, 784, [dlfs.dense(10)], dlfs.SoftmaxCrossEntropy())
    cnn = dlfs.network(
        0, (1, 28, 28), [dlfs.conv2d(2, 3), dlfs.Flatten(), dlfs.dense(10)], mlp.loss
    )
    for net, x in ((mlp, x_flat), (cnn, x_img)):
        assert net.predict(x).shape == (5, 10)
        assert set(net.evaluate(x, y)) == {"loss", "accuracy"}
    assert x_img.min() >= 0 and x_img.max() <= 1


# ---- gradient checks: check_grads catches wrong gradients, checks its arguments


def test_check_grads_catches_a_wrong_gradient():
    x = np.random.default_rng(0).standard_normal((3, 2))

    def wrong(a):
        return a**2, lambda dy: (dy * a,)  # should be 2 * a * dy

    with pytest.raises(dlfs.GradientCheckError):
        dlfs.check_grads(wrong, [x])
    with pytest.raises(TypeError, match="float64"):
        dlfs.check_grads(wrong, [x.astype(np.float32)])


def test_check_grads_passes_the_cancelling_max_pool_case():
    """The case the suite drew (issue 14): L = sum(y dy) = -0.34 while the terms
    sum to 31 596; a tolerance scaled by |L| failed this correct gradient."""
    case = _conv_distinct((2, 3, 7, 7), 47)
    pool = dlfs.MaxPool2D(3, 1)
    y, _, _ = pool.forward(case)
    dy = dlfs.make_rng(47).standard_normal(y.shape)  # the checker's first draw
    assert abs(np.sum(y * dy)) < 1 and np.sum(np.abs(y * dy)) > 30_000
    err = dlfs.check_layer(pool, case, key=47)
    assert 1e-7 < err < 1e-5  # over the old |L|-scaled tolerance, far inside the new one


@pytest.mark.parametrize("case", sorted(_sensitivity_cases()))
def test_check_grads_still_catches_wrong_gradients(case):
    layer, x, ctx, fix = _sensitivity_cases()[case]
    assert _wrong_layer_grads(layer, x, ctx, lambda dx, g, c, dy: [dx, *g]) < 1e-6  # as is: passes
    with pytest.raises(dlfs.GradientCheckError, match="tolerance"):
        _wrong_layer_grads(layer, x, ctx, fix)


def test_check_grads_returns_the_largest_error():
    """With a gradient 1e-4 too large and rtol=1e-3 it passes, and returns the largest
    |analytic - numeric| over the directions, here 1e-4 |<dy, v>| per direction."""
    calls, seen_dy = [], []

    def f(a):
        calls.append(a)
        return a.copy(), lambda dy: (seen_dy.append(dy) or dy * (1 + 1e-4),)

    a = np.arange(1.0, 6.0)
    worst = dlfs.check_grads(f, [a], key=3, directions=4, rtol=1e-3)
    dy = seen_dy[0]
    steps = [(p - m) for p, m in zip(calls[1::2], calls[2::2])]
    errors = [1e-4 * abs(float(np.sum(dy * s))) / (2 * 1e-6) for s in steps]
    assert len(errors) == 4 and errors.index(max(errors)) != 3  # the worst is not the last
    assert worst == pytest.approx(max(errors), rel=1e-4)
    assert dlfs.check_layer(dlfs.Sigmoid(), np.linspace(-3, 3, 12).reshape(3, 4)) > 0
    loss_err = dlfs.check_loss(dlfs.MeanSquaredError(), np.ones((3, 2)) / 3, np.zeros((3, 2)))
    assert 0 < loss_err < 1e-8


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_check_grads_validates_its_arguments():
    def f(a):
        return a, lambda dy: (dy,)

    x = np.ones(3)
    cases = [
        (dict(f=3), TypeError, "f must be callable"),
        (dict(args=x), TypeError, "args must be a list or tuple"),
        (dict(args=[np.matrix(x)]), TypeError, r"args\[0\] must be a plain numpy array"),
        (dict(args=[x.astype(np.float32)]), TypeError, r"args\[0\] must be float64"),
        (dict(directions=0), ValueError, "directions must be >= 1"),
        (dict(directions=np.array(3)), TypeError, "directions must be an int"),
        (dict(eps=0.0), ValueError, "eps must be in"),
        (dict(eps=np.ones(2)), TypeError, "eps must be a number"),
        (dict(atol=-1.0), ValueError, "atol"),
        (dict(rtol=math.nan), ValueError, "rtol"),
        (dict(key=-1), TypeError, "key"),
    ]
    for override, exc, words in cases:
        kwargs = {"f": f, "args": [x], **override}
        with pytest.raises(exc, match=words):
            dlfs.check_grads(kwargs.pop("f"), kwargs.pop("args"), **kwargs)
    assert dlfs.check_grads(f, [[1.0, 2.0]]) < 1e-9  # lists go through np.asarray
    with pytest.raises(ValueError, match="vjp must return 1 gradients"):
        dlfs.check_grads(lambda a: (a, lambda dy: ()), [x])
    with pytest.raises(ValueError, match="gradient 0 has shape"):
        dlfs.check_grads(lambda a: (a, lambda dy: (dy[:2],)), [x])
    with pytest.raises(dlfs.GradientCheckError):  # a NaN gradient never passes
        dlfs.check_grads(lambda a: (a, lambda dy: (dy * np.nan,)), [x])


def test_check_grads_default_directions_and_rtol():
    calls = []

    def f(a):
        calls.append(a)
        return a.copy(), lambda dy: (dy * (1 + 5e-6),)  # 5e-6 relative: over rtol=1e-6

    a = np.arange(1.0, 4.0)
    with pytest.raises(dlfs.GradientCheckError):
        dlfs.check_grads(f, [a])
    calls.clear()
    dlfs.check_grads(f, [a], rtol=1e-5)
    assert len(calls) == 1 + 2 * 3  # the base point, then +-eps along 3 directions
    for plus, minus in zip(calls[1::2], calls[2::2]):
        assert np.linalg.norm(plus - minus) == pytest.approx(2e-6, rel=1e-6)  # unit directions


def test_check_grads_default_key_is_0_and_an_error_equal_to_the_tolerance_passes():
    """Without a key the draws are key 0's (reproducible runs); the test is
    err <= tol: at a = 0 with eps = 0.5 every step is exact and S = 0, so the
    error is |fl(dy + 1e-3) - dy| exactly, and atol equal to it passes while the
    next float below fails."""
    seen = []

    def f(a):
        return a.copy(), lambda dy: (seen.append(dy) or dy + 1e-3,)

    a, kw = np.zeros(1), dict(eps=0.5, rtol=0.0, directions=1)
    err = dlfs.check_grads(f, [a], atol=1.0, **kw)
    assert seen[-1] == dlfs.make_rng(0).standard_normal(1)  # key 0's first draw
    assert err == abs((seen[-1][0] + 1e-3) - seen[-1][0]) > 0
    assert dlfs.check_grads(f, [a], key=0, atol=1.0, **kw) == err
    assert dlfs.check_grads(f, [a], atol=err, **kw) == err  # err == tol: passes
    with pytest.raises(dlfs.GradientCheckError):
        dlfs.check_grads(f, [a], atol=float(np.nextafter(err, 0.0)), **kw)
    dlfs.check_grads(f, [a], key=1, atol=1.0, **kw)
    assert seen[-1] != seen[0]  # another key, another dy


def test_checkpoint_meta_is_stored_key_sorted(tmp_path):
    """meta's keys come back sorted at every level, and the stored description does
    not depend on the order meta's keys were given in."""
    net = _key_net(0)
    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    dlfs.save(one, net, meta={"b": 1, "a": {"z": [1, {"d": 0, "c": 1}], "y": 2}})
    dlfs.save(two, net, meta={"a": {"y": 2, "z": [1, {"c": 1, "d": 0}]}, "b": 1})
    meta = dlfs.load(one).meta
    assert list(meta) == ["a", "b"] and list(meta["a"]) == ["y", "z"]
    assert list(meta["a"]["z"][1]) == ["c", "d"]
    with np.load(one) as a, np.load(two) as b:
        assert a[dlfs._STRUCTURE].tobytes() == b[dlfs._STRUCTURE].tobytes()


# ----- save/load: bit-exact round trips; save refuses what load would refuse


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n_in=st.integers(1, 5),
    widths=st.lists(st.integers(1, 5), min_size=0, max_size=3),
    acts=st.lists(st.integers(0, 8), min_size=3, max_size=3),
    extras=st.lists(st.integers(0, 2), min_size=3, max_size=3),
    dtype=st.sampled_from([np.float32, np.float64]),
    loss=st.sampled_from(["mse", "sce", "bce"]),
    with_opt=st.booleans(),
)
def test_save_load_round_trip(seed, n_in, widths, acts, extras, dtype, loss, with_opt):
    net = _trust_net(seed, n_in, widths, acts, dtype, loss, extras)
    opt = dlfs.Adam(1e-2)
    rng = np.random.default_rng(seed)
    state = dlfs.TrainState.create(net, opt, seed)
    if with_opt:  # a real step: non-zero moments, new BatchNorm statistics
        x = rng.standard_normal((4, n_in)).astype(dtype)
        state = dlfs.train_step(state, (x, _trust_targets(net, 4, rng)))
    meta = {"note": "hi", "seed": seed, "values": [1.5, None, True]}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "net.npz")
        dlfs.save(path, state.net, state.opt_state if with_opt else None, meta=meta)
        ckpt = dlfs.load(path)
        assert os.listdir(d) == ["net.npz"]
    _assert_same_net(state.net, ckpt.net)
    assert ckpt.meta == meta
    assert ckpt.version == 1 and ckpt.dlfs_version == dlfs.__version__
    x = rng.standard_normal((3, n_in)).astype(dtype)
    assert state.net.predict(x).tobytes() == ckpt.net.predict(x).tobytes()
    if with_opt:
        _trust_assert_same_opt_state(state.opt_state, ckpt.opt_state_for(opt))
    else:
        assert ckpt.opt_state is None


def test_save_rejects_what_it_cannot_describe(tmp_path):
    net, opt, ostate = _trust_trained()
    path = tmp_path / "c.npz"

    @attrs.frozen(eq=False)
    class Custom(dlfs.Linear):
        pass

    custom = dlfs.Network([*net.layers, Custom()], net.loss, net.input_shape)
    with pytest.raises(TypeError, match="Custom"):
        dlfs.save(path, custom)
    with pytest.raises(TypeError, match="meta"):
        dlfs.save(path, net, meta={"a": np.zeros(2)})
    with pytest.raises(TypeError, match="meta"):
        dlfs.save(path, net, meta=[1, 2])
    with pytest.raises(TypeError, match="opt_state"):
        dlfs.save(path, net, opt_state={"m": 1})
    with pytest.raises(TypeError, match="net"):
        dlfs.save(path, "net")
    with pytest.raises(TypeError, match="path"):
        dlfs.save(3, net)
    assert not path.exists()
    with pytest.raises(FileNotFoundError):
        dlfs.load(tmp_path / "missing.npz")
    dlfs.save(path, net, ostate)
    with pytest.raises(ValueError, match="slots"):
        dlfs.load(path).opt_state_for(dlfs.SGD(0.1))
    dlfs.save(path, net)
    with pytest.raises(ValueError, match="no optimizer state"):
        dlfs.load(path).opt_state_for(opt)


def test_cnn_checkpoint_round_trip(tmp_path):
    specs = [
        dlfs.conv2d(4, 4, padding="same", activation=dlfs.ReLU()),
        dlfs.MaxPool2D(2),
        dlfs.conv2d(3, 3, stride=2, padding=1),
        dlfs.batch_norm(),
        dlfs.AvgPool2D(2),
        dlfs.Flatten(),
        dlfs.dense(5),
    ]
    net = dlfs.network(3, (2, 9, 9), specs, dlfs.SoftmaxCrossEntropy(), dtype=np.float32)
    x = dlfs.make_rng(1).standard_normal((3, 2, 9, 9), dtype=np.float32)
    path = tmp_path / "cnn.npz"
    dlfs.save(path, net)
    loaded = dlfs.load(path).net
    assert repr(loaded) == repr(net)
    for la, lb in zip(net.params(), loaded.params(), strict=True):
        for a, b in zip(la, lb, strict=True):
            assert a.dtype == b.dtype and np.array_equal(a, b)
    assert np.array_equal(net.predict(x), loaded.predict(x))


@pytest.mark.parametrize(
    ("meta", "exc", "words"),
    [
        ({"deep": _hard_nested(64)}, ValueError, "meta must be nested at most 64"),
        (_hard_self_referencing(), ValueError, "refers to itself"),
        ({1: "one"}, TypeError, "meta keys must be str"),
        ({"a": {None: 1}}, TypeError, r"meta\['a'\] keys must be str"),
        ({"a": {(1, 2): 1}}, TypeError, "keys must be str"),
        ({"a": [np.float32(1.0)]}, TypeError, r"meta\['a'\]\[0\] must hold only .* got float32"),
        ({"a": np.int64(3)}, TypeError, "got int64"),
        ({"a": np.bool_(True)}, TypeError, "got bool"),
        ({"a": {1, 2}}, TypeError, "got set"),
        ({"a": b"bytes"}, TypeError, "got bytes"),
        ({"a": np.zeros(2)}, TypeError, "got ndarray"),
        ({"a": 10**5000}, ValueError, "meta must be JSON-serializable"),
    ],
)
def test_save_refuses_meta_load_would_refuse_and_keeps_the_old_file(tmp_path, meta, exc, words):
    path = tmp_path / "c.npz"
    dlfs.save(path, _hard_net(), meta={"good": 1})
    before = path.read_bytes()
    with pytest.raises(exc, match=words):
        dlfs.save(path, _hard_net(), meta=meta)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c.npz"]


def test_save_and_load_share_the_size_limit(tmp_path, monkeypatch):
    limit = _hard_structure_size(tmp_path, {"s": ""}) + 100
    monkeypatch.setattr(dlfs, "_STRUCTURE_MAX", limit)
    path = tmp_path / "c.npz"
    dlfs.save(path, _hard_net(), meta={"s": "x" * 100})  # exactly at the limit: saved, loaded
    assert dlfs.load(path).meta == {"s": "x" * 100}
    before = path.read_bytes()
    with pytest.raises(ValueError, match=f"meta must take at most {limit} bytes"):
        dlfs.save(path, _hard_net(), meta={"s": "x" * 101})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["c.npz"]
    monkeypatch.setattr(dlfs, "_STRUCTURE_MAX", limit - 1)  # a file over load's limit
    with pytest.raises(ValueError, match=f"structure record must take at most {limit - 1}"):
        dlfs.load(path)


def test_meta_round_trips_everything_save_accepts(tmp_path):
    class Level(int):
        pass

    meta = {
        "deep": _hard_nested(63),  # meta itself is level 0: 64 levels in all
        "numbers": [0, -1, 2**80, 1.5, -0.0, float("inf"), float("-inf"), np.float64(0.1)],
        "tuple": (1, ("a", None), True),
        "text": ["", "é\u2603", "\ud800"],
        "subclass": Level(3),
        "empty": {"": {}},
    }
    path = tmp_path / "c.npz"
    dlfs.save(path, _hard_net(), meta=meta)
    back = dlfs.load(path).meta
    assert back["deep"] == _hard_nested(63)
    assert back["numbers"][:7] == [0, -1, 2**80, 1.5, -0.0, math.inf, -math.inf]
    assert math.copysign(1.0, back["numbers"][4]) == -1.0 and back["numbers"][7] == 0.1
    assert back["tuple"] == [1, ["a", None], True]
    assert back["text"] == ["", "é\u2603", "\ud800"]
    assert back["subclass"] == 3 and type(back["subclass"]) is int
    assert back["empty"] == {"": {}}
    dlfs.save(path, _hard_net(), meta={"nan": float("nan")})
    assert math.isnan(dlfs.load(path).meta["nan"])


def test_load_applies_the_meta_rules_too(tmp_path):
    path = tmp_path / "c.npz"
    dlfs.save(path, _hard_net())
    raw = _trust_raw(path)
    structure = _trust_structure(raw)
    structure["meta"] = {"deep": _hard_nested(70)}
    np.savez(path, **_trust_with_structure(raw, structure))
    with pytest.raises(ValueError, match="meta must be nested at most 64"):
        dlfs.load(path)


def test_fresh_optimizer_state_round_trips(tmp_path):
    net = _hard_net(np.float64)
    for opt in (dlfs.SGD(0.1), dlfs.Adam(3e-3), dlfs.Momentum(0.2)):
        state = opt.init(net.params())
        dlfs.save(tmp_path / "c.npz", net, state)
        back = dlfs.load(tmp_path / "c.npz").opt_state_for(opt)
        assert back.count == 0 and back.lr == state.lr
        _trust_assert_same_opt_state(state, back)


def test_checkpoint_paths_and_optimizers_are_checked(tmp_path):
    class BytesPath:
        def __fspath__(self):
            return b"c.npz"

    net = _hard_net()
    for path in ("", BytesPath()):
        with pytest.raises(TypeError, match="path must be a non-empty text path"):
            dlfs.save(path, net)
        with pytest.raises(TypeError, match="path must be a non-empty text path"):
            dlfs.load(path)
    dlfs.save(tmp_path / "c.npz", net, dlfs.SGD().init(net.params()))
    with pytest.raises(TypeError, match="optimizer must have init/update"):
        dlfs.load(tmp_path / "c.npz").opt_state_for(_HalfOptimizer())


def test_large_arrays_round_trip(tmp_path):
    """Arrays far larger than an .npy header (the size check scales with the data)."""
    net = dlfs.network(0, 256, [dlfs.dense(256), dlfs.dense(3)], dlfs.MeanSquaredError())
    dlfs.save(tmp_path / "c.npz", net)
    _assert_same_net(net, dlfs.load(tmp_path / "c.npz").net)


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_save_refuses_optimizer_states_it_could_not_load(tmp_path):
    net = _hard_net()
    (w, b), _ = net.params()
    path = tmp_path / "c.npz"
    for bad in [np.ones((3, 2), np.int64), w.tolist(), np.asmatrix(w)]:
        state = dlfs.OptState(0, 0.1, (((bad, b), ()),))
        with pytest.raises(TypeError, match=r"cannot save opt.slots.0.0.0: only plain float32"):
            dlfs.save(path, net, state)
    assert not path.exists()


def test_config_values_keep_their_json_types():
    """Layer settings go through _json_value: bool, None and str stay themselves
    (not ints), numpy numbers become Python numbers, tuples become lists."""
    value = (True, None, "same", np.int64(2), np.float32(0.5), ((1, 2), (3, 4)))
    as_json = dlfs._json_value("config", value)
    assert as_json == [True, None, "same", 2, 0.5, [[1, 2], [3, 4]]]
    assert [type(v) for v in as_json[:5]] == [bool, type(None), str, int, float]
    assert dlfs._from_json_value(as_json) == (True, None, "same", 2, 0.5, ((1, 2), (3, 4)))
    with pytest.raises(TypeError, match="cannot save config of type dict"):
        dlfs._json_value("config", {"a": 1})


def test_load_takes_empty_arrays_that_save_writes(tmp_path):
    """save never writes what load refuses: a layer of width 0 holds (2, 0) and (0,)
    arrays, and so do its optimizer moments."""
    net = dlfs.Network((dlfs.Dense(np.zeros((2, 0)), np.zeros(0)),), dlfs.MeanSquaredError(), (2,))
    state = dlfs.Adam().init(net.params())
    dlfs.save(tmp_path / "c.npz", net, state)
    ckpt = dlfs.load(tmp_path / "c.npz")
    assert [a.shape for a in ckpt.net.params()[0]] == [(2, 0), (0,)]
    assert ckpt.opt_state.slots[0][0][0].shape == (2, 0)


# ------------- load: damaged, tampered and hand-made files get a clear error


@settings(max_examples=40, deadline=None)
@given(frac=st.floats(0, 1, exclude_max=True))
def test_truncated_file_is_a_value_error(_trust_ckpt_bytes, frac):
    data, _ = _trust_ckpt_bytes
    with pytest.raises(ValueError, match="cannot load checkpoint"):
        _trust_load_bytes(data[: int(frac * len(data))])


@settings(max_examples=60, deadline=None)
@given(frac=st.floats(0, 1, exclude_max=True), xor=st.integers(1, 255))
def test_flipped_byte_is_detected_or_harmless(_trust_ckpt_bytes, frac, xor):
    # A flip in zip bookkeeping no reader checks (timestamps, attributes) is
    # harmless; any flip that reaches the content must be a ValueError.
    data, ref = _trust_ckpt_bytes
    damaged = bytearray(data)
    damaged[int(frac * len(data))] ^= xor
    try:
        ckpt = _trust_load_bytes(bytes(damaged))
    except ValueError as err:
        assert "cannot load checkpoint" in str(err)
        return
    _assert_same_net(ref.net, ckpt.net)
    _trust_assert_same_opt_state(ref.opt_state, ckpt.opt_state)
    assert ckpt.meta == ref.meta


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("renamed", "missing"),
        ("missing", "missing"),
        ("extra", "extra"),
        ("pickle_extra", "extra"),
        ("pickle_replace", "pickle|bytes|object"),
        ("pickle_structure", "pickle|object"),
        ("int_array", "described|bytes"),
        ("shape", "described|bytes"),
        ("grown", r"holds \d+ bytes, expected \d+ plus a header"),
        ("dtype", "described|bytes"),
        ("values", "CRC"),
        ("json_shape", "described|bytes"),
        ("json_dtype", "dtype"),
        ("newer", "upgrade"),
        ("unknown_layer", "unknown layer type"),
        ("bad_config", "p must be"),
        ("unknown_field", "no fields"),
        ("not_json", "JSON|Expecting"),
        ("no_structure", "not a dlfs checkpoint"),
    ],
)
def test_tampered_files_are_rejected(tmp_path, kind, message):
    net, _, ostate = _trust_trained()
    path = tmp_path / "c.npz"
    dlfs.save(path, net, ostate)
    np.savez(path, allow_pickle=True, **_trust_tamper(kind, _trust_raw(path)))
    with pytest.raises(ValueError, match=message):
        dlfs.load(path)
    assert _TRUST_PICKLE_RAN == []


def test_not_an_npz_is_rejected(tmp_path):
    path = tmp_path / "c.npz"
    np.save(tmp_path / "a.npy", np.arange(3.0))
    os.replace(tmp_path / "a.npy", path)
    with pytest.raises(ValueError, match=r"not an \.npz"):
        dlfs.load(path)
    np.save(tmp_path / "b.npy", np.array([_TrustBoom()], dtype=object), allow_pickle=True)
    os.replace(tmp_path / "b.npy", path)
    with pytest.raises(ValueError, match="pickle"):
        dlfs.load(path)
    path.write_bytes(b"")
    with pytest.raises(ValueError):
        dlfs.load(path)
    assert _TRUST_PICKLE_RAN == []


@pytest.mark.parametrize("kind", sorted(_HARD_DAMAGE))
def test_damaged_description_gets_a_message_not_an_internal_error(tmp_path, kind):
    damage, words = _HARD_DAMAGE[kind]
    net = _hard_net()
    path = tmp_path / "c.npz"
    dlfs.save(path, net, dlfs.Adam().init(net.params()))
    raw = _trust_raw(path)
    structure = _trust_structure(raw)
    damage(structure)
    np.savez(path, **_trust_with_structure(raw, structure))
    with pytest.raises(ValueError, match="cannot load checkpoint") as info:
        dlfs.load(path)
    message = str(info.value)
    assert re.search(words, message), message
    for leak in ("KeyError", "AttributeError", "TypeError:", "object has no attribute"):
        assert leak not in message


def test_archive_members_must_be_unique_npy_arrays(tmp_path):
    path = tmp_path / "c.npz"
    dlfs.save(path, _hard_net())
    members = [(k + ".npy", _hard_npy_bytes(v)) for k, v in _trust_raw(path).items()]
    evil = _hard_npy_bytes(np.full((3, 2), 7, np.float32))
    cases = [
        (members + [(f"{_W}.npy", evil)], r"name each member once, got duplicates \['net"),
        (members + [("readme.txt", b"hi")], r"only \.npy members, got \['readme.txt'\]"),
        ([(n, b"x" * len(d) if n == f"{_W}.npy" else d) for n, d in members], "npy array"),
    ]
    for zipped, words in cases:
        _hard_write_zip(path, zipped)
        with pytest.raises(ValueError, match=words):
            dlfs.load(path)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (b'{"format": "dlfs.checkpoint", "format": "x"}', "names a key twice"),
        (b"[" * 100_000 + b"]" * 100_000, "nested this deeply"),
        (b"\xff\xfe", "UTF-8 JSON"),
        (b"[1, 2]", "not a dlfs checkpoint"),
    ],
)
def test_structure_record_text_is_checked(tmp_path, text, words):
    path = tmp_path / "c.npz"
    dlfs.save(path, _hard_net())
    raw = {**_trust_raw(path), "__dlfs_structure__": np.frombuffer(text, np.uint8)}
    np.savez(path, **raw)
    with pytest.raises(ValueError, match=words):
        dlfs.load(path)


@pytest.mark.parametrize("record", [np.zeros((2, 3), np.uint8), np.zeros(4, np.float32)])
def test_structure_record_must_be_1d_uint8(tmp_path, record):
    path = tmp_path / "c.npz"
    dlfs.save(path, _hard_net())
    np.savez(path, **{**_trust_raw(path), "__dlfs_structure__": record})
    with pytest.raises(ValueError, match="structure record must be a 1-D uint8 array"):
        dlfs.load(path)


# ------------------ save's files: atomic writes, temporary names, file modes


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_interrupted_write_keeps_the_old_checkpoint(tmp_path, monkeypatch, error):
    old, _, _ = _trust_trained(0)
    new, _, _ = _trust_trained(1)
    path = tmp_path / "c.npz"
    dlfs.save(path, old)

    def failing_writer(file, arrays):
        np.savez(file, **arrays)
        file.truncate(file.tell() // 2)  # half the bytes are on disk, then the crash
        raise error

    monkeypatch.setattr(dlfs, "_write_npz", failing_writer)
    with pytest.raises(type(error)):
        dlfs.save(path, new)
    assert os.listdir(tmp_path) == ["c.npz"]
    _assert_same_net(old, dlfs.load(path).net)
    monkeypatch.undo()
    dlfs.save(path, new)
    _assert_same_net(new, dlfs.load(path).net)
    assert os.listdir(tmp_path) == ["c.npz"]


def test_save_file_mode_follows_umask_and_keeps_existing_mode(tmp_path):
    net = dlfs.network(0, 3, [dlfs.dense(2)], dlfs.MeanSquaredError())
    path = tmp_path / "net.npz"
    old = os.umask(0o027)
    try:
        dlfs.save(path, net)
        assert os.stat(path).st_mode & 0o777 == 0o640
        os.chmod(path, 0o600)
        dlfs.save(path, net)
        assert os.stat(path).st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
    assert os.listdir(tmp_path) == ["net.npz"]


@pytest.mark.parametrize("length", [200, 233, 234, 255])
def test_long_valid_names_save_with_temporary_names_within_the_limit(tmp_path, monkeypatch, length):
    name = "é" + "n" * (length - 2)  # 2 bytes + (length - 2): ``length`` bytes in UTF-8
    assert len(os.fsencode(name)) == length
    temp_names = []

    def spy(file, arrays):
        temp_names.extend(n for n in os.listdir(tmp_path) if n != name)
        np.savez(file, **arrays)

    monkeypatch.setattr(dlfs, "_write_npz", spy)
    dlfs.fit(**_hard_fit_kwargs(epochs=1), checkpoint=tmp_path / name)
    dlfs.save(tmp_path / name, _hard_net())
    assert len(temp_names) == 2 and os.listdir(tmp_path) == [name]
    for temp in temp_names:
        assert temp.startswith(".") and temp.endswith(".tmp")
        assert len(os.fsencode(temp)) <= 255
        assert (name in temp) == (length <= 255 - len(".") - len(".0123456789abcdef.tmp"))
    assert temp_names[0] != temp_names[1]  # random part
    dlfs.load(tmp_path / name)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_a_killed_save_leaves_a_temp_file_that_the_next_save_removes(tmp_path):
    path = tmp_path / "c.npz"
    dlfs.save(path, _hard_net())
    before = path.read_bytes()
    run = subprocess.run(
        [sys.executable, "-c", _HARD_KILLED_SAVE, str(HERE), str(path)], capture_output=True
    )
    assert run.returncode == -9
    left = sorted(os.listdir(tmp_path))
    assert len(left) == 2 and left[1] == "c.npz" and left[0].startswith(".c.npz.")
    assert path.read_bytes() == before  # the old checkpoint is intact
    dlfs.save(path, _hard_net())
    assert os.listdir(tmp_path) == ["c.npz"]


def test_stale_temp_cleanup_removes_only_this_checkpoints_temp_files(tmp_path):
    long_name = "L" * 250
    ours = [
        ".c.npz.0123456789abcdef.tmp",
        ".c.npz.fedcba9876543210.tmp",
        # the shortened prefix of a name too long for prefix + 21 bytes
        "."
        + "L" * (255 - 21 - 1 - 9)
        + f"~{zlib.crc32(long_name.encode()):08x}"
        + ".0123456789abcdef.tmp",
    ]
    others = [
        ".c.npz.0123456789ABCDEF.tmp",  # upper case: not a name save makes
        ".c.npz.0123456789abcde.tmp",  # 15 digits
        ".c.npz.0123456789abcdef0.tmp",  # 17 digits
        ".c.npz.0123456789abcdeg.tmp",
        ".c.npz.0123456789abcdef.tmp.bak",
        "c.npz.0123456789abcdef.tmp",  # not hidden
        ".d.npz.0123456789abcdef.tmp",  # another checkpoint
        ".c.npzx.0123456789abcdef.tmp",
        ".b.c.npz.0123456789abcdef.tmp",
        "c.npz",
        "notes.txt",
    ]
    for name in ours + others:
        (tmp_path / name).write_bytes(b"stale")
    folder_like_ours = tmp_path / ".c.npz.00000000000000aa.tmp"
    folder_like_ours.mkdir()
    dlfs.save(tmp_path / "c.npz", _hard_net())
    dlfs.save(tmp_path / long_name, _hard_net())
    left = set(os.listdir(tmp_path))
    assert left == {*others, long_name, folder_like_ours.name}
    assert all((tmp_path / n).read_bytes() == b"stale" for n in others if n != "c.npz")


def _key_net(key: int) -> dlfs.Network:
    return dlfs.network(key, 3, [dlfs.dense(2)], dlfs.MeanSquaredError())


def test_concurrent_saves_from_threads_never_fail_and_the_last_rename_wins(tmp_path, monkeypatch):
    # a save mid-write (thread 0) while three others save the same path from start to end:
    # its temporary file is in use, so theirs must leave it; it finishes last and wins
    path, go = tmp_path / "c.npz", threading.Event()

    def writer(file, arrays):
        np.savez(file, **arrays)
        if threading.current_thread().name == "slow":
            assert go.wait(30)

    monkeypatch.setattr(dlfs, "_write_npz", writer)
    errors = []

    def save(key):
        try:
            dlfs.save(path, _key_net(key))
        except BaseException as err:  # any failure is the test's failure
            errors.append(err)

    slow = threading.Thread(target=save, args=(0,), name="slow")
    slow.start()
    while len(os.listdir(tmp_path)) < 1:  # its temporary file exists
        time.sleep(0.001)
    others = [threading.Thread(target=save, args=(k,)) for k in (1, 2, 3)]
    for t in others:
        t.start()
    for t in others:
        t.join()
    go.set()
    slow.join()
    assert errors == [] and os.listdir(tmp_path) == ["c.npz"]
    _assert_same_net(dlfs.load(path).net, _key_net(0))
    # and free-running: 4 threads x 5 saves, each file complete, no temporary file left
    monkeypatch.undo()
    start = threading.Barrier(4)

    def saves(key):
        start.wait()
        for _ in range(5):
            save(key)
            dlfs.load(path)  # always one complete checkpoint

    threads = [threading.Thread(target=saves, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and os.listdir(tmp_path) == ["c.npz"]
    net = dlfs.load(path).net
    assert any(np.array_equal(net.layers[0].w, _key_net(k).layers[0].w) for k in range(4))


@pytest.mark.skipif(sys.platform == "win32", reason="flock: Windows keeps a day-old rule")
def test_concurrent_saves_from_processes_never_fail_and_the_last_rename_wins(tmp_path):
    folder, sync = tmp_path / "ckpt", tmp_path / "sync"
    folder.mkdir()
    sync.mkdir()
    path, go = folder / "c.npz", sync / "go"

    def start(key, go_file):
        args = [sys.executable, "-c", _WAITING_SAVE, str(HERE), str(path), go_file, str(key)]
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    slow = start(0, str(go))
    deadline = time.monotonic() + 60
    while not os.listdir(folder):  # the slow save's temporary file exists: it is writing
        assert slow.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    others = [start(k, "-") for k in (1, 2, 3)]
    outs = [p.communicate(timeout=120) for p in others]
    assert [p.returncode for p in others] == [0, 0, 0], outs
    go.touch()
    out = slow.communicate(timeout=120)
    assert slow.returncode == 0, out
    assert os.listdir(folder) == ["c.npz"]
    _assert_same_net(dlfs.load(path).net, _key_net(0))


def test_name_limit_is_the_file_systems_when_it_gives_one(monkeypatch, tmp_path):
    """A positive PC_NAME_MAX is used as it is (even a tiny one); no answer, an
    error or a non-positive one means 255."""
    for answer, limit in ((1, 1), (14, 14), (1024, 1024), (0, 255), (-1, 255)):
        monkeypatch.setattr(os, "pathconf", lambda folder, key, answer=answer: answer)
        assert dlfs._name_max(str(tmp_path)) == limit

    def no_answer(folder, key):
        raise OSError(errno.EINVAL, "no limit")

    monkeypatch.setattr(os, "pathconf", no_answer)
    assert dlfs._name_max(str(tmp_path)) == 255


# ---- export: ONNX graphs equal predict in ONNX Runtime; PyTorch state dicts round-trip


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want|: the error relative to the output's scale."""
    return float(np.abs(got - want).max() / max(np.abs(want).max(), np.finfo(want.dtype).tiny))


def _bn(rng: np.random.Generator, c: int, dtype) -> dlfs.BatchNorm:
    """A BatchNorm with random affine parameters and running statistics (var > 0)."""
    gamma, beta, mean = (rng.standard_normal(c).astype(dtype) for _ in range(3))
    return dlfs.BatchNorm(gamma, beta, mean, rng.uniform(0.5, 2.0, c).astype(dtype), eps=1e-3)


# A pre-LN Transformer block (GPT-2, nanoGPT) as two residuals, and a final LayerNorm.
_PRE_LN_BLOCKS = [
    dlfs.residual([dlfs.layer_norm(), dlfs.self_attention(2)]),
    dlfs.residual([dlfs.layer_norm(), dlfs.dense(16, dlfs.GELU()), dlfs.dense(8)]),
    dlfs.layer_norm(),
]

# Every layer kind dlfs exports: name -> (input_shape, layers to follow, or a
# callable(rng, dtype) giving them).  Parameters are redrawn at random below
# (biases and forget gates included), so no zero hides a layout mistake.
_EXPORT_CASES = {
    "dense_2d": (5, [dlfs.dense(4)]),
    "dense_3d": ((3, 5), [dlfs.dense(4)]),
    "linear": (5, [dlfs.dense(4), dlfs.Linear()]),
    "sigmoid": (5, [dlfs.dense(4, dlfs.Sigmoid())]),
    "tanh": (5, [dlfs.dense(4, dlfs.Tanh())]),
    "relu": (5, [dlfs.dense(4, dlfs.ReLU())]),
    "leaky_relu": (5, [dlfs.dense(4, dlfs.LeakyReLU(0.1))]),
    "elu": (5, [dlfs.dense(4, dlfs.ELU(0.7))]),
    "gelu": (5, [dlfs.dense(4, dlfs.GELU())]),
    "silu": (5, [dlfs.dense(4, dlfs.SiLU())]),
    "softmax": (5, [dlfs.dense(4), dlfs.Softmax()]),
    "dropout": (5, [dlfs.dense(4), dlfs.Dropout(0.5)]),
    "batch_norm_1d": (5, lambda rng, dt: [dlfs.Dense.init(0, 5, 4, dtype=dt), _bn(rng, 4, dt)]),
    "batch_norm_2d": (
        (2, 6, 5),
        lambda rng, dt: [dlfs.Conv2D.init(0, 2, 3, 3, dtype=dt), _bn(rng, 3, dt)],
    ),
    "conv_valid": ((2, 7, 6), [dlfs.conv2d(3, 3)]),
    "conv_same_even": ((2, 7, 6), [dlfs.conv2d(3, (2, 4), padding="same")]),
    "conv_pad_stride": ((2, 7, 6), [dlfs.conv2d(3, 3, padding=1, stride=2)]),
    "conv_pad_pair": ((2, 7, 6), [dlfs.conv2d(3, (3, 2), padding=(1, 2), stride=(1, 2))]),
    "conv_pads_asymmetric": (
        (2, 7, 6),
        [dlfs.conv2d(3, (3, 2), padding=((1, 0), (2, 1)), stride=(2, 1))],
    ),
    "max_pool": ((2, 7, 6), [dlfs.MaxPool2D(2)]),
    "max_pool_overlap": ((2, 7, 6), [dlfs.MaxPool2D(3, stride=(2, 1))]),
    "avg_pool": ((2, 7, 6), [dlfs.AvgPool2D(2)]),
    "avg_pool_overlap": ((2, 7, 6), [dlfs.AvgPool2D((2, 3), stride=1)]),
    "flatten": ((2, 4, 4), [dlfs.conv2d(3, 3), dlfs.Flatten(), dlfs.dense(2)]),
    "embedding": (6, [dlfs.embedding(10, 4)]),
    "rnn_last": ((6, 4), [dlfs.rnn(3)]),
    "rnn_sequences": ((6, 4), [dlfs.rnn(3, return_sequences=True)]),
    "lstm_last": ((6, 4), [dlfs.lstm(3)]),
    "lstm_sequences": ((6, 4), [dlfs.lstm(3, return_sequences=True)]),
    "gru_last": ((6, 4), [dlfs.gru(3)]),
    "gru_sequences": ((6, 4), [dlfs.gru(3, return_sequences=True)]),
    "dense_no_bias": ((3, 5), [dlfs.dense(4, bias=False)]),
    "gelu_exact": (5, [dlfs.dense(4, dlfs.GELU("none"))]),
    "layer_norm": ((3, 5), [dlfs.dense(4), dlfs.layer_norm(eps=1e-3)]),
    "layer_norm_no_bias": (5, [dlfs.dense(4), dlfs.layer_norm(bias=False)]),
    "layer_norm_bare": ((3, 5), [dlfs.dense(4), dlfs.layer_norm(scale=False, bias=False)]),
    "attention_causal": ((5, 8), [dlfs.self_attention(2)]),
    "attention_full_no_bias": ((5, 8), [dlfs.self_attention(4, causal=False, bias=False)]),
    "positional_embedding": ((5, 4), [dlfs.positional_embedding(7)]),
    "residual_blocks": ((5, 8), _PRE_LN_BLOCKS),
    "tied_embedding_gpt": (
        6,
        [dlfs.tied_embedding(11, 8, [dlfs.positional_embedding(6), *_PRE_LN_BLOCKS])],
    ),
}


def _export_case(name: str, dtype, n: int = 5, seed: int = 0):
    """(net, x): the case's network with random parameters, and a random input of n rows."""
    shape, layers = _EXPORT_CASES[name]
    rng = np.random.default_rng(seed)
    if callable(layers):
        layers = layers(rng, dtype)
    net = dlfs.network(seed, shape, layers, dlfs.MeanSquaredError(), dtype=dtype)
    net = net.with_params(
        [tuple(rng.standard_normal(p.shape).astype(dtype) * 0.7 for p in ps) for ps in net.params()]
    )
    if net._takes_ids():
        vocab = net.layers[0].n_vocab
        return net, rng.integers(0, vocab, (n, *net.input_shape), dtype=np.int64)
    return net, rng.standard_normal((n, *net.input_shape)).astype(dtype)


# ONNX Runtime (1.32) has no float64 kernel for these ops; graphs holding one
# run in onnx's reference evaluator instead (numpy, float64 throughout, except
# its Erf, which rounds through float32: the test gives it a float64 one).
_ORT_NO_FLOAT64 = {"Conv", "AveragePool", "RNN", "LSTM", "GRU", "Erf"}


def _float64_erf_op():
    from onnx.reference.op_run import OpRun

    class Erf(OpRun):
        op_domain = ""

        def _run(self, x):
            return (np.vectorize(math.erf, otypes=[x.dtype])(x),)

    return Erf


def _run_onnx(model, path: Path, x: np.ndarray, dtype) -> tuple[np.ndarray, str]:
    """The exported graph's output for x, and which runtime gave it."""
    ops = {node.op_type for node in model.graph.node}
    if dtype == np.float64 and ops & _ORT_NO_FLOAT64:
        from onnx.reference import ReferenceEvaluator

        evaluator = ReferenceEvaluator(model, new_ops=[_float64_erf_op()])
        return evaluator.run(None, {"x": x})[0], "reference"
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0], "onnxruntime"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(_EXPORT_CASES))
def test_export_onnx_matches_predict(tmp_path, name, dtype):
    """Every layer kind: the graph passes the full checker and gives ``predict``'s
    outputs to 1e-5 (float32, ONNX Runtime) or 1e-12 (float64) relative, for
    two batch sizes through one file (the batch axis is dynamic)."""
    onnx = pytest.importorskip("onnx")
    net, x = _export_case(name, dtype, n=5)
    path = tmp_path / f"{name}.onnx"
    model = dlfs.export_onnx(net, path, dtype=None if net.dtype else dtype)
    on_disk = onnx.load(str(path))
    onnx.checker.check_model(on_disk, full_check=True)
    assert on_disk.SerializeToString() == model.SerializeToString()
    assert model.opset_import[0].version == 17
    again = dlfs.export_onnx(net, tmp_path / "again.onnx", dtype=None if net.dtype else dtype)
    assert (tmp_path / "again.onnx").read_bytes() == path.read_bytes()  # deterministic
    assert again.SerializeToString() == model.SerializeToString()
    (dim_n, *dims) = on_disk.graph.input[0].type.tensor_type.shape.dim
    assert dim_n.dim_param == "N" and [d.dim_value for d in dims] == list(net.input_shape)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for rows in (x, x[:1]):
        got, runtime = _run_onnx(model, path, rows, dtype)
        want = net.predict(rows)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert _rel_err(got, want) <= tol, (runtime, _rel_err(got, want))


_EXPORT_ACTIVATIONS = [
    dlfs.Linear(),
    dlfs.Sigmoid(),
    dlfs.Tanh(),
    dlfs.ReLU(),
    dlfs.LeakyReLU(0.2),
    dlfs.ELU(0.7),
    dlfs.GELU(),
    dlfs.GELU("none"),
    dlfs.SiLU(),
]


@settings(max_examples=10, deadline=None)
@given(
    seed=SEEDS,
    n=SIZES,
    d_in=SIZES,
    d_out=SIZES,
    t=st.integers(0, 3),
    act=st.sampled_from(_EXPORT_ACTIVATIONS),
)
def test_export_onnx_property_dense_and_activations(seed, n, d_in, d_out, t, act):
    """Drawn sizes (t = 0: flat inputs, else (T, D) sequences) and activation:
    ONNX Runtime equals predict to 1e-5 in float32."""
    ort = pytest.importorskip("onnxruntime")
    shape = (t, d_in) if t else (d_in,)
    layers = [dlfs.dense(d_out, act), dlfs.dense(3)]
    net = dlfs.network(seed, shape, layers, dlfs.MeanSquaredError())
    x = np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "net.onnx")
        dlfs.export_onnx(net, path)
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {"x": x})
    assert _rel_err(got, net.predict(x)) <= 1e-5


def test_export_onnx_maps_recurrent_gates_to_onnx_order(tmp_path):
    """ONNX's LSTM gates are i, o, f, c and its GRU's z, r, h: the exported W
    holds dlfs's blocks reordered so (a layout mistake would still pass a
    square test where all blocks look alike, so the blocks are told apart)."""
    pytest.importorskip("onnx")
    from onnx import numpy_helper

    for kind, order in (("lstm", [0, 3, 1, 2]), ("gru", [1, 0, 2])):
        net, _ = _export_case(f"{kind}_last", np.float64)
        layer = net.layers[0]
        model = dlfs.export_onnx(net, tmp_path / f"{kind}.onnx")
        weights = {w.name.rsplit(".", 1)[-1].split("_")[0]: w for w in model.graph.initializer}
        w = numpy_helper.to_array(weights["W"])[0]  # (G*H, D)
        blocks = np.split(layer.w_ih.T, len(order))
        np.testing.assert_array_equal(w, np.concatenate([blocks[k] for k in order]))
        b = numpy_helper.to_array(weights["B"])[0]
        rb = b[len(layer.b) :]
        h = layer.n_hidden
        if kind == "gru":  # linear_before_reset=1: b_hn sits in Rbh
            np.testing.assert_array_equal(rb, np.concatenate([np.zeros(2 * h), layer.b_hn]))
        else:
            assert not rb.any()


def _synthetic_digits(shape: tuple[int, ...], n: int, seed: int):
    """Float32 inputs and labels from a fixed random linear rule: learnable."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *shape)).astype(np.float32)
    w = rng.standard_normal((math.prod(shape), 4))
    return x, (x.reshape(n, -1) @ w).argmax(axis=1).astype(np.int64)


_TRAINED = {
    "mlp": ((64,), [dlfs.dense(32, dlfs.ReLU()), dlfs.Dropout(0.2), dlfs.dense(4)]),
    "cnn": (
        (1, 8, 8),
        [
            dlfs.conv2d(4, 3, padding="same", activation=dlfs.ReLU()),
            dlfs.MaxPool2D(2),
            dlfs.Flatten(),
            dlfs.dense(16, dlfs.ReLU()),
            dlfs.Dropout(0.25),
            dlfs.dense(4),
        ],
    ),
    "row_lstm": ((8, 8), [dlfs.lstm(12), dlfs.dense(4)]),
}


@pytest.mark.parametrize("kind", sorted(_TRAINED))
def test_export_onnx_trained_networks_agree(tmp_path, kind):
    """The examples' three kinds of network, trained briefly on learnable synthetic
    data: ONNX Runtime's outputs equal predict's to 1e-5 and every argmax agrees."""
    ort = pytest.importorskip("onnxruntime")
    shape, layers = _TRAINED[kind]
    x, y = _synthetic_digits(shape, 256, seed=3)
    net = dlfs.network(0, shape, layers, dlfs.SoftmaxCrossEntropy())
    trained, history = dlfs.fit(net, dlfs.Adam(3e-3), x, y, epochs=2, batch_size=32, seed=1)
    assert history.train_loss[-1] < history.train_loss[0]
    dlfs.export_onnx(trained, tmp_path / "net.onnx", input_name="images", output_name="logits")
    session = ort.InferenceSession(str(tmp_path / "net.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    (logits,) = session.run(["logits"], {"images": x})
    want = trained.predict(x)
    assert _rel_err(logits, want) <= 1e-5
    assert (logits.argmax(axis=1) == want.argmax(axis=1)).all()


def test_exported_file_runs_where_dlfs_is_not_importable(tmp_path):
    """A fresh interpreter with onnxruntime and numpy only (dlfs blocked, run from
    another folder) gives the same outputs from the file alone."""
    pytest.importorskip("onnxruntime")
    net, x = _export_case("lstm_sequences", np.float32, n=4)
    dlfs.export_onnx(net, tmp_path / "net.onnx")
    np.save(tmp_path / "x.npy", x)
    script = (
        "import sys\n"
        "sys.modules['dlfs'] = None  # as if dlfs were not installed\n"
        "try:\n"
        "    import dlfs\n"
        "except ImportError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('dlfs importable')\n"
        "import numpy as np, onnxruntime as ort\n"
        "s = ort.InferenceSession('net.onnx', providers=['CPUExecutionProvider'])\n"
        "np.save('y.npy', s.run(None, {'x': np.load('x.npy')})[0])\n"
        "print('ran', sorted(m for m in sys.modules if m.startswith('dlfs')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-I", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ran ['dlfs']"  # only the blocked entry
    assert _rel_err(np.load(tmp_path / "y.npy"), net.predict(x)) <= 1e-5


class _MyReLU(dlfs.ReLU):
    """A user's subclass: it may compute something else, so no exporter applies to it."""


class _MyDense(dlfs.Dense):
    """A user's subclass with parameters: no PyTorch mapping applies to it."""


def test_export_onnx_refuses_what_it_cannot_export(tmp_path):
    """An unsupported layer is a TypeError naming it (nothing written); bad
    arguments are named too."""
    pytest.importorskip("onnx")
    dense = dlfs.Dense.init(0, 3, 2)
    net = dlfs.Network([dense, _MyReLU()], dlfs.MeanSquaredError(), (3,))
    path = tmp_path / "net.onnx"
    with pytest.raises(TypeError, match=r"cannot export layer 1 \(_MyReLU\).*exports .*Conv2D"):
        dlfs.export_onnx(net, path)
    assert not path.exists() and list(tmp_path.iterdir()) == []
    block = dlfs.Residual((dlfs.Dense.init(0, 3, 3), _MyReLU()))
    nested = dlfs.Network([dense, dlfs.Dense.init(1, 2, 3), block], dlfs.MeanSquaredError(), (3,))
    with pytest.raises(TypeError, match=r"export layer 2 \(Residual\) > layer 1 \(_MyReLU\):"):
        dlfs.export_onnx(nested, path)
    good = dlfs.Network([dense], dlfs.MeanSquaredError(), (3,))
    with pytest.raises(TypeError, match=r"net must be a dlfs\.Network, got Dense"):
        dlfs.export_onnx(dense, path)  # type: ignore[arg-type]
    with pytest.raises(IsADirectoryError, match="path must be a file path"):
        dlfs.export_onnx(good, tmp_path)
    with pytest.raises(ValueError, match="input_name and output_name must differ"):
        dlfs.export_onnx(good, path, input_name="z", output_name="z")
    with pytest.raises(TypeError, match="input_name must be a non-empty str"):
        dlfs.export_onnx(good, path, input_name="")
    with pytest.raises(ValueError, match=r"dtype must be the network's \(float32\) or None"):
        dlfs.export_onnx(good, path, dtype=np.float64)
    assert list(tmp_path.iterdir()) == []


def test_export_onnx_without_onnx_names_the_package(tmp_path, monkeypatch):
    """Without the onnx package: an ImportError saying what to install."""
    monkeypatch.setitem(sys.modules, "onnx", None)
    net, _ = _export_case("dense_2d", np.float32)
    with pytest.raises(ImportError, match=r"pip install onnx"):
        dlfs.export_onnx(net, tmp_path / "net.onnx")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(_EXPORT_CASES))
def test_torch_state_dict_round_trip_is_bit_exact(name, dtype):
    """dlfs -> PyTorch names and layouts -> dlfs gives every array back bit for
    bit (negative zeros included), with the config kept and the input untouched."""
    net, x = _export_case(name, dtype)
    if net.params()[0]:  # a -0.0 bias must survive the bias sums of recurrent layers
        first = [p.copy() for p in net.params()[0]]
        first[-1][0] = -0.0
        net = net.with_params([tuple(first), *net.params()[1:]])
    sd = dlfs.to_torch_state_dict(net)
    assert all(type(v) is np.ndarray and v.flags.writeable for v in sd.values())
    back = dlfs.from_torch_state_dict(net, sd)
    assert type(back) is dlfs.Network and back is not net
    for a, b in zip(_arrays_of(net), _arrays_of(back)):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()
    assert [repr(layer) for layer in back.layers] == [repr(layer) for layer in net.layers]
    np.testing.assert_array_equal(back.predict(x), net.predict(x))


def _arrays_of(net: dlfs.Network) -> list[np.ndarray]:
    return [a for layer in net.layers for a in _arrays(layer)]


def test_torch_state_dict_names_and_layouts():
    """PyTorch's names and layouts: Linear's weight is w.T, Conv2d's w as is,
    BatchNorm's running statistics, recurrent weights transposed, bias_hh zero
    but the GRU's [0, 0, b_hn]."""
    net = dlfs.network(
        0,
        (1, 6, 6),
        [dlfs.conv2d(2, 3), dlfs.batch_norm(), dlfs.Flatten(), dlfs.dense(3)],
        dlfs.MeanSquaredError(),
    )
    sd = dlfs.to_torch_state_dict(net)
    assert list(sd) == [
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
        "3.weight",
        "3.bias",
    ]
    np.testing.assert_array_equal(sd["3.weight"], net.layers[3].w.T)
    np.testing.assert_array_equal(sd["0.weight"], net.layers[0].w)
    assert sd["1.num_batches_tracked"].dtype == np.int64 and sd["1.num_batches_tracked"].shape == ()
    gru, _ = _export_case("gru_last", np.float64)
    sd = dlfs.to_torch_state_dict(gru)
    layer = gru.layers[0]
    assert sd["0.weight_ih_l0"].shape == (9, 4) and sd["0.weight_hh_l0"].shape == (9, 3)
    np.testing.assert_array_equal(sd["0.bias_hh_l0"], np.concatenate([np.zeros(6), layer.b_hn]))
    sd["0.weight_ih_l0"][0, 0] = 123.0  # a copy: the layer is untouched
    assert layer.w_ih[0, 0] != 123.0


def test_from_torch_state_dict_folds_pytorch_biases():
    """A PyTorch state dict with bias_hh != 0 loads as b = bias_ih + bias_hh
    (GRU: r and z parts; b_hn = the n part)."""
    rng = np.random.default_rng(2)
    for name in ("lstm_last", "gru_last", "rnn_last"):
        net, _ = _export_case(name, np.float64)
        sd = dlfs.to_torch_state_dict(net)
        bias_ih, bias_hh = rng.standard_normal((2, *sd["0.bias_ih_l0"].shape))
        back = dlfs.from_torch_state_dict(
            net, {**sd, "0.bias_ih_l0": bias_ih, "0.bias_hh_l0": bias_hh}
        )
        layer = back.layers[0]
        if name == "gru_last":
            np.testing.assert_array_equal(layer.b[:6], bias_ih[:6] + bias_hh[:6])
            np.testing.assert_array_equal(layer.b[6:], bias_ih[6:])
            np.testing.assert_array_equal(layer.b_hn, bias_hh[6:])
        else:
            np.testing.assert_array_equal(layer.b, bias_ih + bias_hh)


def test_from_torch_state_dict_names_the_first_mismatch():
    """Missing, extra, misshapen and mistyped entries: each error names its key."""
    net = dlfs.network(0, 3, [dlfs.dense(4, dlfs.ReLU()), dlfs.dense(2)], dlfs.MeanSquaredError())
    sd = dlfs.to_torch_state_dict(net)
    with pytest.raises(ValueError, match=r"state_dict has no '2.weight' \(weight of layer 2"):
        dlfs.from_torch_state_dict(net, {k: v for k, v in sd.items() if k != "2.weight"})
    with pytest.raises(ValueError, match=r"state_dict has key '1.weight', which no layer"):
        dlfs.from_torch_state_dict(net, {**sd, "1.weight": np.zeros(1)})
    with pytest.raises(
        ValueError, match=r"state_dict\['0.weight'\] must have shape \(4, 3\).* got \(3, 4\)"
    ):
        dlfs.from_torch_state_dict(net, {**sd, "0.weight": sd["0.weight"].T})
    with pytest.raises(TypeError, match=r"state_dict\['0.bias'\] must be float32 .* got float64"):
        dlfs.from_torch_state_dict(net, {**sd, "0.bias": sd["0.bias"].astype(np.float64)})
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        dlfs.from_torch_state_dict(net, list(sd.items()))
    with pytest.raises(TypeError, match=r"net must be a dlfs\.Network"):
        dlfs.from_torch_state_dict(sd, sd)  # type: ignore[arg-type]
    custom = dlfs.Network([_MyDense(np.ones((3, 2)), np.zeros(2))], dlfs.MeanSquaredError(), (3,))
    with pytest.raises(TypeError, match=r"layer 0 \(_MyDense\) has no PyTorch mapping"):
        dlfs.to_torch_state_dict(custom)


def _torch_module(torch, layer, in_shape: tuple[int, ...]):
    """The PyTorch module that ``to_torch_state_dict`` documents for ``layer``."""
    nn, F = torch.nn, torch.nn.functional
    simple = {
        dlfs.Linear: nn.Identity,
        dlfs.Sigmoid: nn.Sigmoid,
        dlfs.Tanh: nn.Tanh,
        dlfs.ReLU: nn.ReLU,
        dlfs.SiLU: nn.SiLU,
        dlfs.Flatten: nn.Flatten,
    }
    kind = type(layer)
    if kind in simple:
        return simple[kind]()
    if kind is dlfs.Dense:
        return nn.Linear(layer.in_features, layer.out_features, bias=layer.b is not None)
    if kind is dlfs.LeakyReLU:
        return nn.LeakyReLU(layer.alpha)
    if kind is dlfs.ELU:
        return nn.ELU(layer.alpha)
    if kind is dlfs.GELU:
        return nn.GELU(approximate=layer.approximate)
    if kind is dlfs.Softmax:
        return nn.Softmax(dim=-1)
    if kind is dlfs.Dropout:
        return nn.Dropout(layer.p)
    if kind is dlfs.BatchNorm:
        c = layer.gamma.shape[0]
        return (nn.BatchNorm1d if len(in_shape) == 1 else nn.BatchNorm2d)(c, eps=layer.eps)
    if kind is dlfs.Conv2D:
        (top, bottom), (left, right) = layer.padding
        args = (layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride)

        class PaddedConv2d(nn.Conv2d):  # pads that nn.Conv2d's own padding cannot take
            def forward(self, x):
                return super().forward(F.pad(x, (left, right, top, bottom)))

        return PaddedConv2d(*args)
    if kind in (dlfs.MaxPool2D, dlfs.AvgPool2D):
        pool = nn.MaxPool2d if kind is dlfs.MaxPool2D else nn.AvgPool2d
        return pool(layer.size, layer.stride)
    if kind is dlfs.Embedding:
        return nn.Embedding(layer.n_vocab, layer.dim)
    if kind in (dlfs.LayerNorm, dlfs.SelfAttention, dlfs.PositionalEmbedding):
        return _torch_transformer_module(torch, layer, in_shape)
    if kind in (dlfs.Residual, dlfs.TiedEmbedding):
        return _torch_chain_module(torch, layer, in_shape)
    base = {dlfs.RNN: nn.RNN, dlfs.LSTM: nn.LSTM, dlfs.GRU: nn.GRU}[kind]
    sequences = layer.return_sequences

    class Recurrent(base):  # keeps the output sequence, or its last step
        def forward(self, x):
            out = super().forward(x)[0]
            return out if sequences else out[:, -1]

    return Recurrent(layer.n_in, layer.n_hidden, batch_first=True)


def _torch_transformer_module(torch, layer, in_shape: tuple[int, ...]):
    nn = torch.nn
    if isinstance(layer, dlfs.LayerNorm):
        affine, bias = layer.gamma is not None, layer.beta is not None
        return nn.LayerNorm(in_shape[-1], layer.eps, elementwise_affine=affine, bias=bias)
    if isinstance(layer, dlfs.PositionalEmbedding):

        class Positions(nn.Embedding):  # GPT-2's wpe, added to its input
            def forward(self, x):
                return x + self.weight[: x.shape[1]]

        return Positions(*layer.w.shape)
    causal = layer.causal

    class Attention(nn.MultiheadAttention):  # self-attention, the causal mask as nanoGPT's
        def forward(self, x):
            t = x.shape[1]
            mask = torch.triu(torch.ones(t, t, dtype=torch.bool), 1) if causal else None
            return super().forward(x, x, x, attn_mask=mask, need_weights=False)[0]

    return Attention(layer.dim, layer.n_heads, bias=layer.b_o is not None, batch_first=True)


def _torch_chain_module(torch, layer, in_shape: tuple[int, ...]):
    """Residual: x + Sequential(layers)(x); TiedEmbedding: a Sequential of its layers
    with the shared ``weight`` used for the lookup and the output head."""
    shape = (*in_shape, layer.dim) if isinstance(layer, dlfs.TiedEmbedding) else in_shape
    shapes = [shape, *dlfs._chain_shapes(layer.layers, shape)]
    subs = [_torch_module(torch, sub, s) for sub, s in zip(layer.layers, shapes)]
    if isinstance(layer, dlfs.Residual):

        class Residual(torch.nn.Sequential):
            def forward(self, x):
                return x + super().forward(x)

        return Residual(*subs)

    class Tied(torch.nn.Sequential):
        def __init__(self, *modules):
            super().__init__(*modules)
            self.weight = torch.nn.Parameter(torch.empty(*layer.w.shape))

        def forward(self, ids):
            h = super().forward(torch.nn.functional.embedding(ids, self.weight))
            return h @ self.weight.T

    return Tied(*subs)


def _torch_model(torch, net: dlfs.Network):
    shapes = [net.input_shape, *dlfs._chain_shapes(net.layers, net.input_shape)]
    modules = [_torch_module(torch, layer, shape) for layer, shape in zip(net.layers, shapes)]
    return torch.nn.Sequential(*modules)


@pytest.mark.parametrize("name", sorted(_EXPORT_CASES))
def test_torch_model_from_exported_weights_matches_predict(name):
    """The nn.Sequential that ``to_torch_state_dict`` documents, loaded with its
    state dict (strict: every key used, none missing), gives predict's outputs
    to 1e-12 in float64; its own state dict reads back into dlfs bit for bit."""
    torch = pytest.importorskip("torch", reason="PyTorch is optional: pip install torch")
    net, x = _export_case(name, np.float64)
    model = _torch_model(torch, net).double().eval()
    model.load_state_dict(
        {k: torch.from_numpy(v) for k, v in dlfs.to_torch_state_dict(net).items()}
    )
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()
    want = net.predict(x)
    assert got.shape == want.shape
    assert _rel_err(got, want) <= 1e-12
    back = dlfs.from_torch_state_dict(net, model.state_dict())
    for a, b in zip(_arrays_of(net), _arrays_of(back)):
        assert a.tobytes() == b.tobytes()


# --------------- examples: each script runs small and prints key=value lines


@pytest.mark.parametrize("preset", ["default", "tutorial"])
def test_mnist_mlp_example_smoke(tmp_path, monkeypatch, capsys, preset):
    """The example runs end to end on a tiny generated npz and prints key=value lines."""
    mnist_mlp = _example("mnist_mlp", monkeypatch)
    args = ["--data", str(_tiny_mnist_npz(tmp_path)), "--epochs", "2", "--val-size", "8"]
    result = mnist_mlp.main([*args, "--preset", preset])
    out = capsys.readouterr().out
    assert f"test_acc={result['test_acc']:.4f}" in out
    assert f"epochs={result['epochs']}" in out and "train_s=" in out
    assert 0.0 <= result["test_acc"] <= 1.0 and 1 <= result["epochs"] <= 2


@pytest.mark.parametrize("model", ["mlp", "lstm"])
def test_export_onnx_example_smoke(tmp_path, monkeypatch, capsys, model):
    """Train one epoch on a tiny npz, export, run ONNX Runtime: key=value lines
    with the agreement figures; then the same from a saved checkpoint."""
    pytest.importorskip("onnxruntime")
    export_onnx = _example("export_onnx", monkeypatch)
    npz, out = str(_tiny_mnist_npz(tmp_path)), str(tmp_path / "net.onnx")
    common = ["--data", npz, "--out", out, "--repeat", "1", "--batch", "4"]
    result = export_onnx.main([*common, "--model", model])
    kv = _key_values(capsys.readouterr().out)
    keys = {"max_rel_err", "argmax_agree", "test_acc", "onnx_test_acc"}
    assert keys | {"dlfs_samples_per_s", "onnxruntime_samples_per_s", "model"} <= set(kv)
    assert result["max_rel_err"] <= 1e-5 and result["argmax_agree"] == 1.0
    assert result["test_acc"] == result["onnx_test_acc"] and kv["model"] == model
    assert Path(out).stat().st_size > 0

    net = dlfs.network(4, (784,), [dlfs.dense(10)], dlfs.SoftmaxCrossEntropy())
    dlfs.save(tmp_path / "ckpt.npz", net)
    again = export_onnx.main([*common, "--checkpoint", str(tmp_path / "ckpt.npz")])
    assert again["max_rel_err"] <= 1e-5 and again["argmax_agree"] == 1.0
    assert _key_values(capsys.readouterr().out)["model"] == "checkpoint"


def test_xor_example_smoke(monkeypatch, capsys):
    """A few epochs: four predictions and an xor_correct count; the default run solves XOR."""
    xor = _example("xor", monkeypatch)
    correct = xor.main(["--epochs", "5"])
    out = capsys.readouterr().out
    rows = re.findall(r"^\[([01]), ([01])\] -> ([+-]\d\.\d{4})  \(target ([01])\)$", out, re.M)
    assert [(a, b, t) for a, b, _, t in rows] == [
        ("0", "0", "0"),
        ("0", "1", "1"),
        ("1", "0", "1"),
        ("1", "1", "0"),
    ]
    assert isinstance(correct, int) and 0 <= correct <= 4
    assert _key_values(out) == {"xor_correct": str(correct)}
    # the full default run (1000 epochs, seed 0) takes well under a second
    assert xor.main([]) == 4
    assert _key_values(capsys.readouterr().out) == {"xor_correct": "4"}


def test_mnist_cnn_example_smoke(tmp_path, monkeypatch, capsys):
    """The CNN example on a tiny npz, narrow and for one epoch: summary shapes and key=value lines."""
    mnist_cnn = _example("mnist_cnn", monkeypatch)
    args = ["--data", str(_tiny_mnist_npz(tmp_path)), "--width", "2", "--epochs", "1"]
    mnist_cnn.main([*args, "--batch-size", "16", "--holdout", "8"])
    out = capsys.readouterr().out
    kv = _key_values(out)
    assert {"test_acc", "epochs", "train_s", "batch_size", "seed", "width", "train_loss"} <= set(kv)
    assert 0.0 <= float(kv["test_acc"]) <= 1.0
    assert (kv["epochs"], kv["batch_size"], kv["width"], kv["seed"]) == ("1", "16", "2", "0")
    assert math.isfinite(float(kv["train_loss"])) and float(kv["train_s"]) >= 0
    assert re.search(r"epoch 1: train_loss=\S+ val_loss=\S+ val_accuracy=", out)  # --holdout
    # the summary's shapes: 28 -> pool -> 14 -> pool -> 7, width 2 then 4 channels
    shapes = re.findall(r"\(N, [\d, ]+\)", out)
    for shape in ["(N, 1, 28, 28)", "(N, 2, 28, 28)", "(N, 4, 7, 7)", "(N, 196)", "(N, 10)"]:
        assert shape in shapes
    assert shapes[-1] == "(N, 10)" and mnist_cnn.build(0, 2).output_shape == (10,)


def test_data_parallel_example_under_mpiexec(tmp_path):
    """mpiexec -n 2 on a tiny npz: rank 0 alone prints (fit's epoch lines too), and the
    key=value lines are there."""
    npz = _tiny_mnist_npz(tmp_path)
    args = ["examples/data_parallel.py", "--data", str(npz), "--epochs", "2", "--batch-size", "16"]
    out = _run_mpi(2, args).stdout
    kv = _key_values(out)
    assert kv["ranks"] == "2" and 0.0 <= float(kv["test_acc"]) <= 1.0
    assert float(kv["samples_per_s"]) > 0 and float(kv["allreduce_ms"]) > 0
    assert float(kv["stop_flag_us"]) > 0
    assert kv["allreduce_bytes"] == str(4 * (784 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10))
    assert out.count("test_acc=") == 1 and len(re.findall(r"^epoch \d", out, re.M)) == 2


def test_sweep_example_runs_the_grid_and_writes_every_run(tmp_path, monkeypatch, capsys):
    """A 2 x 2 grid on a tiny npz, in this process: one table line and one CSV row per run,
    and the best run (by validation accuracy, the first of equals) in the key=value lines."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, os.environ.get(var, "1"))  # sweep.py's setdefault: undone after
    sweep = _example("sweep", monkeypatch)
    csv_path = tmp_path / "runs.csv"
    args = ["--data", str(_tiny_mnist_npz(tmp_path)), "--val-size", "8", "--csv", str(csv_path)]
    result = sweep.main([*args, "--lrs", "0.01,0.001", "--batch-sizes", "8,16"])
    kv = _key_values(capsys.readouterr().out)
    rows = csv_path.read_text().splitlines()
    assert rows[0] == "lr,batch_size,val_acc,test_acc,train_loss" and len(rows) == 5
    grid = [tuple(row.split(",")[:2]) for row in rows[1:]]
    assert grid == [("0.01", "8"), ("0.01", "16"), ("0.001", "8"), ("0.001", "16")]
    val_accs = [float(row.split(",")[2]) for row in rows[1:]]
    best = rows[1 + val_accs.index(max(val_accs))].split(",")
    assert (kv["runs"], kv["best_lr"], kv["best_batch_size"]) == ("4", best[0], best[1])
    assert kv["best_val_acc"] == f"{float(best[2]):.4f}" and result["best_test_acc"] == float(
        best[3]
    )


def test_adding_example_data_and_smoke(monkeypatch, capsys):
    adding = _example("adding", monkeypatch)
    x, y = adding.adding_data((3,), 20000, 10)
    assert x.shape == (20000, 10, 2) and y.shape == (20000, 1) and x.dtype == np.float32
    markers = x[:, :, 1]
    assert np.all(markers.sum(axis=1) == 2)
    assert np.all(markers[:, :5].sum(axis=1) == 1)  # one marker in each half
    np.testing.assert_allclose(y[:, 0], (x[:, :, 0] * markers).sum(axis=1), rtol=1e-6)
    assert np.mean((y - 1.0) ** 2) == pytest.approx(1 / 6, abs=0.01)  # the 0.167 baseline
    args = ["--steps", "6", "--epochs", "1", "--train-size", "40", "--test-size", "10"]
    results = adding.main([*args, "--hidden", "3", "--batch-size", "20"])
    out = capsys.readouterr().out
    kv = _key_values(out)
    assert set(results) == {"rnn_mse", "lstm_mse", "gru_mse"}
    for name, value in results.items():
        assert kv[name] == f"{value:.5f}" and math.isfinite(value)
    assert {"baseline_mse", "steps", "epochs", "seed"} <= set(kv)
    assert re.search(r"^LSTM +\d+ +\d\.\d{5} +\d+\.\d$", out, re.M)  # train_s to 0.1 s
    adding.main([*args, "--hidden", "3", "--batch-size", "20", "--cells", "gru", "--verbose"])
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("cell"))
    assert lines[header - 2] == "GRU:" and lines[header + 1].startswith("GRU ")
    assert [i for i, line in enumerate(lines) if line.startswith("epoch ")] == [header - 1]


@pytest.mark.parametrize(
    "name",
    [
        "adding",
        "boston",
        "char_gpt",
        "char_rnn",
        "data_parallel",
        "export_onnx",
        "mnist_cnn",
        "mnist_lstm",
        "mnist_mlp",
        "sweep",
        "xor",
    ],
)
def test_example_help_shows_the_defaults(monkeypatch, capsys, name):
    with pytest.raises(SystemExit) as info:
        _example(name, monkeypatch).main(["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "--seed SEED" in out
    seed = out[out.index("\n  --seed SEED") + 1 :].split("\n  -")[0]  # its help, not usage
    assert re.search(r"\(default: \d+\)", seed), seed  # the seed's default, written out
    assert "(default: None)" not in out


def test_mnist_lstm_example_smoke(tmp_path, monkeypatch, capsys):
    """Row-by-row MNIST on a tiny generated npz: 28 steps of 28 pixels, key=value lines."""
    mnist_lstm = _example("mnist_lstm", monkeypatch)
    args = ["--data", str(_tiny_mnist_npz(tmp_path)), "--epochs", "1", "--hidden", "4"]
    result = mnist_lstm.main([*args, "--batch-size", "16", "--holdout", "8"])
    out = capsys.readouterr().out
    kv = _key_values(out)
    assert {"test_acc", "epochs", "train_s", "batch_size", "hidden", "seed", "train_loss"} <= set(
        kv
    )
    assert kv["test_acc"] == f"{result['test_acc']:.4f}" and 0.0 <= result["test_acc"] <= 1.0
    assert (kv["epochs"], kv["hidden"]) == ("1", "4")
    assert re.search(r"epoch 1: train_loss=\S+ val_loss=\S+ val_accuracy=", out)
    shapes = re.findall(r"\(N, [\d, ]+\)", out)
    assert shapes == ["(N, 28, 28)", "(N, 4)", "(N, 10)"]


def test_char_rnn_example_learns_a_small_text(tmp_path, monkeypatch, capsys):
    """Truncated BPTT on a small generated text: segments tile the streams in order,
    the loss falls from epoch to epoch, and sampling gives ids of the vocabulary."""
    char_rnn = _example("char_rnn", monkeypatch)
    rng = np.random.default_rng(0)
    words = ["abc", "abd", "xyz", "hello", "world"]
    text = " ".join(words[i] for i in rng.integers(0, len(words), 400))
    path = tmp_path / "tiny.txt"
    path.write_text(text, encoding="utf-8")
    data = char_rnn.streams(np.arange(103), 4)
    segs = char_rnn.segments(data, 7)
    np.testing.assert_array_equal(np.concatenate([s[0] for s in segs], axis=1), data[:, :-1])
    np.testing.assert_array_equal(np.concatenate([s[1] for s in segs], axis=1), data[:, 1:])
    args = ["--text", str(path), "--epochs", "4", "--hidden", "24", "--embed", "8"]
    result = char_rnn.main([*args, "--seq-len", "20", "--batch-size", "8", "--sample-length", "30"])
    out = capsys.readouterr().out
    losses = result["losses"]
    assert len(losses) == 4 and np.all(np.diff(losses) < 0)
    assert losses[-1] < 0.7 * losses[0]
    assert len(result["sample"]) == 30 and set(result["sample"]) <= set(range(result["vocab"]))
    kv = _key_values(out)
    assert kv["loss_last"] == f"{losses[-1]:.4f}" and kv["vocab"] == str(len(set(text)))
    assert re.search(r"^epoch 4: loss=\S+ \(\S+ bits/char\)$", out, re.M)


def test_char_gpt_example_learns_a_small_text(tmp_path, monkeypatch, capsys):
    """The baby-GPT example at toy size: the whole validation split is tiled by its
    windows, the loss falls, and its key=value lines agree with what it returns."""
    char_gpt = _example("char_gpt", monkeypatch)
    x, y = char_gpt.whole_split(np.arange(23), 5)
    assert x.shape == (4, 5) and (y == x + 1).all() and y.max() == 20
    rng = np.random.default_rng(0)
    words = ["abc", "abd", "xyz", "hello", "world"]
    text = " ".join(words[i] for i in rng.integers(0, len(words), 600))
    path = tmp_path / "tiny.txt"
    path.write_text(text, encoding="utf-8")
    sizes = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16"]
    args = ["--text", str(path), "--iters", "60", "--eval-interval", "30", "--lr", "1e-2"]
    result = char_gpt.main([*args, *sizes, "--eval-windows", "40", "--sample-length", "25"])
    out = capsys.readouterr().out
    kv = _key_values(out)
    first = float(re.search(r"^step 0: train loss ([\d.]+), val loss ([\d.]+),", out, re.M)[2])
    assert result["val_loss"] < 0.7 * first  # from about log(vocab) to well below
    assert kv["val_loss"] == f"{result['val_loss']:.4f}" and kv["iters"] == "60"
    assert kv["params"] == str(result["params"]) and float(kv["ms_per_iter"]) > 0
    assert re.search(r"^step 60: train loss \S+, val loss \S+", out, re.M)
    assert len(result["sample"]) == 25 and result["sample"].max() < len(set(text))


# --------------------------------------------- README: its Python blocks run


def test_readme_python_blocks_run(monkeypatch):
    blocks = _readme_blocks()
    assert blocks, "README.md has no ```python code block"
    monkeypatch.chdir(HERE)
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"README.md[python block {i}]", "exec"), {"__name__": "__readme__"})
        except Exception as err:
            pytest.fail(f"README python block {i} failed: {err!r}\n{code}")


@pytest.mark.parametrize("name", ["docs/examples.md", "docs/performance.md", "docs/distributed.md"])
def test_docs_python_blocks_run(monkeypatch, name):
    monkeypatch.chdir(HERE)
    for i, code in enumerate(_readme_blocks(name)):
        try:
            exec(compile(code, f"{name}[python block {i}]", "exec"), {"__name__": "__docs__"})
        except Exception as err:
            pytest.fail(f"{name} python block {i} failed: {err!r}\n{code}")


def test_readme_is_a_short_guide_linking_the_long_material():
    """Read top to bottom in ten minutes: a table of contents whose links all land,
    and the docs it points to exist; the two commands stay at the top."""
    text = (HERE / "README.md").read_text()
    anchors = {
        re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.*)$", text, re.M)
    }
    for target in re.findall(r"\]\(#([^)]+)\)", text):
        assert target in anchors, f"README links to #{target}, which is no heading"
    for path in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (HERE / path).is_file(), path
    assert len(text.splitlines()) < 575  # with the Transformers and Export sections
    top = text.split("## Contents")[0]
    assert 'pip install -e ".[examples]" && python examples/boston.py' in top
    ci = (HERE / ".ci" / "run").read_text().splitlines()
    assert "python -m pytest -q" in ci and top.count("&& python -m pytest -q\n") == 1


@pytest.mark.parametrize(
    "right, wrong",
    [
        ("dy * (s + self.beta * x * slope)", "dy * (s + x * slope)"),  # dx without beta
        ("(dy * x * x * slope).sum(axis=0)", "(dy * x * slope).sum(axis=0)"),  # dbeta
    ],
)
def test_readme_own_layer_fails_with_a_wrong_backward(monkeypatch, right, wrong):
    """The README's "Write your own layer" block, with one gradient formula broken
    and its direct check_layer line taken out, fails in its Hypothesis test."""
    block = _own_layer_block()
    direct = [
        line for line in block.splitlines() if line.startswith("print(") and "check_layer" in line
    ]
    assert right in block and len(direct) == 1
    code = block.replace(right, wrong).replace(direct[0], "")
    monkeypatch.chdir(HERE)
    with pytest.raises(dlfs.GradientCheckError):
        exec(compile(code, "README.md[own layer, broken]", "exec"), {"__name__": "__readme__"})


# ------------ the quickstart notebook: stored without outputs, runs headless


def test_quickstart_notebook_is_stored_without_outputs():
    nb = json.loads(_NOTEBOOK.read_text())
    code = [cell for cell in nb["cells"] if cell["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)


def test_quickstart_notebook_runs_headless(tmp_path):
    """Executes every cell in a fresh kernel on the synthetic data (DLFS_DATA and DLFS_MNIST
    unset), importing this checkout's dlfs.py; each cell gets at most 60 s."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(_NOTEBOOK, as_version=4)
    env = {k: v for k, v in os.environ.items() if k not in ("DLFS_DATA", "DLFS_MNIST")}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    env["HOME"] = str(home)
    client = nbclient.NotebookClient(
        nb, timeout=60, kernel_name="python3", resources={"metadata": {"path": str(work)}}
    )
    client.execute(env=env)
    results = [
        out["data"]
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out["output_type"] in ("execute_result", "display_data")
    ]
    plain = [r["text/plain"] for r in results]
    assert any(p.startswith("Network((784,) -> (10,), 4 layers, 101,770 params") for p in plain)
    history = next(r for r in results if r["text/plain"].startswith("History("))
    assert "5 epochs" in history["text/plain"] and "<table>" in history["text/html"]
    assert sum("image/png" in r for r in results) == 2  # curves and digits, each shown once
    scores = next(p for p in plain if p.startswith("{'loss'"))
    assert float(re.search(r"'accuracy': ([\d.]+)", scores).group(1)) > 0.8
    assert plain[-1].startswith("Checkpoint(Network(")
    assert os.listdir(work) == [] and not (home / ".cache" / "dlfs").exists()  # no downloads


# ----- the file alone and its documentation: imports, public names, defaults


def test_file_works_alone(tmp_path):
    (tmp_path / "dlfs.py").write_bytes((HERE / "dlfs.py").read_bytes())
    script = (
        "import numpy as np, dlfs\n"
        f"assert dlfs.__file__.startswith({str(tmp_path)!r})\n"
        "rng = np.random.default_rng(0)\n"
        "x = rng.standard_normal((32, 2)).astype(np.float32)\n"
        "y = (x @ np.array([[1.0], [-1.0]], np.float32))\n"
        "net = dlfs.network(0, 2, [dlfs.dense(4, dlfs.Tanh()), dlfs.dense(1)], dlfs.MeanSquaredError())\n"
        "trained, h = dlfs.fit(net, dlfs.SGD(0.05), x, y, epochs=20, batch_size=8)\n"
        "assert h.train_loss[-1] < h.train_loss[0]\n"
        "print('ok', dlfs.__version__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok " + dlfs.__version__)


def test_installed_dlfs_imports_from_the_folder_holding_a_clone_named_dlfs(tmp_path):
    """A notebook started in the folder that holds a clone called ``dlfs`` (so ``dlfs/``,
    without ``__init__.py``, sits in the current directory) must import the installed
    module, not an empty namespace package: ``pip install -e .`` must put this checkout
    on sys.path (a .pth entry) rather than behind an import hook that runs after the
    path search.  Needs dlfs installed, as CI's ``pip install -e`` does."""
    import importlib.metadata

    try:
        importlib.metadata.distribution("dlfs")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("dlfs is not installed here (CI installs it with pip install -e .)")
    (tmp_path / "dlfs").mkdir()
    (tmp_path / "dlfs" / "README.md").write_text("a clone of dlfs, seen from its parent\n")
    # this checkout off PYTHONPATH, so that the installed dlfs is the one found
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    kept = [p for p in paths if p and not (Path(p) / "dlfs.py").is_file()]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(kept)}
    script = "import dlfs; print(dlfs.__file__); print(dlfs.network.__name__)"
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[1:] == ["network"]
    assert result.stdout.split()[0].endswith("dlfs.py")


def _public_docstrings():
    """(name, docstring) of the module, each public name, and each class's own
    methods and properties: what the API reference shows."""
    yield "dlfs", dlfs.__doc__
    for name in dlfs.__all__:
        obj = getattr(dlfs, name)
        yield name, getattr(obj, "__doc__", None) if callable(obj) else None
        if isinstance(obj, type) and obj.__module__ == "dlfs":
            for attr, member in vars(obj).items():
                if not attr.startswith("_") and (callable(member) or isinstance(member, property)):
                    yield f"{name}.{attr}", member.__doc__


def test_api_reference_renders_formulas_as_written():
    """pdoc's Markdown reads a*b*c as a<em>b</em>c: formulas with * go in code spans, so
    no docstring renders with emphasis glued to a word or a bracket."""
    pytest.importorskip("pdoc")
    from pdoc import docstrings, render_helpers

    glued = re.compile(r"[\w)\]]<em>|</em>[\w(\[]")
    bad = []
    for name, doc in _public_docstrings():
        if doc:
            html = render_helpers.to_html(docstrings.convert(doc, "restructuredtext", None))
            bad += [f"{name}: {line}" for line in html.splitlines() if glued.search(line)]
    assert not bad, "\n".join(bad)


def test_file_imports_only_stdlib_numpy_attrs():
    """At import: numpy and attrs only.  Inside functions, for optional extras only,
    tqdm (progress=True), matplotlib (History.plot) and onnx (export_onnx), each
    behind an ImportError."""
    tree = ast.parse((HERE / "dlfs.py").read_text())
    assert _imported(tree.body) <= {"numpy", "attrs"}
    assert _imported(ast.walk(tree)) <= {"numpy", "attrs", "tqdm", "matplotlib", "onnx"}


def test_public_names_exist_and_are_documented():
    assert isinstance(dlfs.__version__, str) and dlfs.__version__
    for name in dlfs.__all__:
        obj = getattr(dlfs, name)
        if name in ("__version__", "EVAL"):
            continue
        assert (obj.__doc__ or "").strip(), f"dlfs.{name} has no docstring"


def test_documented_defaults():
    """The defaults the docstrings, the README and PyTorch give."""
    assert dlfs.SGD().lr == 0.01 and dlfs.SGD().weight_decay == 0.0
    assert (dlfs.Momentum().lr, dlfs.Momentum().momentum) == (0.01, 0.9)
    assert dlfs.Nesterov().nesterov and not dlfs.Momentum().nesterov
    assert (dlfs.AdaGrad().lr, dlfs.AdaGrad().eps) == (0.01, 1e-10)
    assert (dlfs.RMSProp().lr, dlfs.RMSProp().alpha, dlfs.RMSProp().eps) == (0.01, 0.99, 1e-8)
    adam, adamw = dlfs.Adam(), dlfs.AdamW()
    assert (adam.lr, adam.b1, adam.b2, adam.eps, adam.weight_decay) == (1e-3, 0.9, 0.999, 1e-8, 0)
    assert (adamw.lr, adamw.b1, adamw.b2, adamw.eps) == (1e-3, 0.9, 0.999, 1e-8)
    assert adamw.weight_decay == 0.01 and adamw.decoupled and not adam.decoupled
    assert dlfs.LeakyReLU().alpha == 0.01 and dlfs.ELU().alpha == 1.0 and dlfs.Dropout().p == 0.5
    bn = dlfs.BatchNorm.init(2)
    assert (bn.momentum, bn.eps) == (0.1, 1e-5)
    assert dlfs.SoftmaxCrossEntropy().label_smoothing == 0.0
    assert inspect.signature(dlfs.fit).parameters["batch_size"].default == 32
    grads_defaults = {
        k: p.default for k, p in inspect.signature(dlfs.check_grads).parameters.items()
    }
    assert {k: grads_defaults[k] for k in ("directions", "eps", "atol", "rtol")} == {
        "directions": 3,
        "eps": 1e-6,
        "atol": 1e-7,
        "rtol": 1e-6,
    }
    assert dlfs._STRUCTURE_MAX == 64 * 2**20 and dlfs._META_DEPTH == 64  # as the README says


def test_module_docstring_maps_the_sections_in_file_order():
    """The module docstring's numbered map names every banner of dlfs.py, in order."""
    banners = _BANNER.findall((HERE / "dlfs.py").read_text())
    mapped = re.findall(r"^\d+\. \*\*(.+?)\*\*", dlfs.__doc__, re.M)
    assert len(banners) >= 10
    assert mapped == banners


def test_public_names_listed_in_the_order_of_the_file():
    """``__all__`` (hence the API reference) follows the file's order, and the
    module docstring's map names each public name under its section, in order."""
    source = (HERE / "dlfs.py").read_text()
    lines = _top_level_names(ast.parse(source))
    names = [n for n in dlfs.__all__ if n != "__version__"]
    assert [n for n in names if n not in lines] == []
    assert names == sorted(names, key=lines.__getitem__)
    doc = dlfs.__doc__
    mapped = re.findall(r"`(\w+)`", doc[doc.index("1. **") : doc.index("Type aliases")])
    assert mapped == names


def test_every_public_name_has_an_example_and_protocols_have_docs():
    """Every public name's docstring carries a ``>>>`` example (run as a doctest);
    every method of a public Protocol is documented or is its only ``__call__``."""
    for name in dlfs.__all__:
        if name in ("__version__", "EVAL"):
            continue
        doc = inspect.getdoc(getattr(dlfs, name)) or ""
        assert ">>>" in doc, f"dlfs.{name} has no example"
    protocols = [
        getattr(dlfs, n) for n in dlfs.__all__ if getattr(getattr(dlfs, n), "_is_protocol", False)
    ]
    assert {p.__name__ for p in protocols} >= {"Layer", "Loss", "Optimizer", "LayerSpec", "Metric"}
    for proto in protocols:
        methods = [m for m in vars(proto) if callable(vars(proto)[m]) and not m.startswith("_")]
        for m in methods:
            assert (vars(proto)[m].__doc__ or "").strip(), (
                f"dlfs.{proto.__name__}.{m} has no docstring"
            )


def test_doctests_run_with_the_test_command(request):
    """``python -m pytest`` (the README's command) collects dlfs.py's docstring
    examples: pyproject.toml's addopts and testpaths say so."""
    assert request.config.getoption("doctestmodules")
    assert "dlfs.py" in request.config.getini("testpaths")
    import doctest

    tests = [t for t in doctest.DocTestFinder().find(dlfs) if t.examples]
    assert len(tests) >= len(dlfs.__all__) - 2  # every public name but __version__ and EVAL


def test_public_signatures_name_protocols_not_any():
    """The arguments that were typed ``Any`` (layers, loss, optimizer, metric,
    progress, comm, activation) now name a Protocol."""
    want = {
        (dlfs.network, "layers"): "Sequence[Layer | LayerSpec]",
        (dlfs.network, "loss"): "Loss",
        (dlfs.fit, "optimizer"): "Optimizer",
        (dlfs.fit, "metric"): "Metric | Literal['auto'] | None",
        (dlfs.fit, "progress"): "bool | ProgressFactory | Literal['auto'] | None",
        (dlfs.fit, "comm"): "Comm | None",
        (dlfs.dense, "activation"): "Layer | None",
        (dlfs.TrainState.create, "optimizer"): "Optimizer",
        (dlfs.check_layer, "layer"): "Layer",
        (dlfs.check_loss, "loss"): "Loss",
        (dlfs.data_parallel_step, "comm"): "Comm",
    }
    for (f, arg), annotation in want.items():
        assert inspect.signature(f).parameters[arg].annotation == annotation, (f, arg)
    assert inspect.signature(dlfs.chain).parameters["parts"].annotation == (
        "Optimizer | GradientTransform | Constraint"
    )
