"""Multi-process set-up and the step-by-step agreement that jitted collectives need.

In a multi-process run every process calls the same jitted step with a global array
assembled from each process's local batch. All processes must therefore agree, at every
step, on the batch shape and on whether there is a step at all. Each process reads a
different share of the data, so with bucketing their local bucket lengths differ and
at the end of an evaluation one process may run out of batches before another.
``aligned_batches`` settles both with one small all-gather per step: the batch is padded
to the longest bucket among the processes (padding never changes the logits), and a
process without data contributes a zero-weight copy of its last batch until every
process is done.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from adaptive_jax import sequence

_initialized = False


def initialize(config: ml_collections.ConfigDict) -> None:
    """Start ``jax.distributed`` with the settings in ``config.distributed``, if enabled.

    ``config.distributed.enabled`` turns it on. The coordinator address, process count
    and process id come from the config when set; unset ones are left to
    ``jax.distributed.initialize``, which reads them from the environment (the
    ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` variables,
    or the cluster's own, for example on Cloud TPU or SLURM).
    """
    global _initialized
    dist = config.distributed
    if not dist.enabled or _initialized:
        return
    kwargs = {}
    if dist.coordinator_address:
        kwargs["coordinator_address"] = dist.coordinator_address
    if dist.num_processes is not None:
        kwargs["num_processes"] = dist.num_processes
    if dist.process_id is not None:
        kwargs["process_id"] = dist.process_id
    if "JAX_NUM_PROCESSES" in os.environ and "num_processes" not in kwargs:
        kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
    if "JAX_PROCESS_ID" in os.environ and "process_id" not in kwargs:
        kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
    _initialized = True
    logging.info(
        "jax.distributed started: process %d of %d, %d local and %d global devices.",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )


def _zero_weight(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {**batch, "weight": np.zeros_like(batch["weight"])}


def aligned_batches(
    batches: Iterator[dict[str, np.ndarray]],
) -> Iterator[dict[str, np.ndarray]]:
    """Yield batches whose shapes and count agree across all processes.

    With one process the batches pass through unchanged. Otherwise the processes
    exchange, per step, whether they have a batch and its token length. The step runs
    while any process has data, and every batch is padded to the longest length.
    """
    if jax.process_count() == 1:
        yield from batches
        return
    last = None
    iterator = iter(batches)
    while True:
        local = next(iterator, None)
        has_data = local is not None
        if has_data:
            last = local
        elif last is not None:
            local = _zero_weight(last)
        length = local["patch_index"].shape[1] if local is not None and "token_mask" in local else 0
        gathered = np.asarray(
            multihost_utils.process_allgather(np.asarray([has_data, length], np.int64))
        )
        if not gathered[:, 0].any():
            return
        if local is None:
            raise RuntimeError(
                f"Process {jax.process_index()} has no data at all while others do; give each "
                "process at least one batch (a smaller batch size or more data)."
            )
        target = int(gathered[:, 1].max())
        if "token_mask" in local and target > length:
            local = sequence.pad_to_length(local, target)
        yield local
