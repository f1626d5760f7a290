"""What every benchmark shares: the workloads, their data, initial weights and
shuffles, ``key=value`` output, and the runner that starts each contender in
its own process, in interleaved rounds.

Why separate processes: after a parallel region, OpenBLAS's threads (numpy)
and OpenMP's threads (PyTorch) keep spinning for a while and steal each
other's cores, so two libraries timed in one process slow each other down
(PyTorch at 2 threads fell from 146k to 40k samples/s when numpy GEMMs ran
between its rounds).  Each contender therefore runs in a fresh process
(``run_one.py``) with its thread counts fixed in the environment before numpy
or torch loads; the parent alternates the contenders (A, B, C, B, C, A, ...),
so a shared machine's drifting load hits all of them alike, and reports
ratios as the median of within-round ratios.

``--threads T`` is every contender's BLAS / OpenMP thread count (PyTorch's
``set_num_threads``); dlfs has no threads of its own beside BLAS's.

Nothing in this module is timed.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
IMPLS = ("dlfs", "torch", "numpy")

# ------------------------------------------------------------------ workloads
# A layer is a tuple: ("dense", n_in, n_out), ("conv", c_in, c_out, pad) (3x3,
# stride 1), ("relu",), ("tanh",), ("maxpool",) (2x2, stride 2), ("flatten",),
# ("dropout", p).  Every contender builds its model from this description.


@dataclass(frozen=True)
class Workload:
    name: str
    input_shape: tuple[int, ...]
    layers: tuple[tuple, ...]
    loss: str  # "ce": softmax cross-entropy on int labels; "mse": dlfs's MSE on one-hot rows
    batch: int
    lr: float
    n_train: int  # default rows per timed epoch
    # The numpy contender repeats dlfs's arithmetic op for op (bit-identical
    # trajectories) instead of being the hand-tuned ceiling: for per-step overhead.
    plain: bool = False

    def without_dropout(self) -> Workload:
        """The same network minus its dropout layers (for deterministic checks)."""
        layers = tuple(la for la in self.layers if la[0] != "dropout")
        if layers == self.layers:
            return self
        return replace(self, name=f"{self.name}-nodrop", layers=layers)

    @property
    def n_classes(self) -> int:
        return self.param_shapes()[-1][1][0]

    def param_shapes(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """(weight, bias) shapes per parametrized layer, in PyTorch's layouts."""
        shapes = []
        for la in self.layers:
            if la[0] == "dense":
                shapes.append(((la[2], la[1]), (la[2],)))
            elif la[0] == "conv":
                shapes.append(((la[2], la[1], 3, 3), (la[2],)))
        return shapes


def _mlp(sizes: Sequence[int], act: str) -> tuple[tuple, ...]:
    layers: list[tuple] = []
    for n_in, n_out in itertools.pairwise(sizes):
        layers += [("dense", n_in, n_out), (act,)]
    return tuple(layers[:-1]) if act == "relu" else tuple(layers)


def _cnn(channels: Sequence[int], head: Sequence[tuple]) -> tuple[tuple, ...]:
    layers: list[tuple] = []
    for c_in, c_out in itertools.pairwise(channels):
        layers += [("conv", c_in, c_out, 1), ("relu",), ("maxpool",)]
    return (*layers, ("flatten",), *head)


WORKLOADS = {
    w.name: w
    for w in (
        # the MLP: 784-256-128-10 ReLU, softmax cross-entropy
        Workload("mlp", (784,), _mlp((784, 256, 128, 10), "relu"), "ce", 128, 0.1, 60000),
        # the reference CNN: conv 8 - pool - conv 16 - pool - dense 10
        Workload("cnn", (1, 28, 28), _cnn((1, 8, 16), [("dense", 784, 10)]), "ce", 64, 0.05, 10000),
        # examples/mnist_cnn.py's network (trained here with plain SGD)
        Workload(
            "mnist_cnn",
            (1, 28, 28),
            _cnn(
                (1, 32, 64),
                [("dense", 3136, 128), ("relu",), ("dropout", 0.25), ("dense", 128, 10)],
            ),
            "ce",
            64,
            0.05,
            2000,
        ),
        # the tutorials' tanh net, one sample per step, MSE on one-hot targets
        Workload("tanh", (784,), _mlp((784, 100, 50, 10), "tanh"), "mse", 1, 0.1, 3000, plain=True),
        # a net so small that a step is all overhead
        Workload("small", (8,), _mlp((8, 8, 8, 4), "relu"), "ce", 8, 0.05, 80000, plain=True),
    )
}


# ----------------------------------------------------------------------- data


