"""Input pipeline speed against the speed of the train step it feeds.

    python -m experiments.input_pipeline --config=configs/cifar10.py \\
        --config.dataset=imagefolder:/data/cifar10 --batches=30 --rounds=3 \\
        --out=runs/input_pipeline.json

Builds the training pipeline and the jitted train step of a config, as
``adaptive_jax.main`` does, and times three things in alternating rounds of ``--batches``
batches each:

- pipeline: the host pipeline alone (decode, augment, score and tile, bucket or pack).
  Each round starts after ``--drain`` untimed batches have emptied its buffers.
- step: the train step alone, on batches already on the device.
- fed: the training loop as it runs, with the prefetching pipeline feeding the step.

It reports batches per second of each, as the median over rounds, and the share of
pipeline time spent in scoring and tiling. ``pipeline_over_step`` is how many times
faster the pipeline makes batches than the step consumes them. Below 1, the device waits
for data. ``fed_over_step`` is the fraction of the step's speed that the real loop keeps.
The pipeline and the step share this machine's cores when fed, so it also shows their
contention.
Compilation and the first fill of the shuffle buffer fall in warm-up batches and are not
timed.
"""

from __future__ import annotations

import functools
import itertools
import logging
import pathlib
import statistics
import sys
import time
from collections.abc import Iterator

import jax
from absl import app, flags
from ml_collections import config_flags

from adaptive_jax import config as config_lib
from adaptive_jax import train
from adaptive_jax.data import InputPipeline, prefetch
from experiments.reporting import command_line, utc_now, write_report
from experiments.throughput import describe_machine

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, optionally FILE:ARG.", lock_config=True)
flags.DEFINE_integer("batches", 30, "Batches per timed round of each kind.")
flags.DEFINE_integer("rounds", 3, "Timed rounds; each times pipeline, step and fed once.")
flags.DEFINE_integer("warmup", 5, "Untimed batches before the first round.")
flags.DEFINE_integer(
    "drain", 20, "Untimed batches drawn before each pipeline round, to empty the buffers "
    "that filled while the step ran.")
flags.DEFINE_string("out", None, "JSON report path; printed when omitted.")
flags.mark_flags_as_required(["config"])

logger = logging.getLogger("input_pipeline")


class TimedSelector:
    """Wrap a host selector and add up the seconds spent in it."""

    def __init__(self, selector):
        self.selector = selector
        self.seconds = 0.0

    def __call__(self, images):
        start = time.perf_counter()
        masks = self.selector(images)
        self.seconds += time.perf_counter() - start
        return masks


def shape_key(batch: dict) -> tuple:
    """Return the (name, shape) pairs of a batch, which decide the compiled program."""
    return tuple(sorted((name, value.shape) for name, value in batch.items()))


def time_pipeline(batches: Iterator, n: int) -> tuple[float, list]:
    """Return the seconds to draw ``n`` batches and the batches themselves."""
    start = time.perf_counter()
    drawn = list(itertools.islice(batches, n))
    return time.perf_counter() - start, drawn


def time_steps(train_fn, state, device_batches: list) -> tuple[float, object]:
    """Return the seconds ``train_fn`` takes over ``device_batches`` and the new state."""
    start = time.perf_counter()
    metrics = None
    for batch in device_batches:
        state, metrics = train_fn(state, batch)
    jax.block_until_ready(metrics)
    return time.perf_counter() - start, state


def time_fed(train_fn, state, batches: Iterator, n: int, to_device) -> tuple[float, object]:
    """Return the seconds of ``n`` steps fed by a prefetch thread over ``batches``."""
    start = time.perf_counter()
    metrics = None
    for batch in prefetch(itertools.islice(batches, n), transform=to_device):
        state, metrics = train_fn(state, batch)
    jax.block_until_ready(metrics)
    return time.perf_counter() - start, state


