"""Tests of Conv2D, MaxPool2D, AvgPool2D and the conv2d builder spec (GUIDE section 4).

To be folded into test_dlfs.py; module-level helpers carry a ``_conv_`` prefix.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dlfs

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


# ------------------------------------------------------------------ Conv2D


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


# ------------------------------------------------------------------- pools


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
