"""Trust tests (issue 7): checkpoints, resume, non-finite detection, input fuzzing.

Module-level helpers are prefixed ``_trust_`` so this file folds into test_dlfs.py.
"""

from __future__ import annotations

import json
import os
import tempfile

import attrs
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dlfs

# ------------------------------------------------------------------ helpers

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


def _trust_record_config(obj: object) -> dict:
    return {
        f.name: getattr(obj, f.name)
        for f in attrs.fields(type(obj))
        if not isinstance(getattr(obj, f.name), np.ndarray)
    }


def _trust_assert_same_net(a: dlfs.Network, b: dlfs.Network) -> None:
    assert a.input_shape == b.input_shape
    assert type(a.loss) is type(b.loss)
    assert _trust_record_config(a.loss) == _trust_record_config(b.loss)
    assert len(a.layers) == len(b.layers)
    for la, lb in zip(a.layers, b.layers):
        assert type(la) is type(lb)
        assert _trust_record_config(la) == _trust_record_config(lb)
        for f in attrs.fields(type(la)):
            u, v = getattr(la, f.name), getattr(lb, f.name)
            if isinstance(u, np.ndarray):
                assert u.dtype == v.dtype and u.shape == v.shape
                assert u.tobytes() == v.tobytes()
                assert not v.flags.writeable


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


# ----------------------------------------------------------------- round trip


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
    _trust_assert_same_net(state.net, ckpt.net)
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


# ------------------------------------------------------------ damaged files


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
    _trust_assert_same_net(ref.net, ckpt.net)
    _trust_assert_same_opt_state(ref.opt_state, ckpt.opt_state)
    assert ckpt.meta == ref.meta


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


# ---------------------------------------------------------------- atomicity


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
    _trust_assert_same_net(old, dlfs.load(path).net)
    monkeypatch.undo()
    dlfs.save(path, new)
    _trust_assert_same_net(new, dlfs.load(path).net)
    assert os.listdir(tmp_path) == ["c.npz"]


# ------------------------------------------------------------------- resume


def _trust_fit_data(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((40, 4)).astype(np.float32)
    y = (x @ rng.standard_normal((4, 3)) > 0).argmax(axis=1)
    return x, y


@pytest.mark.parametrize("with_validation", [False, True])
def test_resume_is_bit_identical(tmp_path, with_validation):
    net = _trust_net(3, 4, [6, 5], [4, 2], np.float32, "sce", [1, 2])
    opt = dlfs.chain(dlfs.ClipByGlobalNorm(5.0), dlfs.Adam(1e-2))
    x, y = _trust_fit_data()
    kw = dict(batch_size=8, seed=5, shuffle=True, patience=10)
    if with_validation:
        kw["validation"] = (x[:10], y[:10])
    straight, h_straight = dlfs.fit(net, opt, x, y, epochs=4, **kw)
    path = tmp_path / "run.npz"
    dlfs.fit(net, opt, x, y, epochs=2, checkpoint=path, **kw)
    assert dlfs.load(path).meta["dlfs.fit"]["epoch"] == 2
    resumed, h_resumed = dlfs.fit(net, opt, x, y, epochs=4, resume=path, checkpoint=path, **kw)
    _trust_assert_same_net(straight, resumed)
    assert h_straight == h_resumed
    # resuming a finished run trains nothing and returns the same result
    again, h_again = dlfs.fit(net, opt, x, y, epochs=4, resume=path, **kw)
    _trust_assert_same_net(straight, again)
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
    _trust_assert_same_net(straight, out)


def test_resume_rejects_a_different_run(tmp_path):
    net = _trust_net(0, 4, [5], [3], np.float32, "sce", [0])
    x, y = _trust_fit_data()
    path = tmp_path / "run.npz"
    dlfs.fit(net, dlfs.Adam(), x, y, epochs=1, batch_size=8, checkpoint=path)
    for change, match in [
        (dict(batch_size=4), "batch_size"),
        (dict(seed=1), "seed"),
        (dict(shuffle=False), "shuffle"),
    ]:
        kw = dict(batch_size=8, seed=0, shuffle=True) | change
        with pytest.raises(ValueError, match=match):
            dlfs.fit(net, dlfs.Adam(), x, y, epochs=2, resume=path, **kw)
    with pytest.raises(ValueError, match="slots"):
        dlfs.fit(net, dlfs.SGD(), x, y, epochs=2, batch_size=8, resume=path)
    other = _trust_net(0, 4, [6], [3], np.float32, "sce", [0])
    with pytest.raises(ValueError, match="not shaped like"):
        dlfs.fit(other, dlfs.Adam(), x, y, epochs=2, batch_size=8, resume=path)
    with pytest.raises(ValueError, match=r"n=40"):
        dlfs.fit(net, dlfs.Adam(), x[:20], y[:20], epochs=2, batch_size=8, resume=path)
    plain = tmp_path / "plain.npz"
    dlfs.save(plain, net)
    with pytest.raises(ValueError, match="not written by fit"):
        dlfs.fit(net, dlfs.Adam(), x, y, epochs=2, batch_size=8, resume=plain)


# ------------------------------------------------------------- non-finite


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


# ------------------------------------------------------------------- fuzzing

_TRUST_DTYPES = ("float32", "float64", "int64", "uint8", "bool", "complex128", "object", "<U2")


@st.composite
def _trust_arrays(draw):
    """Mostly plausible, often wrong arrays: odd dtypes, shapes, NaN/inf, empty."""
    dtype = draw(st.sampled_from(_TRUST_DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=3)))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    a = rng.standard_normal(shape) * 3
    special = draw(st.sampled_from([None, np.nan, np.inf, -np.inf, 1e308]))
    if special is not None and a.size:
        a.flat[draw(st.integers(0, a.size - 1))] = special
    with np.errstate(all="ignore"):
        if dtype in ("int64", "uint8"):
            return np.nan_to_num(np.abs(a)).astype(dtype)
        if dtype == "<U2":
            return a.astype(str).astype(dtype)
        return a.astype(dtype)


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
    }
    return calls[target]


def _trust_snapshot(x):
    if isinstance(x, np.ndarray):
        return (x.dtype, x.shape, x.tolist() if x.dtype == object else x.tobytes())
    return repr(x)


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
            ]
        )
    )
    args = [data.draw(_trust_arrays()), data.draw(_trust_arrays()), data.draw(_TRUST_BAD_NUMBERS)]
    before = [_trust_snapshot(x) for x in args]
    call = _trust_call(data.draw, target, args)
    with np.errstate(all="ignore"):
        try:
            call()
        except (ValueError, TypeError):
            pass
        except dlfs.NonFiniteError:  # huge learning rates / NaN data in a raw step
            assert target in ("fit_lr", "train_step")
    assert [_trust_snapshot(x) for x in args] == before


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
