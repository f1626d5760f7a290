"""Independent runs (seeds, a hyperparameter grid) as Dask tasks; shared by
``boston.py`` and ``sweep.py``.

Each run is one task ``fn(shared, *args)``: ``shared`` (the data) is scattered
to the workers once, not shipped with every task.  By default the tasks go to
a ``LocalCluster`` of ``workers`` processes with one thread each (numpy work
holds the GIL often enough that processes, not threads, give a speed-up);
``scheduler="tcp://host:8786"`` sends them to a running cluster instead,
whose workers must be able to import ``dlfs`` and the example's module (for
instance ``client.upload_file`` or a shared checkout on ``PYTHONPATH``).

Results come back in the order of ``arg_list``, whatever order the tasks
finish in, so a parallel run prints and writes exactly what the sequential
one does.  A tqdm bar on stderr counts finished tasks.  Needs the
``distributed`` extra: ``pip install -e ".[distributed]"``.
"""

from __future__ import annotations

import contextlib
import csv
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def map_tasks(
    fn: Callable[..., Any],
    shared: Any,
    arg_list: Sequence[tuple],
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    desc: str = "tasks",
) -> list[Any]:
    """``[fn(shared, *args) for args in arg_list]``, computed as Dask tasks."""
    from dask.distributed import Client, LocalCluster, as_completed
    from tqdm import tqdm

    with contextlib.ExitStack() as stack:
        if scheduler is not None:
            client = stack.enter_context(Client(scheduler))
        else:
            cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                # None: no dashboard, as dask documents; its signature infers str from ":8787"
                dashboard_address=None,  # pyright: ignore[reportArgumentType]
            )
            stack.enter_context(cluster)
            client = stack.enter_context(Client(cluster))
        data = client.scatter(shared, broadcast=True)
        futures = [client.submit(fn, data, *args, pure=False) for args in arg_list]
        position = {future.key: i for i, future in enumerate(futures)}
        results: list[Any] = [None] * len(futures)
        with tqdm(total=len(futures), desc=desc, file=sys.stderr) as bar:
            for future in as_completed(futures):
                results[position[future.key]] = future.result()
                bar.update(1)
    return results


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """One line per run, columns from the first row's keys; floats at full precision
    (``repr``), so equal runs give byte-identical files."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
    print(f"wrote {len(rows)} runs to {path}")
