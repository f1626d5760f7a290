"""Hand-written numpy training loops: the yardsticks a numpy framework is measured by.

- ``DenseNet``, ``CNN`` (the MLP and CNN workloads): the ceiling.  The same
  arithmetic as PyTorch, written with care: float32 end to end, softmax +
  cross-entropy fused in place, in-place ReLU / bias / SGD, matmuls into
  reused buffers (``out=``), transposed operands as views; the CNN keeps
  activations channel-major (C, B, H, W) so that each convolution is one
  GEMM with no transposes, does im2col by 9 shifted copies and col2im by 9
  shifted adds, max-pools 2x2 with PyTorch's tie rule (first maximum in
  row-major order) and applies ReLU after the pool (they commute; the
  gradients are the same).
- ``PlainLoop`` (the tiny workloads): a plain loop that repeats dlfs's
  arithmetic operation for operation, without checks or records, so that
  its trajectory equals dlfs's bit for bit: what dlfs's per-step overhead
  is measured against.
"""

from __future__ import annotations

import numpy as np
from harness import Workload

f32 = np.float32


class Workspace:
    """Scratch arrays kept across steps, by (name, shape, dtype): fresh large
    temporaries cost a page fault per 4 KiB on first touch, every step."""

    def __init__(self) -> None:
        self._arrays: dict[tuple, np.ndarray] = {}

    def __call__(self, name: str, shape: tuple[int, ...], dtype: type = f32) -> np.ndarray:
        key = (name, shape, dtype)
        if key not in self._arrays:
            self._arrays[key] = np.empty(shape, dtype=dtype)
        return self._arrays[key]


