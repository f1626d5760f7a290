"""MLP training and inference throughput: dlfs vs PyTorch eager (CPU) vs hand-written numpy.

Network 784-256-128-10 with ReLU, softmax cross-entropy, plain SGD, float32.
Three contenders train interleaved in one process (dlfs, torch, numpy, dlfs,
torch, numpy, ... for ``--rounds`` rounds, per batch size), each for
``--steps`` steps over the same shuffled data (a permutation of the indices
plus ``np.take`` per batch), from the same initial weights.  The numpy loop
below is the ceiling for framework overhead: the same math with no
validation, no immutability and in-place updates.  All contenders use the
same number of threads (``--threads``; torch and the numpy BLAS pool).

Prints ``key=value`` lines: median samples/s per contender and batch size,
``ratio_vs_torch_b128`` (dlfs / torch), ``ratio_vs_numpy_b128`` (dlfs /
numpy), etc., then inference (predict) throughput and its ratios.  A ratio
is the median over rounds of the within-round ratio (the contenders of a
round run back to back, so a shared machine's drifting load cancels out).

Setup (from the project root)::

    pip install -e ".[bench]"      # torch==2.13.0 (CPU), threadpoolctl, pyinstrument
    python benchmarks/bench_mlp.py                     # synthetic MNIST-shaped data
    python benchmarks/bench_mlp.py --rounds 5 --steps 100
    python benchmarks/bench_mlp.py --data PATH/mnist.npz   # x_train (N,28,28) uint8, y_train

Without torch installed the torch contender is skipped with a message.

``--tiny`` measures the fixed per-step cost instead: an 8-8-8-4 network at
batch 8 (so the arithmetic is negligible), dlfs against the same numpy loop,
interleaved over ``--rounds`` rounds of ``--tiny-steps`` steps each; it prints
``tiny_dlfs_us_per_step``, ``tiny_numpy_us_per_step`` (medians over rounds)
and ``tiny_time_ratio_vs_numpy`` (median within-round ratio of the times, dlfs /
numpy: above 1 means dlfs takes longer)::

    python benchmarks/bench_mlp.py --tiny --threads 1
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import dlfs

SIZES = (784, 256, 128, 10)
TINY_SIZES, TINY_BATCH = (8, 8, 8, 4), 8


# ------------------------------------------------------------------- data


def load_data(path: str | None, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(x float32 (N, 784) in [0, 1], y int64 (N,)): synthetic, or MNIST from ``path``."""
    if path:
        with np.load(path, allow_pickle=False) as d:
            x = d["x_train"].reshape(len(d["x_train"]), -1).astype(np.float32) / 255
            y = d["y_train"].astype(np.int64)
        return x[:n], y[:n]
    return synthetic(n, SIZES, seed)


