"""Train one contender on one workload in this process; print ``key=value`` lines.

The building block of bench_mlp.py, bench_cnn.py and bench_tiny.py, which
start it once per contender and round.  Alone, it measures one library:

    python benchmarks/run_one.py --impl dlfs --workload cnn --threads 1
    python benchmarks/run_one.py --impl torch --workload mlp --batch 32 --data PATH/mnist.npz
    python benchmarks/run_one.py --impl check --workload mnist_cnn   # do the contenders agree?

Timed: the epoch loop (batch gather, forward, loss, backward, SGD update),
after an untimed warm-up on a throwaway copy of the model.  Output:
``samples_per_s``, ``us_per_step``, ``train_loss`` (per epoch), and
``params_digest`` (equal digests: bit-identical final parameters).

``--impl check`` trains every contender a few steps in this one process,
from the same weights on the same batches (dropout left out), and compares
their parameters: ``equiv_<impl>_max_rel`` against the numpy loop, and for
the tiny workloads ``equiv_bitwise`` (dlfs and the plain loop must agree bit
for bit); exit status 1 on a mismatch.
"""

from __future__ import annotations

import os
import sys


def _pin_threads(argv: list[str]) -> None:
    """Apply ``--threads`` (BLAS, OpenMP) before numpy or torch loads: OpenBLAS
    sizes its thread pool when it loads (a later limit leaves idle threads around)."""
    values = {}
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            values["--threads"] = argv[i + 1]
        elif arg.startswith("--threads="):
            values["--threads"] = arg.split("=", 1)[1]
    if "--threads" in values:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = values["--threads"]


_pin_threads(sys.argv[1:])

import argparse  # noqa: E402
import importlib  # noqa: E402
import time  # noqa: E402

import harness as h  # noqa: E402
import numpy as np  # noqa: E402


def contender(impl: str, w: h.Workload, init: list, seed: int):
    if impl == "torch":
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    return importlib.import_module(f"contender_{impl}").Contender(w, init, seed)


def _profiler():
    """A started pyinstrument profiler (1 ms samples) for --profile."""
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.001)
    profiler.start()
    return profiler


def check(w: h.Workload, x: np.ndarray, y: np.ndarray, init: list, args) -> int:
    """A few steps of every contender from the same start; compare the parameters."""
    w = w.without_dropout()
    n = min(len(x), args.check_steps * args.batch)
    impls = [i for i in h.IMPLS if i != "torch" or h.torch_available()]
    params = {}
    for impl in impls:
        model = contender(impl, w, init, args.seed)
        model.train_epoch(x[:n], y[:n], np.arange(n), args.batch)
        params[impl] = model.torch_layout()
    ok = True
    for impl in impls:
        rel = max(
            float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))
            for a, b in zip(params[impl], params["numpy"], strict=True)
        )
        h.emit(f"equiv_{impl}_max_rel", rel)
        ok &= rel < args.tol
    if w.plain:
        same = h.params_digest(params["dlfs"]) == h.params_digest(params["numpy"])
        h.emit("equiv_bitwise", same)
        ok &= same
    h.emit("equiv_steps", -(-n // args.batch))
    h.emit("equiv_ok", ok)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impl", choices=[*h.IMPLS, "check"], required=True)
    p.add_argument("--workload", choices=sorted(h.WORKLOADS), required=True)
    p.add_argument("--batch", type=int, help="batch size (default: the workload's)")
    p.add_argument("--n", type=int, help="training rows per epoch (default: the workload's)")
    p.add_argument("--epochs", type=int, default=1, help="timed epochs (default 1)")
    p.add_argument("--threads", type=int, help="BLAS / OpenMP threads (default: theirs)")
    p.add_argument("--data", help="MNIST .npz (x_train (N, 28, 28) uint8, y_train); else synthetic")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=5, help="untimed warm-up steps (default 5)")
    p.add_argument("--predict", action="store_true", help="also time predict on 10 000 rows")
    p.add_argument(
        "--profile", action="store_true", help="profile the timed epochs (pyinstrument) and print"
    )
    p.add_argument("--check-steps", type=int, default=5, help="steps of --impl check")
    p.add_argument("--tol", type=float, default=2e-4, help="relative tolerance of --impl check")
    args = p.parse_args(argv)
    w = h.WORKLOADS[args.workload]
    args.batch = args.batch or w.batch
    n = args.n or w.n_train
    x, y, desc = h.load_data(w, args.data, max(n, 10000 if args.predict else 0), args.seed)
    init = h.initial_params(w, args.seed)
    h.emit("workload", w.name)
    h.emit("batch", args.batch)
    h.emit("data", desc)
    if args.impl == "check":
        return check(w, x, y, init, args)

    warm = min(n, args.warmup * args.batch)
    contender(args.impl, w, init, args.seed).train_epoch(x, y, np.arange(warm), args.batch)
    model = contender(args.impl, w, init, args.seed)
    profiler = _profiler() if args.profile else None
    times, losses = [], []
    for epoch in range(args.epochs):
        order = h.epoch_order(args.seed, n, epoch)
        t0 = time.perf_counter()
        losses.append(model.train_epoch(x, y, order, args.batch))
        times.append(time.perf_counter() - t0)
    if profiler is not None:
        profiler.stop()
        print(profiler.output_text(unicode=False, color=False, show_all=False), file=sys.stderr)
    h.emit("impl", args.impl)
    h.print_machine()
    h.emit("n", n)
    h.emit("epochs", args.epochs)
    h.emit("samples_per_s", args.epochs * n / sum(times))
    h.emit("us_per_step", sum(times) / (args.epochs * -(-n // args.batch)) * 1e6)
    h.emit("train_loss", ",".join(f"{v:.6f}" for v in losses))
    h.emit("params_digest", h.params_digest(model.torch_layout()))
    if args.predict:
        model.predict(x[:2048], 1024)  # warm-up
        t0 = time.perf_counter()
        model.predict(x[:10000], 1024)
        h.emit("predict_samples_per_s", 10000 / (time.perf_counter() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
