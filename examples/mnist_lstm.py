"""MNIST read row by row by an LSTM, with dlfs: 28 steps of 28 pixels.

    LSTM(28 -> 128), the last step's h -> Dense(10), softmax cross-entropy

float32, batch 128, Adam with global-norm clipping (1.0) and a cosine-decayed
learning rate (peak ``--lr`` 2e-3 after 200 warmup steps, down to 0 at the
end), ``--epochs`` 10 over the 60000 training images.  The images go through
``mnist_data.prepare`` (standardized with MNIST's mean and std) and are read
as sequences (N, 28, 28): step t sees row t.  ``--data PATH`` takes a local
``.npz`` or a folder of the four IDX files; without it the loader downloads
the standard files once (checked, cached).  ``--holdout K`` keeps the last K
training images aside and reports a validation accuracy after each epoch;
the test set is used once, at the end.  Ends with ``key=value`` lines
(``test_acc``, ``epochs``, ``train_s``, ...).  On a small shared machine
``OPENBLAS_NUM_THREADS=1`` avoids BLAS threads waiting for busy cores.

    python examples/mnist_lstm.py --epochs 10
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # mnist_data, next to this file
sys.path.insert(1, str(HERE.parent))  # dlfs.py in a checkout
from mnist_data import load_mnist, prepare  # noqa: E402

import dlfs  # noqa: E402


def build(seed: int, hidden: int = 128) -> dlfs.Network:
    """LSTM(``hidden``) over the 28 rows, its last h into Dense(10)."""
    return dlfs.network(
        seed, (28, 28), [dlfs.lstm(hidden), dlfs.dense(10)], dlfs.SoftmaxCrossEntropy()
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data",
        default=None,
        help="an MNIST .npz, or a folder of the four IDX files (.gz or not); "
        "default: download once to the loader's cache",
    )
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3, help="peak Adam learning rate")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--holdout", type=int, default=0, help="last training images kept aside for validation"
    )
    args = ap.parse_args(argv)
    if min(args.epochs, args.batch_size, args.hidden) < 1 or args.holdout < 0:
        ap.error("--epochs, --batch-size and --hidden must be >= 1, --holdout >= 0")

    x_all, y_all, x_test, y_test = prepare(load_mnist(args.data), flatten=False, standardize=True)
    x_all, x_test = x_all[:, 0], x_test[:, 0]  # (N, 28, 28): 28 steps of one row each
    n_train = len(x_all) - args.holdout
    validation = (x_all[n_train:], y_all[n_train:]) if args.holdout > 0 else None

    net = build(args.seed, args.hidden)
    print(net.summary())
    steps = args.epochs * -(-n_train // args.batch_size)
    schedule = dlfs.CosineDecay(args.lr, steps=steps, warmup=min(200, steps - 1))
    optimizer = dlfs.chain(dlfs.ClipByGlobalNorm(1.0), dlfs.Adam(schedule))
    start = time.perf_counter()

    def report(record: dlfs.EpochRecord) -> None:
        print(f"  epoch {record.epoch} done at {time.perf_counter() - start:.0f} s", flush=True)

    net, history = dlfs.fit(
        net,
        optimizer,
        x_all[:n_train],
        y_all[:n_train],
        epochs=args.epochs,
        batch_size=args.batch_size,
        validation=validation,
        early_stopping=False,
        seed=args.seed,
        verbose=True,
        callback=report,
    )
    train_s = time.perf_counter() - start
    test_acc = dlfs.accuracy(net.predict(x_test, batch_size=1000), y_test)
    print(f"test_acc={test_acc:.4f}")
    print(f"epochs={args.epochs}")
    print(f"train_s={train_s:.0f}")
    print(f"batch_size={args.batch_size}")
    print(f"hidden={args.hidden}")
    print(f"seed={args.seed}")
    print(f"train_loss={history.records[-1].train_loss:.4f}")
    return {"test_acc": test_acc, "train_s": train_s}


if __name__ == "__main__":
    main()
