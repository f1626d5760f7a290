"""Data-parallel training of the MNIST MLP over MPI with dlfs.

    mpiexec -n 2 python examples/data_parallel.py --data mnist.npz
    python examples/data_parallel.py --data mnist.npz          # one rank

Every rank builds the same network (same seed) and walks the same shuffled
global batches (same key, same permutation); ``dlfs.data_parallel_step``
trains each rank on its shard of every batch and the optimizer's first
element, ``dlfs.AllReduce(comm)``, averages the gradients in one Allreduce
per step, so all ranks apply the same update.  The network and optimizer are
``mnist_mlp.py``'s default (784-256-128-10 ReLU, dropout 0.2, Adam with a
cosine schedule); keys are derived from ``--seed`` as ``dlfs.fit`` derives
them, so one rank gives fit's weights (without validation).  Dropout masks
differ per rank (see ``data_parallel_step``).

Only rank 0 prints.  It ends with ``key=value`` lines: ``ranks``,
``samples_per_s`` (training samples per second over all ranks), ``test_acc``,
and the time and size of one all-reduce of the model's gradients
(``allreduce_ms``, ``allreduce_bytes``).  On a small machine give each rank
one BLAS thread: ``OPENBLAS_NUM_THREADS=1 mpiexec -n 2 ...``.
Needs mpi4py and an MPI (``pip install -e ".[distributed]"``: the mpich wheel).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import attrs
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # mnist_mlp, next to this file
sys.path.insert(1, str(HERE.parent))  # dlfs.py in a checkout
from mnist_mlp import build  # noqa: E402

import dlfs  # noqa: E402


def train(comm, net, optimizer, data, *, epochs: int, batch_size: int, seed: int, say):
    """``epochs`` of data_parallel_step folded over the global batches (the epoch's
    loss reset first, as in train_epoch); returns the final TrainState."""
    x, y = data
    shuffle_key, step_key = dlfs.split(seed, 2)  # as dlfs.fit derives its keys
    state = dlfs.TrainState.create(net, dlfs.chain(dlfs.AllReduce(comm), optimizer), step_key)
    step = functools.partial(dlfs.data_parallel_step, comm=comm)
    for epoch in range(1, epochs + 1):
        order = dlfs.batches(x, y, batch_size, key=shuffle_key + (epoch,))
        state = functools.reduce(step, order, attrs.evolve(state, loss_sum=0.0, seen=0))
        say(f"epoch {epoch}: train_loss={dlfs.global_mean_loss(state, comm):.4f}")
    return state


def time_all_reduce(comm, net: dlfs.Network, repeats: int = 20) -> tuple[float, int]:
    """(seconds, bytes) of one AllReduce of gradients shaped like ``net``'s parameters:
    the median over ``repeats`` calls, each started together after a barrier."""
    params = net.params()
    grads = tuple(tuple(np.ones_like(p) for p in layer) for layer in params)
    reduce = dlfs.AllReduce(comm)
    times = []
    for _ in range(repeats + 3):  # the first calls set up connections: not timed
        comm.Barrier()
        start = time.perf_counter()
        reduce(grads, params)
        times.append(time.perf_counter() - start)
    return float(np.median(times[3:])), sum(p.nbytes for layer in params for p in layer)


def main(argv: list[str] | None = None) -> dict[str, float] | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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

    def say(text: str) -> None:
        if rank == 0:
            print(text, flush=True)

    (x_train, y_train), (x_test, y_test) = dlfs.load_mnist(args.data, flatten=True)
    x_train, y_train = x_train[: args.train_size], y_train[: args.train_size]
    steps = args.epochs * -(-len(x_train) // args.batch_size)
    net, optimizer = build("default", args.seed, steps)
    say(f"ranks={ranks} train={len(x_train)} batch_size={args.batch_size} (global)")

    comm.Barrier()
    start = time.perf_counter()
    state = train(
        comm,
        net,
        optimizer,
        (x_train, y_train),
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        say=say,
    )
    train_s = time.perf_counter() - start  # global_mean_loss synchronized the ranks
    net = dlfs.sync_state(state.net, comm)  # no BatchNorm here: the same network
    seconds, nbytes = time_all_reduce(comm, net)
    if rank != 0:
        return None
    result = {
        "ranks": ranks,
        "samples_per_s": args.epochs * len(x_train) / train_s,
        "test_acc": dlfs.accuracy(net.predict(x_test), y_test),
        "train_s": train_s,
        "allreduce_ms": seconds * 1e3,
        "allreduce_bytes": nbytes,
    }
    print(f"ranks={ranks}")
    print(f"samples_per_s={result['samples_per_s']:.0f}")
    print(f"test_acc={result['test_acc']:.4f}")
    print(f"train_s={train_s:.2f}")
    print(f"allreduce_ms={result['allreduce_ms']:.3f}")
    print(f"allreduce_bytes={nbytes}")
    return result


if __name__ == "__main__":
    main()
