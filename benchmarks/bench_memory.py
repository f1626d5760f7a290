"""Peak memory (RSS) of dlfs training runs, against what they must hold.

For each model (``--models mlp cnn``) it runs child processes and reads each
one's peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``):

- ``baseline``: the interpreter with numpy and dlfs imported, nothing else;
- ``data``: baseline + the float32 training set (60000 images by default);
- ``train``: baseline + the data + ``dlfs.fit`` of the model:
  - ``mlp``: 784-256-128-10 ReLU, softmax cross-entropy, SGD, batch 128;
  - ``cnn``: examples/mnist_cnn.py's network and optimizer (conv 32 - pool -
    conv 64 - pool - dense 128 - dropout - dense 10, Adam with a cosine
    schedule), batch 64, on (N, 1, 28, 28) images;

and prints ``key=value`` lines per model: the peaks, the sizes of the data,
the model, one batch of activations (the input batch plus every layer's
output) and

    <model>_memory_ratio = (peak_train - peak_baseline) / (data + model + activations)

whose target is at most 1.5: no float64 copy of float32 data (that alone
would make it about 3), no per-batch garbage kept alive.  What the layers
cache besides their outputs (a convolution's im2col patches, masks) and the
optimizer's moments all count against that budget.

    pip install -e ".[bench]"
    python benchmarks/bench_memory.py                       # both, 1 epoch each, synthetic data
    python benchmarks/bench_memory.py --models cnn --n 20000
    python benchmarks/bench_memory.py --data PATH/mnist.npz

Linux reports ru_maxrss in KiB (macOS in bytes; handled).  With ``--data``
the uint8 images are read before conversion, so the peaks include them
(a quarter of the float32 size) in the data and train children alike.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
SETTINGS = {  # model: (input shape per sample, batch size)
    "mlp": ((784,), 128),
    "cnn": ((1, 28, 28), 64),
}


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def make_data(path: str | None, n: int, shape: tuple[int, ...], seed: int):
    """float32 x (N, *shape) in [0, 1] and int64 labels, without float64 intermediates."""
    if path:
        with np.load(path, allow_pickle=False) as d:
            x = d["x_train"][:n].reshape(-1, *shape).astype(np.float32)
            y = d["y_train"][:n].astype(np.int64)
        x /= 255  # in place: x is our own fresh array
        return x, y
    rng = np.random.default_rng(seed)
    return rng.random((n, *shape), dtype=np.float32), rng.integers(0, 10, n)


def build(dlfs, model: str, seed: int, steps: int):
    """(network, optimizer) of ``model``."""
    if model == "mlp":
        layers = [dlfs.dense(256, dlfs.ReLU()), dlfs.dense(128, dlfs.ReLU()), dlfs.dense(10)]
        return dlfs.network(seed, 784, layers, dlfs.SoftmaxCrossEntropy()), dlfs.SGD(0.05)
    sys.path.insert(0, str(ROOT / "examples"))
    from mnist_cnn import build as build_cnn  # the example's network and schedule

    schedule = dlfs.CosineDecay(2e-3, steps=steps, warmup=min(200, steps - 1))
    return build_cnn(seed), dlfs.Adam(schedule)


def activation_bytes(net, batch: int) -> int:
    """One batch of activations: the input plus every layer's output."""
    sizes, shape = [math.prod(net.input_shape)], net.input_shape
    for layer in net.layers:
        shape = layer.output_shape(shape)
        sizes.append(math.prod(shape))
    return batch * sum(sizes) * np.dtype(np.float32).itemsize


def child(args: argparse.Namespace) -> None:
    """Run one measurement and print a JSON line with the results."""
    sys.path.insert(0, str(ROOT))
    import dlfs

    shape, batch = SETTINGS[args.model]
    out: dict = {"kind": args.child}
    if args.child in ("data", "train"):
        x, y = make_data(args.data, args.n, shape, args.seed)
        out["data_bytes"] = x.nbytes + y.nbytes
        out["x_dtype"] = str(x.dtype)
    if args.child == "train":
        steps = args.epochs * -(-args.n // batch)
        net, opt = build(dlfs, args.model, args.seed, steps)
        trained, history = dlfs.fit(net, opt, x, y, epochs=args.epochs, batch_size=batch)
        out["model_bytes"] = sum(p.nbytes for layer in trained.params() for p in layer)
        out["activation_bytes"] = activation_bytes(trained, batch)
        out["final_loss"] = history.train_loss[-1]
    out["peak_rss"] = peak_rss_bytes()
    print(json.dumps(out))


def run_child(kind: str, model: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--models", model, "--n", str(args.n)]
    cmd += ["--epochs", str(args.epochs), "--seed", str(args.seed)]
    if args.data:
        cmd += ["--data", args.data]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"child {kind!r} ({model}) failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(model: str, args: argparse.Namespace) -> bool:
    base, data, train = (run_child(kind, model, args) for kind in ("baseline", "data", "train"))
    need = train["data_bytes"] + train["model_bytes"] + train["activation_bytes"]
    extra = train["peak_rss"] - base["peak_rss"]
    lines = {
        "batch_size": SETTINGS[model][1],
        "final_loss": f"{train['final_loss']:.4f}",
        "x_dtype": train["x_dtype"],
        "baseline_peak_rss_mib": base["peak_rss"] / MIB,
        "data_only_peak_rss_mib": data["peak_rss"] / MIB,
        "train_peak_rss_mib": train["peak_rss"] / MIB,
        "data_mib": train["data_bytes"] / MIB,
        "model_mib": train["model_bytes"] / MIB,
        "activations_mib": train["activation_bytes"] / MIB,
        "train_minus_baseline_mib": extra / MIB,
        "train_minus_data_only_mib": (train["peak_rss"] - data["peak_rss"]) / MIB,
        "memory_ratio": extra / need,
    }
    for key, value in lines.items():
        print(
            f"{model}_{key}={value:.3f}" if isinstance(value, float) else f"{model}_{key}={value}"
        )
    print(f"{model}_memory_target_met={extra / need <= 1.5}")
    return extra / need <= 1.5


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(SETTINGS), default=["mlp", "cnn"])
    p.add_argument("--data", help="npz with x_train (N,28,28) uint8 and y_train (real MNIST)")
    p.add_argument("--n", type=int, default=60000, help="training rows")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", choices=["baseline", "data", "train"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.model = args.models[0]
        child(args)
        return 0
    print(f"python={sys.version.split()[0]}")
    print(f"numpy={np.__version__}")
    print(f"data={'npz' if args.data else 'synthetic'} n={args.n} epochs={args.epochs}")
    return 0 if all([report(model, args) for model in args.models]) else 1


if __name__ == "__main__":
    sys.exit(main())
