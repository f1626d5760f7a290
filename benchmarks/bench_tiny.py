"""Per-step overhead on tiny networks: dlfs against a plain numpy loop.

Where the arithmetic is negligible, what a step costs is the framework:

- ``tanh``: the tutorials' 784-100-50-10 tanh net, one sample per step,
  MSE on one-hot targets, SGD lr 0.1 (3 000 steps a run; MNIST or
  synthetic MNIST);
- ``small``: an 8-8-8-4 ReLU net at batch 8, softmax cross-entropy, SGD lr
  0.05 (10 000 steps a run; synthetic data).

The numpy contender (``PlainLoop`` in contender_numpy.py) repeats dlfs's
arithmetic operation for operation without checks or records, so the two
trajectories must be identical bit for bit: the script compares the final
parameters' digests of every run (``tanh_bitwise_same=True``) besides the
5-step check.  dlfs trains through ``dlfs.train_epoch`` over ``np.take``
batches.  Each contender runs in its own process, in rotating interleaved
rounds.  Prints the median microseconds per step of each and
``tanh_time_ratio_dlfs_over_numpy`` (median within-round ratio of the
times: above 1 means dlfs takes longer).

    python benchmarks/bench_tiny.py --threads 1
"""

from __future__ import annotations

import sys

import harness as h


def main(argv: list[str] | None = None) -> int:
    p = h.parent_parser(__doc__.split("\n\n")[0])
    p.add_argument("--workloads", nargs="+", choices=["tanh", "small"], default=["tanh", "small"])
    p.set_defaults(only=["dlfs", "numpy"])
    args = p.parse_args(argv)
    impls = h.start(args)
    ok = True
    for name in args.workloads:
        ok &= h.check_equivalence(name, args)
        runs = h.compare(name, impls, args, name, key="us_per_step")
        if {"dlfs", "numpy"} <= set(runs):
            digests = {run.values["params_digest"] for rs in runs.values() for run in rs}
            h.emit(f"{name}_bitwise_same", len(digests) == 1)
            ok &= len(digests) == 1
    h.emit("load_end", h.load_avg())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
