"""Train a multilayer perceptron on MNIST with dlfs.

    python examples/mnist_mlp.py                      # downloads MNIST once (dlfs.load_mnist caches it)
    python examples/mnist_mlp.py --data mnist.npz     # or a folder of IDX files
    python examples/mnist_mlp.py --preset tutorial --epochs 5
    python examples/mnist_mlp.py --plot-dir plots     # needs matplotlib (the examples extra)

Default preset: 784-256-128-10 ReLU with dropout 0.2, softmax cross-entropy,
Adam with a cosine learning-rate schedule (1e-3 -> 1e-5 over all epochs),
float32, batch 128, 20 epochs.  The last 5000 training images (``--val-size``)
are the validation set, evaluated after every epoch; ``--patience N`` turns
on early stopping (keep the network with the lowest validation loss).  In a
terminal a progress bar shows the running loss (tqdm, in the examples extra).

``--preset tutorial``: the classic from-scratch tutorial's 784-100-50-10 net
with tanh after every layer, trained on one-hot targets with MSE and plain SGD.

Ends with ``key=value`` lines: test_acc, epochs, train_s (and a few more).
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


def build(preset: str, seed: int, steps: int) -> tuple[dlfs.Network, dlfs.Optimizer]:
    """(network, optimizer) for ``preset``; ``steps`` = total training steps."""
    if preset == "default":
        net = dlfs.network(
            (seed, 1),
            784,
            [
                dlfs.dense(256, dlfs.ReLU(), init=dlfs.he_normal),
                dlfs.Dropout(0.2),
                dlfs.dense(128, dlfs.ReLU(), init=dlfs.he_normal),
                dlfs.Dropout(0.2),
                dlfs.dense(10),
            ],
            dlfs.SoftmaxCrossEntropy(),
            dtype=np.float32,
        )
        return net, dlfs.Adam(dlfs.CosineDecay(1e-3, steps=steps, final_lr=1e-5))
    if preset == "tutorial":
        net = dlfs.network(
            (seed, 1),
            784,
            [
                dlfs.dense(100, dlfs.Tanh()),
                dlfs.dense(50, dlfs.Tanh()),
                dlfs.dense(10, dlfs.Tanh()),
            ],
            dlfs.MeanSquaredError(),
            dtype=np.float32,
        )
        return net, dlfs.SGD(0.1)
    raise ValueError(f"preset must be 'default' or 'tutorial', got {preset!r}")


def save_plots(plot_dir: Path, history: dlfs.History, images, labels, pred) -> list[Path]:
    """Loss/accuracy curves (History.plot) and a grid of misclassified test digits (PNG)."""
    from matplotlib.figure import Figure

    plot_dir.mkdir(parents=True, exist_ok=True)
    curves = plot_dir / "mnist_mlp_curves.png"
    history.plot().savefig(curves, dpi=100)

    all_wrong = np.flatnonzero(pred != labels)
    wrong = all_wrong[:36]
    fig = Figure(figsize=(8, 8.5), layout="constrained")
    axes = fig.subplots(6, 6)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong):
        ax.imshow(images[i].reshape(28, 28), cmap="gray_r")
        ax.set_title(f"{labels[i]} -> {pred[i]}", fontsize=9)
    fig.suptitle(
        f"misclassified test digits, true -> predicted ({len(wrong)} of {len(all_wrong)} shown)"
    )
    grid = plot_dir / "mnist_mlp_errors.png"
    fig.savefig(grid, dpi=100)
    return [curves, grid]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=Defaults,
    )
    parser.add_argument("--data", help=".npz or IDX folder (default: download and cache)")
    parser.add_argument("--epochs", type=int, default=None, help="default 20 (tutorial: 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None, help="default 128 (tutorial: 32)")
    parser.add_argument("--preset", choices=("default", "tutorial"), default="default")
    parser.add_argument("--val-size", type=int, default=5000, help="last N training images")
    parser.add_argument(
        "--patience",
        type=int,
        default=0,
        help="stop after this many epochs without a lower validation loss and keep the best "
        "network (default 0: train all epochs, keep the last)",
    )
    parser.add_argument("--plot-dir", type=Path, help="save PNG plots here (needs matplotlib)")
    args = parser.parse_args(argv)
    tutorial = args.preset == "tutorial"
    epochs = args.epochs or (10 if tutorial else 20)
    batch_size = args.batch_size or (32 if tutorial else 128)

    # float32 (N, 784) in [0, 1], int64 labels; downloads and caches when --data is not given
    try:
        (x_train, y_train), (x_test, y_test) = dlfs.load_mnist(args.data, flatten=True)
    except (OSError, ValueError) as err:  # no file, no network: one line, no traceback
        raise SystemExit(f"{Path(__file__).name}: {err}") from None
    if not 0 < args.val_size < len(x_train):
        parser.error(f"--val-size must be in 1..{len(x_train) - 1}, got {args.val_size}")
    x_fit, y_fit = x_train[: -args.val_size], y_train[: -args.val_size]
    x_val, y_val = x_train[-args.val_size :], y_train[-args.val_size :]
    if tutorial:  # MSE on one-hot targets
        y_fit, y_val = dlfs.one_hot(y_fit, 10), dlfs.one_hot(y_val, 10)

    steps = epochs * -(-len(x_fit) // batch_size)
    net, optimizer = build(args.preset, args.seed, steps)
    print(net.summary())
    print(
        f"preset={args.preset} train={len(x_fit)} val={len(x_val)} test={len(x_test)} "
        f"epochs<={epochs} batch_size={batch_size} optimizer={optimizer!r}"
    )
    start = time.perf_counter()
    net, history = dlfs.fit(
        net,
        optimizer,
        x_fit,
        y_fit,
        epochs=epochs,
        batch_size=batch_size,
        validation=(x_val, y_val),
        seed=args.seed,
        patience=args.patience or None,  # None: no early stopping
        metric=dlfs.accuracy,
        verbose=True,
        progress=sys.stderr.isatty(),  # a bar in a terminal, not in logs
    )
    train_s = time.perf_counter() - start

    pred = net.predict_classes(x_test)
    result = {
        "test_acc": float(np.mean(pred == y_test)),
        "epochs": len(history.records),
        "best_epoch": history.best_epoch,
        "train_s": train_s,
    }
    if args.plot_dir is not None:
        for path in save_plots(args.plot_dir, history, x_test, y_test, pred):
            print(f"saved {path}")
    print(f"preset={args.preset}")
    print(f"test_acc={result['test_acc']:.4f}")
    print(f"epochs={result['epochs']}")
    print(f"best_epoch={result['best_epoch']}")
    print(f"train_s={train_s:.1f}")
    return result


if __name__ == "__main__":
    main()
