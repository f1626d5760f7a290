"""A character-level GPT with dlfs: nanoGPT's "baby GPT" on CPU, step for step.

A pre-LayerNorm Transformer decoder (token embedding tied to the output
head, learned positions, ``--n-layer`` blocks of causal self-attention and a
GELU MLP, each inside a residual connection, a final LayerNorm), trained by
iterations on random windows of the text (``dlfs.random_windows``, nanoGPT's
``get_batch``) with AdamW (weight decay on matrices only), warm-up and
cosine decay, and gradients clipped at global norm 1.  The defaults are the
settings of nanoGPT's README for a CPU:

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False
      --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4
      --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0

The text's first 90 % trains, the last 10 % validates (characters mapped to
ids in sorted order).  Every ``--eval-interval`` iterations it prints the
loss on fixed sets of ``--eval-windows`` random windows of each split; at
the end, the loss over the whole validation split (its non-overlapping
windows), a sample, and ``key=value`` lines.  No corpus is shipped: tiny
Shakespeare is karpathy/char-rnn's ``data/tinyshakespeare/input.txt``.

    python examples/char_gpt.py --text input.txt
    python examples/char_gpt.py --text input.txt --iters 500 --seed 1
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _help import Defaults  # examples/_help.py: --help shows the defaults

try:
    import dlfs
except ModuleNotFoundError:  # not installed: use the dlfs.py next to examples/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import dlfs


def build(key: dlfs.Key | int, vocab: int, args: argparse.Namespace) -> dlfs.Network:
    """nanoGPT's GPT without biases: weights N(0, 0.02), the two output projections of
    each block N(0, 0.02 / sqrt(2 n_layer)), LayerNorm scales 1."""
    d = args.n_embd
    init = dlfs.scaled(dlfs.normal, 0.02)
    proj = dlfs.scaled(dlfs.normal, 0.02 / math.sqrt(2 * args.n_layer))

    def block() -> list[dlfs.LayerSpec]:
        attention = dlfs.self_attention(args.n_head, bias=False, init=init, out_init=proj)
        mlp = [
            dlfs.dense(4 * d, dlfs.GELU("none"), bias=False, init=init),
            dlfs.dense(d, bias=False, init=proj),
        ]
        return [
            dlfs.residual([dlfs.layer_norm(bias=False), attention]),
            dlfs.residual([dlfs.layer_norm(bias=False), *mlp]),
        ]

    body = [dlfs.positional_embedding(args.block_size, init=init)]
    body += [spec for _ in range(args.n_layer) for spec in block()]
    body.append(dlfs.layer_norm(bias=False))
    layers = [dlfs.tied_embedding(vocab, d, body, init=init)]
    return dlfs.network(key, (args.block_size,), layers, dlfs.SoftmaxCrossEntropy())


def optimizer(args: argparse.Namespace) -> dlfs.Optimizer:
    """AdamW (betas 0.9, 0.99; wd 0.1 on arrays of ndim >= 2), lr warm-up then cosine
    decay to ``--min-lr`` at ``--iters``, after clipping the gradients' global norm at 1."""
    warmup = min(args.warmup, args.iters - 1)
    schedule = dlfs.CosineDecay(args.lr, args.iters, warmup=warmup, final_lr=args.min_lr)
    adamw = dlfs.AdamW(schedule, b2=0.99, weight_decay=0.1, weight_decay_mask="matrices")
    return dlfs.chain(dlfs.ClipByGlobalNorm(1.0), adamw)


def fixed_windows(key: dlfs.Key, ids: np.ndarray, context: int, n: int) -> tuple:
    """``n`` random windows (x, next ids), drawn once: the same set at every evaluation."""
    batch = next(dlfs.random_windows(key, ids, context, n, 1))
    return batch


def whole_split(ids: np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray]:
    """Every non-overlapping window of ``context`` ids, each with its next ids."""
    n = (len(ids) - 1) // context
    x = ids[: n * context].reshape(n, context)
    y = ids[1 : n * context + 1].reshape(n, context)
    return x, y


