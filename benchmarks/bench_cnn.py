"""Training throughput of a small CNN: dlfs against PyTorch eager on CPU.

Network (the issue's reference CNN), batch 64, float32, plain SGD:
conv 3x3 8ch (pad 1) ReLU maxpool 2 -> conv 3x3 16ch (pad 1) ReLU maxpool 2
-> flatten -> dense 10, softmax cross-entropy.

Both frameworks train on the same batches, interleaved A, B, A, B ... in one
process so machine noise hits both alike; the script prints key=value lines:
the median samples/s of each, ``ratio_vs_torch`` (dlfs / torch, higher is
better) and the BLAS/thread configuration.  Data are synthetic MNIST-shaped
images unless ``--data`` names an npz with ``x_train``/``y_train``.

    python benchmarks/bench_cnn.py --rounds 5 --steps 40 --threads 1

On a small shared machine pass ``--threads 1``: OpenBLAS threads that wait
for a busy core cost dlfs far more than torch's OpenMP pool.  dlfs allocates
fresh arrays every step, so where first-touching new memory is slow (some
VMs) glibc's trimming matters too; ``MALLOC_TRIM_THRESHOLD_=1000000000
MALLOC_MMAP_THRESHOLD_=1000000000`` in the environment keeps freed memory
for reuse (it applies to both frameworks in the process).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path


def _threads_from_argv(argv: list[str]) -> str | None:
    """The value of ``--threads`` (read before numpy loads, so BLAS starts with it)."""
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--threads="):
            return arg.split("=", 1)[1]
    return None


# OpenBLAS sizes its thread pool when it loads; limiting it later (threadpoolctl)
# leaves idle pool threads that steal time slices on a busy machine.
if (_threads := _threads_from_argv(sys.argv[1:])) is not None:
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = _threads

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import dlfs  # noqa: E402

BATCH = 64
LR = 0.01


def load_data(path: str | None, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 1, 28, 28) float32 images in [0, 1] and int64 labels."""
    if path is None:
        rng = np.random.default_rng(seed)
        x = rng.integers(0, 256, size=(n, 1, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, size=n)
    else:
        with np.load(path, allow_pickle=False) as data:
            x = data["x_train"][:n].reshape(-1, 1, 28, 28)
            y = data["y_train"][:n]
    return (x.astype(np.float32) / np.float32(255)), y.astype(np.int64)


def dlfs_runner(x: np.ndarray, y: np.ndarray, seed: int):
    net = dlfs.network(
        seed,
        (1, 28, 28),
        [
            dlfs.conv2d(8, 3, padding=1, activation=dlfs.ReLU()),
            dlfs.MaxPool2D(2),
            dlfs.conv2d(16, 3, padding=1, activation=dlfs.ReLU()),
            dlfs.MaxPool2D(2),
            dlfs.Flatten(),
            dlfs.dense(10),
        ],
        dlfs.SoftmaxCrossEntropy(),
    )
    state = dlfs.TrainState.create(net, dlfs.SGD(LR), seed)

    def run(batches: list[tuple[np.ndarray, np.ndarray]]) -> float:
        nonlocal state
        state = functools.reduce(dlfs.train_step, batches, state)
        return state.mean_loss

    return run


def torch_runner(seed: int):
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 7 * 7, 10),
    )
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loss_fn = torch.nn.CrossEntropyLoss()

    def run(batches: list[tuple[np.ndarray, np.ndarray]]) -> float:
        total = 0.0
        for xb, yb in batches:
            xt, yt = torch.from_numpy(xb), torch.from_numpy(yb)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xt), yt)
            loss.backward()
            opt.step()
            total += loss.item()
        return total / len(batches)

    return run


def timed(run, batches) -> float:
    """Samples per second of one pass over ``batches``."""
    start = time.perf_counter()
    run(batches)
    return sum(len(b[0]) for b in batches) / (time.perf_counter() - start)


def blas_config() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown(threadpoolctl missing)"
    parts = [
        f"{p.get('internal_api')}:{p.get('version')}:threads={p.get('num_threads')}"
        for p in threadpool_info()
    ]
    return ";".join(parts) or "none"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved A,B rounds (>= 3)")
    ap.add_argument("--steps", type=int, default=40, help="training steps per framework per round")
    ap.add_argument("--data", default=None, help="optional npz with x_train (N,28,28), y_train")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for numpy's BLAS and torch, set before they load (default: their own)",
    )
    args = ap.parse_args(argv)
    if args.rounds < 3:
        ap.error("--rounds must be >= 3")

    x, y = load_data(args.data, args.steps * BATCH, args.seed)
    batches = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(x), BATCH)]
    print(f"numpy={np.__version__}")
    print(f"batch={BATCH} steps_per_round={len(batches)} rounds={args.rounds} dtype=float32")

    try:
        import torch
    except ImportError:
        torch = None
        print("torch=missing (pip install torch==2.13.0); measuring dlfs only")

    print(f"blas={blas_config()}")
    run_dlfs = dlfs_runner(x, y, args.seed)
    run_dlfs(batches[:2])  # warm-up
    run_torch = None
    if torch is not None:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        print(f"torch={torch.__version__} torch_threads={torch.get_num_threads()}")
        run_torch = torch_runner(args.seed)
        run_torch(batches[:2])

    ours, theirs = [], []
    for _ in range(args.rounds):
        ours.append(timed(run_dlfs, batches))
        if run_torch is not None:
            theirs.append(timed(run_torch, batches))
    print("dlfs_rounds=" + ",".join(f"{v:.0f}" for v in ours))
    print(f"dlfs_samples_per_s={statistics.median(ours):.0f}")
    if theirs:
        print("torch_rounds=" + ",".join(f"{v:.0f}" for v in theirs))
        print(f"torch_samples_per_s={statistics.median(theirs):.0f}")
        ratios = [a / b for a, b in zip(ours, theirs)]
        print(f"ratio_vs_torch={statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
