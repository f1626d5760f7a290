"""Data-parallel training of the MNIST MLP over MPI with ``dlfs.fit(..., comm=...)``.

    mpiexec -n 2 python -m mpi4py examples/data_parallel.py --data mnist.npz
    python examples/data_parallel.py --data mnist.npz          # one rank

Every rank runs this same script: the same network (same seed), the whole
data set and ``dlfs.fit(..., comm=MPI.COMM_WORLD)``.  fit walks the same
shuffled global batches on every rank, trains each rank on its shard of every
batch (``dlfs.data_parallel_step``) and puts ``dlfs.AllReduce(comm)`` first in
the optimizer's chain, which averages the gradients in one Allreduce per step,
so all ranks apply the same update.  The network and optimizer are
``mnist_mlp.py``'s default (784-256-128-10 ReLU, dropout 0.2, Adam with a
cosine schedule); with one rank the run is exactly ``fit`` without ``comm``.
Dropout masks differ per rank (see ``dlfs.data_parallel_step``).
``python -m mpi4py`` makes an error on any rank end the whole job (MPI_Abort)
instead of leaving the other ranks waiting; Ctrl-C stops every rank after the
same step (fit records the SIGINT that mpiexec forwards).

Only rank 0 prints.  It ends with ``key=value`` lines: ``ranks``,
``samples_per_s`` (training samples per second over all ranks), ``test_acc``,
``train_s``, the time and size of one all-reduce of the model's gradients
(``allreduce_ms``, ``allreduce_bytes``) and of the one-number all-reduce fit
adds after every step to agree on stops (``stop_flag_us``).  On a small
machine give each rank one BLAS thread: ``OPENBLAS_NUM_THREADS=1 mpiexec ...``.
Needs mpi4py and an MPI (``pip install -e ".[distributed]"``: the mpich wheel).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # mnist_mlp, next to this file
sys.path.insert(1, str(HERE.parent))  # dlfs.py in a checkout
from _help import Defaults  # noqa: E402
from mnist_mlp import build  # noqa: E402

import dlfs  # noqa: E402


def time_all_reduce(comm, grads: tuple, repeats: int = 20) -> float:
    """Seconds of one ``dlfs.AllReduce`` of ``grads`` (per-layer tuples of arrays): the
    median over ``repeats`` calls, each started together after a barrier."""
    reduce = dlfs.AllReduce(comm)
    times = []
    for _ in range(repeats + 3):  # the first calls set up connections: not timed
        comm.Barrier()
        start = time.perf_counter()
        reduce(grads, grads)
        times.append(time.perf_counter() - start)
    return float(np.median(times[3:]))


def main(argv: list[str] | None = None) -> dict[str, float] | None:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=Defaults,
    )
    parser.add_argument("--data", help=".npz or IDX folder (default: download and cache)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128, help="global, over all ranks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, help="use the first N training images")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1:
        parser.error("--epochs and --batch-size must be >= 1")

    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, ranks = comm.Get_rank(), comm.Get_size()
    try:
        (x_train, y_train), (x_test, y_test) = dlfs.load_mnist(args.data, flatten=True)
    except (OSError, ValueError) as err:  # no file, no network: one line, no traceback
        raise SystemExit(f"{Path(__file__).name}: {err}") from None
    x_train, y_train = x_train[: args.train_size], y_train[: args.train_size]
    steps = args.epochs * -(-len(x_train) // args.batch_size)
    net, optimizer = build("default", args.seed, steps)
    if rank == 0:
        print(f"ranks={ranks} train={len(x_train)} batch_size={args.batch_size} (global)")

    comm.Barrier()
    start = time.perf_counter()
    net, _ = dlfs.fit(
        net,
        optimizer,
        x_train,
        y_train,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        verbose=True,  # rank 0's lines; the other ranks stay quiet
        progress=sys.stderr.isatty(),
        comm=comm,
    )
    train_s = time.perf_counter() - start  # fit ends in an all-reduce: the ranks finish together
    grads = tuple(tuple(np.ones_like(p) for p in layer) for layer in net.params())
    allreduce_s = time_all_reduce(comm, grads)
    flag_s = time_all_reduce(comm, ((np.zeros(1),),))
    if rank != 0:
        return None
    result = {
        "ranks": ranks,
        "samples_per_s": args.epochs * len(x_train) / train_s,
        "test_acc": dlfs.accuracy(net.predict(x_test), y_test),
        "train_s": train_s,
        "allreduce_ms": allreduce_s * 1e3,
        "allreduce_bytes": sum(g.nbytes for layer in grads for g in layer),
        "stop_flag_us": flag_s * 1e6,
    }
    shown = {"samples_per_s": ".0f", "test_acc": ".4f", "train_s": ".2f", "allreduce_ms": ".3f"}
    for key, value in result.items():
        print(f"{key}={value:{shown.get(key, '.1f' if isinstance(value, float) else 'd')}}")
    return result


if __name__ == "__main__":
    main()
