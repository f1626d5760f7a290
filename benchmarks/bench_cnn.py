"""CNN training throughput: dlfs against PyTorch eager and a hand-written numpy loop.

Two networks, float32, plain SGD (lr 0.05), batch 64:

- ``cnn``, the reference CNN: conv 3x3 8 (pad 1) ReLU max-pool 2 -> conv 3x3
  16 (pad 1) ReLU max-pool 2 -> flatten -> dense 10 (10 000 rows a run);
- ``mnist_cnn``, examples/mnist_cnn.py's network: conv 3x3 32 ReLU pool ->
  conv 3x3 64 ReLU pool -> dense 128 ReLU -> dropout 0.25 -> dense 10
  (2 000 rows a run; the script checks that the example still builds it).

As in bench_mlp.py, every contender runs in its own process, in rotating
interleaved rounds, on the same data, weights and shuffles, timing one
epoch; ``run_one.py --impl check`` first shows the three agree (dropout
left out: its random masks differ between libraries, so with dropout the
final losses agree only roughly).  The numpy contender keeps activations
channel-major, im2col by shifted copies, pools with bool masks, all in
reused buffers (``contender_numpy.py``).

Prints one line per run (with the load average before and after), then per
network the median samples/s of each contender and
``cnn_b64_speed_ratio_dlfs_over_torch`` / ``..._over_numpy`` (median within-round
ratios; above 1 means dlfs is faster).

    python benchmarks/bench_cnn.py --threads 1
    python benchmarks/bench_cnn.py --threads 2 --nets cnn --data PATH/mnist.npz
"""

from __future__ import annotations

import sys

import harness as h


def main(argv: list[str] | None = None) -> int:
    p = h.parent_parser(__doc__.split("\n\n")[0])
    p.add_argument("--nets", nargs="+", choices=["cnn", "mnist_cnn"], default=["cnn", "mnist_cnn"])
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args(argv)
    impls = h.start(args)
    ok = True
    for net in args.nets:
        ok &= h.check_equivalence(net, args, args.batch)
        h.compare(net, impls, args, f"{net}_b{args.batch}", batch=args.batch)
    h.emit("load_end", h.load_avg())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
