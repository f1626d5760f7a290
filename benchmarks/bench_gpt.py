"""Baby-GPT training step: dlfs against an equivalent PyTorch eager model on CPU.

The model is nanoGPT's CPU "baby GPT" (issue 22): V = 65 characters (or the
vocabulary of ``--text``), context T = 64, D = 128, 4 pre-LayerNorm blocks of
4-head causal self-attention and a 4D GELU MLP, learned positions, no biases,
token embedding tied to the output head, dropout 0, batch 12; AdamW lr 1e-3,
betas (0.9, 0.99), eps 1e-8, weight decay 0.1 on matrices only (ndim >= 2,
nanoGPT's rule), gradient clipping at global norm 1.0.  The learning rate is
held constant (nanoGPT's warm-up and cosine cost nothing per step).  float32
(``--dtype float64`` for an exact check of the two step rules).

- dlfs: api22's builder (``dlfs.tied_embedding`` around ``positional_embedding``,
  4 x [``residual([layer_norm, self_attention])``, ``residual([layer_norm,
  dense(4D, GELU("none")), dense(D)])``], ``layer_norm``), stepped with
  ``dlfs.train_step`` and ``chain(ClipByGlobalNorm(1), AdamW(...,
  weight_decay_mask="matrices"))``.
- PyTorch: nanoGPT-style modules written here (Block: ln_1, attn (c_attn,
  c_proj), ln_2, mlp (c_fc, GELU(), c_proj); ln_f; lm_head tied to wte),
  attention through ``F.scaled_dot_product_attention(is_causal=True)`` as
  nanoGPT runs it on torch >= 2; ``torch.optim.AdamW`` with nanoGPT's two
  param groups, ``clip_grad_norm_(1.0)``, ``loss.item()`` every step (nanoGPT's
  ``--log_interval=1``).

Both start from the SAME weights, drawn once by the parent as nanoGPT draws
them (N(0, 0.02), the two c_proj matrices N(0, 0.02 / sqrt(2 n_layer)),
LayerNorm weights 1), held in dlfs's layout in a temporary .npz (torch gets
Linear.weight = w.T, c_attn.weight = w_qkv.T, wte.weight = the tied w,
wpe.weight = the positional w, LayerNorm.weight = gamma), and train on the
SAME batches: random windows of the token stream, offsets drawn with numpy
from ``--seed`` (a synthetic Markov-chain stream, or the characters of
``--text FILE``).  Their per-step losses are printed side by side, with the
largest difference (float32: under 1e-6 over the first 10 steps; float64: ~1e-15).

Each run is its own process (BLAS / OpenMP thread counts fixed in its
environment before numpy or torch loads, ``torch.set_num_threads``); rounds
are interleaved (dlfs, torch, then torch, dlfs, ...) so a drifting load hits
both alike; the load average is printed before and after every run.  Per
thread count it prints ``key=value`` lines: each contender's median
``ms_per_iter`` (timed steps after ``--warmup`` untimed ones), tokens/s and
samples/s, the median of the within-round throughput ratios dlfs / torch
(above 1: dlfs faster), and the peak RSS of each process
(``resource.getrusage``, as bench_memory.py reads it) with its ratio, both
whole-process and above the process's own baseline (its peak after imports
and data, before the model: torch's import alone is a few hundred MiB)::

    pip install -e ".[bench]"                      # torch==2.13.0 (CPU)
    python benchmarks/bench_gpt.py                 # threads 1 and 2, 5 rounds of 30 steps
    python benchmarks/bench_gpt.py --threads 1 --rounds 2 --steps 20
    python benchmarks/bench_gpt.py --text PATH/input.txt --only dlfs
    python benchmarks/bench_gpt.py --dtype float64 --rounds 1 --steps 10   # losses to ~1e-12

Take speed figures only from a quiet machine (load well under 0.6).
``--worker`` and ``--init`` are internal (one run of one contender).
"""

from __future__ import annotations

import os
import sys


def _pin_threads(argv: list[str]) -> None:
    """A worker's ``--threads N``: BLAS / OpenMP thread counts before numpy or torch loads."""
    if "--worker" not in argv:
        return
    i = argv.index("--threads")
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = argv[i + 1]


