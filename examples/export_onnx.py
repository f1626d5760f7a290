"""Train on MNIST with dlfs, export to ONNX, and check the file in ONNX Runtime.

    python examples/export_onnx.py --data mnist.npz                  # MLP, 1 epoch
    python examples/export_onnx.py --data mnist.npz --model cnn --epochs 2
    python examples/export_onnx.py --data mnist.npz --checkpoint net.npz  # no training

``--model`` picks one of the MNIST examples' networks (``mlp``: the
784-256-128-10 ReLU net of ``mnist_mlp.py``; ``cnn``: ``mnist_cnn.py``'s;
``lstm``: ``mnist_lstm.py``'s row-by-row LSTM), trained for ``--epochs``
with Adam and a cosine-decayed learning rate.  ``--checkpoint PATH`` loads a
network saved by ``dlfs.save`` (or ``fit(checkpoint=...)``) instead; its
input shape says how the images are prepared: (784,) pixels in [0, 1],
(1, 28, 28) or (28, 28) standardized with MNIST's mean and std, as the
examples train them.  The network is written to ``--out`` with
``dlfs.export_onnx``, loaded into an ``onnxruntime.InferenceSession`` and
run on the 10000 test images, in batches of ``--batch`` for both.

Ends with ``key=value`` lines: ``max_rel_err`` (max |onnx - dlfs| over
max |dlfs|, on the test set's logits), ``argmax_agree`` (the fraction of
test images whose predicted class is the same, 1.0 = all), ``test_acc``,
``onnx_test_acc``, and inference throughput ``dlfs_samples_per_s`` and
``onnxruntime_samples_per_s`` (best of ``--repeat`` passes; compare them on a
quiet machine).  Needs onnx and onnxruntime: ``pip install 'dlfs[onnx]'``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import mnist_cnn  # the examples beside this one: their networks
import mnist_lstm
import mnist_mlp
import numpy as np
from _help import Defaults  # examples/_help.py: --help shows the defaults

try:
    import dlfs
except ImportError:  # running from a checkout: dlfs.py sits one folder up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import dlfs

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # pixel statistics of the training set, in [0, 1]
INPUT_SHAPES = {"mlp": (784,), "cnn": (1, 28, 28), "lstm": (28, 28)}


def build(model: str, seed: int, steps: int) -> tuple[dlfs.Network, dlfs.Optimizer]:
    """The MNIST examples' network for ``model``, and Adam over ``steps`` steps."""
    if model == "mlp":
        return mnist_mlp.build("default", seed, steps)
    schedule = dlfs.CosineDecay(2e-3, steps=steps, warmup=min(200, steps - 1))
    if model == "cnn":
        return mnist_cnn.build(seed), dlfs.Adam(schedule)
    if model == "lstm":
        return mnist_lstm.build(seed), dlfs.chain(dlfs.ClipByGlobalNorm(1.0), dlfs.Adam(schedule))
    raise ValueError(f"model must be one of {sorted(INPUT_SHAPES)}, got {model!r}")


def prepare(images: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
    """(N, 1, 28, 28) floats in [0, 1] -> the network's input, as the examples train it."""
    if input_shape == (784,):
        return images.reshape(len(images), 784)
    standardized = (images - np.float32(MNIST_MEAN)) / np.float32(MNIST_STD)
    if input_shape == (1, 28, 28):
        return standardized
    if input_shape == (28, 28):
        return standardized[:, 0]
    raise ValueError(f"the network must take (784,), (1, 28, 28) or (28, 28), got {input_shape}")


def samples_per_s(predict: Any, x: np.ndarray, batch: int, repeat: int) -> float:
    """Inference throughput: the best of ``repeat`` passes over x in batches."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for i in range(0, len(x), batch):
            predict(x[i : i + batch])
        best = min(best, time.perf_counter() - start)
    return len(x) / best


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").partition("\n")[0], formatter_class=Defaults
    )
    ap.add_argument("--data", help="an MNIST .npz or a folder of IDX files (default: download)")
    ap.add_argument(
        "--model", choices=sorted(INPUT_SHAPES), default="mlp", help="which example's network"
    )
    ap.add_argument("--epochs", type=int, default=1, help="training epochs")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights and batch order")
    ap.add_argument("--checkpoint", help="load this dlfs checkpoint instead of training")
    ap.add_argument("--out", default="mnist.onnx", help="where to write the ONNX file")
    ap.add_argument("--batch", type=int, default=1000, help="inference batch size")
    ap.add_argument("--repeat", type=int, default=3, help="timed passes over the test set")
    args = ap.parse_args(argv)
    try:
        import onnxruntime
    except ImportError:
        ap.error("needs onnxruntime (and onnx): pip install 'dlfs[onnx]'")

    (x_train, y_train), (x_test, y_test) = dlfs.load_mnist(args.data)
    if args.checkpoint:
        net = dlfs.load(args.checkpoint).net
        print(f"loaded {net!r}")
    else:
        batch_size = 128
        steps = args.epochs * -(-len(x_train) // batch_size)
        net, optimizer = build(args.model, args.seed, steps)
        x_fit = prepare(x_train, net.input_shape)
        start = time.perf_counter()
        net, _ = dlfs.fit(
            net,
            optimizer,
            x_fit,
            y_train,
            epochs=args.epochs,
            batch_size=batch_size,
            seed=args.seed,
            verbose=True,
            progress=sys.stderr.isatty(),
        )
        print(f"trained {net!r} in {time.perf_counter() - start:.0f} s")
    x = prepare(x_test, net.input_shape)

    dlfs.export_onnx(net, args.out)
    session = onnxruntime.InferenceSession(args.out, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run_onnx(rows: np.ndarray) -> np.ndarray:
        return np.asarray(session.run(None, {name: rows})[0])

    want = net.predict(x, batch_size=args.batch)
    got = np.concatenate([run_onnx(x[i : i + args.batch]) for i in range(0, len(x), args.batch)])
    result = {
        "max_rel_err": float(np.abs(got - want).max() / np.abs(want).max()),
        "argmax_agree": float((got.argmax(1) == want.argmax(1)).mean()),
        "test_acc": dlfs.accuracy(want, y_test),
        "onnx_test_acc": dlfs.accuracy(got, y_test),
        "dlfs_samples_per_s": samples_per_s(
            lambda rows: net.predict(rows, batch_size=None), x, args.batch, args.repeat
        ),
        "onnxruntime_samples_per_s": samples_per_s(run_onnx, x, args.batch, args.repeat),
    }
    print(f"wrote {args.out} ({Path(args.out).stat().st_size:,} bytes)")
    print(f"model={args.model if not args.checkpoint else 'checkpoint'}")
    print(f"max_rel_err={result['max_rel_err']:.3g}")
    print(f"argmax_agree={result['argmax_agree']:.4f}")
    print(f"test_acc={result['test_acc']:.4f}")
    print(f"onnx_test_acc={result['onnx_test_acc']:.4f}")
    print(f"dlfs_samples_per_s={result['dlfs_samples_per_s']:.0f}")
    print(f"onnxruntime_samples_per_s={result['onnxruntime_samples_per_s']:.0f}")
    return result


if __name__ == "__main__":
    main()