def mean_loss(net: dlfs.Network, windows: tuple[np.ndarray, np.ndarray]) -> float:
    """Cross-entropy in nats per character, over every position of the windows."""
    return net.evaluate(*windows, metric=None, batch_size=128)["loss"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").partition("\n")[0],
        formatter_class=Defaults,
    )
    ap.add_argument("--text", required=True, help="a UTF-8 text file (e.g. tiny Shakespeare)")
    ap.add_argument("--iters", type=int, default=2000, help="training iterations (batches)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--block-size", type=int, default=64, help="context length T")
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    ap.add_argument("--min-lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=100, help="warm-up iterations")
    ap.add_argument("--eval-interval", type=int, default=250)
    ap.add_argument("--eval-windows", type=int, default=240, help="fixed windows per split")
    ap.add_argument("--sample-length", type=int, default=500)
    ap.add_argument("--temperature", type=float, default=0.8)
    args = ap.parse_args(argv)
    sizes = (args.iters, args.block_size, args.batch_size, args.n_layer, args.n_head)
    if min(*sizes, args.n_embd, args.eval_interval, args.eval_windows) < 1 or args.iters < 2:
        ap.error("sizes, --eval-interval and --eval-windows must be >= 1, --iters >= 2")
    if args.n_embd % args.n_head:
        ap.error(f"--n-embd ({args.n_embd}) must be divisible by --n-head ({args.n_head})")
    if not args.temperature > 0 or args.sample_length < 0:
        ap.error("--temperature must be > 0 and --sample-length >= 0")

    text = Path(args.text).read_text(encoding="utf-8")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = np.array([index[c] for c in text], dtype=np.int64)
    split = int(0.9 * len(ids))
    train_ids, val_ids = ids[:split], ids[split:]
    if len(val_ids) <= args.block_size:
        ap.error(f"--text is too short for --block-size {args.block_size}: {len(text)} characters")
    print(
        f"text: {len(text):,} characters, vocabulary {len(chars)}, "
        f"train {len(train_ids):,}, validation {len(val_ids):,}"
    )

    init_key, data_key, eval_key, sample_key = dlfs.split(args.seed, 4)
    net = build(init_key, len(chars), args)
    print(net.summary())
    n_params = sum(p.size for layer in net.params() for p in layer)
    state = dlfs.TrainState.create(net, optimizer(args))
    train_eval = fixed_windows(eval_key + (0,), train_ids, args.block_size, args.eval_windows)
    val_eval = fixed_windows(eval_key + (1,), val_ids, args.block_size, args.eval_windows)
    batches = dlfs.random_windows(data_key, train_ids, args.block_size, args.batch_size, args.iters)

    train_s, done = 0.0, 0
    while True:
        if done % args.eval_interval == 0 or done == args.iters:
            train_loss, val_loss_est = (
                mean_loss(state.net, train_eval),
                mean_loss(state.net, val_eval),
            )
            print(
                f"step {done}: train loss {train_loss:.4f}, val loss {val_loss_est:.4f}, "
                f"{train_s:.0f} s",
                flush=True,
            )
        if done == args.iters:
            break
        todo = min(args.eval_interval - done % args.eval_interval, args.iters - done)
        start = time.perf_counter()
        for batch in itertools.islice(batches, todo):
            state = dlfs.train_step(state, batch)
        train_s += time.perf_counter() - start
        done += todo

    val_loss = mean_loss(state.net, whole_split(val_ids, args.block_size))
    prompt = np.array([[index.get("\n", 0)]])
    drawn = dlfs.generate(
        state.net, prompt, args.sample_length, key=sample_key, temperature=args.temperature
    )
    print(f"--- sample ({args.sample_length} characters, temperature {args.temperature}):")
    print("".join(chars[i] for i in drawn[0]))
    print("---")
    print(f"params={n_params}")
    print(f"iters={args.iters}")
    print(f"val_loss={val_loss:.4f}")
    print(f"val_loss_est={val_loss_est:.4f}")
    print(f"train_loss={train_loss:.4f}")
    print(f"ms_per_iter={1000 * train_s / args.iters:.1f}")
    print(f"train_s={train_s:.1f}")
    print(f"seed={args.seed}")
    return {
        "val_loss": val_loss,
        "val_loss_est": val_loss_est,
        "train_loss": train_loss,
        "params": n_params,
        "sample": drawn[0],
    }


if __name__ == "__main__":
    main()
