"""Executors that map a stage's per-chunk function: a local process pool, or Ray Data on a laptop or cluster.

A stage hands :func:`refface.stages.map_chunks` a pure, picklable ``fn(chunk) -> result`` and an
optional per-worker ``initializer``; an executor only decides *where* each chunk runs. Results
are yielded as ``(chunk_index, result)`` in completion order and put back in chunk order by
``map_chunks``, so outputs are identical whichever executor and worker count ran them. An
executor that cannot run raises; it never falls back to another one.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

Job = tuple[int, Sequence]
RAY_INSTALL = 'pip install "ray[data]"'


def uses_gpu(fraction: float = 1.0) -> Callable[[Callable], Callable]:
    """Declare that a per-chunk function can use ``fraction`` of a GPU per worker.

    The Ray executor requests that share of a GPU for each worker when the cluster has GPUs
    (several workers then share one device); on a cluster without GPUs the function runs on CPUs.
    The local executor ignores it.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"GPU fraction must be in (0, 1], got {fraction}")

    def mark(fn: Callable) -> Callable:
        fn.refface_gpus = float(fraction)  # type: ignore[attr-defined]
        return fn

    return mark


def declared_gpus(fn: Callable) -> float:
    """The GPU share ``fn`` declared with :func:`uses_gpu` (0 when none)."""
    return float(getattr(fn, "refface_gpus", 0.0))


@dataclass
class LocalExecutor:
    """Run chunks in this process (one worker) or on a spawned process pool (``workers`` > 1)."""

    name = "local"

    def run(
        self,
        fn: Callable[[Sequence], Any],
        jobs: Sequence[Job],
        workers: int = 1,
        initializer: Callable[..., None] | None = None,
        initargs: tuple = (),
    ) -> Iterator[tuple[int, Any]]:
        """Yield ``(chunk_index, fn(chunk))`` for every job, in completion order."""
        if workers <= 1 or len(jobs) <= 1:
            if initializer:
                initializer(*initargs)
            for i, chunk in jobs:
                yield i, fn(chunk)
            return
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=initializer, initargs=initargs) as pool:
            # Limit memory: at most 2 chunks in flight per worker.
            pending: dict = {}
            queue = list(jobs)
            while queue or pending:
                while queue and len(pending) < 2 * workers:
                    i, chunk = queue.pop(0)
                    pending[pool.submit(fn, chunk)] = i
                done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for future in sorted(done, key=lambda f: pending[f]):
                    yield pending.pop(future), future.result()


class _ChunkWorker:
    """Ray Data actor: runs the stage's initializer once, then ``fn`` on one chunk per batch."""

    def __init__(self, fn: Callable, initializer: Callable | None, initargs: tuple):
        self.fn = fn
        if initializer:
            initializer(*initargs)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        results = [pickle.dumps(self.fn(pickle.loads(p)), protocol=4) for p in batch["payload"]]
        out = np.empty(len(results), dtype=object)
        out[:] = results
        return {"chunk": np.asarray(batch["chunk"], dtype=np.int64), "result": out}


def import_ray():
    """Import ray, or raise ImportError naming the install line."""
    try:
        import ray
        import ray.data  # noqa: F401 - the executor needs Ray Data, not only the core
    except ImportError as e:
        raise ImportError(f"the ray executor needs Ray Data: {RAY_INSTALL}") from e
    return ray


def connect_ray(address: str | None = None, num_cpus: int | None = None):
    """Attach to Ray: an already initialized session, ``address`` / ``RAY_ADDRESS``, or a new local one.

    Args:
        address: a cluster address (``ray://host:10001`` or ``auto``); None reads ``RAY_ADDRESS``,
            and without it starts Ray on this machine.
        num_cpus: CPUs a new local Ray may use (None: all of them).

    Returns:
        The ``ray`` module, initialized.
    """
    ray = import_ray()
    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    return ray


@dataclass
class RayExecutor:
    """Ray Data ``map_batches`` over chunks, on an actor pool of ``workers`` actors.

    Why ``map_batches`` with an actor class and not plain tasks: a stage's workers load models
    once (the ``initializer``), which is exactly an actor's constructor; one batch is one
    chunk (``batch_size=1``), so the unit of work, the part files and the outputs stay those of
    the local executor. Chunks travel pickled in a binary column, results come back the same way
    and are written by the caller as they stream in (a killed run resumes per chunk).

    Attributes:
        address: Ray cluster address; None uses ``RAY_ADDRESS`` or starts a local Ray.
        num_cpus: CPUs of a new local Ray (None: all).
        num_gpus: GPUs per worker; None requests the function's :func:`uses_gpu` share when the
            cluster has GPUs. An explicit request on a cluster without GPUs raises.
        cpus_per_worker: CPUs reserved per actor.
    """

    address: str | None = None
    num_cpus: int | None = None
    num_gpus: float | None = None
    cpus_per_worker: float = 1.0
    name = "ray"

    def gpus_for(self, fn: Callable, cluster_gpus: float) -> float:
        """The GPU share each worker requests for ``fn`` on a cluster with ``cluster_gpus`` GPUs."""
        if self.num_gpus is not None:
            if self.num_gpus > 0 and cluster_gpus <= 0:
                raise RuntimeError(
                    f"{self.num_gpus} GPU(s) per worker requested but the Ray cluster has no GPUs; "
                    "start Ray on GPU nodes or request num_gpus=0"
                )
            return float(self.num_gpus)
        return declared_gpus(fn) if cluster_gpus > 0 else 0.0

    def run(
        self,
        fn: Callable[[Sequence], Any],
        jobs: Sequence[Job],
        workers: int = 1,
        initializer: Callable[..., None] | None = None,
        initargs: tuple = (),
    ) -> Iterator[tuple[int, Any]]:
        """Yield ``(chunk_index, fn(chunk))`` for every job, in completion order."""
        if not jobs:
            return
        ray = connect_ray(self.address, self.num_cpus)

        gpus = self.gpus_for(fn, float(ray.cluster_resources().get("GPU", 0)))
        context = ray.data.DataContext.get_current()
        # The caller shows one progress bar for the stage; Ray Data's own bars would interleave.
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        rows = [{"chunk": int(i), "payload": pickle.dumps(chunk, protocol=4)} for i, chunk in jobs]
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
        remote_args: dict[str, Any] = {"num_cpus": self.cpus_per_worker}
        if gpus > 0:
            remote_args["num_gpus"] = gpus
        results = dataset.map_batches(
            _ChunkWorker,
            fn_constructor_args=(fn, initializer, tuple(initargs)),
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=max(1, min(int(workers), len(rows)))),
            **remote_args,
        )
        for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
            for i, payload in zip(batch["chunk"], batch["result"], strict=True):
                yield int(i), pickle.loads(payload)


EXECUTORS: dict[str, type] = {"local": LocalExecutor, "ray": RayExecutor}


def make_executor(executor: str | Any = "local"):
    """An executor instance from a name of ``EXECUTORS`` (or an instance, returned as is)."""
    if not isinstance(executor, str):
        if not callable(getattr(executor, "run", None)):
            raise TypeError(f"an executor needs a run() method, got {type(executor).__name__}")
        return executor
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    return EXECUTORS[executor]()
