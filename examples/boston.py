"""The Boston housing experiment of *Deep Learning from Scratch*, chapter 3, with dlfs.

Three models on the book's split and settings: linear regression, one hidden
layer of 13 sigmoids, and two hidden layers of 13 sigmoids; weights and biases
drawn from a standard normal as in the book; MSE = sum of squared errors / N;
SGD(lr=0.01), batch 32, 50 epochs, evaluated on the test split every 10 epochs
with the book's early stopping.  Prints MAE/RMSE beside the book's figures and
ends with ``key=value`` lines.

    python examples/boston.py              # the book's seed, 20190501
    python examples/boston.py --seeds 30   # also mean +- std over 30 seeds
    python examples/boston.py --seeds 30 --workers 2 --csv runs.csv   # seeds as Dask tasks

``--workers N`` runs the seeds as Dask tasks on a LocalCluster of N processes
(``--scheduler ADDRESS``: on a running cluster); every seed's results are
bit-identical to the sequential run's, so the printout is the same.
``--csv PATH`` writes every run (seed, model, MAE, RMSE, best epoch).

Needs scikit-learn (StandardScaler, train_test_split): ``pip install -e ".[examples]"``;
Dask and tqdm for ``--workers``/``--scheduler``: ``pip install -e ".[distributed]"``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from _help import Defaults  # examples/_help.py: --help shows the defaults

try:
    import dlfs
except ModuleNotFoundError:  # not installed: use the dlfs.py next to examples/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import dlfs

DATA = Path(__file__).resolve().parent / "data" / "boston_house_prices.csv"

# The book's printed MAE / RMSE (chapter 3) and our target: RMSE no worse than book + 5%.
BOOK = {"linear": (3.52, 5.01), "nn": (2.60, 4.03), "dl": (2.45, 3.83)}
TITLES = {
    "linear": "linear regression",
    "nn": "1 hidden layer (13 sigmoid)",
    "dl": "2 hidden layers (13 sigmoid)",
}


def model_layers(name: str) -> list[dlfs.DenseSpec]:
    """The book's three models; weights and biases ~ N(0, 1) as in chapter 3."""
    hidden = {"linear": 0, "nn": 1, "dl": 2}[name]
    return [
        dlfs.dense(n, activation, init=dlfs.normal, bias_init=dlfs.normal)
        for n, activation in [(13, dlfs.Sigmoid())] * hidden + [(1, None)]
    ]


def load_data(path: Path) -> tuple[np.ndarray, ...]:
    """The book's preprocessing: scale all features, then the 70/30 split of seed 80718."""
    # scikit-learn comes with the `examples` extra, which CI (and so its pyright) has not
    from sklearn.model_selection import train_test_split  # pyright: ignore[reportMissingImports]
    from sklearn.preprocessing import StandardScaler  # pyright: ignore[reportMissingImports]

    raw = np.genfromtxt(path, delimiter=",", skip_header=2)
    if raw.ndim != 2 or raw.shape[1] != 14:
        raise ValueError(f"{path}: expected 14 columns (13 features + MEDV), got {raw.shape}")
    x = StandardScaler().fit_transform(raw[:, :13])
    x_train, x_test, y_train, y_test = (  # np.asarray: the same arrays, typed as arrays
        np.asarray(a) for a in train_test_split(x, raw[:, 13], test_size=0.3, random_state=80718)
    )
    return x_train, x_test, dlfs.to_2d(y_train), dlfs.to_2d(y_test)


def train(
    name: str, data: tuple[np.ndarray, ...], seed: int, epochs: int
) -> tuple[dlfs.Network, dlfs.History]:
    """Build model ``name`` from ``seed`` and fit it the way the book's Trainer does."""
    x_train, x_test, y_train, y_test = data
    init_key, fit_key = dlfs.split(seed, 2)
    net = dlfs.network(init_key, 13, model_layers(name), dlfs.MeanSquaredError(), dtype=np.float64)
    return dlfs.fit(
        net,
        dlfs.SGD(lr=0.01),
        x_train,
        y_train,
        epochs=epochs,
        batch_size=32,
        validation=(x_test, y_test),  # the book validates on its test split
        eval_every=10,
        seed=fit_key,
        early_stopping=True,
        patience=1,
    )


