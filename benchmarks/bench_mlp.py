"""MLP training throughput: dlfs against PyTorch eager and a hand-written numpy loop.

Network 784-256-128-10, ReLU, softmax cross-entropy, plain SGD (lr 0.1),
float32, at batch 32, 128 and 512.  Every contender runs in its own process
(``run_one.py``), in interleaved rounds whose order rotates (dlfs, torch,
numpy; torch, numpy, dlfs; ...), from the same initial weights on the same
data in the same shuffled order, timing the same region (one epoch: batch
gather, forward, loss, backward, update).  The numpy contender is the
ceiling: the same math by hand, in place, into reused buffers
(``contender_numpy.py``).  Before the rounds, ``run_one.py --impl check``
proves the three compute the same thing (parameters after 5 steps agree to
float32 rounding).

Prints ``key=value`` lines: one per run (with the load average before and
after it), then per batch size the median samples/s of each contender,
``mlp_b128_speed_ratio_dlfs_over_torch`` and ``..._over_numpy`` (the median over
rounds of the within-round ratio: above 1 means dlfs is faster), the
spread of the final losses, and with ``--predict`` the same for inference
(10 000 rows in chunks of 1024).

    pip install -e ".[bench]"             # torch==2.13.0 (CPU), threadpoolctl, pyinstrument
    python benchmarks/bench_mlp.py --threads 1
    python benchmarks/bench_mlp.py --threads 2 --data PATH/mnist.npz --rounds 5

Compare only ratios from one run: a shared machine's speed drifts.  Figures
meant for others need a quiet machine (``uptime`` load well under 0.3 per
core before and after); under load, two-thread runs (PyTorch's most of
all) collapse.
"""

from __future__ import annotations

import sys

import harness as h


def main(argv: list[str] | None = None) -> int:
    p = h.parent_parser(__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128, 512])
    p.add_argument("--predict", action="store_true", help="also time inference")
    args = p.parse_args(argv)
    impls = h.start(args)
    ok = h.check_equivalence("mlp", args)
    for batch in args.batch_sizes:
        runs = h.compare(
            "mlp", impls, args, f"mlp_b{batch}", batch=batch, options={"predict": args.predict}
        )
        if args.predict and "dlfs" in runs:
            for ref in (i for i in impls if i != "dlfs"):
                ratio = h.paired_ratio(runs["dlfs"], runs[ref], "predict_samples_per_s")
                h.emit(f"mlp_b{batch}_predict_speed_ratio_dlfs_over_{ref}", ratio)
    h.emit("load_end", h.load_avg())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
