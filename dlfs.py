"""dlfs: deep learning from scratch, in one functional file.

Layers are frozen attrs records of read-only parameter arrays with pure
``forward``/``backward`` methods; a network is a tuple of layers plus a loss;
optimizers are optax-style ``init``/``update`` pairs; a training epoch is
``functools.reduce(train_step, batches, state)``.  Runtime dependencies:
numpy and attrs.  Copy this file into a project and ``import dlfs``.

Conventions: ``N`` is the batch size; shapes in docstrings are for one call.
Where Seth Weidman's *Deep Learning from Scratch* defines something (MSE,
the Trainer's early stopping) dlfs follows the book; elsewhere it matches
PyTorch's documented numbers.

The file reads top to bottom in sections, each opened by a one-line
``# ---- name`` banner; the public names of each, in the order this
reference lists them:

1. **validation**: the private checks behind every error message.
2. **randomness**: `split`, `make_rng`, `Context`, `EVAL`, `train_context`.
3. **display**: private helpers for reprs and HTML tables.
4. **initializers**: `Initializer`, `normal`, `zeros`, `glorot_normal`,
   `glorot_uniform`, `he_normal`, `he_uniform`, `orthogonal`, `scaled`.
5. **layers**: the `Layer` protocol, `Dense`, `Linear`, `Sigmoid`, `Tanh`,
   `ReLU`, `LeakyReLU`, `ELU`, `GELU`, `SiLU`, `Softmax`, `Dropout`,
   `Flatten`, `BatchNorm`.
6. **sequences: embedding and recurrent layers**: `Embedding`, `RNN`,
   `LSTM`, `GRU`.
7. **convolutions and pools**: `Conv2D`, `MaxPool2D`, `AvgPool2D`.
8. **transformers: norms, attention, residual blocks**: `LayerNorm`,
   `SelfAttention`, `PositionalEmbedding`, `Residual`, `TiedEmbedding`.
9. **losses**: the `Loss` protocol, `MeanSquaredError`,
   `SoftmaxCrossEntropy`, `BinaryCrossEntropy`.
10. **networks**: the `LayerSpec` protocol, `DenseSpec`, `dense`,
    `Conv2DSpec`, `conv2d`, `batch_norm`, `embedding`, `rnn`, `lstm`, `gru`,
    `layer_norm`, `self_attention`, `positional_embedding`, `residual`,
    `tied_embedding`, `Summary`, `Network`, `network`, `generate`.
11. **optimizers and schedules**: the `Schedule` protocol, `Constant`,
    `StepDecay`, `ExponentialDecay`, `LinearDecay`, `CosineDecay`; the
    `Optimizer` protocol, `OptState`, `SGD`, `Momentum`, `Nesterov`,
    `AdaGrad`, `RMSProp`, `Adam`, `AdamW`; the `GradientTransform` and
    `Constraint` protocols, `ClipByGlobalNorm`, `WeightDecay`, the `Comm`
    protocol, `AllReduce`, `MaxNorm`, `Chain`, `chain`.
12. **training**: `NonFiniteError`, `TrainState`, `shard`, `train_step`,
    `train_epoch`, `data_parallel_step`, `global_mean_loss`, `sync_state`,
    `StopTraining`, `EpochRecord`, `History`, the `ProgressBar` and
    `ProgressFactory` protocols, `fit`.
13. **metrics**: the `Metric` protocol, `mae`, `rmse`, `accuracy`,
    `binary_accuracy`, `confusion_matrix`.
14. **data utilities**: `to_2d`, `one_hot`, `permute`, `batches`, `random_windows`,
    `load_mnist`.
15. **gradient checks**: `GradientCheckError`, `check_grads`,
    `check_layer`, `check_loss`.
16. **save/load** (checkpoints): `Checkpoint`, `save`, `load`.
17. **export: ONNX and PyTorch**: `export_onnx`, `to_torch_state_dict`,
    `from_torch_state_dict`.

Type aliases in signatures: ``Key = tuple[int, ...]`` (an int seed is
accepted wherever a key is), ``Params = tuple[np.ndarray, ...]`` (one
layer's arrays, in ``params()`` order), ``NetParams = tuple[Params, ...]``
(one tuple per layer), ``FloatDType`` (float32 or float64 as
``np.float32``, ``np.dtype("float64")`` or ``"float32"``), ``Padding``
(``"valid"``, ``"same"``, p, (ph, pw)
or ((top, bottom), (left, right))), ``RecurrentState`` (h, or (h, c) for
an LSTM).  The protocols (``Layer``, ``Loss``, ``Optimizer``, ...) are
structural: any object with the right methods fits, no base class needed.

The examples in the docstrings run as doctests with the test suite
(``python -m pytest``); they assume ``import numpy as np`` and ``import dlfs``:

>>> x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(4, 2)
>>> net = dlfs.network(0, 2, [dlfs.dense(3, dlfs.Tanh()), dlfs.dense(1)], dlfs.MeanSquaredError())
>>> net
Network((2,) -> (1,), 3 layers, 13 params, float32, MeanSquaredError)
>>> net.predict(x).shape
(4, 1)
"""

from __future__ import annotations

import contextlib
import functools
import html
import json
import math
import os
import re
import signal
import sys
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import (
    TYPE_CHECKING,
    Any,
    ClassVar,
    Literal,
    Protocol,
    TypeGuard,
    TypeVar,
    cast,
    runtime_checkable,
)

import attrs
import numpy as np

__version__ = "0.1.0"

if not hasattr(attrs, "Converter"):  # attrs.Converter(takes_self=...) arrived in attrs 24.1
    raise ImportError(f"dlfs needs attrs >= 24.1, found {attrs.__version__}")

# In the order of the file's sections (the API reference follows this order).
__all__ = [
    "__version__",
    # randomness
    "split",
    "make_rng",
    "Context",
    "EVAL",
    "train_context",
    # initializers
    "Initializer",
    "normal",
    "zeros",
    "glorot_normal",
    "glorot_uniform",
    "he_normal",
    "he_uniform",
    "orthogonal",
    "scaled",
    # layers
    "Layer",
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
    "Dropout",
    "Flatten",
    "BatchNorm",
    # sequences: embedding and recurrent layers
    "Embedding",
    "RNN",
    "LSTM",
    "GRU",
    # convolutions and pools
    "Conv2D",
    "MaxPool2D",
    "AvgPool2D",
    # transformers: norms, attention, residual blocks
    "LayerNorm",
    "SelfAttention",
    "PositionalEmbedding",
    "Residual",
    "TiedEmbedding",
    # losses
    "Loss",
    "MeanSquaredError",
    "SoftmaxCrossEntropy",
    "BinaryCrossEntropy",
    # networks
    "LayerSpec",
    "DenseSpec",
    "dense",
    "Conv2DSpec",
    "conv2d",
    "batch_norm",
    "embedding",
    "rnn",
    "lstm",
    "gru",
    "layer_norm",
    "self_attention",
    "positional_embedding",
    "residual",
    "tied_embedding",
    "Summary",
    "Network",
    "network",
    "generate",
    # optimizers and schedules
    "Schedule",
    "Constant",
    "StepDecay",
    "ExponentialDecay",
    "LinearDecay",
    "CosineDecay",
    "Optimizer",
    "OptState",
    "SGD",
    "Momentum",
    "Nesterov",
    "AdaGrad",
    "RMSProp",
    "Adam",
    "AdamW",
    "GradientTransform",
    "Constraint",
    "ClipByGlobalNorm",
    "WeightDecay",
    "Comm",
    "AllReduce",
    "MaxNorm",
    "Chain",
    "chain",
    # training
    "NonFiniteError",
    "TrainState",
    "shard",
    "train_step",
    "train_epoch",
    "data_parallel_step",
    "global_mean_loss",
    "sync_state",
    "StopTraining",
    "EpochRecord",
    "History",
    "ProgressBar",
    "ProgressFactory",
    "fit",
    # metrics
    "Metric",
    "mae",
    "rmse",
    "accuracy",
    "binary_accuracy",
    "confusion_matrix",
    # data utilities
    "to_2d",
    "one_hot",
    "permute",
    "batches",
    "random_windows",
    "load_mnist",
    # gradient checks
    "GradientCheckError",
    "check_grads",
    "check_layer",
    "check_loss",
    # save/load
    "Checkpoint",
    "save",
    "load",
    # export: ONNX and PyTorch
    "export_onnx",
    "to_torch_state_dict",
    "from_torch_state_dict",
]

Key = tuple[int, ...]
Params = tuple[np.ndarray, ...]
NetParams = tuple[Params, ...]
FloatDType = type[np.float32] | type[np.float64] | np.dtype | str  # np.float32, "float64", ...

# Names Keras and PyTorch users reach for, and the dlfs way (see __getattr__).
_OTHER_NAMES = {
    **{
        name: f"activations are layers in dlfs: dlfs.{cls}() (e.g. dlfs.dense(64, dlfs.{cls}()))"
        for name, cls in [
            ("relu", "ReLU"),
            ("sigmoid", "Sigmoid"),
            ("tanh", "Tanh"),
            ("softmax", "Softmax"),
            ("gelu", "GELU"),
            ("elu", "ELU"),
            ("silu", "SiLU"),
            ("swish", "SiLU"),
            ("leaky_relu", "LeakyReLU"),
        ]
    },
    **{
        name: "dlfs builds a model with dlfs.network(key, input_shape, [layers...], loss)"
        for name in ("Sequential", "Model", "Module")
    },
}

if not TYPE_CHECKING:  # invisible to type checkers, so a typo still shows there

    def __getattr__(name: str) -> Any:
        """``dlfs.relu`` and other names from Keras/PyTorch: an AttributeError
        that says the dlfs way; any other unknown name: Python's usual one."""
        fix = _OTHER_NAMES.get(name)
        if fix is None:
            raise AttributeError(f"module 'dlfs' has no attribute {name!r}")
        raise AttributeError(f"module 'dlfs' has no attribute {name!r}: {fix}")

# ---------------------------------------------------------------- validation

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _shape_str(spec: Sequence[int | str | None]) -> str:
    """Format a shape spec: ``None`` is the batch axis N, a string names a free
    axis (``(None, "K")`` -> ``(N, K)``), an int is a fixed size."""
    parts = ["N" if d is None else str(d) for d in spec]
    return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"


def _check_ndarray(name: str, x: Any) -> None:
    """``x`` must be an ``np.ndarray`` or an ``np.memmap`` (a file's data, read-only
    or not, with ndarray's semantics: data larger than memory).  Other subclasses
    (``np.matrix``, masked arrays) change what ``*``, ``sum`` or a mask mean, so
    they are refused."""
    if type(x) is not np.ndarray and not isinstance(x, np.memmap):
        if isinstance(x, np.ndarray):
            raise TypeError(
                f"{name} must be a plain numpy array (or np.memmap), got {type(x).__module__}."
                f"{type(x).__name__} (an ndarray subclass); convert with np.asarray(...) "
                "(a masked array: fill it first, e.g. .filled(0.0))"
            )
        raise TypeError(
            f"{name} must be a numpy array, got {type(x).__name__}; "
            "convert with np.asarray(..., dtype=np.float32)"
        )


def _plain(x: Any) -> Any:
    """An ``np.memmap`` as a plain ndarray view of its data (nothing is copied or
    read), so dlfs's fast paths take it; anything else as it is."""
    return x.view(np.ndarray) if isinstance(x, np.memmap) else x


def _check_float(name: str, x: Any, dtype: np.dtype | None = None) -> None:
    """``x`` must be a float32/float64 ndarray (of ``dtype`` if given)."""
    _check_ndarray(name, x)
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a float32 or float64 array, got dtype {x.dtype}; "
            "dlfs never casts silently: convert with .astype(np.float32)"
        )
    if dtype is not None and x.dtype != dtype:
        raise TypeError(
            f"{name} must have dtype {np.dtype(dtype)} (the network's), got "
            f"{x.dtype}; convert with .astype(np.{np.dtype(dtype)})"
        )


def _check_shape(name: str, x: np.ndarray, spec: Sequence[int | str | None]) -> None:
    """``x.shape`` must match ``spec``; ``None`` and named (str) entries match any size."""
    shape = x.shape
    ok = len(shape) == len(spec)
    if ok:  # a plain loop: this check runs per layer per step
        for want, got in zip(spec, shape):
            if want is not None and want != got and not isinstance(want, str):
                ok = False
                break
    if not ok:
        raise ValueError(f"{name} must have shape {_shape_str(spec)}, got {x.shape}")


def _is_rows(x: Any, d: int, dtype: np.dtype) -> bool:
    """Whether ``x`` is a plain (N, d) array of ``dtype``: the per-call fast path of
    the checks above (anything else goes through them, for their message)."""
    return type(x) is np.ndarray and x.ndim == 2 and x.shape[1] == d and x.dtype == dtype


def _check_nonempty(name: str, x: np.ndarray) -> None:
    if x.size == 0:  # also covers a batch axis of length 0
        raise ValueError(f"{name} must not be empty, got shape {x.shape}")


def _check_xy(x: np.ndarray, y: Any, prefix: str = "") -> None:
    """``y`` is an array with one row per row of ``x`` (x already checked)."""
    _check_ndarray(f"{prefix}y", y)
    if y.ndim == 0 or len(y) != len(x):
        rows = f"{len(y)} in y" if y.ndim else "y is a scalar"
        raise ValueError(
            f"{prefix}x and y must have the same length (one target per sample), got "
            f"{len(x)} rows in x and {rows} (x of shape {x.shape}, y of shape {y.shape})"
        )


def _check_finite(name: str, x: np.ndarray, first_row: int = 0) -> None:
    """ValueError naming the rows (numbered from ``first_row``) with NaN or inf."""
    # Rows in chunks of about 1M elements: a whole-array mask would be a
    # (transient) bool copy of a whole dataset, a quarter of its float32 size.
    if x.ndim == 0 or x.size <= 1 << 20:
        chunks: Iterable[np.ndarray] = (x,)
    else:
        rows = max(1, (1 << 20) // (x.size // len(x)))
        chunks = (x[i : i + rows] for i in range(0, len(x), rows))
    if not all(np.isfinite(c).all() for c in chunks):
        raise ValueError(f"{name} contains NaN or inf{_bad_rows(x, first_row)}; it must be finite")


def _bad_rows(x: np.ndarray, first_row: int) -> str:
    """Where a non-finite array has NaN/inf: " in rows 3, 7 (of 20)" (the first five)."""
    if x.ndim == 0:
        return ""
    bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1)) + first_row
    shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
    count = "" if first_row else f" ({len(bad)} of {len(x)} rows)"  # a chunk's count misleads
    return f" in row{'s' if len(bad) > 1 else ''} {shown}{count}"


def _check_input(
    name: str, x: Any, spec: Sequence[int | str | None], dtype: np.dtype | None = None
) -> np.ndarray:
    """Cheap per-call check of a layer input: float ndarray of shape ``spec``."""
    _check_float(name, x, dtype)
    _check_shape(name, x, spec)
    return x


def _check_number(
    name: str,
    value: Any,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A real, finite Python/numpy number within the given bounds."""
    if isinstance(value, (bool, complex, np.complexfloating)) or not isinstance(
        value, (int, float, np.number)
    ):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if not math.isfinite(value) or too_low or too_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"{name} must be in {lo}{low}, {high}{hi}, got {value}")
    return value


def _check_int(name: str, value: Any, *, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _check_dtype(dtype: Any) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError as err:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from err
    if dt not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def _as_shape(name: str, shape: Any) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, (tuple, list)) or not shape:
        raise TypeError(f"{name} must be an int or a non-empty tuple of ints, got {shape!r}")
    return tuple(_check_int(f"{name}[{i}]", d) for i, d in enumerate(shape))


def _frozen(a: Any, name: str) -> np.ndarray:
    """A read-only float array.  It is copied unless it owns its data and is
    already read-only, so no writeable base can change it."""
    _check_float(name, a)
    if a.flags.writeable or a.base is not None:
        a = _plain(a).copy()
        a.setflags(write=False)
    return a


# attrs converter for array fields: ``_frozen`` with the field's name in messages.
_frozen_field = attrs.Converter(lambda a, field: _frozen(a, field.name), takes_field=True)


def _freeze_new(a: np.ndarray) -> np.ndarray:
    """Mark an array that dlfs just allocated as read-only (no copy)."""
    a.setflags(write=False)
    return a


def _freeze_tree(value: Any) -> None:
    """Mark every array in ``value`` (an array or nested tuples of them) read-only."""
    if isinstance(value, np.ndarray):
        value.setflags(write=False)
    elif isinstance(value, tuple):
        for v in value:
            _freeze_tree(v)


class _ArrayRecord:
    """Base of the records that hold arrays in their fields (layers with parameters
    or state, OptState).  pickle and copy.deepcopy (Dask, multiprocessing) hand
    arrays back writeable; these records come back with them read-only again."""

    __slots__ = ()
    __getstate__: Callable[[], dict[str, Any]]  # what attrs gives its slotted classes
    # A layer's builders from sizes, (spec inside network, classmethod), for the
    # Keras habit ``LSTM(64)``: "{sizes}" becomes the numbers the caller gave.
    _BUILDERS: tuple[str, str] | None = None

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls._BUILDERS is not None and _sizes_not_arrays(cls, args, kwargs):
            raise TypeError(_sizes_hint(cls, args, kwargs))
        return super().__new__(cls)

    def __reduce__(self) -> tuple[Any, ...]:
        return _restore_record, (type(self), self.__getstate__())  # attrs' field dict


def _sizes_not_arrays(cls: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a layer class is called Keras-style: a size first (``LSTM(64)``), or
    none of its fields at all (``BatchNorm()``, ``LSTM(units=64)``)."""
    if args:
        return isinstance(args[0], (int, np.integer)) and not isinstance(args[0], bool)
    return not set(kwargs) & set(_field_names(cls))


def _sizes_hint(cls: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """The fix for ``LSTM(64)`` (sizes where a layer class takes weight arrays)."""
    spec, init = cls._BUILDERS
    given = ", ".join([repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()])
    arrays = ", ".join(f.name for f in attrs.fields(cls) if f.default is attrs.NOTHING)
    return (
        f"dlfs.{cls.__name__}(...) must be given its weight arrays ({arrays}), got "
        f"{cls.__name__}({given}); inside dlfs.network(...) write "
        f"{spec.format(sizes=given if args else '...')} (it infers the input size), or "
        f"draw the weights with {init.format(sizes=given if args else '...')}"
    )


def _restore_record(cls: type, state: dict[str, Any]) -> Any:
    """An ``_ArrayRecord`` from its pickled fields: attrs' own ``__setstate__`` (no
    __init__, as pickle does it), then its arrays made read-only."""
    record = object.__new__(cls)
    record.__setstate__(state)
    for value in state.values():
        _freeze_tree(value)
    return record


def _replace(record: Any, changes: dict[str, Any]) -> Any:
    """``attrs.evolve(record, **changes)`` without the converters and checks, for
    values known to fit (e.g. read-only arrays a dlfs optimizer just made, of the
    old ones' shapes and dtypes); the other fields are shared.  Per step, where
    the checked constructor would cost more than the arithmetic of a small net."""
    new = object.__new__(type(record))
    for name in _field_names(type(record)):
        _set_field(new, name, changes[name] if name in changes else getattr(record, name))
    return new


_set_field = object.__setattr__  # how attrs sets a frozen record's fields


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    """The names of an attrs class's fields, in order."""
    return tuple(field.name for field in attrs.fields(cls))


def _with_arrays(layer: Any, params: Params) -> Any:
    """``_replace(layer, dict(zip(layer._PARAMS, params)))`` for a dlfs layer
    (``_PARAMS`` names the fields params() returns), set field by field."""
    new = object.__new__(type(layer))
    names = layer._PARAMS
    if len(names) != len(params):  # a layer without some optional arrays (no bias)
        names = tuple(name for name in names if getattr(layer, name) is not None)
        for name in set(layer._PARAMS) - set(names):
            _set_field(new, name, None)
    for name, value in zip(names, params):
        _set_field(new, name, value)
    for name in _other_fields(type(layer)):
        _set_field(new, name, getattr(layer, name))
    return new


def _renew_layer(layer: Any, params: Params) -> Any:
    """``layer.with_params(params)`` for arrays known to fit a layer of dlfs's own
    (see Network._renew): set field by field, a container's sub-layers likewise."""
    if not params:
        return layer
    if isinstance(layer, _CHAINS):
        return layer._renew(params)
    return _with_arrays(layer, params)


@functools.cache
def _other_fields(cls: Any) -> tuple[str, ...]:
    """The fields of a dlfs layer class besides its parameters (``_PARAMS``)."""
    return tuple(name for name in _field_names(cls) if name not in cls._PARAMS)


def _is_own(obj: Any) -> TypeGuard[Any]:
    """Whether ``obj`` is an instance of a class defined in this file (not a
    user's class or subclass): what it returns is known to fit, so a training
    step may skip the checks that guard against user code (and call its
    private fast paths: hence the ``TypeGuard[Any]``, beyond its protocol)."""
    return type(obj).__module__ == __name__


# ------------------------------------------------------------------ randomness


def _as_key(name: str, key: Any) -> Key:
    """An int seed or a tuple of non-negative ints, as a tuple key."""
    if type(key) is tuple and key and all(type(k) is int and k >= 0 for k in key):
        return key  # already a key: the fast path for the per-step, per-layer keys
    given = key
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        key = (key,)
    if (
        isinstance(key, tuple)
        and key
        and all(
            isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 0 for k in key
        )
    ):
        return tuple(int(k) for k in key)
    key = given
    raise TypeError(
        f"{name} must be a non-negative int seed or a non-empty tuple of them, got {key!r}"
    )


def split(key: int | Key, n: int) -> tuple[Key, ...]:
    """Derive ``n`` independent keys from ``key`` (JAX-style, pure):
    split(k, n) = (k + (0,), ..., k + (n - 1,)); each key seeds its own stream.

    >>> dlfs.split(7, 2)
    ((7, 0), (7, 1))
    >>> dlfs.split((7, 0), 3)
    ((7, 0, 0), (7, 0, 1), (7, 0, 2))
    """
    key = _as_key("key", key)
    n = _check_int("n", n)
    return tuple(key + (i,) for i in range(n))


def make_rng(key: int | Key) -> np.random.Generator:
    """A fresh ``numpy.random.Generator`` for ``key``; same key, same draws.

    The first entry is the seed, the rest a ``SeedSequence`` spawn path, so
    ``(7,)`` and ``(7, 0)`` give unrelated streams.  Draw shapes are numpy's:
    ``make_rng(k).standard_normal((N, D))`` is (N, D).

    >>> a = dlfs.make_rng(7).standard_normal((2, 3))
    >>> a.shape, bool((a == dlfs.make_rng(7).standard_normal((2, 3))).all())
    ((2, 3), True)
    """
    key = _as_key("key", key)
    return _rng(key)


def _rng(key: Key) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(key[0], spawn_key=key[1:]))


@attrs.frozen
class Context:
    """What a forward pass may depend on besides its input: mode and randomness.

    ``train`` selects training behaviour (dropout on, batch statistics);
    ``key`` feeds layers that draw random numbers (required by Dropout in
    training).  Networks derive one sub-key per layer.  ``EVAL`` is
    ``Context()``: evaluation mode, no key.

    >>> x = np.ones((2, 4), np.float32)
    >>> y, mask, _ = dlfs.Dropout(0.5).forward(x, dlfs.Context(train=True, key=0))
    >>> y.shape, set(y.ravel().tolist()) <= {0.0, 2.0}
    ((2, 4), True)
    >>> dlfs.Dropout(0.5).forward(x, dlfs.EVAL)[0] is x  # evaluation: the identity
    True
    """

    train: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    key: Key | None = attrs.field(
        default=None, converter=lambda k: None if k is None else _as_key("key", k)
    )


EVAL = Context()
"""Evaluation mode without a key, ``Context()``: the default ``ctx`` of every ``forward``."""


def _sub_context(train: bool, key: Key) -> Context:
    """``Context(train, key)`` for a key derived from a checked one (a step's or a
    layer's sub-key), without re-running the field checks: built every step."""
    ctx = object.__new__(Context)
    object.__setattr__(ctx, "train", train)
    object.__setattr__(ctx, "key", key)
    return ctx


def train_context(key: int | Key) -> Context:
    """``Context(train=True, key=key)``: the context of one training step.

    >>> dlfs.train_context(3)
    Context(train=True, key=(3,))
    """
    return Context(train=True, key=key)


# ------------------------------------------------------------------- display


def _people(value: Any) -> str:
    """A number as people read it: counts with thousands separators, other numbers
    to 4 significant digits, None and NaN as empty; anything else as ``str``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return str(value)


def _html_table(header: Sequence[str], rows: Sequence[Sequence[Any]], caption: str) -> str:
    """An HTML table of text cells, every one escaped; ``caption`` above it."""
    esc = html.escape
    head = "".join(f"<th>{esc(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{esc(str(cell))}</td>" for cell in row) + "</tr>" for row in rows
    )
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _short_repr(obj: Any) -> str:
    """An attrs record as its type name plus the plain fields that differ from
    their defaults (``SoftmaxCrossEntropy``, ``SoftmaxCrossEntropy(label_smoothing=0.1)``)."""
    if not attrs.has(type(obj)):
        return type(obj).__name__
    changed = []
    for f in attrs.fields(type(obj)):
        value = getattr(obj, f.name)
        plain = value is None or isinstance(value, (bool, int, float, str))
        if plain and (f.default is attrs.NOTHING or value != f.default):
            changed.append(f"{f.name}={value!r}")
    return type(obj).__name__ + (f"({', '.join(changed)})" if changed else "")


# -------------------------------------------------------------- initializers


def _fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """(fan_in, fan_out) of a (D_in, D_out) matrix or a (C_out, C_in, kh, kw) kernel."""
    if len(shape) == 2:
        return shape[0], shape[1]
    if len(shape) == 4:
        receptive = shape[2] * shape[3]
        return shape[1] * receptive, shape[0] * receptive
    raise ValueError(f"shape must be 2-D or 4-D for fan computation, got {shape}")


class Initializer(Protocol):
    """What ``init=`` / ``bias_init=`` take: ``init(rng, shape, dtype) -> w``, an
    array of exactly ``shape`` and ``dtype`` drawn from the generator ``rng``.

    shape: (D_in, D_out) for a Dense weight, (C_out, C_in, kh, kw) for a kernel,
    (D,) for a bias.  Any function of that signature will do:

    >>> def uniform_01(rng, shape, dtype):  # w ~ U(0, 0.1)
    ...     return rng.random(shape, dtype=dtype) * dtype.type(0.1)
    >>> layer = dlfs.Dense.init(0, 3, 2, init=uniform_01)
    >>> bool((layer.w >= 0).all() and (layer.w < 0.1).all())
    True
    """

    def __call__(
        self, rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype, /
    ) -> np.ndarray: ...


def normal(
    rng: np.random.Generator, shape: tuple[int, ...], dtype: FloatDType = np.float32
) -> np.ndarray:
    """The book's initializer: w ~ N(0, 1); w: ``shape``.

    >>> w = dlfs.normal(dlfs.make_rng(0), (3, 2))
    >>> w.shape, w.dtype
    ((3, 2), dtype('float32'))
    """
    return rng.standard_normal(shape, dtype=np.dtype(dtype))


def zeros(
    rng: np.random.Generator, shape: tuple[int, ...], dtype: FloatDType = np.float32
) -> np.ndarray:
    """w = 0, of ``shape`` (``rng`` unused; same signature as the other initializers).

    >>> dlfs.zeros(dlfs.make_rng(0), (2,), np.float64)
    array([0., 0.])
    """
    return np.zeros(shape, dtype=dtype)


def glorot_normal(
    rng: np.random.Generator, shape: tuple[int, ...], dtype: FloatDType = np.float32
) -> np.ndarray:
    """Glorot/Xavier normal: w ~ N(0, 2 / (fan_in + fan_out)), the tutorial's scale.

    shape: (D_in, D_out) (fans D_in, D_out) or (C_out, C_in, kh, kw) (fans
    C_in kh kw, C_out kh kw).  Dense's default.

    >>> w = dlfs.glorot_normal(dlfs.make_rng(0), (400, 600))
    >>> round(float(w.std()), 2)  # sqrt(2 / 1000)
    0.04
    """
    fan_in, fan_out = _fans(shape)
    return normal(rng, shape, dtype) * math.sqrt(2.0 / (fan_in + fan_out))


def glorot_uniform(
    rng: np.random.Generator, shape: tuple[int, ...], dtype: FloatDType = np.float32
) -> np.ndarray:
    """Glorot/Xavier uniform: w ~ U(-a, a), a = sqrt(6 / (fan_in + fan_out)).

    shape: (D_in, D_out) or (C_out, C_in, kh, kw), as for ``glorot_normal``.

    >>> w = dlfs.glorot_uniform(dlfs.make_rng(0), (10, 14))
    >>> bool(abs(w).max() <= 0.5)  # a = sqrt(6 / 24)
    True
    """
    fan_in, fan_out = _fans(shape)
    a = math.sqrt(6.0 / (fan_in + fan_out))
    return (rng.random(shape, dtype=np.dtype(dtype)) * 2 - 1) * a


def he_normal(
    rng: np.random.Generator, shape: tuple[int, ...], dtype: FloatDType = np.float32
) -> np.ndarray:
    """He/Kaiming normal for ReLU nets: w ~ N(0, 2 / fan_in).

    shape: (D_in, D_out) (fan_in D_in) or (C_out, C_in, kh, kw) (fan_in
    C_in kh kw).  Conv2D's default.

    >>> w = dlfs.he_normal(dlfs.make_rng(0), (32, 1, 3, 3))
    >>> w.shape
    (32, 1, 3, 3)
    """
    fan_in, _ = _fans(shape)
    return normal(rng, shape, dtype) * math.sqrt(2.0 / fan_in)


def he_uniform(
    rng: np.random.Generator, shape: tuple[int, ...], dtype: FloatDType = np.float32
) -> np.ndarray:
    """He/Kaiming uniform: w ~ U(-a, a), a = sqrt(6 / fan_in).

    shape: (D_in, D_out) or (C_out, C_in, kh, kw), as for ``he_normal``.

    >>> w = dlfs.he_uniform(dlfs.make_rng(0), (6, 4))
    >>> bool(abs(w).max() <= 1.0)  # a = sqrt(6 / 6)
    True
    """
    fan_in, _ = _fans(shape)
    a = math.sqrt(6.0 / fan_in)
    return (rng.random(shape, dtype=np.dtype(dtype)) * 2 - 1) * a


def orthogonal(
    rng: np.random.Generator, shape: tuple[int, ...], dtype: FloatDType = np.float32
) -> np.ndarray:
    """Orthogonal (Saxe et al. 2014; PyTorch's ``nn.init.orthogonal_``): w = Q of
    the QR of a standard normal matrix, signs fixed by diag(R); shape (rows, cols),
    orthonormal columns if rows >= cols, else orthonormal rows.

    >>> w = dlfs.orthogonal(dlfs.make_rng(0), (4, 3), np.float64)
    >>> bool(np.allclose(w.T @ w, np.eye(3)))
    True
    """
    if len(shape) != 2:
        raise ValueError(f"shape must be 2-D for an orthogonal matrix, got {shape}")
    rows, cols = shape
    q, r = np.linalg.qr(rng.standard_normal((max(rows, cols), min(rows, cols))))
    q *= np.sign(np.diag(r))  # a uniformly random orthogonal matrix, not one QR's choice
    return (q if rows >= cols else q.T).astype(dtype)


def scaled(init: Initializer, factor: float) -> Initializer:
    """The initializer ``init`` times ``factor``: w = factor * init(rng, shape, dtype);
    ``scaled(normal, 0.02)`` is GPT-2's N(0, 0.02^2).

    >>> w = dlfs.scaled(dlfs.normal, 0.02)(dlfs.make_rng(0), (200, 300))
    >>> w.dtype, round(float(w.std()), 3)
    (dtype('float32'), 0.02)
    """
    _check_initializer("init", init)
    factor = _check_number("factor", factor)

    def draw(
        rng: np.random.Generator, shape: tuple[int, ...], dtype: Any = np.float32
    ) -> np.ndarray:
        w = init(rng, shape, dtype)
        return w * w.dtype.type(factor)

    draw.__qualname__ = f"scaled({getattr(init, '__name__', 'init')}, {factor})"
    return draw


def _check_initializer(name: str, init: Any) -> None:
    if not callable(init):
        raise TypeError(
            f"{name} must be an initializer f(rng, shape, dtype) such as dlfs.glorot_normal, "
            f"got {type(init).__name__}"
        )


def _draw(
    name: str, init: Any, rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype
) -> np.ndarray:
    """``init(rng, shape, dtype)``, checked: an array of exactly that shape and dtype."""
    _check_initializer(name, init)
    a = init(rng, shape, dtype)
    _check_float(f"{name}(rng, shape, dtype)", a, dtype)
    if a.shape != shape:
        raise ValueError(f"{name}(rng, shape, dtype) must return shape {shape}, got {a.shape}")
    return a


# -------------------------------------------------------------------- layers


class Layer(Protocol):
    """The protocol every layer speaks: any object with these five methods is a
    layer (a structural type; there is no base class to inherit).

    ``params()`` trainable arrays in a fixed order; ``with_params(ps)`` a new
    layer; ``forward(x, ctx) -> (y, cache, layer)`` (stateless layers return
    themselves, BatchNorm a layer with new running statistics);
    ``backward(cache, dy) -> (dx, grads)`` with grads aligned with
    ``params()``; ``output_shape(in_shape)`` the per-sample output shape.
    x: (N, *in_shape) -> y: (N, *output_shape(in_shape)); dy is shaped like y,
    dx like x.  The README's "Write your own layer" writes one and checks its
    gradients with ``check_layer``.

    >>> layer = dlfs.Dense.init(0, 3, 2)
    >>> y, cache, same = layer.forward(np.ones((4, 3), np.float32))
    >>> dx, (dw, db) = layer.backward(cache, np.ones_like(y))
    >>> y.shape, dx.shape, dw.shape, db.shape, same is layer
    ((4, 2), (4, 3), (3, 2), (2,), True)
    """

    def params(self) -> Params:
        """The trainable arrays, in a fixed order (``()`` for none)."""
        ...

    def with_params(self, params: Sequence[np.ndarray]) -> Layer:
        """A new layer with ``params`` (same number, shapes and dtypes) in their place."""
        ...

    def forward(self, x: np.ndarray, ctx: Context = EVAL) -> tuple[np.ndarray, Any, Layer]:
        """(y, cache, layer): the output, what ``backward`` needs, and the layer
        with its new state (itself for stateless layers)."""
        ...

    def backward(self, cache: Any, dy: np.ndarray) -> tuple[np.ndarray, Params]:
        """(dx, grads): dL/dx from dL/dy, and dL/dp for each array of ``params()``."""
        ...

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The per-sample output shape for per-sample inputs of ``in_shape``;
        ValueError if the layer cannot take them."""
        ...


def _check_new_params(layer: Any, params: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
    """New params must match the old ones in number, shape and dtype."""
    old = layer.params()
    if not isinstance(params, (tuple, list)) or len(params) != len(old):
        raise ValueError(
            f"params for {type(layer).__name__} must be a sequence of "
            f"{len(old)} arrays, got {type(params).__name__} of length "
            f"{len(params) if isinstance(params, (tuple, list)) else '?'}"
        )
    for i, (p, q) in enumerate(zip(old, params)):
        _check_float(f"params[{i}]", q, p.dtype)
        if q.shape != p.shape:
            raise ValueError(f"params[{i}] must have shape {p.shape}, got {q.shape}")
    return tuple(params)


_L = TypeVar("_L", bound="_NoParams")


@attrs.frozen(eq=False, repr=False)
class _NoParams:
    """Shared protocol methods of layers without trainable parameters."""

    def params(self) -> Params:
        """No trainable arrays: ``()``."""
        return ()

    def with_params(self: _L, params: Sequence[np.ndarray]) -> _L:
        """Accepts only ``()`` and returns the layer itself."""
        _check_new_params(self, params)
        return self

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Elementwise: the output shape is the input shape."""
        return tuple(in_shape)

    def _check(self, x: Any) -> np.ndarray:
        if type(x) is np.ndarray and x.ndim and x.dtype in _FLOAT_DTYPES:
            return x  # the common case, decided in a few attribute reads
        _check_float("x", x)
        if x.ndim < 1:
            raise ValueError(f"x must have a batch axis, got shape {x.shape}")
        return x

    def __repr__(self) -> str:
        fields = attrs.fields(type(self))
        args = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields)
        return f"{type(self).__name__}({args})"


def _check_dy(dy: Any, shape: tuple[int, ...] | None, dtype: np.dtype | None) -> None:
    """A layer's public backward: dy shaped and typed like the forward's output,
    never broadcast or cast (``None``: what the cache does not tell; then any
    shape, or float32/float64)."""
    if type(dy) is np.ndarray and dy.shape == shape and dy.dtype == dtype:
        return  # the common case, in a few attribute reads
    _check_float("dy", dy, dtype)
    if shape is not None:
        _check_shape("dy", dy, shape)


def _dense_weights(w: Any) -> np.ndarray:
    """Dense's ``w`` converter; an int there is the Keras habit ``Dense(units)``."""
    if isinstance(w, (int, np.integer)) and not isinstance(w, bool):
        raise TypeError(
            f"Dense(w, b) must be given weight arrays, got w={w}: for a layer of {w} units "
            f"write dlfs.dense({w}) inside dlfs.network(...) (it infers the input size), "
            f"or dlfs.Dense.init(key, n_in, {w})"
        )
    return _frozen(w, "w")


class _Missing:
    """The default of an argument that must be given, so that its converter can
    say how (``Dense(w)`` without ``b``)."""

    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Any = _Missing()


def _dense_bias(b: Any) -> np.ndarray | None:
    if b is _MISSING:
        raise TypeError(
            "Dense must be given both w and b, Dense(w, b) (b=None: no bias); "
            "dlfs.Dense.init(key, n_in, n_out) draws new ones"
        )
    return None if b is None else _frozen(b, "b")


@attrs.frozen(eq=False, repr=False)
class Dense(_ArrayRecord):
    """Fully connected layer (the book's WeightMultiply + BiasAdd): y = x @ w + b.

    x: (N, D_in) -> y: (N, D_out); w: (D_in, D_out), b: (D_out,).  Sequences
    x: (N, T, D_in) -> y: (N, T, D_out) apply it at every step (as ``nn.Linear``).
    ``Dense(w, b)`` takes ready arrays (``b=None``: no bias, y = x @ w, as
    ``nn.Linear(bias=False)``; params() is then (w,)); ``Dense.init`` draws
    them; inside ``network``, ``dense(n_out)`` infers D_in.

    >>> layer = dlfs.Dense.init(0, n_in=3, n_out=2)
    >>> layer
    Dense(3 -> 2, float32)
    >>> y, cache, _ = layer.forward(np.ones((4, 3), np.float32))
    >>> y.shape
    (4, 2)
    >>> dlfs.Dense(np.eye(2), np.array([0.5, -0.5])).forward(np.array([[1.0, 2.0]]))[0]
    array([[1.5, 1.5]])
    """

    w: np.ndarray = attrs.field(converter=_dense_weights)
    b: np.ndarray | None = attrs.field(default=_MISSING, converter=_dense_bias)

    def __attrs_post_init__(self) -> None:
        if self.w.ndim != 2:
            raise ValueError(f"w must be 2-D (D_in, D_out), got shape {self.w.shape}")
        if self.b is not None:
            _check_input("b", self.b, (self.w.shape[1],), self.w.dtype)

    @classmethod
    def init(
        cls,
        key: int | Key,
        n_in: int,
        n_out: int,
        *,
        init: Initializer = glorot_normal,
        bias_init: Initializer = zeros,
        bias: bool = True,
        dtype: FloatDType = np.float32,
    ) -> Dense:
        """Draw w (n_in, n_out) with ``init`` and b (n_out,) with ``bias_init`` from
        ``key``; ``bias=False``: no b."""
        n_in, n_out = _check_int("n_in", n_in), _check_int("n_out", n_out)
        dtype = _check_dtype(dtype)
        rng = make_rng(key)
        w = _draw("init", init, rng, (n_in, n_out), dtype)
        b = (
            _draw("bias_init", bias_init, rng, (n_out,), dtype)
            if _check_bool("bias", bias)
            else None
        )
        return cls(w=w, b=b)  # the converter copies and freezes

    @property
    def in_features(self) -> int:
        return self.w.shape[0]

    @property
    def out_features(self) -> int:
        return self.w.shape[1]

    def params(self) -> Params:
        """(w, b), or (w,) without bias."""
        return (self.w,) if self.b is None else (self.w, self.b)

    def with_params(self, params: Sequence[np.ndarray]) -> Dense:
        """A new Dense with ``params = (w, b)`` (or ``(w,)``), shapes and dtypes checked."""
        w, *b = _check_new_params(self, params)
        return Dense(w, b[0] if b else None)

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        """(D_in,) -> (D_out,); (T, D_in) -> (T, D_out)."""
        in_shape = tuple(in_shape)
        if len(in_shape) not in (1, 2) or in_shape[-1] != self.in_features:
            raise ValueError(
                f"Dense expects inputs of shape (N, {self.in_features}) or (N, T, "
                f"{self.in_features}), the previous layer gives {_shape_str((None, *in_shape))}"
            )
        return (*in_shape[:-1], self.out_features)

    # forward's y is a fresh array that its cache does not hold: the next layer
    # may overwrite it (see Network._forward)
    _FRESH_OUTPUT = True
    _PARAMS = ("w", "b")  # the fields params() returns, in order

    def forward(self, x: np.ndarray, ctx: Context = EVAL) -> tuple[np.ndarray, np.ndarray, Dense]:
        """y = x @ w + b; the cache is x."""
        w = self.w
        if not _is_rows(x, w.shape[0], w.dtype):
            x = _plain(x)
            if type(x) is np.ndarray and x.ndim == 3:
                return self._forward_seq(x), x, self
            _check_input("x", x, (None, self.in_features), w.dtype)
        y = np.dot(x, w)  # np.dot: numpy 2.4's @ is slower on small and outer products
        if self.b is not None:
            y += self.b  # y is a fresh array of ours; adding in place saves a copy
        return y, x, self

    def _forward_seq(self, x: np.ndarray) -> np.ndarray:
        """(N, T, D_in) -> (N, T, D_out): all ``N*T`` rows in one GEMM."""
        _check_input("x", x, (None, "T", self.in_features), self.w.dtype)
        y = np.dot(x.reshape(-1, self.in_features), self.w)
        if self.b is not None:
            y += self.b
        return y.reshape(*x.shape[:2], self.out_features)

    def backward(self, cache: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, Params]:
        """dx = dy @ w.T, dw = x.T @ dy, db = sum_n dy (over N and T for sequences);
        grads (dw, db), or (dw,) without bias."""
        if cache.ndim == 3:
            return self._backward_seq(cache, dy)
        w = self.w
        if not (_is_rows(dy, w.shape[1], w.dtype) and len(dy) == len(cache)):
            _check_input("dy", dy, (cache.shape[0], self.out_features), w.dtype)
        return np.dot(dy, w.T), self._param_grads(cache, dy)

    def _backward_seq(self, cache: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, Params]:
        _check_input("dy", dy, (*cache.shape[:2], self.out_features), self.w.dtype)
        dx = np.dot(dy.reshape(-1, self.out_features), self.w.T)
        return dx.reshape(cache.shape), self._param_grads(cache, dy)

    def _param_grads(self, cache: np.ndarray, dy: np.ndarray) -> Params:
        """(dw, db) without dx: a network skips the input gradient of its first layer."""
        if cache.ndim == 3:  # sequences: every step is a row
            cache, dy = cache.reshape(-1, self.in_features), dy.reshape(-1, self.out_features)
        if self.b is None:
            return (np.dot(cache.T, dy),)
        return (np.dot(cache.T, dy), np.add.reduce(dy, axis=0))

    def __repr__(self) -> str:
        bias = "" if self.b is not None else ", bias=False"
        return f"Dense({self.in_features} -> {self.out_features}{bias}, {self.w.dtype})"


@attrs.frozen(eq=False, repr=False)
class Linear(_NoParams):
    """Identity activation (the book's ``Linear``): y = x; x: (N, ...) -> y: same shape.

    >>> dlfs.Linear().forward(np.array([[-1.0, 2.0]]))[0]
    array([[-1.,  2.]])
    """

    def forward(self, x: np.ndarray, ctx: Context = EVAL) -> tuple[np.ndarray, None, Linear]:
        """y = x, shapes any (N, ...)."""
        return self._check(x), None, self

    def backward(self, cache: None, dy: np.ndarray) -> tuple[np.ndarray, Params]:
        """dx = dy."""
        _check_dy(dy, None, None)
        return dy, ()


def _sigmoid(z: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """sigmoid(z) = 1 / (1 + exp(-z)); ``out`` may be ``z`` itself.

    No subtraction, so no cancellation: accurate to a few ulps in both tails,
    as the two-branch exp(-|z|) form is, without that form's masks (np.where
    costs numpy several passes).  Below z = -88 (float32) exp(-z) overflows to
    inf and gives the limit 0 exactly; that overflow (and the underflow to 0
    far above z = 0, which gives 1) is expected and silenced.
    """
    out = np.negative(z, out=out)
    with np.errstate(over="ignore", under="ignore"):
        np.exp(out, out=out)
    out += 1
    return np.divide(out.dtype.type(1), out, out=out)


def _sigmoid_pair(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sigmoid(z), 1 - sigmoid(z)), the second as sigmoid(-z): both accurate in both tails."""
    return _sigmoid(z), _sigmoid(-z)


@attrs.frozen(eq=False, repr=False)
class Sigmoid(_NoParams):
    """Logistic activation: y = 1 / (1 + exp(-x)), accurate to a few ulps in both tails.

    x: (N, ...) -> y: same shape.

    >>> y, _, _ = dlfs.Sigmoid().forward(np.array([[-1.0, 0.0, 1.0]]))
    >>> np.round(y, 4).tolist()
    [[0.2689, 0.5, 0.7311]]
    """

    def forward(self, x: np.ndarray, ctx: Context = EVAL) -> tuple[np.ndarray, np.ndarray, Sigmoid]:
        """x: (N, ...) -> y: same shape; the cache is y."""
        y = _sigmoid(self._check(x))
        return y, y, self

    def backward(self, cache: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, Params]:
        """dx = dy * y * (1 - y) (PyTorch's; where y rounds to 1 the slope is 0)."""
        y = cache
        _check_dy(dy, y.shape, y.dtype)
        return dy * y * (1 - y), ()


@attrs.frozen(eq=False, repr=False)
class Tanh(_NoParams):
    """Hyperbolic tangent: y = tanh(x); x: (N, ...) -> y: same shape.

    >>> y, _, _ = dlfs.Tanh().forward(np.array([[-1.0, 0.0, 1.0]]))
    >>> np.round(y, 4).tolist()
    [[-0.7616, 0.0, 0.7616]]
    """

    def forward(self, x: np.ndarray, ctx: Context = EVAL) -> tuple[np.ndarray, np.ndarray, Tanh]:
        """x: (N, ...) -> y: same shape; the cache is y."""
        y = np.tanh(self._check(x))
        return y, y, self

    def backward(self, cache: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, Params]:
        """dx = dy * (1 - y**2)."""
        _check_dy(dy, cache.shape, cache.dtype)
        return dy * (1 - cache * cache), ()


@attrs.frozen(eq=False, repr=False)
class ReLU(_NoParams):
    """Rectified linear unit: y = max(x, 0); relu'(0) = 0 as in PyTorch.

    x: (N, ...) -> y: same shape.

    >>> relu = dlfs.ReLU()
    >>> y, cache, _ = relu.forward(np.array([[-1.0, 0.0, 2.0]]))
    >>> y.tolist(), relu.backward(cache, np.ones((1, 3)))[0].tolist()
    ([[0.0, 0.0, 2.0]], [[0.0, 0.0, 1.0]])
    """

    def forward(self, x: np.ndarray, ctx: Context = EVAL) -> tuple[np.ndarray, np.ndarray, ReLU]:
        """x: (N, ...) -> y: same shape; the cache is y (y > 0 exactly where x > 0),
        so inference builds no mask."""
        self._check(x)
        # max against a zero row, not the scalar 0: numpy's SIMD loop, 2-3x faster
        y = np.maximum(x, np.zeros(x.shape[1:], x.dtype))
        return y, y, self

    def backward(self, cache: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, Params]:
        """dx = dy where x > 0 (i.e. y > 0), else 0."""
        _check_dy(dy, cache.shape, cache.dtype)
        return dy * (cache > 0), ()

    # In place, for a network's own arrays (see Network._forward / _param_backward):
    # the same arithmetic as forward/backward, written over an input that no one
    # else holds (a Dense's fresh output, a gradient just made), so no new array.

    def _forward_owned(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, ReLU]:
        _by_rows(_relu_rows, x)
        return x, x, self

    def _backward_owned(self, cache: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, Params]:
        _by_rows(_relu_mask_rows, dy, cache)
        return dy, ()


def _relu_rows(x: np.ndarray) -> None:
    """x = max(x, 0) in place, against a zero row (numpy's SIMD loop, 2-3x faster
    than against the scalar)."""
    np.maximum(x, np.zeros(x.shape[1:], x.dtype), out=x)


def _relu_mask_rows(dy: np.ndarray, y: np.ndarray) -> None:
    """dy *= (y > 0) in place, the mask in this thread's scratch buffer."""
    above = _scratch("mask", y.size, np.dtype(bool)).reshape(y.shape)
    np.multiply(dy, np.greater(y, 0, out=above), out=dy)


@attrs.frozen(eq=False, repr=False)
class LeakyReLU(_NoParams):
    """Leaky ReLU: y = x if x > 0 else alpha * x; the slope at 0 is alpha
    (PyTorch's convention, default alpha 0.01).  x: (N, ...) -> y: same shape.

    >>> dlfs.LeakyReLU(0.1).forward(np.array([[-2.0, 3.0]]))[0].tolist()
    [[-0.2, 3.0]]
    """

    alpha: float = attrs.field(default=0.01, converter=lambda a: _check_number("alpha", a, low=0.0))

    def forward(
        self, x: np.ndarray, ctx: Context = EVAL
    ) -> tuple[np.ndarray, np.ndarray, LeakyReLU]:
        """x: (N, ...) -> y: same shape; the cache is the mask x > 0."""
        self._check(x)
        positive = x > 0
        return np.where(positive, x, x * self.alpha), positive, self

    def backward(self, cache: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, Params]:
        """dx = dy where x > 0, else alpha * dy."""
        _check_dy(dy, cache.shape, None)  # the cache is a mask: dy's float dtype is kept
        return np.where(cache, dy, dy * self.alpha), ()


@attrs.frozen(eq=False, repr=False)
class ELU(_NoParams):
    """Exponential linear unit: y = x if x > 0 else alpha * (exp(x) - 1); slope
    alpha at 0 as in PyTorch.  exp(x) - 1 is computed with expm1, so y keeps
    its relative precision near 0.  x: (N, ...) -> y: same shape.

    >>> y, _, _ = dlfs.ELU().forward(np.array([[-1.0, 2.0]]))
    >>> np.round(y, 4).tolist()
    [[-0.6321, 2.0]]
    """

    alpha: float = attrs.field(default=1.0, converter=lambda a: _check_number("alpha", a, low=0.0))

    def forward(self, x: np.ndarray, ctx: Context = EVAL) -> tuple[np.ndarray, tuple, ELU]:
        """x: (N, ...) -> y: same shape; the cache is (x > 0, exp(min(x, 0)))."""
        self._check(x)
        positive = x > 0
        negative_part = np.minimum(x, 0)
        y = np.where(positive, x, np.expm1(negative_part) * self.alpha)
        return y, (positive, np.exp(negative_part)), self

    def backward(self, cache: tuple, dy: np.ndarray) -> tuple[np.ndarray, Params]:
        """dx = dy where x > 0, else dy * alpha * exp(x)."""
        positive, e = cache
        _check_dy(dy, e.shape, e.dtype)
        return np.where(positive, dy, dy * e * self.alpha), ()


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


# erf in float64 (GELU(approximate="none") needs it; numpy has none).
# The method and coefficients are FreeBSD msun's s_erf.c, as ported in Go's src/math/erf.go
# (where each constant is also given as its IEEE-754 bit pattern), whose notice reads:
#   Copyright (C) 1993 by Sun Microsystems, Inc. All rights reserved.
#   Developed at SunPro, a Sun Microsystems, Inc. business.
#   Permission to use, copy, modify, and distribute this software is freely granted,
#   provided that this notice is preserved.
# Tuples are highest degree first (Horner order).

_ERX = 8.45062911510467529297e-01  # erf(1) rounded to 24 bits
_EFX8 = 1.02703333676410069053e00  # 8 * (2/sqrt(pi) - 1)
# erf(x) = x + x * PP(x^2) / QQ(x^2) on [0, 0.84375]
_PP = (
    -2.37630166566501626084e-05,
    -5.77027029648944159157e-03,
    -2.84817495755985104766e-02,
    -3.25042107247001499370e-01,
    1.28379167095512558561e-01,
)
_QQ = (
    -3.96022827877536812320e-06,
    1.32494738004321644526e-04,
    5.08130628187576562776e-03,
    6.50222499887672944485e-02,
    3.97917223959155352819e-01,
    1.0,
)
# erf(1 + s) = erx + PA(s) / QA(s) on [0.84375, 1.25]
_PA = (
    -2.16637559486879084300e-03,
    3.54783043256182359371e-02,
    -1.10894694282396677476e-01,
    3.18346619901161753674e-01,
    -3.72207876035701323847e-01,
    4.14856118683748331666e-01,
    -2.36211856075265944077e-03,
)
_QA = (
    1.19844998467991074170e-02,
    1.36370839120290507362e-02,
    1.26171219808761642112e-01,
    7.18286544141962662868e-02,
    5.40397917702171048937e-01,
    1.06420880400844228286e-01,
    1.0,
)
# erfc(x) = exp(-x^2 - 0.5625 + RA(1/x^2) / SA(1/x^2)) / x on [1.25, 1/0.35]
_RA = (
    -9.81432934416914548592e00,
    -8.12874355063065934246e01,
    -1.84605092906711035994e02,
    -1.62396669462573470355e02,
    -6.23753324503260060396e01,
    -1.05586262253232909814e01,
    -6.93858572707181764372e-01,
    -9.86494403484714822705e-03,
)
_SA = (
    -6.04244152148580987438e-02,
    6.57024977031928170135e00,
    1.08635005541779435134e02,
    4.29008140027567833386e02,
    6.45387271733267880336e02,
    4.34565877475229228821e02,
    1.37657754143519042600e02,
    1.96512716674392571292e01,
    1.0,
)
# the same with RB / SB on [1/0.35, 6]; erf(x) rounds to 1 from x = 6 on
_RB = (
    -4.83519191608651397019e02,
    -1.02509513161107724954e03,
    -6.37566443368389627722e02,
    -1.60636384855821916062e02,
    -1.77579549177547519889e01,
    -7.99283237680523006574e-01,
    -9.86494292470009928597e-03,
)
_SB = (
    -2.24409524465858183362e01,
    4.74528541206955367215e02,
    2.55305040643316442583e03,
    3.19985821950859553908e03,
    1.53672958608443695994e03,
    3.25792512996573918826e02,
    3.03380607434824582924e01,
    1.0,
)

# erf in float32.
# Eigen's / XLA's float32 rational x * P(x^2) / Q(x^2) (XLA xla/codegen/intrinsic/erf.cc,
# EmitErfF32, "the same rational interpolant as implemented in Eigen3"); from |x| = 3.8325...
# (erf^-1 of 1 minus half an ulp) on, erf rounds to +-1.
_ERF32_CLAMP = 3.832506856900711
_ALPHA = (
    0.00022905065861350646,
    0.0034082910107109506,
    0.050955695062380861,
    0.18520832239976145,
    1.128379143519084,
)
_BETA = (
    -1.1791602954361697e-7,
    0.000023547966471313185,
    0.0010179625278914885,
    0.014070470171167667,
    0.11098505178285362,
    0.49746925110067538,
    1.0,
)


def _horner(t: np.ndarray, coeffs: tuple[float, ...], out: np.ndarray | None = None) -> np.ndarray:
    """Return sum_k coeffs[k] * t^(n-k) (highest degree first) in t's dtype, into out if given."""
    acc = np.multiply(t, coeffs[0], out=out)
    acc += coeffs[1]
    for c in coeffs[2:]:
        acc *= t
        acc += c
    return acc


def _erf32(x: np.ndarray) -> np.ndarray:
    """erf in float32: x * P(x^2) / Q(x^2) on x clamped to [-c, c], all in float32.

    One branch, ~25 passes over the data and three temporaries. Without fused multiply-add the
    float32 roundings of the two Horner sums add up to about 6 ulp near |erf| = 1 (max abs
    error about 3.6e-7); the output is clipped to [-1, 1], which those roundings can overshoot.
    """
    xc = np.clip(x, -_ERF32_CLAMP, _ERF32_CLAMP)
    x2 = xc * xc
    q = _horner(x2, _BETA)
    np.divide(xc, q, out=q)  # x / Q(x^2)
    y = _horner(x2, _ALPHA, out=xc)
    y *= q
    np.clip(y, -1.0, 1.0, out=y)
    return y


def _erf32_via_float64(x: np.ndarray) -> np.ndarray:
    """erf of float32 x: the same rational as ``_erf32`` evaluated in float64, rounded once.

    Max abs error about 6e-8 (under one float32 ulp) but about 3x the time of ``_erf32``.
    """
    xc = np.clip(x, -_ERF32_CLAMP, _ERF32_CLAMP, dtype=np.float64)
    x2 = xc * xc
    q = _horner(x2, _BETA)
    np.divide(xc, q, out=q)
    p = _horner(x2, _ALPHA, out=xc)
    return np.multiply(p, q, out=np.empty(x.shape, np.float32), casting="same_kind")


def _erf_small(a: np.ndarray) -> np.ndarray:
    """erf(a) for 0 <= a < 0.84375: a + a * PP(a^2) / QQ(a^2); subnormal-safe for tiny a."""
    a2 = a * a
    y = _horner(a2, _PP)
    y /= _horner(a2, _QQ)
    y *= a
    y += a
    tiny = a < 2.848094538889218e-306  # 0x0080000000000000: a * PP would lose bits
    if tiny.any():
        at = a[tiny]
        y[tiny] = 0.125 * (8.0 * at + _EFX8 * at)
    return y


def _erf_near_one(a: np.ndarray) -> np.ndarray:
    """erf(a) for 0.84375 <= a < 1.25: erx + PA(a - 1) / QA(a - 1)."""
    s = a - 1.0
    y = _horner(s, _PA)
    y /= _horner(s, _QA)
    y += _ERX
    return y


def _erf_tail(a: np.ndarray, r: tuple[float, ...], s: tuple[float, ...]) -> np.ndarray:
    """erf(a) = 1 - exp(-a^2 - 0.5625 + R(1/a^2) / S(1/a^2)) / a for 1.25 <= a < 6.

    exp(-a^2) is split as exp(-z^2) * exp((z - a)(z + a)) with z = a cut to its high 32 bits,
    so that z^2 is exact and the rounding error of a^2 does not reach the result.
    """
    w = 1.0 / (a * a)
    rs = _horner(w, r)
    rs /= _horner(w, s)
    z = (a.view(np.uint64) & np.uint64(0xFFFFFFFF00000000)).view(np.float64)
    rs += (z - a) * (z + a)
    y = np.exp(rs)
    y *= np.exp(-z * z - 0.5625)
    y /= a
    np.subtract(1.0, y, out=y)
    return y


def _erf64(x: np.ndarray) -> np.ndarray:
    """erf in float64 by the five-interval FreeBSD msun method, then the sign of x."""
    a = np.abs(x)
    y = np.minimum(a, 1.0)  # 1 for a >= 6 (and inf), NaN stays NaN; the rest is overwritten
    bounds = (0.0, 0.84375, 1.25, 1 / 0.35, 6.0)
    parts = (_erf_small, _erf_near_one, None, None)
    for k, part in enumerate(parts):
        mask = (a >= bounds[k]) & (a < bounds[k + 1])
        if not mask.any():
            continue
        ak = a[mask]
        if part is not None:
            y[mask] = part(ak)
        elif k == 2:
            y[mask] = _erf_tail(ak, _RA, _SA)
        else:
            y[mask] = _erf_tail(ak, _RB, _SB)
    np.copysign(y, x, out=y)
    return y


def _erf(x: np.ndarray) -> np.ndarray:
    """Error function erf(x) = 2/sqrt(pi) * int_0^x exp(-t^2) dt, elementwise; dtype preserved.

    float64: FreeBSD msun ``s_erf.c`` (coefficients via Go's ``math/erf.go``), odd symmetry and
    five intervals of |x|: x + x*P/Q(x^2) below 0.84375; erf(1) + P/Q(|x| - 1) below 1.25;
    1 - exp(-x^2 - 0.5625 + R/S(1/x^2)) / |x| below 6 (two coefficient sets, split at 1/0.35);
    1 from 6 on. Within about one ulp of libm's erf. erf(+-0) = +-0, erf(+-inf) = +-1.
    float32: Eigen/XLA's single rational x * P(x^2) / Q(x^2) on x clamped to [-3.8325, 3.8325],
    computed in float32 (max abs error about 3.6e-7, i.e. up to ~6 float32 ulp near +-1).
    x: float32 or float64, any shape (not modified) -> erf(x), same shape and dtype.
    """
    erf = _erf32 if x.dtype == np.float32 else _erf64
    return erf(x.reshape(-1)).reshape(x.shape)  # 1-D: ufuncs return arrays, never scalars


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    """Phi(x) = (1 + erf(x / sqrt 2)) / 2, the standard normal CDF."""
    phi = _erf(x * x.dtype.type(1 / math.sqrt(2)))
    phi += 1
    phi *= x.dtype.type(0.5)
    return phi


@attrs.frozen(eq=False, repr=False)
class GELU(_NoParams):
    """GELU.  ``approximate="tanh"`` (the default here; PyTorch's ``approximate='tanh'``):
    y = x/2 * (1 + tanh(u)), u = sqrt(2/pi) * (x + 0.044715 x^3), computed as
    x * sigmoid(2u) (the same function: (1 + tanh(u)) / 2 = sigmoid(2u)), which
    keeps the left tail that 1 + tanh(u) rounds away.  ``approximate="none"``:
    the exact y = x Phi(x) = x/2 * (1 + erf(x / sqrt 2)), PyTorch's ``nn.GELU()``
    (whose default it is) to float64 rounding.  x: (N, ...) -> y: same shape.

    >>> y, _, _ = dlfs.GELU().forward(np.array([[-1.0, 0.0, 1.0]]))
    >>> np.round(y, 4).tolist()
    [[-0.1588, 0.0, 0.8412]]
    >>> np.round(dlfs.GELU("none").forward(np.array([[-1.0, 0.0, 1.0]]))[0], 4).tolist()
    [[-0.1587, 0.0, 0.8413]]
    """

    approximate: str = attrs.field(default="tanh", validator=attrs.validators.in_(("tanh", "none")))

    def forward(self, x: np.ndarray, ctx: Context = EVAL) -> tuple[np.ndarray, tuple, GELU]:
        """x: (N, ...) -> y: same shape; the cache is (x, sigmoid(2u), 1 - sigmoid(2u)),
        or (x, Phi(x)) for the exact form."""
        self._check(x)
        if self.approximate == "none":
            phi = _normal_cdf(x)
            return x * phi, (x, phi), self
        s, c = _sigmoid_pair((x + 0.044715 * (x * x * x)) * (2 * _SQRT_2_OVER_PI))
        return x * s, (x, s, c), self

    def backward(self, cache: tuple, dy: np.ndarray) -> tuple[np.ndarray, Params]:
        """dx = dy * (s + 2 x s (1 - s) u'), s = sigmoid(2u), u' = sqrt(2/pi) (1 + 3 * 0.044715 x^2);
        exact form: dx = dy * (Phi(x) + x exp(-x^2/2) / sqrt(2 pi))."""
        if self.approximate == "none":
            x, phi = cache
            dx = x * x  # one array, in place: exp(-x^2/2) / sqrt(2 pi) x + Phi, times dy
            dx *= x.dtype.type(-0.5)
            np.exp(dx, out=dx)
            dx *= x.dtype.type(1 / math.sqrt(2 * math.pi))
            dx *= x
            dx += phi
            dx *= dy
            return dx, ()
        x, s, c = cache
        _check_dy(dy, x.shape, x.dtype)
        du = (1 + 3 * 0.044715 * x * x) * (2 * _SQRT_2_OVER_PI)
        return dy * (s + x * s * c * du), ()

    def __repr__(self) -> str:
        return "GELU()" if self.approximate == "tanh" else f"GELU(approximate={self.approximate!r})"


@attrs.frozen(eq=False, repr=False)
class SiLU(_NoParams):
    """SiLU / swish: y = x * sigmoid(x) (the sigmoid accurate in both tails).

    x: (N, ...) -> y: same shape.

    >>> y, _, _ = dlfs.SiLU().forward(np.array([[-1.0, 0.0, 1.0]]))
    >>> np.round(y, 4).tolist()
    [[-0.2689, 0.0, 0.7311]]
    """

    def forward(self, x: np.ndarray, ctx: Context = EVAL) -> tuple[np.ndarray, tuple, SiLU]:
        """x: (N, ...) -> y: same shape; the cache is (x, sigmoid(x), 1 - sigmoid(x))."""
        self._check(x)
        s, c = _sigmoid_pair(x)
        return x * s, (x, s, c), self

    def backward(self, cache: tuple, dy: np.ndarray) -> tuple[np.ndarray, Params]:
        """dx = dy * s * (1 + x (1 - s)), s = sigmoid(x)."""
        x, s, c = cache
        _check_dy(dy, x.shape, x.dtype)
        return dy * s * (1 + x * c), ()


def _softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, K) logits, stable (max subtracted)."""
    e = np.exp(z - z.max(axis=1, keepdims=True))
    e /= e.sum(axis=1, keepdims=True)
    return e


@attrs.frozen(eq=False, repr=False)
class Softmax(_NoParams):
    """Row-wise softmax, for probabilities: y_ik = exp(x_ik) / sum_j exp(x_ij).

    x: (N, K) -> y: (N, K).  For training use SoftmaxCrossEntropy on logits.

    >>> y, _, _ = dlfs.Softmax().forward(np.array([[0.0, np.log(3.0)]]))
    >>> np.round(y, 4).tolist()
    [[0.25, 0.75]]
    """

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        """(K,) -> (K,); other shapes are rejected."""
        if len(in_shape) != 1:
            raise ValueError(
                f"Softmax expects inputs of shape (N, K), got {_shape_str((None, *in_shape))}"
            )
        return tuple(in_shape)

    def forward(self, x: np.ndarray, ctx: Context = EVAL) -> tuple[np.ndarray, np.ndarray, Softmax]:
        """The cache is y."""
        _check_input("x", x, (None, "K"))
        y = _softmax(x)
        return y, y, self

    def backward(self, cache: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, Params]:
        """dx = y * (dy - sum_k dy_k y_k)."""
        y = cache
        _check_dy(dy, y.shape, y.dtype)
        return y * (dy - (dy * y).sum(axis=1, keepdims=True)), ()


@attrs.frozen(eq=False, repr=False)
class Dropout(_NoParams):
    """Inverted dropout: in training, y = x * mask / (1 - p), mask ~ Bernoulli(1 - p).

    ``p`` is the probability of *dropping* a unit (PyTorch's convention).
    Evaluation mode is the identity.  Training needs ``ctx.key``.
    x: (N, ...) -> y: same shape.

    >>> x = np.ones((1, 6), np.float32)
    >>> y, _, _ = dlfs.Dropout(0.5).forward(x, dlfs.train_context(1))
    >>> set(y.ravel().tolist()) <= {0.0, 2.0}  # dropped, or scaled by 1 / (1 - p)
    True
    """

    p: float = attrs.field(
        default=0.5, converter=lambda p: _check_number("p", p, low=0.0, high=1.0, high_open=True)
    )

    def forward(self, x: np.ndarray, ctx: Context = EVAL) -> tuple[np.ndarray, Any, Dropout]:
        """The cache is the scaled mask (None when inactive)."""
        self._check(x)
        if not ctx.train or self.p == 0.0:
            return x, None, self
        if ctx.key is None:
            raise ValueError(
                "Dropout in training mode needs a random key: pass Context(train=True, key=...)"
            )
        keep = _rng(ctx.key).random(x.shape, dtype=x.dtype) >= self.p
        mask = keep * x.dtype.type(1.0 / (1.0 - self.p))
        return x * mask, mask, self

    def backward(self, cache: Any, dy: np.ndarray) -> tuple[np.ndarray, Params]:
        """dx = dy * mask / (1 - p) (dy in evaluation mode)."""
        if cache is None:
            _check_dy(dy, None, None)
            return dy, ()
        _check_dy(dy, cache.shape, cache.dtype)
        return dy * cache, ()


@attrs.frozen(eq=False, repr=False)
class Flatten(_NoParams):
    """Flatten all but the batch axis: (N, C, H, W) -> ``(N, C*H*W)``; any (N, ...) -> (N, prod(...)).

    >>> dlfs.Flatten().forward(np.zeros((2, 3, 4, 4)))[0].shape
    (2, 48)
    """

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        """(C, H, W) -> ``(C*H*W,)``."""
        return (int(math.prod(in_shape)),)

    def forward(self, x: np.ndarray, ctx: Context = EVAL) -> tuple[np.ndarray, tuple, Flatten]:
        """The cache is the input shape."""
        self._check(x)
        return x.reshape(x.shape[0], -1), x.shape, self

    def backward(self, cache: tuple, dy: np.ndarray) -> tuple[np.ndarray, Params]:
        """dx = dy reshaped to the input shape."""
        _check_dy(dy, (cache[0], math.prod(cache[1:])), None)
        return dy.reshape(cache), ()


@attrs.frozen(eq=False, repr=False)
class BatchNorm(_ArrayRecord):
    """Batch normalization over features (N, D) or channels (N, C, H, W).

    Training: y = gamma * (x - mean_B) / sqrt(var_B + eps) + beta with the
    biased batch variance, and the returned layer carries updated running
    statistics: mean <- (1 - m) mean + m mean_B, var <- (1 - m) var +
    m var_B n / (n - 1) (PyTorch's convention, m = momentum = 0.1).
    Evaluation uses the running statistics only.  Running var starts at 1.
    x: (N, C) or (N, C, H, W) -> y: same shape; gamma, beta, mean, var: (C,).
    In a network, ``batch_norm()`` sizes it from the previous layer.

    >>> bn = dlfs.BatchNorm.init(2, dtype=np.float64)
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0]])
    >>> y, _, trained = bn.forward(x, dlfs.train_context(0))
    >>> y.round(3).tolist()  # each feature normalized over the batch
    [[-1.0, -1.0], [1.0, 1.0]]
    >>> trained.mean.round(3).tolist(), bn.mean.tolist()  # a new layer; bn is untouched
    ([0.2, 2.0], [0.0, 0.0])
    """

    _BUILDERS = ("dlfs.batch_norm()", "dlfs.BatchNorm.init({sizes})")

    _PARAMS = ("gamma", "beta")  # the fields params() returns, in order

    gamma: np.ndarray = attrs.field(converter=_frozen_field)
    beta: np.ndarray = attrs.field(converter=_frozen_field)
    mean: np.ndarray = attrs.field(converter=_frozen_field)
    var: np.ndarray = attrs.field(converter=_frozen_field)
    momentum: float = attrs.field(
        default=0.1, converter=lambda m: _check_number("momentum", m, low=0.0, high=1.0)
    )
    eps: float = attrs.field(
        default=1e-5, converter=lambda e: _check_number("eps", e, low=0.0, low_open=True)
    )

    def __attrs_post_init__(self) -> None:
        if self.gamma.ndim != 1:
            raise ValueError(f"gamma must be 1-D (C,), got shape {self.gamma.shape}")
        for name in ("beta", "mean", "var"):
            _check_input(name, getattr(self, name), self.gamma.shape, self.gamma.dtype)

    @classmethod
    def init(
        cls,
        n_features: int,
        *,
        momentum: float = 0.1,
        eps: float = 1e-5,
        dtype: FloatDType = np.float32,
    ) -> BatchNorm:
        """gamma = 1, beta = 0, running mean = 0, running var = 1, each (n_features,)."""
        c = _check_int("n_features", n_features)
        dtype = _check_dtype(dtype)
        ones, zero = np.ones(c, dtype), np.zeros(c, dtype)
        return cls(ones, zero, zero, ones, momentum=momentum, eps=eps)

    def params(self) -> Params:
        """(gamma, beta); the running statistics are state, not parameters."""
        return (self.gamma, self.beta)

    def with_params(self, params: Sequence[np.ndarray]) -> BatchNorm:
        """A new BatchNorm with ``(gamma, beta)`` replaced, statistics kept."""
        gamma, beta = _check_new_params(self, params)
        return attrs.evolve(self, gamma=gamma, beta=beta)

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Unchanged; the feature/channel axis must have C entries."""
        if len(in_shape) not in (1, 3) or in_shape[0] != self.gamma.shape[0]:
            raise ValueError(
                f"BatchNorm with {self.gamma.shape[0]} features expects (N, "
                f"{self.gamma.shape[0]}) or (N, {self.gamma.shape[0]}, H, W), got "
                f"{_shape_str((None, *in_shape))}"
            )
        return tuple(in_shape)

    def _axes(self, x: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Reduction axes and the broadcast shape of the (C,) arrays."""
        if x.ndim == 2:
            return (0,), (1, -1)
        return (0, 2, 3), (1, -1, 1, 1)

    def forward(self, x: np.ndarray, ctx: Context = EVAL) -> tuple[np.ndarray, tuple, BatchNorm]:
        """x: (N, C) or (N, C, H, W) -> y: same shape."""
        _check_float("x", x, self.gamma.dtype)
        self.output_shape(x.shape[1:])
        axes, bshape = self._axes(x)
        if ctx.train:
            n = x.size // x.shape[1]
            if n < 2:
                raise ValueError(
                    "x must hold more than one value per channel for BatchNorm in training "
                    f"(a batch of 2 or more), got input shape {x.shape}"
                )
            mean = x.mean(axis=axes)
            var = x.var(axis=axes)
            m = self.momentum
            layer = attrs.evolve(
                self,
                mean=_freeze_new((1 - m) * self.mean + m * mean),
                var=_freeze_new((1 - m) * self.var + (m * n / (n - 1)) * var),
            )
        else:
            mean, var, layer = self.mean, self.var, self
        inv = 1 / np.sqrt(var + self.eps)
        xhat = (x - mean.reshape(bshape)) * inv.reshape(bshape)
        y = xhat * self.gamma.reshape(bshape) + self.beta.reshape(bshape)
        return y, (xhat, inv, ctx.train), layer

    def backward(self, cache: tuple, dy: np.ndarray) -> tuple[np.ndarray, Params]:
        """Full batch-statistics backward in training, affine backward in evaluation."""
        xhat, inv, train = cache
        _check_dy(dy, xhat.shape, xhat.dtype)
        axes, bshape = self._axes(dy)
        dgamma = (dy * xhat).sum(axis=axes)
        dbeta = dy.sum(axis=axes)
        dxhat = dy * self.gamma.reshape(bshape)
        if not train:
            return dxhat * inv.reshape(bshape), (dgamma, dbeta)
        mean_dxhat = dxhat.mean(axis=axes, keepdims=True)
        mean_dxhat_xhat = (dxhat * xhat).mean(axis=axes, keepdims=True)
        dx = (dxhat - mean_dxhat - xhat * mean_dxhat_xhat) * inv.reshape(bshape)
        return dx, (dgamma, dbeta)

    def __repr__(self) -> str:
        return f"BatchNorm({self.gamma.shape[0]}, momentum={self.momentum}, eps={self.eps}, {self.gamma.dtype})"


# ------------------------------------------ sequences: embedding and recurrent layers


def _check_ids(name: str, x: Any, spec: Sequence[int | str | None]) -> None:
    """``x`` must be an integer ndarray (token ids; an np.memmap too, no other
    subclass) of shape ``spec``."""
    if type(x) is not np.ndarray and not isinstance(x, np.memmap):
        raise TypeError(
            f"{name} must be a numpy array of integer token ids, got {type(x).__name__}; "
            "convert with np.asarray(..., dtype=np.int64)"
        )
    if x.dtype.kind not in "iu":
        raise TypeError(
            f"{name} must be an integer array of token ids, got dtype {x.dtype}; "
            "dlfs never casts silently: convert with .astype(np.int64)"
        )
    _check_shape(name, x, spec)


def _scatter_add_rows(n_rows: int, idx: np.ndarray, values: np.ndarray) -> np.ndarray:
    """out[k] = sum of values[j] over the j with idx[j] == k (repeats accumulate).

    idx: (M,) ints in [0, n_rows), M >= 1, values: (M, D) -> out: (n_rows, D).
    The rows are sorted by id (stably) and summed per run of equal ids with
    np.add.reduceat: 2-4x faster than np.add.at here, and deterministic.
    """
    order = np.argsort(idx, kind="stable")
    ids = idx[order]
    starts = np.flatnonzero(np.concatenate(([True], ids[1:] != ids[:-1])))
    out = np.zeros((n_rows, values.shape[1]), values.dtype)
    out[ids[starts]] = np.add.reduceat(values[order], starts, axis=0)
    return out


def _lookup(w: np.ndarray, ids: np.ndarray, name: str = "x") -> np.ndarray:
    """w[ids], the rows of a (V, D) table: ids (N, ...) in [0, V) -> (N, ..., D)."""
    _check_nonempty(name, ids)
    lo, hi = ids.min(), ids.max()
    if lo < 0 or hi >= len(w):
        raise ValueError(f"{name} must hold ids in [0, {len(w)}), got values in [{lo}, {hi}]")
    return np.take(w, ids, axis=0)


_T = TypeVar("_T", bound="_Table")


@attrs.frozen(eq=False, repr=False)
class _Table(_ArrayRecord):
    """Base of the layers that hold one (rows, dim) matrix ``w``: Embedding (a
    row per token id) and PositionalEmbedding (a row per position)."""

    _PARAMS = ("w",)  # the fields params() returns, in order
    _ROWS = "rows"  # what a row is, for messages

    w: np.ndarray = attrs.field(converter=_frozen_field)

    def __attrs_post_init__(self) -> None:
        if self.w.ndim != 2:
            raise ValueError(f"w must be 2-D ({self._ROWS}, dim), got shape {self.w.shape}")

    @classmethod
    def _drawn(cls: type[_T], key: Any, rows: Any, dim: Any, init: Any, dtype: Any) -> _T:
        """A new layer with w (rows, dim) drawn by ``init`` from ``key`` (``init``'s body)."""
        rows, dim = _check_int(cls._ROWS, rows), _check_int("dim", dim)
        return cls(_draw("init", init, make_rng(key), (rows, dim), _check_dtype(dtype)))

    @property
    def dim(self) -> int:
        return self.w.shape[1]

    def params(self) -> Params:
        """(w,)."""
        return (self.w,)

    def with_params(self: _T, params: Sequence[np.ndarray]) -> _T:
        """A new layer of this type with ``params = (w,)``."""
        (w,) = _check_new_params(self, params)
        return type(self)(w)


@attrs.frozen(eq=False, repr=False)
class Embedding(_Table):
    """Lookup table of token vectors: y[n, t] = w[x[n, t]] (PyTorch's
    ``nn.Embedding``, whose ``weight`` is ``w``).

    x: integer ids (N, T) (or any (N, ...)) in [0, n_vocab) -> y: (N, T, dim);
    w: (n_vocab, dim).  The gradient is a scatter-add, dw[k] = sum of dy over
    the positions holding id k; ids have no gradient (backward's dx is None).
    A network that starts with an Embedding takes integer ids as its input.

    >>> emb = dlfs.Embedding.init(0, n_vocab=10, dim=4)
    >>> y, cache, _ = emb.forward(np.array([[1, 2, 3], [3, 2, 1]]))
    >>> y.shape, bool((y[0, 0] == emb.w[1]).all())
    ((2, 3, 4), True)
    """

    _BUILDERS = ("dlfs.embedding({sizes})", "dlfs.Embedding.init(key, {sizes})")
    _ROWS = "n_vocab"

    @classmethod
    def init(
        cls,
        key: int | Key,
        n_vocab: int,
        dim: int,
        *,
        init: Initializer = normal,
        dtype: FloatDType = np.float32,
    ) -> Embedding:
        """Draw w (n_vocab, dim) with ``init`` (N(0, 1), PyTorch's default) from ``key``."""
        return cls._drawn(key, n_vocab, dim, init, dtype)

    @property
    def n_vocab(self) -> int:
        return self.w.shape[0]

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        """(T,) -> (T, dim): one vector per id."""
        return (*in_shape, self.dim)

    def forward(
        self, x: np.ndarray, ctx: Context = EVAL
    ) -> tuple[np.ndarray, np.ndarray, Embedding]:
        """y = w[x]; the cache is x.  Ids out of [0, n_vocab) are a ValueError."""
        _check_ids("x", x, (None, *np.shape(x)[1:]))  # any (N, ...) of ints
        return _lookup(self.w, x), x, self

    def backward(self, cache: np.ndarray, dy: np.ndarray) -> tuple[Any, Params]:
        """dx = None (ids have no gradient); dw = scatter-add of dy by id.
        dy: (N, T, dim) -> dw: (n_vocab, dim)."""
        return None, self._param_grads(cache, dy)

    def _param_grads(self, cache: np.ndarray, dy: np.ndarray) -> Params:
        _check_input("dy", dy, (*cache.shape, self.dim), self.w.dtype)
        return (_scatter_add_rows(self.n_vocab, cache.reshape(-1), dy.reshape(-1, self.dim)),)

    def __repr__(self) -> str:
        return f"Embedding({self.n_vocab} -> {self.dim}, {self.w.dtype})"


def _swap_nt(a: np.ndarray) -> np.ndarray:
    """(N, T, ...) <-> (T, N, ...) as a contiguous copy (time-major: a step's rows
    side by side)."""
    return np.ascontiguousarray(a.swapaxes(0, 1))


def _by_gate(w: np.ndarray, gates: int) -> np.ndarray:
    """(R, G*H) -> (G, R, H) view: gate k's columns w[:, k*H:(k+1)*H] as block k."""
    return w.reshape(w.shape[0], gates, -1).swapaxes(0, 1)


class _BPTT:
    """A recurrent layer's weight gradients, accumulated step by step while
    backward walks back in time: with step t's gate gradients as (N, G*H)
    rows (dax_t: of x_t @ w_ih + b, dah_t: of h_{t-1} @ w_hh),
    dw_ih += x_t.T @ dax_t, dw_hh += h_{t-1}.T @ dah_t, db += sum_n dax_t,
    dx_t = dax_t @ w_ih.T, and the recurrent gradient dah_t @ w_hh.T.

    Per step, while the rows are in cache: measured faster than one GEMM
    over all steps at the end, which needs the (G, T, N, H) gradients kept
    (a fresh array every call: page faults, memory traffic).  Private and
    local to one backward call.
    """

    def __init__(self, layer: Any, xt: np.ndarray, h0: np.ndarray, hs: np.ndarray, need_dx: bool):
        self.xt, self.h0, self.hs = xt, h0, hs
        self.w_ih_t = np.ascontiguousarray(layer.w_ih.T)  # (G*H, D)
        self.w_hh_t = np.ascontiguousarray(layer.w_hh.T)  # (G*H, H)
        gh = layer.w_hh.shape[1]
        self.dw_ih = np.zeros_like(layer.w_ih)
        self.dw_hh = np.zeros_like(layer.w_hh)
        self.db = np.zeros(gh, layer.w_hh.dtype)
        self.dx = np.empty_like(xt) if need_dx else None  # (T, N, D)

    def step(self, t: int, dax: np.ndarray, dah: np.ndarray | None = None) -> np.ndarray:
        """Add step t's gate gradients, gate-major (G, N, H) (``dah`` None: the
        same as ``dax``); returns dL/dh_{t-1} through w_hh, (N, H)."""
        x_rows = _rows(dax)
        h_rows = x_rows if dah is None else _rows(dah)
        self.dw_ih += self.xt[t].T @ x_rows
        self.dw_hh += (self.hs[t - 1] if t else self.h0).T @ h_rows
        self.db += x_rows.sum(axis=0)
        if self.dx is not None:
            np.matmul(x_rows, self.w_ih_t, out=self.dx[t])
        return h_rows @ self.w_hh_t


def _rows(d: np.ndarray) -> np.ndarray:
    """Gate-major (G, N, H) -> (N, G*H) rows in w_ih's / w_hh's column order."""
    return np.ascontiguousarray(d.swapaxes(0, 1)).reshape(d.shape[1], -1)


def _sigmoid_slope(s: np.ndarray) -> np.ndarray:
    """sigmoid' from s = sigmoid(z): s (1 - s)."""
    slope = np.subtract(s.dtype.type(1), s)
    slope *= s
    return slope


def _tanh_slope(y: np.ndarray) -> np.ndarray:
    """tanh' from y = tanh(z): 1 - y^2."""
    slope = np.multiply(y, y)
    return np.subtract(y.dtype.type(1), slope, out=slope)


def _recurrent_weights(
    key: int | Key, n_in: int, n_hidden: int, gates: int, dtype: FloatDType
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(w_ih, w_hh, b): Glorot uniform (D, G*H), one orthogonal (H, H) block per
    gate, zeros (G*H,)."""
    n_in, n_hidden = _check_int("n_in", n_in), _check_int("n_hidden", n_hidden)
    dtype = _check_dtype(dtype)
    rng = make_rng(key)
    w_ih = glorot_uniform(rng, (n_in, gates * n_hidden), dtype)
    w_hh = np.concatenate([orthogonal(rng, (n_hidden, n_hidden), dtype) for _ in range(gates)], 1)
    return w_ih, w_hh, np.zeros(gates * n_hidden, dtype)


RecurrentState = np.ndarray | tuple[np.ndarray, ...]
"""A recurrent layer's state: h (N, H) for RNN and GRU, the pair (h, c) for LSTM."""

_R = TypeVar("_R", bound="_Recurrent")


@attrs.frozen(eq=False, repr=False)
class _Recurrent(_ArrayRecord):
    """What RNN, LSTM and GRU share: shapes, validation, the input projection
    of all steps at once, batch-first <-> time-major, and the backward pass
    around the cell's loop.  A subclass gives ``_GATES``, ``_STATES`` (1:
    state h, 2: state (h, c)), ``_steps`` (the forward loop) and
    ``_back_steps`` (the backward one, which hands each step's gate
    gradients to a ``_BPTT``).

    Inside, arrays are gate-major and time-major: the pre-activations are
    a[k, t] (G, T, N, H), gate k's (N, H) block at step t, so every per-step
    elementwise operation runs over contiguous memory; the recurrent GEMM of
    a step is h (N, H) @ w_hh as G blocks (G, H, H).  The caller sees
    batch-first (N, T, ...) arrays and PyTorch's (D, G*H) / (H, G*H) weight
    layout.
    """

    _GATES = 1
    _STATES = 1
    _EXTRA_BIASES = 0  # (H,) biases after b (the GRU's b_hn)
    _PARAMS = ("w_ih", "w_hh", "b")  # the fields params() returns, in order

    w_ih: np.ndarray = attrs.field(converter=_frozen_field)
    w_hh: np.ndarray = attrs.field(converter=_frozen_field)
    b: np.ndarray = attrs.field(converter=_frozen_field)
    return_sequences: bool = attrs.field(
        default=False, kw_only=True, validator=attrs.validators.instance_of(bool)
    )

    def __attrs_post_init__(self) -> None:
        name, g = type(self).__name__, self._GATES
        if self.w_hh.ndim != 2 or self.w_hh.shape[1] != g * self.w_hh.shape[0]:
            raise ValueError(f"w_hh of {name} must have shape (H, {g}*H), got {self.w_hh.shape}")
        gh = self.w_hh.shape[1]
        _check_input("w_ih", self.w_ih, ("D", gh), self.w_hh.dtype)
        _check_input("b", self.b, (gh,), self.w_hh.dtype)

    @classmethod
    def init(
        cls: type[_R],
        key: int | Key,
        n_in: int,
        n_hidden: int,
        *,
        return_sequences: bool = False,
        dtype: FloatDType = np.float32,
    ) -> _R:
        """Draw from ``key``: w_ih Glorot uniform (D, G*H), w_hh one orthogonal
        (H, H) block per gate, biases zero (D = n_in, H = n_hidden, G gates)."""
        w_ih, w_hh, b = _recurrent_weights(key, n_in, n_hidden, cls._GATES, dtype)
        extra = (np.zeros(n_hidden, b.dtype) for _ in range(cls._EXTRA_BIASES))
        return cls(w_ih, w_hh, b, *extra, return_sequences=return_sequences)

    @property
    def n_in(self) -> int:
        return self.w_ih.shape[0]

    @property
    def n_hidden(self) -> int:
        return self.w_hh.shape[0]

    def params(self) -> Params:
        """(w_ih, w_hh, b)."""
        return (self.w_ih, self.w_hh, self.b)

    def with_params(self: _R, params: Sequence[np.ndarray]) -> _R:
        """A new layer of the same kind with ``params`` (shapes and dtypes checked)."""
        new = _check_new_params(self, params)
        return type(self)(*new, return_sequences=self.return_sequences)

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        """(T, D) -> (T, H) with ``return_sequences``, else (H,)."""
        in_shape = tuple(in_shape)
        if len(in_shape) != 2 or in_shape[1] != self.n_in:
            raise ValueError(
                f"{type(self).__name__} expects sequences of shape (N, T, {self.n_in}), "
                f"the previous layer gives {_shape_str((None, *in_shape))}"
            )
        return (in_shape[0], self.n_hidden) if self.return_sequences else (self.n_hidden,)

    def initial_state(self, n: int) -> RecurrentState:
        """The zero state for a batch of ``n``: h (N, H), or (h, c) for an LSTM."""
        zeros = self._zeros(_check_int("n", n))
        return zeros[0] if self._STATES == 1 else zeros

    def _zeros(self, n: int) -> tuple[np.ndarray, ...]:
        return tuple(np.zeros((n, self.n_hidden), self.w_hh.dtype) for _ in range(self._STATES))

    def _check_state(
        self, name: str, state: Any, n: int, *, none_parts: bool = False
    ) -> tuple[Any, ...]:
        """A public state (h, or (h, c)) as a tuple of (N, H) arrays; None ->
        zeros; with ``none_parts`` an LSTM pair may hold None (for zeros)."""
        if state is None:
            return self._zeros(n)
        parts = (state,) if self._STATES == 1 else state
        if self._STATES == 2 and (not isinstance(state, tuple) or len(state) != 2):
            raise TypeError(f"{name} of an LSTM must be a pair (h, c), got {type(state).__name__}")
        for i, part in enumerate(parts):
            if not (none_parts and part is None and self._STATES == 2):
                where = name if self._STATES == 1 else f"{name}[{i}]"
                _check_input(where, part, (n, self.n_hidden), self.w_hh.dtype)
        return parts

    def scan(
        self, x: np.ndarray, state: RecurrentState | None = None
    ) -> tuple[np.ndarray, RecurrentState, tuple]:
        """Run over all T steps from ``state`` (None: zeros): returns (ys, last
        state, cache).  x: (N, T, D) -> ys: (N, T, H); state h (N, H), or
        (h, c) for an LSTM.  Pure: for truncated backpropagation through time
        pass the last state of one segment as the next one's ``state``."""
        self._check_x(x)
        hs, last, cache = self._scan(x, self._check_state("state", state, x.shape[0]))
        return _swap_nt(hs), (last[0] if self._STATES == 1 else last), cache

    def backward_scan(
        self, cache: tuple, dys: np.ndarray | None = None, dstate: Any = None
    ) -> tuple[np.ndarray, Any, Params]:
        """Backpropagation through time: from dL/dys (N, T, H) and dL/d(last
        state) (either may be None, not both; so may one part of an LSTM's
        (dh, dc)) to (dx (N, T, D), dL/d(initial state), grads aligned with
        ``params()``)."""
        t, n = cache[0].shape[:2]
        dyt = None
        if dys is not None:
            dyt = _swap_nt(_check_input("dys", dys, (n, t, self.n_hidden), self.w_hh.dtype))
        dlast = None if dstate is None else self._check_state("dstate", dstate, n, none_parts=True)
        if dyt is None and (dlast is None or all(part is None for part in dlast)):
            raise ValueError(
                f"backward_scan needs dys or dstate, got dys=None and dstate={dstate!r}"
            )
        dx, d0, grads = self._backward(cache, dyt, dlast, need_dx=True)
        return dx, (d0[0] if self._STATES == 1 else d0), grads

    def forward(self: _R, x: np.ndarray, ctx: Context = EVAL) -> tuple[np.ndarray, tuple, _R]:
        """``scan`` from the zero state: ys (N, T, H) with ``return_sequences``,
        else the last step's h (N, H); the cache is the scan's."""
        self._check_x(x)
        hs, _, cache = self._scan(x, self._zeros(x.shape[0]))
        return (_swap_nt(hs) if self.return_sequences else hs[-1]), cache, self

    def backward(self, cache: tuple, dy: np.ndarray) -> tuple[np.ndarray, Params]:
        """dx (N, T, D) and grads from dy (N, T, H) or (N, H) (see ``forward``)."""
        dx, _, grads = self._backward(cache, *self._dy_parts(cache, dy), need_dx=True)
        return dx, grads

    def _param_grads(self, cache: tuple, dy: np.ndarray) -> Params:
        """The grads of ``backward`` without dx: a network skips the input
        gradient of its first layer."""
        return self._backward(cache, *self._dy_parts(cache, dy), need_dx=False)[2]

    def _dy_parts(self, cache: tuple, dy: np.ndarray) -> tuple[Any, Any]:
        """``forward``'s dy as (time-major dys, None) or (None, last state grads)."""
        t, n = cache[0].shape[:2]
        if self.return_sequences:
            _check_input("dy", dy, (n, t, self.n_hidden), self.w_hh.dtype)
            return _swap_nt(dy), None
        _check_input("dy", dy, (n, self.n_hidden), self.w_hh.dtype)
        return None, (dy,) + (None,) * (self._STATES - 1)

    def _check_x(self, x: Any) -> None:
        _check_input("x", x, (None, "T", self.n_in), self.w_hh.dtype)
        if x.shape[1] == 0:
            raise ValueError(f"x must have at least one time step, got shape {x.shape}")
        if x.shape[0] == 0:
            raise ValueError(f"x must have at least one sequence, got shape {x.shape}")

    def _scan(self, x: np.ndarray, state: tuple) -> tuple[np.ndarray, tuple, tuple]:
        """The input projection of all steps at once (one GEMM per gate), then the
        step loop.  Returns time-major hs (T, N, H), the last state and the cache."""
        xt = _swap_nt(x)  # (T, N, D)
        t, n, d = xt.shape
        g = self._GATES
        a = np.matmul(xt.reshape(t * n, d), _by_gate(self.w_ih, g))  # (G, T*N, H)
        a += self.b.reshape(g, 1, -1)
        w_hh = np.ascontiguousarray(_by_gate(self.w_hh, g))  # (G, H, H)
        hs, last, core = self._steps(a.reshape(g, t, n, -1), state, w_hh)
        return hs, last, (xt, state, hs, core)

    def _steps(
        self, a: np.ndarray, state: tuple, w_hh: np.ndarray
    ) -> tuple[np.ndarray, tuple, Any]:
        """The cell's forward loop over a (G, T, N, H) -> (hs (T, N, H), last
        state, the cell's part of the cache); ``w_hh`` as (G, H, H) blocks."""
        raise NotImplementedError

    def _back_steps(
        self, core: Any, state: tuple, hs: np.ndarray, dyt: Any, d: list, acc: _BPTT
    ) -> tuple[tuple, tuple]:
        """The cell's backward loop, last step first: feeds ``acc`` each step's
        gate gradients; returns (d(initial state), the gradients of the
        cell's own extra parameters)."""
        raise NotImplementedError

    def _grad_buffers(self, dlast: tuple | None, n: int) -> list[np.ndarray]:
        """Fresh copies of the last state's gradients (zeros where None), which
        the backward loop then updates in place."""
        parts = dlast if dlast is not None else (None,) * self._STATES
        zero = functools.partial(np.zeros, (n, self.n_hidden), self.w_hh.dtype)
        return [zero() if p is None else p.copy() for p in parts]

    def _backward(
        self, cache: tuple, dyt: np.ndarray | None, dlast: tuple | None, *, need_dx: bool
    ) -> tuple[Any, tuple, Params]:
        """Backpropagation through time: the cell's step loop, backward, feeding
        each step's gate gradients to a ``_BPTT`` accumulator."""
        xt, state, hs, core = cache
        acc = _BPTT(self, xt, state[0], hs, need_dx)
        d0, extra = self._back_steps(
            core, state, hs, dyt, self._grad_buffers(dlast, xt.shape[1]), acc
        )
        grads = (acc.dw_ih, acc.dw_hh, acc.db, *extra)
        return (None if acc.dx is None else _swap_nt(acc.dx)), d0, grads

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.n_in} -> {self.n_hidden}, "
            f"return_sequences={self.return_sequences}, {self.w_hh.dtype})"
        )


@attrs.frozen(eq=False, repr=False)
class RNN(_Recurrent):
    """Elman RNN with tanh (PyTorch's ``nn.RNN``, batch_first=True):
    h_t = tanh(x_t @ w_ih + h_{t-1} @ w_hh + b).

    x: (N, T, D) -> (N, T, H) with ``return_sequences``, else (N, H), the last
    h; w_ih: (D, H), w_hh: (H, H), b: (H,).  ``forward`` starts from h_0 = 0;
    ``scan(x, h0)`` starts from any h0 (N, H) and returns the last h too.

    PyTorch: w_ih = weight_ih_l0.T, w_hh = weight_hh_l0.T, b = bias_ih_l0 +
    bias_hh_l0; back: weight_ih_l0 = w_ih.T, weight_hh_l0 = w_hh.T,
    bias_ih_l0 = b, bias_hh_l0 = 0.

    >>> rnn = dlfs.RNN.init(0, n_in=3, n_hidden=8, return_sequences=True)
    >>> x = np.ones((2, 5, 3), np.float32)
    >>> ys, h_last, cache = rnn.scan(x)  # from h0 = 0
    >>> ys.shape, h_last.shape, bool((ys[:, -1] == h_last).all())
    ((2, 5, 8), (2, 8), True)
    """

    _BUILDERS = ("dlfs.rnn({sizes})", "dlfs.RNN.init(key, n_in, {sizes})")

    def _steps(
        self, a: np.ndarray, state: tuple, w_hh: np.ndarray
    ) -> tuple[np.ndarray, tuple, Any]:
        """a[0, t] (N, H) holds x_t w_ih + b and becomes h_t in place."""
        (h,) = state
        hs = a[0]
        for t in range(len(hs)):
            h = np.tanh(np.add(hs[t], h @ w_hh[0], out=hs[t]), out=hs[t])
        return hs, (h,), None

    def _back_steps(
        self, core: Any, state: tuple, hs: np.ndarray, dyt: Any, d: list, acc: _BPTT
    ) -> tuple[tuple, tuple]:
        """da_t = (dh_t + dys_t) (1 - h_t^2); dh_{t-1} = da_t @ w_hh.T."""
        (dh,) = d
        for t in range(len(hs) - 1, -1, -1):
            if dyt is not None:
                dh += dyt[t]
            dh = acc.step(t, np.multiply(_tanh_slope(hs[t]), dh)[None])
        return (dh,), ()


@attrs.frozen(eq=False, repr=False)
class LSTM(_Recurrent):
    """Long short-term memory (PyTorch's ``nn.LSTM``, batch_first=True), gates
    in PyTorch's order i, f, g, o along the columns of w_ih, w_hh and b:
    [i f g o] = x_t @ w_ih + h_{t-1} @ w_hh + b, then i, f, o = sigmoid(.),
    g = tanh(.), c_t = f * c_{t-1} + i * g, h_t = o * tanh(c_t).

    x: (N, T, D) -> (N, T, H) with ``return_sequences``, else (N, H), the last
    h; w_ih: (D, 4H), w_hh: (H, 4H), b: (4H,); the state is (h, c), each (N, H).
    ``forward`` starts from zeros; ``scan(x, (h0, c0))`` from any state and
    returns the last (h, c) too.

    PyTorch: w_ih = weight_ih_l0.T, w_hh = weight_hh_l0.T, b = bias_ih_l0 +
    bias_hh_l0; back: weight_ih_l0 = w_ih.T, weight_hh_l0 = w_hh.T,
    bias_ih_l0 = b, bias_hh_l0 = 0.

    >>> lstm = dlfs.LSTM.init(0, n_in=28, n_hidden=16)  # rows of a 28x28 image as steps
    >>> h, cache, _ = lstm.forward(np.zeros((2, 28, 28), np.float32))
    >>> h.shape
    (2, 16)
    >>> ys, (h, c), _ = lstm.scan(np.zeros((2, 3, 28), np.float32), lstm.initial_state(2))
    >>> ys.shape, h.shape, c.shape
    ((2, 3, 16), (2, 16), (2, 16))
    """

    _BUILDERS = ("dlfs.lstm({sizes})", "dlfs.LSTM.init(key, n_in, {sizes})")

    _GATES = 4
    _STATES = 2

    @classmethod
    def init(
        cls,
        key: int | Key,
        n_in: int,
        n_hidden: int,
        *,
        return_sequences: bool = False,
        forget_bias: float = 1.0,
        dtype: FloatDType = np.float32,
    ) -> LSTM:
        """Glorot-uniform w_ih, one orthogonal block per gate in w_hh, b = 0
        except the forget gate's, ``forget_bias``.  The default 1.0 (Gers et
        al. 2000, Jozefowicz et al. 2015; Keras's ``unit_forget_bias``) starts
        f near 0.73, so the cell keeps its memory and gradients reach far back
        early in training; pass 0.0 for all-zero biases."""
        forget_bias = _check_number("forget_bias", forget_bias)
        layer = super().init(key, n_in, n_hidden, return_sequences=return_sequences, dtype=dtype)
        b = layer.b.copy()
        b[n_hidden : 2 * n_hidden] = forget_bias
        return attrs.evolve(layer, b=b)

    def _steps(
        self, a: np.ndarray, state: tuple, w_hh: np.ndarray
    ) -> tuple[np.ndarray, tuple, Any]:
        """a[:, t] (4, N, H) holds x_t w_ih + b and becomes the gates i, f, g, o."""
        _, n_t, n, n_h = a.shape
        hs, cs, tcs = np.empty((3, n_t, n, n_h), a.dtype)  # one block: fewer page faults
        h, c = state
        for t in range(n_t):
            z = a[:, t]
            z += np.matmul(h, w_hh)  # (4, N, H)
            i, f, g, o = z
            _sigmoid(z[:2], out=z[:2])
            np.tanh(g, out=g)
            _sigmoid(o, out=o)
            c = np.multiply(f, c, out=cs[t])
            c += i * g
            h = np.multiply(o, np.tanh(c, out=tcs[t]), out=hs[t])
        return hs, (h, c), (a, cs, tcs)

    def _back_steps(
        self, core: Any, state: tuple, hs: np.ndarray, dyt: Any, d: list, acc: _BPTT
    ) -> tuple[tuple, tuple]:
        """da_t = [di df dg do] times the activations' slopes, where
        dc_t = dc_{t+1} f_{t+1} + dh_t o_t (1 - tanh(c_t)^2)."""
        a, cs, tcs = core
        dh, dc = d
        for t in range(a.shape[1] - 1, -1, -1):
            if dyt is not None:
                dh += dyt[t]
            i, f, g, o = a[:, t]
            da = np.empty_like(a[:, t])
            di, df, dg, do = da
            np.multiply(dh, tcs[t], out=do)
            dc_here = _tanh_slope(tcs[t])
            dc_here *= o
            dc_here *= dh
            dc += dc_here
            np.multiply(dc, g, out=di)
            np.multiply(dc, cs[t - 1] if t else state[1], out=df)
            np.multiply(dc, i, out=dg)
            dc *= f
            da[:2] *= _sigmoid_slope(a[:2, t])
            dg *= _tanh_slope(g)
            do *= _sigmoid_slope(o)
            dh = acc.step(t, da)
        return (dh, dc), ()


@attrs.frozen(eq=False, repr=False)
class GRU(_Recurrent):
    """Gated recurrent unit (PyTorch's ``nn.GRU``, batch_first=True), gates in
    PyTorch's order r, z, n along the columns of w_ih, w_hh and b:
    r, z = sigmoid(x_t @ w_ih[:, :2H] + h_{t-1} @ w_hh[:, :2H] + b[:2H]),
    n = tanh(x_t @ w_ih[:, 2H:] + b[2H:] + r * (h_{t-1} @ w_hh[:, 2H:] + b_hn)),
    h_t = (1 - z) * n + z * h_{t-1}.  The reset gate multiplies the recurrent
    term after its bias, so n keeps its own b_hn (as Equinox's ``GRUCell``).

    x: (N, T, D) -> (N, T, H) with ``return_sequences``, else (N, H), the last
    h; w_ih: (D, 3H), w_hh: (H, 3H), b: (3H,), b_hn: (H,).  ``forward``
    starts from h_0 = 0; ``scan(x, h0)`` from any h0 and returns the last h too.

    PyTorch: w_ih = weight_ih_l0.T, w_hh = weight_hh_l0.T, b = bias_ih_l0 +
    [bias_hh_l0[:2H], 0], b_hn = bias_hh_l0[2H:]; back: weight_ih_l0 = w_ih.T,
    weight_hh_l0 = w_hh.T, bias_ih_l0 = b, bias_hh_l0 = [0, 0, b_hn].

    >>> gru = dlfs.GRU.init(0, n_in=3, n_hidden=4, return_sequences=True)
    >>> ys, cache, _ = gru.forward(np.ones((2, 5, 3), np.float32))
    >>> dx, grads = gru.backward(cache, np.ones_like(ys))
    >>> ys.shape, dx.shape, [g.shape for g in grads]
    ((2, 5, 4), (2, 5, 3), [(3, 12), (4, 12), (12,), (4,)])
    """

    _BUILDERS = ("dlfs.gru({sizes})", "dlfs.GRU.init(key, n_in, {sizes})")

    _GATES = 3
    _EXTRA_BIASES = 1
    _PARAMS = ("w_ih", "w_hh", "b", "b_hn")

    b_hn: np.ndarray = attrs.field(converter=_frozen_field)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        _check_input("b_hn", self.b_hn, (self.n_hidden,), self.w_hh.dtype)

    def params(self) -> Params:
        """(w_ih, w_hh, b, b_hn)."""
        return (self.w_ih, self.w_hh, self.b, self.b_hn)

    def _steps(
        self, a: np.ndarray, state: tuple, w_hh: np.ndarray
    ) -> tuple[np.ndarray, tuple, Any]:
        """a[:, t] (3, N, H) holds x_t w_ih + b and becomes r, z, n; hns[t] keeps
        h_{t-1} w_hn + b_hn for backward."""
        _, n_t, n, n_h = a.shape
        hs, hns = np.empty((2, n_t, n, n_h), a.dtype)
        (h,) = state
        for t in range(n_t):
            hw = np.matmul(h, w_hh)  # (3, N, H)
            rz = a[:2, t]
            rz += hw[:2]
            _sigmoid(rz, out=rz)
            r, z, new = a[:, t]
            hn = np.add(hw[2], self.b_hn, out=hns[t])
            new += r * hn
            np.tanh(new, out=new)
            h_new = np.subtract(h, new, out=hs[t])  # h_t = n + z (h_{t-1} - n)
            h_new *= z
            h = np.add(h_new, new, out=h_new)
        return hs, (h,), (a, hns)

    def _back_steps(
        self, core: Any, state: tuple, hs: np.ndarray, dyt: Any, d: list, acc: _BPTT
    ) -> tuple[tuple, tuple]:
        """dax_t: gradients of the input-side pre-activations of r, z, n;
        dah_t: of h_{t-1} @ w_hh's blocks, i.e. [dr, dz, dn * r]."""
        a, hns = core
        (dh,) = d
        db_hn = np.zeros_like(self.b_hn)
        one = a.dtype.type(1)
        for t in range(a.shape[1] - 1, -1, -1):
            if dyt is not None:
                dh += dyt[t]
            r, z, new = a[:, t]
            dax = np.empty_like(a[:, t])
            dr, dz, dn = dax
            np.subtract(hs[t - 1] if t else state[0], new, out=dz)
            dz *= dh  # dL/dz = dh (h_{t-1} - n)
            np.subtract(one, z, out=dn)
            dn *= dh
            dn *= _tanh_slope(new)  # dL/d(n's pre-activation) = dh (1 - z) (1 - n^2)
            np.multiply(dn, hns[t], out=dr)  # dL/dr = that * (h_{t-1} w_hn + b_hn)
            dax[:2] *= _sigmoid_slope(a[:2, t])
            dah = dax.copy()
            dah[2] *= r  # dL/d(h_{t-1} w_hn + b_hn) = dn * r
            db_hn += dah[2].sum(axis=0)
            dh *= z
            dh += acc.step(t, dax, dah)
        return (dh,), (db_hn,)


# ------------------------------------------------------ convolutions and pools

Pads = tuple[tuple[int, int], tuple[int, int]]
Padding = str | int | tuple[int, int] | Pads  # "valid", "same", p, (ph, pw), ((t, b), (l, r))


def _int_pair(name: str, value: Any, *, low: int = 1) -> tuple[int, int]:
    """An int or a pair of ints (each >= ``low``) as a pair: 3 -> (3, 3)."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
        return (
            _check_int(f"{name}[0]", value[0], low=low),
            _check_int(f"{name}[1]", value[1], low=low),
        )
    v = _check_int(name, value, low=low)
    return (v, v)


def _resolve_padding(padding: Padding, kernel: tuple[int, int], stride: tuple[int, int]) -> Pads:
    """``((top, bottom), (left, right))`` from "valid", "same", p, (ph, pw) or the pads.

    "same" (stride 1 only, as in PyTorch) pads k - 1 in total per axis with
    the extra row/column at the bottom/right for an even kernel.
    """
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0), (0, 0))
        if padding == "same":
            if stride != (1, 1):
                raise ValueError(
                    f"padding='same' needs stride 1 (as in PyTorch), got stride {stride}"
                )
            kh, kw = kernel
            return (((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2))
        raise ValueError(
            f"padding must be 'valid', 'same', an int, (ph, pw) or ((top, bottom), "
            f"(left, right)), got {padding!r}"
        )
    if isinstance(padding, (tuple, list)) and any(isinstance(p, (tuple, list)) for p in padding):
        if len(padding) != 2:
            raise ValueError(f"padding must be ((top, bottom), (left, right)), got {padding!r}")
        top, bottom = _int_pair("padding[0]", padding[0], low=0)
        left, right = _int_pair("padding[1]", padding[1], low=0)
        return ((top, bottom), (left, right))
    ph, pw = _int_pair("padding", padding, low=0)
    return ((ph, ph), (pw, pw))


def _out_size(size: int, k: int, s: int) -> int:
    """Number of complete windows of width k, stride s, along an axis of ``size``."""
    return (size - k) // s + 1


def _pool_out_hw(
    what: str,
    in_shape: tuple[int, ...],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    pads: Pads = ((0, 0), (0, 0)),
) -> tuple[int, int]:
    """(Ho, Wo) of a (C, H, W) input padded by ``pads``; raises if the window does not fit."""
    if len(in_shape) != 3:
        raise ValueError(
            f"{what} expects images (N, C, H, W), got {_shape_str((None, *in_shape))}; "
            "reshape flat inputs to (N, C, H, W)"
        )
    h = in_shape[1] + pads[0][0] + pads[0][1]
    w = in_shape[2] + pads[1][0] + pads[1][1]
    if kernel[0] > h or kernel[1] > w:
        padded = f" (padded to {h}x{w})" if any(pads[0] + pads[1]) else ""
        raise ValueError(
            f"{what} window {kernel} is larger than the input "
            f"{_shape_str((None, *in_shape))}{padded}"
        )
    return _out_size(h, kernel[0], stride[0]), _out_size(w, kernel[1], stride[1])


def _check_images(x: Any, dtype: np.dtype | None = None) -> None:
    _check_float("x", x, dtype)
    if x.ndim != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {x.shape}")


def _memory_order(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """The arrays with their axes permuted alike, by the first one's strides from
    the largest: a C-contiguous view of a transposed contiguous array (such as a
    convolution's output), so that elementwise loops run along its memory (an
    in-place ReLU on a conv's channel-major output: 2x faster, commit 311c258)."""
    a = arrays[0]
    if a.flags.c_contiguous:
        return arrays
    order = sorted(range(a.ndim), key=lambda i: -abs(a.strides[i]))
    return tuple(b.transpose(order) for b in arrays)


_ROW = 512  # entries: elementwise loops with a broadcast operand want rows at least this long


def _as_rows(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """C-contiguous (N, ...) arrays of one shape as 2-D rows of its shortest trailing
    block of at least _ROW entries (at most one sample's); else as they are."""
    shape = arrays[0].shape
    if len(shape) < 3 or not all(a.flags.c_contiguous for a in arrays):
        return arrays
    row = 1
    for d in reversed(shape[1:]):
        row *= d
        if row >= _ROW:
            break
    return tuple(a.reshape(-1, row) for a in arrays)


def _span(chunks: list[slice]) -> slice:
    """The samples a run of neighbouring chunks covers."""
    return slice(chunks[0].start, chunks[-1].stop)


def _by_rows(f: Callable[..., Any], *arrays: np.ndarray) -> None:
    """``f(*arrays)`` for elementwise work in place on arrays of one shape, run on
    views of them in the first one's memory order (see _memory_order), as rows."""
    f(*_as_rows(*_memory_order(*arrays)))


def _window(
    x: np.ndarray, i: int, j: int, stride: tuple[int, int], out_hw: tuple[int, ...]
) -> np.ndarray:
    """Strided view of the (i, j)-th element of every window: (N, C, Ho, Wo)."""
    (sh, sw), (ho, wo) = stride, out_hw
    return x[:, :, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw]


def _offsets(kernel: tuple[int, int]) -> list[tuple[int, int]]:
    """Kernel offsets (i, j) in row-major order."""
    return [(i, j) for i in range(kernel[0]) for j in range(kernel[1])]


def _overlap(size: int, out: int, k: int, stride: int, pad: int) -> tuple[slice, slice]:
    """For kernel offset ``k`` along an axis: (output slice, input slice) of the
    output positions o whose input position o*stride + k - pad lies inside
    [0, size); the other outputs read zero padding."""
    lo = max(0, -((k - pad) // stride))  # ceil((pad - k) / stride), at least 0
    hi = min(out, (size - 1 + pad - k) // stride + 1)
    if hi <= lo:  # every output of this offset reads padding
        return slice(lo, lo), slice(0, 0)
    start = lo * stride + k - pad  # >= 0
    return slice(lo, hi), slice(start, start + (hi - lo - 1) * stride + 1, stride)


def _offset_overlaps(
    x_hw: tuple[int, ...],
    out_hw: tuple[int, ...],
    kernel: tuple[int, ...],
    stride: tuple[int, int],
    pads: Pads,
) -> Iterator[tuple[int, int, tuple[slice, slice], tuple[slice, slice]]]:
    """(i, j, output slices, input slices) for every kernel offset, row-major."""
    for i, j in _offsets((kernel[0], kernel[1])):
        oh, ih = _overlap(x_hw[0], out_hw[0], i, stride[0], pads[0][0])
        ow, iw = _overlap(x_hw[1], out_hw[1], j, stride[1], pads[1][0])
        yield i, j, (oh, ow), (ih, iw)


def _zero_outside(a: np.ndarray, rows: slice, cols: slice) -> None:
    """Zero a (..., H, W) array outside ``a[..., rows, cols]`` (the padding's share)."""
    if rows.start:
        a[..., : rows.start, :] = 0
    if rows.stop < a.shape[-2]:
        a[..., rows.stop :, :] = 0
    if cols.start:
        a[..., rows, : cols.start] = 0
    if cols.stop < a.shape[-1]:
        a[..., rows, cols.stop :] = 0


# A convolution is im2col + GEMM, in channel-major layout: the patches of a
# (N, C, H, W) input form a (C*kh*kw, N*Ho*Wo) matrix whose rows are ordered
# (c, i, j) like w.reshape(C_out, -1) and columns (n, ho, wo), so that
# y = w @ patches + b is (C_out, N*Ho*Wo) and (N, C_out, Ho, Wo) is a free
# transposed view of it: no copies between layers.

_GEMM_SMALL = 1_000_000  # multiply-adds: OpenBLAS's small-matrix kernels go up to here
_GEMM_LARGE = 32_000_000  # a large layer's GEMMs in pieces of about this size


def _gemm_chunks(n: int, per_sample: int) -> list[slice]:
    """Batch slices for a convolution's GEMMs, fixed by the shapes alone.

    ``per_sample`` is one sample's multiply-adds.  OpenBLAS (numpy's wheels)
    runs GEMMs of up to about a million multiply-adds through small-matrix
    kernels, 2-4x faster on the long, thin products of a convolution with few
    channels, so a small layer goes in pieces of at most that size; a large
    one in equal pieces of about _GEMM_LARGE.
    """
    if per_sample <= _GEMM_SMALL:
        rows = _GEMM_SMALL // per_sample
    else:
        pieces = -(-n * per_sample // _GEMM_LARGE)
        rows = -(-n // pieces)
    return [slice(i, min(i + rows, n)) for i in range(0, n, rows)]


def _same_grid(x_hw: tuple[int, ...], out_hw: tuple[int, ...], stride: tuple[int, int]) -> bool:
    """Stride 1 and output size == input size ("same" padding): kernel offset
    (i, j) then moves every entry by one flat shift, (i - top)*W + (j - left)."""
    return stride == (1, 1) and tuple(out_hw) == tuple(x_hw)


def _shifted(hw: int, shift: int) -> tuple[slice, slice]:
    """(a, b): flat positions q in a and q + shift in b, for every q with both in [0, hw)."""
    return slice(max(0, -shift), hw - max(0, shift)), slice(max(0, shift), hw + min(0, shift))


def _flat_planes(a: np.ndarray) -> np.ndarray:
    """(C, n, H, W) as (C, n*H*W), a view, when each channel's n planes lie one after
    the other in memory (a channel-major batch, or one channel), else as (C, n, H*W).

    On a "same" grid a kernel offset moves every entry by one flat shift: along
    a whole channel, an entry that the shift carries across a row's or a
    sample's edge is one that reads padding, which is zeroed afterwards (or
    before, for gradients), so one long copy or add serves all n samples."""
    c, n, h, w = a.shape
    try:
        return np.reshape(a, (c, n * h * w), copy=False)
    except ValueError:
        return a.reshape(c, n, h * w)


def _im2col_into(cols: np.ndarray, x: np.ndarray, stride: tuple[int, int], pads: Pads) -> None:
    """Write the patches of x (n, C, H, W), zero-padded by ``pads``, into cols
    (C, kh, kw, n, Ho, Wo): one copy per kernel offset straight from x (no
    padded copy of x), then the entries that fall on the padding are zeroed.
    On a "same" grid each copy is a flat shift of whole planes (see
    _flat_planes); otherwise a strided copy of the overlap."""
    kernel, out_hw, (h, w) = cols.shape[1:3], cols.shape[4:], x.shape[2:]
    xc = x.transpose(1, 0, 2, 3)  # channel-major view
    flat_x = _flat_planes(xc) if _same_grid((h, w), out_hw, stride) else None
    for i, j, (oh, ow), (ih, iw) in _offset_overlaps((h, w), out_hw, kernel, stride, pads):
        rows = cols[:, i, j]
        if flat_x is not None:
            a, b = _shifted(flat_x.shape[-1], (i - pads[0][0]) * w + (j - pads[1][0]))
            np.reshape(rows, flat_x.shape, copy=False)[..., a] = flat_x[..., b]
        else:
            rows[:, :, oh, ow] = xc[:, :, ih, iw]
        _zero_outside(rows, oh, ow)


def _col2im_add(
    dx: np.ndarray, dcols: np.ndarray, batch: slice, stride: tuple[int, int], pads: Pads
) -> None:
    """Add patch gradients dcols (C, kh, kw, n, Ho, Wo) of samples ``batch``
    onto the input positions they came from in dx (C, N, H, W), dropping the
    padding's share: one add per kernel offset (no np.add.at), a flat shift of
    all the block's planes on a "same" grid (the padding's share zeroed in dcols
    first, see _flat_planes)."""
    kernel, out_hw, (h, w) = dcols.shape[1:3], dcols.shape[4:], dx.shape[2:]
    same = _same_grid((h, w), out_hw, stride)
    flat_dx = np.reshape(dx[:, batch], (dx.shape[0], -1), copy=False) if same else None
    for i, j, (oh, ow), (ih, iw) in _offset_overlaps((h, w), out_hw, kernel, stride, pads):
        part = dcols[:, i, j]
        if flat_dx is not None:
            _zero_outside(part, oh, ow)
            a, b = _shifted(flat_dx.shape[-1], (i - pads[0][0]) * w + (j - pads[1][0]))
            flat_dx[:, b] += part.reshape(flat_dx.shape)[:, a]
        else:
            dx[:, batch, ih, iw] += part[:, :, oh, ow]


_BLOCK = 1 << 18  # entries of a patch buffer (1 MiB in float32): it stays in cache


def _blocks(chunks: list[slice], per_sample: int) -> list[list[slice]]:
    """The chunks in runs of neighbours whose patches take at most _BLOCK
    entries (``per_sample`` each), one chunk at least."""
    blocks: list[list[slice]] = []
    size = 0
    for s in chunks:
        rows = (s.stop - s.start) * per_sample
        if blocks and size + rows <= _BLOCK:
            blocks[-1].append(s)
            size += rows
        else:
            blocks.append([s])
            size = rows
    return blocks


def _conv_blocks(n: int, patch_per_sample: int, c_out: int) -> list[list[slice]]:
    """A convolution's GEMM chunks (see _gemm_chunks) in blocks of neighbours
    whose patches fit _BLOCK: each block's patches are built at once."""
    return _blocks(_gemm_chunks(n, c_out * patch_per_sample), patch_per_sample)


_scratch_buffers = threading.local()


def _scratch(name: str, size: int, dtype: np.dtype) -> np.ndarray:
    """A 1-D work buffer of at least ``size`` entries, kept by this thread for the
    next call: it never leaves the function that asks for it."""
    key = (name, np.dtype(dtype))
    buffers: dict[Any, np.ndarray] = _scratch_buffers.__dict__
    if key not in buffers or buffers[key].size < size:
        buffers[key] = np.empty(size, dtype=dtype)
    return buffers[key][:size]


# Step buffers.  Inside a training step on a network known to fit, the large
# arrays that never leave the step (convolution and pool outputs, which its
# caches hold, and the input gradients between layers) come from the buffers
# that the previous step used and no longer references (JAX's buffer donation,
# with the reference count as the proof): no fresh pages for the system to
# fault in at every step (about a fifth of a CNN's step, measured on a busy VM).


class _StepBuffers(threading.local):
    """This thread's buffers: ``last`` from the previous step, by (shape, dtype),
    kept until the next step, or the end of train_epoch or fit; ``used`` handed
    out in the current step (None outside a step)."""

    def __init__(self) -> None:
        self.last: dict[tuple, list[np.ndarray]] = {}
        self.used: list[np.ndarray] | None = None


_step_buffers = _StepBuffers()


def _free_refs() -> int:
    """What ``sys.getrefcount`` says, in _new_array's own pattern, of an array
    that only a local name holds (2 up to Python 3.13; newer versions may
    borrow the name's reference and say less); 0 where counts prove nothing
    (no getrefcount, as on PyPy; no GIL): then no buffer is ever reused."""
    gil = getattr(sys, "_is_gil_enabled", None)
    if not hasattr(sys, "getrefcount") or (gil is not None and not gil()):
        return 0
    spare = [np.empty(1)]
    a = spare.pop()
    return sys.getrefcount(a)


_FREE_REFS = _free_refs()


def _new_array(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """``np.empty(shape, dtype)``; inside a step (see _recycling), a buffer of the
    previous step's that nothing references any more, if one fits."""
    buffers = _step_buffers
    if buffers.used is None:
        return np.empty(shape, dtype)
    spare = buffers.last.get((shape, dtype))
    a = None
    while spare and a is None:
        a = spare.pop()
        if sys.getrefcount(a) > _FREE_REFS:  # anything more still holds it
            a = None
    if a is None:
        a = np.empty(shape, dtype)
    buffers.used.append(a)
    return a


def _let_go_step_buffers() -> None:
    """Drop this thread's buffers of the last step (at the end of an epoch or a
    fit, so that memory does not stay taken after training)."""
    _step_buffers.last = {}


@contextlib.contextmanager
def _recycling() -> Iterator[None]:
    """A training step: _new_array hands out the previous step's buffers, and the
    ones this step takes are kept for the next (the others are let go)."""
    buffers = _step_buffers
    # nested: the outer step recycles; no _FREE_REFS: counts prove nothing, no reuse
    if buffers.used is not None or not _FREE_REFS:
        yield
        return
    buffers.used = []
    try:
        yield
    finally:
        used, buffers.used = buffers.used, None  # first: an interrupt here leaks nothing
        last: dict[tuple, list[np.ndarray]] = {}
        for a in used:
            last.setdefault((a.shape, a.dtype), []).append(a)
        buffers.last = last


def _zeros(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """``np.zeros(shape, dtype)`` through _new_array."""
    a = _new_array(shape, dtype)
    a.fill(0)
    return a


def _patches(conv: Any, x: np.ndarray, out_hw: tuple[int, ...], span: slice) -> np.ndarray:
    """The patches of samples ``span`` of x as a (C_in*kh*kw, n*Ho*Wo) matrix, in
    this thread's scratch buffer (good until its next call).

    The patches are not kept between forward and backward: backward builds
    them again from x (one more copy pass), block by block in a buffer that
    stays in cache.  Storing them would hold C_in*kh*kw values per output
    position for the whole batch (the largest arrays of a CNN's step).
    """
    n, k, p = span.stop - span.start, conv.w[0].size, out_hw[0] * out_hw[1]
    cols = _scratch("patches", k * n * p, x.dtype)
    cols = cols.reshape(x.shape[1], *conv.kernel_size, n, *out_hw)
    _im2col_into(cols, x[span], conv.stride, conv.padding)
    return cols.reshape(k, n * p)


def _local(s: slice, span: slice, p: int) -> slice:
    """Columns of chunk ``s`` within a block matrix of samples ``span`` (p per sample)."""
    return slice((s.start - span.start) * p, (s.stop - span.start) * p)


def _conv_forward(conv: Any, x: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """y = w @ patches + b as (C_out, N*Ho*Wo) for ``conv`` on x.

    The batch goes in _gemm_chunks, the chunks in blocks (_conv_blocks): block
    by block, their patches are built, then multiplied chunk by chunk.
    """
    n, f, p = x.shape[0], conv.out_channels, out_hw[0] * out_hw[1]
    w2, bias = conv.w.reshape(f, -1), conv.b[:, None]
    y = _new_array((f, n * p), x.dtype)
    for block in _conv_blocks(n, w2.shape[1] * p, f):
        span = _span(block)
        cols = _patches(conv, x, out_hw, span)
        for s in block:
            out = y[:, s.start * p : s.stop * p]
            np.matmul(w2, cols[:, _local(s, span, p)], out=out)
            out += bias
    return y


def _conv_backward(
    conv: Any, x: np.ndarray, out_hw: tuple[int, ...], dy: np.ndarray, *, with_dx: bool
) -> tuple:
    """(dx or None, dw, db) of ``conv``, with dY = dy as (C_out, N*Ho*Wo):
    dw = dY @ patches.T, db = sum dY, dx = col2im(w.T @ dY).

    Chunks and blocks as in the forward: each chunk's share of dw is added in
    chunk order; each block's patch gradients go onto its own samples of dx.
    """
    (n, c), f, p = x.shape[:2], conv.out_channels, out_hw[0] * out_hw[1]
    w2 = conv.w.reshape(f, -1)
    dy_mat = dy.transpose(1, 0, 2, 3).reshape(f, n * p)  # a view if dy is channel-major
    dx = _zeros((c, n, *x.shape[2:]), dy.dtype) if with_dx else None
    dw = np.zeros((w2.shape[1], f), dtype=dy.dtype)
    for block in _conv_blocks(n, w2.shape[1] * p, f):
        span = _span(block)
        cols = _patches(conv, x, out_hw, span)
        for s in block:
            dw += cols[:, _local(s, span, p)] @ dy_mat[:, s.start * p : s.stop * p].T
        if dx is not None:
            dc = _scratch("dcols", cols.size, dy.dtype).reshape(cols.shape)
            for s in block:
                np.matmul(w2.T, dy_mat[:, s.start * p : s.stop * p], out=dc[:, _local(s, span, p)])
            dc_6d = dc.reshape(c, *conv.kernel_size, -1, *out_hw)
            _col2im_add(dx, dc_6d, span, conv.stride, conv.padding)
    dx_out = None if dx is None else dx.transpose(1, 0, 2, 3)
    return dx_out, np.ascontiguousarray(dw.T).reshape(conv.w.shape), dy_mat.sum(axis=1)


def _conv_padding(padding: Padding, conv: Any) -> Pads:
    """Conv2D's ``padding`` converter: resolved for its kernel and stride."""
    return _resolve_padding(padding, conv.w.shape[2:], conv.stride)


def _frozen_kernel(w: Any) -> np.ndarray:
    w = _frozen(w, "w")
    if w.ndim != 4:
        raise ValueError(f"w must be 4-D (C_out, C_in, kh, kw), got shape {w.shape}")
    return w


@attrs.frozen(eq=False, repr=False)
class Conv2D(_ArrayRecord):
    """2-D convolution (cross-correlation, as in PyTorch) on NCHW images:
    ``y[n, o, p, q] = b[o] + sum_{c,i,j} w[o, c, i, j] * xp[n, c, p*sh + i, q*sw + j]``,
    ``xp`` = x zero-padded by ``padding``.

    x: (N, C_in, H, W) -> y: (N, C_out, Ho, Wo), Ho = (H + top + bottom - kh) // sh + 1;
    w: (C_out, C_in, kh, kw), b: (C_out,).  ``stride`` is an int or (sh, sw);
    ``padding`` is "valid", "same" (stride 1; an even kernel's extra row/column
    goes to the bottom/right, as in PyTorch), an int, (ph, pw), or
    ((top, bottom), (left, right)); it is stored resolved to the last form.
    Forward is im2col + GEMM, in batch chunks; y is a transposed view of a
    channel-major array.
    The cache is x: backward builds the patches again, block by block, which
    is cheaper than holding ``C_in*kh*kw`` values per output position.

    >>> conv = dlfs.Conv2D.init(0, c_in=1, c_out=4, kernel=3, padding="same")
    >>> conv
    Conv2D(1 -> 4, 3x3, padding="same", float32)
    >>> y, cache, _ = conv.forward(np.ones((2, 1, 8, 8), np.float32))
    >>> dx, (dw, db) = conv.backward(cache, np.ones_like(y))
    >>> y.shape, dx.shape, dw.shape, db.shape
    ((2, 4, 8, 8), (2, 1, 8, 8), (4, 1, 3, 3), (4,))
    >>> dlfs.Conv2D.init(0, 1, 4, (3, 3), stride=2).output_shape((1, 8, 8))  # (8 - 3) // 2 + 1
    (4, 3, 3)
    """

    _BUILDERS = ("dlfs.conv2d({sizes})", "dlfs.Conv2D.init(key, c_in, {sizes})")

    _PARAMS = ("w", "b")  # the fields params() returns, in order

    w: np.ndarray = attrs.field(converter=_frozen_kernel)
    b: np.ndarray = attrs.field(converter=_frozen_field)
    stride: tuple[int, int] = attrs.field(
        default=(1, 1), converter=lambda s: _int_pair("stride", s)
    )
    padding: Pads = attrs.field(  # "valid", "same", ... also: the converter resolves them
        default=((0, 0), (0, 0)), converter=attrs.Converter(_conv_padding, takes_self=True)
    )

    def __attrs_post_init__(self) -> None:
        _check_input("b", self.b, (self.w.shape[0],), self.w.dtype)

    @classmethod
    def init(
        cls,
        key: int | Key,
        c_in: int,
        c_out: int,
        kernel: int | tuple[int, int],
        *,
        stride: int | tuple[int, int] = 1,
        padding: Padding = "valid",
        init: Initializer = he_normal,
        bias_init: Initializer = zeros,
        dtype: FloatDType = np.float32,
    ) -> Conv2D:
        """Draw w (C_out, C_in, kh, kw) with ``init`` (He normal: fan_in = C_in kh kw)
        and b (C_out,) with ``bias_init`` from ``key``."""
        c_in, c_out = _check_int("c_in", c_in), _check_int("c_out", c_out)
        kh, kw = _int_pair("kernel", kernel)
        dtype = _check_dtype(dtype)
        rng = make_rng(key)
        w = _draw("init", init, rng, (c_out, c_in, kh, kw), dtype)
        b = _draw("bias_init", bias_init, rng, (c_out,), dtype)
        pads = _resolve_padding(padding, (kh, kw), _int_pair("stride", stride))
        return cls(w, b, stride=stride, padding=pads)  # the converter copies and freezes

    @property
    def in_channels(self) -> int:
        return self.w.shape[1]

    @property
    def out_channels(self) -> int:
        return self.w.shape[0]

    @property
    def kernel_size(self) -> tuple[int, int]:
        return (self.w.shape[2], self.w.shape[3])

    def params(self) -> Params:
        """(w, b)."""
        return (self.w, self.b)

    def with_params(self, params: Sequence[np.ndarray]) -> Conv2D:
        """A new Conv2D with ``params = (w, b)``, same stride and padding."""
        w, b = _check_new_params(self, params)
        return Conv2D(w, b, stride=self.stride, padding=self.padding)

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        """(C_in, H, W) -> (C_out, Ho, Wo)."""
        in_shape = tuple(in_shape)
        if len(in_shape) == 3 and in_shape[0] != self.in_channels:
            raise ValueError(
                f"Conv2D expects {self.in_channels} input channels, got input shape "
                f"{_shape_str((None, *in_shape))}"
            )
        ho, wo = _pool_out_hw("Conv2D", in_shape, self.kernel_size, self.stride, self.padding)
        return (self.out_channels, ho, wo)

    def forward(self, x: np.ndarray, ctx: Context = EVAL) -> tuple[np.ndarray, np.ndarray, Conv2D]:
        """y = w (C_out, C_in kh kw) @ patches + b; the cache is x (backward
        builds the patches again: cheaper than holding them)."""
        _check_images(x, self.w.dtype)
        _, ho, wo = self.output_shape(x.shape[1:])
        y = _conv_forward(self, x, (ho, wo))
        return y.reshape(self.out_channels, x.shape[0], ho, wo).transpose(1, 0, 2, 3), x, self

    def backward(self, cache: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, Params]:
        """dw = dY @ patches.T, db = sum dY, dx = col2im(w.T @ dY) with dY = dy as (C_out, N Ho Wo)."""
        _, ho, wo = self.output_shape(cache.shape[1:])
        _check_input("dy", dy, (cache.shape[0], self.out_channels, ho, wo), self.w.dtype)
        dx, dw, db = _conv_backward(self, cache, (ho, wo), dy, with_dx=True)
        return dx, (dw, db)

    def _param_grads(self, cache: np.ndarray, dy: np.ndarray) -> Params:
        """(dw, db) as in ``backward``, without dx: a network skips the input
        gradient of its first layer."""
        out_hw = self.output_shape(cache.shape[1:])[1:]
        _, dw, db = _conv_backward(self, cache, out_hw, dy, with_dx=False)
        return dw, db

    def __repr__(self) -> str:
        """Short enough for a summary row: stride only when not 1, padding by name
        ("same", or nothing for "valid") when it is one, else as the fewest numbers."""
        kh, kw = self.kernel_size
        parts = [f"{self.in_channels} -> {self.out_channels}", f"{kh}x{kw}"]
        if self.stride != (1, 1):
            parts.append(f"stride={self.stride[0] if len(set(self.stride)) == 1 else self.stride}")
        (top, bottom), (left, right) = self.padding
        if self.stride == (1, 1) and self.padding == _resolve_padding("same", (kh, kw), (1, 1)):
            parts.append('padding="same"' if self.padding != ((0, 0), (0, 0)) else "")
        elif top == bottom and left == right:
            parts.append(f"padding={top if top == left else (top, left)}" if top or left else "")
        else:
            parts.append(f"padding={self.padding}")
        return f"Conv2D({', '.join(p for p in [*parts, str(self.w.dtype)] if p)})"


def _pool_stride(stride: int | tuple[int, int] | None, pool: Any) -> tuple[int, int]:
    """A pool's ``stride`` converter: an int or a pair as a pair, None as the window size."""
    return pool.size if stride is None else _int_pair("stride", stride)


def _pool_stride_field() -> Any:
    """``stride`` of a pool: an int, a pair, or None for the window size."""
    return attrs.field(default=None, converter=attrs.Converter(_pool_stride, takes_self=True))


def _pool_output_shape(pool: Any, in_shape: tuple[int, ...]) -> tuple[int, ...]:
    """(C, H, W) -> (C, Ho, Wo) for a pool's size and stride (incomplete windows dropped)."""
    ho, wo = _pool_out_hw(type(pool).__name__, tuple(in_shape), pool.size, pool.stride)
    return (in_shape[0], ho, wo)


def _pool_windows(pool: Any, x: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(offset index, strided view) for every window offset of a pool, row-major."""
    out_hw = _pool_output_shape(pool, x.shape[1:])[1:]
    for k, (i, j) in enumerate(_offsets(pool.size)):
        yield k, _window(x, i, j, pool.stride, out_hw)


def _pool_check_dy(pool: Any, x_shape: tuple[int, ...], dtype: np.dtype, dy: Any) -> None:
    """dy must have the pool's output shape and the input's dtype."""
    out_shape = (x_shape[0], *_pool_output_shape(pool, x_shape[1:]))
    _check_input("dy", dy, out_shape, dtype)


def _arg_dtype(pool: Any) -> type:
    """The dtype of window-offset indices: uint8 unless a window has more than 256 entries."""
    return np.uint8 if pool.size[0] * pool.size[1] <= 256 else np.intp


def _samples_in(n: int, per_sample: int, most: int) -> list[slice]:
    """Slices of ``n`` samples of at most ``most`` entries (``per_sample``
    each), one sample at least."""
    rows = max(1, most // max(per_sample, 1))
    return [slice(i, min(i + rows, n)) for i in range(0, n, rows)]


def _tiled_windows(pool: Any, x: np.ndarray) -> np.ndarray:
    """The windows of a pool whose stride is its size, deinterleaved from x
    (N, C, H, W) into this thread's scratch buffer as (kh*kw, N, C, Ho, Wo): a
    contiguous plane per window offset, row-major (numpy's loops run 1.5-2x
    faster on them than on the strided views; the copy costs less)."""
    (kh, kw), (n, c) = pool.size, x.shape[:2]
    ho, wo = _pool_output_shape(pool, x.shape[1:])[1:]
    planes = _scratch("windows", kh * kw * n * c * ho * wo, x.dtype)
    planes = planes.reshape(kh, kw, n, c, ho, wo)
    tiles = x[:, :, : ho * kh, : wo * kw].reshape(n, c, ho, kh, wo, kw)
    np.copyto(planes, tiles.transpose(3, 5, 0, 1, 2, 4))
    return planes.reshape(kh * kw, n, c, ho, wo)


def _max_into(
    windows: list[np.ndarray] | np.ndarray, y: np.ndarray, arg: np.ndarray | None
) -> None:
    """y = the elementwise max of the windows' views; with ``arg``, also the
    offset of each window's first maximum: a later offset k takes over only
    where it is strictly greater, and as k only grows, max(arg, k * above)
    writes it."""
    np.copyto(y, windows[0])
    if arg is not None:
        arg.fill(0)
        above, step = np.empty_like(y, dtype=bool), np.empty_like(arg)
    for k, view in enumerate(windows[1:], 1):
        if arg is not None:
            np.greater(view, y, out=above)
            np.multiply(above, arg.dtype.type(k), out=step)
            np.maximum(arg, step, out=arg)
        np.maximum(y, view, out=y)


def _first_argmax(pool: Any, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The offset of each window's first maximum, found from x and y (for a
    cache from evaluation mode, where the forward does not track it).

    Offsets are scanned from the last to the first and each match overwrites,
    so the first one wins; ``arg + (k - arg) * match`` is that overwrite in
    unsigned arithmetic (wrapping is harmless: it lands on k or on arg).
    """
    dtype = _arg_dtype(pool)
    arg = np.zeros_like(y, dtype=dtype)  # y's memory layout, for fast loops
    match = np.empty_like(y, dtype=bool)
    step = np.empty_like(arg)
    for k, view in reversed(list(_pool_windows(pool, x))):
        np.equal(view, y, out=match)
        np.subtract(dtype(k), arg, out=step)
        step *= match
        arg += step
    return arg


def _planes(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """(N, C, H, W) arrays as (C, N, H, W) views when the first is channel-major (a
    convolution's output): the same planes, with the axis that chunks cut along
    outermost in memory (cutting a channel-major batch by samples halves the
    speed of numpy's loops)."""
    if abs(arrays[0].strides[1]) > abs(arrays[0].strides[0]):
        return tuple(a.transpose(1, 0, 2, 3) for a in arrays)
    return arrays


def _new_like_planes(
    xp: np.ndarray, x: np.ndarray, hw: tuple[int, ...], dtype: Any
) -> tuple[np.ndarray, np.ndarray]:
    """(a, a in x's axis order): a new (xp.shape[0], xp.shape[1], *hw) array
    (see _new_array), for ``xp = _planes(x, ...)[0]``."""
    a = _new_array((*xp.shape[:2], *hw), np.dtype(dtype))
    return a, (a if xp is x else a.transpose(1, 0, 2, 3))


@attrs.frozen(eq=False, repr=False)
class MaxPool2D(_NoParams):
    """Max pooling: ``y[n, c, p, q] = max_{i,j} x[n, c, p*sh + i, q*sw + j]``.

    x: (N, C, H, W) -> y: (N, C, Ho, Wo), Ho = (H - size_h) // stride_h + 1
    (incomplete windows are dropped); ``stride`` defaults to ``size``.
    The gradient of each window goes to ONE input: its first maximum in
    row-major window order when several entries tie (PyTorch's choice).

    >>> x = np.arange(16.0).reshape(1, 1, 4, 4)
    >>> y, cache, _ = dlfs.MaxPool2D(2).forward(x)
    >>> y.tolist()
    [[[[5.0, 7.0], [13.0, 15.0]]]]
    >>> dlfs.MaxPool2D(2).backward(cache, np.ones_like(y))[0][0, 0].tolist()
    [[0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0]]
    """

    size: tuple[int, int] = attrs.field(converter=lambda s: _int_pair("size", s))
    stride: tuple[int, int] = _pool_stride_field()

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        """(C, H, W) -> (C, Ho, Wo), Ho = (H - size_h) // stride_h + 1."""
        return _pool_output_shape(self, in_shape)

    def forward(self, x: np.ndarray, ctx: Context = EVAL) -> tuple[np.ndarray, tuple, MaxPool2D]:
        """The cache is (x, y, arg): in training, arg holds the offset of each
        window's first maximum, noted while taking the max; in evaluation mode
        it is None and backward finds it from x and y."""
        _check_images(x)
        (xp,), out_hw = _planes(x), self.output_shape(x.shape[1:])[1:]
        yp, y = _new_like_planes(xp, x, out_hw, x.dtype)  # x's memory layout: fast loops
        arg = argp = None
        if ctx.train:
            argp, arg = _new_like_planes(xp, x, out_hw, _arg_dtype(self))
        if self.stride != self.size:
            _max_into([view for _, view in _pool_windows(self, xp)], yp, argp)
            return y, (x, y, arg), self
        # windows side by side: deinterleaved, in blocks of samples
        per_sample = math.prod(yp.shape[1:]) * len(_offsets(self.size))
        for b in _samples_in(len(xp), per_sample, _BLOCK):
            _max_into(_tiled_windows(self, xp[b]), yp[b], None if argp is None else argp[b])
        return y, (x, y, arg), self

    def backward(self, cache: tuple, dy: np.ndarray) -> tuple[np.ndarray, Params]:
        """dx[first argmax of each window] = dy[window]; zero elsewhere."""
        x, y, arg = cache
        _pool_check_dy(self, x.shape, x.dtype, dy)
        tiled = self.stride == self.size and all(
            d % s == 0 for d, s in zip(x.shape[2:], self.size)
        )  # every input in exactly one window: each dx entry is written once
        xp, yp, dyp, *argp = _planes(x, y, dy, *(() if arg is None else (arg,)))
        dxp, dx = _new_like_planes(xp, x, x.shape[2:], dy.dtype)
        if not tiled:
            dxp.fill(0)

        first = _first_argmax(self, xp, yp) if arg is None else argp[0]
        hit = _scratch("hit", first.size, np.dtype(bool)).reshape(first.shape)
        g = _scratch("g", first.size, dy.dtype).reshape(first.shape)  # dy in y's layout
        g[...] = dyp
        for k, dview in _pool_windows(self, dxp):
            np.equal(first, k, out=hit)
            if tiled:
                np.multiply(g, hit, out=dview)
            else:
                dview += g * hit
        return dx, ()


@attrs.frozen(eq=False, repr=False)
class AvgPool2D(_NoParams):
    """Average pooling: ``y[n, c, p, q] = mean_{i,j} x[n, c, p*sh + i, q*sw + j]``.

    x: (N, C, H, W) -> y: (N, C, Ho, Wo), Ho = (H - size_h) // stride_h + 1
    (incomplete windows are dropped); ``stride`` defaults to ``size``.

    >>> x = np.arange(16.0).reshape(1, 1, 4, 4)
    >>> dlfs.AvgPool2D(2).forward(x)[0].tolist()
    [[[[2.5, 4.5], [10.5, 12.5]]]]
    >>> dlfs.AvgPool2D(3, stride=1).output_shape((1, 4, 4))
    (1, 2, 2)
    """

    size: tuple[int, int] = attrs.field(converter=lambda s: _int_pair("size", s))
    stride: tuple[int, int] = _pool_stride_field()

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        """(C, H, W) -> (C, Ho, Wo), Ho = (H - size_h) // stride_h + 1."""
        return _pool_output_shape(self, in_shape)

    def forward(self, x: np.ndarray, ctx: Context = EVAL) -> tuple[np.ndarray, tuple, AvgPool2D]:
        """The cache is (x.shape, x.dtype)."""
        _check_images(x)
        views = (view for _, view in _pool_windows(self, x))
        total = next(views).copy(order="K")  # a pool has one window offset at least
        for view in views:
            total += view
        total *= x.dtype.type(1.0 / (self.size[0] * self.size[1]))
        return total, (x.shape, x.dtype), self

    def backward(self, cache: tuple, dy: np.ndarray) -> tuple[np.ndarray, Params]:
        """dx[window] += dy[window] / (size_h size_w)."""
        x_shape, dtype = cache
        _pool_check_dy(self, x_shape, dtype, dy)
        share = dy * dy.dtype.type(1.0 / (self.size[0] * self.size[1]))
        dx = np.zeros(x_shape, dtype=dy.dtype)
        for _, view in _pool_windows(self, dx):
            view += share
        return dx, ()


# ------------------------------------ transformers: norms, attention, residual blocks


def _present(layer: Any) -> tuple[str, ...]:
    """The names in ``layer._PARAMS`` whose arrays the layer has (not None), in order:
    a layer with optional arrays (no bias, no scale) has only those as params()."""
    return tuple(name for name in layer._PARAMS if getattr(layer, name) is not None)


def _present_params(layer: Any) -> Params:
    return tuple(getattr(layer, name) for name in _present(layer))


def _with_present(layer: Any, params: Sequence[np.ndarray]) -> Any:
    """``with_params`` of a layer with optional arrays: the present ones replaced,
    through the constructor's converters (copied, read-only)."""
    new = _check_new_params(layer, params)
    return attrs.evolve(layer, **dict(zip(_present(layer), new)))


_optional_field = attrs.Converter(
    lambda a, field: None if a is None else _frozen(a, field.name), takes_field=True
)


def _layer_norm_scale(gamma: Any) -> np.ndarray | None:
    """LayerNorm's ``gamma``; an int there is the Keras habit ``LayerNorm(D)``."""
    if isinstance(gamma, (int, np.integer)) and not isinstance(gamma, bool):
        raise TypeError(
            f"LayerNorm(gamma, beta) must be given arrays (or none), got gamma={gamma}: for "
            f"a LayerNorm of {gamma} features write dlfs.layer_norm() inside dlfs.network(...) "
            f"(it infers the size), or dlfs.LayerNorm.init({gamma})"
        )
    return None if gamma is None else _frozen(gamma, "gamma")


def _sub_chain(layers: Any) -> tuple[Any, ...]:
    """A container's ``layers``: a sequence of layers, as a tuple."""
    if not isinstance(layers, (list, tuple)):
        raise TypeError(
            f"layers must be a list of layers, got {type(layers).__name__}; inside "
            "dlfs.network(...) build the block from specs: dlfs.residual([...]) or "
            "dlfs.tied_embedding(n_vocab, dim, [...])"
        )
    return tuple(layers)


def _check_vector(name: str, a: np.ndarray | None, n: int, dtype: np.dtype) -> None:
    if a is not None:
        _check_input(name, a, (n,), dtype)


def _matrix(a: np.ndarray) -> np.ndarray:
    """(..., D) as (M, D) rows (a view for contiguous input; M or D may be 0)."""
    return a.reshape(math.prod(a.shape[:-1]), a.shape[-1])


def _row_sums(a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """The sum over the last axis of a (of a * b if b is given): (..., D) -> (..., 1).
    One GEMV (or einsum for a * b, no product array): numpy's reduction along
    rows of 64-512 entries takes about 4x as long (28 against 6 us on (768, 128))."""
    if b is None:
        sums = np.dot(_matrix(a), np.ones(a.shape[-1], a.dtype))
    else:
        sums = np.einsum("ij,ij->i", _matrix(a), _matrix(b))
    return sums.reshape(*a.shape[:-1], 1)


@attrs.frozen(eq=False, repr=False)
class LayerNorm(_ArrayRecord):
    """Layer normalization over the last axis (PyTorch's ``nn.LayerNorm(D)``):
    y = (x - mean) / sqrt(var + eps) * gamma + beta, with the mean and the
    biased variance of each row of D features.

    x: (N, ..., D) -> y: same shape; gamma, beta: (D,).  Either may be None:
    no scale (``elementwise_affine=False``), no bias (``bias=False``, as in
    GPT-2 without biases); params() holds the present ones, (gamma, beta).
    ``LayerNorm.init(D)`` starts at gamma = 1, beta = 0; in ``network``,
    ``layer_norm()`` infers D.

    >>> ln = dlfs.LayerNorm.init(3, bias=False, dtype=np.float64)
    >>> ln
    LayerNorm(3, bias=False, eps=1e-05, float64)
    >>> y, _, _ = ln.forward(np.array([[1.0, 2.0, 6.0]]))
    >>> np.round(y, 4).tolist()  # mean 3, variance 14/3
    [[-0.9258, -0.4629, 1.3887]]
    """

    _PARAMS = ("gamma", "beta")  # the fields params() returns (those not None), in order

    gamma: np.ndarray | None = attrs.field(default=None, converter=_layer_norm_scale)
    beta: np.ndarray | None = attrs.field(default=None, converter=_optional_field)
    eps: float = attrs.field(
        default=1e-5, converter=lambda v: _check_number("eps", v, low=0.0, low_open=True)
    )

    def __attrs_post_init__(self) -> None:
        first = self.gamma if self.gamma is not None else self.beta
        if first is not None:
            if first.ndim != 1:
                raise ValueError(f"gamma and beta must be 1-D (D,), got shape {first.shape}")
            _check_vector("beta", self.beta, first.shape[0], first.dtype)

    @classmethod
    def init(
        cls,
        dim: int,
        *,
        scale: bool = True,
        bias: bool = True,
        eps: float = 1e-5,
        dtype: FloatDType = np.float32,
    ) -> LayerNorm:
        """gamma = 1 (if ``scale``) and beta = 0 (if ``bias``), each (dim,)."""
        dim, dtype = _check_int("dim", dim), _check_dtype(dtype)
        _check_bool("scale", scale)
        _check_bool("bias", bias)
        gamma = np.ones(dim, dtype) if scale else None
        return cls(gamma, np.zeros(dim, dtype) if bias else None, eps)

    @property
    def dim(self) -> int | None:
        """D, or None for a LayerNorm without arrays (it takes any D)."""
        first = self.gamma if self.gamma is not None else self.beta
        return None if first is None else first.shape[0]

    def params(self) -> Params:
        """(gamma, beta), without the absent ones."""
        return _present_params(self)

    def with_params(self, params: Sequence[np.ndarray]) -> LayerNorm:
        """A new LayerNorm with the present arrays replaced (shapes and dtypes checked)."""
        return _with_present(self, params)

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        """(..., D) -> (..., D)."""
        in_shape = tuple(in_shape)
        if not in_shape or (self.dim is not None and in_shape[-1] != self.dim):
            raise ValueError(
                f"LayerNorm({self.dim}) expects inputs (N, ..., {self.dim}), the previous "
                f"layer gives {_shape_str((None, *in_shape))}"
            )
        return in_shape

    def _check_x(self, x: Any) -> None:
        dtype = None if self.dim is None else self.params()[0].dtype
        fine = type(x) is np.ndarray and x.ndim >= 2 and x.dtype == dtype
        if not (fine and x.shape[-1] == self.dim):
            _check_float("x", x, dtype)
            if x.ndim < 2 or (self.dim is not None and x.shape[-1] != self.dim):
                want = "D" if self.dim is None else self.dim
                raise ValueError(f"x must have shape (N, ..., {want}), got {x.shape}")
            _check_nonempty("x", x)  # no features to normalize over, or no rows

    def forward(self, x: np.ndarray, ctx: Context = EVAL) -> tuple[np.ndarray, tuple, LayerNorm]:
        """The cache is (x_hat, 1 / sqrt(var + eps)), x_hat the normalized x."""
        self._check_x(x)
        d = x.shape[-1]
        xc = x - _row_sums(x) / d
        rstd = _row_sums(xc, xc)
        rstd /= d
        rstd += self.eps
        np.sqrt(rstd, out=rstd)
        np.divide(1, rstd, out=rstd)
        xc *= rstd  # x_hat
        y = xc * self.gamma if self.gamma is not None else xc.copy()
        if self.beta is not None:
            y += self.beta
        return y, (xc, rstd), self

    def backward(self, cache: tuple, dy: np.ndarray) -> tuple[np.ndarray, Params]:
        """g = dy * gamma; dx = (g - mean(g) - x_hat mean(g x_hat)) / sqrt(var + eps),
        means over the last axis; dgamma = sum(dy x_hat), dbeta = sum(dy) over all rows."""
        x_hat, rstd = cache
        _check_input("dy", dy, x_hat.shape, x_hat.dtype)
        d = x_hat.shape[-1]
        grads = []
        if self.gamma is not None:
            grads.append(np.add.reduce(_matrix(dy * x_hat), axis=0))
        if self.beta is not None:
            grads.append(np.add.reduce(_matrix(dy), axis=0))
        g = dy * self.gamma if self.gamma is not None else dy.copy()
        proj = _row_sums(g, x_hat)
        proj /= d
        g -= _row_sums(g) / d
        g -= x_hat * proj
        g *= rstd
        return g, tuple(grads)

    def __repr__(self) -> str:
        off = [
            f"{name}=False" for name, a in (("scale", self.gamma), ("bias", self.beta)) if a is None
        ]
        dim = [str(self.dim)] if self.dim is not None else []
        dtype = [str(self.params()[0].dtype)] if self.params() else []
        return f"LayerNorm({', '.join([*dim, *off, f'eps={self.eps}', *dtype])})"


def _heads(a: np.ndarray, n_heads: int) -> np.ndarray:
    """(N, T, D) -> (N, H, T, D/H): a view, head h = features h*D/H ... (h+1)*D/H - 1."""
    n, t, d = a.shape
    return a.reshape(n, t, n_heads, d // n_heads).transpose(0, 2, 1, 3)


def _causal_mask(t: int, dtype: np.dtype) -> np.ndarray:
    """(T, T): 0 on and below the diagonal, -inf above (a later position is hidden)."""
    return np.triu(np.full((t, t), -np.inf, dtype), k=1)


def _softmax_last(s: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in place on ``s`` (its rows' max subtracted
    first; an entry at -inf becomes exactly 0)."""
    s -= np.maximum.reduce(s, axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= _row_sums(s)
    return s


@attrs.frozen(eq=False, repr=False)
class SelfAttention(_ArrayRecord):
    """Multi-head self-attention (nanoGPT's ``CausalSelfAttention``; PyTorch's
    ``scaled_dot_product_attention``): qkv = x w_qkv (+ b_qkv), split into q, k, v
    in that order, each into H heads of D/H features (head h = features
    h D/H ... (h+1) D/H - 1);  A = softmax(q k^T / sqrt(D/H)) per head, with
    -inf above the diagonal when ``causal`` (position t sees positions <= t);
    dropout (the probability of *dropping*) on A in training; O = A v, heads
    concatenated in order; y = O w_o (+ b_o).

    x: (N, T, D) -> y: (N, T, D); w_qkv: (D, 3D), b_qkv: (3D,), w_o: (D, D),
    b_o: (D,); the biases may be None (nanoGPT's ``bias=False``).  params():
    (w_qkv, b_qkv, w_o, b_o) without the absent biases.

    PyTorch's weights: nanoGPT's ``c_attn.weight`` is w_qkv.T and ``c_proj.weight``
    is w_o.T; ``nn.MultiheadAttention(D, H, batch_first=True)`` has
    ``in_proj_weight`` = w_qkv.T (3D, D), ``in_proj_bias`` = b_qkv,
    ``out_proj.weight`` = w_o.T, ``out_proj.bias`` = b_o, and its causal
    ``attn_mask`` is ``torch.triu(torch.ones(T, T, dtype=torch.bool), 1)``.

    >>> att = dlfs.SelfAttention.init(0, dim=8, n_heads=2, bias=False)
    >>> att
    SelfAttention(8, n_heads=2, causal=True, bias=False, float32)
    >>> y, cache, _ = att.forward(np.ones((3, 5, 8), np.float32))
    >>> y.shape
    (3, 5, 8)
    """

    _PARAMS = ("w_qkv", "b_qkv", "w_o", "b_o")  # params(): those not None, in order
    _BUILDERS = ("dlfs.self_attention(n_heads)", "dlfs.SelfAttention.init(key, dim, n_heads)")

    w_qkv: np.ndarray = attrs.field(converter=_frozen_field)
    w_o: np.ndarray = attrs.field(converter=_frozen_field)
    b_qkv: np.ndarray | None = attrs.field(default=None, converter=_optional_field)
    b_o: np.ndarray | None = attrs.field(default=None, converter=_optional_field)
    n_heads: int = attrs.field(default=1, converter=lambda n: _check_int("n_heads", n))
    causal: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))
    dropout: float = attrs.field(
        default=0.0,
        converter=lambda p: _check_number("dropout", p, low=0.0, high=1.0, high_open=True),
    )

    def __attrs_post_init__(self) -> None:
        if self.w_o.ndim != 2:
            raise ValueError(f"w_o must be 2-D (D, D), got shape {self.w_o.shape}")
        d, dtype = self.w_o.shape[0], self.w_o.dtype
        _check_input("w_o", self.w_o, (d, d), dtype)
        _check_input("w_qkv", self.w_qkv, (d, 3 * d), dtype)
        _check_vector("b_qkv", self.b_qkv, 3 * d, dtype)
        _check_vector("b_o", self.b_o, d, dtype)
        if d % self.n_heads:
            raise ValueError(
                f"the model width D = {d} must be divisible by n_heads, got n_heads={self.n_heads}"
            )

    @classmethod
    def init(
        cls,
        key: int | Key,
        dim: int,
        n_heads: int,
        *,
        causal: bool = True,
        bias: bool = True,
        dropout: float = 0.0,
        init: Initializer = glorot_normal,
        out_init: Initializer | None = None,
        dtype: FloatDType = np.float32,
    ) -> SelfAttention:
        """Draw w_qkv (dim, 3 dim) with ``init`` and w_o (dim, dim) with ``out_init``
        (default: ``init``) from ``key``; biases zero if ``bias``."""
        dim, n_heads, dtype = (
            _check_int("dim", dim),
            _check_int("n_heads", n_heads),
            _check_dtype(dtype),
        )
        _check_bool("bias", bias)
        if dim % n_heads:
            raise ValueError(f"dim must be divisible by n_heads, got dim={dim}, n_heads={n_heads}")
        rng = make_rng(key)
        w_qkv = _draw("init", init, rng, (dim, 3 * dim), dtype)
        w_o = _draw("out_init", init if out_init is None else out_init, rng, (dim, dim), dtype)
        b_qkv, b_o = (np.zeros(3 * dim, dtype), np.zeros(dim, dtype)) if bias else (None, None)
        return cls(w_qkv, w_o, b_qkv, b_o, n_heads, causal, dropout)

    @property
    def dim(self) -> int:
        return self.w_o.shape[0]

    def params(self) -> Params:
        """(w_qkv, b_qkv, w_o, b_o), without absent biases."""
        return _present_params(self)

    def with_params(self, params: Sequence[np.ndarray]) -> SelfAttention:
        """A new SelfAttention with ``params`` in place (shapes and dtypes checked)."""
        return _with_present(self, params)

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        """(T, D) -> (T, D)."""
        in_shape = tuple(in_shape)
        if len(in_shape) != 2 or in_shape[1] != self.dim:
            raise ValueError(
                f"SelfAttention expects sequences (N, T, {self.dim}), the previous layer "
                f"gives {_shape_str((None, *in_shape))}"
            )
        return in_shape

    def forward(
        self, x: np.ndarray, ctx: Context = EVAL
    ) -> tuple[np.ndarray, tuple, SelfAttention]:
        """The cache is (x, q scaled by 1/sqrt(D/H), k, v, A, dropout mask, O)."""
        d, dtype = self.dim, self.w_o.dtype
        if not (type(x) is np.ndarray and x.ndim == 3 and x.shape[2] == d and x.dtype == dtype):
            _check_input("x", x, (None, "T", d), dtype)
        n, t, _ = x.shape
        qkv = np.dot(_matrix(x), self.w_qkv)
        if self.b_qkv is not None:
            qkv += self.b_qkv
        qkv = qkv.reshape(n, t, 3 * d)
        q = _heads(qkv[:, :, :d], self.n_heads) * dtype.type(1 / math.sqrt(d // self.n_heads))
        k, v = _heads(qkv[:, :, d : 2 * d], self.n_heads), _heads(qkv[:, :, 2 * d :], self.n_heads)
        a = np.matmul(q, k.transpose(0, 1, 3, 2))  # (N, H, T, T) scores
        if self.causal:
            a += _causal_mask(t, dtype)
        _softmax_last(a)
        a_kept, mask, _ = Dropout(self.dropout).forward(a, ctx) if self.dropout else (a, None, 0)
        o = np.matmul(a_kept, v).transpose(0, 2, 1, 3).reshape(n * t, d)  # heads side by side
        y = np.dot(o, self.w_o)
        if self.b_o is not None:
            y += self.b_o
        return y.reshape(n, t, d), (x, q, k, v, a, mask, o), self

    def backward(self, cache: tuple, dy: np.ndarray) -> tuple[np.ndarray, Params]:
        """Back through y = O w_o, O = A v, A = softmax(S), S = q k^T / sqrt(D/H):
        dS = A (dA - sum_j dA A) per row; dq = dS k, dk = dS^T q (both scaled),
        dv = A^T dO; dx = dqkv w_qkv^T, dw_qkv = x^T dqkv, dw_o = O^T dy."""
        x, q, k, v, a, mask, o = cache
        n, t, d = x.shape
        _check_input("dy", dy, x.shape, x.dtype)
        dy_rows = _matrix(dy)
        do = _heads(np.dot(dy_rows, self.w_o.T).reshape(n, t, d), self.n_heads)
        a_kept = a if mask is None else a * mask
        dqkv = np.empty((n, t, 3 * d), x.dtype)  # dq, dk, dv written in place, head by head
        dq, dk, dv = (_heads(dqkv[:, :, i * d : (i + 1) * d], self.n_heads) for i in range(3))
        np.matmul(a_kept.transpose(0, 1, 3, 2), do, out=dv)
        da = np.matmul(do, v.transpose(0, 1, 3, 2))
        if mask is not None:
            da *= mask
        da -= _row_sums(da, a)
        da *= a  # dS; entries hidden by the mask have A = 0, so no gradient
        np.matmul(da, k, out=dq)
        dq *= x.dtype.type(1 / math.sqrt(d // self.n_heads))
        np.matmul(da.transpose(0, 1, 3, 2), q, out=dk)
        dqkv_rows = _matrix(dqkv)
        grads = [np.dot(_matrix(x).T, dqkv_rows)]
        if self.b_qkv is not None:
            grads.append(np.add.reduce(dqkv_rows, axis=0))
        grads.append(np.dot(o.T, dy_rows))
        if self.b_o is not None:
            grads.append(np.add.reduce(dy_rows, axis=0))
        return np.dot(dqkv_rows, self.w_qkv.T).reshape(x.shape), tuple(grads)

    def __repr__(self) -> str:
        parts = [str(self.dim), f"n_heads={self.n_heads}", f"causal={self.causal}"]
        if self.b_o is None:
            parts.append("bias=False")
        if self.dropout:
            parts.append(f"dropout={self.dropout}")
        return f"SelfAttention({', '.join([*parts, str(self.w_o.dtype)])})"


@attrs.frozen(eq=False, repr=False)
class PositionalEmbedding(_Table):
    """Learned positions (GPT-2's ``wpe``), added to a sequence: y[n, t] = x[n, t] + w[t].

    x: (N, T, D) with T <= max_len -> y: (N, T, D); w: (max_len, D).  Shorter
    sequences use the first T rows (a prompt shorter than the context).

    >>> pos = dlfs.PositionalEmbedding.init(0, max_len=8, dim=4)
    >>> y, _, _ = pos.forward(np.zeros((2, 5, 4), np.float32))
    >>> y.shape, bool((y[1] == pos.w[:5]).all())
    ((2, 5, 4), True)
    """

    _ROWS = "max_len"
    _BUILDERS = (
        "dlfs.positional_embedding({sizes})",
        "dlfs.PositionalEmbedding.init(key, {sizes}, dim)",
    )

    @classmethod
    def init(
        cls,
        key: int | Key,
        max_len: int,
        dim: int,
        *,
        init: Initializer = normal,
        dtype: FloatDType = np.float32,
    ) -> PositionalEmbedding:
        """Draw w (max_len, dim) with ``init`` (N(0, 1), as ``nn.Embedding``) from ``key``."""
        return cls._drawn(key, max_len, dim, init, dtype)

    @property
    def max_len(self) -> int:
        return self.w.shape[0]

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        """(T, D) -> (T, D), T <= max_len."""
        in_shape = tuple(in_shape)
        if len(in_shape) != 2 or in_shape[1] != self.w.shape[1] or in_shape[0] > self.max_len:
            raise ValueError(
                f"PositionalEmbedding expects sequences (N, T, {self.w.shape[1]}) with T <= "
                f"{self.max_len}, the previous layer gives {_shape_str((None, *in_shape))}"
            )
        return in_shape

    def _check_x(self, x: Any) -> None:
        _check_input("x", x, (None, "T", self.w.shape[1]), self.w.dtype)
        if x.shape[1] > self.max_len:
            raise ValueError(
                f"x has {x.shape[1]} positions, more than the {self.max_len} this "
                f"PositionalEmbedding was built for (max_len, the context length): crop "
                f"the sequence to its last {self.max_len} positions, x[:, -{self.max_len}:]"
            )

    def forward(
        self, x: np.ndarray, ctx: Context = EVAL
    ) -> tuple[np.ndarray, int, PositionalEmbedding]:
        """The cache is T."""
        self._check_x(x)
        return x + self.w[: x.shape[1]], x.shape[1], self

    def backward(self, cache: int, dy: np.ndarray) -> tuple[np.ndarray, Params]:
        """dx = dy (the same array); dw[t] = sum_n dy[n, t] for t < T, 0 beyond."""
        _check_input("dy", dy, (None, cache, self.w.shape[1]), self.w.dtype)
        dw = np.zeros_like(self.w)
        dw[:cache] = np.add.reduce(dy, axis=0)
        return dy, (dw,)

    def __repr__(self) -> str:
        return f"PositionalEmbedding({self.max_len} x {self.w.shape[1]}, {self.w.dtype})"


# Layers that hold a sub-chain of layers (Residual, TiedEmbedding) run it with
# these: each sub-layer gets its own sub-key, as a network's layers do, and its
# params are the sub-layers' params, flattened in order.


def _check_sub_layers(name: str, layers: tuple[Any, ...]) -> None:
    for i, layer in enumerate(layers):
        if not _is_layer(layer):
            raise TypeError(
                f"{name}[{i}] must be a layer (params/with_params/forward/backward/"
                f"output_shape), got {type(layer).__name__}" + _not_called(layer)
            )
    dtypes = {p.dtype for layer in layers for p in layer.params()}
    if len(dtypes) > 1:
        raise TypeError(f"all parameters must share one dtype, got {sorted(map(str, dtypes))}")


def _chain_forward(
    layers: tuple[Any, ...], x: Any, ctx: Context
) -> tuple[Any, tuple[Any, ...], tuple[Any, ...]]:
    """(output, caches, layers with their new state) of a sub-chain."""
    caches, new = [], []
    for j, layer in enumerate(layers):
        sub = ctx if ctx.key is None else _sub_context(ctx.train, ctx.key + (j,))
        x, cache, layer = layer.forward(x, sub)
        caches.append(cache)
        new.append(layer)
    same = all(a is b for a, b in zip(new, layers))
    return x, tuple(caches), layers if same else tuple(new)


def _chain_backward(
    layers: tuple[Any, ...], caches: tuple[Any, ...], dy: np.ndarray
) -> tuple[Any, Params]:
    """(dx, the sub-layers' grads flattened in params() order) of a sub-chain."""
    grads = []
    for layer, cache in zip(reversed(layers), reversed(caches)):
        dy, g = layer.backward(cache, dy)
        grads.append(g)
    return dy, tuple(g for layer_grads in reversed(grads) for g in layer_grads)


def _chain_params(layers: tuple[Any, ...]) -> Params:
    return tuple(p for layer in layers for p in layer.params())


def _per_layer(layers: tuple[Any, ...], params: Sequence[np.ndarray]) -> list[Params]:
    """``params``, flattened as ``_chain_params`` gives them, cut back into one tuple per layer."""
    cut, start = [], 0
    for layer in layers:
        n = len(layer.params())
        cut.append(tuple(params[start : start + n]))
        start += n
    return cut


def _chain_with_params(layers: tuple[Any, ...], params: Sequence[np.ndarray]) -> tuple[Any, ...]:
    """The sub-layers with ``params`` (flattened, as ``_chain_params`` gives them) in place."""
    return tuple(layer.with_params(ps) for layer, ps in zip(layers, _per_layer(layers, params)))


def _chain_renew(layers: tuple[Any, ...], params: Params) -> tuple[Any, ...]:
    """``_chain_with_params`` for arrays known to fit (see Network._renew)."""
    return tuple(map(_renew_layer, layers, _per_layer(layers, params)))


def _chain_repr(layers: tuple[Any, ...]) -> str:
    return ", ".join(type(layer).__name__ for layer in layers)


@attrs.frozen(eq=False, repr=False)
class Residual(_ArrayRecord):
    """A skip connection around a sub-chain f of layers: y = x + f(x) (ResNet;
    a pre-LN Transformer block is ``Residual((LayerNorm, SelfAttention))``).

    x: (N, *S) -> y: (N, *S): f must keep the shape.  params(): the
    sub-layers' params, flattened in order; grads likewise.  dx = dy + df/dx dy.
    In ``network``, ``residual([...])`` builds the sub-chain from specs.

    >>> block = dlfs.Residual((dlfs.Dense.init(0, 4, 4), dlfs.Tanh()))
    >>> block
    Residual(Dense, Tanh)
    >>> y, _, _ = block.forward(np.zeros((2, 4), np.float32))  # x + tanh(x w + b)
    >>> y.shape, float(abs(y).max())
    ((2, 4), 0.0)
    """

    layers: tuple[Layer, ...] = attrs.field(converter=_sub_chain)

    def __attrs_post_init__(self) -> None:
        if not self.layers:
            raise ValueError("Residual needs at least one layer, got ()")
        _check_sub_layers("layers", self.layers)

    def params(self) -> Params:
        """The sub-layers' params, flattened in order."""
        return _chain_params(self.layers)

    def with_params(self, params: Sequence[np.ndarray]) -> Residual:
        """A new Residual whose sub-layers take ``params`` (flattened, in order)."""
        return Residual(_chain_with_params(self.layers, _check_new_params(self, params)))

    def _renew(self, params: Params) -> Residual:
        return _replace(self, {"layers": _chain_renew(self.layers, params)})

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        """S -> S: the sub-chain must give back its input's shape."""
        in_shape = tuple(in_shape)
        shape = _chain_shapes(self.layers, in_shape)[-1]
        if shape != in_shape:
            raise ValueError(
                f"a Residual's layers must keep the shape of their input for x + f(x): "
                f"they take {_shape_str((None, *in_shape))} and give {_shape_str((None, *shape))}"
            )
        return in_shape

    def forward(self, x: np.ndarray, ctx: Context = EVAL) -> tuple[np.ndarray, tuple, Residual]:
        """The cache is the sub-layers' caches."""
        fx, caches, layers = _chain_forward(self.layers, x, ctx)
        if fx.shape != x.shape:
            raise ValueError(f"a Residual's layers turned x of shape {x.shape} into {fx.shape}")
        new = self if layers is self.layers else _replace(self, {"layers": layers})
        return x + fx, caches, new

    def backward(self, cache: tuple, dy: np.ndarray) -> tuple[np.ndarray, Params]:
        """dx = dy + (the sub-chain's dx for dy); grads: the sub-layers', flattened."""
        dx, grads = _chain_backward(self.layers, cache, dy)
        return dx + dy, grads

    def __repr__(self) -> str:
        return f"Residual({_chain_repr(self.layers)})"


@attrs.frozen(eq=False, repr=False)
class TiedEmbedding(_ArrayRecord):
    """A token embedding whose matrix is also the output head (weight tying, as
    GPT-2 and nanoGPT): h = w[ids]; h = f(h) through the sub-chain ``layers``;
    logits = h w^T.  One parameter used twice: dw = (scatter-add of dh_0 by id)
    + dlogits^T h.

    ids: integer (N, T) in [0, V) -> logits: (N, T, V); w: (V, D); the
    sub-chain maps (N, T, D) to (N, T, D).  params(): (w, *the sub-layers'
    params, flattened).  A network that starts with it takes token ids.  In
    ``network``, ``tied_embedding(V, D, [...])`` builds the sub-chain from specs.

    >>> tied = dlfs.TiedEmbedding(np.eye(3, 2), (dlfs.Tanh(),))
    >>> logits, _, _ = tied.forward(np.array([[0, 1, 2]]))
    >>> logits.shape, np.round(logits[0, 0], 4).tolist()  # tanh(w[0]) w^T
    ((1, 3, 3), [0.7616, 0.0, 0.0])
    """

    _PARAMS = ("w",)  # the first of params(); the sub-layers' follow

    w: np.ndarray = attrs.field(converter=_frozen_field)
    layers: tuple[Layer, ...] = attrs.field(default=(), converter=_sub_chain)

    def __attrs_post_init__(self) -> None:
        if self.w.ndim != 2:
            raise ValueError(f"w must be 2-D (n_vocab, dim), got shape {self.w.shape}")
        _check_sub_layers("layers", self.layers)
        dtypes = {p.dtype for p in _chain_params(self.layers)}
        if dtypes - {self.w.dtype}:
            raise TypeError(f"all parameters must share w's dtype {self.w.dtype}, got {dtypes}")

    @property
    def n_vocab(self) -> int:
        return self.w.shape[0]

    @property
    def dim(self) -> int:
        return self.w.shape[1]

    def params(self) -> Params:
        """(w, *the sub-layers' params)."""
        return (self.w, *_chain_params(self.layers))

    def with_params(self, params: Sequence[np.ndarray]) -> TiedEmbedding:
        """A new TiedEmbedding with ``params = (w, *sub-layer params)``."""
        new = _check_new_params(self, params)
        return TiedEmbedding(new[0], _chain_with_params(self.layers, new[1:]))

    def _renew(self, params: Params) -> TiedEmbedding:
        return _replace(self, {"w": params[0], "layers": _chain_renew(self.layers, params[1:])})

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        """(T,) -> (T, V)."""
        in_shape = tuple(in_shape)
        if len(in_shape) != 1:
            raise ValueError(
                f"TiedEmbedding takes token ids (N, T), got {_shape_str((None, *in_shape))}"
            )
        shapes = _chain_shapes(self.layers, (*in_shape, self.dim))
        if shapes and shapes[-1] != (*in_shape, self.dim):
            raise ValueError(
                f"a TiedEmbedding's layers must keep the shape (N, T, {self.dim}) for the "
                f"output head, they give {_shape_str((None, *shapes[-1]))}"
            )
        return (*in_shape, self.n_vocab)

    def forward(
        self, x: np.ndarray, ctx: Context = EVAL
    ) -> tuple[np.ndarray, tuple, TiedEmbedding]:
        """The cache is (ids, the last hidden h, the sub-layers' caches)."""
        _check_ids("x", x, (None, "T"))
        h, caches, layers = _chain_forward(self.layers, _lookup(self.w, x), ctx)
        _check_input("the layers' output", h, (*x.shape, self.dim), self.w.dtype)
        logits = np.dot(_matrix(h), self.w.T).reshape(*x.shape, self.n_vocab)
        new = self if layers is self.layers else _replace(self, {"layers": layers})
        return logits, (x, h, caches), new

    def backward(self, cache: tuple, dy: np.ndarray) -> tuple[Any, Params]:
        """dx = None (ids); dw = dy^T h + scatter-add of the sub-chain's dh_0."""
        ids, h, caches = cache
        _check_input("dy", dy, (*ids.shape, self.n_vocab), self.w.dtype)
        dy_rows = _matrix(dy)
        dw = np.dot(dy_rows.T, _matrix(h))
        dh, grads = _chain_backward(self.layers, caches, np.dot(dy_rows, self.w).reshape(h.shape))
        dw += _scatter_add_rows(self.n_vocab, ids.reshape(-1), _matrix(dh))
        return None, (dw, *grads)

    def __repr__(self) -> str:
        n = len(self.layers)
        inner = f", {n} layer{'' if n == 1 else 's'}" if n else ""
        return f"TiedEmbedding({self.n_vocab} -> {self.dim}{inner}, {self.w.dtype})"


_CHAINS = (Residual, TiedEmbedding)  # the layers whose ``layers`` field is a sub-chain


def _sub_chain_input(layer: Any, in_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The per-sample shape a container layer's sub-chain takes, given the layer's own."""
    return (*in_shape, layer.dim) if isinstance(layer, TiedEmbedding) else in_shape


# -------------------------------------------------------------------- losses


class Loss(Protocol):
    """The protocol every loss speaks (structural, like ``Layer``; a loss has
    no ``params``): ``forward(pred, target) -> (L, cache)`` with the scalar
    loss L, and ``backward(cache) -> dL/dpred``, shaped like pred.

    pred: (N, ...) the network's output; target: what the loss compares it
    with (same shape, or labels).

    >>> loss = dlfs.MeanSquaredError()
    >>> value, cache = loss.forward(np.array([[1.0], [3.0]]), np.array([[0.0], [0.0]]))
    >>> float(value), loss.backward(cache).tolist()
    (5.0, [[1.0], [3.0]])
    """

    def forward(self, pred: np.ndarray, target: np.ndarray, /) -> tuple[Any, Any]:
        """(loss, cache): the loss as a scalar of pred's dtype, and what ``backward`` needs."""
        ...

    def backward(self, cache: Any, /) -> np.ndarray:
        """dL/dpred, of pred's shape and dtype."""
        ...


def _check_pred(name: str, pred: Any) -> None:
    _check_float(name, pred)
    if pred.ndim < 1:
        raise ValueError(f"{name} must have a batch axis, got shape {pred.shape}")
    _check_nonempty(name, pred)


def _check_same_shape(pred: np.ndarray, target: Any) -> None:
    _check_float("target", target, pred.dtype)
    if target.shape != pred.shape:
        hint = " (use dlfs.to_2d(target) for a column)" if target.ndim == 1 else ""
        raise ValueError(
            f"target must have the same shape as the predictions {pred.shape}, "
            f"got {target.shape}; dlfs never broadcasts a loss{hint}"
        )


@attrs.frozen
class MeanSquaredError:
    """The book's MSE: L = sum((p - y)^2) / N, dL/dp = 2 (p - y) / N.

    pred, target: (N, ...) of equal shape (no broadcasting); the sum runs over
    every output, the division over N only.

    >>> mse = dlfs.MeanSquaredError()
    >>> value, cache = mse.forward(np.array([[1.0, 2.0]]), np.array([[0.0, 0.0]]))
    >>> float(value), mse.backward(cache).tolist()
    (5.0, [[2.0, 4.0]])
    """

    def forward(self, pred: np.ndarray, target: np.ndarray) -> tuple[Any, tuple]:
        """Loss as a scalar of pred's dtype; the cache is (p - y, N)."""
        _check_pred("pred", pred)
        _check_same_shape(pred, target)
        diff = pred - target
        return np.vdot(diff, diff) / pred.shape[0], (diff, pred.shape[0])

    def backward(self, cache: tuple) -> np.ndarray:
        """dL/dp = 2 (p - y) / N."""
        diff, n = cache
        return diff * (2 / n)

    def _value_and_grad(self, pred: np.ndarray, target: Any, fresh: bool) -> tuple[Any, np.ndarray]:
        """(loss, dL/dp) as forward + backward give them, for a network's output
        ``pred`` (already known to fit); ``fresh``: pred is the network's own
        array, which may be overwritten.  One array instead of three."""
        if not (
            type(target) is np.ndarray and target.shape == pred.shape and target.dtype == pred.dtype
        ):
            _check_same_shape(pred, target)
        n = pred.shape[0]
        diff = np.subtract(pred, target, out=pred if fresh else None)
        loss = np.vdot(diff, diff) / n
        diff *= 2 / n
        return loss, diff


@functools.cache
def _unsigned(dtype: np.dtype) -> np.dtype:
    """The unsigned integer dtype of an integer dtype's size and byte order."""
    return np.dtype(dtype.str.replace("i", "u"))


def _check_labels(target: np.ndarray, n: int, k: int) -> None:
    """Integer labels (N,) in [0, K): one pass, the labels read as unsigned (a
    negative one reads as a huge number) counted where >= K (cheaper than a
    ufunc reduction on a small batch), then the message from min and max."""
    if target.shape != (n,):
        _check_shape("target", target, (n,))
    if n and np.count_nonzero(np.greater_equal(target.view(_unsigned(target.dtype)), k)):
        raise ValueError(
            f"labels must be in [0, {k}), got values in [{target.min()}, {target.max()}]"
        )


@attrs.frozen
class SoftmaxCrossEntropy:
    """Softmax + cross-entropy on logits, fused: L = -sum_i q_i . log softmax(z_i) / N.

    logits: (N, K); target: integer labels (N,) in [0, K) or float
    probabilities/one-hot (N, K).  ``label_smoothing`` e gives
    q = (1 - e) q + e / K (PyTorch's convention); dL/dz = (softmax(z) - q) / N.
    Sequences: logits (N, T, K) with labels (N, T) or one-hot (N, T, K) are
    ``N*T`` rows, and the mean is over all ``N*T`` positions.

    >>> ce = dlfs.SoftmaxCrossEntropy()
    >>> logits = np.array([[0.0, 0.0], [0.0, np.log(3.0)]])
    >>> value, cache = ce.forward(logits, np.array([0, 1]))
    >>> round(float(value), 4)  # (log 2 + log 4/3) / 2
    0.4904
    >>> ce.backward(cache).round(4).tolist()  # (softmax - one_hot) / N
    [[-0.25, 0.25], [0.125, -0.125]]
    """

    label_smoothing: float = attrs.field(
        default=0.0,
        converter=lambda e: _check_number("label_smoothing", e, low=0.0, high=1.0),
    )

    def forward(self, logits: np.ndarray, target: np.ndarray) -> tuple[Any, tuple]:
        """The cache is (softmax(z), target)."""
        _check_pred("logits", logits)
        if logits.ndim == 3:
            return self._forward_seq(logits, target)
        _check_shape("logits", logits, (None, "K"))
        n, k = logits.shape
        _check_ndarray("target", target)
        if target.dtype.kind in "iu":
            _check_labels(target, n, k)
            return self._labels_loss(logits.copy(), target)
        _check_same_shape(logits, target)
        z = logits - logits.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        eps = self.label_smoothing
        q = (1 - eps) * target + eps / k if eps else target
        loss = -(q * logp).sum() / n
        return logits.dtype.type(loss), (np.exp(logp), target)

    def _labels_loss(self, z: np.ndarray, labels: np.ndarray) -> tuple[Any, tuple]:
        """forward for integer labels, computed in ``z`` (the logits or a copy, which
        becomes softmax(z)): with m = max_k z_k and s = sum_k exp(z_k - m), the
        loss per row is (1 - e) (log s - (z_y - m)) + e (log s - mean_k (z_k - m))."""
        n, k = z.shape
        eps = self.label_smoothing
        # ufunc reductions called directly: the array methods add a Python frame each
        z -= np.maximum.reduce(z, axis=1, keepdims=True)
        z_y = z[np.arange(n), labels]
        mean_z = np.add.reduce(z, axis=1) / k if eps else None
        np.exp(z, out=z)
        s = np.add.reduce(z, axis=1, keepdims=True)
        z /= s
        log_s = np.log(s[:, 0])
        loss = np.add.reduce(np.subtract(log_s, z_y, out=z_y)) / n
        if mean_z is not None:
            loss = (1 - eps) * loss + eps * np.add.reduce(log_s - mean_z) / n
        return z.dtype.type(loss), (z, labels)

    def _forward_seq(self, logits: np.ndarray, target: Any) -> tuple[Any, tuple]:
        """(N, T, K) logits as ``N*T`` rows; the cache keeps softmax(z) as (N, T, K)."""
        n, t, k = logits.shape
        _check_ndarray("target", target)
        if target.dtype.kind in "iu":
            _check_shape("target", target, (n, t))
        else:
            _check_same_shape(logits, target)
        rows = target.reshape(n * t, *target.shape[2:])  # labels (N*T,) or one-hot (N*T, K)
        loss, (p, rows) = self.forward(logits.reshape(n * t, k), rows)
        return loss, (p.reshape(n, t, k), rows)

    def backward(self, cache: tuple) -> np.ndarray:
        """dL/dz = (softmax(z) - q) / N, q smoothed if label_smoothing > 0."""
        p, target = cache
        if p.ndim == 3:  # sequences: the rows' gradient, back in (N, T, K)
            return self.backward((p.reshape(-1, p.shape[2]), target)).reshape(p.shape)
        if target.dtype.kind in "iu":
            return self._labels_grad(p.copy(), target)
        n, k = p.shape
        eps = self.label_smoothing
        g = p - ((1 - eps) * target + eps / k if eps else target)
        g /= n
        return g

    def _labels_grad(self, p: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """backward for integer labels, in ``p`` (softmax(z), overwritten)."""
        n, k = p.shape
        eps = self.label_smoothing
        if eps:
            p -= eps / k
        p[np.arange(n), labels] -= 1 - eps
        p /= n
        return p

    def _value_and_grad(
        self, logits: np.ndarray, target: Any, fresh: bool
    ) -> tuple[Any, np.ndarray]:
        """(loss, dL/dz) as forward + backward give them, for a network's output
        (already known to fit); ``fresh``: the logits are the network's own
        array, which then becomes the gradient (one exp, no other array)."""
        labels = type(target) is np.ndarray and target.dtype.kind in "iu" and logits.ndim == 2
        if not labels:
            loss, cache = self.forward(logits, target)
            return loss, self.backward(cache)
        n, k = logits.shape
        _check_labels(target, n, k)
        loss, (p, _) = self._labels_loss(logits if fresh else logits.copy(), target)
        return loss, self._labels_grad(p, target)


@attrs.frozen
class BinaryCrossEntropy:
    """Binary cross-entropy on logits, averaged over all N*K entries (PyTorch's
    ``BCEWithLogitsLoss``): L = mean(max(z, 0) - z t + log(1 + exp(-|z|))).

    logits, target: (N,) or (N, K), target in [0, 1]; dL/dz = (sigmoid(z) - t) / (N K).

    >>> bce = dlfs.BinaryCrossEntropy()
    >>> value, cache = bce.forward(np.array([[0.0], [0.0]]), np.array([[1.0], [0.0]]))
    >>> round(float(value), 4), bce.backward(cache).tolist()  # log 2
    (0.6931, [[-0.25], [0.25]])
    """

    def forward(self, logits: np.ndarray, target: np.ndarray) -> tuple[Any, tuple]:
        """The cache is (sigmoid(z), target)."""
        _check_pred("logits", logits)
        _check_same_shape(logits, target)
        low, high = target.min(), target.max()
        if not (low >= 0 and high <= 1):  # written so that NaN (which compares False) fails
            raise ValueError(f"target must be in [0, 1] (no NaN), got values in [{low}, {high}]")
        loss = np.maximum(logits, 0) - logits * target + np.log1p(np.exp(-np.abs(logits)))
        s = _sigmoid(logits)
        return loss.mean(), (s, target)

    def backward(self, cache: tuple) -> np.ndarray:
        """dL/dz = (sigmoid(z) - t) / (N K)."""
        s, target = cache
        return (s - target) / s.size

    def _value_and_grad(
        self, logits: np.ndarray, target: Any, fresh: bool
    ) -> tuple[Any, np.ndarray]:
        """(loss, dL/dz): forward + backward."""
        loss, cache = self.forward(logits, target)
        return loss, self.backward(cache)


# ------------------------------------------------------------------ networks


@runtime_checkable
class LayerSpec(Protocol):
    """What ``network`` builds layers from, besides ready layers:
    ``build(key, in_shape, dtype) -> (layers, out_shape)`` draws the weights
    from ``key`` for per-sample inputs of ``in_shape`` (x: (N, *in_shape))
    and returns the new layers and their per-sample output shape.  ``dense``,
    ``conv2d``, ``batch_norm``, ``embedding``, ``rnn``, ``lstm`` and ``gru``
    make them.

    >>> layers, out_shape = dlfs.dense(4, dlfs.ReLU()).build((0,), (3,), np.dtype(np.float32))
    >>> layers, out_shape
    ((Dense(3 -> 4, float32), ReLU()), (4,))
    """

    def build(
        self, key: Key, in_shape: tuple[int, ...], dtype: np.dtype
    ) -> tuple[tuple[Layer, ...], tuple[int, ...]]:
        """(layers, per-sample output shape) for per-sample inputs of ``in_shape``."""
        ...


def _uses_key(layer: type) -> bool:
    """Whether a layer type's forward may draw random numbers (needs its own
    sub-key): Dropout, the layers that may hold one (attention, blocks) and any
    layer dlfs does not know."""
    return (
        layer in (Dropout, SelfAttention, Residual, TiedEmbedding) or layer.__module__ != __name__
    )


def _fresh_output(layer: type) -> bool:
    """Whether a layer type's forward output is a fresh array that its cache does
    not hold (Dense, Conv2D), so the next layer may overwrite it."""
    return layer is Dense or layer is Conv2D


def _fresh_input_grad(layer: Any, fresh: bool) -> bool:
    """Whether a layer's dx is an array no one else holds, given whether its dy
    was: dlfs's layers return a new array, or dy itself or a view of it
    (Linear, Flatten, Dropout); a user's layer may return anything."""
    if not _is_own(layer):
        return False
    return fresh or not isinstance(layer, (Linear, Flatten, Dropout, PositionalEmbedding))


@attrs.frozen
class _Plan:
    """How a network's forward and backward treat its layers, decided once per
    sequence of layer types (dlfs's own fast paths, picked by exact type).

    ``forward``: per layer, "keyed" (its forward gets its own sub-key), "owned"
    (a ReLU on a fresh input: in place) or "plain"; ``fresh``: the output is a
    fresh array; ``stateful``: a layer may return a new version of itself
    (BatchNorm, a user's layer); ``first``: the first layer with parameters
    (None: a user's layer comes first, ask the layers); ``recycles``: a layer
    takes step buffers (see _recycling)."""

    forward: tuple[str, ...]
    fresh: bool
    stateful: bool
    first: int | None
    recycles: bool


@functools.cache
def _plan(types: tuple[type, ...]) -> _Plan:
    forward, fresh = [], False  # the input is the caller's
    for layer in types:
        forward.append(
            "owned" if fresh and layer is ReLU else "keyed" if _uses_key(layer) else "plain"
        )
        fresh = _fresh_output(layer)
    own = [layer.__module__ == __name__ for layer in types]
    has_params = [mine and issubclass(layer, _ArrayRecord) for mine, layer in zip(own, types)]
    first = has_params.index(True) if True in has_params else len(types)
    return _Plan(
        forward=tuple(forward),
        fresh=fresh,
        stateful=not all(own) or any(t in (BatchNorm, Residual, TiedEmbedding) for t in types),
        first=first if all(own[:first]) else None,
        recycles=Conv2D in types or MaxPool2D in types,
    )


def _not_called(obj: Any) -> str:
    """The fix when a class (or a dlfs factory function) is passed where an instance
    belongs, ``dlfs.ReLU`` for ``dlfs.ReLU()``; empty for anything else."""
    dlfs_function = isinstance(obj, type(_not_called)) and obj.__module__ == __name__
    if not (isinstance(obj, type) or dlfs_function):
        return ""
    name = getattr(obj, "__qualname__", "?")
    name = f"dlfs.{name}" if getattr(obj, "__module__", None) == __name__ else name
    kind = "class" if isinstance(obj, type) else "function"
    return f" (that is the {kind} {name} itself: call it, {name}())"


def _check_activation(activation: Any) -> None:
    if activation is not None and not _is_layer(activation):
        raise TypeError(
            f"activation must be a layer such as dlfs.ReLU(), got {activation!r}"
            + _not_called(activation)
        )


def _then_activation(
    layer: Layer, out_shape: tuple[int, ...], activation: Layer | None
) -> tuple[tuple[Layer, ...], tuple[int, ...]]:
    """A spec's layers and output shape: ``layer``, then ``activation`` if any."""
    if activation is None:
        return (layer,), out_shape
    return (layer, activation), activation.output_shape(out_shape)


@attrs.frozen
class DenseSpec:
    """A Dense layer (plus optional activation) whose input size the builder
    infers: what ``dense`` returns.  (N, D) -> (N, n_out); (N, T, D) -> (N, T, n_out).

    >>> spec = dlfs.dense(4, dlfs.ReLU())
    >>> spec.n_out, spec.activation
    (4, ReLU())
    """

    n_out: int = attrs.field(converter=lambda n: _check_int("n_out", n))
    activation: Layer | None = None
    init: Initializer = glorot_normal
    bias_init: Initializer = zeros
    bias: bool = True

    def build(
        self, key: Key, in_shape: tuple[int, ...], dtype: np.dtype
    ) -> tuple[tuple[Layer, ...], tuple[int, ...]]:
        """Draw the weights for inputs of per-sample shape ``in_shape``: (D,), or
        (T, D) for sequences."""
        if len(in_shape) not in (1, 2):
            raise ValueError(
                f"dense expects flat inputs (N, D) or sequences (N, T, D), got "
                f"{_shape_str((None, *in_shape))}; put dlfs.Flatten() before it"
            )
        layer = Dense.init(
            key,
            in_shape[-1],
            self.n_out,
            init=self.init,
            bias_init=self.bias_init,
            bias=self.bias,
            dtype=dtype,
        )
        return _then_activation(layer, layer.output_shape(in_shape), self.activation)


def dense(
    n_out: int,
    activation: Layer | None = None,
    *,
    init: Initializer = glorot_normal,
    bias_init: Initializer = zeros,
    bias: bool = True,
) -> DenseSpec:
    """The book's ``Dense(neurons, activation)``: a Dense layer of ``n_out`` units
    followed by ``activation``; its input size comes from the previous layer.
    y = activation(x @ w + b): (N, D) -> (N, n_out); ``bias=False``: y = activation(x @ w).

    >>> net = dlfs.network(0, 5, [dlfs.dense(3, dlfs.Sigmoid())], dlfs.MeanSquaredError())
    >>> net.layers
    (Dense(5 -> 3, float32), Sigmoid())
    """
    _check_activation(activation)
    _check_initializer("init", init)
    _check_initializer("bias_init", bias_init)
    return DenseSpec(n_out, activation, init, bias_init, _check_bool("bias", bias))


@attrs.frozen
class Conv2DSpec:
    """A Conv2D layer (plus optional activation) whose input channels the builder
    infers: what ``conv2d`` returns.  (N, C, H, W) -> (N, channels, Ho, Wo).

    >>> spec = dlfs.conv2d(8, 3, padding="same")
    >>> spec.channels, spec.kernel, spec.padding
    (8, (3, 3), 'same')
    """

    channels: int = attrs.field(converter=lambda n: _check_int("channels", n))
    kernel: tuple[int, int] = attrs.field(converter=lambda k: _int_pair("kernel", k))
    stride: tuple[int, int] = attrs.field(
        default=(1, 1), converter=lambda s: _int_pair("stride", s)
    )
    padding: Padding = "valid"
    activation: Layer | None = None
    init: Initializer = he_normal
    bias_init: Initializer = zeros

    def __attrs_post_init__(self) -> None:
        _resolve_padding(self.padding, self.kernel, self.stride)  # fail early on bad padding

    def build(
        self, key: Key, in_shape: tuple[int, ...], dtype: np.dtype
    ) -> tuple[tuple[Layer, ...], tuple[int, ...]]:
        """Draw the kernel for images of per-sample shape ``in_shape`` (C, H, W)."""
        if len(in_shape) != 3:
            raise ValueError(
                f"conv2d expects images (N, C, H, W), got {_shape_str((None, *in_shape))}"
            )
        layer = Conv2D.init(
            key,
            in_shape[0],
            self.channels,
            self.kernel,
            stride=self.stride,
            padding=self.padding,
            init=self.init,
            bias_init=self.bias_init,
            dtype=dtype,
        )
        out = layer.output_shape(in_shape)
        return _then_activation(layer, out, self.activation)


def conv2d(
    channels: int,
    kernel: int | tuple[int, int],
    *,
    stride: int | tuple[int, int] = 1,
    padding: Padding = "valid",
    activation: Layer | None = None,
    init: Initializer = he_normal,
    bias_init: Initializer = zeros,
) -> Conv2DSpec:
    """A Conv2D of ``channels`` output channels and a ``kernel`` (int or (kh, kw))
    window, followed by ``activation``; its input channels come from the previous
    layer.  (N, C, H, W) -> (N, channels, Ho, Wo); stride and padding as for ``Conv2D``.

    >>> net = dlfs.network(
    ...     0, (1, 8, 8), [dlfs.conv2d(4, 3, activation=dlfs.ReLU()), dlfs.Flatten(), dlfs.dense(2)],
    ...     dlfs.SoftmaxCrossEntropy(),
    ... )
    >>> net.layers[0], net.output_shape
    (Conv2D(1 -> 4, 3x3, float32), (2,))
    """
    _check_activation(activation)
    _check_initializer("init", init)
    _check_initializer("bias_init", bias_init)
    return Conv2DSpec(channels, kernel, stride, padding, activation, init, bias_init)


@attrs.frozen
class _BatchNormSpec:
    momentum: float = 0.1
    eps: float = 1e-5

    def build(
        self, key: Key, in_shape: tuple[int, ...], dtype: np.dtype
    ) -> tuple[tuple[Layer, ...], tuple[int, ...]]:
        layer = BatchNorm.init(in_shape[0], momentum=self.momentum, eps=self.eps, dtype=dtype)
        return (layer,), layer.output_shape(in_shape)


def batch_norm(*, momentum: float = 0.1, eps: float = 1e-5) -> LayerSpec:
    """A BatchNorm layer sized by the builder from the previous layer's output:
    (N, C) or (N, C, H, W) -> same shape, C taken from that output.

    >>> net = dlfs.network(0, 3, [dlfs.dense(4), dlfs.batch_norm(), dlfs.ReLU()], dlfs.MeanSquaredError())
    >>> net.layers[1]
    BatchNorm(4, momentum=0.1, eps=1e-05, float32)
    """
    _check_number("momentum", momentum, low=0.0, high=1.0)
    _check_number("eps", eps, low=0.0, low_open=True)
    return _BatchNormSpec(momentum, eps)


@attrs.frozen
class _EmbeddingSpec:
    n_vocab: int = attrs.field(converter=lambda n: _check_int("n_vocab", n))
    dim: int = attrs.field(converter=lambda n: _check_int("dim", n))
    init: Initializer = normal

    def build(
        self, key: Key, in_shape: tuple[int, ...], dtype: np.dtype
    ) -> tuple[tuple[Layer, ...], tuple[int, ...]]:
        layer = Embedding.init(key, self.n_vocab, self.dim, init=self.init, dtype=dtype)
        return (layer,), layer.output_shape(in_shape)


def embedding(n_vocab: int, dim: int, *, init: Initializer = normal) -> LayerSpec:
    """An Embedding of ``n_vocab`` token ids into ``dim``-vectors, first in a
    network whose input is integer ids: (N, T) -> (N, T, dim).

    >>> net = dlfs.network(0, (6,), [dlfs.embedding(20, 4), dlfs.gru(8), dlfs.dense(2)],
    ...                    dlfs.SoftmaxCrossEntropy())
    >>> net.predict(np.zeros((3, 6), np.int64)).shape  # ids (N, T) -> (N, 2)
    (3, 2)
    """
    return _EmbeddingSpec(n_vocab, dim, init)


@attrs.frozen
class _RecurrentSpec:
    layer: type[_Recurrent]
    n_hidden: int = attrs.field(converter=lambda n: _check_int("n_hidden", n))
    return_sequences: bool = attrs.field(validator=attrs.validators.instance_of(bool))
    options: tuple[tuple[str, Any], ...] = ()

    def build(
        self, key: Key, in_shape: tuple[int, ...], dtype: np.dtype
    ) -> tuple[tuple[Layer, ...], tuple[int, ...]]:
        if len(in_shape) != 2:
            raise ValueError(
                f"{self.layer.__name__} expects sequences (N, T, D), got "
                f"{_shape_str((None, *in_shape))}"
            )
        layer = self.layer.init(
            key,
            in_shape[1],
            self.n_hidden,
            return_sequences=self.return_sequences,
            dtype=dtype,
            **dict(self.options),
        )
        return (layer,), layer.output_shape(in_shape)


def rnn(n_hidden: int, *, return_sequences: bool = False) -> LayerSpec:
    """An RNN (tanh) of ``n_hidden`` units sized by the builder: (N, T, D) ->
    (N, T, H) with ``return_sequences``, else (N, H), the last step.

    >>> net = dlfs.network(0, (5, 3), [dlfs.rnn(8, return_sequences=True)], dlfs.MeanSquaredError())
    >>> net.output_shape
    (5, 8)
    """
    return _RecurrentSpec(RNN, n_hidden, return_sequences)


def lstm(n_hidden: int, *, return_sequences: bool = False, forget_bias: float = 1.0) -> LayerSpec:
    """An LSTM of ``n_hidden`` units sized by the builder: (N, T, D) -> (N, T, H)
    with ``return_sequences``, else (N, H); ``forget_bias`` as in ``LSTM.init``.

    >>> net = dlfs.network(0, (28, 28), [dlfs.lstm(16), dlfs.dense(10)], dlfs.SoftmaxCrossEntropy())
    >>> net.layers[0], net.output_shape
    (LSTM(28 -> 16, return_sequences=False, float32), (10,))
    """
    forget_bias = _check_number("forget_bias", forget_bias)
    return _RecurrentSpec(LSTM, n_hidden, return_sequences, (("forget_bias", forget_bias),))


def gru(n_hidden: int, *, return_sequences: bool = False) -> LayerSpec:
    """A GRU of ``n_hidden`` units sized by the builder: (N, T, D) -> (N, T, H)
    with ``return_sequences``, else (N, H), the last step.

    >>> net = dlfs.network(0, (5, 3), [dlfs.gru(4)], dlfs.MeanSquaredError())
    >>> net.predict(np.ones((2, 5, 3), np.float32)).shape
    (2, 4)
    """
    return _RecurrentSpec(GRU, n_hidden, return_sequences)


@attrs.frozen
class _LayerNormSpec:
    scale: bool
    bias: bool
    eps: float

    def build(
        self, key: Key, in_shape: tuple[int, ...], dtype: np.dtype
    ) -> tuple[tuple[Layer, ...], tuple[int, ...]]:
        layer = LayerNorm.init(
            in_shape[-1], scale=self.scale, bias=self.bias, eps=self.eps, dtype=dtype
        )
        return (layer,), layer.output_shape(in_shape)


def layer_norm(*, scale: bool = True, bias: bool = True, eps: float = 1e-5) -> LayerSpec:
    """A LayerNorm over the last axis, sized by the builder: (N, ..., D) -> same
    shape; ``scale``/``bias``: whether it has gamma / beta (GPT-2 without
    biases: ``layer_norm(bias=False)``).

    >>> net = dlfs.network(0, (5, 8), [dlfs.layer_norm(bias=False)], dlfs.MeanSquaredError())
    >>> net.layers
    (LayerNorm(8, bias=False, eps=1e-05, float32),)
    """
    _check_bool("scale", scale)
    _check_bool("bias", bias)
    return _LayerNormSpec(scale, bias, _check_number("eps", eps, low=0.0, low_open=True))


@attrs.frozen
class _SelfAttentionSpec:
    n_heads: int
    causal: bool
    bias: bool
    dropout: float
    init: Initializer
    out_init: Initializer | None

    def build(
        self, key: Key, in_shape: tuple[int, ...], dtype: np.dtype
    ) -> tuple[tuple[Layer, ...], tuple[int, ...]]:
        if len(in_shape) != 2:
            raise ValueError(
                f"self_attention expects sequences (N, T, D), got {_shape_str((None, *in_shape))}"
            )
        layer = SelfAttention.init(
            key,
            in_shape[1],
            self.n_heads,
            causal=self.causal,
            bias=self.bias,
            dropout=self.dropout,
            init=self.init,
            out_init=self.out_init,
            dtype=dtype,
        )
        return (layer,), layer.output_shape(in_shape)


def self_attention(
    n_heads: int,
    *,
    causal: bool = True,
    bias: bool = True,
    dropout: float = 0.0,
    init: Initializer = glorot_normal,
    out_init: Initializer | None = None,
) -> LayerSpec:
    """Multi-head self-attention (``SelfAttention``) sized by the builder:
    (N, T, D) -> (N, T, D), D divisible by ``n_heads``; ``init`` draws w_qkv,
    ``out_init`` (default ``init``) w_o.

    >>> net = dlfs.network(0, (6, 8), [dlfs.self_attention(2)], dlfs.MeanSquaredError())
    >>> net.layers[0], net.output_shape
    (SelfAttention(8, n_heads=2, causal=True, float32), (6, 8))
    """
    n_heads = _check_int("n_heads", n_heads)
    _check_bool("causal", causal)
    _check_bool("bias", bias)
    dropout = _check_number("dropout", dropout, low=0.0, high=1.0, high_open=True)
    _check_initializer("init", init)
    if out_init is not None:
        _check_initializer("out_init", out_init)
    return _SelfAttentionSpec(n_heads, causal, bias, dropout, init, out_init)


@attrs.frozen
class _PositionalSpec:
    max_len: int
    init: Initializer

    def build(
        self, key: Key, in_shape: tuple[int, ...], dtype: np.dtype
    ) -> tuple[tuple[Layer, ...], tuple[int, ...]]:
        if len(in_shape) != 2:
            raise ValueError(
                f"positional_embedding expects sequences (N, T, D), got "
                f"{_shape_str((None, *in_shape))}"
            )
        layer = PositionalEmbedding.init(
            key, self.max_len, in_shape[1], init=self.init, dtype=dtype
        )
        return (layer,), layer.output_shape(in_shape)


def positional_embedding(max_len: int, *, init: Initializer = normal) -> LayerSpec:
    """Learned positions for sequences of up to ``max_len`` steps (the context
    length), D from the builder: (N, T, D) -> (N, T, D), x[:, t] + w[t].

    >>> net = dlfs.network(0, (6, 4), [dlfs.positional_embedding(8)], dlfs.MeanSquaredError())
    >>> net.layers
    (PositionalEmbedding(8 x 4, float32),)
    """
    _check_initializer("init", init)
    return _PositionalSpec(_check_int("max_len", max_len), init)


@attrs.frozen
class _ResidualSpec:
    layers: tuple[Any, ...]

    def build(
        self, key: Key, in_shape: tuple[int, ...], dtype: np.dtype
    ) -> tuple[tuple[Layer, ...], tuple[int, ...]]:
        layers, _ = _build_layers(key, in_shape, self.layers, dtype, "residual layers")
        layer = Residual(layers)
        return (layer,), layer.output_shape(in_shape)


def residual(layers: Sequence[Layer | LayerSpec]) -> LayerSpec:
    """A skip connection y = x + f(x) around the sub-chain f built from ``layers``
    (specs and layers, as ``network`` takes them); f must keep the shape.

    >>> block = dlfs.residual([dlfs.layer_norm(), dlfs.dense(16, dlfs.ReLU()), dlfs.dense(4)])
    >>> net = dlfs.network(0, 4, [block], dlfs.MeanSquaredError())
    >>> net.layers
    (Residual(LayerNorm, Dense, ReLU, Dense),)
    """
    return _ResidualSpec(_check_items("layers", layers))


@attrs.frozen
class _TiedEmbeddingSpec:
    n_vocab: int
    dim: int
    layers: tuple[Any, ...]
    init: Initializer

    def build(
        self, key: Key, in_shape: tuple[int, ...], dtype: np.dtype
    ) -> tuple[tuple[Layer, ...], tuple[int, ...]]:
        if len(in_shape) != 1:
            raise ValueError(
                f"tied_embedding takes token ids (N, T), got {_shape_str((None, *in_shape))}"
            )
        own, sub = split(key, 2)
        w = _draw("init", self.init, make_rng(own), (self.n_vocab, self.dim), dtype)
        shape = (*in_shape, self.dim)
        layers, _ = _build_layers(sub, shape, self.layers, dtype, "tied_embedding layers")
        layer = TiedEmbedding(w, layers)
        return (layer,), layer.output_shape(in_shape)


def tied_embedding(
    n_vocab: int, dim: int, layers: Sequence[Layer | LayerSpec] = (), *, init: Initializer = normal
) -> LayerSpec:
    """A token embedding of ``n_vocab`` ids into ``dim``-vectors whose matrix is
    also the output head (``TiedEmbedding``), around the sub-chain built from
    ``layers``: ids (N, T) -> logits (N, T, n_vocab).  First in a network.

    >>> net = dlfs.network(0, (8,), [dlfs.tied_embedding(11, 4, [dlfs.positional_embedding(8)])],
    ...                    dlfs.SoftmaxCrossEntropy())
    >>> net.output_shape, [p.shape for p in net.params()[0]]  # one (11, 4) matrix, used twice
    ((8, 11), [(11, 4), (8, 4)])
    """
    _check_initializer("init", init)
    n_vocab, dim = _check_int("n_vocab", n_vocab), _check_int("dim", dim)
    return _TiedEmbeddingSpec(n_vocab, dim, _check_items("layers", layers), init)


def _is_layer(obj: Any) -> TypeGuard[Layer]:
    return not isinstance(obj, type) and all(
        hasattr(obj, m) for m in ("params", "with_params", "forward", "backward", "output_shape")
    )


def _is_loss(obj: Any) -> TypeGuard[Loss]:
    return (
        not isinstance(obj, type)
        and hasattr(obj, "forward")
        and hasattr(obj, "backward")
        and not hasattr(obj, "params")
    )


def _chain_shapes(layers: Sequence[Any], input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Per-sample output shape after each layer; raises if they do not chain."""
    shapes, shape = [], input_shape
    for i, layer in enumerate(layers):
        try:
            shape = tuple(layer.output_shape(shape))
        except ValueError as err:
            raise ValueError(f"layer {i} ({type(layer).__name__}): {err}") from None
        shapes.append(shape)
    return shapes


def _input_error(net: Any, name: str, x: Any, err: Exception) -> Exception:
    """``err`` from checking a network's input ``x``, with the fix for the usual
    mistakes: raw uint8 pixels, one sample without its batch axis, channels-last
    images, images for a dense network, a missing channel axis."""
    if not isinstance(x, np.ndarray):
        return err
    if x.dtype == np.uint8 and isinstance(err, TypeError):
        return TypeError(
            f"{name} must be a float array, got dtype uint8 (raw pixel values?); dlfs never "
            f"casts silently: convert with {name}.astype(np.{net.dtype or 'float32'}) / 255"
        )
    want, got = tuple(net.input_shape), x.shape[1:]
    hint = ""
    if x.shape == want:
        hint = f"; {name} looks like a single sample: pass a batch of one, {name}[None]"
    elif len(want) == 3 and got == (want[1], want[2], want[0]):
        hint = (
            f"; dlfs wants images channels-first (N, C, H, W) and {name} looks "
            f"channels-last: use {name}.transpose(0, 3, 1, 2)"
        )
    elif len(want) == 3 and want[0] == 1 and got == want[1:]:
        hint = f"; add the channel axis: {name}[:, None]"
    elif len(want) == 1 and x.ndim > 2 and math.prod(got) == want[0]:
        hint = f"; flatten each sample for a dense network: {name}.reshape(len({name}), -1)"
    return type(err)(f"{err}{hint}") if hint else err


@attrs.frozen
class Summary:
    """What ``Network.summary()`` returns: the network's one-line description
    (``title``), one row per layer (name, output shape, parameter count; the
    input row has None; the layers inside a Residual or TiedEmbedding follow
    its row, indented, their counts part of its own) and the total.  ``print`` it for the table; Jupyter
    renders it as an HTML table.  Shapes read (N, ...) per row.

    >>> net = dlfs.network(0, 3, [dlfs.dense(4, dlfs.ReLU()), dlfs.dense(1)], dlfs.MeanSquaredError())
    >>> s = net.summary()
    >>> s.total, s.rows[1]
    (21, ('Dense(3 -> 4, float32)', '(N, 4)', 16))
    """

    title: str
    rows: tuple[tuple[str, str, int | None], ...]
    total: int

    def __str__(self) -> str:
        cells = [("Layer", "Output shape", "Params")]
        cells += [(name, shape, _people(n)) for name, shape, n in self.rows]
        widths = [max(len(row[c]) for row in cells) for c in range(3)]
        lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}" for a, b, c in cells]
        rule = "-" * len(lines[0])
        total = f"Total params: {self.total:,}"
        return "\n".join([self.title, lines[0], rule, *lines[1:], rule, total])

    def __repr__(self) -> str:  # the table, also where a notebook shows plain text
        return str(self)

    def _repr_html_(self) -> str:
        rows = [(name, shape, _people(n)) for name, shape, n in self.rows]
        rows.append(("Total params", "", _people(self.total)))
        return _html_table(("Layer", "Output shape", "Params"), rows, caption=self.title)


def _summary_rows(
    rows: list[tuple[str, str, int | None]], layers: Any, in_shape: tuple[int, ...], indent: str
) -> None:
    """Append a row per layer (a container's sub-layers indented below it)."""
    for layer, shape in zip(layers, _chain_shapes(layers, in_shape)):
        n = sum(p.size for p in layer.params())
        rows.append((indent + repr(layer), _shape_str((None, *shape)), n))
        if isinstance(layer, _CHAINS):
            _summary_rows(rows, layer.layers, _sub_chain_input(layer, in_shape), indent + "  ")
        in_shape = shape


@attrs.frozen(eq=False, repr=False)
class Network:
    """An ordered tuple of layers plus a loss (the book's NeuralNetwork).

    ``input_shape`` is the per-sample input shape, e.g. ``(13,)`` or
    ``(1, 28, 28)``.  x: (N, *input_shape) -> (N, *output_shape); x is a float
    array of the network's dtype, or integer token ids when the first layer
    is an Embedding.  ``network`` builds one from specs; ``Network(layers,
    loss, input_shape)`` takes ready layers.

    >>> net = dlfs.network(0, 3, [dlfs.dense(4, dlfs.ReLU()), dlfs.dense(1)], dlfs.MeanSquaredError())
    >>> net
    Network((3,) -> (1,), 3 layers, 21 params, float32, MeanSquaredError)
    >>> x, y = np.ones((5, 3), np.float32), np.zeros((5, 1), np.float32)
    >>> loss, grads, _ = net.loss_and_grads(x, y)
    >>> [[g.shape for g in layer] for layer in grads]  # aligned with net.params()
    [[(3, 4), (4,)], [], [(4, 1), (1,)]]
    >>> net.predict(x).shape
    (5, 1)
    """

    layers: tuple[Layer, ...] = attrs.field(converter=tuple)
    loss: Loss
    input_shape: tuple[int, ...] = attrs.field(converter=lambda s: _as_shape("input_shape", s))

    def __attrs_post_init__(self) -> None:
        for i, layer in enumerate(self.layers):
            if not _is_layer(layer):
                raise TypeError(
                    f"layers[{i}] must be a layer (params/with_params/forward/backward/"
                    f"output_shape), got {type(layer).__name__}" + _not_called(layer)
                )
        if not _is_loss(self.loss):
            raise TypeError(
                f"loss must be a loss such as dlfs.MeanSquaredError(), got {self.loss!r}"
                + _not_called(self.loss)
            )
        _chain_shapes(self.layers, self.input_shape)
        dtypes = {p.dtype for p in self._flat_params()}
        if len(dtypes) > 1:
            raise TypeError(f"all parameters must share one dtype, got {sorted(map(str, dtypes))}")

    def _flat_params(self) -> list[np.ndarray]:
        return [p for layer in self.layers for p in layer.params()]

    def _evolve_layers(self, layers: tuple[Any, ...]) -> Network:
        """This network with ``layers`` swapped in, skipping the constructor's
        checks: each new layer came from the old one's ``with_params`` or
        ``forward``, so types, shapes and dtypes are already known to fit."""
        return _replace(self, {"layers": layers})

    def _renew(self, params: NetParams) -> Network:
        """``with_params`` for parameters known to fit: fresh read-only arrays that
        a dlfs optimizer made from this network's own (same tree, shapes and
        dtypes), for a network of dlfs's own layers.  No checks, no copies."""
        return self._evolve_layers(tuple(map(_renew_layer, self.layers, params)))

    @property
    def dtype(self) -> np.dtype | None:
        """The parameters' dtype (None for a network without parameters)."""
        for layer in self.layers:
            ps = layer.params()
            if ps:
                return ps[0].dtype
        return None

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Per-sample output shape."""
        return _chain_shapes(self.layers, self.input_shape)[-1] if self.layers else self.input_shape

    def params(self) -> NetParams:
        """One tuple of arrays per layer, in layer order."""
        return tuple(layer.params() for layer in self.layers)

    def with_params(self, params: Sequence[Sequence[np.ndarray]]) -> Network:
        """A new network whose layers take ``params`` (one tuple per layer)."""
        if not isinstance(params, (tuple, list)) or len(params) != len(self.layers):
            raise ValueError(
                f"params must be a sequence of {len(self.layers)} per-layer tuples, "
                f"got {type(params).__name__}"
            )
        return self._evolve_layers(
            tuple(layer.with_params(p) for layer, p in zip(self.layers, params))
        )

    def _check_x(self, x: Any, name: str = "x") -> None:
        plain = type(x) is np.ndarray and x.shape[1:] == self.input_shape and len(x)
        if plain and x.dtype == self.dtype:  # the common case, in a few attribute reads
            return
        try:
            if self._takes_ids():  # token ids, not floats
                _check_ids(name, x, (None, *self.input_shape))
            else:
                _check_input(name, x, (None, *self.input_shape), self.dtype)
        except (TypeError, ValueError) as err:
            raise _input_error(self, name, x, err) from None
        _check_nonempty(name, x)

    def _takes_ids(self) -> bool:
        """Whether the first layer takes integer token ids (an embedding)."""
        return bool(self.layers) and isinstance(self.layers[0], (Embedding, TiedEmbedding))

    def forward(self, x: np.ndarray, ctx: Context = EVAL) -> tuple[np.ndarray, tuple, Network]:
        """Run every layer; returns (output, caches, network with new layer state)."""
        self._check_x(x)
        x = _plain(x)
        if not isinstance(ctx, Context):
            raise TypeError(f"ctx must be a dlfs.Context, got {type(ctx).__name__}")
        return self._forward(x, ctx)

    def _plan(self) -> _Plan:
        return _plan(tuple(map(type, self.layers)))

    def _forward(self, x: np.ndarray, ctx: Context) -> tuple[np.ndarray, tuple, Network]:
        out, caches, net, _ = self._run(x, ctx)
        return out, tuple(caches), net

    def _run(self, x: np.ndarray, ctx: Context) -> tuple[np.ndarray, list, Network, bool]:
        """Every layer's forward: (output, caches, network with new layer state,
        whether the output is a fresh array no one else holds).  A layer whose
        input is such an array (a Dense's or Conv2D's output) may work in place."""
        plan = self._plan()
        caches, layers = [], []
        key = ctx.key
        layer: Any  # dlfs's own fast paths, as the plan says
        for i, (layer, how) in enumerate(zip(self.layers, plan.forward)):
            if how == "owned":
                x, cache, layer = layer._forward_owned(x)
            elif how == "keyed" and key is not None:
                x, cache, layer = layer.forward(x, _sub_context(ctx.train, key + (i,)))
            else:
                x, cache, layer = layer.forward(x, ctx)
            caches.append(cache)
            layers.append(layer)
        changed = plan.stateful and any(new is not old for new, old in zip(layers, self.layers))
        net = self._evolve_layers(tuple(layers)) if changed else self
        return x, caches, net, plan.fresh

    def backward(self, caches: Sequence[Any], dy: np.ndarray) -> tuple[np.ndarray, NetParams]:
        """Backpropagate ``dy`` through the layers; grads align with ``params()``."""
        if not isinstance(caches, (tuple, list)) or len(caches) != len(self.layers):
            raise ValueError(
                f"caches must be the tuple of {len(self.layers)} caches from forward, "
                f"got {type(caches).__name__} of length "
                f"{len(caches) if isinstance(caches, (tuple, list)) else '?'}"
            )
        _check_float("dy", dy, self.dtype)
        grads = []
        for layer, cache in zip(reversed(self.layers), reversed(caches)):
            dy, g = layer.backward(cache, dy)
            grads.append(g)
        return dy, tuple(reversed(grads))

    def _param_backward(self, caches: list, dy: np.ndarray, fresh: bool) -> NetParams:
        """Parameter gradients only: stops at the first layer with parameters
        and asks it for (dw, db) without dx when it can (``_param_grads``);
        the layers before it have no parameters, so their grads are ``()``.

        ``caches`` is emptied as it goes (each layer's arrays can be freed as
        soon as its backward is done); ``fresh``: dy is an array no one else
        holds, which a ReLU then overwrites with its dx."""
        layers: tuple[Any, ...] = self.layers  # dlfs's own fast paths, by exact type
        first = self._plan().first
        if first is None:
            first = next((i for i, layer in enumerate(layers) if layer.params()), len(layers))
        grads: list[Params] = [()] * len(layers)
        for i in range(len(layers) - 1, first - 1, -1):
            layer, cache = layers[i], caches[i]
            caches[i] = None
            if i == first and hasattr(layer, "_param_grads"):
                grads[i] = layer._param_grads(cache, dy)
            elif fresh and type(layer) is ReLU:
                dy, grads[i] = layer._backward_owned(cache, dy)
            else:
                dy, grads[i] = layer.backward(cache, dy)
                fresh = _fresh_input_grad(layer, fresh)
        return tuple(grads)

    def loss_and_grads(
        self, x: np.ndarray, y: np.ndarray, ctx: Context = EVAL
    ) -> tuple[Any, NetParams, Network]:
        """Forward, loss, backward: returns (loss, grads, network with new state)."""
        self._check_x(x)
        _check_xy(x, y)
        return self._loss_and_grads(x, y, ctx)

    def _loss_and_grads(
        self, x: np.ndarray, y: np.ndarray, ctx: Context
    ) -> tuple[Any, NetParams, Network]:
        out, caches, net, fresh = self._run(x, ctx)
        if _is_own(self.loss):  # fused, in place on a fresh output
            loss, dy = self.loss._value_and_grad(out, y, fresh)
        else:
            loss, loss_cache = self.loss.forward(out, y)
            dy = self.loss.backward(loss_cache)
        del out  # it may live on as dy; the caches go as backward uses them
        return loss, net._param_backward(caches, dy, _is_own(self.loss)), net

    def predict(self, x: np.ndarray, *, batch_size: int | None = 1024) -> np.ndarray:
        """Evaluation-mode outputs, computed ``batch_size`` rows at a time
        (``None``: all at once).  x: (N, *input_shape) -> (N, *output_shape).

        x must be a finite float array of the network's dtype: integer input
        (e.g. uint8 images) is rejected with a TypeError, never cast silently;
        convert it yourself, e.g. ``(x / 255).astype(np.float32)``.  A network
        whose first layer is an Embedding takes integer token ids instead."""
        self._check_x(x)
        x = _plain(x)
        if batch_size is not None:
            batch_size = _check_int("batch_size", batch_size)
        if batch_size is None or len(x) <= batch_size:
            _check_finite("x", x)
            return self._forward(x, EVAL)[0]
        out = np.empty((len(x), *self.output_shape), dtype=self._forward(x[:1], EVAL)[0].dtype)
        for start in range(0, len(x), batch_size):
            chunk = x[start : start + batch_size]
            _check_finite("x", chunk, start)  # per chunk: still in cache for the GEMM
            out[start : start + batch_size] = self._forward(chunk, EVAL)[0]
        return out

    def summary(self) -> Summary:
        """The layer table: each layer, its output shape and parameter count, and
        the total; prints as text, renders as an HTML table in Jupyter."""
        rows: list[tuple[str, str, int | None]] = [
            ("Input", _shape_str((None, *self.input_shape)), None)
        ]
        _summary_rows(rows, self.layers, self.input_shape, "")
        return Summary(repr(self), tuple(rows), sum(p.size for p in self._flat_params()))

    def __repr__(self) -> str:
        n = len(self.layers)
        parts = [
            f"{self.input_shape} -> {self.output_shape}",
            f"{n} layer{'' if n == 1 else 's'}",
            f"{sum(p.size for p in self._flat_params()):,} params",
        ]
        if self.dtype is not None:
            parts.append(str(self.dtype))
        return f"Network({', '.join([*parts, _short_repr(self.loss)])})"

    def _repr_html_(self) -> str:
        return self.summary()._repr_html_()

    def fit(self, *args: Any, **kwargs: Any) -> Any:
        """Not a method (Keras's ``model.fit`` trains in place; a dlfs network never
        changes): raises a TypeError that shows ``dlfs.fit(net, optimizer, x, y, ...)``."""
        raise TypeError(
            "Network.fit must not be used: a dlfs network never changes in place; train with "
            "trained, history = dlfs.fit(net, dlfs.Adam(), x, y, epochs=10) and use `trained`"
        )

    def _classifier(self, what: str) -> str:
        """How this network's outputs become probabilities: "softmax" or "sigmoid"."""
        if isinstance(self.loss, SoftmaxCrossEntropy):
            return "softmax"
        if isinstance(self.loss, BinaryCrossEntropy):
            return "sigmoid"
        raise TypeError(
            f"{what} must be called on a classifier (a network whose loss is "
            f"SoftmaxCrossEntropy or BinaryCrossEntropy); this one's loss is "
            f"{type(self.loss).__name__}, whose outputs are not class scores: use predict(x)"
        )

    def predict_proba(self, x: np.ndarray, *, batch_size: int | None = 1024) -> np.ndarray:
        """Class probabilities in evaluation mode: softmax over the last axis for
        SoftmaxCrossEntropy (N, K) -> (N, K), rows summing to 1; sigmoid(z) for
        BinaryCrossEntropy, same shape as the output.  TypeError for other losses."""
        kind = self._classifier("predict_proba")
        z = self.predict(x, batch_size=batch_size)
        if kind == "sigmoid":
            return _sigmoid(z)
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        e /= e.sum(axis=-1, keepdims=True)
        return e

    def predict_classes(self, x: np.ndarray, *, batch_size: int | None = 1024) -> np.ndarray:
        """Predicted classes as int64: argmax over the last axis, (N, K) -> (N,), for
        SoftmaxCrossEntropy (and any other loss with K > 1 outputs, such as MSE on
        one-hot targets); z > 0 for BinaryCrossEntropy, (N, 1) -> (N,) and
        multi-label (N, K) -> (N, K).  TypeError for a single non-BCE output."""
        if isinstance(self.loss, BinaryCrossEntropy):
            labels = (self.predict(x, batch_size=batch_size) > 0).astype(np.int64)
            return labels[:, 0] if self.output_shape == (1,) else labels
        if not isinstance(self.loss, SoftmaxCrossEntropy) and self.output_shape[-1:] == (1,):
            self._classifier("predict_classes")
        return self.predict(x, batch_size=batch_size).argmax(axis=-1).astype(np.int64)

    def evaluate(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        metric: Metric | Literal["auto"] | None = "auto",
        batch_size: int = 1024,
    ) -> dict[str, float]:
        """Loss and metric on a data set, in evaluation mode:
        ``{"loss": L, "<metric name>": m}`` as plain floats.  ``metric``: "auto"
        (accuracy for classifiers, none for MSE), None (loss only) or a
        callable(pred, target).  x, y as for ``fit``, checked the same way."""
        _check_dataset(self, x, y)
        batch_size = _check_int("batch_size", batch_size)
        metric = _resolve_metric(metric, self.loss)
        loss, score = _evaluate(self, _plain(x), _plain(y), metric, batch_size)
        name = _metric_name(metric)
        return {"loss": loss} if name is None or score is None else {"loss": loss, name: score}


def network(
    key: int | Key,
    input_shape: int | tuple[int, ...],
    layers: Sequence[Layer | LayerSpec],
    loss: Loss,
    *,
    dtype: FloatDType = np.float32,
) -> Network:
    """Build a network, inferring every layer's input size from the one before.

    ``layers`` mixes specs such as ``dense(13, Sigmoid())`` and ready layers
    such as ``ReLU()``; each spec draws its weights from its own sub-key.
    ``input_shape`` is per sample: the network takes x: (N, *input_shape).

    >>> net = dlfs.network(0, 13, [dlfs.dense(13, dlfs.Sigmoid()), dlfs.dense(1)],
    ...                    dlfs.MeanSquaredError())
    >>> net
    Network((13,) -> (1,), 3 layers, 196 params, float32, MeanSquaredError)
    >>> net.predict(np.zeros((4, 13), np.float32)).shape
    (4, 1)
    """
    key = _as_key("key", key)
    shape = _as_shape("input_shape", input_shape)
    dtype = _check_dtype(dtype)
    items = _check_items("layers", layers)
    built, _ = _build_layers(key, shape, items, dtype, "layers", _channels_last_hint(shape))
    net = Network(built, loss, shape)
    _check_head(net)
    return net


def generate(
    net: Network,
    prompt: np.ndarray,
    n_new: int,
    *,
    key: int | Key,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> np.ndarray:
    """Sample ``n_new`` tokens from a language model, one at a time (nanoGPT's
    ``generate``): the network sees the last ``input_shape[0]`` ids (the
    context; a shorter prompt as it is), its logits at the last position are
    divided by ``temperature``, cut to the ``top_k`` largest if given, and
    the next id is drawn from their softmax; it joins the sequence.

    net: ids (N, T) -> logits (N, T, V), in evaluation mode; prompt: integer
    ids (N, T0), T0 >= 1 -> the new ids (N, n_new) int64.  Same key, same
    sample; ``top_k=1`` is greedy decoding.

    >>> net = dlfs.network(0, (8,), [dlfs.tied_embedding(5, 4, [dlfs.positional_embedding(8)])],
    ...                    dlfs.SoftmaxCrossEntropy())
    >>> new = dlfs.generate(net, np.array([[1, 2]]), 10, key=0)
    >>> new.shape, new.dtype, bool((new == dlfs.generate(net, np.array([[1, 2]]), 10, key=0)).all())
    ((1, 10), dtype('int64'), True)
    """
    if not isinstance(net, Network) or not net._takes_ids() or len(net.output_shape) != 2:
        raise TypeError(
            f"net must be a language model: a dlfs.Network from token ids (N, T) to logits "
            f"(N, T, V), got {net!r:.120}"
        )
    context, n_vocab = net.input_shape[0], net.output_shape[-1]
    _check_ids("prompt", prompt, (None, "T"))
    _lookup(np.empty((n_vocab, 0)), prompt, "prompt")  # non-empty, ids in range
    n_new, rng = _check_int("n_new", n_new, low=0), make_rng(key)
    temperature = _check_number("temperature", temperature, low=0.0, low_open=True)
    if top_k is not None:
        top_k = min(_check_int("top_k", top_k), n_vocab)
    seq = prompt.astype(np.int64)
    for _ in range(n_new):
        logits = net._forward(seq[:, -context:], EVAL)[0][:, -1].astype(np.float64)
        logits /= temperature
        if top_k is not None:
            kth = np.partition(logits, -top_k, axis=-1)[:, -top_k, None]
            logits[logits < kth] = -np.inf
        p = _softmax(logits).cumsum(axis=-1)
        u = rng.random((len(seq), 1)) * p[:, -1:]  # inverse CDF, exact at the top
        seq = np.concatenate([seq, np.minimum((p <= u).sum(axis=-1), n_vocab - 1)[:, None]], 1)
    return seq[:, prompt.shape[1] :]


def _check_items(name: str, layers: Any) -> tuple[Any, ...]:
    if not isinstance(layers, (list, tuple)):
        raise TypeError(f"{name} must be a list of layers or specs, got {type(layers).__name__}")
    return tuple(layers)


def _build_layers(
    key: Key,
    shape: tuple[int, ...],
    items: tuple[Any, ...],
    dtype: np.dtype,
    name: str,
    hint: str = "",
) -> tuple[tuple[Any, ...], tuple[int, ...]]:
    """(layers, per-sample output shape) from specs and ready layers: each spec
    draws its weights from its own sub-key of ``key``; ``hint`` is the fix added
    when the first layer refuses the input shape (channels-last images)."""
    built: list[Any] = []
    for i, (item, sub) in enumerate(zip(items, split(key, max(len(items), 1)))):
        if not (isinstance(item, LayerSpec) or _is_layer(item)):
            raise TypeError(
                f"{name}[{i}] must be a layer or a spec such as dlfs.dense(10), got {item!r}"
                + _not_called(item)
            )
        where = f"{name}[{i}] ({type(item).__name__})"
        if not built and hint and isinstance(item, (Conv2DSpec, Conv2D)):
            raise ValueError(f"{where}: input_shape must be channels-first (C, H, W){hint}")
        try:
            if isinstance(item, LayerSpec):  # it has a build method
                new, shape = item.build(sub, shape, dtype)
            else:
                new, shape = (item,), tuple(item.output_shape(shape))
        except ValueError as err:
            raise ValueError(f"{where}: {err}{hint if not built else ''}") from None
        built.extend(new)
    return tuple(built), shape


def _channels_last_hint(input_shape: tuple[int, ...]) -> str:
    """For a first layer that refuses ``input_shape``: the fix if it reads as one
    channels-last image (H, W, C)."""
    shape = input_shape
    if len(shape) != 3 or shape[2] not in (1, 3, 4) or min(shape[:2]) <= 4:
        return ""
    first = (shape[2], shape[0], shape[1])
    return (
        f"; input_shape {shape} looks channels-last (H, W, C): dlfs wants images "
        f"channels-first, input_shape={first}, with x of shape (N, {', '.join(map(str, first))})"
        " (x.transpose(0, 3, 1, 2))"
    )


def _last_layer(layers: Sequence[Any]) -> Any:
    """The last layer that computes something (shape-only layers such as Flatten
    and Dropout skipped), or None."""
    for layer in reversed(layers):
        if not isinstance(layer, (Flatten, Dropout)):
            return layer
    return None


def _check_head(net: Network) -> None:
    """Refuse the Keras reflex of an output activation before a loss that takes
    logits (it trains badly, silently), and softmax over a single output."""
    loss = type(net.loss).__name__
    if not isinstance(net.loss, (SoftmaxCrossEntropy, BinaryCrossEntropy)):
        return
    last = _last_layer(net.layers)
    if isinstance(last, (Sigmoid, Softmax)):
        act, k = type(last).__name__, net.output_shape[-1] if net.output_shape else 1
        raise ValueError(
            f"layers must end in logits for {loss}, but the last layer is {act}(): the "
            f"loss applies the {act.lower()} itself (stably) and works on logits; drop "
            f"the final {act}() (end in dlfs.dense({k}) alone) and use "
            f"net.predict_proba(x) for probabilities"
        )
    if isinstance(net.loss, SoftmaxCrossEntropy) and net.output_shape[-1:] == (1,):
        raise ValueError(
            "layers must end in at least 2 outputs for SoftmaxCrossEntropy (a softmax "
            "over one output is always 1, so nothing trains), got output shape "
            f"{net.output_shape}: use dense(2) with SoftmaxCrossEntropy (labels 0 and 1), "
            "or dense(1) with BinaryCrossEntropy"
        )


# -------------------------------------------------- optimizers and schedules


def _tree_map(f: Callable[..., np.ndarray], *trees: NetParams) -> NetParams:
    """Apply ``f`` leaf-wise over per-layer tuples of arrays."""
    return tuple(tuple(f(*leaves) for leaves in zip(*layer)) for layer in zip(*trees))


def _check_grads_like(grads: Any, params: NetParams, name: str = "grads") -> None:
    """``grads`` must mirror ``params``: same nesting, shapes and dtypes."""
    if not isinstance(grads, tuple) or len(grads) != len(params):
        raise ValueError(f"{name} must be a tuple of {len(params)} per-layer tuples")
    for i, (gs, ps) in enumerate(zip(grads, params)):
        if not isinstance(gs, tuple) or len(gs) != len(ps):
            raise ValueError(f"{name}[{i}] must be a tuple of {len(ps)} arrays, got {gs!r:.80}")
        for j, (g, p) in enumerate(zip(gs, ps)):
            if type(g) is not np.ndarray or g.shape != p.shape or g.dtype != p.dtype:
                raise ValueError(
                    f"{name}[{i}][{j}] must be an array of shape {p.shape} and dtype {p.dtype}, "
                    f"got {getattr(g, 'shape', type(g).__name__)} {getattr(g, 'dtype', '')}"
                )


def _check_params(params: Any) -> None:
    """Parameters as ``Network.params()`` gives them: tuples of float arrays."""
    if not isinstance(params, tuple) or not all(isinstance(layer, tuple) for layer in params):
        raise TypeError(f"params must be a tuple of per-layer tuples, got {params!r:.80}")
    for i, layer in enumerate(params):
        for j, p in enumerate(layer):
            _check_float(f"params[{i}][{j}]", p)


class Schedule(Protocol):
    """A learning-rate schedule: ``lr(t)`` for the update count t = 0, 1, 2, ...
    (defined at t = 0: the first update uses ``lr(0)``).  Every optimizer's
    ``lr`` takes a number or a schedule; ``OptState.lr`` holds the rate of
    the last update.  Any function of the step will do:

    >>> warm = lambda t: 0.1 * min(1.0, (t + 1) / 3)
    >>> opt = dlfs.SGD(lr=warm)
    >>> params = ((np.ones(2),),)
    >>> _, state = opt.update(((np.ones(2),),), opt.init(params), params)
    >>> round(state.lr, 4)
    0.0333
    """

    def __call__(self, step: int, /) -> float: ...


def _check_schedule(name: str, value: Any) -> Any:
    """A learning rate: a non-negative number or a schedule (callable of the step)."""
    if callable(value):
        _check_number(f"{name}(0)", value(0), low=0.0)
        return value
    return _check_number(name, value, low=0.0)


def _lr_at(lr: Any, count: int) -> float:
    if callable(lr):
        return _check_number("learning rate from schedule", lr(count), low=0.0)
    return lr


@attrs.frozen
class Constant:
    """lr(t) = lr.

    >>> schedule = dlfs.Constant(0.1)
    >>> schedule(0), schedule(1000)
    (0.1, 0.1)
    """

    lr: float = attrs.field(converter=lambda v: _check_number("lr", v, low=0.0))

    def __call__(self, step: int) -> float:
        return self.lr


@attrs.frozen
class StepDecay:
    """lr(t) = lr * gamma ** (t // step_size) (PyTorch's ``StepLR``; gamma 0.1).

    >>> schedule = dlfs.StepDecay(0.1, step_size=10)
    >>> [round(schedule(t), 4) for t in (0, 9, 10, 25)]
    [0.1, 0.1, 0.01, 0.001]
    """

    lr: float = attrs.field(converter=lambda v: _check_number("lr", v, low=0.0))
    step_size: int = attrs.field(converter=lambda v: _check_int("step_size", v))
    gamma: float = attrs.field(
        default=0.1, converter=lambda v: _check_number("gamma", v, low=0.0, high=1.0)
    )

    def __call__(self, step: int) -> float:
        return self.lr * self.gamma ** (step // self.step_size)


@attrs.frozen
class ExponentialDecay:
    """lr(t) = lr * gamma ** t.

    >>> schedule = dlfs.ExponentialDecay(1.0, gamma=0.5)
    >>> [schedule(t) for t in range(3)]
    [1.0, 0.5, 0.25]
    """

    lr: float = attrs.field(converter=lambda v: _check_number("lr", v, low=0.0))
    gamma: float = attrs.field(converter=lambda v: _check_number("gamma", v, low=0.0, high=1.0))

    def __call__(self, step: int) -> float:
        return self.lr * self.gamma**step


@attrs.frozen
class LinearDecay:
    """The book's linear decay: lr(t) = lr + (final_lr - lr) * min(t, steps) / steps.

    >>> schedule = dlfs.LinearDecay(0.1, final_lr=0.01, steps=10)
    >>> [round(schedule(t), 4) for t in (0, 5, 10, 20)]
    [0.1, 0.055, 0.01, 0.01]
    """

    lr: float = attrs.field(converter=lambda v: _check_number("lr", v, low=0.0))
    final_lr: float = attrs.field(converter=lambda v: _check_number("final_lr", v, low=0.0))
    steps: int = attrs.field(converter=lambda v: _check_int("steps", v))

    def __call__(self, step: int) -> float:
        return self.lr + (self.final_lr - self.lr) * min(step, self.steps) / self.steps


@attrs.frozen
class CosineDecay:
    """Linear warmup then cosine decay.

    t < warmup: lr(t) = lr (t + 1) / warmup (so step 0 already trains);
    afterwards lr(t) = final_lr + (lr - final_lr) (1 + cos(pi s)) / 2 with
    s = min(t - warmup, steps - warmup) / (steps - warmup).

    >>> schedule = dlfs.CosineDecay(1.0, steps=10, warmup=2)
    >>> [round(schedule(t), 4) for t in (0, 1, 2, 6, 10)]
    [0.5, 1.0, 1.0, 0.5, 0.0]
    """

    lr: float = attrs.field(converter=lambda v: _check_number("lr", v, low=0.0))
    steps: int = attrs.field(converter=lambda v: _check_int("steps", v))
    warmup: int = attrs.field(default=0, converter=lambda v: _check_int("warmup", v, low=0))
    final_lr: float = attrs.field(
        default=0.0, converter=lambda v: _check_number("final_lr", v, low=0.0)
    )

    def __attrs_post_init__(self) -> None:
        if self.warmup >= self.steps:
            raise ValueError(
                f"warmup must be < steps, got warmup={self.warmup}, steps={self.steps}"
            )

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        span = self.steps - self.warmup
        s = min(step - self.warmup, span) / span
        return self.final_lr + (self.lr - self.final_lr) * 0.5 * (1 + math.cos(math.pi * s))


class Optimizer(Protocol):
    """What ``TrainState``, ``fit`` and ``chain`` take as an optimizer: an
    optax-style pair, ``state = opt.init(params)`` and ``new_params, new_state =
    opt.update(grads, state, params)``, pure (nothing is modified in place).

    params, grads: ``NetParams``, one tuple of arrays per layer (grads shaped
    like params).  Every dlfs optimizer is one; so is any object with these
    two methods, e.g. sign descent, p <- p - lr sign(g):

    >>> import attrs
    >>> @attrs.frozen
    ... class SignSGD:
    ...     lr: float = 0.01
    ...     def init(self, params):
    ...         return dlfs.OptState(0, self.lr)
    ...     def update(self, grads, state, params):
    ...         new = tuple(tuple(p - self.lr * np.sign(g) for p, g in zip(ps, gs))
    ...                     for ps, gs in zip(params, grads))
    ...         return new, dlfs.OptState(state.count + 1, self.lr)
    >>> net = dlfs.network(0, 2, [dlfs.dense(1)], dlfs.MeanSquaredError())
    >>> state = dlfs.TrainState.create(net, SignSGD(0.1))
    >>> state = dlfs.train_step(state, (np.ones((4, 2), np.float32), np.ones((4, 1), np.float32)))
    >>> state.opt_state.count, round(abs(float(state.net.layers[0].b[0])), 4)  # b moved by lr
    (1, 0.1)
    """

    def init(self, params: NetParams) -> OptState:
        """The state before the first update (moments at zero, count 0)."""
        ...

    def update(
        self, grads: NetParams, state: OptState, params: NetParams
    ) -> tuple[NetParams, OptState]:
        """(new params, new state) for one step along ``grads``."""
        ...


@attrs.frozen(eq=False)
class OptState(_ArrayRecord):
    """Optimizer state: update count, the learning rate of the last update,
    and per-optimizer moment trees (``slots``, each shaped like the params:
    one tuple of arrays per layer).

    >>> params = ((np.ones((2, 3)), np.zeros(3)),)
    >>> state = dlfs.Adam(1e-3).init(params)
    >>> state.count, state.lr, len(state.slots), state.slots[0][0][0].shape
    (0, 0.001, 2, (2, 3))
    """

    count: int
    lr: float
    slots: tuple[NetParams, ...] = ()


def _decay(grads: NetParams, params: NetParams, wd: float, mask: Any = "all") -> NetParams:
    """L2 weight decay: g + wd * p on the arrays ``mask`` picks (skipped when wd == 0)."""
    if not wd:
        return grads
    return _tree_map(lambda g, p: g + p * wd if _decays(mask, p) else g, grads, params)


DecayMask = str | Callable[[np.ndarray], bool]  # "all", "matrices" or f(p) -> bool


def _check_decay_mask(instance: Any, attribute: Any, mask: Any) -> None:
    if mask not in ("all", "matrices") and (isinstance(mask, str) or not callable(mask)):
        raise ValueError(
            f"weight_decay_mask must be 'all', 'matrices' (arrays with ndim >= 2) or a "
            f"function of the array returning True where it decays, got {mask!r}"
        )


def _decays(mask: Any, p: np.ndarray) -> bool:
    """Whether weight decay applies to the parameter array ``p`` under ``mask``."""
    if mask == "all":
        return True
    if mask == "matrices":
        return p.ndim >= 2
    return bool(mask(p))


def _lr_field(default: float) -> Any:
    return attrs.field(default=default, converter=lambda v: _check_schedule("lr", v))


def _wd_field() -> Any:
    return attrs.field(default=0.0, converter=lambda v: _check_number("weight_decay", v, low=0.0))


def _check_state(opt: Any, state: Any, params: NetParams, n_slots: int) -> None:
    """``state`` must be an OptState with ``n_slots`` moment trees shaped like ``params``."""
    if not isinstance(state, OptState):
        raise TypeError(
            f"state must be the OptState from {type(opt).__name__}.init, got {type(state).__name__}"
        )
    if not isinstance(state.slots, tuple) or len(state.slots) != n_slots:
        raise ValueError(
            f"state must be the OptState from {type(opt).__name__}.init ({n_slots} moment "
            f"slots), got {len(state.slots) if isinstance(state.slots, tuple) else state.slots!r}"
        )
    for s, slot in enumerate(state.slots):
        _check_grads_like(slot, params, f"state.slots[{s}]")


def _zero_slots(params: NetParams, n: int) -> tuple[NetParams, ...]:
    """``n`` independent read-only zero trees shaped like ``params`` (moments at t = 0)."""
    _check_params(params)
    return tuple(_tree_map(lambda p: _freeze_new(np.zeros_like(p)), params) for _ in range(n))


def _eps_field(default: float) -> Any:
    return attrs.field(
        default=default, converter=lambda v: _check_number("eps", v, low=0.0, low_open=True)
    )


# Every dlfs optimizer's public ``update`` checks its inputs (``_check_update``)
# and then runs ``_apply``, the arithmetic alone.  A training step whose state is
# known to fit (see TrainState) calls ``_apply`` directly, with ``owned`` True:
# the gradients are fresh arrays that the step made and no one else holds, so
# SGD may write the new parameters into them.


def _check_update(
    opt: Any, grads: NetParams, state: OptState, params: NetParams, n_slots: int
) -> None:
    """Validate an update's inputs: params, the state's moment trees, the grads."""
    _check_params(params)
    _check_state(opt, state, params, n_slots)
    _check_grads_like(grads, params)


def _start(
    opt: Any, grads: NetParams, state: OptState, params: NetParams, *, l2: bool = True
) -> tuple[float, NetParams]:
    """The step's lr and the grads, with L2 weight decay added (g + wd p) when ``l2``."""
    lr = _lr_at(opt.lr, state.count)
    return lr, (_decay(grads, params, opt.weight_decay) if l2 else grads)


def _finish(new_params: NetParams) -> NetParams:
    return _tree_map(_freeze_new, new_params)


class _Optimizer:
    """Base of the dlfs optimizers: their one public ``update``, which checks its
    inputs (params, ``_N_SLOTS`` moment trees in the state, grads shaped like
    params) and then runs the subclass's ``_apply``, the arithmetic alone; and
    Keras's ``learning_rate=`` gets a message naming ``lr`` (the book's and
    PyTorch's name) instead of Python's."""

    __slots__ = ()
    _N_SLOTS: ClassVar[int] = 0  # moment trees in the state (Adam's m and v: 2)

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if "learning_rate" in kwargs:
            rate = kwargs["learning_rate"]
            raise TypeError(
                f"{cls.__name__} must be given lr=, not learning_rate= (dlfs names it as the "
                f"book and PyTorch do): dlfs.{cls.__name__}(lr={rate!r}), or "
                f"dlfs.{cls.__name__}({rate!r})"
            )
        return super().__new__(cls)

    def update(
        self, grads: NetParams, state: OptState, params: NetParams
    ) -> tuple[NetParams, OptState]:
        """Returns (new params, new state)."""
        _check_update(self, grads, state, params, self._N_SLOTS)
        return self._apply(grads, state, params, False)

    def _apply(
        self, grads: NetParams, state: OptState, params: NetParams, owned: bool
    ) -> tuple[NetParams, OptState]:
        raise NotImplementedError


def _sgd_layer(ps: Params, gs: Params, lr: float, owned: bool) -> Params:
    """p - g * lr for each of a layer's arrays, read-only: written into g when
    ``owned`` (no new array), else into the fresh array g * lr."""
    new = []
    for p, g in zip(ps, gs):
        step = np.multiply(g, lr, g) if owned else g * lr
        np.subtract(p, step, step)
        step.setflags(write=False)
        new.append(step)
    return tuple(new)


@attrs.frozen
class SGD(_Optimizer):
    """Plain SGD (the book's): p <- p - lr * (g + wd * p).  ``lr`` may be a schedule.

    params, grads: one tuple of arrays per layer (``Network.params()``'s
    structure), grads shaped like params.

    >>> params, grads = ((np.array([1.0, -1.0]),),), ((np.array([0.5, 0.5]),),)
    >>> opt = dlfs.SGD(lr=0.1)
    >>> new, state = opt.update(grads, opt.init(params), params)
    >>> new[0][0].tolist(), state.count
    ([0.95, -1.05], 1)
    """

    lr: float | Schedule = _lr_field(0.01)
    weight_decay: float = _wd_field()

    def init(self, params: NetParams) -> OptState:
        """No moments: ``OptState(0, lr(0))``."""
        return OptState(0, _lr_at(self.lr, 0))

    def _apply(
        self, grads: NetParams, state: OptState, params: NetParams, owned: bool
    ) -> tuple[NetParams, OptState]:
        lr, decayed = _start(self, grads, state, params)
        owned = owned or decayed is not grads  # g + wd p: fresh arrays of ours
        new = tuple([_sgd_layer(ps, gs, lr, owned) for ps, gs in zip(params, decayed)])
        return new, OptState(state.count + 1, lr)


@attrs.frozen
class Momentum(_Optimizer):
    """SGD with momentum (PyTorch): b <- mu b + g (b_1 = g), p <- p - lr b;
    Nesterov: p <- p - lr (g + mu b).  The velocity b is shaped like the params.

    >>> params, grads = ((np.array([1.0, -1.0]),),), ((np.array([0.5, 0.5]),),)
    >>> opt = dlfs.Momentum(lr=0.1, momentum=0.9)
    >>> state = opt.init(params)
    >>> for _ in range(2):
    ...     params, state = opt.update(grads, state, params)
    >>> np.round(params[0][0], 4).tolist()  # steps of 0.05, then 0.095
    [0.855, -1.145]
    """

    lr: float | Schedule = _lr_field(0.01)
    momentum: float = attrs.field(
        default=0.9,
        converter=lambda v: _check_number("momentum", v, low=0.0, high=1.0, high_open=True),
    )
    weight_decay: float = _wd_field()
    nesterov: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    _N_SLOTS: ClassVar[int] = 1

    def init(self, params: NetParams) -> OptState:
        """Velocity b = 0."""
        return OptState(0, _lr_at(self.lr, 0), _zero_slots(params, 1))

    def _apply(
        self, grads: NetParams, state: OptState, params: NetParams, owned: bool
    ) -> tuple[NetParams, OptState]:
        lr, grads = _start(self, grads, state, params)
        mu = self.momentum
        b = _tree_map(lambda b, g: b * mu + g, state.slots[0], grads)
        step = _tree_map(lambda g, b: g + b * mu, grads, b) if self.nesterov else b
        new = _finish(_tree_map(lambda p, s: p - s * lr, params, step))
        return new, OptState(state.count + 1, lr, (_finish(b),))


def Nesterov(  # noqa: N802
    lr: float | Schedule = 0.01, momentum: float = 0.9, weight_decay: float = 0.0
) -> Momentum:
    """Nesterov momentum: ``Momentum(..., nesterov=True)``; b <- mu b + g,
    p <- p - lr (g + mu b).  params, grads: one tuple of arrays per layer,
    grads and b shaped like params.

    >>> params, grads = ((np.array([1.0, -1.0]),),), ((np.array([0.5, 0.5]),),)
    >>> opt = dlfs.Nesterov(lr=0.1, momentum=0.9)
    >>> new, _ = opt.update(grads, opt.init(params), params)
    >>> np.round(new[0][0], 4).tolist()  # a step of 0.1 * (0.5 + 0.9 * 0.5)
    [0.905, -1.095]
    """
    return Momentum(lr, momentum, weight_decay, nesterov=True)


@attrs.frozen
class AdaGrad(_Optimizer):
    """AdaGrad (PyTorch): s <- s + g^2 (s_0 = 0), p <- p - lr g / (sqrt(s) + eps).

    s is shaped like the params; params and grads as for ``SGD``.

    >>> params, grads = ((np.array([1.0, -1.0]),),), ((np.array([0.5, 0.5]),),)
    >>> opt = dlfs.AdaGrad(lr=0.1)
    >>> new, _ = opt.update(grads, opt.init(params), params)
    >>> np.round(new[0][0], 4).tolist()  # the first step is lr sign(g)
    [0.9, -1.1]
    """

    lr: float | Schedule = _lr_field(0.01)
    eps: float = _eps_field(1e-10)
    weight_decay: float = _wd_field()
    _N_SLOTS: ClassVar[int] = 1

    def init(self, params: NetParams) -> OptState:
        """Sum of squares s = 0."""
        return OptState(0, _lr_at(self.lr, 0), _zero_slots(params, 1))

    def _apply(
        self, grads: NetParams, state: OptState, params: NetParams, owned: bool
    ) -> tuple[NetParams, OptState]:
        lr, grads = _start(self, grads, state, params)
        s = _tree_map(lambda s, g: s + g * g, state.slots[0], grads)
        new = _finish(
            _tree_map(lambda p, g, s: p - g * lr / (np.sqrt(s) + self.eps), params, grads, s)
        )
        return new, OptState(state.count + 1, lr, (_finish(s),))


@attrs.frozen
class RMSProp(_Optimizer):
    """RMSProp (PyTorch, no bias correction): v <- a v + (1 - a) g^2,
    p <- p - lr g / (sqrt(v) + eps).  v is shaped like the params; params
    and grads as for ``SGD``.

    >>> params, grads = ((np.array([1.0, -1.0]),),), ((np.array([0.5, 0.5]),),)
    >>> opt = dlfs.RMSProp(lr=0.01)
    >>> new, _ = opt.update(grads, opt.init(params), params)
    >>> np.round(new[0][0], 4).tolist()  # first step lr / sqrt(1 - a) = 10 lr: no bias correction
    [0.9, -1.1]
    """

    lr: float | Schedule = _lr_field(0.01)
    alpha: float = attrs.field(
        default=0.99, converter=lambda v: _check_number("alpha", v, low=0.0, high=1.0)
    )
    eps: float = _eps_field(1e-8)
    weight_decay: float = _wd_field()
    _N_SLOTS: ClassVar[int] = 1

    def init(self, params: NetParams) -> OptState:
        """Square average v = 0."""
        return OptState(0, _lr_at(self.lr, 0), _zero_slots(params, 1))

    def _apply(
        self, grads: NetParams, state: OptState, params: NetParams, owned: bool
    ) -> tuple[NetParams, OptState]:
        lr, grads = _start(self, grads, state, params)
        a = self.alpha
        v = _tree_map(lambda v, g: v * a + g * g * (1 - a), state.slots[0], grads)
        new = _finish(
            _tree_map(lambda p, g, v: p - g * lr / (np.sqrt(v) + self.eps), params, grads, v)
        )
        return new, OptState(state.count + 1, lr, (_finish(v),))


def _adam_step(
    opt: Any, lr: float, grads: NetParams, state: OptState, params: NetParams
) -> tuple[NetParams, OptState]:
    """Adam's moments and step: p - lr/(1-b1^t) m / (sqrt(v)/sqrt(1-b2^t) + eps)."""
    t = state.count + 1
    step_size, root_c2 = lr / (1 - opt.b1**t), math.sqrt(1 - opt.b2**t)
    new, ms, vs = [], [], []
    for layer in zip(params, grads, *state.slots):
        updated = [_adam_array(opt, step_size, root_c2, *arrays) for arrays in zip(*layer)]
        new.append(tuple(u[0] for u in updated))
        ms.append(tuple(u[1] for u in updated))
        vs.append(tuple(u[2] for u in updated))
    return tuple(new), OptState(t, lr, (tuple(ms), tuple(vs)))


def _adam_array(
    opt: Any,
    step_size: float,
    root_c2: float,
    p: np.ndarray,
    g: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One array's (p, m, v) after the step, read-only: the formula's operations in
    its order, each in place on a fresh temporary (3 new arrays and 3 scratch, not 13)."""
    m = m * opt.b1
    m += g * (1 - opt.b1)
    v = v * opt.b2
    g2 = g * g
    g2 *= 1 - opt.b2
    v += g2
    step = np.sqrt(v)
    step /= root_c2
    step += opt.eps
    np.divide(m * step_size, step, out=step)
    np.subtract(p, step, out=step)
    return _freeze_new(step), _freeze_new(m), _freeze_new(v)


def _beta_field(name: str, default: float) -> Any:
    return attrs.field(
        default=default,
        converter=lambda v: _check_number(name, v, low=0.0, high=1.0, high_open=True),
    )


@attrs.frozen
class Adam(_Optimizer):
    """Adam (PyTorch): m <- b1 m + (1-b1) g, v <- b2 v + (1-b2) g^2,
    p <- p - lr/(1-b1^t) m / (sqrt(v)/sqrt(1-b2^t) + eps).  ``weight_decay``
    is L2 (adds wd p to g) unless ``decoupled``, which is AdamW: p <- p (1 - lr wd)
    before the Adam step.  ``weight_decay_mask`` says which arrays decay: "all",
    "matrices" (ndim >= 2: weights and embeddings, not biases or norm scales,
    nanoGPT's and optax's usual rule) or a function ``f(p) -> bool``.  m and v
    are shaped like the params; params and grads as for ``SGD``.

    >>> params, grads = ((np.array([1.0, -1.0]),),), ((np.array([0.5, 0.5]),),)
    >>> opt = dlfs.Adam(lr=0.1)
    >>> new, state = opt.update(grads, opt.init(params), params)
    >>> np.round(new[0][0], 4).tolist(), state.count  # the first step is lr sign(g)
    ([0.9, -1.1], 1)
    """

    lr: float | Schedule = _lr_field(1e-3)
    b1: float = _beta_field("b1", 0.9)
    b2: float = _beta_field("b2", 0.999)
    eps: float = _eps_field(1e-8)
    weight_decay: float = _wd_field()
    decoupled: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    weight_decay_mask: DecayMask = attrs.field(default="all", validator=_check_decay_mask)
    _N_SLOTS: ClassVar[int] = 2

    def init(self, params: NetParams) -> OptState:
        """Moments m = v = 0."""
        return OptState(0, _lr_at(self.lr, 0), _zero_slots(params, 2))

    def _apply(
        self, grads: NetParams, state: OptState, params: NetParams, owned: bool
    ) -> tuple[NetParams, OptState]:
        lr, grads = _start(self, grads, state, params, l2=False)
        wd, mask = self.weight_decay, self.weight_decay_mask
        if wd and self.decoupled:
            shrink = 1 - lr * wd
            params = _tree_map(lambda p: p * shrink if _decays(mask, p) else p, params)
        else:
            grads = _decay(grads, params, wd, mask)
        return _adam_step(self, lr, grads, state, params)


def AdamW(  # noqa: N802
    lr: float | Schedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    weight_decay_mask: DecayMask = "all",
) -> Adam:
    """AdamW (PyTorch): p <- p (1 - lr wd) first, then the Adam step (default wd 0.01);
    ``Adam(..., decoupled=True)``; ``weight_decay_mask`` as for ``Adam``
    ("matrices": nanoGPT's groups, decay on arrays with ndim >= 2 only).
    params, grads: one tuple of arrays per layer, grads, m and v shaped like params.

    >>> params, grads = ((np.array([1.0, -1.0]),),), ((np.array([0.5, 0.5]),),)
    >>> opt = dlfs.AdamW(lr=0.1)
    >>> new, _ = opt.update(grads, opt.init(params), params)
    >>> np.round(new[0][0], 4).tolist()  # shrunk by 1 - 0.1 * 0.01, then moved by 0.1
    [0.899, -1.099]
    """
    return Adam(lr, b1, b2, eps, weight_decay, decoupled=True, weight_decay_mask=weight_decay_mask)


class GradientTransform(Protocol):
    """What ``chain`` takes before the optimizer: ``transform(grads, params) ->
    grads``, a new gradient tree shaped like ``grads`` (``ClipByGlobalNorm``,
    ``WeightDecay``, ``AllReduce``).

    >>> grads = ((np.array([3.0, 4.0]),),)
    >>> dlfs.WeightDecay(0.5)(grads, grads)[0][0].tolist()  # g + 0.5 p, here with p = g
    [4.5, 6.0]
    """

    def __call__(self, grads: NetParams, params: NetParams, /) -> NetParams: ...


class Constraint(Protocol):
    """What ``chain`` takes after the optimizer: ``constraint(params) -> params``,
    applied to the new parameters of every step (``MaxNorm``); the result has
    the structure and shapes of ``params`` (one tuple of arrays per layer).

    >>> params = ((np.array([[3.0], [4.0]]),),)
    >>> np.round(dlfs.MaxNorm(1.0)(params)[0][0], 4).tolist()
    [[0.6], [0.8]]
    """

    def __call__(self, params: NetParams, /) -> NetParams: ...


@attrs.frozen
class ClipByGlobalNorm:
    """Gradient transform: g <- g * min(1, max_norm / (||g|| + 1e-6)), ||g|| over all arrays.

    grads, params: one tuple of arrays per layer -> grads of the same structure.

    >>> grads = ((np.array([3.0, 4.0]),),)
    >>> np.round(dlfs.ClipByGlobalNorm(1.0)(grads, grads)[0][0], 4).tolist()  # norm 5 -> 1
    [0.6, 0.8]
    """

    max_norm: float = attrs.field(
        converter=lambda v: _check_number("max_norm", v, low=0.0, low_open=True)
    )

    def __call__(self, grads: NetParams, params: NetParams) -> NetParams:
        """Scaled grads (the same tree when the norm is within ``max_norm``)."""
        _check_params(params)
        _check_grads_like(grads, params)
        return self._apply(grads, params)

    def _apply(self, grads: NetParams, params: NetParams) -> NetParams:
        norm = math.sqrt(sum(float(np.vdot(g, g)) for layer in grads for g in layer))
        scale = min(1.0, self.max_norm / (norm + 1e-6))
        return grads if scale == 1.0 else _tree_map(lambda g: g * scale, grads)


@attrs.frozen
class WeightDecay:
    """Gradient transform: L2 weight decay g <- g + wd * p.

    grads, params: one tuple of arrays per layer -> grads of the same structure.

    >>> params, grads = ((np.array([1.0, -1.0]),),), ((np.array([0.5, 0.5]),),)
    >>> dlfs.WeightDecay(0.1)(grads, params)[0][0].tolist()
    [0.6, 0.4]
    """

    weight_decay: float = attrs.field(converter=lambda v: _check_number("weight_decay", v, low=0.0))

    def __call__(self, grads: NetParams, params: NetParams) -> NetParams:
        """g + wd * p, leaf by leaf."""
        _check_params(params)
        _check_grads_like(grads, params)
        return self._apply(grads, params)

    def _apply(self, grads: NetParams, params: NetParams) -> NetParams:
        return _decay(grads, params, self.weight_decay)


class Comm(Protocol):
    """What dlfs uses of an MPI communicator (mpi4py's ``MPI.COMM_WORLD`` is one;
    dlfs imports no MPI): ``Allreduce(sendbuf, recvbuf)`` sums ``sendbuf``
    over the ranks into ``recvbuf`` (mpi4py's default op, ``MPI.SUM``; both
    contiguous arrays of one shape and dtype), ``Get_rank()`` this process's
    rank r in [0, R), ``Get_size()`` the number of ranks R.

    >>> class OneRank:  # a stand-in for a single process
    ...     def Allreduce(self, sendbuf, recvbuf): recvbuf[...] = sendbuf
    ...     def Get_rank(self): return 0
    ...     def Get_size(self): return 1
    >>> dlfs.shard(10, OneRank().Get_rank(), OneRank().Get_size())
    slice(0, 10, None)
    """

    def Allreduce(self, sendbuf: Any, recvbuf: Any, /) -> Any:  # noqa: N802 (mpi4py's name)
        """Sum ``sendbuf`` over all ranks into ``recvbuf``."""
        ...

    def Get_rank(self) -> int:  # noqa: N802 (mpi4py's name)
        """This process's rank, 0 <= rank < size."""
        ...

    def Get_size(self) -> int:  # noqa: N802 (mpi4py's name)
        """The number of ranks."""
        ...


# An MPI communicator is duck-typed (see ``Comm``): dlfs imports no MPI.
_COMM_METHODS = ("Allreduce", "Get_rank", "Get_size")


def _check_comm(comm: Any) -> tuple[int, int]:
    """(rank, size) of an MPI-like communicator, checked."""
    missing = [m for m in _COMM_METHODS if not callable(getattr(comm, m, None))]
    if missing:
        raise TypeError(
            "comm must be an MPI communicator with Allreduce, Get_rank and Get_size "
            f"(e.g. mpi4py's MPI.COMM_WORLD), got {type(comm).__name__} without "
            f"{', '.join(missing)}"
        )
    rank, size = comm.Get_rank(), comm.Get_size()
    ints = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (rank, size))
    if not ints or not 0 <= rank < size:
        raise ValueError(
            f"comm must report ints 0 <= Get_rank() < Get_size(), got rank {rank!r} of {size!r}"
        )
    return int(rank), int(size)


def _all_reduce(comm: Any, arrays: Sequence[np.ndarray], divide_by: int = 1) -> list[np.ndarray]:
    """Sum ``arrays`` over the ranks (then divide by ``divide_by``) in ONE
    ``comm.Allreduce`` call: they travel packed in one contiguous buffer of
    their common dtype and come back as read-only views of the result."""
    if not arrays:
        return []
    send = np.concatenate([a.ravel() for a in arrays])
    recv = np.empty_like(send)
    comm.Allreduce(send, recv)
    if divide_by != 1:
        recv /= divide_by  # our own fresh buffer; / 2 is exact
    recv.setflags(write=False)
    out, start = [], 0
    for a in arrays:
        part = recv[start : start + a.size].reshape(a.shape).astype(a.dtype, copy=False)
        part.setflags(write=False)  # a view of recv, or a copy when dtypes were mixed
        out.append(part)
        start += a.size
    return out


def _unflatten(leaves: Sequence[np.ndarray], like: NetParams) -> NetParams:
    """Per-layer tuples shaped like ``like`` from its leaves in order."""
    it = iter(leaves)
    return tuple(tuple(next(it) for _ in layer) for layer in like)


@attrs.frozen(eq=False)  # communicators need not be hashable: compare by identity
class AllReduce:
    """Gradient transform for data-parallel training: g <- (1/R) sum_r g_r, the
    mean of the gradients of the R ranks of ``comm`` (the convention of
    Horovod and PyTorch's DistributedDataParallel).

    ``comm`` is an MPI communicator such as mpi4py's ``MPI.COMM_WORLD``,
    duck-typed: ``Allreduce(sendbuf, recvbuf)`` must sum (mpi4py's default
    op, ``MPI.SUM``), plus ``Get_rank()`` and ``Get_size()``; dlfs imports no
    MPI.  Every update makes ONE Allreduce call: all gradient arrays packed
    into one contiguous buffer of their dtype (float32 stays float32).  It
    must be the first element of ``chain`` so clipping, weight decay and the
    optimizer see the averaged gradient, identical on every rank.  With equal
    shards per rank that is all data parallelism needs; ``data_parallel_step``
    also weights unequal shards so the average is the global batch's mean
    gradient.  grads: per-layer tuples like params -> the same structure.

    >>> class OneRank:  # a stand-in for mpi4py's MPI.COMM_WORLD in a single process
    ...     def Allreduce(self, sendbuf, recvbuf): recvbuf[...] = sendbuf
    ...     def Get_rank(self): return 0
    ...     def Get_size(self): return 1
    >>> opt = dlfs.chain(dlfs.AllReduce(OneRank()), dlfs.SGD(0.1))
    >>> grads = ((np.array([1.0, 2.0]),),)
    >>> dlfs.AllReduce(OneRank())(grads, grads)[0][0].tolist()  # the mean over one rank
    [1.0, 2.0]
    """

    comm: Comm = attrs.field(validator=lambda _self, _attr, comm: _check_comm(comm))

    def __call__(self, grads: NetParams, params: NetParams) -> NetParams:
        """The rank-averaged grads (read-only views of one buffer)."""
        _check_params(params)
        _check_grads_like(grads, params)
        return self._apply(grads, params)

    def _apply(self, grads: NetParams, params: NetParams) -> NetParams:
        _, size = _check_comm(self.comm)
        leaves = [g for layer in grads for g in layer]
        return _unflatten(_all_reduce(self.comm, leaves, divide_by=size), grads)


def _max_norm(w: np.ndarray, c: float) -> np.ndarray:
    """w with each unit's incoming weights (a column of (D_in, D_out), a filter of
    (C_out, C_in, kh, kw)) rescaled to norm <= c; w.ndim >= 2."""
    axes = (0,) if w.ndim == 2 else tuple(range(1, w.ndim))
    norms = np.sqrt((w * w).sum(axis=axes, keepdims=True))
    return np.where(norms > c, w * (c / np.maximum(norms, c)), w)


@attrs.frozen
class MaxNorm:
    """Parameter constraint (the dropout paper's max-norm): every unit's incoming
    weight vector is rescaled to norm <= c.  For a Dense w (D_in, D_out) that is
    each column; for a kernel (C_out, C_in, kh, kw) each output channel.
    Biases and other 1-D arrays are left alone; columns within c stay bit-identical.

    >>> params = ((np.array([[3.0, 0.3], [4.0, 0.4]]), np.array([10.0, 10.0])),)
    >>> w, b = dlfs.MaxNorm(1.0)(params)[0]
    >>> np.round(w, 4).tolist(), b.tolist()  # column 0 had norm 5, column 1 norm 0.5
    ([[0.6, 0.3], [0.8, 0.4]], [10.0, 10.0])
    """

    c: float = attrs.field(converter=lambda v: _check_number("c", v, low=0.0, low_open=True))

    def __call__(self, params: NetParams) -> NetParams:
        """The constrained params (arrays within ``c`` are returned as they are)."""
        _check_params(params)
        return self._apply(params)

    def _apply(self, params: NetParams) -> NetParams:
        return _tree_map(lambda w: _freeze_new(_max_norm(w, self.c)) if w.ndim >= 2 else w, params)


def _is_optimizer(obj: Any) -> TypeGuard[Optimizer]:
    return not isinstance(obj, type) and hasattr(obj, "init") and hasattr(obj, "update")


@attrs.frozen
class Chain:
    """Gradient transforms, then one optimizer, then parameter constraints:
    what ``chain`` returns.  update: g -> before[-1](...before[0](g)) ->
    optimizer step -> after[0](...) on the new params; grads and params are
    one tuple of arrays per layer, grads shaped like params.

    The state is the optimizer's own (so ``state.lr`` stays readable).

    >>> opt = dlfs.chain(dlfs.ClipByGlobalNorm(1.0), dlfs.SGD(0.1))
    >>> opt.before, opt.optimizer, opt.after
    ((ClipByGlobalNorm(max_norm=1.0),), SGD(lr=0.1, weight_decay=0.0), ())
    """

    before: tuple[GradientTransform, ...] = attrs.field(converter=tuple)
    optimizer: Optimizer
    after: tuple[Constraint, ...] = attrs.field(converter=tuple)

    @property
    def lr(self) -> float | Schedule:
        """The inner optimizer's ``lr`` (dlfs's optimizers have one; the protocol asks none)."""
        inner: Any = self.optimizer
        return inner.lr

    def init(self, params: NetParams) -> OptState:
        """The inner optimizer's state."""
        return self.optimizer.init(params)

    def update(
        self, grads: NetParams, state: OptState, params: NetParams
    ) -> tuple[NetParams, OptState]:
        """Transform grads, step, constrain the new params."""
        _check_grads_like(grads, params)
        for transform in self.before:
            grads = transform(grads, params)
        new, state = self.optimizer.update(grads, state, params)
        for constraint in self.after:
            new = constraint(new)
        return new, state

    def _apply(
        self, grads: NetParams, state: OptState, params: NetParams, owned: bool
    ) -> tuple[NetParams, OptState]:
        """``update`` without the checks, for a chain of dlfs's own parts."""
        own: Any = self  # all of its parts are dlfs's own, with their private _apply
        for transform in own.before:
            grads = transform._apply(grads, params)
            owned = owned and type(transform) is not AllReduce  # it gives read-only views
        new, state = own.optimizer._apply(grads, state, params, owned)
        for constraint in own.after:
            new = constraint._apply(new)
        return new, state


def chain(*parts: Optimizer | GradientTransform | Constraint) -> Chain:
    """``chain(ClipByGlobalNorm(1.0), Adam(1e-3), MaxNorm(3.0))``: exactly one
    optimizer; gradient transforms before it (``AllReduce`` only first),
    constraints after it.  Itself an optimizer: init/update on one tuple of
    arrays per layer, grads shaped like params, as ``SGD``.

    >>> opt = dlfs.chain(dlfs.ClipByGlobalNorm(1.0), dlfs.SGD(0.1), dlfs.MaxNorm(3.0))
    >>> params, grads = ((np.array([1.0, 1.0]),),), ((np.array([30.0, 40.0]),),)
    >>> new, state = opt.update(grads, opt.init(params), params)
    >>> np.round(new[0][0], 4).tolist()  # the gradient clipped to norm 1 first
    [0.94, 0.92]
    """
    found = [i for i, p in enumerate(parts) if _is_optimizer(p)]
    if len(found) != 1:
        raise ValueError(f"chain needs exactly one optimizer, got {len(found)}")
    i = found[0]
    before, after = parts[:i], parts[i + 1 :]
    for j, p in enumerate(before):
        if not isinstance(p, (AllReduce, ClipByGlobalNorm, WeightDecay)):
            raise TypeError(f"before the optimizer, chain takes gradient transforms, got {p!r}")
        if isinstance(p, AllReduce) and j > 0:
            raise ValueError(
                f"AllReduce must be the first element of chain (transforms after it see the "
                f"averaged gradient), got it at position {j}"
            )
    for p in after:
        if not isinstance(p, MaxNorm):
            raise TypeError(
                f"after the optimizer, chain takes constraints such as MaxNorm, got {p!r}"
            )
    # each part's kind was checked above
    return Chain(
        cast(tuple[GradientTransform, ...], before),
        cast(Optimizer, parts[i]),
        cast(tuple[Constraint, ...], after),
    )


# ------------------------------------------------------------------ training


# numpy takes every array from malloc.  glibc's malloc hands out blocks above
# its mmap threshold (128 KiB at first) as fresh pages from the system and
# returns them when freed, so a step whose activations are such blocks faults
# in all their pages again, every step; the threshold rises to the size of a
# block above it that is freed, up to 32 MiB.  Freeing one block just under
# that ceiling at import lets malloc keep and reuse blocks up to that size.
# Measured on the baby GPT of benchmarks/bench_gpt.py, one thread: 12,097 page
# faults and 91 ms per step without it (weights loaded from an .npz first),
# none and 64 ms with it.  Under another malloc it is one allocation that does nothing.
_MALLOC_KEEP = 31 << 20  # under the ceiling with malloc's header and page rounding
np.empty(_MALLOC_KEEP, np.uint8)  # allocated and freed at once, never touched


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN/inf.  ``network`` is the last finite one;
    from ``fit`` also ``history``, ``epoch`` and ``step``.

    >>> state = dlfs.TrainState.create(
    ...     dlfs.network(0, 2, [dlfs.dense(1)], dlfs.MeanSquaredError()), dlfs.SGD(0.1)
    ... )
    >>> x, y = np.array([[np.nan, 1.0]], np.float32), np.zeros((1, 1), np.float32)
    >>> try:
    ...     dlfs.train_step(state, (x, y))
    ... except dlfs.NonFiniteError as err:
    ...     print(err, "/", err.network is state.net)
    loss became NaN/inf at step 0 / True
    """

    def __init__(
        self,
        message: str,
        *,
        network: Network | None = None,
        history: History | None = None,
        epoch: int | None = None,
        step: int | None = None,
    ) -> None:
        super().__init__(message)
        self.network = network
        self.history = history
        self.epoch = epoch
        self.step = step


@attrs.frozen(eq=False)
class TrainState:
    """The carry of ``train_step``: network, optimizer and its state, the step
    key, the global step count and the running loss of the current epoch.

    A state that ``TrainState.create`` or a step made is known to fit (the
    optimizer state matches the network's parameters; network and optimizer
    are dlfs's own): its steps skip the optimizer's input checks.  Any other
    (built by hand, ``attrs.evolve``) is checked in full at its first step.

    >>> net = dlfs.network(0, 2, [dlfs.dense(1)], dlfs.MeanSquaredError())
    >>> state = dlfs.TrainState.create(net, dlfs.SGD(0.1), key=0)
    >>> x, y = np.ones((4, 2), np.float32), np.ones((4, 1), np.float32)
    >>> new = dlfs.train_step(state, (x, y))
    >>> new.step, new.seen, new.net is net, state.step  # a new state; the old one is intact
    (1, 4, False, 0)
    """

    net: Network
    optimizer: Optimizer
    opt_state: OptState
    key: Key = attrs.field(converter=lambda k: _as_key("key", k))
    step: int = 0
    loss_sum: float = 0.0
    seen: int = 0
    # The trusted step (commit 8a80842: no optimizer checks, records renewed without
    # converters, fused losses, in-place ReLU) took bench_tiny's 8-8-8-4 net from
    # 112 to 75-80 us per step (README's tiny-network figures, before and after).
    _fits: bool = attrs.field(default=False, init=False, repr=False)

    @classmethod
    def create(cls, net: Network, optimizer: Optimizer, key: int | Key = 0) -> TrainState:
        """A fresh state: ``optimizer.init(net.params())``, step 0."""
        if not isinstance(net, Network):
            raise TypeError(f"net must be a dlfs.Network, got {type(net).__name__}")
        if not _is_optimizer(optimizer):
            raise TypeError(
                f"optimizer must have init/update (e.g. dlfs.SGD(0.01)), got {optimizer!r}"
                + _not_called(optimizer)
            )
        state = cls(net, optimizer, optimizer.init(net.params()), key)
        object.__setattr__(state, "_fits", _own_parts(net, optimizer))  # init's state fits
        return state

    @property
    def mean_loss(self) -> float:
        """Mean training loss per sample over the steps since ``loss_sum`` was last
        reset (``train_epoch`` resets it at the start of each epoch; a bare
        ``reduce(train_step, ...)`` keeps accumulating).  NaN before any step."""
        return self.loss_sum / self.seen if self.seen else math.nan


def _all_layers(layers: Sequence[Any]) -> list[Any]:
    """The layers, each container's sub-layers after it, at any depth."""
    found = []
    for layer in layers:
        found.append(layer)
        if isinstance(layer, _CHAINS):
            found += _all_layers(layer.layers)
    return found


def _own_parts(net: Network, optimizer: Any) -> bool:
    """Whether the network, its loss, its layers and the optimizer (a chain's
    every part) are dlfs's own, so their gradients and updates are known to fit
    the parameters (a user's loss or Network subclass is checked at every step)."""
    parts = [net, net.loss, *_all_layers(net.layers), optimizer]
    if type(optimizer) is Chain:
        parts += [optimizer.optimizer, *optimizer.before, *optimizer.after]
    return all(map(_is_own, parts))


_FEW = 1 << 14  # entries: below this, arrays are checked together (one call, not one each)


def _all_finite(tree: NetParams) -> bool:
    """Whether every array in ``tree`` is finite: a dot product <a, a> per array
    (NaN or inf in a makes it NaN or inf; only if it overflows is a read again),
    small arrays concatenated into one first."""
    leaves = [a for layer in tree for a in layer]
    if leaves and sum(a.size for a in leaves) <= _FEW:
        leaves = [np.concatenate([a.ravel() for a in leaves])]
    return all(math.isfinite(np.vdot(a, a)) or bool(np.isfinite(a).all()) for a in leaves)


# Synchronous data parallelism over MPI (the Horovod / DistributedDataParallel
# pattern): every rank holds the same network, walks the same global batches
# (same key, same permutation), trains on its own shard of each, and an
# ``AllReduce`` first in the optimizer's chain averages the gradients, so every
# rank applies the same update.  One process is the case of one rank: train_step
# and data_parallel_step share one body, ``_step``.


def shard(n: int, rank: int, size: int) -> slice:
    """The rows of a global batch of ``n`` that ``rank`` of ``size`` ranks trains on:
    ``slice(start, stop)`` with start = rank q + min(rank, n mod size), q = n // size.

    Contiguous and in rank order; the first ``n % size`` ranks take
    ``n // size + 1`` rows, the others ``n // size`` (``np.array_split``'s
    split), so shards are empty when ``n < size``.  x[shard(N, r, R)] is rank
    r's (n_r, ...) part of a global batch x: (N, ...).

    >>> [dlfs.shard(10, rank, 3) for rank in range(3)]
    [slice(0, 4, None), slice(4, 7, None), slice(7, 10, None)]
    """
    n = _check_int("n", n, low=0)
    size = _check_int("size", size)
    rank = _check_int("rank", rank, low=0)
    if rank >= size:
        raise ValueError(f"rank must be < size = {size}, got {rank}")
    q, r = divmod(n, size)
    start = rank * q + min(rank, r)
    return slice(start, start + q + (rank < r))


def _rows_of(x: np.ndarray, y: np.ndarray, rank: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """This rank's shard of a global batch (x, y)."""
    rows = shard(len(x), rank, size)
    return x[rows], y[rows]


def _check_shards(net: Network, n: int, size: int) -> None:
    """Every rank with rows of a global batch of ``n`` gives each BatchNorm at least
    2 values per feature: checked on every rank alike, before any all-reduce, so no
    rank raises while the others wait for it."""
    i = _thin_batchnorm(net, _smallest_shard(n, size))
    if i is not None:
        raise ValueError(
            f"layers[{i}] (BatchNorm) must see at least 2 rows on every rank, but a batch "
            f"of {n} on {size} ranks has shards of {_smallest_shard(n, size)}: use batches "
            f"of at least {2 * size} rows"
        )


def _check_all_reduce_first(optimizer: Any, comm: Any, name: str = "state.optimizer") -> None:
    before = optimizer.before if isinstance(optimizer, Chain) else ()
    if not (before and isinstance(before[0], AllReduce) and before[0].comm is comm):
        raise ValueError(
            f"{name} must be dlfs.chain(dlfs.AllReduce(comm), ...) with the comm "
            f"given here, so the ranks average their gradients; got {optimizer!r:.120}"
        )


def _rank_key(state: TrainState, rank: int, size: int) -> Key:
    """The forward key of ``rank``: train_step's ``(key, step)`` with one rank,
    ``(key, step, rank)`` with more, so the ranks draw independent dropout masks."""
    return state.key + ((state.step,) if size == 1 else (state.step, rank))


def _shard_loss_and_grads(
    net: Network, x: np.ndarray, y: np.ndarray, key: Key
) -> tuple[float, NetParams, Network]:
    """(mean loss, mean grads, network with new state) on this rank's shard;
    an empty shard contributes zero gradients and leaves the network as it is."""
    if len(x) == 0:
        return 0.0, _tree_map(np.zeros_like, net.params()), net
    loss, grads, new_net = net._loss_and_grads(x, y, _sub_context(True, key))
    return float(loss), grads, new_net


def _check_train_state(state: Any) -> None:
    if not isinstance(state, TrainState):
        hint = ""
        if isinstance(state, Network):
            hint = ": make one with dlfs.TrainState.create(net, optimizer)"
        raise TypeError(f"state must be a dlfs.TrainState, got {type(state).__name__}{hint}")


def _check_step(state: Any, batch: Any) -> tuple[np.ndarray, np.ndarray]:
    """A step's (x, y), checked against ``state.net``."""
    _check_train_state(state)
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"batch must be a pair (x, y), got {type(batch).__name__}")
    x, y = batch
    state.net._check_x(x)
    _check_xy(x, y)
    return x, y


def _non_finite(what: str, state: TrainState) -> NonFiniteError:
    return NonFiniteError(
        f"{what} became NaN/inf at step {state.step}", network=state.net, step=state.step
    )


def _step(state: TrainState, batch: tuple[np.ndarray, np.ndarray], comm: Any) -> TrainState:
    """train_step (``comm`` None: one rank, the whole batch) or data_parallel_step
    (this rank's shard; ``comm`` and the optimizer's AllReduce checked by the caller)."""
    x, y = _check_step(state, batch)
    rank, size = (0, 1) if comm is None else _check_comm(comm)
    if comm is not None:
        _check_all_reduce_first(state.optimizer, comm)
        _check_shards(state.net, len(x), size)
        x, y = _rows_of(x, y, rank, size)
    n, recycles = len(x), state._fits and state.net._plan().recycles
    with _recycling() if recycles else contextlib.nullcontext():
        loss, grads, new_net = _shard_loss_and_grads(state.net, x, y, _rank_key(state, rank, size))
    weight = size * n / len(batch[0])
    if not math.isfinite(loss):
        if comm is None:
            raise _non_finite("loss", state)
        grads = _tree_map(lambda g: np.full_like(g, np.nan), grads)  # all ranks stop here
    elif weight != 1.0:
        grads = _tree_map(lambda g: g * g.dtype.type(weight), grads)
    fits = state._fits  # then skip the checks, and SGD writes into the fresh grads
    opt: Any  # dlfs's own when the state fits: its private _apply skips the checks
    opt, params = state.optimizer, new_net.params()
    if fits:
        params, opt_state = opt._apply(grads, state.opt_state, params, owned=True)
    else:
        params, opt_state = opt.update(grads, state.opt_state, params)
    del grads  # they may hold the new parameters now
    # One finiteness pass per step, over the new parameters: a NaN/inf gradient
    # makes them non-finite in every dlfs optimizer; only then are the gradients
    # computed again, to name the culprit.
    if not _all_finite(params):  # e.g. an overflowing step: keep the last finite network
        if not math.isfinite(loss):
            raise _non_finite(f"the loss on rank {rank}", state)
        if comm is not None:  # the culprit may sit on another rank
            raise _non_finite("a gradient or parameter", state)
        _, grads, _ = _shard_loss_and_grads(state.net, x, y, _rank_key(state, rank, size))
        raise _non_finite("a gradient" if not _all_finite(grads) else "the parameters", state)
    changes = {
        "net": new_net._renew(params) if fits else new_net.with_params(params),
        "opt_state": opt_state,
        "step": state.step + 1,
        "loss_sum": state.loss_sum + loss * n,
        "seen": state.seen + n,
        "_fits": fits or _own_parts(new_net, opt),  # its state fits now
    }
    return _replace(state, changes)  # the key and optimizer as they were (checked)


def train_step(state: TrainState, batch: tuple[np.ndarray, np.ndarray]) -> TrainState:
    """One pure SGD step: forward, loss, backward, optimizer update.

    ``batch = (x, y)``; raises NonFiniteError (keeping ``state.net``) if the
    loss, a gradient or an updated parameter is NaN/inf (NaN in the batch
    shows up this way too; a NaN/inf gradient is caught through the updated
    parameters it poisons, so an optimizer that maps it to finite values
    goes on).  Fold it over batches with functools.reduce.
    x: (N, *state.net.input_shape), y: (N, ...) the loss's targets.

    On a state from ``TrainState.create`` (or fit), a step reuses the previous
    step's convolution and pool buffers that nothing references any more; a
    hand-written fold keeps the last step's (one step's activations) until
    this thread's next ``train_epoch`` or ``fit`` ends, which lets them go.

    >>> import functools
    >>> x = dlfs.make_rng(0).standard_normal((64, 2), dtype=np.float32)
    >>> y = x @ np.array([[2.0], [-1.0]], np.float32)
    >>> net = dlfs.network(0, 2, [dlfs.dense(1)], dlfs.MeanSquaredError())
    >>> state = dlfs.TrainState.create(net, dlfs.SGD(0.1))
    >>> first = dlfs.train_step(state, (x, y))
    >>> later = functools.reduce(dlfs.train_step, dlfs.batches(x, y, 16, key=1), first)
    >>> loss = lambda state: float(state.net.loss_and_grads(x, y)[0])
    >>> later.step, loss(later) < loss(first)
    (5, True)
    """
    return _step(state, batch, None)


def train_epoch(state: TrainState, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> TrainState:
    """``functools.reduce(train_step, batches, state)`` with the epoch's loss reset.

    batches: (x, y) pairs, x: (B, *input_shape), y: (B, ...), e.g. from ``batches``.

    >>> x, y = np.ones((64, 2), np.float32), np.ones((64, 1), np.float32)
    >>> net = dlfs.network(0, 2, [dlfs.dense(1)], dlfs.MeanSquaredError())
    >>> state = dlfs.train_epoch(dlfs.TrainState.create(net, dlfs.SGD(0.1)), dlfs.batches(x, y, 16))
    >>> state.step, state.seen
    (4, 64)
    """
    _check_train_state(state)
    start = attrs.evolve(state, loss_sum=0.0, seen=0)
    try:
        return functools.reduce(train_step, batches, start)
    finally:
        _let_go_step_buffers()


def data_parallel_step(
    state: TrainState, batch: tuple[np.ndarray, np.ndarray], comm: Comm
) -> TrainState:
    """One synchronous data-parallel step: this rank's shard of the global batch.

    Every rank calls it with the SAME global batch ``(x, y)`` (e.g. from
    ``batches`` with the same key; x: (N, *input_shape), y: (N, ...) as for
    ``train_step``) and trains on rows ``shard(N, rank, R)``;
    ``state.optimizer`` must be ``chain(AllReduce(comm), ...)``.  Fold it like
    ``train_step``: ``reduce(partial(data_parallel_step, comm=comm), batches(...), state)``,
    or let ``fit(..., comm=comm)`` do it all.

    Weighting: the shard's mean gradient g_r (over its n_r of the N rows) is
    scaled by w_r = R n_r / N before AllReduce averages the ranks, so the
    optimizer sees (1/R) sum_r w_r g_r = sum_r (n_r / N) g_r, the global
    batch's mean gradient, for shards of any size (w_r = 1 when they are
    equal, and then nothing is scaled).  The weight lives here, not in the
    transform, because only the step knows the shard sizes; the transform
    stays a plain average that needs no per-step state.

    Result: ``train_step`` on the global batch, to float rounding, for
    networks without Dropout or BatchNorm (with one rank: exactly, bit for
    bit, Dropout and BatchNorm included).  With more ranks, by design:
    Dropout on rank r draws from the key ``state.key + (step, r)``, so its
    masks differ from a single process's; BatchNorm normalizes with its
    shard's batch statistics, and its running statistics stay per rank until
    ``sync_state`` averages them.  ``loss_sum``/``seen`` count this rank's
    shard; ``global_mean_loss`` combines the ranks.  A NaN/inf loss on one
    rank is sent as NaN gradients, so every rank raises NonFiniteError at the
    same step instead of the others waiting in the next all-reduce.
    Data cost: each rank indexes the whole global batch, compute is 1/R.

    >>> class OneRank:  # a stand-in for mpi4py's MPI.COMM_WORLD in a single process
    ...     def Allreduce(self, sendbuf, recvbuf): recvbuf[...] = sendbuf
    ...     def Get_rank(self): return 0
    ...     def Get_size(self): return 1
    >>> comm = OneRank()
    >>> net = dlfs.network(0, 2, [dlfs.dense(1)], dlfs.MeanSquaredError())
    >>> x, y = np.ones((4, 2), np.float32), np.ones((4, 1), np.float32)
    >>> state = dlfs.TrainState.create(net, dlfs.chain(dlfs.AllReduce(comm), dlfs.SGD(0.1)))
    >>> ranked = dlfs.data_parallel_step(state, (x, y), comm)
    >>> plain = dlfs.train_step(dlfs.TrainState.create(net, dlfs.SGD(0.1)), (x, y))
    >>> all((a == b).all() for a, b in zip(ranked.net.params()[0], plain.net.params()[0]))
    True
    """
    _check_train_state(state)
    _check_comm(comm)  # None too: that is train_step
    return _step(state, batch, comm)


def global_mean_loss(state: TrainState, comm: Comm) -> float:
    """The mean training loss per sample over all ranks' shards:
    sum_r loss_sum_r / sum_r seen_r (one Allreduce); NaN before any step.
    Every rank gets the same value (call it on every rank).

    >>> class OneRank:  # a stand-in for mpi4py's MPI.COMM_WORLD in a single process
    ...     def Allreduce(self, sendbuf, recvbuf): recvbuf[...] = sendbuf
    ...     def Get_rank(self): return 0
    ...     def Get_size(self): return 1
    >>> net = dlfs.network(0, 2, [dlfs.dense(1)], dlfs.MeanSquaredError())
    >>> state = dlfs.TrainState.create(net, dlfs.SGD(0.1))
    >>> state = dlfs.train_step(state, (np.ones((4, 2), np.float32), np.ones((4, 1), np.float32)))
    >>> dlfs.global_mean_loss(state, OneRank()) == state.mean_loss
    True
    """
    _check_train_state(state)
    _check_comm(comm)
    totals = np.array([state.loss_sum, state.seen], dtype=np.float64)
    loss_sum, seen = _all_reduce(comm, [totals])[0]
    return float(loss_sum / seen) if seen else math.nan


def _state_fields(layer: Any) -> list[str]:
    """Names of a layer's state arrays: attrs array fields that are not parameters
    (BatchNorm's running ``mean`` and ``var``)."""
    if not attrs.has(type(layer)):
        return []
    params = layer.params()
    values = ((f.name, getattr(layer, f.name)) for f in attrs.fields(type(layer)))
    return [
        name for name, v in values if isinstance(v, np.ndarray) and not any(v is p for p in params)
    ]


def sync_state(net: Network, comm: Comm) -> Network:
    """``net`` with each layer's state (BatchNorm's running mean and var, inside
    Residual blocks too) averaged over the ranks in one Allreduce:
    state_l <- (1/R) sum_r state_l,r.

    ``data_parallel_step`` leaves running statistics per rank (parameters are
    always identical); call this on every rank before evaluating, saving or
    comparing networks (``fit(..., comm=comm)`` does after every epoch).  The
    running mean update is affine, so averaging at the end equals averaging
    every step (in exact arithmetic): a BatchNorm's running mean becomes the
    running mean of the ranks' average shard mean of its input, as each rank
    computed that input.  With equal shards that is one process's running mean
    (for the same parameters) for a BatchNorm with no BatchNorm or Dropout
    before it; after one, the input itself is per rank (each shard normalised
    by its own statistics, per-rank dropout masks), and a second BatchNorm's
    mean can differ from one process's by more than the mean itself.  The
    running var becomes the average of the shards' unbiased variances, which
    misses the spread between shard means: it differs from a single
    process's.  Returns ``net`` itself when no layer has state.
    A BatchNorm's mean and var: (C,) each.

    >>> class OneRank:  # a stand-in for mpi4py's MPI.COMM_WORLD in a single process
    ...     def Allreduce(self, sendbuf, recvbuf): recvbuf[...] = sendbuf
    ...     def Get_rank(self): return 0
    ...     def Get_size(self): return 1
    >>> net = dlfs.network(0, 3, [dlfs.dense(2), dlfs.batch_norm()], dlfs.MeanSquaredError())
    >>> dlfs.sync_state(net, OneRank()).layers[1].var.tolist()
    [1.0, 1.0]
    >>> plain = dlfs.network(0, 3, [dlfs.dense(2)], dlfs.MeanSquaredError())
    >>> dlfs.sync_state(plain, OneRank()) is plain  # no state to average
    True
    """
    if not isinstance(net, Network):
        raise TypeError(f"net must be a dlfs.Network, got {type(net).__name__}")
    _, size = _check_comm(comm)
    arrays = [getattr(layer, n) for layer in _all_layers(net.layers) for n in _state_fields(layer)]
    if not arrays:
        return net
    return net._evolve_layers(_with_state(net.layers, iter(_all_reduce(comm, arrays, size))))


def _with_state(layers: Sequence[Any], new: Iterator[np.ndarray]) -> tuple[Any, ...]:
    """The layers with their state arrays taken from ``new`` in ``_all_layers``'s
    order (a container first, then its sub-layers)."""
    renewed = []
    for layer in layers:
        names = _state_fields(layer)
        if names:
            layer = attrs.evolve(layer, **{n: next(new) for n in names})
        if isinstance(layer, _CHAINS):
            layer = _replace(layer, {"layers": _with_state(layer.layers, new)})
        renewed.append(layer)
    return tuple(renewed)


class StopTraining(Exception):  # noqa: N818 (Keras/Lightning-style name: it is a signal, not an error)
    """Raise it from a ``fit`` callback to end training after this epoch, just as
    returning ``False`` does; ``history.stop_reason`` becomes ``"callback"``.

    >>> def stop_after_2(record):
    ...     if record.epoch == 2:
    ...         raise dlfs.StopTraining
    >>> net = dlfs.network(0, 2, [dlfs.dense(1)], dlfs.MeanSquaredError())
    >>> x, y = np.ones((8, 2), np.float32), np.ones((8, 1), np.float32)
    >>> _, history = dlfs.fit(net, dlfs.SGD(0.1), x, y, epochs=10, callback=stop_after_2)
    >>> history.epochs, history.stop_reason
    ([1, 2], 'callback')
    """


@attrs.frozen
class EpochRecord:
    """One epoch of history; validation fields are None when not evaluated.

    >>> dlfs.EpochRecord(1, 0.5)
    EpochRecord(epoch=1, train_loss=0.5)
    >>> dlfs.EpochRecord(2, 0.25, val_loss=0.3, val_metric=0.9)
    EpochRecord(epoch=2, train_loss=0.25, val_loss=0.3, val_metric=0.9)
    """

    epoch: int
    train_loss: float
    val_loss: float | None = None
    val_metric: float | None = None

    def __repr__(self) -> str:
        fields = [f"epoch={self.epoch}", f"train_loss={_people(self.train_loss)}"]
        for name in ("val_loss", "val_metric"):
            if getattr(self, name) is not None:
                fields.append(f"{name}={_people(getattr(self, name))}")
        return f"EpochRecord({', '.join(fields)})"


_STOP_REASONS = ("completed", "early_stopping", "callback", "interrupted", "non_finite")


@attrs.frozen
class History:
    """What ``fit`` saw: one EpochRecord per finished epoch and how training ended.

    ``best_epoch``: the evaluated epoch with the lowest validation loss (None
    without validation); ``stop_reason``: ``"completed"`` (every epoch ran),
    ``"early_stopping"``, ``"callback"`` (it returned False or raised
    StopTraining), ``"interrupted"`` (a KeyboardInterrupt; the records hold the
    finished epochs) or ``"non_finite"`` (the history a NonFiniteError
    carries); ``metric``: the validation metric's name (e.g. ``"accuracy"``)
    or None; ``steps``: optimizer steps taken in all, mid-epoch ones included.
    Columns: ``epochs``, ``train_loss``, ``val_loss``, ``val_metric``;
    ``as_dict()`` for pandas, ``plot()`` for curves.

    >>> net = dlfs.network(0, 2, [dlfs.dense(1)], dlfs.MeanSquaredError())
    >>> x, y = np.ones((8, 2), np.float32), np.ones((8, 1), np.float32)
    >>> _, history = dlfs.fit(net, dlfs.SGD(0.1), x, y, epochs=3, validation=(x, y))
    >>> history.epochs, history.stop_reason, history.steps, list(history.as_dict())
    ([1, 2, 3], 'completed', 3, ['epoch', 'train_loss', 'val_loss'])
    """

    records: tuple[EpochRecord, ...] = ()
    best_epoch: int | None = None
    stop_reason: str = attrs.field(
        default="completed", validator=attrs.validators.in_(_STOP_REASONS)
    )
    metric: str | None = None
    steps: int = 0

    @property
    def history(self) -> dict[str, list[Any]]:
        """The columns under Keras's keys, for code written against Keras's
        ``History.history``: ``loss`` (training), and once anything was evaluated
        ``val_loss`` and ``val_<metric>``, NaN where an epoch was not."""
        columns = self.as_dict()
        del columns["epoch"]
        columns["loss"] = columns.pop("train_loss")
        return {"loss": columns.pop("loss"), **columns}

    @property
    def stopped_early(self) -> bool:
        """True when early stopping ended training."""
        return self.stop_reason == "early_stopping"

    @property
    def interrupted(self) -> bool:
        """True when a KeyboardInterrupt ended training (fit returned what it had)."""
        return self.stop_reason == "interrupted"

    @property
    def epochs(self) -> list[int]:
        return [r.epoch for r in self.records]

    @property
    def train_loss(self) -> list[float]:
        return [r.train_loss for r in self.records]

    @property
    def val_loss(self) -> list[float | None]:
        return [r.val_loss for r in self.records]

    @property
    def val_metric(self) -> list[float | None]:
        return [r.val_metric for r in self.records]

    def _evaluated(self) -> list[EpochRecord]:
        return [r for r in self.records if r.val_loss is not None]

    def as_dict(self) -> dict[str, list[Any]]:
        """Columns as lists, ready for ``pandas.DataFrame(history.as_dict())``:
        ``epoch``, ``train_loss`` and, once anything was evaluated, ``val_loss``
        and ``val_<metric>`` (e.g. ``val_accuracy``), NaN where an epoch was not."""
        columns: dict[str, list[Any]] = {"epoch": self.epochs, "train_loss": self.train_loss}
        if self._evaluated():
            columns["val_loss"] = [math.nan if v is None else v for v in self.val_loss]
            if self.metric is not None:
                values = self.val_metric
                columns[f"val_{self.metric}"] = [math.nan if v is None else v for v in values]
        return columns

    def plot(self) -> Any:
        """Loss curves (training, and validation at the evaluated epochs) and the
        validation metric, as a matplotlib Figure; save it with ``fig.savefig(path)``.
        It is closed in pyplot, so a notebook shows it once, as the cell's value.
        Needs matplotlib, imported here (ImportError naming ``pip install matplotlib``)."""
        try:
            import matplotlib.pyplot as plt
            from matplotlib.ticker import MaxNLocator
        except ImportError as err:
            raise ImportError("History.plot needs matplotlib: pip install matplotlib") from err
        evaluated = self._evaluated()
        with_metric = any(r.val_metric is not None for r in evaluated)
        fig = plt.figure(figsize=(9.0 if with_metric else 5.0, 3.5), layout="constrained")
        plt.close(fig)  # no second copy from Jupyter's inline backend
        axes = fig.subplots(1, 2 if with_metric else 1, squeeze=False)[0]
        axes[0].plot(self.epochs, self.train_loss, "o-", label="training")
        if evaluated:
            val_epochs = [r.epoch for r in evaluated]
            axes[0].plot(val_epochs, [r.val_loss for r in evaluated], "o-", label="validation")
        if self.best_epoch is not None:
            label = f"best (epoch {self.best_epoch})"
            axes[0].axvline(self.best_epoch, color="gray", linestyle=":", label=label)
        axes[0].set(xlabel="epoch", ylabel="loss", title="loss")
        axes[0].legend()
        if with_metric:
            scored = [r for r in evaluated if r.val_metric is not None]
            name = self.metric or "metric"
            axes[1].plot(
                [r.epoch for r in scored], [r.val_metric for r in scored], "o-", color="C2"
            )
            axes[1].set(xlabel="epoch", ylabel=name, title=f"validation {name}")
        for ax in axes:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
        return fig

    def __repr__(self) -> str:
        n = len(self.records)
        text = f"History({n} epoch{'' if n == 1 else 's'}, {self.steps:,} steps, {self.stop_reason}"
        if self.records:
            text += f"; train_loss {_people(self.records[-1].train_loss)}"
        evaluated = self._evaluated()
        if evaluated:
            last = evaluated[-1]
            text += f", val_loss {_people(last.val_loss)}"
            if last.val_metric is not None:
                text += f", val_{self.metric or 'metric'} {_people(last.val_metric)}"
            text += f", best epoch {self.best_epoch}"
        return text + ")"

    def _repr_html_(self) -> str:
        columns = self.as_dict()
        rows = [[_people(v) for v in row] for row in zip(*columns.values())]
        if len(rows) > 20:  # the first and last ten epochs
            rows = [*rows[:10], ["…"] * len(columns), *rows[-10:]]
        return _html_table(list(columns), rows, caption=repr(self))


# fit's checks of whole data sets, before the first step


def _check_dataset(net: Network, x: Any, y: Any, prefix: str = "") -> None:
    """fit's and evaluate's checks of a whole data set before any step: ``x`` fits
    the network and ``y`` its loss on every row.  Errors name ``{prefix}x`` /
    ``{prefix}y`` and say the fix."""
    xname, yname = f"{prefix}x", f"{prefix}y"
    net._check_x(x, xname)
    _check_finite(xname, x)
    if type(y) is not np.ndarray and not isinstance(y, np.ndarray):  # a list, a pandas Series
        raise TypeError(
            f"{yname} must be a numpy array, got {type(y).__name__}; {_y_fix(net, y, yname)}"
        )
    _check_xy(x, y, prefix)
    if y.dtype.kind not in "biuf":
        raise TypeError(f"{yname} must be a float or integer array, got dtype {y.dtype}")
    if y.dtype.kind == "f":
        _check_finite(yname, y)
    dtype = net.dtype or x.dtype
    if isinstance(net.loss, SoftmaxCrossEntropy) and len(net.output_shape) == 1:
        _check_class_targets(yname, y, net.output_shape[0], dtype)
    elif isinstance(net.loss, (MeanSquaredError, BinaryCrossEntropy)):
        _check_float_targets(yname, y, net, dtype)
    else:
        _check_other_targets(yname, y, net, x)


def _y_fix(net: Network, y: Any, name: str) -> str:
    """How to turn targets ``y`` given as a list or pandas object into the array
    ``net``'s loss takes: int64 class labels, else floats of the network's dtype."""
    var = name.split()[-1]  # "validation y" -> y
    to = f"{var}.to_numpy" if hasattr(y, "to_numpy") else "np.asarray"
    arg = "" if to.endswith("to_numpy") else f"{var}, "
    if isinstance(net.loss, SoftmaxCrossEntropy):
        return f"SoftmaxCrossEntropy takes class labels: convert with {to}({arg}dtype=np.int64)"
    dtype = net.dtype or np.dtype(np.float32)
    column = ".reshape(-1, 1)" if net.output_shape == (1,) and np.ndim(y) == 1 else ""
    return (
        f"{type(net.loss).__name__} takes float targets: convert with "
        f"{to}({arg}dtype=np.{dtype}){column}"
    )


def _check_label_range(name: str, y: np.ndarray, k: int) -> None:
    lo, hi = y.min(), y.max()
    if lo < 0 or hi >= k:
        hint = f": they look numbered from 1, pass {name} - 1" if (lo, hi) == (1, k) else ""
        raise ValueError(
            f"{name} labels must be in [0, {k}) for a network with {k} outputs, "
            f"got values in [{lo}, {hi}]{hint}"
        )


def _check_class_targets(name: str, y: np.ndarray, k: int, dtype: np.dtype) -> None:
    """SoftmaxCrossEntropy's targets: integer labels (N,) in [0, K), or float rows (N, K)."""
    if y.dtype.kind in "iu":
        if y.ndim == 2 and y.shape[1] == 1:
            raise ValueError(
                f"{name} holds integer labels of shape {y.shape}; SoftmaxCrossEntropy "
                f"expects them flat, shape (N,): pass {name}.ravel()"
            )
        if y.ndim != 1:
            raise ValueError(
                f"{name} must be integer labels (N,) or one-hot rows (N, {k}), "
                f"got an integer array of shape {y.shape}"
            )
        _check_label_range(name, y, k)
        return
    if y.dtype.kind == "b" or y.ndim == 1:
        raise TypeError(
            f"{name} must hold integer class labels for SoftmaxCrossEntropy, got {y.dtype} "
            f"of shape {y.shape}: convert with {name}.astype(np.int64)"
        )
    if y.shape[1:] != (k,):
        raise ValueError(
            f"{name} must be integer labels (N,) or one-hot/probability rows (N, {k}) for a "
            f"network with {k} outputs, got shape {y.shape}"
        )
    if y.dtype != dtype:
        raise TypeError(
            f"{name} must have the network's dtype {dtype}, got {y.dtype} one-hot rows: convert "
            f"with {name}.astype(np.{dtype}), or pass integer labels ({name}.argmax(axis=1))"
        )


def _check_float_targets(name: str, y: np.ndarray, net: Network, dtype: np.dtype) -> None:
    """MeanSquaredError's and BinaryCrossEntropy's targets: float, shaped like the output."""
    out = net.output_shape
    loss = type(net.loss).__name__
    column = y.ndim == 1 and out == (1,)  # (N,) against a (N, 1) output
    if y.dtype.kind != "f":
        labels = y.dtype.kind in "iu" and y.ndim == 1 and len(out) == 1 and out[0] > 1
        if isinstance(net.loss, MeanSquaredError) and labels:
            raise TypeError(
                f"{name} holds integer labels, but MeanSquaredError expects float targets "
                f"shaped like the output {_shape_str((None, *out))}: one-hot encode them with "
                f"dlfs.one_hot({name}, {out[-1]}), or train with SoftmaxCrossEntropy, which takes labels"
            )
        fix = f"{name}.astype(np.{dtype})" + ("[:, None]" if column else "")
        raise TypeError(
            f"{name} must be a float array ({dtype}) for {loss}, got dtype {y.dtype}: "
            f"convert with {fix}"
        )
    if y.shape[1:] != out:
        hint = f": use {name}[:, None] (or dlfs.to_2d({name}))" if column else ""
        raise ValueError(
            f"{name} must have shape {_shape_str((None, *out))} (the network's output), got "
            f"{y.shape}; dlfs never broadcasts a loss{hint}"
        )
    if y.dtype != dtype:
        raise TypeError(
            f"{name} must have dtype {dtype} (the network's), got {y.dtype}: "
            f"convert with {name}.astype(np.{dtype})"
        )
    if isinstance(net.loss, BinaryCrossEntropy):
        lo, hi = y.min(), y.max()
        if lo < 0 or hi > 1:
            raise ValueError(
                f"{name} must hold BinaryCrossEntropy targets in [0, 1], got values in [{lo}, {hi}]"
            )


def _check_other_targets(name: str, y: np.ndarray, net: Network, x: np.ndarray) -> None:
    """Any other loss: its own checks on the first row, labels range-checked on all."""
    out = net._forward(x[:1], EVAL)[0]
    try:
        net.loss.forward(out, y[:1])
    except (TypeError, ValueError) as err:
        raise type(err)(
            f"{name} must suit the loss {type(net.loss).__name__} (checked on its first row): {err}"
        ) from None
    if y.dtype.kind in "iu" and out.ndim >= 2:
        _check_label_range(name, y, out.shape[-1])


def _check_batch_rows(net: Network, n: int, batch_size: int, drop_last: bool, ranks: int) -> None:
    """Every training batch has rows, and each BatchNorm at least 2 values per
    feature, on every one of ``ranks`` ranks that gets a shard of it."""
    if drop_last and n < batch_size:
        raise ValueError(
            f"drop_last=True with {n} rows and batch_size={batch_size} leaves no full batch: "
            "lower batch_size"
        )
    rows = batch_size if drop_last else (n % batch_size or batch_size)
    i = _thin_batchnorm(net, _smallest_shard(rows, ranks))
    if i is None:
        return
    if _thin_batchnorm(net, _smallest_shard(batch_size, ranks)) is not None:
        fix = f"use batch_size >= {2 * ranks}"
    else:
        fix = "pass drop_last=True to fit (it skips that batch), or pick another batch_size"
    where = f"a batch of {rows}"
    if ranks > 1:
        where += f", whose shards on {ranks} ranks have as few as {_smallest_shard(rows, ranks)}"
    raise ValueError(
        f"layers[{i}] (BatchNorm) must see at least 2 rows in each training batch"
        f"{' on every rank' if ranks > 1 else ''}, but {n} rows in batches of "
        f"{batch_size} leave {where}: {fix}"
    )


def _smallest_shard(rows: int, ranks: int) -> int:
    """The fewest rows a rank with any rows gets of a global batch (``shard``)."""
    return max(rows // ranks, 1)


def _thin_batchnorm(net: Network, rows: int) -> int | None:
    """The index of the first BatchNorm to which ``rows`` rows give fewer than 2
    values per feature (a BatchNorm after a convolution sees rows * H * W), or None."""
    if rows >= 2 or not any(isinstance(layer, BatchNorm) for layer in net.layers):
        return None
    shapes = [net.input_shape, *_chain_shapes(net.layers, net.input_shape)]
    for i, layer in enumerate(net.layers):
        if isinstance(layer, BatchNorm) and rows * math.prod(shapes[i][1:]) < 2:
            return i
    return None


# fit: settings, the epoch loop and its stops


def _default_metric(loss: Any) -> Callable[[np.ndarray, np.ndarray], float] | None:
    if isinstance(loss, SoftmaxCrossEntropy):
        return accuracy
    return binary_accuracy if isinstance(loss, BinaryCrossEntropy) else None


def _resolve_metric(metric: Any, loss: Any) -> Callable[..., Any] | None:
    """``"auto"`` (accuracy for classification losses), None, or a callable(pred, target)."""
    if isinstance(metric, str):
        if metric != "auto":
            raise ValueError(
                f"metric must be 'auto', None or a callable(pred, target), got {metric!r}"
            )
        return _default_metric(loss)
    if metric is not None and not callable(metric):
        raise TypeError(
            "metric must be 'auto', None or a callable(pred, target) -> float, "
            f"got {type(metric).__name__}"
        )
    return metric


def _metric_name(metric: Any) -> str | None:
    """The name a metric goes by in records and tables: its ``__name__`` or
    ``"metric"``; None for no metric."""
    if metric is None:
        return None
    name = str(getattr(metric, "__name__", ""))
    return name if name.isidentifier() and name != "loss" else "metric"


def _resolve_early_stopping(early_stopping: Any, patience: Any, validation: Any) -> int | None:
    """fit's early stopping as a patience, None when it is off (the default)."""
    if patience is not None:
        patience = _check_int("patience", patience)
    if early_stopping is False and patience is not None:
        raise ValueError(
            f"patience={patience} asks for early stopping, but early_stopping=False: drop one"
        )
    if not early_stopping and patience is None:
        return None
    if validation is None:
        raise ValueError(
            "early stopping (early_stopping=True or patience=N) must watch a validation loss: "
            "pass validation=(x_val, y_val)"
        )
    return 1 if patience is None else patience


def _evaluate(
    net: Network, x: np.ndarray, y: np.ndarray, metric: Any, batch_size: int
) -> tuple[float, float | None]:
    pred = net.predict(x, batch_size=batch_size)
    loss = float(net.loss.forward(pred, y)[0])
    return loss, (None if metric is None else float(metric(pred, y)))


def _check_fit_options(**options: Any) -> None:
    for name in ("shuffle", "drop_last", "verbose"):
        if not isinstance(options[name], (bool, np.bool_)):
            raise TypeError(f"{name} must be a bool, got {options[name]!r}")
    if options["early_stopping"] is not None and not isinstance(
        options["early_stopping"], (bool, np.bool_)
    ):
        raise TypeError(f"early_stopping must be a bool or None, got {options['early_stopping']!r}")
    if options["callback"] is not None and not callable(options["callback"]):
        raise TypeError(f"callback must be callable or None, got {options['callback']!r}")
    progress = options["progress"]
    if not (progress in (None, "auto") or isinstance(progress, bool) or callable(progress)):
        raise TypeError(
            f'progress must be "auto", True, False, None or a tqdm-like factory, got {progress!r}'
        )


@attrs.frozen(eq=False)
class _Ranks:
    """The processes one fit call trains on: this one alone (``comm`` None) or the
    ranks of an MPI communicator, each calling fit with the same arguments.

    Rank 0 leads: only it prints, shows progress, evaluates, writes checkpoints
    and calls the callback.  Whatever ends training is decided by all ranks
    together at a step or epoch boundary (``on_lead``, ``any``: one small
    Allreduce each), so no rank leaves while the others wait in an all-reduce.
    ``interrupt`` records a Ctrl-C (or a KeyboardInterrupt in rank 0's side
    work) until that boundary."""

    comm: Any = None
    rank: int = 0
    size: int = 1
    interrupt: threading.Event = attrs.field(factory=threading.Event)

    @classmethod
    def of(cls, comm: Any) -> _Ranks:
        if comm is None:
            return cls()
        rank, size = _check_comm(comm)
        return cls(comm, rank, size)

    @property
    def lead(self) -> bool:
        return self.rank == 0

    def step(self, state: TrainState, batch: tuple[np.ndarray, np.ndarray]) -> TrainState:
        if self.comm is None:
            return train_step(state, batch)
        return data_parallel_step(state, batch, self.comm)

    def mean_loss(self, state: TrainState) -> float:
        return state.mean_loss if self.comm is None else global_mean_loss(state, self.comm)

    def sync(self, net: Network) -> Network:
        return net if self.comm is None else sync_state(net, self.comm)

    def _sum(self, values: np.ndarray) -> np.ndarray:
        """float64 ``values`` summed over the ranks (exact where one rank sends non-zeros)."""
        return values if self.comm is None else _all_reduce(self.comm, [values])[0]

    def on_lead(self, work: Callable[[], Sequence[float]], n: int, what: str) -> list[float] | None:
        """The ``n`` floats ``work()`` returns, computed on rank 0 alone and sent to every
        rank; None on every rank when a KeyboardInterrupt cut ``work`` short.  Any other
        error raises on every rank (rank 0's own there, a RuntimeError naming ``what``
        elsewhere), so that no rank waits alone in the next all-reduce."""
        sent, error = [0.0] * (n + 1), None  # (0 done, 1 interrupted, 2 failed, *values)
        if self.lead:
            try:
                sent = [0.0, *work()]
            except KeyboardInterrupt:
                sent[0] = 1.0
            except Exception as err:
                sent[0], error = 2.0, err
        status, *values = self._sum(np.array(sent, dtype=np.float64)).tolist()
        if error is not None:
            raise error
        if status == 2.0:
            raise RuntimeError(f"{what} failed on rank 0 (its traceback is there)")
        return None if status == 1.0 else values

    def any(self, *flags: bool) -> list[bool]:
        """Each flag, True on every rank when it is True on any."""
        return [v > 0 for v in self._sum(np.array(flags, dtype=np.float64))]

    def gather(self, values: Sequence[float]) -> np.ndarray:
        """(size, len(values)) float64: row r holds rank r's ``values``, on every rank."""
        table = np.zeros((self.size, len(values)))
        table[self.rank] = values
        return self._sum(table.ravel()).reshape(table.shape)


def _noting(ranks: _Ranks, work: Callable[..., Any], *args: Any) -> None:
    """``work(*args)`` for rank 0's bar and lines: a KeyboardInterrupt there is
    recorded in ``ranks.interrupt``, and every rank stops at the next boundary."""
    try:
        work(*args)
    except KeyboardInterrupt:
        ranks.interrupt.set()


@contextlib.contextmanager
def _sigint_recorded(ranks: _Ranks) -> Iterator[None]:
    """Under MPI, while fit runs: SIGINT (Ctrl-C; mpiexec forwards it once to every
    rank, which may be at different steps) sets ``ranks.interrupt`` instead of
    raising KeyboardInterrupt mid-step, so every rank stops after the same step; a
    second SIGINT on a rank raises as before (it aborts).  Signals reach the main
    thread only, so elsewhere, or with a handler not installed from Python, nothing
    changes."""
    previous = signal.getsignal(signal.SIGINT)
    main = threading.current_thread() is threading.main_thread()
    if ranks.comm is None or not main or not callable(previous):
        yield
        return

    def record(signum: int, frame: Any) -> None:
        if ranks.interrupt.is_set():
            previous(signum, frame)
        ranks.interrupt.set()

    signal.signal(signal.SIGINT, record)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@attrs.frozen(eq=False)
class _FitPlan:
    """One fit call's checked settings: what the epoch loop reads."""

    x: np.ndarray
    y: np.ndarray
    validation: tuple[np.ndarray, np.ndarray] | None
    epochs: int
    batch_size: int
    drop_last: bool
    shuffle_key: Key | None
    eval_every: int
    patience: int | None  # None: no early stopping
    metric: Any
    lines: bool  # print a line per epoch (verbose, or progress=True without tqdm)
    talk: bool  # say why training stopped (verbose or any progress display)
    callback: Any
    checkpoint: str | None
    checkpoint_every: int
    setup: dict[str, Any]  # what a checkpoint records and a resume checks
    ranks: _Ranks

    @property
    def steps_per_epoch(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batches(self, epoch: int, start: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Epoch ``epoch``'s batches from batch ``start`` on; the order depends on the epoch only."""
        key = None if self.shuffle_key is None else self.shuffle_key + (epoch,)
        return _epoch_batches(self.x, self.y, self.batch_size, key, self.drop_last, start)


@attrs.frozen(eq=False)
class _FitRun:
    """fit's carry: the train state, the last recorded epoch and the steps taken
    in the next one (``batch``), the history, the early-stopping bookkeeping
    (best network, its validation loss, evaluations since it improved), and
    why training stopped (None while it goes on)."""

    state: TrainState
    epoch: int
    history: History
    best: Network
    best_loss: float = math.inf
    bad: int = 0
    batch: int = 0
    stop: str | None = None


class ProgressBar(Protocol):
    """What a ``ProgressFactory`` returns (a tqdm bar is one): ``update(n)``
    after every n steps and ``close()`` at the end; ``fit`` also calls
    ``set_postfix(dict, refresh=False)`` and ``write(text)`` when the bar has them.

    >>> class Marks:  # one # per step
    ...     def update(self, n=1):
    ...         print("#" * n, end="")
    ...     def close(self):
    ...         print(" done")
    >>> net = dlfs.network(0, 2, [dlfs.dense(1)], dlfs.MeanSquaredError())
    >>> x, y = np.ones((4, 2), np.float32), np.ones((4, 1), np.float32)
    >>> _ = dlfs.fit(net, dlfs.SGD(0.1), x, y, epochs=2, batch_size=2,
    ...              progress=lambda total, desc: Marks())
    #### done
    """

    def update(self, n: int = 1, /) -> Any:
        """Count ``n`` more steps."""
        ...

    def close(self) -> Any:
        """The end of training (also after an interrupt or an error)."""
        ...


class ProgressFactory(Protocol):
    """What ``fit(progress=...)`` takes besides "auto"/True/False/None:
    ``progress(total=steps, desc="fit")`` returns a ``ProgressBar``
    (``tqdm.tqdm`` and ``tqdm.auto.tqdm`` are such factories).

    >>> class Count:  # a bar that only counts
    ...     def __init__(self, total, desc):
    ...         self.total, self.desc, self.n = total, desc, 0
    ...     def update(self, n=1):
    ...         self.n += n
    ...     def close(self):
    ...         print(f"{self.desc}: {self.n} of {self.total} steps")
    >>> net = dlfs.network(0, 2, [dlfs.dense(1)], dlfs.MeanSquaredError())
    >>> x, y = np.ones((4, 2), np.float32), np.ones((4, 1), np.float32)
    >>> _ = dlfs.fit(net, dlfs.SGD(0.1), x, y, epochs=2, batch_size=2, progress=Count)
    fit: 4 of 4 steps
    """

    def __call__(self, *, total: int, desc: str) -> ProgressBar: ...


def _tqdm_auto() -> Any:
    """``tqdm.auto.tqdm``, or None when tqdm is not installed."""
    try:
        with warnings.catch_warnings():  # Jupyter without ipywidgets: tqdm warns, uses text
            warnings.simplefilter("ignore")
            from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm


def _interactive() -> bool:
    """Whether someone watches this process's output: a Jupyter kernel, or
    stderr (where tqdm draws) is a terminal; not CI logs, pipes or files."""
    get_ipython = getattr(sys.modules.get("IPython"), "get_ipython", None)
    if type(get_ipython and get_ipython()).__name__ == "ZMQInteractiveShell":  # a notebook
        return True
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def _resolve_progress(progress: Any) -> Any:
    """fit's ``progress="auto"``: True when ``_interactive()``, else None."""
    if isinstance(progress, str):  # "auto", the only string _check_fit_options lets by
        return True if _interactive() else None
    return progress


def _bar_factory(progress: Any) -> Any:
    """What makes fit's bar: the given factory, tqdm.auto's for ``True``, or None
    (no bar; ``True`` without tqdm prints a line per epoch instead)."""
    if progress is None or progress is False:
        return None
    return _tqdm_auto() if progress is True else progress


def _say(bar: Any, text: str) -> None:
    """Print a line, above the bar when it can write (tqdm's ``write``)."""
    if hasattr(bar, "write"):
        bar.write(text)
    else:
        print(text, file=sys.stdout)


def _bar_figures(run: _FitRun) -> dict[str, str]:
    """The bar's postfix apart from epoch and running loss: the last validation figures."""
    evaluated = run.history._evaluated()
    if not evaluated:
        return {}
    last = evaluated[-1]
    shown = {"val_loss": _people(last.val_loss)}
    if last.val_metric is not None:
        shown[f"val_{run.history.metric or 'metric'}"] = _people(last.val_metric)
    return shown


def _bar_show(bar: Any, epoch: str, loss: float, figures: dict[str, str]) -> None:
    if hasattr(bar, "set_postfix"):
        bar.set_postfix({"epoch": epoch, "loss": _people(loss), **figures}, refresh=False)


def _fit_steps(run: _FitRun, plan: _FitPlan, bar: Any) -> _FitRun:
    """The fold of ``train_step`` (``data_parallel_step`` under MPI) over the rest of
    epoch ``run.epoch + 1``, written out so that an interrupt ends it at the last
    completed step: in one process a KeyboardInterrupt in a step, the data or the
    bar; under MPI a Ctrl-C on any rank, agreed on after every step.  NaN/inf
    raises NonFiniteError with the epoch and history."""
    epoch, ranks = run.epoch + 1, plan.ranks
    state = run.state if run.batch else attrs.evolve(run.state, loss_sum=0.0, seen=0)
    first = state.step - run.batch  # the global step at the start of the epoch
    label, figures = f"{epoch}/{plan.epochs}", (_bar_figures(run) if bar is not None else {})
    try:
        for batch in plan.batches(epoch, run.batch):
            state = ranks.step(state, batch)
            if bar is not None:
                _noting(ranks, _bar_step, bar, label, state.mean_loss, figures)
            if ranks.any(ranks.interrupt.is_set())[0]:
                return attrs.evolve(run, state=state, batch=state.step - first, stop="interrupted")
    except KeyboardInterrupt:
        if ranks.comm is not None:
            raise  # inside a step, where the ranks cannot agree to stop: fit ends with it
        return attrs.evolve(run, state=state, batch=state.step - first, stop="interrupted")
    except NonFiniteError as err:
        raise NonFiniteError(
            f"{err} (epoch {epoch}); the last finite network is on this exception's .network",
            network=err.network,
            history=attrs.evolve(run.history, stop_reason="non_finite", steps=err.step),
            epoch=epoch,
            step=err.step,
        ) from None
    return attrs.evolve(run, state=state, batch=state.step - first)


def _bar_step(bar: Any, label: str, loss: float, figures: dict[str, str]) -> None:
    _bar_show(bar, label, loss, figures)
    bar.update(1)


def _lead_evaluation(
    net: Network, validation: tuple[np.ndarray, np.ndarray], plan: _FitPlan
) -> tuple[float, float | None] | None:
    """(val_loss, metric) of ``net`` on the whole validation set, computed by rank 0
    and shared with every rank (so all keep the same best network and stop alike);
    None when a KeyboardInterrupt cut the evaluation short."""

    def evaluate() -> list[float]:
        x_val, y_val = validation
        loss, score = _evaluate(net, x_val, y_val, plan.metric, max(plan.batch_size, 1024))
        return [loss, math.nan if score is None else score]

    shared = plan.ranks.on_lead(evaluate, 2, "the evaluation")
    if shared is None:
        return None
    loss, score = shared
    return loss, (None if plan.metric is None else score)


def _fit_epoch_end(run: _FitRun, plan: _FitPlan) -> _FitRun | None:
    """Average the ranks' BatchNorm statistics and training loss, evaluate when due,
    append the epoch's record, keep the best evaluated network, count the
    evaluations without improvement and flag an early stop.  None when the
    evaluation was interrupted (then there is no record)."""
    epoch, ranks = run.epoch + 1, plan.ranks
    state = attrs.evolve(run.state, net=ranks.sync(run.state.net))
    train_loss = ranks.mean_loss(state)
    run = attrs.evolve(run, state=state)
    due = epoch % plan.eval_every == 0 or epoch == plan.epochs
    if plan.validation is None or not due:
        record = EpochRecord(epoch, train_loss)
        history = attrs.evolve(run.history, records=run.history.records + (record,))
        return attrs.evolve(run, epoch=epoch, batch=0, history=history)
    evaluation = _lead_evaluation(state.net, plan.validation, plan)
    if evaluation is None:
        return None
    val_loss, score = evaluation
    record = EpochRecord(epoch, train_loss, val_loss, score)
    history = attrs.evolve(run.history, records=run.history.records + (record,))
    run = attrs.evolve(run, epoch=epoch, batch=0, history=history)
    if val_loss < run.best_loss:
        history = attrs.evolve(history, best_epoch=epoch)
        return attrs.evolve(run, history=history, best=run.state.net, best_loss=val_loss, bad=0)
    stop = plan.patience is not None and run.bad + 1 >= plan.patience
    return attrs.evolve(run, bad=run.bad + 1, stop="early_stopping" if stop else None)


def _format_record(r: EpochRecord, metric: str | None) -> str:
    text = f"epoch {r.epoch}: train_loss={r.train_loss:.4f}"
    if r.val_loss is not None:
        text += f" val_loss={r.val_loss:.4f}"
    if r.val_metric is not None:
        text += f" val_{metric or 'metric'}={r.val_metric:.4f}"
    return text


def _report(run: _FitRun, plan: _FitPlan, bar: Any) -> None:
    """After an epoch's record: the bar's figures, the epoch's line, an early stop."""
    if bar is not None:
        record = run.history.records[-1]
        epoch = f"{record.epoch}/{plan.epochs}"
        _bar_show(bar, epoch, record.train_loss, _bar_figures(run))
    if plan.lines:
        _say(bar, _format_record(run.history.records[-1], run.history.metric))
    if plan.talk and run.stop == "early_stopping":
        _say(
            bar,
            f"early stopping after epoch {run.epoch}: no lower validation loss in "
            f"{plan.patience} evaluation{'' if plan.patience == 1 else 's'}; returning the best "
            f"network, from epoch {run.history.best_epoch}",
        )


def _callback_says_stop(run: _FitRun, plan: _FitPlan) -> bool:
    """``callback(record)`` on rank 0: ``False`` itself (or numpy's) or StopTraining asks
    to end training; a KeyboardInterrupt in it is recorded as an interrupt."""
    if plan.callback is None:
        return False

    def ask() -> list[float]:
        try:
            answer = plan.callback(run.history.records[-1])
        except StopTraining:
            return [1.0]
        return [float(answer is False or answer is np.False_)]

    shared = plan.ranks.on_lead(ask, 1, "the callback")
    if shared is None:
        plan.ranks.interrupt.set()
        return False
    return shared[0] > 0


def _fit_epoch(run: _FitRun, plan: _FitPlan, bar: Any) -> _FitRun:
    """An epoch's end: its record, the report, the checkpoint (before the callback:
    nothing is lost), the callback, and then every rank's interrupt and the
    callback's answer, agreed on by all ranks."""
    ended = _fit_epoch_end(run, plan)
    if ended is None:  # the evaluation was interrupted: stop before the record
        return attrs.evolve(run, stop="interrupted")
    run, ranks = ended, plan.ranks
    _noting(ranks, _report, run, plan, bar)
    due = run.epoch % plan.checkpoint_every == 0 or run.epoch == plan.epochs
    saving = due or run.stop is not None
    if plan.checkpoint is not None and saving and not _fit_checkpoint(plan.checkpoint, run, plan):
        ranks.interrupt.set()  # the old file stays; the stop saves again
    asked = _callback_says_stop(run, plan)
    interrupted, callback = ranks.any(ranks.interrupt.is_set(), asked)
    if interrupted:
        return attrs.evolve(run, stop="interrupted")
    if not callback or run.stop is not None:
        return run
    if plan.talk:
        _noting(ranks, _say, bar, f"training stopped by the callback after epoch {run.epoch}")
    return attrs.evolve(run, stop="callback")


def _fit_loop(run: _FitRun, plan: _FitPlan, bar: Any) -> _FitRun:
    """Epoch after epoch until done or stopped.  A KeyboardInterrupt ends training
    at the last completed stage (``run`` is rebound only when a stage is done): in
    one process wherever it comes from; under MPI where all ranks agree (see
    _Ranks), while one that escapes a collective stage ends fit with it."""
    try:
        while run.stop is None and run.epoch < plan.epochs:
            run = _fit_steps(run, plan, bar)
            if run.stop is None:
                run = _fit_epoch(run, plan, bar)
    except KeyboardInterrupt:
        if plan.ranks.comm is not None:
            raise
        run = attrs.evolve(run, stop="interrupted")
    return run


def _interrupt_message(run: _FitRun, plan: _FitPlan) -> str:
    n = plan.steps_per_epoch
    if run.batch == 0:
        where = f"after epoch {run.epoch}"
    elif run.batch == n:
        where = f"after the last step of epoch {run.epoch + 1}, before its record"
    else:
        where = f"in epoch {run.epoch + 1} after step {run.batch} of {n}"
    saved = f"; checkpoint saved to {plan.checkpoint!r}" if plan.checkpoint else ""
    return (
        f"fit interrupted {where}: returning the network after {run.state.step} steps "
        f"(history.interrupted is True){saved}"
    )


def _fit_result(run: _FitRun, plan: _FitPlan) -> tuple[Network, History]:
    """Average BatchNorm statistics after a mid-epoch stop, checkpoint a stop the last
    save does not know of, warn (rank 0) after an interrupt, and pick the network:
    the best evaluated one with early stopping, else the last; the same on every rank."""
    if run.batch:
        run = attrs.evolve(run, state=attrs.evolve(run.state, net=plan.ranks.sync(run.state.net)))
    saving = run.stop in ("callback", "interrupted")
    if plan.checkpoint is not None and saving and not _fit_checkpoint(plan.checkpoint, run, plan):
        raise KeyboardInterrupt  # a second Ctrl-C, while fit saves what it has, aborts
    if run.stop == "interrupted" and plan.ranks.lead:
        warnings.warn(_interrupt_message(run, plan), UserWarning, stacklevel=3)
    history = attrs.evolve(run.history, stop_reason=run.stop or "completed", steps=run.state.step)
    keep_best = plan.patience is not None and run.stop != "interrupted"
    return (run.best if keep_best else run.state.net), history


def _start_run(net: Network, optimizer: Any, step_key: Key, plan: _FitPlan, resume: Any) -> _FitRun:
    if resume is None:
        history = History(metric=_metric_name(plan.metric))
        return _FitRun(TrainState.create(net, optimizer, step_key), 0, history, net)
    run = _resume_fit(resume, net, optimizer, step_key, plan)
    if run.epoch + (run.batch > 0) > plan.epochs:
        raise ValueError(
            f"resume: the checkpoint is at epoch {run.epoch + (run.batch > 0)}, past "
            f"epochs={plan.epochs} (epochs counts the total, not the epochs to add)"
        )
    return run


def _fit_optimizer(optimizer: Any, comm: Any) -> Any:
    """fit's optimizer: with ``comm``, ``AllReduce(comm)`` first in its chain (put
    there when it is not); without, it must not all-reduce."""
    before = optimizer.before if isinstance(optimizer, Chain) else ()
    if not any(isinstance(p, AllReduce) for p in before):
        if comm is None or not _is_optimizer(optimizer):  # TrainState.create names the latter
            return optimizer
        if isinstance(optimizer, Chain):
            return chain(AllReduce(comm), *before, optimizer.optimizer, *optimizer.after)
        return chain(AllReduce(comm), optimizer)
    if comm is None:
        raise ValueError(
            "optimizer averages gradients over MPI ranks (AllReduce) but fit got no comm: "
            "pass fit(..., comm=comm) so that each rank trains on its shard of every batch"
        )
    _check_all_reduce_first(optimizer, comm, "optimizer")
    return optimizer


# Keras's fit keywords and what dlfs.fit takes instead.
_KERAS_FIT = {
    "validation_data": "validation=(x_val, y_val)",
    "validation_split": (
        "validation=(x_val, y_val) with rows you hold out, e.g. x, y = dlfs.permute(0, x, y); "
        "n = len(x) // 5; dlfs.fit(net, opt, x[n:], y[n:], validation=(x[:n], y[:n]), ...)"
    ),
    "callbacks": "callback=fn, one function called with each EpochRecord",
    "learning_rate": "the optimizer's lr, e.g. dlfs.fit(net, dlfs.Adam(lr=1e-3), ...)",
    "lr": "the optimizer's lr, e.g. dlfs.fit(net, dlfs.Adam(lr=1e-3), ...)",
}


def _fit_keyword_fix(name: str) -> str:
    """fit's message for a keyword it does not take: the dlfs spelling of a Keras
    keyword, else the closest of its own."""
    import difflib
    import inspect

    if name in _KERAS_FIT:
        return f"fit must not be given {name}= (a Keras keyword); dlfs takes {_KERAS_FIT[name]}"
    known = [p for p in inspect.signature(fit).parameters if p != "unknown"]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f": did you mean {close[0]}=?" if close else f"; it takes {', '.join(known)}"
    return f"fit got an unexpected keyword argument {name!r}, it must be one of its own{hint}"


def fit(
    net: Network,
    optimizer: Optimizer,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int = 32,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    eval_every: int = 1,
    seed: int | Key = 0,
    shuffle: bool = True,
    drop_last: bool = False,
    early_stopping: bool | None = None,
    patience: int | None = None,
    metric: Metric | Literal["auto"] | None = "auto",
    verbose: bool = False,
    callback: Callable[[EpochRecord], Any] | None = None,
    progress: bool | ProgressFactory | Literal["auto"] | None = "auto",
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 1,
    resume: str | os.PathLike | None = None,
    comm: Comm | None = None,
    **unknown: Any,
) -> tuple[Network, History]:
    """Train ``net`` (the book's Trainer.fit); returns (trained network, History).

    x: (N, *net.input_shape) float array of the network's dtype (ints are
    rejected with a TypeError, never cast), or integer token ids when the
    first layer is an Embedding; y: (N, ...) targets for the loss
    (float, or integer labels in [0, K) for SoftmaxCrossEntropy).  Both are
    checked whole before the first step.  Each epoch shuffles with a key
    derived from ``seed`` and folds ``train_step`` over batches of
    ``batch_size`` (``drop_last`` skips a last, smaller batch, as PyTorch's
    DataLoader does).  With ``validation=(x_val, y_val)`` the network is
    evaluated every ``eval_every`` epochs and after the last; that only
    monitors.  Early stopping is opt-in: ``patience=N`` (or
    ``early_stopping=True``, patience 1: the book's Trainer) stops once the
    validation loss has not improved for N evaluations and returns the best
    evaluated network; otherwise the last network is returned.  ``metric``
    (default: accuracy for classification losses) goes in the history.

    ``callback(record)`` runs after every epoch; returning ``False`` itself
    (not None or another falsy value) or raising ``StopTraining`` ends
    training.  ``verbose`` prints a line per epoch; ``progress=True`` shows
    one bar over all steps (tqdm.auto; a line per epoch without tqdm) with
    the running loss and the last validation figures; the default
    ``progress="auto"`` does that only where someone watches (a Jupyter
    notebook, or stderr is a terminal), and shows nothing in CI logs, pipes,
    files or on MPI ranks other than 0; ``False``/``None``: nothing.  Or pass
    a tqdm-like factory called as
    ``progress(total=steps, desc="fit")`` (``update``, ``close``, and
    ``set_postfix(dict, refresh=False)`` if it has one).  A KeyboardInterrupt
    (Ctrl-C, Jupyter's stop button) ends training cleanly: fit warns
    (``warnings.warn``) and returns the network after the last completed
    step with ``history.interrupted`` True, having written ``checkpoint``
    first.  The input network is never modified.

    ``checkpoint=path`` saves (see ``save``) the network, optimizer state,
    position, history and early-stopping state every ``checkpoint_every``
    epochs, after the last, and when training stops early or is interrupted
    (mid-epoch too).  ``resume=path`` continues from such a file: ``epochs``
    is the total, and the result is bit-identical to one uninterrupted call
    (same data, ``seed``, ``shuffle``, ``batch_size``, ``drop_last``,
    early-stopping settings and optimizer, checked where possible; ``net``
    must have the saved architecture; with validation, the extra evaluation
    at the last epoch of the first call may change early stopping unless
    ``eval_every`` divides that epoch).  A NaN/inf loss or gradient raises
    NonFiniteError with ``.network`` (the last finite one), ``.history``,
    ``.epoch``, ``.step``.

    ``comm=`` an MPI communicator (mpi4py's ``MPI.COMM_WORLD``, duck-typed as for
    ``AllReduce``) trains data-parallel: every rank calls fit with the same
    arguments and the whole data set, each epoch folds ``data_parallel_step``
    (rank r trains on its ``shard`` of every global batch of ``batch_size``),
    and fit puts ``AllReduce(comm)`` first in the optimizer's chain when it is
    not there (an optimizer that all-reduces without ``comm`` is refused).  The
    record's ``train_loss`` is ``global_mean_loss``; after every epoch
    ``sync_state`` averages BatchNorm's running statistics, so every rank holds
    and returns the same network and history.  Rank 0 alone evaluates (its
    figures are sent to all), prints, shows progress, calls ``callback`` and
    writes ``checkpoint`` (whose folder every rank must see); every rank reads
    ``resume``, which must come from a run with as many ranks (the checkpoint
    keeps each rank's running loss, so the resumed run is bit-identical to an
    uninterrupted one).  Stops are agreed by all ranks, so none waits alone in
    an all-reduce: early stopping from rank 0's figures, the callback's answer
    after each epoch, and Ctrl-C after the step in progress (mpiexec forwards
    SIGINT to every rank; fit, in the main thread, records it instead of
    raising, so all ranks stop after the same step and rank 0 saves; a second
    SIGINT raises KeyboardInterrupt on that rank, which aborts).  Dropout masks
    and BatchNorm batch statistics are per rank: see ``data_parallel_step``.

    Any other keyword raises a TypeError with the dlfs spelling: Keras's
    ``validation_data=``/``validation_split=`` (use ``validation=``),
    ``callbacks=`` (``callback=``), a learning rate (the optimizer's ``lr``).

    >>> rng = dlfs.make_rng(0)
    >>> x = rng.standard_normal((200, 2), dtype=np.float32)
    >>> y = (x[:, 0] > x[:, 1]).astype(np.int64)  # two classes, split by a line
    >>> net = dlfs.network(0, 2, [dlfs.dense(8, dlfs.ReLU()), dlfs.dense(2)], dlfs.SoftmaxCrossEntropy())
    >>> trained, history = dlfs.fit(
    ...     net, dlfs.Adam(0.05), x[:150], y[:150], epochs=10, validation=(x[150:], y[150:])
    ... )
    >>> history.epochs[-1], history.metric, history.val_metric[-1] > 0.9
    (10, 'accuracy', True)
    >>> trained.evaluate(x[150:], y[150:])["accuracy"] == history.val_metric[-1]
    True
    """
    if unknown:
        raise TypeError(_fit_keyword_fix(next(iter(unknown))))
    if not isinstance(net, Network):
        raise TypeError(f"net must be a dlfs.Network, got {type(net).__name__}")
    _check_head(net)
    ranks = _Ranks.of(comm)
    optimizer = _fit_optimizer(optimizer, comm)
    epochs = _check_int("epochs", epochs)
    batch_size = _check_int("batch_size", batch_size)
    eval_every = _check_int("eval_every", eval_every)
    checkpoint_every = _check_int("checkpoint_every", checkpoint_every)
    key = _as_key("seed", seed)
    _check_fit_options(
        shuffle=shuffle,
        drop_last=drop_last,
        early_stopping=early_stopping,
        verbose=verbose,
        callback=callback,
        progress=progress,
    )
    patience = _resolve_early_stopping(early_stopping, patience, validation)
    if checkpoint is not None:  # fail now, not after the first epoch
        checkpoint = _check_checkpoint_path("checkpoint", checkpoint)
    _check_dataset(net, x, y)
    if validation is not None:
        if not isinstance(validation, tuple) or len(validation) != 2:
            raise TypeError("validation must be a tuple (x_val, y_val)")
        _check_dataset(net, *validation, "validation ")
        validation = (_plain(validation[0]), _plain(validation[1]))
    x, y = _plain(x), _plain(y)
    _check_batch_rows(net, len(x), batch_size, bool(drop_last), ranks.size)
    metric = _resolve_metric(metric, net.loss)
    shuffle_key, step_key = split(key, 2)
    progress = _resolve_progress(progress) if ranks.lead else None
    factory = _bar_factory(progress) if ranks.lead else None
    plan = _FitPlan(
        x=x,
        y=y,
        validation=validation,
        epochs=epochs,
        batch_size=batch_size,
        drop_last=bool(drop_last),
        shuffle_key=shuffle_key if shuffle else None,
        eval_every=eval_every,
        patience=patience,
        metric=metric,
        lines=ranks.lead and (bool(verbose) or (progress is True and factory is None)),
        talk=ranks.lead and (bool(verbose) or progress not in (None, False)),
        callback=callback,  # called on rank 0 only
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        setup={
            "seed": list(key),
            "shuffle": bool(shuffle),
            "batch_size": batch_size,
            "drop_last": bool(drop_last),
            "n": len(x),
            "validation": validation is not None,
            "eval_every": eval_every,
            "early_stopping": patience is not None,
            "patience": patience,
            "ranks": ranks.size,
        },
        ranks=ranks,
    )
    run = _start_run(net, optimizer, step_key, plan, resume)
    done = run.epoch * plan.steps_per_epoch + run.batch
    bar = (
        None if factory is None else factory(total=epochs * plan.steps_per_epoch - done, desc="fit")
    )
    with _sigint_recorded(ranks):
        try:
            run = _fit_loop(run, plan, bar)
        finally:
            _let_go_step_buffers()
            if bar is not None:
                bar.close()
        return _fit_result(run, plan)


# ------------------------------------------------------------------- metrics


class Metric(Protocol):
    """What ``fit(metric=...)`` and ``Network.evaluate(metric=...)`` take:
    ``metric(pred, target) -> float`` on a whole data set, pred: (N, ...) the
    network's outputs, target: (N, ...) as for the loss.  Its ``__name__``
    names it in the history (``val_<name>``).  ``accuracy``, ``mae`` and
    ``rmse`` are metrics; so is any such function:

    >>> def max_error(pred, target):
    ...     return float(np.abs(pred - target).max())
    >>> net = dlfs.network(0, 2, [dlfs.dense(1)], dlfs.MeanSquaredError())
    >>> x, y = np.ones((4, 2), np.float32), np.ones((4, 1), np.float32)
    >>> sorted(net.evaluate(x, y, metric=max_error))
    ['loss', 'max_error']
    """

    def __call__(self, pred: np.ndarray, target: np.ndarray, /) -> float: ...


def _check_pair(pred: Any, target: Any) -> None:
    _check_pred("pred", pred)
    _check_same_shape(pred, target)


def mae(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean absolute error: mean(|p - y|); pred, target: (N, ...) of the same shape.

    >>> dlfs.mae(np.array([[1.0], [2.0]]), np.array([[1.5], [1.0]]))
    0.75
    """
    _check_pair(pred, target)
    return float(np.mean(np.abs(pred - target)))


def rmse(pred: np.ndarray, target: np.ndarray) -> float:
    """Root mean squared error: sqrt(mean((p - y)^2)); pred, target: (N, ...) of
    the same shape.

    >>> dlfs.rmse(np.array([[1.0], [2.0]]), np.array([[4.0], [6.0]]))  # sqrt((9 + 16) / 2)
    3.5355339059327378
    """
    _check_pair(pred, target)
    return float(np.sqrt(np.mean((pred - target) ** 2)))


def accuracy(pred: np.ndarray, target: np.ndarray) -> float:
    """Fraction of correct class predictions: mean(argmax_k pred == label).

    pred: (N, K) scores, K > 1; target: integer labels (N,) or one-hot (N, K).
    A single binary logit per row, pred (N,) or (N, 1), is scored as
    ``binary_accuracy`` (z > 0 against t > 0.5); for multi-label BCE outputs
    (N, K) call ``binary_accuracy`` directly.  Sequences, pred (N, T, K) with
    labels (N, T) or one-hot (N, T, K), count every position.

    >>> scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    >>> dlfs.accuracy(scores, np.array([0, 1, 1]))
    0.6666666666666666
    """
    _check_pred("pred", pred)
    if pred.ndim == 3:
        n, t, k = pred.shape
        _check_ndarray("target", target)
        if target.shape not in ((n, t), (n, t, k)):
            raise ValueError(
                f"target must have shape (N, T) = {(n, t)} or (N, T, K) = {pred.shape} "
                f"for sequence predictions, got {target.shape}"
            )
        return accuracy(pred.reshape(n * t, k), target.reshape(n * t, *target.shape[2:]))
    if pred.ndim == 1 or (pred.ndim == 2 and pred.shape[1] == 1):
        return binary_accuracy(pred, target)
    _check_shape("pred", pred, (None, "K"))
    _check_ndarray("target", target)
    if target.ndim == 2:
        if target.dtype.kind not in "biuf":
            raise TypeError(
                f"one-hot target must be a real numeric array, got dtype {target.dtype}"
            )
        if target.shape != pred.shape:
            raise ValueError(f"one-hot target must have shape {pred.shape}, got {target.shape}")
        labels = target.argmax(axis=1)
    elif np.issubdtype(target.dtype, np.integer):
        labels = target
    else:
        raise TypeError(f"target must be integer labels (N,) or one-hot (N, K), got {target.dtype}")
    _check_labels(labels, len(pred), pred.shape[1])
    return float(np.mean(pred.argmax(axis=1) == labels))


def binary_accuracy(logits: np.ndarray, target: np.ndarray) -> float:
    """Fraction of correct binary decisions, entry by entry: mean((z > 0) == (t > 0.5)).

    logits, target: (N,) or (N, K) of equal shape (K independent labels).

    >>> dlfs.binary_accuracy(np.array([[2.0], [-1.0]]), np.array([[1.0], [1.0]]))
    0.5
    """
    _check_pred("logits", logits)
    _check_ndarray("target", target)
    if target.dtype.kind not in "biuf":
        raise TypeError(f"target must be a real numeric array, got dtype {target.dtype}")
    if target.shape != logits.shape:
        raise ValueError(f"target must have shape {logits.shape}, got {target.shape}")
    return float(np.mean((logits > 0) == (target > 0.5)))


def confusion_matrix(
    y_true: np.ndarray, y_pred: np.ndarray, n_classes: int | None = None
) -> np.ndarray:
    """Counts C[i, j] = #{n : y_true_n = i and y_pred_n = j}: rows are the true
    classes, columns the predicted ones.  Same call and layout as scikit-learn's
    ``confusion_matrix(y_true, y_pred)``: true labels first.

    y_true: integer labels (N,); y_pred: class ids (N,) (e.g.
    ``net.predict_classes(x)``) or scores (N, K), K > 1, whose argmax is taken;
    ``n_classes``: K (default: the scores' K, else the largest id + 1).
    -> (K, K) int64.

    >>> dlfs.confusion_matrix(np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2]))
    array([[1, 0, 0],
           [0, 1, 0],
           [0, 1, 1]])
    """
    _check_ndarray("y_true", y_true)
    _check_ndarray("y_pred", y_pred)
    if y_true.dtype.kind == "f" and y_true.ndim == 2 and y_pred.dtype.kind in "iu":
        raise TypeError(
            f"y_true must be integer labels (N,), got {y_true.dtype} scores of shape "
            f"{y_true.shape}: the arguments are (y_true, y_pred), true labels first, as in "
            "scikit-learn; write confusion_matrix(labels, scores)"
        )
    if y_pred.dtype.kind == "f" and y_pred.ndim == 2 and y_pred.shape[1] > 1:
        _check_finite("y_pred", y_pred)
        k_scores: int | None = y_pred.shape[1]
        y_pred = y_pred.argmax(axis=1)
    elif y_pred.dtype.kind in "iu" and y_pred.ndim == 1:
        k_scores = None
    else:
        raise TypeError(
            f"y_pred must be integer class ids (N,) or float scores (N, K) with K > 1, got "
            f"{y_pred.dtype} of shape {y_pred.shape}; for one binary logit per row pass "
            "net.predict_classes(x)"
        )
    if y_true.dtype.kind not in "iu":
        raise TypeError(f"y_true must be integer labels, got dtype {y_true.dtype}")
    if y_true.shape != y_pred.shape:
        raise ValueError(
            f"y_true must be integer labels of shape {y_pred.shape} (one per prediction), "
            f"got {y_true.dtype} of shape {y_true.shape}"
        )
    _check_nonempty("y_true", y_true)
    if y_pred.min() < 0 or y_true.min() < 0:
        raise ValueError("y_true and y_pred must be class ids >= 0")
    needed = max(int(y_pred.max()), int(y_true.max())) + 1
    if n_classes is None:
        k = k_scores or needed
    else:
        k = _check_int("n_classes", n_classes)
        if k < needed:
            raise ValueError(
                f"n_classes must be at least {needed} (the largest class id + 1), got {k}"
            )
        if k_scores is not None and k != k_scores:
            raise ValueError(f"n_classes must match the scores' K={k_scores}, got {k}")
    flat = y_true.astype(np.int64) * k + y_pred.astype(np.int64)
    counts = np.bincount(flat, minlength=k * k)
    return counts.reshape(k, k)


# ------------------------------------------------------------ data utilities


def to_2d(a: np.ndarray, kind: str = "col") -> np.ndarray:
    """The book's ``to_2d_np``: a 1-D array (N,) as a column (N, 1) or a row (1, N).

    >>> dlfs.to_2d(np.array([1.0, 2.0])).shape, dlfs.to_2d(np.array([1.0, 2.0]), "row").shape
    ((2, 1), (1, 2))
    """
    _check_ndarray("a", a)
    if a.ndim != 1:
        raise ValueError(f"a must be 1-D, got shape {a.shape}")
    if not isinstance(kind, str):
        raise TypeError(f"kind must be the string 'col' or 'row', got {type(kind).__name__}")
    if kind not in ("col", "row"):
        raise ValueError(f"kind must be 'col' or 'row', got {kind!r}")
    return a.reshape(-1, 1) if kind == "col" else a.reshape(1, -1)


def one_hot(labels: np.ndarray, n_classes: int, dtype: FloatDType = np.float32) -> np.ndarray:
    """Integer labels (N,) in [0, K) -> one-hot (N, K): out[n, labels[n]] = 1.

    >>> dlfs.one_hot(np.array([2, 0]), 3)
    array([[0., 0., 1.],
           [1., 0., 0.]], dtype=float32)
    """
    _check_ndarray("labels", labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must be an integer array, got dtype {labels.dtype}")
    k = _check_int("n_classes", n_classes)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D (N,), got shape {labels.shape}")
    _check_labels(labels, labels.shape[0], k)
    out = np.zeros((len(labels), k), dtype=_check_dtype(dtype))
    out[np.arange(len(labels)), labels] = 1
    return out


def permute(key: int | Key, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """The book's ``permute_data``: the same random row order applied to each array;
    arrays: each (N, ...) -> new arrays of the same shapes.

    >>> x, y = np.arange(4.0)[:, None], np.arange(4)
    >>> px, py = dlfs.permute(0, x, y)
    >>> bool((px[:, 0] == py).all()), sorted(py.tolist())  # rows stay paired
    (True, [0, 1, 2, 3])
    """
    if not arrays:
        raise ValueError("permute needs at least one array")
    for i, a in enumerate(arrays):
        _check_ndarray(f"arrays[{i}]", a)
        if a.ndim == 0 or len(a) != len(arrays[0]):
            raise ValueError(
                f"arrays must share their first dimension, got {[getattr(b, 'shape', None) for b in arrays]}"
            )
    order = make_rng(key).permutation(len(arrays[0]))
    return tuple(np.take(_plain(a), order, axis=0) for a in arrays)


def batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    key: int | Key | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (x_batch, y_batch) of ``batch_size`` rows, in a random order drawn
    from ``key`` (in order when key is None).  The last batch may be smaller;
    ``drop_last=True`` skips it (PyTorch's DataLoader option).
    x: (N, ...), y: (N, ...) -> pairs (B, ...), B = batch_size.

    >>> x, y = np.zeros((10, 3)), np.arange(10)
    >>> [xb.shape for xb, _ in dlfs.batches(x, y, 4)]
    [(4, 3), (4, 3), (2, 3)]
    >>> [yb.tolist() for _, yb in dlfs.batches(x, y, 4, drop_last=True)]
    [[0, 1, 2, 3], [4, 5, 6, 7]]
    """
    _check_ndarray("x", x)
    if x.ndim == 0:
        raise ValueError(f"x must have a batch axis, got shape {x.shape}")
    _check_xy(x, y)
    batch_size = _check_int("batch_size", batch_size)
    if not isinstance(drop_last, (bool, np.bool_)):
        raise TypeError(f"drop_last must be a bool, got {drop_last!r}")
    key = None if key is None else _as_key("key", key)
    return _epoch_batches(_plain(x), _plain(y), batch_size, key, bool(drop_last))


def _epoch_batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    key: Key | None,
    drop_last: bool,
    start: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``batches`` without the checks, from batch number ``start`` on (a resumed epoch)."""
    n = len(x)
    starts = range(start * batch_size, n - n % batch_size if drop_last else n, batch_size)
    if key is None:
        return ((x[i : i + batch_size], y[i : i + batch_size]) for i in starts)
    order = _rng(key).permutation(n)
    return (
        (np.take(x, idx, axis=0), np.take(y, idx, axis=0))
        for idx in (order[i : i + batch_size] for i in starts)
    )


def random_windows(
    key: int | Key, ids: np.ndarray, context: int, batch_size: int, steps: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``steps`` batches of random windows of a token stream, for training a
    language model by iterations (nanoGPT's ``get_batch``): batch i draws
    ``batch_size`` offsets o uniformly in [0, len(ids) - context) from its own
    key, ``split``-style (key + (i,)), and pairs x = ids[o : o + context] with
    the next ids y = ids[o + 1 : o + context + 1].

    ids: (L,) integer tokens, L > context -> pairs x, y: (batch_size, context)
    int64.  Same key, same batches; an epoch-free fold:
    ``functools.reduce(dlfs.train_step, dlfs.random_windows(key, ids, T, B, steps), state)``.

    >>> ids = np.arange(100)
    >>> x, y = next(dlfs.random_windows(0, ids, context=5, batch_size=2, steps=1))
    >>> x.shape, bool((y == x + 1).all())
    ((2, 5), True)
    """
    key = _as_key("key", key)
    _check_ids("ids", ids, ("L",))
    context, batch_size = _check_int("context", context), _check_int("batch_size", batch_size)
    steps = _check_int("steps", steps, low=0)
    if len(ids) <= context:
        raise ValueError(
            f"ids must hold more than context = {context} tokens (a window and its next "
            f"token), got {len(ids)}"
        )
    if ids.min() < 0:
        raise ValueError(f"ids must be non-negative token ids, got a minimum of {ids.min()}")
    return _windows(key, ids, context, batch_size, steps)


def _windows(
    key: Key, ids: np.ndarray, context: int, batch_size: int, steps: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    span = np.arange(context + 1)
    for i in range(steps):
        offsets = _rng(key + (i,)).integers(0, len(ids) - context, batch_size)
        window = np.take(ids, offsets[:, None] + span).astype(np.int64)
        yield window[:, :-1], window[:, 1:]


# datasets: MNIST (standard library and numpy; heavy modules imported when used)

# Mirrors of the original MNIST files (yann.lecun.com often refuses downloads), tried in order.
_MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
_MNIST_FILES = {  # array name -> standard IDX file name (without .gz)
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_MNIST_MD5 = {  # the published checksums of the four .gz files
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
_MNIST_TIMEOUT = 60.0  # seconds a mirror may stay silent
_IDX_DTYPES = {  # IDX type byte -> big-endian numpy dtype
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _parse_idx(raw: bytes, name: str) -> np.ndarray:
    """Decode one (un-gzipped) IDX file: magic ``00 00 type ndim``, ``ndim``
    big-endian uint32 sizes, then exactly prod(sizes) items; ValueError naming
    ``name`` otherwise.  Returns a native-endian array of shape ``sizes``."""
    if len(raw) < 4:
        raise ValueError(f"{name}: truncated IDX header ({len(raw)} bytes, expected at least 4)")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"{name}: not an IDX file (magic number starts with {raw[:2].hex()}, expected 0000)"
        )
    dtype = _IDX_DTYPES.get(raw[2])
    if dtype is None:
        raise ValueError(f"{name}: unknown IDX data type 0x{raw[2]:02x}")
    ndim = raw[3]
    if ndim == 0:
        raise ValueError(f"{name}: IDX header declares 0 dimensions, expected at least 1")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(
            f"{name}: truncated IDX header ({len(raw)} bytes, expected {header} for {ndim} dims)"
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = math.prod(shape) * dtype.itemsize
    got = len(raw) - header
    if got != expected:
        what = "truncated" if got < expected else "has trailing bytes"
        raise ValueError(
            f"{name}: IDX payload {what}: the header says shape {shape} ({expected} bytes "
            f"expected), got {got} bytes"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _read_idx(path: str) -> np.ndarray:
    """An IDX file, gzipped (told by its magic bytes) or plain."""
    import gzip

    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError) as err:
            raise ValueError(f"{path}: corrupt or truncated gzip file ({err})") from None
    return _parse_idx(raw, path)


def _find_idx(folder: str, base: str) -> str:
    dotted = base.replace("-idx", ".idx")  # a common variant: train-images.idx3-ubyte
    for stem in (base, dotted):
        for name in (stem, f"{stem}.gz"):
            if os.path.isfile(os.path.join(folder, name)):
                return os.path.join(folder, name)
    raise FileNotFoundError(f"{folder}: no {base} or {base}.gz found")


def _check_mnist(data: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """uint8 images (N, H, W), integer labels (N,) in 0..9, train and test alike."""
    for part in ("train", "test"):
        x, y = data[f"x_{part}"], data[f"y_{part}"]
        if x.ndim != 3:
            raise ValueError(f"{source}: x_{part} must have shape (N, H, W), got {x.shape}")
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(
                f"{source}: y_{part} must have shape ({len(x)},) to match x_{part}, got {y.shape}"
            )
        if x.dtype != np.uint8:
            raise TypeError(f"{source}: x_{part} must be uint8, got dtype {x.dtype}")
        if y.dtype.kind not in "iu":
            raise TypeError(f"{source}: y_{part} must be integer labels, got dtype {y.dtype}")
        if y.size and (y.min() < 0 or y.max() > 9):
            raise ValueError(f"{source}: y_{part} labels must be in 0..9, got {y.min()}..{y.max()}")
    if data["x_train"].shape[1:] != data["x_test"].shape[1:]:
        raise ValueError(
            f"{source}: train and test images must have one size, got "
            f"{data['x_train'].shape[1:]} and {data['x_test'].shape[1:]}"
        )
    return data


def _mnist_from_npz(path: str) -> dict[str, np.ndarray]:
    # Open the file ourselves: np.load(path) leaks its handle when a damaged zip fails.
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(0)
        if head != b"PK\x03\x04":  # not a zip: a CSV, an image, a single IDX file, ...
            raise ValueError(
                f"path must be MNIST as an .npz (a zip of x_train, y_train, x_test, y_test) "
                f"or a folder of the four IDX files; {path!r} is neither (it starts with "
                f"{head!r}); leave path out to download MNIST"
            )
        return _mnist_from_zip(path, f)


def _mnist_from_zip(path: str, f: Any) -> dict[str, np.ndarray]:
    with np.load(f, allow_pickle=False) as z:
        missing = [k for k in _MNIST_FILES if k not in z.files]
        if missing:
            raise ValueError(f"{path}: missing arrays {missing}; it has {sorted(z.files)}")
        return _check_mnist({k: z[k] for k in _MNIST_FILES}, path)


def _mnist_from_folder(folder: str) -> dict[str, np.ndarray]:
    data = {k: _read_idx(_find_idx(folder, base)) for k, base in _MNIST_FILES.items()}
    return _check_mnist(data, folder)


def _mnist_cache(cache_dir: Any) -> str:
    """``cache_dir``, else ``$DLFS_DATA/mnist``, else ``~/.cache/dlfs/mnist``."""
    if cache_dir is not None:
        return _check_path("cache_dir", cache_dir)
    root = os.environ.get("DLFS_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "dlfs")
    return os.path.join(root, "mnist")


def _md5_of(path: str) -> str:
    import hashlib

    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch(url: str, dest: str, md5: str) -> None:
    """Stream ``url`` into a temporary file next to ``dest``; move it to ``dest``
    only when its md5 is ``md5``.  Nothing is left behind on failure."""
    import hashlib
    import tempfile
    import urllib.request

    folder, name = os.path.split(dest)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
    try:
        h = hashlib.md5()
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=_MNIST_TIMEOUT) as r:
            for chunk in iter(lambda: r.read(1 << 16), b""):
                h.update(chunk)
                f.write(chunk)
        if h.hexdigest() != md5:
            raise ValueError(
                f"checksum mismatch for {url}: expected md5 {md5}, got {h.hexdigest()} "
                f"({os.path.getsize(tmp)} bytes); the file was not cached"
            )
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def _download_mnist(folder: str) -> str:
    """The four ``.gz`` files in ``folder`` with their published md5s, fetched from the
    mirrors in turn when missing or damaged.  ValueError on a checksum mismatch,
    OSError when no mirror answers; a bad file is never kept."""
    made = _missing_folders(folder)
    os.makedirs(folder, exist_ok=True)
    try:
        _download_mnist_files(folder)
    except BaseException:
        for path in made:  # deepest first: leave no empty cache folder behind
            with contextlib.suppress(OSError):
                os.rmdir(path)
        raise
    return folder


def _missing_folders(folder: str) -> list[str]:
    """The folders ``os.makedirs(folder)`` would create, deepest first."""
    made, path = [], os.path.abspath(folder)
    while not os.path.exists(path):
        made.append(path)
        path = os.path.dirname(path)
    return made


def _download_mnist_files(folder: str) -> None:
    import http.client
    import urllib.error

    for base in _MNIST_FILES.values():
        name = f"{base}.gz"
        dest = os.path.join(folder, name)
        if os.path.isfile(dest) and _md5_of(dest) == _MNIST_MD5[name]:
            continue
        errors: list[tuple[str, Exception]] = []
        for prefix in _MNIST_MIRRORS:
            url = prefix.rstrip("/") + "/" + name
            try:
                _fetch(url, dest, _MNIST_MD5[name])
                break
            # URLError/HTTPError/timeouts are OSErrors; IncompleteRead is an HTTPException.
            except (OSError, ValueError, http.client.HTTPException) as err:
                if isinstance(err, urllib.error.HTTPError):
                    err.close()  # an HTTPError holds the open response
                errors.append((url, err))
        else:
            detail = "; ".join(f"{url}: {e}" for url, e in errors)
            kind = ValueError if all(isinstance(e, ValueError) for _, e in errors) else OSError
            raise kind(
                f"could not download {name} into {folder} (tried {detail}); offline? load a "
                f'copy you have: dlfs.load_mnist("mnist.npz") (or a folder of the IDX files; '
                f"the examples take it as --data PATH)"
            )


def load_mnist(
    path: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    flatten: bool = False,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """MNIST as ``(x_train, y_train), (x_test, y_test)``: float32 images in [0, 1]
    (pixel / 255) and int64 labels in 0..9; 60000 training and 10000 test images.

    Images come as (N, 1, 28, 28), channels first as dlfs's convolutions want,
    or as (N, 784) with ``flatten=True`` for a dense network.  ``path``: an
    ``.npz`` holding uint8 ``x_train`` (N, 28, 28), ``y_train``, ``x_test``,
    ``y_test`` (read without pickle), or a folder of the four standard IDX
    files (each ``.gz`` or not).  ``path=None`` downloads the four ``.gz``
    files once into ``cache_dir``, else ``$DLFS_DATA/mnist``, else
    ``~/.cache/dlfs/mnist``, and reads them from there afterwards; each
    download goes to a temporary file that is kept only when its md5 matches
    the published checksum, and a cached file that no longer matches is
    fetched again.  Standard library and numpy only.

    Here with a file shaped like MNIST's (two blank images per split):

    >>> import os, tempfile
    >>> blank = np.zeros((2, 28, 28), np.uint8)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = os.path.join(folder, "mnist.npz")
    ...     np.savez(path, x_train=blank, y_train=np.array([3, 5]), x_test=blank, y_test=np.array([0, 9]))
    ...     (x_train, y_train), (x_test, y_test) = dlfs.load_mnist(path, flatten=True)
    >>> x_train.shape, x_train.dtype, y_test.tolist()
    ((2, 784), dtype('float32'), [0, 9])
    """
    if not isinstance(flatten, (bool, np.bool_)):
        raise TypeError(f"flatten must be a bool, got {flatten!r}")
    if path is None:
        data = _mnist_from_folder(_download_mnist(_mnist_cache(cache_dir)))
    else:
        path = _check_path("path", path)
        if os.path.isdir(path):
            data = _mnist_from_folder(path)
        elif os.path.isfile(path):
            data = _mnist_from_npz(path)
        else:
            raise FileNotFoundError(
                f"path must be an .npz file or a folder of IDX files; {path!r} not found"
            )

    def images(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32) / np.float32(255.0)
        return x.reshape(len(x), -1) if flatten else x[:, None]

    train = images(data["x_train"]), data["y_train"].astype(np.int64)
    return train, (images(data["x_test"]), data["y_test"].astype(np.int64))


# ----------------------------------------------------------- gradient checks


class GradientCheckError(AssertionError):
    """An analytic gradient disagrees with central finite differences (an
    AssertionError, so pytest reports it as a failed check).

    >>> def square(a):  # y = a^2, with a wrong vjp: dy * a instead of 2 a dy
    ...     return a * a, lambda dy: (dy * a,)
    >>> try:
    ...     dlfs.check_grads(square, [np.array([1.0, 2.0])])
    ... except dlfs.GradientCheckError as err:
    ...     print("caught:", str(err).split(":")[0])
    caught: gradient 0, direction 0
    """


# Rounding error of one evaluation of L = sum(y * dy) in float64, per unit of
# S = sum|y * dy|: a few ulps of the terms (forward pass and sum).  A central
# difference divides the difference of two such errors by 2 eps.
_FD_ROUNDING = 8 * float(np.finfo(np.float64).eps)


def _float64_arg(name: str, a: Any) -> np.ndarray:
    """A float64 ndarray; other sequences go through np.asarray, subclasses are refused."""
    if not isinstance(a, np.ndarray):
        a = np.asarray(a)
    _check_ndarray(name, a)
    if a.dtype != np.float64:
        raise TypeError(f"{name} must be float64 for a finite-difference check, got {a.dtype}")
    return a


def check_grads(
    f: Callable[..., tuple[np.ndarray, Callable[[np.ndarray], Sequence[np.ndarray]]]],
    args: Sequence[np.ndarray],
    *,
    key: int | Key = 0,
    directions: int = 3,
    eps: float = 1e-6,
    atol: float = 1e-7,
    rtol: float = 1e-6,
) -> float:
    """Compare analytic gradients with central differences, in float64.

    ``f(*args) -> (y, vjp)`` where ``vjp(dy)`` returns one gradient per arg;
    ``args`` are float64 arrays (lists go through ``np.asarray``).  With a
    random upstream ``dy`` and L = sum(y * dy), for each arg and each of
    ``directions`` random unit vectors v, checks
    |<grad, v> - (L(a + eps v) - L(a - eps v)) / (2 eps)| <=
    atol + rtol |<grad, v>| + 8 u S / eps, where S = sum|y * dy| and u the
    float64 epsilon: the last term bounds the rounding error of the
    difference, which scales with the terms of L, not with L (they can
    cancel).  Returns the largest error; raises GradientCheckError on a mismatch.
    Each gradient has its arg's shape; y may have any shape (dy is drawn like y).

    >>> def f(w, x):  # y = x @ w, x: (N, D), w: (D, K) -> y: (N, K)
    ...     return x @ w, lambda dy: (x.T @ dy, dy @ w.T)
    >>> rng = dlfs.make_rng(0)
    >>> err = dlfs.check_grads(f, [rng.standard_normal((3, 2)), rng.standard_normal((4, 3))])
    >>> err < 1e-8
    True
    """
    if not callable(f):
        raise TypeError(f"f must be callable(*args) -> (y, vjp), got {type(f).__name__}")
    if not isinstance(args, (tuple, list)):
        raise TypeError(
            f"args must be a list or tuple of float64 arrays, got {type(args).__name__}"
        )
    args = [_float64_arg(f"args[{i}]", a) for i, a in enumerate(args)]
    directions = _check_int("directions", directions)
    eps = _check_number("eps", eps, low=0.0, low_open=True)
    atol = _check_number("atol", atol, low=0.0)
    rtol = _check_number("rtol", rtol, low=0.0)
    rng = make_rng(key)
    y, vjp = f(*args)
    dy = rng.standard_normal(np.shape(y))
    grads = vjp(dy)
    if len(grads) != len(args):
        raise ValueError(f"vjp must return {len(args)} gradients, got {len(grads)}")

    def loss_at(i: int, a: np.ndarray) -> float:
        return float(np.sum(f(*args[:i], a, *args[i + 1 :])[0] * dy))

    rounding = _FD_ROUNDING * float(np.sum(np.abs(y * dy))) / eps
    worst = 0.0
    for i, (a, g) in enumerate(zip(args, grads)):
        if np.shape(g) != a.shape:
            raise ValueError(f"gradient {i} has shape {np.shape(g)}, expected {a.shape}")
        for d in range(directions):
            v = rng.standard_normal(a.shape)
            v /= np.linalg.norm(v) or 1.0
            plus, minus = a + eps * v, a - eps * v
            # The step as stored, not as meant: a + eps v rounds to a's ulps.
            analytic = float(np.sum(g * (plus - minus))) / (2 * eps)
            numeric = (loss_at(i, plus) - loss_at(i, minus)) / (2 * eps)
            err = abs(analytic - numeric)
            worst = max(worst, err)
            tol = atol + rtol * abs(analytic) + rounding
            if not err <= tol:
                raise GradientCheckError(
                    f"gradient {i}, direction {d}: analytic {analytic!r} vs numeric "
                    f"{numeric!r} (error {err:.3g}, tolerance {tol:.3g})"
                )
    return worst


def check_layer(layer: Layer, x: np.ndarray, ctx: Context = EVAL, **kwargs: Any) -> float:
    """``check_grads`` for a layer: its input and every parameter array (float64).

    x: (N, *in_shape), float64 like the layer's arrays; ``kwargs`` go to
    ``check_grads``.  Returns the largest error; GradientCheckError on a mismatch.

    >>> layer = dlfs.Dense.init(0, 3, 2, dtype=np.float64)
    >>> dlfs.check_layer(layer, dlfs.make_rng(1).standard_normal((4, 3))) < 1e-8
    True
    """
    n = len(layer.params())

    def f(x: np.ndarray, *ps: np.ndarray) -> tuple[np.ndarray, Callable]:
        lay = layer.with_params(ps) if n else layer
        y, cache, _ = lay.forward(x, ctx)

        def vjp(dy: np.ndarray) -> tuple[np.ndarray, ...]:
            dx, grads = lay.backward(cache, dy)
            return (dx, *grads)

        return y, vjp

    return check_grads(f, [x, *layer.params()], **kwargs)


def check_loss(loss: Loss, pred: np.ndarray, target: np.ndarray, **kwargs: Any) -> float:
    """``check_grads`` for a loss with respect to its predictions (float64).

    pred: (N, ...) float64; target as the loss takes it.

    >>> logits = dlfs.make_rng(0).standard_normal((4, 3))
    >>> dlfs.check_loss(dlfs.SoftmaxCrossEntropy(), logits, np.array([0, 2, 1, 0])) < 1e-8
    True
    """

    def f(p: np.ndarray) -> tuple[np.ndarray, Callable]:
        value, cache = loss.forward(p, target)
        return np.asarray(value), lambda dy: (loss.backward(cache) * dy,)

    return check_grads(f, [pred], **kwargs)


# ------------------------------------------------------------------ save/load

# The classes ``load`` may rebuild.  Their attrs fields are saved generically
# (array fields as arrays, plain fields as JSON), so supporting a new layer or
# loss is one more entry here.
_SAVABLE_LAYERS: tuple[type, ...] = (
    Dense,
    Linear,
    Sigmoid,
    Tanh,
    ReLU,
    LeakyReLU,
    ELU,
    GELU,
    SiLU,
    Softmax,
    Dropout,
    Flatten,
    BatchNorm,
    Conv2D,
    MaxPool2D,
    AvgPool2D,
    Embedding,
    RNN,
    LSTM,
    GRU,
    LayerNorm,
    SelfAttention,
    PositionalEmbedding,
    Residual,
    TiedEmbedding,
)
_SAVABLE_LOSSES: tuple[type, ...] = (MeanSquaredError, SoftmaxCrossEntropy, BinaryCrossEntropy)

_FORMAT = "dlfs.checkpoint"
_FORMAT_VERSION = 1
_STRUCTURE = "__dlfs_structure__"  # the JSON description, stored as a uint8 array
_NPY_HEADER_MAX = 1 << 16  # bytes an .npy member may hold beyond its array data
_STRUCTURE_MAX = 64 << 20  # the JSON description is small; refuse to inflate a huge one


@attrs.frozen(eq=False)
class Checkpoint:
    """What ``load`` returns.

    ``net``: the saved Network (arrays bit-exact, read-only, of the saved
    shapes and dtypes); ``opt_state``:
    the saved OptState or None (use ``opt_state_for(optimizer)`` to check it
    against an optimizer); ``meta``: the JSON-decoded ``meta`` given to
    ``save`` (tuples come back as lists), ``{}`` if none; ``best``: in a
    checkpoint ``fit`` wrote while validating (with or without early stopping),
    the network of the evaluated epoch with the lowest validation loss so far
    (``meta["dlfs.fit"]["best_epoch"]``) when it is not ``net`` itself; None
    when it is, before the first evaluation (an untrained network is never
    "best"), without validation, and for ``save``'s own checkpoints;
    ``version``/``dlfs_version``: the file format and the dlfs that wrote it.

    >>> import os, tempfile
    >>> net = dlfs.network(0, 3, [dlfs.dense(2)], dlfs.MeanSquaredError())
    >>> opt = dlfs.Adam()
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     dlfs.save(os.path.join(folder, "net.npz"), net, opt.init(net.params()))
    ...     ckpt = dlfs.load(os.path.join(folder, "net.npz"))
    >>> ckpt.version, ckpt.meta, ckpt.best, ckpt.opt_state_for(opt).count
    (1, {}, None, 0)
    """

    net: Network
    opt_state: OptState | None
    meta: dict[str, Any]
    version: int
    dlfs_version: str
    best: Network | None = None

    def opt_state_for(self, optimizer: Optimizer) -> OptState:
        """The saved optimizer state, checked against ``optimizer.init(net.params())``
        (same number of moment slots, shapes and dtypes); ValueError if it differs."""
        if not _is_optimizer(optimizer):
            raise TypeError(f"optimizer must have init/update, got {optimizer!r}")
        if self.opt_state is None:
            raise ValueError("this checkpoint holds no optimizer state (save(..., opt_state=...))")
        params = self.net.params()
        _check_state(optimizer, self.opt_state, params, len(optimizer.init(params).slots))
        return self.opt_state

    def _facts(self) -> list[tuple[str, str]]:
        """(field, description) rows for the reprs; never raises on odd meta."""
        facts = [("net", repr(self.net))]
        if self.opt_state is not None:
            facts.append(("opt_state", f"step {self.opt_state.count:,}"))
        if self.best is not None:
            facts.append(("best", repr(self.best)))
        run = self.meta.get(_FIT_META)
        if isinstance(run, dict):
            where = f"epoch {run.get('epoch')}"
            if run.get("batch"):
                where += f" + {run.get('batch')} steps"
            facts.append(
                ("fit", where + (f", {run['stop_reason']}" if run.get("stop_reason") else ""))
            )
        others = [f"{k}={_short_value(v)}" for k, v in self.meta.items() if k != _FIT_META]
        if others:
            facts.append(("meta", ", ".join(others)))
        facts.append(("format", f"version {self.version}, written by dlfs {self.dlfs_version}"))
        return facts

    def __repr__(self) -> str:
        shown = [f"{k} {v}" if k != "net" else v for k, v in self._facts() if k != "best"]
        if self.best is not None:
            shown.insert(1, "with best network")
        return f"Checkpoint({'; '.join(shown)})"

    def _repr_html_(self) -> str:
        return _html_table(("field", "value"), self._facts(), caption="dlfs checkpoint")


def _short_value(value: Any, width: int = 24) -> str:
    """``repr(value)`` cut to ``width`` characters (a meta value in a one-line repr)."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _check_path(name: str, path: Any) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike path, got {type(path).__name__}")
    path = os.fspath(path)
    if not isinstance(path, str) or not path:
        raise TypeError(f"{name} must be a non-empty text path, got {path!r}")
    return path


# Where a checkpoint file is written.

_TEMP_TAIL = ".0123456789abcdef.tmp"  # the shape of a temporary name's end: 16 hex digits


def _name_max(folder: str) -> int:
    """The longest file name, in bytes, that ``folder``'s file system takes (255 if unknown)."""
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):  # no pathconf (Windows) or no answer
        return 255
    return limit if limit > 0 else 255


def _temp_prefix(folder: str, name: str) -> str:
    """Temporary files for ``name`` are ``prefix + 16 hex digits + '.tmp'``, hidden
    (``prefix`` starts with a dot).  A long name is cut, and tagged with the
    CRC-32 of the whole name, so the temporary name still fits NAME_MAX."""
    room = _name_max(folder) - len(_TEMP_TAIL) - 1
    if len(os.fsencode(name)) <= room:
        return f".{name}"
    tag = f"~{zlib.crc32(os.fsencode(name)):08x}"
    short = name
    while len(os.fsencode(short + tag)) > room:
        short = short[:-1]
    return f".{short}{tag}"


def _check_save_path(name: str, path: Any) -> str:
    """A path ``save`` can write: a file name (not a directory) that fits the file
    system, in a folder that exists.  Checked before anything is computed or written."""
    path = _check_path(name, path)
    if os.path.isdir(path):
        raise IsADirectoryError(
            f"{name} must be a file path, got the directory {path!r}; "
            f"e.g. {os.path.join(path, 'checkpoint.npz')!r}"
        )
    if path.endswith(os.sep) or (os.altsep and path.endswith(os.altsep)):
        raise ValueError(f"{name} must be a file path, got {path!r}, which ends in a separator")
    folder, base = os.path.split(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{name} folder {folder!r} does not exist")
    limit = _name_max(folder)
    if len(os.fsencode(base)) > limit:
        raise ValueError(
            f"{name} file name must fit the file system's limit of {limit} bytes, "
            f"got {len(os.fsencode(base))} bytes ({base[:40]!r}...)"
        )
    return path


def _check_checkpoint_path(name: str, path: Any) -> str:
    """``fit``'s up-front check of ``checkpoint=path``: ``_check_save_path``, and one
    temporary file created and removed beside it, so a folder that cannot be
    written fails now, not after the first epoch."""
    path = _check_save_path(name, path)
    try:
        fd, tmp = _open_temp_beside(path)
    except OSError as err:
        folder = os.path.dirname(os.path.abspath(path))
        raise OSError(
            err.errno, f"{name}: cannot create files in {folder!r} ({err.strerror})"
        ) from None
    os.close(fd)
    os.remove(tmp)
    return path


# A save holds an exclusive flock on its temporary file from creation to rename, so
# a temporary file no one holds locked is provably abandoned: the kernel drops the
# lock of a writer that dies.  Without flock (Windows, a file system without locks)
# only a temporary file not written for a day counts as abandoned.
try:
    import fcntl

    _fcntl: Any = fcntl
except ImportError:  # Windows
    _fcntl = None
_TEMP_MAX_AGE = 86400.0  # seconds


def _remove_abandoned_temps(path: str) -> None:
    """Remove the temporary files that killed saves of ``path`` left behind: only
    names of exactly the shape ``_open_temp_beside`` gives for this path, and only
    those no save is writing (``_remove_if_abandoned``)."""
    folder, name = os.path.split(os.path.abspath(path))
    ours = re.compile(re.escape(_temp_prefix(folder, name)) + r"\.[0-9a-f]{16}\.tmp")
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            if ours.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    _remove_if_abandoned(entry.path)


def _remove_if_abandoned(tmp: str) -> None:
    """Remove ``tmp`` if its lock is free (removed while we hold it), or, where
    there are no locks, if it was not written for ``_TEMP_MAX_AGE`` seconds."""
    if _fcntl is None:  # Windows also refuses to remove a file a writer has open
        if time.time() - os.stat(tmp).st_mtime > _TEMP_MAX_AGE:
            os.remove(tmp)
        return
    fd = os.open(tmp, os.O_RDONLY)
    try:
        try:
            _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
        except BlockingIOError:  # a save is writing it
            return
        except OSError:  # no locks on this file system
            if time.time() - os.fstat(fd).st_mtime <= _TEMP_MAX_AGE:
                return
        os.remove(tmp)
    finally:
        os.close(fd)


def _open_temp_beside(path: str) -> tuple[int, str]:
    """A new, uniquely named hidden file next to ``path``, created with mode 0o666
    so the kernel applies the umask exactly as ``open(path, "w")`` would, and
    locked (flock) where that exists: in use until its descriptor is closed."""
    folder, name = os.path.split(os.path.abspath(path))
    prefix = _temp_prefix(folder, name)
    while True:
        tmp = os.path.join(folder, f"{prefix}.{os.urandom(8).hex()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        if _fcntl is None or _locked_as(fd, tmp):
            return fd, tmp
        os.close(fd)  # another save removed it before we held its lock: a new name


def _locked_as(fd: int, tmp: str) -> bool:
    """Lock ``fd`` (waiting while another save holds it) and say whether ``tmp``
    still names its file: a save that saw it unlocked, just created, removes it."""
    try:
        _fcntl.flock(fd, _fcntl.LOCK_EX)
    except OSError:  # a file system without locks: only the age rule protects it
        return True
    try:
        return os.path.samestat(os.stat(tmp), os.fstat(fd))
    except FileNotFoundError:
        return False


# The JSON description's rules, shared by save and load.

_META_DEPTH = 64  # nesting levels a meta value may have (save and load alike)


def _json_kind(value: Any) -> str:
    """What a JSON value is, in words, for messages."""
    if isinstance(value, bool):
        return "a boolean"
    kinds = ((dict, "an object"), (list, "a list"), (str, "a string"), (int, "an integer"))
    for cls, words in kinds:
        if isinstance(value, cls):
            return words
    if isinstance(value, float):
        return "a number"
    return "null" if value is None else type(value).__name__


def _check_meta(where: str, value: Any, depth: int = 0) -> None:
    """The one rule for ``meta``, applied by ``save`` before writing and by ``load``
    after reading: dicts with str keys, lists (tuples on save; they come back as
    lists), str, int, float (NaN/inf included), bool and None, at most
    ``_META_DEPTH`` levels deep.  TypeError for a type, ValueError for the depth."""
    if depth > _META_DEPTH:
        root = where.split("[", 1)[0]
        raise ValueError(
            f"{root} must be nested at most {_META_DEPTH} levels deep (or it refers to "
            f"itself), got deeper at {where[:60]}..."
        )
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(
                    f"{where} keys must be str (JSON turns others into strings), "
                    f"got {type(k).__name__} {k!r:.40}"
                )
            _check_meta(f"{where}[{k!r:.40}]", v, depth + 1)
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_meta(f"{where}[{i}]", v, depth + 1)
        return
    raise TypeError(
        f"{where} must hold only dicts, lists, str, int, float, bool and None "
        f"(JSON), got {type(value).__name__}"
    )


def _check_structure_size(nbytes: int, what: str) -> None:
    """The JSON description may take at most ``_STRUCTURE_MAX`` bytes (save and load)."""
    if nbytes > _STRUCTURE_MAX:
        raise ValueError(
            f"{what} must take at most {_STRUCTURE_MAX} bytes in the checkpoint's JSON "
            f"description, got {nbytes} bytes"
        )


def _expect(where: str, value: Any, kind: str) -> Any:
    """``value`` read from a checkpoint must be of JSON ``kind`` ("an object",
    "a list", "a string", "an integer", "a number"); ValueError naming ``where``."""
    ok = _json_kind(value) == kind or (kind == "a number" and _json_kind(value) == "an integer")
    if not ok:
        raise ValueError(f"{where} must be {kind}, got {_json_kind(value)} ({value!r:.60})")
    return value


def _get(where: str, record: Any, key: str, kind: str) -> Any:
    """``record[key]`` of JSON ``kind``; ``record`` must be an object holding ``key``."""
    _expect(where, record, "an object")
    if key not in record:
        raise ValueError(f"{where} must have a {key!r} entry, got keys {sorted(record)}")
    return _expect(f"{where}.{key}", record[key], kind)


def _list_of(where: str, value: Any, kind: str) -> list[Any]:
    """A JSON list whose items are all of ``kind``."""
    _expect(where, value, "a list")
    return [_expect(f"{where}[{i}]", v, kind) for i, v in enumerate(value)]


def _json_value(where: str, value: Any) -> Any:
    """A plain config value as JSON: None, bool, int, float, str, tuples of them as lists."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, (tuple, list)):
        return [_json_value(where, v) for v in value]
    raise TypeError(
        f"cannot save {where} of type {type(value).__name__}: layers and losses may hold "
        "arrays, numbers, strings, None and tuples of them"
    )


def _from_json_value(value: Any) -> Any:
    return tuple(_from_json_value(v) for v in value) if isinstance(value, list) else value


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).view(np.uint8).reshape(-1).data)


def _add_array(arrays: dict[str, np.ndarray], name: str, a: Any) -> str:
    if type(a) is not np.ndarray or a.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"cannot save {name}: only plain float32/float64 arrays are saved, got "
            f"{getattr(a, 'dtype', type(a).__name__)}"
        )
    arrays[name] = a
    return name


def _record_structure(
    kind: str, obj: Any, known: tuple[type, ...], prefix: str, arrays: dict[str, np.ndarray]
) -> dict[str, Any]:
    """{"type", "config", "arrays"} of an attrs layer/loss; its arrays go into
    ``arrays``.  A layer holding a sub-chain (Residual, TiedEmbedding) adds
    {"layers": [its layers' records]}."""
    cls = type(obj)
    if cls not in known:
        names = ", ".join(c.__name__ for c in known)
        raise TypeError(f"cannot save {kind} {cls.__name__}: save knows dlfs's {kind}s {names}")
    config, refs = {}, {}
    record: dict[str, Any] = {"type": cls.__name__}
    for f in attrs.fields(cls):
        if not f.init:
            continue
        value = getattr(obj, f.name)
        if isinstance(value, np.ndarray):
            refs[f.name] = _add_array(arrays, f"{prefix}.{f.name}", value)
        elif cls in _CHAINS and f.name == "layers":
            record["layers"] = [
                _record_structure(kind, sub, known, f"{prefix}.layers.{j}", arrays)
                for j, sub in enumerate(value)
            ]
        else:
            config[f.name] = _json_value(f"{cls.__name__}.{f.name}", value)
    return {**record, "config": config, "arrays": refs}


def _network_structure(net: Any, prefix: str, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    if not isinstance(net, Network):
        raise TypeError(f"net must be a dlfs.Network, got {type(net).__name__}")
    layers = [
        _record_structure("layer", layer, _SAVABLE_LAYERS, f"{prefix}.layers.{i}", arrays)
        for i, layer in enumerate(net.layers)
    ]
    loss = _record_structure("loss", net.loss, _SAVABLE_LOSSES, f"{prefix}.loss", arrays)
    return {"input_shape": list(net.input_shape), "layers": layers, "loss": loss}


def _opt_state_structure(state: Any, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    if not isinstance(state, OptState):
        raise TypeError(
            f"opt_state must be a dlfs.OptState (from optimizer.init/update), got {type(state).__name__}"
        )
    slots = [
        [
            [_add_array(arrays, f"opt.slots.{s}.{i}.{j}", a) for j, a in enumerate(layer)]
            for i, layer in enumerate(tree)
        ]
        for s, tree in enumerate(state.slots)
    ]
    count = _check_int("opt_state.count", state.count, low=0)
    return {"count": count, "lr": _check_number("opt_state.lr", state.lr), "slots": slots}


def _structure_array(structure: dict[str, Any]) -> np.ndarray:
    """The description as JSON bytes in a uint8 array; its size is checked here,
    before anything is written (meta is the only part that can grow large)."""
    try:
        text = json.dumps(structure, sort_keys=True)
    except ValueError as err:  # e.g. an int too long for Python's int-to-str limit
        raise ValueError(f"meta must be JSON-serializable: {err}") from None
    data = text.encode("utf-8")
    _check_structure_size(len(data), "meta")
    return np.frombuffer(data, dtype=np.uint8)


def _write_npz(file: Any, arrays: dict[str, Any]) -> None:  # Any: savez's stub has allow_pickle
    """The one place that writes a checkpoint's bytes (tests make it fail)."""
    np.savez(file, **arrays)


def _atomic_write(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Write to a temporary file in the same folder, fsync, then ``os.replace``:
    a crash leaves either the old file or the new one, never a mix.  An existing
    file keeps its permissions; a new one gets the umask's.  Temporary files
    that earlier, killed saves of ``path`` left are removed first; those of saves
    still writing (other threads or processes) are left to them, and the last
    rename wins."""
    _atomic_write_with(path, lambda f: _write_npz(f, arrays))


def _atomic_write_with(path: str, write: Callable[[Any], Any]) -> None:
    """``_atomic_write`` of whatever ``write(file)`` writes into the open binary file."""
    _remove_abandoned_temps(path)
    fd, tmp = _open_temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            with contextlib.suppress(FileNotFoundError):
                os.chmod(tmp, os.stat(path).st_mode & 0o777)
            if _fcntl is not None:  # renamed while locked: its temp name is never free
                os.replace(tmp, path)
        if _fcntl is None:  # Windows renames no open file
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _save(
    path: Any,
    nets: dict[str, Network],
    opt_state: Any,
    meta: Any,
) -> None:
    """Check everything (path, networks, optimizer state, meta and its size) before
    the first byte is written, then write atomically."""
    path = _check_save_path("path", path)
    if meta is not None and not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict or None, got {type(meta).__name__}")
    _check_meta("meta", {} if meta is None else meta)
    arrays: dict[str, np.ndarray] = {}
    structure: dict[str, Any] = {
        "format": _FORMAT,
        "version": _FORMAT_VERSION,
        "dlfs_version": __version__,
        "networks": {k: _network_structure(v, k, arrays) for k, v in nets.items()},
        "opt_state": None if opt_state is None else _opt_state_structure(opt_state, arrays),
        "meta": {} if meta is None else meta,
    }
    structure["arrays"] = {
        k: {"shape": list(a.shape), "dtype": a.dtype.name, "crc32": _crc(a)}
        for k, a in arrays.items()
    }
    arrays[_STRUCTURE] = _structure_array(structure)
    _atomic_write(path, arrays)


def save(
    path: str | os.PathLike,
    net: Network,
    opt_state: OptState | None = None,
    *,
    meta: dict[str, Any] | None = None,
) -> None:
    """Save ``net`` (and an optimizer state, and a JSON-able ``meta`` dict) to one ``.npz`` file.

    The file holds every array (``np.savez``, no pickle) plus a JSON
    description (format version, dlfs version, layer types and their config,
    the loss, input shape, array shapes, dtypes and CRC-32s).  It is written
    to a temporary file in the same folder and moved into place with
    ``os.replace``, so a crash mid-write leaves the previous file intact;
    the next save of ``path`` removes the temporary file such a crash left.
    Saves to one path from several threads or processes at once all succeed;
    the file is then the checkpoint of the last one to finish.
    ``path`` is used as given (no suffix added).  Read it back with ``load``.

    ``meta`` holds dicts with str keys, lists, tuples (read back as lists),
    str, int, float and None, at most 64 levels deep, and its JSON may take
    up to 64 MiB: exactly what ``load`` accepts.  Everything is checked before
    the old file is touched (TypeError/ValueError naming ``meta``).
    Arrays keep their shapes and dtypes: w (D_in, D_out) comes back (D_in, D_out).

    >>> import os, tempfile
    >>> net = dlfs.network(0, 3, [dlfs.dense(2)], dlfs.MeanSquaredError())
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = os.path.join(folder, "net.npz")
    ...     dlfs.save(path, net, meta={"epochs": 10, "note": "demo"})
    ...     meta = dlfs.load(path).meta
    >>> meta
    {'epochs': 10, 'note': 'demo'}
    """
    _save(path, {"net": net}, opt_state, meta)


def _member_array(npz: Any, name: str) -> np.ndarray:
    """The array stored as ``name``; a member that is not an .npy array is refused."""
    a = npz[name]
    if type(a) is not np.ndarray:
        raise ValueError(f"member {name!r} must be an .npy array, got {type(a).__name__}")
    return a


def _check_members(npz: Any) -> None:
    """Every zip member is a uniquely named ``.npy`` file: with two members of one
    name, which one is read would depend on the reader."""
    names = npz.zip.namelist()
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"the archive must name each member once, got duplicates {duplicates}")
    odd = [n for n in names if not n.endswith(".npy")]
    if odd:
        raise ValueError(f"the archive must hold only .npy members, got {odd[:3]}")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads hook: an object that names one key twice is refused."""
    out = dict(pairs)
    if len(out) != len(pairs):
        keys = [k for k, _ in pairs]
        raise ValueError(
            f"the structure record names a key twice: {sorted({k for k in keys if keys.count(k) > 1})}"
        )
    return out


def _read_structure(npz: Any) -> dict[str, Any]:
    _check_members(npz)
    if _STRUCTURE not in npz.files:
        raise ValueError("not a dlfs checkpoint (no structure record)")
    size = npz.zip.getinfo(f"{_STRUCTURE}.npy").file_size
    if size > _STRUCTURE_MAX + _NPY_HEADER_MAX:  # checked before inflating it
        raise ValueError(
            f"the structure record is {size} bytes, over {_STRUCTURE_MAX} plus a header"
        )
    raw = _member_array(npz, _STRUCTURE)
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise ValueError("the structure record must be a 1-D uint8 array")
    _check_structure_size(raw.size, "the structure record")
    try:
        structure = json.loads(raw.tobytes().decode("utf-8"), object_pairs_hook=_unique_keys)
    except RecursionError:
        raise ValueError("the structure record must not be nested this deeply") from None
    except ValueError as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"the structure record must be UTF-8 JSON: {err}") from None
    if not isinstance(structure, dict) or structure.get("format") != _FORMAT:
        raise ValueError("not a dlfs checkpoint (unknown format tag)")
    version = _get("structure", structure, "version", "an integer")
    if version < 1:
        raise ValueError(f"structure.version must be >= 1, got {version}")
    if version > _FORMAT_VERSION:
        raise ValueError(
            f"the file has format version {version}, written by dlfs "
            f"{structure.get('dlfs_version')}; this dlfs {__version__} reads up to version "
            f"{_FORMAT_VERSION}: upgrade dlfs"
        )
    return structure


def _described_array(where: str, entry: Any) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, crc32) of one entry of structure.arrays."""
    dtype = _get(where, entry, "dtype", "a string")
    if dtype not in ("float32", "float64"):
        raise ValueError(f"{where}.dtype must be 'float32' or 'float64', got {dtype!r}")
    shape = _list_of(f"{where}.shape", _get(where, entry, "shape", "a list"), "an integer")
    if any(d < 0 for d in shape):
        raise ValueError(f"{where}.shape must hold sizes >= 0, got {shape}")
    return np.dtype(dtype), tuple(shape), _get(where, entry, "crc32", "an integer")


def _read_arrays(npz: Any, described: dict[str, Any]) -> dict[str, np.ndarray]:
    """Every array the JSON describes, checked (names, size, shape, dtype, CRC) before use."""
    stored = set(npz.files) - {_STRUCTURE}
    if set(described) != stored:
        missing, extra = sorted(set(described) - stored), sorted(stored - set(described))
        raise ValueError(f"arrays do not match the description: missing {missing}, extra {extra}")
    arrays = {}
    for name, entry in described.items():
        dtype, shape, crc = _described_array(f"structure.arrays[{name!r}]", entry)
        nbytes = math.prod(shape) * dtype.itemsize
        size = npz.zip.getinfo(f"{name}.npy").file_size
        if not nbytes <= size <= nbytes + _NPY_HEADER_MAX:
            raise ValueError(f"array {name} holds {size} bytes, expected {nbytes} plus a header")
        a = _member_array(npz, name)
        if a.dtype != dtype or a.shape != shape:
            raise ValueError(f"array {name} is {a.dtype} {a.shape}, described as {dtype} {shape}")
        if _crc(a) != crc:
            raise ValueError(f"array {name} fails its CRC-32 check (corrupt file)")
        a.setflags(write=False)
        arrays[name] = a
    return arrays


def _rebuild_record(
    where: str,
    kind: str,
    entry: Any,
    known: tuple[type, ...],
    arrays: dict[str, np.ndarray],
) -> Any:
    """The layer or loss that ``_record_structure`` described, through its own
    constructor (so its own checks run); errors name ``where``."""
    by_name = {c.__name__: c for c in known}
    type_name = _get(where, entry, "type", "a string")
    cls = by_name.get(type_name)
    if cls is None:
        raise ValueError(f"unknown {kind} type {type_name!r}; this dlfs knows {sorted(by_name)}")
    config = _get(where, entry, "config", "an object")
    refs = _get(where, entry, "arrays", "an object")
    kwargs = {k: _from_json_value(v) for k, v in config.items()}
    for k, name in refs.items():
        _expect(f"{where}.arrays[{k!r}]", name, "a string")
        if name not in arrays:
            raise ValueError(f"{where}.arrays[{k!r}] names {name!r}, which the file does not hold")
        kwargs[k] = arrays[name]
    if cls in _CHAINS:
        records = _get(where, entry, "layers", "a list")
        kwargs["layers"] = tuple(
            _rebuild_record(f"{where}.layers[{j}]", kind, e, known, arrays)
            for j, e in enumerate(records)
        )
    fields = {f.name for f in attrs.fields(cls) if f.init}
    if set(kwargs) - fields:
        raise ValueError(f"{where}: {cls.__name__} has no fields {sorted(set(kwargs) - fields)}")
    required = {f.name for f in attrs.fields(cls) if f.init and f.default is attrs.NOTHING}
    if required - set(kwargs):
        raise ValueError(
            f"{where} must give {cls.__name__}'s fields {sorted(required)}, got {sorted(kwargs)}"
        )
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where} ({cls.__name__}): {err}") from None


def _rebuild_network(where: str, entry: Any, arrays: dict[str, np.ndarray]) -> Network:
    records = _get(where, entry, "layers", "a list")
    layers = [
        _rebuild_record(f"{where}.layers[{i}]", "layer", e, _SAVABLE_LAYERS, arrays)
        for i, e in enumerate(records)
    ]
    loss_entry = _get(where, entry, "loss", "an object")
    loss = _rebuild_record(f"{where}.loss", "loss", loss_entry, _SAVABLE_LOSSES, arrays)
    shape = _list_of(
        f"{where}.input_shape", _get(where, entry, "input_shape", "a list"), "an integer"
    )
    try:
        return Network(layers, loss, tuple(shape))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None


def _rebuild_opt_state(entry: Any, arrays: dict[str, np.ndarray]) -> Any:
    if entry is None:
        return None
    where = "structure.opt_state"
    count = _get(where, entry, "count", "an integer")
    lr = _get(where, entry, "lr", "a number")
    if count < 0 or not math.isfinite(lr):
        raise ValueError(f"{where} must have count >= 0 and a finite lr, got {count} and {lr}")
    slots = []
    for s, tree in enumerate(_get(where, entry, "slots", "a list")):
        layers = _list_of(f"{where}.slots[{s}]", tree, "a list")
        slots.append(
            tuple(
                tuple(_slot_array(f"{where}.slots[{s}][{i}]", names, arrays))
                for i, names in enumerate(layers)
            )
        )
    return OptState(count, float(lr), tuple(slots))


def _slot_array(where: str, names: list[Any], arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The arrays one layer's moment slot names."""
    out = []
    for j, name in enumerate(_list_of(where, names, "a string")):
        if name not in arrays:
            raise ValueError(f"{where}[{j}] names {name!r}, which the file does not hold")
        out.append(arrays[name])
    return out


def _used_arrays(structure: dict[str, Any]) -> list[str]:
    """Every array name the (already validated) description refers to."""
    names = []

    def add(records: list[dict[str, Any]]) -> None:
        for record in records:
            names.extend(record["arrays"].values())
            if record["type"] in {cls.__name__ for cls in _CHAINS}:
                add(record["layers"])  # a Residual's or TiedEmbedding's sub-layers

    for net in structure["networks"].values():
        add([*net["layers"], net["loss"]])
    if structure["opt_state"] is not None:
        names.extend(n for tree in structure["opt_state"]["slots"] for layer in tree for n in layer)
    return names


def _checkpoint_from(npz: Any) -> Checkpoint:
    structure = _read_structure(npz)
    arrays = _read_arrays(npz, _get("structure", structure, "arrays", "an object"))
    networks = _get("structure", structure, "networks", "an object")
    if set(networks) - {"net", "best"} or "net" not in networks:
        raise ValueError(
            f"structure.networks must be 'net' and optionally 'best', got {sorted(networks)}"
        )
    nets = {k: _rebuild_network(f"structure.networks.{k}", v, arrays) for k, v in networks.items()}
    if "opt_state" not in structure:
        raise ValueError("structure must have an 'opt_state' entry (null when none was saved)")
    opt_state = _rebuild_opt_state(structure["opt_state"], arrays)
    used = _used_arrays(structure)
    if sorted(used) != sorted(arrays):
        raise ValueError("the description refers to its arrays inconsistently")
    meta = _get("structure", structure, "meta", "an object")
    try:
        _check_meta("structure.meta", meta)
    except TypeError as err:  # cannot happen for JSON; kept so load only raises ValueError
        raise ValueError(str(err)) from None
    return Checkpoint(
        nets["net"],
        opt_state,
        meta,
        structure["version"],
        _get("structure", structure, "dlfs_version", "a string"),
        nets.get("best"),
    )


def load(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint written by ``save`` (or ``fit(checkpoint=...)``) -> Checkpoint.

    Uses ``np.load(allow_pickle=False)`` only, so no code in the file ever
    runs.  Every array is checked against the JSON description (names,
    shape, dtype, CRC-32), every field of the description against its
    expected JSON type, and the exact network is rebuilt through the layers'
    own constructors: arrays bit-exact, same dtype, read-only.  Unknown layer
    types, missing or extra arrays, duplicate archive members, mismatches, a
    newer format version, truncated or corrupt files and object arrays raise
    ValueError; a missing file raises FileNotFoundError.

    >>> import os, tempfile
    >>> net = dlfs.network(0, 3, [dlfs.dense(2, dlfs.ReLU())], dlfs.MeanSquaredError())
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     dlfs.save(os.path.join(folder, "net.npz"), net)
    ...     loaded = dlfs.load(os.path.join(folder, "net.npz")).net
    >>> loaded
    Network((3,) -> (2,), 2 layers, 8 params, float32, MeanSquaredError)
    >>> w = loaded.layers[0].w
    >>> bool((w == net.layers[0].w).all()), w.shape, w.flags.writeable  # bit-exact, read-only
    (True, (3, 2), False)
    """
    path = _check_path("path", path)
    try:
        # Open the file ourselves: np.load(path) leaks its handle when a damaged zip fails.
        with open(path, "rb") as f:
            npz = np.load(f, allow_pickle=False)
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise ValueError("not a dlfs checkpoint (not an .npz archive)")
            with npz:
                return _checkpoint_from(npz)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as err:  # anything a damaged file can trigger becomes a ValueError
        why = str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"
        raise ValueError(f"cannot load checkpoint {path!r}: {why}") from None


_FIT_META = "dlfs.fit"  # the meta key under which fit keeps its bookkeeping


def _fit_checkpoint(path: str, run: _FitRun, plan: _FitPlan) -> bool:
    """fit's checkpoint at ``path``, written by rank 0 alone.  Every rank sends it its running loss
    (so that a resume restores each rank's) and waits for the write (so that the file
    is there when fit returns, and a failed write raises on every rank).  False when
    a KeyboardInterrupt cut the write short (the old file stays)."""
    running = plan.ranks.gather([run.state.loss_sum, run.state.seen])

    def write() -> list[float]:
        _save_fit(path, run, plan, running)
        return []

    return plan.ranks.on_lead(write, 0, f"writing the checkpoint {path!r}") is not None


def _save_fit(path: str, run: _FitRun, plan: _FitPlan, running: np.ndarray) -> None:
    """fit's checkpoint: network, optimizer state, best network, and in ``meta``
    the setup, position (epoch, steps into the next, running loss: ``loss_sum``
    and ``seen``, lists by rank under MPI, from ``running`` (ranks, 2)), history,
    early-stopping counters and stop reason."""
    h, state = run.history, run.state
    loss_sums, seen = [float(v) for v in running[:, 0]], [int(v) for v in running[:, 1]]
    record = {
        **plan.setup,
        "epoch": run.epoch,
        "batch": run.batch,
        "step": state.step,
        "loss_sum": loss_sums if len(running) > 1 else loss_sums[0],
        "seen": seen if len(running) > 1 else seen[0],
        "records": [[r.epoch, r.train_loss, r.val_loss, r.val_metric] for r in h.records],
        "best_epoch": h.best_epoch,
        "stop_reason": run.stop,
        "stopped_early": run.stop == "early_stopping",
        "best_loss": run.best_loss,
        "bad": run.bad,
    }
    nets = {"net": state.net}
    if h.best_epoch is not None and run.best is not state.net:  # only an evaluated best
        nets["best"] = run.best
    _save(path, nets, state.opt_state, {_FIT_META: record})


def _same_architecture(a: Network, b: Network) -> bool:
    def sig(net: Network) -> list[Any]:
        return [
            net.input_shape,
            type(net.loss),
            *((type(la), [(p.shape, p.dtype) for p in la.params()]) for la in net.layers),
        ]

    return sig(a) == sig(b)


# Settings older fit checkpoints did not record, at the value they always had.
_FIT_SETUP_BEFORE = {"drop_last": False, "ranks": 1}


def _saved_stop(saved: dict[str, Any]) -> str | None:
    """The stop a resumed run keeps: only early stopping; after a callback's stop
    or an interrupt, training goes on."""
    reason = saved.get("stop_reason", "early_stopping" if saved.get("stopped_early") else None)
    if reason not in (None, *_STOP_REASONS):
        raise ValueError(f"unknown stop_reason {reason!r}")
    return "early_stopping" if reason == "early_stopping" else None


def _resume_fit(path: Any, net: Network, optimizer: Any, step_key: Key, plan: _FitPlan) -> _FitRun:
    """The _FitRun stored by ``_save_fit``, checked against this fit call."""
    ckpt = load(_check_path("resume", path))
    saved = ckpt.meta.get(_FIT_META)
    if not isinstance(saved, dict):
        raise ValueError(f"resume: {path!r} was not written by fit(checkpoint=...)")
    for name, value in plan.setup.items():
        if saved.get(name, _FIT_SETUP_BEFORE.get(name)) != value:
            raise ValueError(
                f"resume: the checkpoint was trained with {name}={saved.get(name)!r}, this "
                f"call has {name}={value!r}; a resumed run must use the same value"
            )
    if not _same_architecture(ckpt.net, net):
        raise ValueError(
            f"resume: the checkpoint holds {ckpt.net!r}, which is not shaped like net {net!r}"
        )
    opt_state = ckpt.opt_state_for(optimizer)
    try:
        records = tuple(EpochRecord(*r) for r in saved["records"])
        history = History(records, saved["best_epoch"], metric=_metric_name(plan.metric))
        step = _check_int("step", saved["step"], low=0)
        epoch = _check_int("epoch", saved["epoch"], low=0)
        bad = _check_int("bad", saved["bad"], low=0)
        batch = _check_int("batch", saved.get("batch", 0), low=0)
        if batch > plan.steps_per_epoch:
            raise ValueError(f"batch {batch} is past the {plan.steps_per_epoch} steps of an epoch")
        loss_sum, seen = saved.get("loss_sum", 0.0), saved.get("seen", 0)
        if plan.ranks.size > 1:  # each rank's own running loss
            loss_sum, seen = loss_sum[plan.ranks.rank], seen[plan.ranks.rank]
        seen = _check_int("seen", seen, low=0)
        loss_sum = _check_number("loss_sum", loss_sum)
        state = TrainState(ckpt.net, optimizer, opt_state, step_key, step, loss_sum, seen)
        best = ckpt.net if ckpt.best is None else ckpt.best
        best_loss = float(saved["best_loss"])
        return _FitRun(state, epoch, history, best, best_loss, bad, batch, _saved_stop(saved))
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise ValueError(f"resume: the fit record in {path!r} is damaged ({err!r})") from None


# ------------------------------------------------------ export: ONNX and PyTorch

_ONNX_OPSET = 17  # LayerNormalization's first opset; every other op here is older
_ONNX_IR_VERSION = 8  # the oldest IR that opset 17 allows: readable by older runtimes


class _OnnxGraph:
    """The graph ``export_onnx`` builds: nodes and weights (initializers) in
    order, each with a fresh name.  ``prefix`` names the nodes of the layer
    being exported (``layer3.Dense``), so a runtime's error points at it.
    Private and local to one export."""

    def __init__(self, onnx: Any, dtype: np.dtype):
        self.onnx, self.dtype = onnx, dtype
        self.nodes: list[Any] = []
        self.weights: list[Any] = []
        self.prefix = "graph"
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}.{hint}_{self._count}"

    def weight(self, hint: str, a: np.ndarray) -> str:
        """A constant array (a copy of ``a``, C order) as an initializer; returns its name."""
        name = self.name(hint)
        self.weights.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(a), name))
        return name

    def const(self, hint: str, value: float) -> str:
        """A scalar of the network's dtype."""
        return self.weight(hint, np.asarray(value, self.dtype))

    def ints(self, hint: str, values: Sequence[int]) -> str:
        """An int64 vector (axes and shapes are tensors since opset 13)."""
        return self.weight(hint, np.asarray(values, np.int64))

    def outputs(self, op: str, inputs: Sequence[str], n: int, **attributes: Any) -> list[str]:
        """Add one ``op`` node with ``n`` outputs; returns their names."""
        names = [self.name(f"{op}_out{k}") for k in range(n)]
        node = self.onnx.helper.make_node(op, list(inputs), names, name=self.name(op), **attributes)
        self.nodes.append(node)
        return names

    def op(self, op: str, *inputs: str, **attributes: Any) -> str:
        """Add one ``op`` node with one output; returns its name."""
        return self.outputs(op, inputs, 1, **attributes)[0]


# One function per layer type: (graph, layer, x, per-sample input shape) ->
# the name of the layer's output.  ``export_onnx`` looks the layer's exact
# type up in ``_ONNX_EXPORTERS``; a new layer kind is one function and one entry.


def _onnx_dense(g: _OnnxGraph, layer: Dense, x: str, shape: tuple[int, ...]) -> str:
    """y = x @ w + b: MatMul then Add (none without a bias), for (N, D) and (N, T, D)."""
    y = g.op("MatMul", x, g.weight("w", layer.w))
    return y if layer.b is None else g.op("Add", y, g.weight("b", layer.b))


def _onnx_identity(g: _OnnxGraph, layer: Any, x: str, shape: tuple[int, ...]) -> str:
    """Linear, and Dropout (the identity in evaluation mode)."""
    return g.op("Identity", x)


def _onnx_unary(op: str) -> Callable[[_OnnxGraph, Any, str, tuple[int, ...]], str]:
    """One ONNX op without attributes: Sigmoid, Tanh, Relu."""

    def export(g: _OnnxGraph, layer: Any, x: str, shape: tuple[int, ...]) -> str:
        return g.op(op, x)

    export.__doc__ = f"y = {op}(x)."
    return export


# ONNX's float attributes are float32: alpha = 0.01 as an attribute is off by
# 2e-10, invisible in float32 and large in float64.  So float64 graphs spell
# LeakyRelu and Elu out with alpha as a float64 constant (which also runs
# where a runtime has no float64 Elu kernel, as ONNX Runtime 1.32).


def _onnx_where_positive(g: _OnnxGraph, x: str, negative: str) -> str:
    """y = x where x > 0, else ``negative``."""
    return g.op("Where", g.op("Greater", x, g.const("zero", 0.0)), x, negative)


def _onnx_leaky_relu(g: _OnnxGraph, layer: LeakyReLU, x: str, shape: tuple[int, ...]) -> str:
    """LeakyRelu; float64: Where(x > 0, x, x * alpha)."""
    if g.dtype == np.float32:
        return g.op("LeakyRelu", x, alpha=float(layer.alpha))
    return _onnx_where_positive(g, x, g.op("Mul", x, g.const("alpha", layer.alpha)))


def _onnx_elu(g: _OnnxGraph, layer: ELU, x: str, shape: tuple[int, ...]) -> str:
    """Elu; float64: Where(x > 0, x, alpha * (exp(min(x, 0)) - 1))."""
    if g.dtype == np.float32:
        return g.op("Elu", x, alpha=float(layer.alpha))
    em1 = g.op("Sub", g.op("Exp", g.op("Min", x, g.const("zero", 0.0))), g.const("one", 1.0))
    return _onnx_where_positive(g, x, g.op("Mul", em1, g.const("alpha", layer.alpha)))


def _onnx_gelu(g: _OnnxGraph, layer: GELU, x: str, shape: tuple[int, ...]) -> str:
    """dlfs's own formula, x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3)), in
    Mul/Add/Sigmoid (ONNX's Gelu op arrived only in opset 20); the exact form
    x * (erf(x / sqrt 2) + 1) / 2 with Erf."""
    if layer.approximate == "none":
        erf = g.op("Erf", g.op("Mul", x, g.const("inv_sqrt_2", 1 / math.sqrt(2))))
        phi = g.op("Mul", g.op("Add", erf, g.const("one", 1.0)), g.const("half", 0.5))
        return g.op("Mul", x, phi)
    cube = g.op("Mul", x, g.op("Mul", x, x))
    inner = g.op("Add", x, g.op("Mul", cube, g.const("c", 0.044715)))
    s = g.op("Sigmoid", g.op("Mul", inner, g.const("two_sqrt_2_over_pi", 2 * _SQRT_2_OVER_PI)))
    return g.op("Mul", x, s)


def _onnx_silu(g: _OnnxGraph, layer: SiLU, x: str, shape: tuple[int, ...]) -> str:
    return g.op("Mul", x, g.op("Sigmoid", x))


def _onnx_softmax(g: _OnnxGraph, layer: Softmax, x: str, shape: tuple[int, ...]) -> str:
    return g.op("Softmax", x, axis=-1)


def _onnx_flatten(g: _OnnxGraph, layer: Flatten, x: str, shape: tuple[int, ...]) -> str:
    return g.op("Flatten", x, axis=1)


def _onnx_batch_norm(g: _OnnxGraph, layer: BatchNorm, x: str, shape: tuple[int, ...]) -> str:
    """Evaluation mode, with the running statistics, on (N, C) and (N, C, H, W):
    BatchNormalization; float64 (its epsilon is a float32 attribute): dlfs's own
    arithmetic, (x - mean) * inv * gamma + beta with inv = 1 / sqrt(var + eps)."""
    if g.dtype == np.float32:
        ws = [g.weight(n, getattr(layer, n)) for n in ("gamma", "beta", "mean", "var")]
        return g.op("BatchNormalization", x, *ws, epsilon=float(layer.eps))
    bshape = (-1,) if len(shape) == 1 else (-1, 1, 1)
    inv = 1 / np.sqrt(layer.var + layer.eps)
    xhat = g.op(
        "Mul",
        g.op("Sub", x, g.weight("mean", layer.mean.reshape(bshape))),
        g.weight("inv", inv.reshape(bshape)),
    )
    y = g.op("Mul", xhat, g.weight("gamma", layer.gamma.reshape(bshape)))
    return g.op("Add", y, g.weight("beta", layer.beta.reshape(bshape)))


def _onnx_embedding(g: _OnnxGraph, layer: Embedding, x: str, shape: tuple[int, ...]) -> str:
    """y = w[x]: Gather along w's rows (ids are int64 in the graph)."""
    return g.op("Gather", g.weight("w", layer.w), x, axis=0)


def _onnx_conv(g: _OnnxGraph, layer: Conv2D, x: str, shape: tuple[int, ...]) -> str:
    """Conv; dlfs's ((top, bottom), (left, right)) pads are ONNX's [top, left, bottom, right]."""
    (top, bottom), (left, right) = layer.padding
    return g.op(
        "Conv",
        x,
        g.weight("w", layer.w),
        g.weight("b", layer.b),
        kernel_shape=list(layer.kernel_size),
        strides=list(layer.stride),
        pads=[top, left, bottom, right],
    )


def _onnx_pool(op: str) -> Callable[[_OnnxGraph, Any, str, tuple[int, ...]], str]:
    """MaxPool / AveragePool without padding: ONNX's floor rounding drops
    incomplete windows, as dlfs does."""

    def export(g: _OnnxGraph, layer: Any, x: str, shape: tuple[int, ...]) -> str:
        return g.op(op, x, kernel_shape=list(layer.size), strides=list(layer.stride))

    export.__doc__ = f"{op} over windows ``size`` with ``stride``, no padding."
    return export


def _gate_blocks(a: np.ndarray, order: Sequence[int]) -> np.ndarray:
    """The (..., G*H) gate blocks of ``a`` along its last axis, in ``order``."""
    blocks = np.split(a, len(order), axis=-1)
    return np.concatenate([blocks[k] for k in order], axis=-1)


# dlfs keeps PyTorch's gate order; ONNX's own is LSTM i, o, f, c and GRU z, r, h.
_ONNX_GATES = {"RNN": (0,), "LSTM": (0, 3, 1, 2), "GRU": (1, 0, 2)}


def _onnx_recurrent(g: _OnnxGraph, layer: Any, x: str, shape: tuple[int, ...]) -> str:
    """RNN/LSTM/GRU as ONNX's op of that name, time-major inside.

    W = w_ih.T (G*H, D) and R = w_hh.T (G*H, H) with the gate blocks in ONNX's
    order (LSTM i, o, f, c from dlfs's i, f, g, o; GRU z, r, h from r, z, n);
    B = [Wb, Rb] with Wb = b in that order and Rb = 0, except the GRU's Rbh =
    b_hn (``linear_before_reset=1``: the reset gate multiplies
    h W_hn + b_hn, as in dlfs and PyTorch).  x (N, T, D) is transposed to
    (T, N, D); the op's Y (T, 1, N, H) becomes (N, T, H), its Y_h (1, N, H)
    the last h (N, H).
    """
    kind = type(layer).__name__
    order = _ONNX_GATES[kind]
    rb = np.zeros_like(layer.b)
    if isinstance(layer, GRU):
        rb[2 * layer.n_hidden :] = layer.b_hn
    attributes: dict[str, Any] = {"hidden_size": layer.n_hidden}
    if isinstance(layer, GRU):
        attributes["linear_before_reset"] = 1
    w = g.weight("W", _gate_blocks(layer.w_ih, order).T[None])
    r = g.weight("R", _gate_blocks(layer.w_hh, order).T[None])
    b = g.weight("B", np.concatenate([_gate_blocks(layer.b, order), rb])[None])
    xt = g.op("Transpose", x, perm=[1, 0, 2])
    ys, h_last = g.outputs(kind, [xt, w, r, b], 2, **attributes)
    if layer.return_sequences:
        return g.op("Transpose", g.op("Squeeze", ys, g.ints("axes", [1])), perm=[1, 0, 2])
    return g.op("Squeeze", h_last, g.ints("axes", [0]))


def _onnx_layer_norm(g: _OnnxGraph, layer: LayerNorm, x: str, shape: tuple[int, ...]) -> str:
    """LayerNormalization over the last axis (scale 1 where gamma is None); float64
    (its epsilon is a float32 attribute): dlfs's arithmetic, xc = x - mean(x),
    y = xc / sqrt(mean(xc^2) + eps) * gamma + beta, means over the last axis."""
    if g.dtype == np.float32:
        gamma = np.ones(shape[-1], g.dtype) if layer.gamma is None else layer.gamma
        inputs = [x, g.weight("gamma", gamma)]
        if layer.beta is not None:
            inputs.append(g.weight("beta", layer.beta))
        return g.op("LayerNormalization", *inputs, axis=-1, epsilon=float(layer.eps))
    xc = g.op("Sub", x, g.op("ReduceMean", x, axes=[-1], keepdims=1))
    var = g.op("ReduceMean", g.op("Mul", xc, xc), axes=[-1], keepdims=1)
    std = g.op("Sqrt", g.op("Add", var, g.const("eps", layer.eps)))
    y = g.op("Mul", xc, g.op("Div", g.const("one", 1.0), std))
    if layer.gamma is not None:
        y = g.op("Mul", y, g.weight("gamma", layer.gamma))
    return y if layer.beta is None else g.op("Add", y, g.weight("beta", layer.beta))


def _onnx_heads(g: _OnnxGraph, a: str, n_heads: int, d: int) -> str:
    """(N, T, D) -> (N, H, T, D/H): Reshape (0 keeps N and T) and Transpose."""
    split = g.op("Reshape", a, g.ints("shape", [0, 0, n_heads, d // n_heads]))
    return g.op("Transpose", split, perm=[0, 2, 1, 3])


def _onnx_attention(g: _OnnxGraph, layer: SelfAttention, x: str, shape: tuple[int, ...]) -> str:
    """MatMul, Split and Softmax: qkv = x w_qkv (+ b) split into q, k, v (D each),
    heads by Reshape/Transpose, A = softmax(q k^T / sqrt(D/H) + mask), the causal
    mask a (T, T) constant with -inf above the diagonal (T is the network's);
    O = A v, heads side by side, y = O w_o (+ b_o).  Dropout: none (evaluation)."""
    t, d = shape
    h = layer.n_heads
    qkv = g.op("MatMul", x, g.weight("w_qkv", layer.w_qkv))
    if layer.b_qkv is not None:
        qkv = g.op("Add", qkv, g.weight("b_qkv", layer.b_qkv))
    q, k, v = (
        _onnx_heads(g, a, h, d)
        for a in g.outputs("Split", [qkv, g.ints("split", [d, d, d])], 3, axis=2)
    )
    q = g.op("Mul", q, g.const("scale", 1 / math.sqrt(d // h)))
    scores = g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2]))
    if layer.causal:
        scores = g.op("Add", scores, g.weight("causal_mask", _causal_mask(t, g.dtype)))
    o = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)
    o = g.op("Reshape", g.op("Transpose", o, perm=[0, 2, 1, 3]), g.ints("shape", [0, 0, d]))
    y = g.op("MatMul", o, g.weight("w_o", layer.w_o))
    return y if layer.b_o is None else g.op("Add", y, g.weight("b_o", layer.b_o))


def _onnx_positions(
    g: _OnnxGraph, layer: PositionalEmbedding, x: str, shape: tuple[int, ...]
) -> str:
    """y = x + w[:T], T the network's sequence length."""
    return g.op("Add", x, g.weight("w", layer.w[: shape[0]]))


def _onnx_residual(g: _OnnxGraph, layer: Residual, x: str, shape: tuple[int, ...]) -> str:
    """y = x + f(x): the sub-chain's graph, then Add."""
    return g.op("Add", x, _onnx_chain(g, layer.layers, x, shape, f"{g.prefix}/"))


def _onnx_tied(g: _OnnxGraph, layer: TiedEmbedding, x: str, shape: tuple[int, ...]) -> str:
    """h = Gather(w, ids), the sub-chain, logits = h @ Transpose(w) (one w in the file)."""
    w = g.weight("w", layer.w)
    h = g.op("Gather", w, x, axis=0)
    h = _onnx_chain(g, layer.layers, h, _sub_chain_input(layer, shape), f"{g.prefix}/")
    return g.op("MatMul", h, g.op("Transpose", w, perm=[1, 0]))


_OnnxExporter = Callable[[_OnnxGraph, Any, str, tuple[int, ...]], str]

_ONNX_EXPORTERS: dict[type, _OnnxExporter] = {
    Dense: _onnx_dense,
    Linear: _onnx_identity,
    Sigmoid: _onnx_unary("Sigmoid"),
    Tanh: _onnx_unary("Tanh"),
    ReLU: _onnx_unary("Relu"),
    LeakyReLU: _onnx_leaky_relu,
    ELU: _onnx_elu,
    GELU: _onnx_gelu,
    SiLU: _onnx_silu,
    Softmax: _onnx_softmax,
    Dropout: _onnx_identity,
    Flatten: _onnx_flatten,
    BatchNorm: _onnx_batch_norm,
    Embedding: _onnx_embedding,
    RNN: _onnx_recurrent,
    LSTM: _onnx_recurrent,
    GRU: _onnx_recurrent,
    Conv2D: _onnx_conv,
    MaxPool2D: _onnx_pool("MaxPool"),
    AvgPool2D: _onnx_pool("AveragePool"),
    LayerNorm: _onnx_layer_norm,
    SelfAttention: _onnx_attention,
    PositionalEmbedding: _onnx_positions,
    Residual: _onnx_residual,
    TiedEmbedding: _onnx_tied,
}


def _onnx_chain(
    g: _OnnxGraph, layers: Sequence[Any], x: str, shape: tuple[int, ...], where: str
) -> str:
    """Each layer's exporter in turn, from input ``x`` of per-sample ``shape``;
    ``where`` prefixes the node names (a sub-chain's: its container's)."""
    outer = g.prefix
    for i, layer in enumerate(layers):
        g.prefix = f"{where}layer{i}.{type(layer).__name__}"
        x = _ONNX_EXPORTERS[type(layer)](g, layer, x, shape)
        shape = tuple(layer.output_shape(shape))
    g.prefix = outer
    return x


def _import_onnx() -> Any:
    try:
        import onnx
        import onnx.checker
        import onnx.helper
        import onnx.numpy_helper
    except ImportError as err:
        raise ImportError(
            "export_onnx needs the onnx package: pip install onnx (and onnxruntime to run "
            "the file), or pip install 'dlfs[onnx]'"
        ) from err
    return onnx


def _check_network(name: str, net: Any) -> Network:
    if not isinstance(net, Network):
        raise TypeError(f"{name} must be a dlfs.Network, got {type(net).__name__}")
    return net


def _unexportable(layers: Sequence[Any], where: str = "") -> str | None:
    """The first layer without an exporter, sub-chains included, in words; None if none."""
    for i, layer in enumerate(layers):
        here = f"{where}layer {i} ({type(layer).__name__})"
        if type(layer) not in _ONNX_EXPORTERS:
            return here
        if isinstance(layer, _CHAINS):
            inside = _unexportable(layer.layers, f"{here} > ")
            if inside is not None:
                return inside
    return None


def _check_exportable(net: Network) -> None:
    """Every layer must have an exporter: TypeError naming the first that has none."""
    missing = _unexportable(net.layers)
    if missing is not None:
        known = ", ".join(sorted(t.__name__ for t in _ONNX_EXPORTERS))
        raise TypeError(
            f"export_onnx cannot export {missing}: dlfs has no ONNX exporter for it "
            f"(it exports {known})"
        )


def _export_dtype(net: Network, dtype: Any) -> np.dtype:
    """The graph's float dtype: the network's; ``dtype`` (default float32) for a
    network without parameters."""
    if dtype is None:
        return net.dtype or np.dtype(np.float32)
    dtype = _check_dtype(dtype)
    if net.dtype is not None and dtype != net.dtype:
        raise ValueError(
            f"dtype must be the network's ({net.dtype}) or None, got {dtype}; "
            "dlfs never casts silently"
        )
    return dtype


def _onnx_model(net: Network, input_name: str, output_name: str, dtype: np.dtype) -> Any:
    """The checked ModelProto of ``net``'s inference graph."""
    onnx = _import_onnx()
    g = _OnnxGraph(onnx, dtype)
    takes_ids = net._takes_ids()
    x = _onnx_chain(g, net.layers, input_name, net.input_shape, "")
    g.nodes.append(onnx.helper.make_node("Identity", [x], [output_name], name="output"))
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(np.int64) if takes_ids else dtype)
    out_elem = onnx.helper.np_dtype_to_tensor_dtype(dtype)
    graph = onnx.helper.make_graph(
        g.nodes,
        "dlfs",
        [onnx.helper.make_tensor_value_info(input_name, elem, ["N", *net.input_shape])],
        [onnx.helper.make_tensor_value_info(output_name, out_elem, ["N", *net.output_shape])],
        initializer=g.weights,
        doc_string=repr(net),
    )
    model = onnx.helper.make_model(
        graph,
        opset_imports=[onnx.helper.make_opsetid("", _ONNX_OPSET)],
        producer_name="dlfs",
        producer_version=__version__,
    )
    model.ir_version = _ONNX_IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def _check_io_name(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"{name} must be a non-empty str, got {value!r}")
    return value


def export_onnx(
    net: Network,
    path: str | os.PathLike,
    *,
    input_name: str = "x",
    output_name: str = "y",
    dtype: FloatDType | None = None,
) -> Any:
    """Write ``net``'s inference graph (evaluation mode: what ``net.predict``
    computes) to an ONNX file at ``path``, and return the ``onnx.ModelProto``.

    The graph takes ``input_name``: (N, *net.input_shape) of the network's
    dtype (float32 or float64; int64 token ids for a network that starts
    with an Embedding) and gives ``output_name``: (N, *net.output_shape); the
    batch axis N is dynamic.  ``dtype`` is for a network without parameters
    (default float32); for any other it may only repeat the network's.  Opset 17, IR version 8; the model passes
    ``onnx.checker.check_model(full_check=True)`` before it is written
    (atomically, as ``save`` writes).  Layer by layer: Dense -> MatMul + Add
    (2-D and 3-D inputs; no Add without a bias); Sigmoid, Tanh, ReLU,
    LeakyReLU, ELU, Softmax (last axis) -> the ops of those names; GELU (tanh
    form) and SiLU -> Mul, Add and Sigmoid, exact GELU -> Erf; Linear and
    Dropout -> Identity; Flatten -> Flatten;
    BatchNorm -> BatchNormalization with the running statistics; Conv2D ->
    Conv (pads [top, left, bottom, right]); MaxPool2D, AvgPool2D -> MaxPool,
    AveragePool; Embedding -> Gather; RNN, LSTM, GRU -> ONNX's RNN, LSTM,
    GRU, with the gate blocks reordered to ONNX's (LSTM i, o, f, c; GRU z, r,
    h with ``linear_before_reset=1``); LayerNorm -> LayerNormalization;
    SelfAttention -> MatMul, Split, Reshape/Transpose into heads, Softmax,
    with the causal mask a constant (T, T) -inf above the diagonal (T is the
    network's: only the batch axis is dynamic); PositionalEmbedding -> Add
    of w[:T]; Residual -> its layers' graph, then Add; TiedEmbedding ->
    Gather, its layers, MatMul with Transpose(w).  Any other layer (in a
    sub-chain too) is a TypeError naming it; nothing is written then.

    float64 graphs write LeakyReLU, ELU, BatchNorm and LayerNorm out in
    Where, Mul, Exp, Sub, ReduceMean and Add with alpha and eps in float64
    (ONNX's own ops take them as float32 attributes).  ONNX Runtime (1.32)
    runs every such float32 graph; in float64 it has no kernels for Conv,
    AveragePool, RNN, LSTM, GRU and Erf (exact GELU): the graph is still
    valid ONNX, and onnx's reference evaluator runs it.  Needs the
    ``onnx`` package, imported here (``pip install 'dlfs[onnx]'`` adds
    onnxruntime to run the file).

    >>> import os, tempfile
    >>> import onnxruntime
    >>> net = dlfs.network(0, 3, [dlfs.dense(4, dlfs.ReLU()), dlfs.dense(2)], dlfs.MeanSquaredError())
    >>> x = np.linspace(-1, 1, 15, dtype=np.float32).reshape(5, 3)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = os.path.join(folder, "net.onnx")
    ...     model = dlfs.export_onnx(net, path)
    ...     session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    ...     (y,) = session.run(None, {"x": x})
    >>> bool(np.allclose(y, net.predict(x), rtol=1e-5, atol=1e-6)), [n.op_type for n in model.graph.node]
    (True, ['MatMul', 'Add', 'Relu', 'MatMul', 'Add', 'Identity'])
    """
    net = _check_network("net", net)
    path = _check_save_path("path", path)
    input_name = _check_io_name("input_name", input_name)
    output_name = _check_io_name("output_name", output_name)
    if input_name == output_name:
        raise ValueError(f"input_name and output_name must differ, both are {input_name!r}")
    _check_exportable(net)
    model = _onnx_model(net, input_name, output_name, _export_dtype(net, dtype))
    data = model.SerializeToString()
    _atomic_write_with(path, lambda f: f.write(data))
    return model


# PyTorch: per layer type, (to, back).  ``to(layer)`` gives the layer's arrays
# in PyTorch's names and layouts, fresh and writable; ``back(layer, arrays)``
# builds a layer of the same config from such arrays, already checked against
# ``to(layer)``'s names, shapes and dtypes.  Layers without arrays need no entry.


def _present_arrays(pairs: Sequence[tuple[str, np.ndarray | None]]) -> dict[str, np.ndarray]:
    """Fresh copies of the arrays that are there (an absent bias has no key)."""
    return {name: np.array(a) for name, a in pairs if a is not None}


def _torch_dense(layer: Dense) -> dict[str, np.ndarray]:
    """weight = w.T (D_out, D_in), bias = b (none for ``bias=False``)."""
    return _present_arrays([("weight", layer.w.T), ("bias", layer.b)])


def _dense_from_torch(layer: Dense, a: dict[str, np.ndarray]) -> Dense:
    return Dense(a["weight"].T, a.get("bias"))


def _torch_conv(layer: Conv2D) -> dict[str, np.ndarray]:
    return {"weight": np.array(layer.w), "bias": np.array(layer.b)}


def _conv_from_torch(layer: Conv2D, a: dict[str, np.ndarray]) -> Conv2D:
    return Conv2D(a["weight"], a["bias"], stride=layer.stride, padding=layer.padding)


def _torch_batch_norm(layer: BatchNorm) -> dict[str, np.ndarray]:
    return {
        "weight": np.array(layer.gamma),
        "bias": np.array(layer.beta),
        "running_mean": np.array(layer.mean),
        "running_var": np.array(layer.var),
        "num_batches_tracked": np.array(0, np.int64),
    }


def _batch_norm_from_torch(layer: BatchNorm, a: dict[str, np.ndarray]) -> BatchNorm:
    """``num_batches_tracked`` is read and dropped: dlfs's momentum is fixed."""
    return attrs.evolve(
        layer, gamma=a["weight"], beta=a["bias"], mean=a["running_mean"], var=a["running_var"]
    )


def _torch_embedding(layer: Embedding) -> dict[str, np.ndarray]:
    return {"weight": np.array(layer.w)}


def _embedding_from_torch(layer: Embedding, a: dict[str, np.ndarray]) -> Embedding:
    return Embedding(a["weight"])


def _torch_recurrent(layer: Any) -> dict[str, np.ndarray]:
    """weight_ih_l0 = w_ih.T, weight_hh_l0 = w_hh.T, bias_ih_l0 = b, bias_hh_l0 = 0
    (the GRU's: [0, 0, b_hn])."""
    bias_hh = np.zeros_like(layer.b)
    if isinstance(layer, GRU):
        bias_hh[2 * layer.n_hidden :] = layer.b_hn
    return {
        "weight_ih_l0": np.array(layer.w_ih.T),
        "weight_hh_l0": np.array(layer.w_hh.T),
        "bias_ih_l0": np.array(layer.b),
        "bias_hh_l0": bias_hh,
    }


def _plus(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a + b, but a itself where b is 0: a round trip's zero never turns -0.0 into 0.0."""
    return np.where(b == 0, a, a + b)


def _recurrent_from_torch(layer: Any, a: dict[str, np.ndarray]) -> Any:
    """b = bias_ih_l0 + bias_hh_l0 (the GRU: + its r and z parts, b_hn = its n part)."""
    w_ih, w_hh = a["weight_ih_l0"].T, a["weight_hh_l0"].T
    bias_ih, bias_hh = a["bias_ih_l0"], a["bias_hh_l0"]
    if not isinstance(layer, GRU):
        b = _plus(bias_ih, bias_hh)
        return type(layer)(w_ih, w_hh, b, return_sequences=layer.return_sequences)
    two_h = 2 * layer.n_hidden
    b = np.concatenate([_plus(bias_ih[:two_h], bias_hh[:two_h]), bias_ih[two_h:]])
    return GRU(w_ih, w_hh, b, bias_hh[two_h:], return_sequences=layer.return_sequences)


def _torch_layer_norm(layer: LayerNorm) -> dict[str, np.ndarray]:
    """weight = gamma, bias = beta (each only if present)."""
    return _present_arrays([("weight", layer.gamma), ("bias", layer.beta)])


def _layer_norm_from_torch(layer: LayerNorm, a: dict[str, np.ndarray]) -> LayerNorm:
    return attrs.evolve(layer, gamma=a.get("weight"), beta=a.get("bias"))


def _torch_attention(layer: SelfAttention) -> dict[str, np.ndarray]:
    """nn.MultiheadAttention's: in_proj_weight = w_qkv.T (3D, D), in_proj_bias =
    b_qkv, out_proj.weight = w_o.T, out_proj.bias = b_o (biases only if present)."""
    return _present_arrays(
        [
            ("in_proj_weight", layer.w_qkv.T),
            ("in_proj_bias", layer.b_qkv),
            ("out_proj.weight", layer.w_o.T),
            ("out_proj.bias", layer.b_o),
        ]
    )


def _attention_from_torch(layer: SelfAttention, a: dict[str, np.ndarray]) -> SelfAttention:
    return attrs.evolve(
        layer,
        w_qkv=a["in_proj_weight"].T,
        w_o=a["out_proj.weight"].T,
        b_qkv=a.get("in_proj_bias"),
        b_o=a.get("out_proj.bias"),
    )


def _torch_positions(layer: PositionalEmbedding) -> dict[str, np.ndarray]:
    return {"weight": np.array(layer.w)}


def _positions_from_torch(
    layer: PositionalEmbedding, a: dict[str, np.ndarray]
) -> PositionalEmbedding:
    return PositionalEmbedding(a["weight"])


def _torch_chain(layers: Sequence[Any]) -> dict[str, np.ndarray]:
    """A sub-chain's arrays as an nn.Sequential's: ``"{j}.{name}"`` for sub-layer j."""
    return {
        f"{j}.{name}": a
        for j, layer in enumerate(layers)
        for name, a in _torch_arrays(j, layer).items()
    }


def _chain_from_torch(layers: Sequence[Any], a: dict[str, np.ndarray]) -> tuple[Any, ...]:
    """The sub-layers rebuilt from ``_torch_chain``'s keys."""
    new = []
    for j, layer in enumerate(layers):
        head = f"{j}."
        mine = {k[len(head) :]: v for k, v in a.items() if k.startswith(head)}
        new.append(_TORCH_LAYERS[type(layer)][1](layer, mine) if mine else layer)
    return tuple(new)


def _torch_residual(layer: Residual) -> dict[str, np.ndarray]:
    return _torch_chain(layer.layers)


def _residual_from_torch(layer: Residual, a: dict[str, np.ndarray]) -> Residual:
    return Residual(_chain_from_torch(layer.layers, a))


def _torch_tied(layer: TiedEmbedding) -> dict[str, np.ndarray]:
    """weight = w (V, D), then the sub-chain's keys."""
    return {"weight": np.array(layer.w), **_torch_chain(layer.layers)}


def _tied_from_torch(layer: TiedEmbedding, a: dict[str, np.ndarray]) -> TiedEmbedding:
    rest = {k: v for k, v in a.items() if k != "weight"}
    return TiedEmbedding(a["weight"], _chain_from_torch(layer.layers, rest))


_TorchTo = Callable[[Any], dict[str, np.ndarray]]
_TorchBack = Callable[[Any, dict[str, np.ndarray]], Any]

_TORCH_LAYERS: dict[type, tuple[_TorchTo, _TorchBack]] = {
    Dense: (_torch_dense, _dense_from_torch),
    Conv2D: (_torch_conv, _conv_from_torch),
    BatchNorm: (_torch_batch_norm, _batch_norm_from_torch),
    Embedding: (_torch_embedding, _embedding_from_torch),
    RNN: (_torch_recurrent, _recurrent_from_torch),
    LSTM: (_torch_recurrent, _recurrent_from_torch),
    GRU: (_torch_recurrent, _recurrent_from_torch),
    LayerNorm: (_torch_layer_norm, _layer_norm_from_torch),
    SelfAttention: (_torch_attention, _attention_from_torch),
    PositionalEmbedding: (_torch_positions, _positions_from_torch),
    Residual: (_torch_residual, _residual_from_torch),
    TiedEmbedding: (_torch_tied, _tied_from_torch),
}


# dlfs's layers whose PyTorch counterparts hold no state_dict entries.
_TORCH_WITHOUT_ARRAYS: tuple[type, ...] = (
    Linear,
    Sigmoid,
    Tanh,
    ReLU,
    LeakyReLU,
    ELU,
    GELU,
    SiLU,
    Softmax,
    Dropout,
    Flatten,
    MaxPool2D,
    AvgPool2D,
)


def _torch_arrays(i: int, layer: Any) -> dict[str, np.ndarray]:
    """Layer ``i``'s arrays under PyTorch's names; TypeError for a layer with
    parameters that has no mapping."""
    entry = _TORCH_LAYERS.get(type(layer))
    if entry is not None:
        return entry[0](layer)
    if type(layer) in _TORCH_WITHOUT_ARRAYS:
        return {}
    raise TypeError(
        f"layer {i} ({type(layer).__name__}) has no PyTorch mapping in dlfs; it maps "
        + ", ".join(sorted(t.__name__ for t in _TORCH_LAYERS))
        + " and the layers without parameters"
    )


def to_torch_state_dict(net: Network) -> dict[str, np.ndarray]:
    """``net``'s arrays as a PyTorch ``state_dict`` of numpy arrays (fresh,
    writable copies): ``model.load_state_dict({k: torch.from_numpy(v) for k, v
    in sd.items()})`` loads them into the equivalent ``nn.Sequential``.

    Keys are ``"{i}.{name}"`` for layer i of ``net.layers``, so module i of the
    Sequential is layer i's counterpart: Dense -> ``nn.Linear`` (weight =
    w.T (D_out, D_in), bias = b; ``bias=False`` without b); Conv2D -> ``nn.Conv2d`` (weight = w
    (C_out, C_in, kh, kw), bias = b; padding as dlfs's, which for pads
    that are neither symmetric nor ``"same"`` means an ``F.pad`` before the
    convolution); BatchNorm -> ``nn.BatchNorm1d``/``2d`` (weight = gamma,
    bias = beta, running_mean, running_var, num_batches_tracked = 0);
    Embedding -> ``nn.Embedding`` (weight = w); RNN, LSTM, GRU ->
    ``nn.RNN``/``nn.LSTM``/``nn.GRU`` with ``batch_first=True`` (weight_ih_l0 =
    w_ih.T (G*H, D), weight_hh_l0 = w_hh.T (G*H, H), gate blocks in the same
    order, bias_ih_l0 = b, bias_hh_l0 = 0, except the GRU's bias_hh_l0 =
    [0, 0, b_hn]; in a Sequential such a module needs a wrapper that keeps its
    output sequence, or the last h without ``return_sequences``); LayerNorm
    -> ``nn.LayerNorm(D, eps)`` (weight = gamma, bias = beta, each if
    present); SelfAttention -> ``nn.MultiheadAttention(D, n_heads,
    batch_first=True)`` called as self-attention with the causal
    ``attn_mask`` (in_proj_weight = w_qkv.T (3D, D), in_proj_bias = b_qkv,
    out_proj.weight = w_o.T, out_proj.bias = b_o; nanoGPT's c_attn and c_proj
    hold the same transposes); PositionalEmbedding -> an ``nn.Embedding(max_len,
    D)`` whose weight w[:T] is added to x (GPT-2's wpe); Residual -> a
    Sequential of its layers, ``"{i}.{j}.{name}"``, whose output is added to
    x; TiedEmbedding -> weight = w (V, D) plus its layers as
    ``"{i}.{j}.{name}"``, logits = h @ weight.T.  Layers
    without parameters have no keys: Linear -> ``nn.Identity``, Sigmoid,
    Tanh, ReLU, LeakyReLU(alpha) -> ``negative_slope``, ELU(alpha), GELU ->
    ``nn.GELU(approximate="tanh")`` (exact: ``nn.GELU()``), SiLU, Softmax -> ``nn.Softmax(-1)``,
    Dropout(p), Flatten, MaxPool2D, AvgPool2D -> ``nn.MaxPool2d``/``nn.AvgPool2d``
    (kernel_size=size, stride).  ``from_torch_state_dict`` reads it back.

    >>> net = dlfs.network(0, 3, [dlfs.dense(4, dlfs.ReLU()), dlfs.dense(2)], dlfs.MeanSquaredError())
    >>> sd = dlfs.to_torch_state_dict(net)
    >>> {k: v.shape for k, v in sd.items()}  # nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    {'0.weight': (4, 3), '0.bias': (4,), '2.weight': (2, 4), '2.bias': (2,)}
    """
    net = _check_network("net", net)
    return {
        f"{i}.{name}": a
        for i, layer in enumerate(net.layers)
        for name, a in _torch_arrays(i, layer).items()
    }


def _state_array(key: str, value: Any, like: np.ndarray, layer: Any) -> np.ndarray:
    """``value`` as an ndarray shaped and typed like ``like``; ValueError or
    TypeError naming ``key``.  Torch tensors convert through ``np.asarray``."""
    try:
        a = np.asarray(value)
    except Exception as err:  # e.g. a tensor that requires grad
        raise TypeError(
            f"state_dict[{key!r}] must be an array (a numpy array or a CPU tensor, "
            f"detached), got {type(value).__name__}: {err}"
        ) from None
    if a.shape != like.shape:
        raise ValueError(
            f"state_dict[{key!r}] must have shape {like.shape} for layer {layer!r}, got {a.shape}"
        )
    if a.dtype != like.dtype:
        raise TypeError(
            f"state_dict[{key!r}] must be {like.dtype} like the network's arrays, got "
            f"{a.dtype}; dlfs never casts silently: convert it (e.g. tensor.double() or "
            f".astype(np.{like.dtype}))"
        )
    return a


def from_torch_state_dict(net: Network, state_dict: Any) -> Network:
    """A new network shaped like ``net`` with the arrays of a PyTorch
    ``state_dict`` in it: the inverse of ``to_torch_state_dict`` (same keys,
    names and layouts; see there), with ``net``'s config (strides, padding,
    ``return_sequences``, loss) kept.  Values are numpy arrays or CPU tensors
    (``model.state_dict()`` as it is; ``np.asarray`` reads them).

    Every key is checked, in ``to_torch_state_dict``'s order: a missing key,
    an extra one, a wrong shape or dtype (nothing is cast) is an error
    naming the first such key.  Recurrent biases add up: b = bias_ih_l0 +
    bias_hh_l0 (GRU: the r and z parts; b_hn = bias_hh_l0's n part), so
    dlfs -> PyTorch -> dlfs is bit-exact, and PyTorch -> dlfs -> PyTorch
    gives the same function with bias_hh_l0 folded into bias_ih_l0.

    >>> net = dlfs.network(0, 3, [dlfs.dense(4, dlfs.ReLU()), dlfs.dense(2)], dlfs.MeanSquaredError())
    >>> back = dlfs.from_torch_state_dict(net, dlfs.to_torch_state_dict(net))
    >>> all((p == q).all() for ps, qs in zip(net.params(), back.params()) for p, q in zip(ps, qs))
    True
    """
    net = _check_network("net", net)
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"state_dict must be a mapping of names to arrays, got {type(state_dict).__name__}"
        )
    expected = {i: _torch_arrays(i, layer) for i, layer in enumerate(net.layers)}
    names = {f"{i}.{name}" for i, arrays in expected.items() for name in arrays}
    extra = [k for k in state_dict if k not in names]
    if extra:
        raise ValueError(
            f"state_dict has key {extra[0]!r}, which no layer of {net!r} takes "
            f"(it takes {sorted(names) or 'none'})"
        )
    layers: list[Any] = []
    for i, layer in enumerate(net.layers):
        arrays = {}
        for name, like in expected[i].items():
            key = f"{i}.{name}"
            if key not in state_dict:
                raise ValueError(
                    f"state_dict has no {key!r} ({name} of layer {i}, {layer!r}, shape "
                    f"{like.shape})"
                )
            arrays[name] = _state_array(key, state_dict[key], like, layer)
        layers.append(_TORCH_LAYERS[type(layer)][1](layer, arrays) if arrays else layer)
    return Network(layers, net.loss, net.input_shape)