_pin_threads(sys.argv[1:])

import argparse  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import harness as h  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(h.ROOT))  # dlfs.py in a checkout

T, D, N_LAYER, N_HEAD, BATCH = 64, 128, 4, 4, 12
LR, BETAS, EPS, WD, CLIP = 1e-3, (0.9, 0.99), 1e-8, 0.1, 1.0
SYNTHETIC_V, SYNTHETIC_LEN = 65, 200_000
MIB = 1 << 20


# ----------------------------------------------------------------- data


def token_stream(text: str | None, seed: int) -> tuple[np.ndarray, int, str]:
    """(ids int64, vocabulary size, description).

    ``text``: a file's characters, ids = ranks in its sorted character set
    (nanoGPT's shakespeare_char encoding).  Otherwise a synthetic stream of
    SYNTHETIC_V symbols: a first-order Markov chain in which every symbol has 4
    likely successors (learnable, so the loss falls as it would on text)."""
    if text:
        codes = np.frombuffer(Path(text).read_text(encoding="utf-8").encode("utf-32-le"), "<u4")
        chars, ids = np.unique(codes, return_inverse=True)  # sorted code points = sorted chars
        return ids.astype(np.int64), len(chars), f"text:{Path(text).name}"
    rng = np.random.default_rng([seed, 21])
    successors = rng.integers(0, SYNTHETIC_V, (SYNTHETIC_V, 4)).tolist()
    picks = rng.integers(0, 4, SYNTHETIC_LEN).tolist()
    ids, cur = [0] * SYNTHETIC_LEN, 0
    for i, k in enumerate(picks):
        cur = successors[cur][k]
        ids[i] = cur
    desc = f"synthetic Markov chain (V={SYNTHETIC_V}, {SYNTHETIC_LEN} ids; NOT text)"
    return np.array(ids, np.int64), SYNTHETIC_V, desc