def run(config, num_batches: int, rounds: int, warmup: int, drain: int) -> dict:
    config_lib.validate_config(config)
    pipeline = InputPipeline(config)
    selector = None
    if pipeline.host_selection:
        selector = TimedSelector(pipeline.selector)
        pipeline.selector = selector
    model = train.create_model(config, pipeline.num_classes)
    tx = train.create_optimizer(config)
    mesh = train.make_mesh({"batch_size": config.batch_size})
    data_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    to_device = functools.partial(train.to_global, sharding=data_sharding)
    init = jax.jit(
        functools.partial(train.init_state, config=config, model=model, tx=tx),
        out_shardings=replicated,
    )
    state = init(jax.random.PRNGKey(config.seed))
    train_fn = train.jit_train_step(config, model, tx, mesh)
    batches = pipeline.train_batches(seed=config.seed)

    # Warm-up: fill the shuffle buffer and compile one program per batch shape that the
    # first round's batches contain, so no timed step compiles.
    logger.info("Warm-up: %d batches, then compiling the train step for each batch shape", warmup)
    _, warm = time_pipeline(batches, warmup)
    _, reference = time_pipeline(batches, num_batches)
    shapes = {}
    for batch in warm + reference:
        shapes.setdefault(shape_key(batch), batch)
    for batch in shapes.values():
        state, metrics = train_fn(state, to_device(batch))
    jax.block_until_ready(metrics)
    device_batches = [to_device(batch) for batch in reference]

    timings = {"pipeline": [], "step": [], "fed": []}
    selection_seconds = 0.0
    for r in range(rounds):
        # Drawn untimed: tf.data and the host stages keep filling their buffers while the
        # step runs, and those ready batches would otherwise count as instant.
        for _ in itertools.islice(batches, drain):
            pass
        selected_before = selector.seconds if selector is not None else 0.0
        seconds, drawn = time_pipeline(batches, num_batches)
        timings["pipeline"].append(seconds)
        if selector is not None:
            selection_seconds += selector.seconds - selected_before
        # A batch shape not seen before would compile inside the timed fed round.
        for batch in drawn:
            key = shape_key(batch)
            if key not in shapes:
                shapes[key] = batch
                state, _ = train_fn(state, to_device(batch))
        seconds, state = time_steps(train_fn, state, device_batches)
        timings["step"].append(seconds)
        seconds, state = time_fed(train_fn, state, batches, num_batches, to_device)
        timings["fed"].append(seconds)
        logger.info(
            "round %d: pipeline %.2f s, step %.2f s, fed %.2f s for %d batches",
            r + 1, timings["pipeline"][-1], timings["step"][-1], timings["fed"][-1], num_batches,
        )

    rates = {name: num_batches / statistics.median(values) for name, values in timings.items()}
    return {
        "pipeline_batches_per_s": rates["pipeline"],
        "step_batches_per_s": rates["step"],
        "fed_batches_per_s": rates["fed"],
        "pipeline_over_step": rates["pipeline"] / rates["step"],
        "fed_over_step": rates["fed"] / rates["step"],
        # Images are scored and tiled in chunks of config.selection_chunk, so one round
        # may hold no selection call; the share is taken over all rounds together.
        "selection_fraction_of_pipeline": selection_seconds / sum(timings["pipeline"]),
        "batch_size": config.batch_size,
        "batch_shapes": len(shapes),
        "batches_per_round": num_batches,
        "drained_batches_per_round": drain,
        "rounds": rounds,
        "round_seconds": timings,
        "selection": pipeline.describe_selection(),
        "dataset": config.dataset,
        "machine": describe_machine(),
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        force=True)
    if FLAGS.batches < 1 or FLAGS.rounds < 1 or FLAGS.warmup < 0 or FLAGS.drain < 0:
        raise app.UsageError(
            f"--batches={FLAGS.batches}, --rounds={FLAGS.rounds}, --warmup={FLAGS.warmup} and "
            f"--drain={FLAGS.drain}: give at least 1 batch and 1 round, and a warm-up and "
            "drain of 0 or more."
        )
    result = run(FLAGS.config, FLAGS.batches, FLAGS.rounds, FLAGS.warmup, FLAGS.drain)
    result["command"] = command_line("experiments.input_pipeline", sys.argv[1:])
    result["date"] = utc_now()
    print(
        f"pipeline {result['pipeline_batches_per_s']:.2f} batches/s, "
        f"step {result['step_batches_per_s']:.2f}, fed {result['fed_batches_per_s']:.2f}; "
        f"pipeline/step {result['pipeline_over_step']:.2f}x, "
        f"scoring and tiling {100 * result['selection_fraction_of_pipeline']:.1f} % of the pipeline"
    )
    write_report(result, pathlib.Path(FLAGS.out) if FLAGS.out else None, logger)


if __name__ == "__main__":
    app.run(main)
