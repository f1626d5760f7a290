"""A character-level language model with dlfs: Embedding -> GRU (or LSTM) -> Dense.

The text is cut into ``--batch-size`` parallel streams, read in segments of
``--seq-len`` characters; the model predicts each next character.  Training
is truncated backpropagation through time: the recurrent state at the end of
one segment is the initial state of the next (``scan(x, state)`` returns the
last state), while gradients stop at segment boundaries.  One training step
is a pure function ``step((net, opt_state, state), segment) -> (carry, loss)``
and an epoch folds it over the segments.  Prints the loss per epoch (nats
per character), a sample drawn at ``--temperature`` after the last epoch,
and ``key=value`` lines.  No corpus is shipped: bring any text file.

    python examples/char_rnn.py --text input.txt --epochs 10
    python examples/char_rnn.py --text input.txt --cell lstm --temperature 0.5
"""

from __future__ import annotations

import argparse
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

CELLS = {"gru": dlfs.gru, "lstm": dlfs.lstm}


def streams(ids: np.ndarray, batch_size: int) -> np.ndarray:
    """ids (L,) -> (batch_size, L // batch_size): stream b is the b-th stretch of text."""
    length = len(ids) // batch_size
    return ids[: batch_size * length].reshape(batch_size, length)


def segments(data: np.ndarray, seq_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Consecutive (inputs, next characters) pairs, each (B, <= seq_len), in text order."""
    last = data.shape[1] - 1  # the last character is only ever a target
    pairs = []
    for i in range(0, last, seq_len):
        end = min(i + seq_len, last)
        pairs.append((data[:, i:end], data[:, i + 1 : end + 1]))
    return pairs


def build(seed: int | dlfs.Key, vocab: int, args: argparse.Namespace) -> dlfs.Network:
    layers = [
        dlfs.embedding(vocab, args.embed),
        CELLS[args.cell](args.hidden, return_sequences=True),
        dlfs.dense(vocab),
    ]
    return dlfs.network(seed, (args.seq_len,), layers, dlfs.SoftmaxCrossEntropy())


def run(net: dlfs.Network, x: np.ndarray, state: Any) -> tuple[np.ndarray, Any, tuple]:
    """Logits (B, S, V) for ids x (B, S) from ``state``; returns the last state and caches."""
    embed, cell, out = net.layers
    if not isinstance(cell, (dlfs.RNN, dlfs.LSTM, dlfs.GRU)):  # it has scan
        raise TypeError(f"layers[1] must be a recurrent layer, got {cell!r}")
    e, e_cache, _ = embed.forward(x)
    hs, last, cell_cache = cell.scan(e, state)
    logits, out_cache, _ = out.forward(hs)
    return logits, last, (e_cache, cell_cache, out_cache)


def make_step(optimizer: dlfs.Optimizer):
    """The pure training step of truncated BPTT (state carried, gradients cut)."""

    def step(carry: tuple, segment: tuple[np.ndarray, np.ndarray]) -> tuple[tuple, float]:
        net, opt_state, state = carry
        x, y = segment
        embed, cell, out = net.layers
        logits, last, (e_cache, cell_cache, out_cache) = run(net, x, state)
        loss, loss_cache = net.loss.forward(logits, y)
        dhs, out_grads = out.backward(out_cache, net.loss.backward(loss_cache))
        de, _, cell_grads = cell.backward_scan(cell_cache, dhs)  # no gradient into `state`
        _, embed_grads = embed.backward(e_cache, de)
        grads = (embed_grads, cell_grads, out_grads)
        params, opt_state = optimizer.update(grads, opt_state, net.params())
        return (net.with_params(params), opt_state, last), float(loss)

    return step


def train_epoch(step, carry: tuple, segs: list) -> tuple[tuple, float]:
    """Fold ``step`` over the segments from a zero state; mean loss per character."""
    net, opt_state, _ = carry
    carry, total, count = (net, opt_state, None), 0.0, 0
    for x, y in segs:
        carry, loss = step(carry, (x, y))
        total, count = total + loss * x.size, count + x.size
    return carry, total / count


def sample(
    net: dlfs.Network, prime: np.ndarray, length: int, temperature: float, key: dlfs.Key
) -> list[int]:
    """Feed ``prime`` ids, then draw ``length`` ids one at a time from
    softmax(logits / temperature)."""
    rng = dlfs.make_rng(key)
    logits, state, _ = run(net, prime[None, :], None)
    out = []
    for _ in range(length):
        z = logits[0, -1].astype(np.float64) / temperature
        p = np.exp(z - z.max())
        nxt = int(rng.choice(len(p), p=p / p.sum()))
        out.append(nxt)
        logits, state, _ = run(net, np.array([[nxt]]), state)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").partition("\n")[0],
        formatter_class=Defaults,
    )
    ap.add_argument("--text", required=True, help="a UTF-8 text file to learn")
    ap.add_argument("--cell", choices=list(CELLS), default="gru")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=50, help="characters per BPTT segment")
    ap.add_argument("--batch-size", type=int, default=32, help="parallel streams")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--embed", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--sample-length", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if min(args.epochs, args.seq_len, args.batch_size, args.hidden, args.embed) < 1:
        ap.error("--epochs, --seq-len, --batch-size, --hidden and --embed must be >= 1")
    if not args.temperature > 0 or args.sample_length < 0:
        ap.error("--temperature must be > 0 and --sample-length >= 0")

    text = Path(args.text).read_text(encoding="utf-8")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = np.array([index[c] for c in text], dtype=np.int64)
    data = streams(ids, args.batch_size)
    if data.shape[1] < 2:
        ap.error(f"--text is too short for {args.batch_size} streams: {len(text)} characters")
    segs = segments(data, args.seq_len)
    print(
        f"text: {len(text)} characters, vocabulary {len(chars)}, "
        f"{len(segs)} segments of {args.batch_size} x <= {args.seq_len} per epoch"
    )

    init_key, sample_key = dlfs.split(args.seed, 2)
    net = build(init_key, len(chars), args)
    print(net.summary())
    optimizer = dlfs.chain(dlfs.ClipByGlobalNorm(5.0), dlfs.Adam(args.lr))
    step = make_step(optimizer)
    carry: tuple = (net, optimizer.init(net.params()), None)
    losses = []
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        carry, loss = train_epoch(step, carry, segs)
        losses.append(loss)
        print(f"epoch {epoch}: loss={loss:.4f} ({loss / math.log(2):.3f} bits/char)", flush=True)
    train_s = time.perf_counter() - start

    prime = ids[: min(len(ids), args.seq_len)]
    drawn = sample(carry[0], prime, args.sample_length, args.temperature, sample_key)
    print(f"--- sample (temperature {args.temperature}) after {text[: len(prime)]!r}:")
    print("".join(chars[i] for i in drawn))
    print("---")
    print(f"loss_first={losses[0]:.4f}")
    print(f"loss_last={losses[-1]:.4f}")
    print(f"epochs={args.epochs}")
    print(f"vocab={len(chars)}")
    print(f"train_s={train_s:.0f}")
    print(f"seed={args.seed}")
    return {"losses": losses, "sample": drawn, "vocab": len(chars)}


if __name__ == "__main__":
    main()
