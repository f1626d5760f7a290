"""The adding problem (Hochreiter & Schmidhuber, 1997) with dlfs's RNN, LSTM and GRU.

Each input is a sequence of T (value, marker) pairs: values uniform in [0, 1),
markers 0 except at two positions, one in each half of the sequence; the
target is the sum of the two marked values.  Predicting 1.0 always gives an
MSE of about 1/6 (0.167), so a test MSE well below that means the network
found the markers and carried their values across up to T steps.

The three cells get the same budget: a recurrent layer of ``--hidden`` units
then Dense(1), MSE, Adam with global-norm clipping (1.0), ``--epochs`` epochs
over ``--train-size`` sequences, float32.  Prints a table and
``rnn_mse=... lstm_mse=... gru_mse=...`` (test MSE on fresh sequences).

    python examples/adding.py                 # T = 50
    python examples/adding.py --steps 100 --epochs 30 --seed 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from _help import Defaults  # examples/_help.py: --help shows the defaults

try:
    import dlfs
except ModuleNotFoundError:  # not installed: use the dlfs.py next to examples/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import dlfs

CELLS = {"rnn": dlfs.rnn, "lstm": dlfs.lstm, "gru": dlfs.gru}


def adding_data(key: dlfs.Key, n: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """x (n, steps, 2) float32: (value, marker) pairs; y (n, 1): the two marked values' sum."""
    rng = dlfs.make_rng(key)
    values = rng.random((n, steps), dtype=np.float32)
    half = steps // 2
    first = rng.integers(0, half, n)  # one marker in each half
    second = rng.integers(half, steps, n)
    markers = np.zeros((n, steps), np.float32)
    rows = np.arange(n)
    markers[rows, first] = 1
    markers[rows, second] = 1
    y = values[rows, first] + values[rows, second]
    return np.stack([values, markers], axis=2), y[:, None]


def train(
    cell: str, x: np.ndarray, y: np.ndarray, args: argparse.Namespace
) -> tuple[dlfs.Network, float]:
    """One model of ``cell``; returns the trained network and the training seconds."""
    net = dlfs.network(
        args.seed,
        (args.steps, 2),
        [CELLS[cell](args.hidden), dlfs.dense(1)],
        dlfs.MeanSquaredError(),
    )
    optimizer = dlfs.chain(dlfs.ClipByGlobalNorm(1.0), dlfs.Adam(args.lr))
    start = time.perf_counter()
    net, _ = dlfs.fit(
        net,
        optimizer,
        x,
        y,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        verbose=args.verbose,
    )
    return net, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").partition("\n")[0],
        formatter_class=Defaults,
    )
    ap.add_argument("--steps", type=int, default=50, help="sequence length T (>= 2)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--train-size", type=int, default=10000)
    ap.add_argument("--test-size", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cells", nargs="+", choices=list(CELLS), default=list(CELLS))
    ap.add_argument("--verbose", action="store_true", help="a line per epoch")
    args = ap.parse_args(argv)
    if args.steps < 2 or min(args.epochs, args.train_size, args.test_size, args.hidden) < 1:
        ap.error("--steps must be >= 2; --epochs, --train-size, --test-size, --hidden >= 1")

    train_key, test_key = dlfs.split(args.seed, 2)
    x, y = adding_data(train_key, args.train_size, args.steps)
    x_test, y_test = adding_data(test_key, args.test_size, args.steps)
    baseline = float(np.mean((y_test - 1.0) ** 2))
    print(
        f"adding problem: T={args.steps}, {args.train_size} training sequences, "
        f"predict-1.0 baseline MSE {baseline:.4f}"
    )
    results, rows = {}, []
    for cell in args.cells:
        if args.verbose:
            print(f"{cell.upper()}:")  # fit's lines per epoch follow
        net, seconds = train(cell, x, y, args)
        results[f"{cell}_mse"] = float(np.mean((net.predict(x_test) - y_test) ** 2))
        n_params = sum(p.size for layer in net.params() for p in layer)
        rows.append(f"{cell.upper():<6}{n_params:>9}{results[cell + '_mse']:>11.5f}{seconds:>9.1f}")
    print(f"{'cell':<6}{'params':>9}{'test_mse':>11}{'train_s':>9}")  # after any epoch lines
    print("\n".join(rows))
    for key, value in results.items():
        print(f"{key}={value:.5f}")
    print(f"baseline_mse={baseline:.5f}")
    print(f"steps={args.steps}")
    print(f"epochs={args.epochs}")
    print(f"seed={args.seed}")
    return results


if __name__ == "__main__":
    main()