def synthetic(n: int, sizes: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """x float32 (n, sizes[0]) uniform in [0, 1), y int64 (n,) in [0, sizes[-1])."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, sizes[0]), dtype=np.float32)
    # Labels that depend on x, so that the task is learnable (the loss falls).
    proj = rng.standard_normal((sizes[0], sizes[-1])).astype(np.float32)
    y = np.argmax((x - 0.5) @ proj, axis=1).astype(np.int64)
    return x, y


def order(n: int, key: tuple[int, ...]) -> np.ndarray:
    """The shuffled row order of one pass: the permutation dlfs.batches draws for ``key``."""
    return dlfs.make_rng(key).permutation(n)


def numpy_batches(x: np.ndarray, y: np.ndarray, batch_size: int, steps: int, key):
    """What the references do per batch: slice the shuffled index, np.take the rows."""
    idx_all = order(len(x), key)
    for i in range(steps):
        idx = idx_all[i * batch_size : (i + 1) * batch_size]
        yield np.take(x, idx, axis=0), np.take(y, idx, axis=0)


# ----------------------------------------------------------- contenders


def initial_weights(
    seed: int, sizes: tuple[int, ...] = SIZES
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Glorot-normal weights and zero biases, drawn by dlfs (shared by everyone)."""
    net = make_dlfs_net(seed, sizes=sizes)
    return [(np.array(w), np.array(b)) for w, b in (p for p in net.params() if p)]


def make_dlfs_net(seed: int, weights=None, sizes: tuple[int, ...] = SIZES) -> dlfs.Network:
    """Dense layers ``sizes[0] -> ... -> sizes[-1]``, ReLU between them, softmax cross-entropy."""
    if weights is not None:
        sizes = (weights[0][0].shape[0], *(w.shape[1] for w, _ in weights))
    layers = [dlfs.dense(n, dlfs.ReLU()) for n in sizes[1:-1]] + [dlfs.dense(sizes[-1])]
    net = dlfs.network(seed, sizes[0], layers, dlfs.SoftmaxCrossEntropy(), dtype=np.float32)
    if weights is not None:
        it = iter(weights)
        net = net.with_params(tuple(next(it) if p else () for p in net.params()))
    return net


class DlfsRunner:
    """dlfs through its public API: TrainState + train_epoch over a batch iterable."""

    name = "dlfs"

    def __init__(self, weights, lr: float) -> None:
        self.state = dlfs.TrainState.create(make_dlfs_net(0, weights), dlfs.SGD(lr), 0)

    def train(self, x: np.ndarray, y: np.ndarray, batch_size: int, steps: int, key) -> float:
        batches = itertools.islice(dlfs.batches(x, y, batch_size, key=key), steps)
        self.state = dlfs.train_epoch(self.state, batches)
        return self.state.mean_loss

    def predict(self, x: np.ndarray, batch_size: int) -> np.ndarray:
        return self.state.net.predict(x, batch_size=batch_size)


class NumpyRunner:
    """The hand-written ceiling: same math, in-place SGD, no checks."""

    name = "numpy"

    def __init__(self, weights, lr: float) -> None:
        self.params = [(w.copy(), b.copy()) for w, b in weights]
        self.lr = np.float32(lr)

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, list]:
        acts = [x]
        last = len(self.params) - 1
        for i, (w, b) in enumerate(self.params):
            z = x @ w
            z += b
            x = np.maximum(z, 0, out=z) if i < last else z
            acts.append(x)
        return x, acts

    def train(self, x: np.ndarray, y: np.ndarray, batch_size: int, steps: int, key) -> float:
        total = 0.0
        for xb, yb in numpy_batches(x, y, batch_size, steps, key):
            n = len(xb)
            z, acts = self._forward(xb)
            z = z - z.max(axis=1, keepdims=True)
            e = np.exp(z)
            s = e.sum(axis=1, keepdims=True)
            rows = np.arange(n)
            total += float(np.log(s[:, 0]).sum() - z[rows, yb].sum())
            g = e / s
            g[rows, yb] -= 1
            g /= n
            for i in range(len(self.params) - 1, -1, -1):
                w, b = self.params[i]
                a = acts[i]
                dw = a.T @ g
                db = g.sum(axis=0)
                if i:
                    g = g @ w.T
                    g *= acts[i] > 0
                w -= self.lr * dw
                b -= self.lr * db
        return total / (steps * batch_size)

    def predict(self, x: np.ndarray, batch_size: int) -> np.ndarray:
        return np.concatenate(
            [self._forward(x[i : i + batch_size])[0] for i in range(0, len(x), batch_size)]
        )


class TorchRunner:
    """PyTorch eager on CPU: nn.Sequential, CrossEntropyLoss, optim.SGD."""

    name = "torch"

    def __init__(self, weights, lr: float) -> None:
        import torch

        self.torch = torch
        mods: list[Any] = []
        for i, (w, b) in enumerate(weights):
            lin = torch.nn.Linear(w.shape[0], w.shape[1])
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(w.T.copy()))
                lin.bias.copy_(torch.from_numpy(b))
            mods.append(lin)
            if i < len(weights) - 1:
                mods.append(torch.nn.ReLU())
        self.model = torch.nn.Sequential(*mods)
        self.loss_fn = torch.nn.CrossEntropyLoss()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr)

    def train(self, x: np.ndarray, y: np.ndarray, batch_size: int, steps: int, key) -> float:
        torch = self.torch
        total = 0.0
        self.model.train()
        for xb, yb in numpy_batches(x, y, batch_size, steps, key):
            xt, yt = torch.from_numpy(xb), torch.from_numpy(yb)
            self.opt.zero_grad(set_to_none=True)
            loss = self.loss_fn(self.model(xt), yt)
            loss.backward()
            self.opt.step()
            total += loss.item() * len(xb)
        return total / (steps * batch_size)

    def predict(self, x: np.ndarray, batch_size: int) -> np.ndarray:
        torch = self.torch
        self.model.eval()
        with torch.no_grad():
            return np.concatenate(
                [
                    self.model(torch.from_numpy(x[i : i + batch_size])).numpy()
                    for i in range(0, len(x), batch_size)
                ]
            )


