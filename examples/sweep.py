"""A learning-rate x batch-size grid of the MNIST MLP, one run per Dask task.

    python examples/sweep.py --data mnist.npz                  # the runs one after another
    python examples/sweep.py --data mnist.npz --workers 2      # a LocalCluster of 2 processes
    python examples/sweep.py --data mnist.npz --scheduler tcp://host:8786 --csv runs.csv

Each run is ``mnist_mlp.py``'s default network (784-256-128-10 ReLU, dropout
0.2) trained with Adam on a cosine schedule from the grid's learning rate
down to lr / 100, on the training images less the last ``--val-size``.  The
run with the best validation accuracy wins; its test accuracy is reported.
A run depends only on its settings and ``--seed``, so the Dask runs are
bit-identical to the sequential ones and the printout and CSV are the same
(each run uses one BLAS thread either way: see the note on
``OPENBLAS_NUM_THREADS`` below).
Default grid: lr 1e-3, 3e-3 x batch 64, 256, one epoch each (``--lrs``,
``--batch-sizes``, ``--epochs``; ``--train-size N`` for a quicker look).
Ends with ``key=value`` lines (``runs``, ``best_lr``, ``best_batch_size``,
``best_val_acc``, ``best_test_acc``, ``wall_s``).  Dask and tqdm for
``--workers``/``--scheduler``: ``pip install -e ".[distributed]"``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# One BLAS thread per run, as in every Dask worker process (Dask's nanny sets these to
# 1): a sweep's parallelism is across runs, and float32 matmuls round differently with
# another thread count, so this is what keeps the sequential and the Dask runs
# bit-identical.  Set before numpy loads its BLAS; a value set by the caller wins.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # mnist_mlp and dask_runs, next to this file
sys.path.insert(1, str(HERE.parent))  # dlfs.py in a checkout
from _help import Defaults  # noqa: E402
from dask_runs import map_tasks, write_csv  # noqa: E402  (Dask itself: only in map_tasks)
from mnist_mlp import build  # noqa: E402

import dlfs  # noqa: E402


def run(
    data: tuple[np.ndarray, ...], lr: float, batch_size: int, epochs: int, seed: int
) -> dict[str, float]:
    """Train one grid point; its validation and test accuracy and last training loss."""
    x_fit, y_fit, x_val, y_val, x_test, y_test = data
    steps = epochs * -(-len(x_fit) // batch_size)
    net, _ = build("default", seed, steps)
    optimizer = dlfs.Adam(dlfs.CosineDecay(lr, steps=steps, final_lr=lr / 100))
    net, history = dlfs.fit(
        net, optimizer, x_fit, y_fit, epochs=epochs, batch_size=batch_size, seed=seed
    )
    return {
        "lr": lr,
        "batch_size": batch_size,
        "val_acc": dlfs.accuracy(net.predict(x_val), y_val),
        "test_acc": dlfs.accuracy(net.predict(x_test), y_test),
        "train_loss": history.train_loss[-1],
    }


def numbers(kind: type, text: str) -> list:
    return [kind(v) for v in text.split(",")]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=Defaults,
    )
    parser.add_argument("--data", help=".npz or IDX folder (default: download and cache)")
    parser.add_argument("--lrs", default="0.001,0.003", help="comma-separated learning rates")
    parser.add_argument("--batch-sizes", default="64,256", help="comma-separated batch sizes")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-size", type=int, default=5000, help="last N training images")
    parser.add_argument("--train-size", type=int, help="train on the first N of the rest")
    parser.add_argument("--csv", type=Path, help="write every run here")
    parser.add_argument("--workers", type=int, help="Dask LocalCluster of N processes")
    parser.add_argument("--scheduler", help="a running Dask scheduler's address")
    args = parser.parse_args(argv)
    grid = [(lr, bs) for lr in numbers(float, args.lrs) for bs in numbers(int, args.batch_sizes)]
    if args.epochs < 1 or any(lr <= 0 or bs < 1 for lr, bs in grid) or args.train_size == 0:
        parser.error("--epochs, --train-size, learning rates and batch sizes must be positive")
    if args.workers is not None and (args.workers < 1 or args.scheduler is not None):
        parser.error("--workers must be >= 1, and not given with --scheduler")

    try:
        (x_train, y_train), (x_test, y_test) = dlfs.load_mnist(args.data, flatten=True)
    except (OSError, ValueError) as err:  # no file, no network: one line, no traceback
        raise SystemExit(f"{Path(__file__).name}: {err}") from None
    if not 0 < args.val_size < len(x_train):
        parser.error(f"--val-size must be in 1..{len(x_train) - 1}, got {args.val_size}")
    n_fit = len(x_train) - args.val_size
    fit = slice(0, n_fit if args.train_size is None else min(n_fit, args.train_size))
    val = slice(n_fit, None)
    data = (x_train[fit], y_train[fit], x_train[val], y_train[val], x_test, y_test)
    print(f"{len(grid)} runs: lr x batch_size over {fit.stop} images, {args.epochs} epoch(s)")

    start = time.perf_counter()
    tasks = [(lr, bs, args.epochs, args.seed) for lr, bs in grid]
    if args.workers is None and args.scheduler is None:
        runs = [run(data, *task) for task in tasks]
    else:
        runs = map_tasks(run, data, tasks, workers=args.workers, scheduler=args.scheduler)
    wall_s = time.perf_counter() - start

    for r in runs:
        print(
            f"lr {r['lr']:<8g} batch {r['batch_size']:<5d} val_acc {r['val_acc']:.4f} "
            f"test_acc {r['test_acc']:.4f} train_loss {r['train_loss']:.4f}"
        )
    if args.csv:
        write_csv(args.csv, runs)
    best = max(runs, key=lambda r: r["val_acc"])  # the first of equals: grid order
    print(f"runs={len(runs)}")
    print(f"best_lr={best['lr']:g}")
    print(f"best_batch_size={best['batch_size']}")
    print(f"best_val_acc={best['val_acc']:.4f}")
    print(f"best_test_acc={best['test_acc']:.4f}")
    print(f"wall_s={wall_s:.1f}")
    return {"runs": len(runs), **{f"best_{k}": v for k, v in best.items()}, "wall_s": wall_s}


if __name__ == "__main__":
    main()
