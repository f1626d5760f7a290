"""MNIST read row by row by an LSTM, with dlfs: 28 steps of 28 pixels.

    LSTM(28 -> 128), the last step's h -> Dense(10), softmax cross-entropy

float32, batch 128, Adam with global-norm clipping (1.0) and a cosine-decayed
learning rate (peak ``--lr`` 2e-3 after 200 warmup steps, down to 0 at the
end), ``--epochs`` 10 over the 60000 training images.  The images come from
``dlfs.load_mnist``, standardized with MNIST's mean and std, and are read as
sequences (N, 28, 28): step t sees row t.  ``--data PATH`` takes a local
``.npz`` or a folder of the four IDX files; without it the loader downloads
the standard files once (checked, cached).  ``--holdout K`` keeps the last K
training images aside and reports a validation accuracy after each epoch;
the test set is used once, at the end.  Ends with ``key=value`` lines
(``test_acc``, ``epochs``, ``train_s``, ...); in a terminal a progress bar
shows the running loss.  On a small shared machine
``OPENBLAS_NUM_THREADS=1`` avoids BLAS threads waiting for busy cores.

    python examples/mnist_lstm.py --epochs 10
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
except ImportError:  # running from a checkout: dlfs.py sits one folder up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import dlfs

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # pixel statistics of the training set, in [0, 1]


def build(seed: int, hidden: int = 128) -> dlfs.Network:
    """LSTM(``hidden``) over the 28 rows, its last h into Dense(10)."""
    return dlfs.network(
        seed, (28, 28), [dlfs.lstm(hidden), dlfs.dense(10)], dlfs.SoftmaxCrossEntropy()
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").partition("\n")[0],
        formatter_class=Defaults,
    )
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

    # float32 (N, 1, 28, 28) in [0, 1], int64 labels; standardized, then (N, 28, 28):
    # 28 steps of one row each
    try:
        (x_all, y_all), (x_test, y_test) = dlfs.load_mnist(args.data)
    except (OSError, ValueError) as err:  # no file, no network: one line, no traceback
        raise SystemExit(f"{Path(__file__).name}: {err}") from None
    x_all = (x_all[:, 0] - np.float32(MNIST_MEAN)) / np.float32(MNIST_STD)
    x_test = (x_test[:, 0] - np.float32(MNIST_MEAN)) / np.float32(MNIST_STD)
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
        seed=args.seed,
        verbose=True,
        callback=report,
        progress=sys.stderr.isatty(),  # a bar in a terminal, not in logs
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
