"""PyTorch eager on CPU (float32): ``nn.Sequential``, ``optim.SGD``, one
``index_select`` gather per batch, ``loss.item()`` every step."""

from __future__ import annotations

import numpy as np
from harness import Workload


def _module(layer: tuple):
    import torch.nn as nn

    kind = layer[0]
    if kind == "dense":
        return nn.Linear(layer[1], layer[2])
    if kind == "conv":
        return nn.Conv2d(layer[1], layer[2], 3, padding=layer[3])
    if kind == "dropout":
        return nn.Dropout(layer[1])
    simple = {"relu": nn.ReLU, "tanh": nn.Tanh, "maxpool": lambda: nn.MaxPool2d(2)}
    return simple.get(kind, nn.Flatten)()


class Contender:
    def __init__(self, w: Workload, init: list, seed: int) -> None:
        import torch
        import torch.nn.functional as functional

        self.torch = torch
        torch.manual_seed(seed)  # dropout's draws
        self.model = torch.nn.Sequential(*(_module(la) for la in w.layers))
        with torch.no_grad():
            params = [p for pair in init for p in pair]
            for t, a in zip(self.model.parameters(), params, strict=True):
                t.copy_(torch.from_numpy(a))
        if w.loss == "ce":
            self.loss_fn = functional.cross_entropy
        else:  # dlfs's (the book's) MSE: sum((p - y)^2) / N
            self.loss_fn = lambda p, y: functional.mse_loss(p, y, reduction="sum") / len(p)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=w.lr)
        self._data: tuple = (None, None, None)

    def _tensors(self, x: np.ndarray, y: np.ndarray):
        if self._data[0] is not x:  # wrap once per array, not per batch (no copy)
            self._data = (x, self.torch.from_numpy(x), self.torch.from_numpy(y))
        return self._data[1:]

    def train_epoch(self, x: np.ndarray, y: np.ndarray, order: np.ndarray, batch: int) -> float:
        torch = self.torch
        xt, yt = self._tensors(x, y)
        perm = torch.from_numpy(order)
        self.model.train()
        total = 0.0
        for start in range(0, len(order), batch):
            idx = perm[start : start + batch]
            xb, yb = xt.index_select(0, idx), yt.index_select(0, idx)
            loss = self.loss_fn(self.model(xb), yb)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            total += loss.item() * len(idx)
        return total / len(order)

    def predict(self, x: np.ndarray, batch: int) -> np.ndarray:
        torch = self.torch
        self.model.eval()
        with torch.no_grad():
            xt = torch.from_numpy(x)
            return np.concatenate(
                [self.model(xt[i : i + batch]).numpy() for i in range(0, len(x), batch)]
            )

    def torch_layout(self) -> list[np.ndarray]:
        return [p.detach().numpy().copy() for p in self.model.parameters()]
