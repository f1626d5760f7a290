"""LSTM training throughput: dlfs against PyTorch eager ``nn.LSTM`` on CPU.

Workload (row-by-row MNIST's shape): LSTM(28 -> 128) over T = 28 steps, the
last h into Dense(128 -> 10), softmax cross-entropy, plain SGD, batch 128,
float32.  Both contenders start from the same initial weights (drawn by
dlfs, copied into torch's layout) and train on the same batches, so their
losses agree (printed as a check); PyTorch's LSTM is its fused C++ kernel.

Each measurement runs in its OWN process: in one process, numpy's OpenBLAS
threads and torch's OpenMP threads steal each other's cores.  Rounds are
interleaved (dlfs, torch, dlfs, torch, ...; the order alternates every round)
so a shared machine's drifting load hits both alike.  For each thread count
the script prints key=value lines: the median samples/s of each contender
(``t1_dlfs_samples_per_s``, ``t1_torch_samples_per_s``) and
``t1_ratio_vs_torch``, the median of the within-round ratios dlfs / torch
(higher is better), plus the load average before and after (``os.getloadavg``:
take figures only from a quiet machine, load well under 0.6)::

    pip install -e ".[bench]"          # torch==2.13.0 (CPU)
    python benchmarks/bench_rnn.py                      # threads 1 and 2, 5 rounds
    python benchmarks/bench_rnn.py --threads 1 --rounds 7 --steps 40
    python benchmarks/bench_rnn.py --data PATH/mnist.npz   # real images instead of noise

Without torch only dlfs is measured.  ``--worker`` is internal (one run of
one contender, used by the orchestrating process).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # dlfs.py in a checkout (imported in the workers)
T, D, H, K, BATCH, LR = 28, 28, 128, 10, 128, 0.05


# ------------------------------------------------------------- one worker run


def data(path: str | None, n: int, seed: int):
    """(n, 28, 28) float32 rows in [0, 1] and int64 labels: MNIST or uniform noise."""
    import numpy as np

    if path:
        with np.load(path, allow_pickle=False) as d:
            x, y = d["x_train"][:n], d["y_train"][:n]
        return (x.astype(np.float32) / np.float32(255)), y.astype(np.int64)
    rng = np.random.default_rng(seed)
    return rng.random((n, T, D), dtype=np.float32), rng.integers(0, K, n)


def dlfs_net(seed: int):
    import dlfs

    return dlfs.network(seed, (T, D), [dlfs.lstm(H), dlfs.dense(K)], dlfs.SoftmaxCrossEntropy())


def dlfs_trainer(seed: int):
    import dlfs

    state = dlfs.TrainState.create(dlfs_net(seed), dlfs.SGD(LR), seed)

    def train(batches) -> float:
        nonlocal state
        state = dlfs.train_epoch(state, batches)  # functools.reduce(train_step, ...)
        return state.mean_loss

    return train


def torch_trainer(seed: int, threads: int):
    import torch

    torch.set_num_threads(threads)
    lstm_layer, dense_layer = dlfs_net(seed).layers  # the same initial weights
    lstm = torch.nn.LSTM(D, H, batch_first=True)
    linear = torch.nn.Linear(H, K)
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(torch.from_numpy(lstm_layer.w_ih.T.copy()))
        lstm.weight_hh_l0.copy_(torch.from_numpy(lstm_layer.w_hh.T.copy()))
        lstm.bias_ih_l0.copy_(torch.from_numpy(lstm_layer.b.copy()))
        lstm.bias_hh_l0.zero_()
        linear.weight.copy_(torch.from_numpy(dense_layer.w.T.copy()))
        linear.bias.copy_(torch.from_numpy(dense_layer.b.copy()))
    # dlfs's one bias is PyTorch's two added; trained both, they would move by
    # twice the step, so bias_hh stays at zero and the two models stay equal.
    lstm.bias_hh_l0.requires_grad_(False)
    params = [p for p in (*lstm.parameters(), *linear.parameters()) if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR)
    loss_fn = torch.nn.CrossEntropyLoss()

    def train(batches) -> float:
        total = 0.0
        for xb, yb in batches:
            opt.zero_grad(set_to_none=True)
            out, _ = lstm(torch.from_numpy(xb))
            loss = loss_fn(linear(out[:, -1]), torch.from_numpy(yb))
            loss.backward()
            opt.step()
            total += loss.item() * len(xb)
        return total / sum(len(b[0]) for b in batches)

    return train


def worker(args: argparse.Namespace) -> None:
    """Warm up, then time ``--steps`` training steps; print samples_per_s and the loss."""
    x, y = data(args.data, (args.steps + args.warmup) * BATCH, args.seed)
    batches = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(x), BATCH)]
    warm, timed = batches[: args.warmup], batches[args.warmup :]
    if args.worker == "dlfs":
        train = dlfs_trainer(args.seed)
    else:
        train = torch_trainer(args.seed, args.threads[0])
    if warm:
        train(warm)
    start = time.perf_counter()
    loss = train(timed)
    elapsed = time.perf_counter() - start
    print(f"samples_per_s={len(timed) * BATCH / elapsed:.1f}")
    print(f"train_loss={loss:.6f}")


# ------------------------------------------------------------- orchestration


def run_worker(name: str, threads: int, args: argparse.Namespace) -> tuple[float, float]:
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    if name == "torch":  # numpy only draws the initial weights there: no BLAS pool
        env["OPENBLAS_NUM_THREADS"] = "1"
    cmd = [sys.executable, __file__, "--worker", name, "--threads", str(threads)]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--seed", str(args.seed)]
    if args.data:
        cmd += ["--data", args.data]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    found = dict(re.findall(r"^(\w+)=(\S+)$", out.stdout, re.M))
    if out.returncode != 0 or "samples_per_s" not in found:
        sys.exit(f"{name} worker failed (rc={out.returncode}):\n{out.stdout}{out.stderr}")
    return float(found["samples_per_s"]), float(found["train_loss"])


def torch_available() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True)
    return probe.returncode == 0


def load() -> str:
    return ",".join(f"{v:.2f}" for v in os.getloadavg())


def bench(threads: int, names: list[str], args: argparse.Namespace) -> None:
    speeds: dict[str, list[float]] = {n: [] for n in names}
    losses: dict[str, float] = {}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            speed, loss = run_worker(name, threads, args)
            speeds[name].append(speed)
            losses[name] = loss
            print(f"# threads={threads} round={r + 1} {name} samples_per_s={speed:.0f}", flush=True)
    p = f"t{threads}_"
    for name in names:
        print(f"{p}{name}_samples_per_s={statistics.median(speeds[name]):.0f}")
        print(f"{p}{name}_train_loss={losses[name]:.5f}")
    if "torch" in speeds:
        ratios = [a / b for a, b in zip(speeds["dlfs"], speeds["torch"])]
        print(f"{p}ratio_vs_torch={statistics.median(ratios):.3f}")
        print(f"{p}ratio_min={min(ratios):.3f}")
        print(f"{p}ratio_max={max(ratios):.3f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (>= 1)")
    ap.add_argument("--steps", type=int, default=30, help="timed training steps per run")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=None, help="MNIST npz (x_train, y_train); default noise")
    ap.add_argument("--worker", choices=["dlfs", "torch"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.warmup < 0:
        ap.error("--rounds and --steps must be >= 1, --warmup >= 0")
    if args.worker:
        worker(args)
        return
    names = ["dlfs", "torch"] if torch_available() else ["dlfs"]
    if names == ["dlfs"]:
        print("torch=missing (pip install torch==2.13.0); measuring dlfs only")
    print(f"workload=lstm T={T} D={D} H={H} batch={BATCH} float32 sgd lr={LR}")
    print(f"steps={args.steps} rounds={args.rounds} data={args.data or 'noise'}")
    print(f"load_before={load()}")
    for threads in args.threads:
        bench(threads, names, args)
    print(f"load_after={load()}")


if __name__ == "__main__":
    main()