def evaluate(net: dlfs.Network, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(MAE, RMSE) of the network's predictions."""
    pred = net.predict(x)
    return dlfs.mae(pred, y), dlfs.rmse(pred, y)


def run_seed(
    data: tuple[np.ndarray, ...], seed: int, epochs: int
) -> dict[str, tuple[float, float, dlfs.Network, dlfs.History]]:
    """Train all three models from ``seed``; name -> (mae, rmse, net, history)."""
    out = {}
    for name in BOOK:
        net, hist = train(name, data, seed, epochs)
        out[name] = (*evaluate(net, data[1], data[3]), net, hist)
    return out


def run_seeds(
    data: tuple[np.ndarray, ...],
    seeds: Sequence[int],
    epochs: int,
    workers: int | None = None,
    scheduler: str | None = None,
) -> list[dict[str, tuple[float, float, dlfs.Network, dlfs.History]]]:
    """``run_seed`` for each seed, in seed order: in this process, or as Dask tasks
    (``workers`` local processes, or the cluster at ``scheduler``)."""
    if workers is None and scheduler is None:
        return [run_seed(data, s, epochs) for s in seeds]
    from dask_runs import map_tasks  # optional: only the parallel path needs Dask

    args = [(s, epochs) for s in seeds]
    return map_tasks(run_seed, data, args, workers=workers, scheduler=scheduler, desc="seeds")


def print_table(results: dict[str, tuple[float, float, dlfs.Network, dlfs.History]]) -> None:
    print(f"{'model':<30} {'MAE':>6} {'RMSE':>6}   {'book MAE':>8} {'book RMSE':>9}   target")
    for name, (m, r, _, hist) in results.items():
        book_mae, book_rmse = BOOK[name]
        limit = book_rmse * 1.05
        ok = "ok" if r <= limit else "MISSED"
        print(
            f"{TITLES[name]:<30} {m:6.2f} {r:6.2f}   {book_mae:8.2f} {book_rmse:9.2f}"
            f"   RMSE <= {limit:.2f} {ok}  (best epoch {hist.best_epoch})"
        )


def save_plot(path: str, results: dict, data: tuple[np.ndarray, ...]) -> None:
    import matplotlib  # optional: imported only when --plot is given

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_test, y_test = data[1], data[3]
    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 4), sharey=True)
    lo, hi = float(y_test.min()), float(y_test.max())
    for ax, (name, (m, r, net, _)) in zip(axes, results.items()):
        ax.scatter(y_test[:, 0], net.predict(x_test)[:, 0], s=8, alpha=0.6)
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set_title(f"{TITLES[name]}\nMAE {m:.2f}  RMSE {r:.2f}", fontsize=9)
        ax.set_xlabel("actual MEDV ($1000s)")
    axes[0].set_ylabel("predicted MEDV ($1000s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"saved plot to {path}")


def write_runs(path: Path, seeds: Sequence[int], runs: list[dict]) -> None:
    from dask_runs import write_csv  # plain csv; dask_runs imports Dask only when it runs tasks

    rows = [
        {"seed": s, "model": name, "mae": m, "rmse": r, "best_epoch": hist.best_epoch}
        for s, run in zip(seeds, runs)
        for name, (m, r, _, hist) in run.items()
    ]
    write_csv(path, rows)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").partition("\n")[0],
        formatter_class=Defaults,
    )
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--seed", type=int, default=20190501, help="the book's seed")
    parser.add_argument("--data", type=Path, default=DATA, help="boston_house_prices.csv")
    parser.add_argument(
        "--seeds", type=int, default=1, help="also report mean +- std over seeds seed..seed+K-1"
    )
    parser.add_argument("--plot", default=None, help="save predicted-vs-actual to this PNG")
    parser.add_argument("--csv", type=Path, help="write every run (seed, model, MAE, RMSE) here")
    parser.add_argument(
        "--workers", type=int, help="run the seeds as Dask tasks on a LocalCluster of N processes"
    )
    parser.add_argument("--scheduler", help="run the seeds on this Dask scheduler address")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.seeds < 1:
        parser.error("--epochs and --seeds must be >= 1")
    if args.workers is not None and (args.workers < 1 or args.scheduler is not None):
        parser.error("--workers must be >= 1, and not given with --scheduler")

    data = load_data(args.data)
    print(f"Boston housing: {len(data[0])} train / {len(data[1])} test rows, seed {args.seed}")
    seeds = range(args.seed, args.seed + args.seeds)
    parallel = args.workers is not None or args.scheduler is not None
    # Sequentially the book's seed runs first, so its table shows before the others run.
    runs = run_seeds(data, seeds, args.epochs, args.workers, args.scheduler) if parallel else []
    results = runs[0] if parallel else run_seed(data, args.seed, args.epochs)
    print_table(results)
    if args.plot:
        save_plot(args.plot, results, data)

    keys: dict[str, float] = {}
    for name, (m, r, _, _) in results.items():
        keys[f"{name}_mae"], keys[f"{name}_rmse"] = m, r
    if not parallel and (args.seeds > 1 or args.csv):
        runs = [results, *run_seeds(data, seeds[1:], args.epochs)]
    if args.csv:
        write_runs(args.csv, seeds, runs)
    if args.seeds > 1:
        rmses = {name: [run[name][1] for run in runs] for name in BOOK}
        print(
            f"\nRMSE over {args.seeds} seeds ({seeds.start}..{seeds.stop - 1}): mean +- sample std"
        )
        for name, values in rmses.items():
            mean, std = float(np.mean(values)), float(np.std(values, ddof=1))
            keys[f"{name}_rmse_mean"], keys[f"{name}_rmse_std"] = mean, std
            print(
                f"{TITLES[name]:<30} {mean:6.2f} +- {std:4.2f}"
                f"   (min {min(values):.2f}, max {max(values):.2f}; book RMSE {BOOK[name][1]:.2f})"
            )
    print()
    for key, value in keys.items():
        print(f"{key}={value:.4f}")
    return keys


if __name__ == "__main__":
    main()