# -------------------------------------------------------------- harness


def configure_threads(n: int) -> tuple[Any, Any]:
    """Limit the BLAS pool (threadpoolctl) and torch to ``n`` threads."""
    limiter = None
    try:
        from threadpoolctl import threadpool_limits

        limiter = threadpool_limits(limits=n, user_api="blas")
    except ImportError:
        print("# threadpoolctl not installed: BLAS thread count not pinned", file=sys.stderr)
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:
        torch = None
    return limiter, torch


def print_config(threads: int, torch: Any) -> None:
    print(f"python={sys.version.split()[0]}")
    print(f"numpy={np.__version__}")
    print(f"dlfs={dlfs.__version__}")
    print(f"cpu_count={os.cpu_count()}")
    print(f"threads={threads}")
    try:
        from threadpoolctl import threadpool_info

        for i, info in enumerate(threadpool_info()):  # numpy's BLAS, torch's OpenMP, ...
            print(
                f"threadpool_{i}={info.get('user_api')}:{info.get('internal_api')} "
                f"{info.get('version')} arch={info.get('architecture')} "
                f"threads={info.get('num_threads')} file={Path(info.get('filepath', '')).name}"
            )
    except ImportError:
        print("blas=unknown (threadpoolctl not installed)")
    if torch is not None:
        print(f"torch={torch.__version__}")
        print(f"torch_num_threads={torch.get_num_threads()}")
        blas = re.findall(r"BLAS_INFO=([^,\s]*)", torch.__config__.show())
        print(
            f"torch_blas={blas[0] if blas else 'unknown'} mkldnn={torch.backends.mkldnn.is_available()}"
        )
    else:
        print("torch=not installed: torch contender skipped (pip install -e '.[bench]')")