def windows(ids: np.ndarray, seed: int, steps: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``steps`` batches (x, y) of BATCH random windows: x = ids[o : o + T],
    y = ids[o + 1 : o + 1 + T], offsets o uniform in [0, len - T - 1] (nanoGPT's get_batch)."""
    rng = np.random.default_rng([seed, 22])
    span = np.arange(T)
    out = []
    for _ in range(steps):
        at = rng.integers(0, len(ids) - T, BATCH)[:, None] + span
        out.append((ids[at], ids[at + 1]))
    return out


# ------------------------------------------------------- the dlfs model


def dlfs_gpt(v: int, dtype):
    """api22's baby-GPT builder (its own initial weights are replaced by ``init_weights``)."""
    import dlfs

    def block():
        return [
            dlfs.residual([dlfs.layer_norm(bias=False), dlfs.self_attention(N_HEAD, bias=False)]),
            dlfs.residual(
                [
                    dlfs.layer_norm(bias=False),
                    dlfs.dense(4 * D, dlfs.GELU("none"), bias=False),
                    dlfs.dense(D, bias=False),
                ]
            ),
        ]

    body = [dlfs.positional_embedding(T), *(la for _ in range(N_LAYER) for la in block())]
    return dlfs.network(
        0,
        (T,),
        [dlfs.tied_embedding(v, D, [*body, dlfs.layer_norm(bias=False)])],
        dlfs.SoftmaxCrossEntropy(),
        dtype=dtype,
    )


def param_names(net) -> list[str]:
    """nanoGPT's state_dict names of ``net.params()[0]``, in order."""
    import dlfs

    (tied,) = net.layers
    names, block = ["transformer.wte.weight"], -1
    for layer in tied.layers:
        if isinstance(layer, dlfs.PositionalEmbedding):
            names.append("transformer.wpe.weight")
        elif isinstance(layer, dlfs.LayerNorm):
            names += ["transformer.ln_f.weight"] * len(layer.params())
        elif isinstance(layer, dlfs.Residual):
            attn = any(isinstance(s, dlfs.SelfAttention) for s in layer.layers)
            block += attn
            p = f"transformer.h.{block}"
            denses = iter(("c_fc", "c_proj"))
            for s in layer.layers:
                if isinstance(s, dlfs.LayerNorm):
                    names.append(f"{p}.ln_1.weight" if attn else f"{p}.ln_2.weight")
                elif isinstance(s, dlfs.SelfAttention):
                    names += [f"{p}.attn.c_attn.weight", f"{p}.attn.c_proj.weight"]
                elif isinstance(s, dlfs.Dense):
                    names.append(f"{p}.mlp.{next(denses)}.weight")
    if len(names) != len(tied.params()):
        raise SystemExit(f"unexpected GPT structure: {len(tied.params())} arrays, named {names}")
    return names


def init_weights(names: list[str], shapes: list[tuple], seed: int, dtype) -> list[np.ndarray]:
    """nanoGPT's init in dlfs's layout: LayerNorm weights 1, every matrix N(0, 0.02),
    the attention's and the MLP's c_proj N(0, 0.02 / sqrt(2 n_layer))."""
    rng = np.random.default_rng([seed, 23])
    out = []
    for name, shape in zip(names, shapes):
        if len(shape) == 1:
            out.append(np.ones(shape, dtype))
            continue
        std = 0.02 / math.sqrt(2 * N_LAYER) if name.endswith("c_proj.weight") else 0.02
        out.append((rng.standard_normal(shape) * std).astype(dtype))
    return out


def torch_layout(name: str, a: np.ndarray) -> np.ndarray:
    """dlfs's (D_in, D_out) Linear weights are the transpose of torch's (out, in)."""
    return a.T if name.split(".")[-2] in ("c_attn", "c_proj", "c_fc") else a


# ------------------------------------------------------------ one worker


def peak_rss() -> int:
    """This process's peak resident set size so far, in bytes (Linux: KiB; macOS: bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def dlfs_trainer(init: dict[str, np.ndarray], v: int, dtype, seed: int):
    import dlfs

    net = dlfs_gpt(v, dtype)
    names = param_names(net)
    if names != list(init):
        raise SystemExit(f"parameter names differ from the initial weights': {names}")
    net = net.with_params((tuple(init[n] for n in names),))
    opt = dlfs.AdamW(
        LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WD, weight_decay_mask="matrices"
    )
    state = dlfs.TrainState.create(net, dlfs.chain(dlfs.ClipByGlobalNorm(CLIP), opt), key=seed)

    def step(x: np.ndarray, y: np.ndarray) -> float:
        nonlocal state
        before, seen = state.loss_sum, state.seen
        state = dlfs.train_step(state, (x, y))
        return (state.loss_sum - before) / (state.seen - seen)

    return step


def torch_model(v: int):
    """nanoGPT's GPT as plain torch modules (pre-LN, tied wte / lm_head, no biases)."""
    import torch
    from torch import nn
    from torch.nn import functional as F  # noqa: N812

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_attn = nn.Linear(D, 3 * D, bias=False)
            self.c_proj = nn.Linear(D, D, bias=False)

        def forward(self, x):
            n, t, d = x.shape
            q, k, w = (
                a.view(n, t, N_HEAD, d // N_HEAD).transpose(1, 2)
                for a in self.c_attn(x).split(d, dim=2)
            )
            y = F.scaled_dot_product_attention(q, k, w, is_causal=True)
            return self.c_proj(y.transpose(1, 2).contiguous().view(n, t, d))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln_1 = nn.LayerNorm(D, bias=False)
            self.attn = Attention()
            self.ln_2 = nn.LayerNorm(D, bias=False)
            self.mlp = nn.Sequential()
            self.mlp.add_module("c_fc", nn.Linear(D, 4 * D, bias=False))
            self.mlp.add_module("gelu", nn.GELU())
            self.mlp.add_module("c_proj", nn.Linear(4 * D, D, bias=False))

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = nn.ModuleDict(
                dict(
                    wte=nn.Embedding(v, D),
                    wpe=nn.Embedding(T, D),
                    h=nn.ModuleList(Block() for _ in range(N_LAYER)),
                    ln_f=nn.LayerNorm(D, bias=False),
                )
            )
            self.lm_head = nn.Linear(D, v, bias=False)
            self.transformer.wte.weight = self.lm_head.weight  # one tied parameter

        def forward(self, idx, targets):
            tr = self.transformer
            x = tr.wte(idx) + tr.wpe(torch.arange(idx.shape[1]))
            for block in tr.h:
                x = block(x)
            logits = self.lm_head(tr.ln_f(x))
            return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))

    return GPT()


def torch_trainer(init: dict[str, np.ndarray], v: int, dtype, threads: int):
    import torch

    torch.set_num_threads(threads)
    model = torch_model(v).to(torch.float64 if dtype == np.float64 else torch.float32)
    own = dict(model.named_parameters())
    if sorted(own) != sorted(init):
        raise SystemExit(f"torch's parameters {sorted(own)} != the initial weights'")
    with torch.no_grad():
        for name, a in init.items():
            own[name].copy_(torch.from_numpy(np.ascontiguousarray(torch_layout(name, a))))
    groups = [
        {"params": [p for p in own.values() if p.dim() >= 2], "weight_decay": WD},
        {"params": [p for p in own.values() if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS)
    model.train()

    def step(x: np.ndarray, y: np.ndarray) -> float:
        loss = model(torch.from_numpy(x), torch.from_numpy(y))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def worker(args: argparse.Namespace) -> int:
    """Warm up, then time ``--steps`` training steps; print ``key=value`` lines."""
    dtype = np.dtype(args.dtype)
    ids, v, desc = token_stream(args.text, args.seed)
    batches = windows(ids, args.seed, args.warmup + args.steps)
    with np.load(args.init, allow_pickle=False) as npz:
        init = {str(name): npz[f"p{i}"] for i, name in enumerate(npz["names"])}
    if args.worker == "torch":
        import torch  # its import before the baseline, as dlfs's before dlfs's

        h.emit("torch", torch.__version__)
    else:
        import dlfs  # noqa: F401
    base = peak_rss()
    if args.worker == "dlfs":
        step = dlfs_trainer(init, v, dtype, args.seed)
    else:
        step = torch_trainer(init, v, dtype, args.threads[0])
    losses = [step(x, y) for x, y in batches[: args.warmup]]
    start = time.perf_counter()
    for x, y in batches[args.warmup :]:
        losses.append(step(x, y))
    elapsed = time.perf_counter() - start
    h.emit("impl", args.worker)
    h.emit("data", desc)
    h.emit("ms_per_iter", elapsed / args.steps * 1000)
    h.emit("samples_per_s", args.steps * BATCH / elapsed)
    h.emit("tokens_per_s", args.steps * BATCH * T / elapsed)
    h.emit("train_loss", f"{losses[-1]:.6f}")
    h.emit("losses", ",".join(repr(float(v)) for v in losses))
    h.emit("base_rss_mib", base / MIB)
    h.emit("peak_rss_mib", peak_rss() / MIB)
    return 0


# ------------------------------------------------------------ the parent


def write_init(path: Path, v: int, dtype, seed: int) -> list[str]:
    """Draw the initial weights once (dlfs's layout) into ``path``; their names."""
    net = dlfs_gpt(v, dtype)
    names = param_names(net)
    arrays = init_weights(names, [p.shape for p in net.params()[0]], seed, dtype)
    np.savez(path, names=np.array(names), **{f"p{i}": a for i, a in enumerate(arrays)})
    return names


def compare_losses(prefix: str, runs: dict[str, list[h.Run]], dtype: str) -> None:
    """Both contenders' per-step losses (round 1) side by side and their largest difference."""
    losses = {n: [float(v) for v in rs[0].values["losses"].split(",")] for n, rs in runs.items()}
    for name, rs in runs.items():
        same = all(r.values["losses"] == rs[0].values["losses"] for r in rs)
        h.emit(f"{prefix}_{name}_losses_same_every_round", same)
        h.emit(f"{prefix}_{name}_first_losses", ",".join(f"{v:.7f}" for v in losses[name][:5]))
    if len(losses) == 2:
        diff = np.abs(np.subtract(losses["dlfs"], losses["torch"]))
        tol = 1e-4 if dtype == "float32" else 1e-10
        h.emit(f"{prefix}_loss_max_abs_diff_first10", float(diff[:10].max()))
        h.emit(f"{prefix}_loss_max_abs_diff_all_{len(diff)}_steps", float(diff.max()))
        h.emit(f"{prefix}_losses_agree_within_{tol:g}_first10", bool(diff[:10].max() <= tol))


def bench(threads: int, impls: list[str], args: argparse.Namespace, init: Path) -> None:
    prefix = f"t{threads}"
    common = ["--threads", str(threads), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    common += ["--seed", str(args.seed), "--dtype", args.dtype, "--init", str(init)]
    common += ["--text", args.text] if args.text else []
    cmds = {n: [sys.executable, __file__, "--worker", n, *common] for n in impls}
    runs = h.interleave(cmds, args.rounds, show=("ms_per_iter", "peak_rss_mib", "train_loss"))
    for n in impls:
        for key in ("ms_per_iter", "tokens_per_s", "samples_per_s", "peak_rss_mib"):
            h.emit(f"{prefix}_{n}_{key}", h.median_of(runs[n], key))
        train = statistics.median(
            r.number("peak_rss_mib") - r.number("base_rss_mib") for r in runs[n]
        )
        h.emit(f"{prefix}_{n}_train_rss_mib", train)
    if len(impls) == 2:
        ratios = [
            a.number("tokens_per_s") / b.number("tokens_per_s")
            for a, b in zip(runs["dlfs"], runs["torch"])
        ]
        h.emit(f"{prefix}_speed_ratio_dlfs_over_torch", statistics.median(ratios))
        h.emit(f"{prefix}_speed_ratio_min", min(ratios))
        h.emit(f"{prefix}_speed_ratio_max", max(ratios))
        h.emit(
            f"{prefix}_memory_ratio_dlfs_over_torch",
            h.paired_ratio(runs["dlfs"], runs["torch"], "peak_rss_mib"),
        )
        extra = [
            (a.number("peak_rss_mib") - a.number("base_rss_mib"))
            / (b.number("peak_rss_mib") - b.number("base_rss_mib"))
            for a, b in zip(runs["dlfs"], runs["torch"])
        ]
        h.emit(f"{prefix}_train_memory_ratio_dlfs_over_torch", statistics.median(extra))
    compare_losses(prefix, runs, args.dtype)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="default: 1 2")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per run (default 30)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (default 10)")
    p.add_argument("--text", help="train on this file's characters (default: synthetic ids)")
    p.add_argument("--seed", type=int, default=0, help="initial weights and batches (default 0)")
    p.add_argument("--only", nargs="+", choices=("dlfs", "torch"), help="contenders (default both)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--worker", choices=("dlfs", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--init", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.warmup < 0 or min(args.threads) < 1:
        p.error("--rounds, --steps and --threads must be >= 1, --warmup >= 0")
    if args.worker:
        return worker(args)
    impls = list(args.only or ("dlfs", "torch"))
    if "torch" in impls and not h.torch_available():
        print("# torch is not installed: PyTorch skipped (pip install -e '.[bench]')")
        impls.remove("torch")
    h.emit("command", " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    h.emit("workload", f"gpt T={T} D={D} layers={N_LAYER} heads={N_HEAD} batch={BATCH}")
    h.emit("optimizer", f"AdamW lr={LR} betas={BETAS} eps={EPS} wd={WD} (ndim>=2) clip={CLIP}")
    h.emit("dtype", args.dtype)
    h.emit("contenders", ",".join(impls))
    h.emit("steps", args.steps)
    h.emit("warmup", args.warmup)
    h.emit("rounds", args.rounds)
    h.print_machine()
    h.emit("load_start", h.load_avg())
    _, v, desc = token_stream(args.text, args.seed)
    h.emit("data", desc)
    h.emit("vocab", v)
    with tempfile.TemporaryDirectory() as tmp:
        init = Path(tmp) / "init.npz"
        names = write_init(init, v, np.dtype(args.dtype), args.seed)
        h.emit("param_arrays", len(names))
        with np.load(init) as npz:
            h.emit("params", sum(npz[f"p{i}"].size for i in range(len(names))))
        for threads in args.threads:
            bench(threads, impls, args, init)
    h.emit("load_end", h.load_avg())
    return 0


if __name__ == "__main__":
    sys.exit(main())
