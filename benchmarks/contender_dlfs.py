"""dlfs through its public API: the workload's layers in a ``dlfs.Network``,
``dlfs.SGD``, ``dlfs.train_epoch`` over the batches (one ``np.take`` gather
per batch, as ``dlfs.batches`` does)."""

from __future__ import annotations

import sys

import numpy as np
from harness import ROOT, Workload

sys.path.insert(0, str(ROOT))
import dlfs


def _layer(layer: tuple, params):
    kind = layer[0]
    if kind == "dense":
        w, b = next(params)
        return dlfs.Dense(np.ascontiguousarray(w.T), b)  # PyTorch's (out, in) -> (in, out)
    if kind == "conv":
        w, b = next(params)
        return dlfs.Conv2D(w, b, padding=layer[3])
    if kind == "dropout":
        return dlfs.Dropout(layer[1])
    simple = {"relu": dlfs.ReLU, "tanh": dlfs.Tanh, "maxpool": lambda: dlfs.MaxPool2D(2)}
    return simple.get(kind, dlfs.Flatten)()


def build_network(w: Workload, init: list) -> dlfs.Network:
    params = iter(init)
    loss = dlfs.SoftmaxCrossEntropy() if w.loss == "ce" else dlfs.MeanSquaredError()
    net = dlfs.Network([_layer(la, params) for la in w.layers], loss, w.input_shape)
    if w.name == "mnist_cnn":
        _check_same_as_example(net)
    return net


def _describe(net: dlfs.Network) -> list[tuple]:
    return [
        (
            type(la).__name__,
            [p.shape for p in la.params()],
            getattr(la, "padding", None),
            getattr(la, "p", None),
        )
        for la in net.layers
    ]


def _check_same_as_example(net: dlfs.Network) -> None:
    """The mnist_cnn workload must be the network examples/mnist_cnn.py builds."""
    sys.path.insert(0, str(ROOT / "examples"))
    from mnist_cnn import build

    if _describe(build(0)) != _describe(net):
        raise SystemExit("the mnist_cnn workload no longer matches examples/mnist_cnn.py's build()")


def batches(x: np.ndarray, y: np.ndarray, order: np.ndarray, batch: int):
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        yield np.take(x, idx, axis=0), np.take(y, idx, axis=0)


class Contender:
    def __init__(self, w: Workload, init: list, seed: int) -> None:
        self.state = dlfs.TrainState.create(build_network(w, init), dlfs.SGD(w.lr), key=seed)

    def train_epoch(self, x: np.ndarray, y: np.ndarray, order: np.ndarray, batch: int) -> float:
        self.state = dlfs.train_epoch(self.state, batches(x, y, order, batch))
        return self.state.mean_loss

    def predict(self, x: np.ndarray, batch: int) -> np.ndarray:
        return self.state.net.predict(x, batch_size=batch)

    def torch_layout(self) -> list[np.ndarray]:
        return [p.T if p.ndim == 2 else p for layer in self.state.net.params() for p in layer]