def timed(fn, *args) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def bench_training(runners, x, y, args) -> dict:
    """Per batch size: a warm-up, then ``rounds`` interleaved timed runs of ``steps`` steps,
    each round on a fresh shuffle (the same for every contender)."""
    results: dict = {}
    for bs in args.batch_sizes:
        warm = max(3, args.steps // 10)
        for r in runners:  # warm-up (allocator, BLAS threads, torch dispatch caches)
            r.train(x, y, bs, warm, (args.seed, bs, 0))
        rates: dict[str, list[float]] = {r.name: [] for r in runners}
        losses: dict[str, float] = {}
        for k in range(args.rounds):
            for r in runners:
                dt, losses[r.name] = timed(r.train, x, y, bs, args.steps, (args.seed, bs, k + 1))
                rates[r.name].append(args.steps * bs / dt)
        for r in runners:
            results[(r.name, bs)] = rates[r.name]
            print(f"train_{r.name}_b{bs}_samples_per_s={statistics.median(rates[r.name]):.0f}")
        # Same data, same initial weights: the losses of the last round agree closely.
        print(f"train_loss_b{bs}=" + ",".join(f"{k}:{v:.4f}" for k, v in losses.items()))
    return results


def bench_inference(runners, x, args) -> dict:
    xs = x[: args.predict_n]
    for r in runners:
        r.predict(xs[:2048], args.predict_batch)
    rates: dict[str, list[float]] = {r.name: [] for r in runners}
    for _ in range(args.rounds):
        for r in runners:
            dt, _ = timed(r.predict, xs, args.predict_batch)
            rates[r.name].append(len(xs) / dt)
    out = {}
    for r in runners:
        out[r.name] = rates[r.name]
        print(f"predict_{r.name}_samples_per_s={statistics.median(rates[r.name]):.0f}")
    return out


def paired_ratio(ours: list[float], ref: list[float]) -> float:
    """Median over rounds of ours/ref within the same round: contenders of one round
    ran back to back, so a shared machine's changing load cancels out of the ratio."""
    return statistics.median(a / b for a, b in zip(ours, ref))


def bench_tiny(args) -> None:
    """Per-step time on an 8-8-8-4 net at batch 8: what a step costs besides the arithmetic.
    dlfs and the numpy loop alternate, each round ``tiny_steps`` steps on a fresh shuffle."""
    steps, bs = args.tiny_steps, TINY_BATCH
    x, y = synthetic(steps * bs, TINY_SIZES, args.seed)
    weights = initial_weights(args.seed, TINY_SIZES)
    runners = [DlfsRunner(weights, args.lr), NumpyRunner(weights, args.lr)]
    print(f"tiny_sizes={'-'.join(map(str, TINY_SIZES))} tiny_batch={bs} tiny_steps={steps}")
    for r in runners:  # warm-up
        r.train(x, y, bs, max(10, steps // 10), (args.seed, bs, 0))
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    losses = {}
    for k in range(args.rounds):
        for r in runners:
            dt, losses[r.name] = timed(r.train, x, y, bs, steps, (args.seed, bs, k + 1))
            times[r.name].append(dt / steps * 1e6)
    for r in runners:
        print(f"tiny_{r.name}_us_per_step={statistics.median(times[r.name]):.1f}")
    print(f"tiny_time_ratio_vs_numpy={paired_ratio(times['dlfs'], times['numpy']):.2f}")
    print("tiny_train_loss=" + ",".join(f"{k}:{v:.4f}" for k, v in losses.items()))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="npz with x_train (N,28,28) uint8 and y_train (real MNIST)")
    p.add_argument("--n", type=int, default=60000, help="training rows (synthetic: generated)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128, 512])
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (>= 3)")
    p.add_argument("--steps", type=int, default=40, help="steps per contender per round")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--predict-n", type=int, default=10000)
    p.add_argument("--predict-batch", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="+", choices=["dlfs", "torch", "numpy"], help="contenders")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="only the per-step overhead: dlfs vs numpy on an 8-8-8-4 net, batch 8",
    )
    p.add_argument("--tiny-steps", type=int, default=2000, help="steps per contender per round")
    args = p.parse_args(argv)
    if args.rounds < 3:
        p.error("--rounds must be >= 3")
    if args.tiny:
        if args.tiny_steps < 1:
            p.error("--tiny-steps must be >= 1")
        _limiter, torch = configure_threads(args.threads)
        print_config(args.threads, torch)
        print(f"rounds={args.rounds} lr={args.lr}")
        bench_tiny(args)
        return
    if args.steps * max(args.batch_sizes) > args.n:
        p.error(f"--steps * batch size must be <= --n ({args.n}): one pass per timed run")

    _limiter, torch = configure_threads(args.threads)
    print_config(args.threads, torch)
    x, y = load_data(args.data, args.n, args.seed)
    print(f"data={'synthetic' if not args.data else 'npz'} x={x.shape} {x.dtype} y={y.shape}")
    print(f"rounds={args.rounds} steps={args.steps} lr={args.lr}")

    weights = initial_weights(args.seed)
    kinds = {"dlfs": DlfsRunner, "torch": TorchRunner, "numpy": NumpyRunner}
    wanted = args.only or ["dlfs", "torch", "numpy"]
    if torch is None and "torch" in wanted:
        print("# torch is not installed: skipping the PyTorch contender")
        wanted = [k for k in wanted if k != "torch"]
    runners = [kinds[k](weights, args.lr) for k in wanted]

    train = bench_training(runners, x, y, args)
    for ref in ("torch", "numpy"):
        if ref in wanted and "dlfs" in wanted:
            for bs in args.batch_sizes:
                print(f"ratio_vs_{ref}_b{bs}={paired_ratio(train['dlfs', bs], train[ref, bs]):.3f}")

    pred = bench_inference(runners, x, args)
    for ref in ("torch", "numpy"):
        if ref in wanted and "dlfs" in wanted:
            print(f"predict_ratio_vs_{ref}={paired_ratio(pred['dlfs'], pred[ref]):.3f}")


if __name__ == "__main__":
    main()