def synthetic_mnist(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable stand-in data of MNIST's shape and dtype: (n, 28, 28) uint8, labels.

    Each class has a fixed random sparse 'stroke' template; an image is its
    class template shifted by up to 2 pixels with half its pixels dropped, plus
    sparse noise (blank areas as in MNIST, so max-pool ties happen).  Not MNIST.
    """
    rng = np.random.default_rng(seed + 12345)
    templates = np.zeros((10, 32, 32), np.uint8)
    templates[:, 4:28, 4:28] = (rng.random((10, 24, 24)) < 0.2) * np.uint8(200)
    windows = np.lib.stride_tricks.sliding_window_view(templates, (28, 28), axis=(1, 2))
    y = rng.integers(0, 10, size=n, dtype=np.int64)
    sy, sx = rng.integers(0, 5, size=(2, n))
    x = windows[y, sy, sx]  # (n, 28, 28) uint8 copy
    x *= rng.random((n, 28, 28), dtype=np.float32) < 0.5
    noise = rng.integers(0, 56, size=(n, 28, 28), dtype=np.uint8)
    noise *= rng.random((n, 28, 28), dtype=np.float32) < 0.1
    x += noise  # at most 200 + 55: no wrap-around
    return x, y


def synthetic_features(seed: int, n: int, d: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """x float32 (n, d) uniform in [0, 1), labels (n,) in [0, k) that depend on x."""
    rng = np.random.default_rng(seed + 54321)
    x = rng.random((n, d), dtype=np.float32)
    proj = rng.standard_normal((d, k)).astype(np.float32)
    return x, np.argmax((x - 0.5) @ proj, axis=1).astype(np.int64)


def load_data(
    w: Workload, path: str | None, n: int, seed: int
) -> tuple[np.ndarray, np.ndarray, str]:
    """(x float32 (n, *input_shape), targets, description) for workload ``w``.

    Image workloads read real MNIST from ``path`` (an .npz with x_train
    (N, 28, 28) uint8 and y_train) or make synthetic MNIST; targets are int
    labels, or float32 one-hot rows for an MSE workload.
    """
    if w.input_shape[-1] == 784 or w.input_shape == (1, 28, 28):
        if path:
            with np.load(path, allow_pickle=False) as d:
                images, labels = d["x_train"][:n], d["y_train"][:n].astype(np.int64)
            desc = f"mnist_npz:{Path(path).name}"
        else:
            images, labels = synthetic_mnist(seed, n)
            desc = "synthetic_mnist (random class templates, NOT MNIST)"
        x = images.reshape(len(images), *w.input_shape).astype(np.float32)
        x *= np.float32(1 / 255)
    else:
        x, labels = synthetic_features(seed, n, w.input_shape[0], w.n_classes)
        desc = "synthetic_features"
    if len(x) < n:
        raise SystemExit(f"--n {n} asks for more rows than the data has ({len(x)})")
    if w.loss == "mse":
        targets = np.zeros((n, w.n_classes), np.float32)
        targets[np.arange(n), labels] = 1
        return x, targets, desc
    return x, labels, desc


def epoch_order(seed: int, n: int, epoch: int) -> np.ndarray:
    """The row order of one epoch, the same for every contender."""
    return np.random.default_rng([seed, 1, epoch]).permutation(n)


def initial_params(w: Workload, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """float32 (weight, bias) per layer in PyTorch's layouts, drawn like PyTorch's
    defaults (both uniform in +-1/sqrt(fan_in))."""
    rng = np.random.default_rng(seed + 2)
    params = []
    for w_shape, b_shape in w.param_shapes():
        bound = 1 / np.sqrt(np.prod(w_shape[1:]))
        params.append(
            tuple(rng.uniform(-bound, bound, size=s).astype(np.float32) for s in (w_shape, b_shape))
        )
    return params


def params_digest(params: Sequence[np.ndarray]) -> str:
    """A short hash of the arrays' bytes: equal digests mean bit-identical params."""
    h = hashlib.sha256()
    for p in params:
        h.update(np.ascontiguousarray(p).tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------- output


def emit(key: str, value: object) -> None:
    if isinstance(value, float):
        value = f"{value:.6g}"
    print(f"{key}={value}", flush=True)


def parse_key_values(text: str) -> dict[str, str]:
    """The ``key=value`` lines of a child's output (the last one wins)."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key and " " not in key:
            out[key] = value
    return out


def load_avg() -> str:
    return ",".join(f"{v:.2f}" for v in os.getloadavg())


def print_machine() -> None:
    """Where the figures come from: Python, numpy, cores, the thread pools loaded."""
    emit("python", sys.version.split()[0])
    emit("numpy", np.__version__)
    emit("cpu_count", os.cpu_count())
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        emit("threadpools", "unknown (threadpoolctl not installed)")
        return
    for i, d in enumerate(threadpool_info()):
        emit(
            f"threadpool_{i}",
            f"{d.get('internal_api')}:{d.get('version')}:threads={d.get('num_threads')}"
            f":arch={d.get('architecture', '-')}",
        )


# -------------------------------------------------------------------- runner


@dataclass
class Run:
    """One child process: its parsed ``key=value`` output and the load around it."""

    name: str
    round: int
    values: dict[str, str]
    load_before: str
    load_after: str
    wall_s: float

    def number(self, key: str) -> float:
        return float(self.values[key])


def run_child(name: str, rnd: int, cmd: list[str], timeout: float = 1800) -> Run:
    """Run ``cmd``, note the load average before and after; exit if it fails."""
    before = load_avg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{name} failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return Run(name, rnd, parse_key_values(proc.stdout), before, load_avg(), wall)


def interleave(
    commands: dict[str, list[str]],
    rounds: int,
    show: Sequence[str] = ("samples_per_s", "train_loss"),
    timeout: float = 1800,
) -> dict[str, list[Run]]:
    """Run every command once per round, the order rotated by one each round
    (A B C, B C A, C A B, ...); print one line per run; return the runs by name."""
    names = list(commands)
    runs: dict[str, list[Run]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            run = run_child(name, r + 1, commands[name], timeout)
            runs[name].append(run)
            shown = " ".join(f"{k}={run.values.get(k, '-')}" for k in show)
            print(
                f"run round={r + 1} name={name} {shown} wall_s={run.wall_s:.1f} "
                f"load_before={run.load_before} load_after={run.load_after}",
                flush=True,
            )
    return runs


def median_of(runs: list[Run], key: str) -> float:
    return statistics.median(run.number(key) for run in runs)


def paired_ratio(ours: list[Run], ref: list[Run], key: str) -> float:
    """Median over rounds of ours/ref within the same round."""
    return statistics.median(a.number(key) / b.number(key) for a, b in zip(ours, ref))


def loss_spread(runs: dict[str, list[Run]]) -> float:
    """Largest relative difference between the contenders' final train_loss."""
    losses = [float(rs[-1].values["train_loss"].split(",")[-1]) for rs in runs.values()]
    return (max(losses) - min(losses)) / max(abs(min(losses)), 1e-12)


def child_cmd(script: str, **options: object) -> list[str]:
    """``python benchmarks/<script> --opt value ...`` (None and False options left out)."""
    cmd = [sys.executable, str(HERE / script)]
    for key, value in options.items():
        if value is None or value is False:
            continue
        cmd.append("--" + key.replace("_", "-"))
        if value is not True:
            cmd.append(str(value))
    return cmd


def torch_available() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


# --------------------------------------------------------------- the parents


def parent_parser(description: str, rounds: int = 5) -> argparse.ArgumentParser:
    """The options every bench_*.py shares."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--rounds", type=int, default=rounds, help=f"interleaved rounds (default {rounds})"
    )
    p.add_argument("--threads", type=int, default=1, help="threads per contender (default 1)")
    p.add_argument("--data", help="MNIST .npz (x_train (N, 28, 28) uint8, y_train); else synthetic")
    p.add_argument("--n", type=int, help="training rows per run (default: the workload's)")
    p.add_argument("--epochs", type=int, default=1, help="timed epochs per run (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="+", choices=IMPLS, help="contenders (default: all)")
    p.add_argument("--no-check", action="store_true", help="skip the equivalence check")
    return p


def start(args: argparse.Namespace) -> list[str]:
    """Print the setup; return the contenders to run (torch only if installed)."""
    impls = list(args.only or IMPLS)
    if "torch" in impls and not torch_available():
        print("# torch is not installed: PyTorch skipped (pip install -e '.[bench]')")
        impls.remove("torch")
    emit("command", " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    emit("threads", args.threads)
    emit("rounds", args.rounds)
    emit("contenders", ",".join(impls))
    emit("load_start", load_avg())
    return impls


def check_equivalence(workload: str, args: argparse.Namespace, batch: int | None = None) -> bool:
    """run_one.py --impl check: the contenders agree after a few steps."""
    if args.no_check:
        return True
    cmd = child_cmd("run_one.py", impl="check", workload=workload, batch=batch, data=args.data)
    cmd += ["--threads", str(args.threads), "--seed", str(args.seed)]
    run = run_child("check", 0, cmd)
    for key, value in run.values.items():
        if key.startswith("equiv_"):
            emit(f"{workload}_{key}", value)
    return run.values.get("equiv_ok") == "True"


def compare(
    workload: str,
    impls: list[str],
    args: argparse.Namespace,
    prefix: str,
    *,
    batch: int | None = None,
    key: str = "samples_per_s",
    options: dict | None = None,
) -> dict[str, list[Run]]:
    """Interleaved runs of every contender on one workload; prints medians,
    the within-round ratios of dlfs against each other contender, and how far
    apart the contenders' final losses are."""
    common = dict(workload=workload, batch=batch, threads=args.threads, data=args.data, n=args.n)
    common.update(epochs=args.epochs, seed=args.seed)
    common.update(options or {})
    cmds = {impl: child_cmd("run_one.py", impl=impl, **common) for impl in impls}
    runs = interleave(cmds, args.rounds, show=(key, "train_loss"))
    for impl in impls:
        emit(f"{prefix}_{impl}_{key}", median_of(runs[impl], key))
    kind = "speed" if key.endswith("per_s") else "time"  # above 1: dlfs faster / slower
    for ref in impls:
        if "dlfs" in runs and ref != "dlfs":
            ratio = paired_ratio(runs["dlfs"], runs[ref], key)
            emit(f"{prefix}_{kind}_ratio_dlfs_over_{ref}", ratio)
    emit(f"{prefix}_loss_rel_spread", loss_spread(runs))
    return runs