def softmax_ce_(z: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """In place: logits z (B, K) -> dL/dz of the mean softmax cross-entropy; returns (loss, z)."""
    b = z.shape[0]
    rows = np.arange(b)
    z -= z.max(axis=1, keepdims=True)
    zy = z[rows, y]
    np.exp(z, out=z)
    s = z.sum(axis=1, keepdims=True)
    loss = float(np.mean(np.log(s[:, 0]) - zy))
    z *= f32(1.0) / (s * f32(b))
    z[rows, y] -= f32(1.0 / b)
    return loss, z


def sgd_(params: list[np.ndarray], grads: list[np.ndarray], lr: np.float32) -> None:
    for p, g in zip(params, grads):
        g *= lr
        p -= g


def torch_dense(w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's Linear (out, in) as (in, out) for x @ w, and a bias copy."""
    return np.ascontiguousarray(w.T), b.copy()


# ------------------------------------------------------------------ dense


class DenseStack:
    """Dense layers with optional ReLU and dropout after each, on rows (B, D)."""

    def __init__(self, layers: tuple[tuple, ...], params: list, ws: Workspace, seed: int) -> None:
        self.W, self.b, self.relu, self.drop = [], [], [], []
        for la in layers:
            if la[0] == "dense":
                w, b = torch_dense(*params[len(self.W)])
                self.W.append(w)
                self.b.append(b)
                self.relu.append(False)
                self.drop.append(0.0)
            elif la[0] == "relu":
                self.relu[-1] = True
            elif la[0] == "dropout":
                self.drop[-1] = la[1]
            else:
                raise ValueError(f"DenseStack cannot run {la}")
        self.ws, self.rng = ws, np.random.default_rng(seed + 3)

    def params(self) -> list[np.ndarray]:
        return self.W + self.b

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        ws, b = self.ws, x.shape[0]
        self.acts, self.masks = [x], []
        for i, (w, bias) in enumerate(zip(self.W, self.b)):
            h = np.matmul(self.acts[-1], w, out=ws(f"h{i}", (b, w.shape[1])))
            h += bias
            if self.relu[i]:
                np.maximum(h, 0, out=h)
            if train and self.drop[i]:
                keep = self.rng.random(h.shape, dtype=f32) >= self.drop[i]
                mask = np.multiply(keep, f32(1 / (1 - self.drop[i])), out=ws(f"m{i}", h.shape))
                h *= mask
                self.masks.append(mask)
            else:
                self.masks.append(None)
            self.acts.append(h)
        return self.acts[-1]

    def backward(self, dz: np.ndarray, need_dx: bool) -> tuple[list[np.ndarray], np.ndarray | None]:
        """(grads as params() orders them, dx or None); dz is dL/d(last output)."""
        ws, n = self.ws, len(self.W)
        dws, dbs = [None] * n, [None] * n
        g = dz
        for i in range(n - 1, -1, -1):
            if self.masks[i] is not None and i < n - 1:
                g *= self.masks[i]
            if self.relu[i] and i < n - 1:
                g *= np.greater(self.acts[i + 1], 0, out=ws(f"r{i}", g.shape, bool))
            a = self.acts[i]
            dws[i] = np.matmul(a.T, g, out=ws(f"dW{i}", self.W[i].shape))
            dbs[i] = g.sum(axis=0)
            if i or need_dx:
                g = np.matmul(g, self.W[i].T, out=ws(f"dh{i}", a.shape))
        return dws + dbs, (g if need_dx else None)


class DenseNet:
    """An MLP workload by hand: a DenseStack and the fused softmax cross-entropy."""

    def __init__(self, w: Workload, init: list, seed: int) -> None:
        if w.loss != "ce":
            raise ValueError("the hand-written MLP does softmax cross-entropy only")
        self.stack = DenseStack(w.layers, init, Workspace(), seed)

    def params(self) -> list[np.ndarray]:
        return self.stack.params()

    def step(self, x: np.ndarray, y: np.ndarray, lr: np.float32) -> float:
        loss, dz = softmax_ce_(self.stack.forward(x, train=True), y)
        grads, _ = self.stack.backward(dz, need_dx=False)
        sgd_(self.params(), grads, lr)
        return loss

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.stack.forward(x, train=False).copy()

    def torch_layout(self) -> list[np.ndarray]:
        s = self.stack
        return [a for w, b in zip(s.W, s.b) for a in (w.T, b)]


# -------------------------------------------------------------------- CNN
# Channel-major activations (C, B, H, W): a 3x3 convolution is one GEMM
# W (F, C*9) @ cols (C*9, B*H*W) -> (F, B*H*W), with no transposes.


def pool2_fwd(x: np.ndarray, ws: Workspace, tag: str) -> tuple[np.ndarray, tuple]:
    """2x2/2 max-pool of x (F, B, H, W); the masks reproduce PyTorch's
    'first maximum in row-major window order wins' in backward."""
    f, b, h, w = x.shape
    shp = (f, b, h // 2, w // 2)
    v = x.reshape(f, b, h // 2, 2, w // 2, 2)
    p, q = v[:, :, :, 0, :, 0], v[:, :, :, 0, :, 1]
    r, s = v[:, :, :, 1, :, 0], v[:, :, :, 1, :, 1]
    top = np.maximum(p, q, out=ws(tag + "top", shp))
    bottom = np.maximum(r, s, out=ws(tag + "bottom", shp))
    masks = (
        np.greater_equal(p, q, out=ws(tag + "m_top", shp, bool)),
        np.greater_equal(r, s, out=ws(tag + "m_bottom", shp, bool)),
        np.greater_equal(top, bottom, out=ws(tag + "m_rows", shp, bool)),
    )
    np.maximum(top, bottom, out=top)
    return top, masks


def pool2_bwd(dy: np.ndarray, masks: tuple, shape: tuple, ws: Workspace, tag: str) -> np.ndarray:
    m_top, m_bottom, m_rows = masks
    f, b, h, w = shape
    dx = ws(tag + "dx", shape)
    v = dx.reshape(f, b, h // 2, 2, w // 2, 2)
    d_top = np.multiply(dy, m_rows, out=ws(tag + "d_top", dy.shape))
    d_bottom = np.subtract(dy, d_top, out=ws(tag + "d_bottom", dy.shape))  # exact: dy or 0
    np.multiply(d_top, m_top, out=v[:, :, :, 0, :, 0])
    np.subtract(d_top, v[:, :, :, 0, :, 0], out=v[:, :, :, 0, :, 1])
    np.multiply(d_bottom, m_bottom, out=v[:, :, :, 1, :, 0])
    np.subtract(d_bottom, v[:, :, :, 1, :, 0], out=v[:, :, :, 1, :, 1])
    return dx


def im2col(xp: np.ndarray, side: int, out: np.ndarray) -> np.ndarray:
    """Padded xp (C, B, Hp, Wp) -> cols (C*9, B*side*side), rows (c, kh, kw) like
    PyTorch's weight.reshape(F, C*9)."""
    c, b = xp.shape[:2]
    for i in range(3):
        for j in range(3):
            out[:, i, j] = xp[:, :, i : i + side, j : j + side]
    return out.reshape(c * 9, b * side * side)


def col2im(dcols: np.ndarray, dxp: np.ndarray, side: int) -> np.ndarray:
    c, b = dxp.shape[:2]
    d6 = dcols.reshape(c, 3, 3, b, side, side)
    dxp.fill(0)
    for i in range(3):
        for j in range(3):
            dxp[:, :, i : i + side, j : j + side] += d6[:, i, j]
    return dxp


class CNN:
    """conv-ReLU-pool blocks, then a DenseStack head (softmax cross-entropy)."""

    def __init__(self, w: Workload, init: list, seed: int) -> None:
        convs = [la for la in w.layers if la[0] == "conv"]
        self.ws, self._zeroed = Workspace(), set()
        self.blocks = []  # (W (F, C*9), b (F, 1), pad, side_in, conv side)
        side = w.input_shape[1]
        for (_, c_in, c_out, pad), (k, b) in zip(convs, init):
            conv_side = side + 2 * pad - 2
            if conv_side % 2:
                raise ValueError("the hand-written CNN pools 2x2 over even sides only")
            self.blocks.append([k.reshape(c_out, c_in * 9).copy(), b.reshape(c_out, 1).copy()])
            self.blocks[-1] += [pad, side, conv_side]
            side = conv_side // 2
        self.side = side
        head = w.layers[w.layers.index(("flatten",)) + 1 :]
        self.head = DenseStack(head, init[len(convs) :], self.ws, seed)

    def params(self) -> list[np.ndarray]:
        return [a for blk in self.blocks for a in blk[:2]] + self.head.params()

    def _padded(self, k: int, shape: tuple[int, ...]) -> np.ndarray:
        """Conv k's padded input buffer: borders zeroed once, interiors rewritten."""
        a = self.ws(f"xp{k}", shape)
        if (k, shape) not in self._zeroed:
            a.fill(0)
            self._zeroed.add((k, shape))
        return a

    def _interior(self, k: int, c: int, b: int) -> np.ndarray:
        _, _, pad, side, _ = self.blocks[k]
        xp = self._padded(k, (c, b, side + 2 * pad, side + 2 * pad))
        return xp[:, :, pad : pad + side, pad : pad + side]

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        ws, b = self.ws, x.shape[0]
        self._interior(0, x.shape[1], b)[...] = x.transpose(1, 0, 2, 3)
        self.cache = []
        for k, (w, bias, _, _, s) in enumerate(self.blocks):
            c = w.shape[1] // 9
            xp = self._padded(k, (c, b, s + 2, s + 2))
            cols = im2col(xp, s, ws(f"cols{k}", (c, 3, 3, b, s, s)))
            pre = np.matmul(w, cols, out=ws(f"pre{k}", (w.shape[0], b * s * s)))
            pre += bias
            pooled, masks = pool2_fwd(pre.reshape(w.shape[0], b, s, s), ws, f"p{k}")
            last = k == len(self.blocks) - 1
            out = pooled if last else self._interior(k + 1, w.shape[0], b)
            np.maximum(pooled, 0, out=out)  # ReLU after the pool: they commute
            self.cache.append((cols, masks, out))
        flat = ws("flat", (b, out.shape[0], self.side, self.side))
        flat[...] = out.transpose(1, 0, 2, 3)  # PyTorch's (C, H, W) flatten order
        return self.head.forward(flat.reshape(b, -1), train)

    def step(self, x: np.ndarray, y: np.ndarray, lr: np.float32) -> float:
        ws, b = self.ws, x.shape[0]
        loss, dz = softmax_ce_(self.forward(x, train=True), y)
        head_grads, dflat = self.head.backward(dz, need_dx=True)
        f = self.blocks[-1][0].shape[0]
        d = dflat.reshape(b, f, self.side, self.side).transpose(1, 0, 2, 3)
        grads = []
        for k in range(len(self.blocks) - 1, -1, -1):
            w, _, pad, side, s = self.blocks[k]
            cols, masks, out = self.cache[k]
            relu_mask = np.greater(out, 0, out=ws(f"mr{k}", out.shape, bool))
            dpool = np.multiply(d, relu_mask, out=ws(f"dp{k}", out.shape))
            dpre = pool2_bwd(dpool, masks, (w.shape[0], b, s, s), ws, f"p{k}")
            dpre = dpre.reshape(w.shape[0], -1)
            grads = [
                np.matmul(dpre, cols.T, out=ws(f"dW{k}", w.shape)),
                dpre.sum(axis=1, keepdims=True),
                *grads,
            ]
            if k:
                dcols = np.matmul(w.T, dpre, out=ws(f"dcols{k}", (w.shape[1], dpre.shape[1])))
                dxp = col2im(dcols, ws(f"dxp{k}", (w.shape[1] // 9, b, s + 2, s + 2)), s)
                d = dxp[:, :, pad : pad + side, pad : pad + side]
        sgd_(self.params(), grads + head_grads, lr)
        self.cache = None
        return loss

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x, train=False).copy()

    def torch_layout(self) -> list[np.ndarray]:
        out = []
        for w, b, *_ in self.blocks:
            out += [w.reshape(w.shape[0], -1, 3, 3), b.ravel()]
        return out + [a for w, b in zip(self.head.W, self.head.b) for a in (w.T, b)]


# ------------------------------------------------------------- plain loop


class PlainLoop:
    """dlfs's arithmetic, operation for operation, in a bare loop: Dense
    ``y = np.dot(x, w); y += b``, ReLU ``max(y, 0)`` in place, Tanh, the
    softmax cross-entropy of integer labels in place on the logits (one exp:
    softmax = exp(z - max) / s, loss = mean(log s - (z_y - max)), gradient
    ``(softmax - onehot) / N``) or MSE (``d = p - y`` in place, loss
    ``vdot(d, d) / N``, gradient ``d * (2/N)`` in place), ReLU's gradient
    ``dy * (y > 0)`` in place, SGD ``p - g * lr``.  Bit-identical
    trajectories to dlfs; no checks, no records."""

    def __init__(self, w: Workload, init: list, seed: int) -> None:
        self.W, self.b, self.act = [], [], []
        for la in w.layers:
            if la[0] == "dense":
                wt, b = torch_dense(*init[len(self.W)])
                self.W.append(wt)
                self.b.append(b)
                self.act.append(None)
            else:
                self.act[-1] = la[0]
        self.loss = w.loss

    def params(self) -> list[np.ndarray]:
        return self.W + self.b

    def _forward(self, x: np.ndarray) -> list[np.ndarray]:
        hs = [x]
        for w, b, act in zip(self.W, self.b, self.act):
            h = np.dot(hs[-1], w)
            h += b
            if act == "relu":
                np.maximum(h, np.zeros(h.shape[1:], h.dtype), out=h)
            elif act == "tanh":
                h = np.tanh(h)
            hs.append(h)
        return hs

    def _loss_grad(self, out: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        """(loss, gradient), in place in ``out`` unless an activation keeps it (as dlfs)."""
        n = out.shape[0]
        fresh = self.act[-1] is None
        if self.loss == "mse":
            diff = np.subtract(out, y, out=out if fresh else None)
            loss = np.vdot(diff, diff) / n
            diff *= 2 / n
            return float(loss), diff
        if not fresh:
            out = out.copy()
        out -= out.max(axis=1, keepdims=True)
        rows = np.arange(n)
        z_y = out[rows, y]
        np.exp(out, out=out)
        s = out.sum(axis=1, keepdims=True)
        out /= s
        loss = (np.log(s[:, 0]) - z_y).sum() / n
        out[rows, y] -= 1.0
        out /= n
        return float(loss), out

    def step(self, x: np.ndarray, y: np.ndarray, lr: float) -> float:
        hs = self._forward(x)
        loss, g = self._loss_grad(hs[-1], y)
        grads = []
        for i in range(len(self.W) - 1, -1, -1):
            if self.act[i] == "relu":
                np.multiply(g, hs[i + 1] > 0, out=g)
            elif self.act[i] == "tanh":
                g = g * (1 - hs[i + 1] * hs[i + 1])
            grads.append((np.dot(hs[i].T, g), g.sum(axis=0)))
            if i:
                g = np.dot(g, self.W[i].T)
        for (dw, db), w, b in zip(reversed(grads), self.W, self.b):
            w -= dw * lr
            b -= db * lr
        return loss

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self._forward(x)[-1]

    def torch_layout(self) -> list[np.ndarray]:
        return [a for w, b in zip(self.W, self.b) for a in (w.T, b)]


def build(w: Workload, init: list, seed: int):
    """The numpy contender for ``w``: the plain loop where ``w.plain`` (the tiny
    workloads), otherwise the hand-tuned MLP or CNN."""
    if w.plain:
        return PlainLoop(w, init, seed)
    if any(la[0] == "conv" for la in w.layers):
        return CNN(w, init, seed)
    return DenseNet(w, init, seed)


class Contender:
    """The loop around a model: one np.take gather per batch (the hand-tuned
    models into a reused buffer, without the bounds-check copy), SGD step."""

    def __init__(self, w: Workload, init: list, seed: int) -> None:
        self.model = build(w, init, seed)
        self.lr = f32(w.lr)
        self.ws = getattr(self.model, "ws", None)

    def _gather(self, x: np.ndarray, idx: np.ndarray) -> np.ndarray:
        if self.ws is None:
            return np.take(x, idx, axis=0)
        out = self.ws("xb", (len(idx), *x.shape[1:]))
        return np.take(x, idx, axis=0, out=out, mode="clip")

    def train_epoch(self, x: np.ndarray, y: np.ndarray, order: np.ndarray, batch: int) -> float:
        total = 0.0
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            loss = self.model.step(self._gather(x, idx), np.take(y, idx, axis=0), self.lr)
            total += loss * len(idx)
        return total / len(order)

    def predict(self, x: np.ndarray, batch: int) -> np.ndarray:
        return np.concatenate(
            [self.model.predict(x[i : i + batch]) for i in range(0, len(x), batch)]
        )

    def torch_layout(self) -> list[np.ndarray]:
        return self.model.torch_layout()
