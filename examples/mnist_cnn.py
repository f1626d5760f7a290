"""A small convolutional network on MNIST with dlfs: >= 99 % test accuracy.

    conv 3x3 32 (same) ReLU -> maxpool 2 -> conv 3x3 64 (same) ReLU -> maxpool 2
    -> flatten -> dense 128 ReLU -> dropout 0.25 -> dense 10, softmax cross-entropy

float32, Adam with a cosine-decayed learning rate (peak 2e-3, 200 warmup
steps), batch 64, 5 epochs over the 60000 training images.  The data come
from ``dlfs.load_mnist``: pass ``--data PATH`` to a local ``.npz`` or a
folder of the four IDX files, or leave it out for a checked download,
cached.  Images (N, 1, 28, 28) are standardized with MNIST's mean/std.  In a
terminal a progress bar shows the running loss (tqdm, in the examples
extra).  ``--holdout K`` keeps the last K training images aside and
reports a validation accuracy after each epoch; the test set is used once,
at the end.  Ends with ``key=value`` lines (``test_acc``, ``epochs``, ``train_s``, ...).
On a small shared machine, ``OPENBLAS_NUM_THREADS=1`` avoids BLAS threads
waiting for busy cores.

    python examples/mnist_cnn.py --epochs 5
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


def build(seed: int, width: int = 32) -> dlfs.Network:
    """conv ``width`` -> pool -> conv ``2 width`` -> pool -> dense 128 -> dropout -> 10."""
    return dlfs.network(
        seed,
        (1, 28, 28),
        [
            dlfs.conv2d(width, 3, padding="same", activation=dlfs.ReLU()),
            dlfs.MaxPool2D(2),
            dlfs.conv2d(2 * width, 3, padding="same", activation=dlfs.ReLU()),
            dlfs.MaxPool2D(2),
            dlfs.Flatten(),
            dlfs.dense(128, dlfs.ReLU(), init=dlfs.he_normal),
            dlfs.Dropout(0.25),
            dlfs.dense(10),
        ],
        dlfs.SoftmaxCrossEntropy(),
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="dlfs CNN on MNIST", formatter_class=Defaults)
    ap.add_argument(
        "--data",
        default=None,
        help="an MNIST .npz, or a folder of the four IDX files (.gz or not); "
        "default: download once to the loader's cache",
    )
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3, help="peak Adam learning rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--width", type=int, default=32, help="channels of the first conv")
    ap.add_argument(
        "--holdout", type=int, default=0, help="last training images kept aside for validation"
    )
    args = ap.parse_args(argv)

    # float32 (N, 1, 28, 28) in [0, 1], int64 labels; then standardized with MNIST's mean/std
    try:
        (x_all, y_all), (x_test, y_test) = dlfs.load_mnist(args.data)
    except (OSError, ValueError) as err:  # no file, no network: one line, no traceback
        raise SystemExit(f"{Path(__file__).name}: {err}") from None
    x_all = (x_all - np.float32(MNIST_MEAN)) / np.float32(MNIST_STD)
    x_test = (x_test - np.float32(MNIST_MEAN)) / np.float32(MNIST_STD)
    n_train = len(x_all) - args.holdout
    x_train, y_train = x_all[:n_train], y_all[:n_train]
    validation = (x_all[n_train:], y_all[n_train:]) if args.holdout > 0 else None

    net = build(args.seed, args.width)
    print(net.summary())
    steps = args.epochs * -(-n_train // args.batch_size)
    schedule = dlfs.CosineDecay(args.lr, steps=steps, warmup=min(200, steps - 1))
    start = time.perf_counter()

    def report(record: dlfs.EpochRecord) -> None:
        print(f"  epoch {record.epoch} done at {time.perf_counter() - start:.0f} s", flush=True)

    net, history = dlfs.fit(
        net,
        dlfs.Adam(schedule),
        x_train,
        y_train,
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
    print(f"seed={args.seed}")
    print(f"width={args.width}")
    print(f"train_loss={history.records[-1].train_loss:.4f}")


if __name__ == "__main__":
    main()
