"""Peak memory (RSS) of an MNIST-sized dlfs MLP training run, against what it must hold.

Runs three child processes and reads each one's peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``):

- ``baseline``: the interpreter with numpy and dlfs imported, nothing else;
- ``data``: baseline + the float32 data set (60000 x 784 by default);
- ``train``: baseline + the data + ``dlfs.fit`` of a 784-256-128-10 ReLU MLP
  (softmax cross-entropy, SGD, float32) for ``--epochs`` epochs.

and prints ``key=value`` lines: the peaks, the sizes of the data, the model
and one batch of activations (the input batch plus every layer's output,
which the forward caches hold), and

    ratio = (peak_train - peak_baseline) / (data + model + activations)

which should be <= 1.5: no float64 copy of the float32 data (that alone
would make it 3), no per-batch garbage kept alive.

Setup (from the project root)::

    pip install -e ".[bench]"
    python benchmarks/bench_memory.py                 # 5 epochs, synthetic data
    python benchmarks/bench_memory.py --epochs 1      # quicker
    python benchmarks/bench_memory.py --data PATH/mnist.npz

Linux reports ru_maxrss in KiB (macOS in bytes; handled).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SIZES = (784, 256, 128, 10)
MIB = 1 << 20


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def make_data(path: str | None, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 x (N, 784) in [0, 1] and int64 labels, without float64 intermediates."""
    if path:
        with np.load(path, allow_pickle=False) as d:
            x = d["x_train"][:n].reshape(-1, SIZES[0]).astype(np.float32)
            y = d["y_train"][:n].astype(np.int64)
        x /= 255  # in place: x is our own fresh array
        return x, y
    rng = np.random.default_rng(seed)
    return rng.random((n, SIZES[0]), dtype=np.float32), rng.integers(0, SIZES[-1], n)


def child(args: argparse.Namespace) -> None:
    """Run one measurement and print a JSON line with the results."""
    sys.path.insert(0, str(ROOT))
    import dlfs

    out: dict = {"kind": args.child}
    if args.child in ("data", "train"):
        x, y = make_data(args.data, args.n, args.seed)
        out["data_bytes"] = x.nbytes + y.nbytes
        out["x_dtype"] = str(x.dtype)
    if args.child == "train":
        layers = [dlfs.dense(SIZES[1], dlfs.ReLU()), dlfs.dense(SIZES[2], dlfs.ReLU())]
        net = dlfs.network(
            args.seed, SIZES[0], [*layers, dlfs.dense(SIZES[3])], dlfs.SoftmaxCrossEntropy()
        )
        trained, history = dlfs.fit(
            net, dlfs.SGD(0.05), x, y, epochs=args.epochs, batch_size=args.batch_size
        )
        out["model_bytes"] = sum(p.nbytes for layer in trained.params() for p in layer)
        itemsize = np.dtype(np.float32).itemsize
        widths = [SIZES[0]]
        for layer in trained.layers:  # the input batch plus every layer's output
            widths.append(layer.output_shape((widths[-1],))[0])
        out["activation_bytes"] = args.batch_size * sum(widths) * itemsize
        out["final_loss"] = history.train_loss[-1]
    out["peak_rss"] = peak_rss_bytes()
    print(json.dumps(out))


def run_child(kind: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--n",
        str(args.n),
        "--epochs",
        str(args.epochs),
    ]
    cmd += ["--batch-size", str(args.batch_size), "--seed", str(args.seed)]
    if args.data:
        cmd += ["--data", args.data]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"child {kind!r} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="npz with x_train (N,28,28) uint8 and y_train (real MNIST)")
    p.add_argument("--n", type=int, default=60000, help="training rows")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", choices=["baseline", "data", "train"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return

    base = run_child("baseline", args)
    data = run_child("data", args)
    train = run_child("train", args)
    need = train["data_bytes"] + train["model_bytes"] + train["activation_bytes"]
    extra = train["peak_rss"] - base["peak_rss"]
    print(f"python={sys.version.split()[0]}")
    print(f"numpy={np.__version__}")
    print(f"data={'npz' if args.data else 'synthetic'} n={args.n} x_dtype={train['x_dtype']}")
    print(f"epochs={args.epochs} batch_size={args.batch_size} final_loss={train['final_loss']:.4f}")
    print(f"baseline_peak_rss_mib={base['peak_rss'] / MIB:.1f}")
    print(f"data_only_peak_rss_mib={data['peak_rss'] / MIB:.1f}")
    print(f"train_peak_rss_mib={train['peak_rss'] / MIB:.1f}")
    print(f"data_mib={train['data_bytes'] / MIB:.1f}")
    print(f"model_mib={train['model_bytes'] / MIB:.2f}")
    print(f"activations_mib={train['activation_bytes'] / MIB:.2f}")
    print(f"train_minus_baseline_mib={extra / MIB:.1f}")
    print(f"train_minus_data_only_mib={(train['peak_rss'] - data['peak_rss']) / MIB:.1f}")
    print(f"memory_ratio={extra / need:.3f}")
    print(f"memory_target_met={extra / need <= 1.5}")


if __name__ == "__main__":
    main()
