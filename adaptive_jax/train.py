"""Training and evaluation loop: pure step functions, mesh shardings, orbax, metrics.

Resume order: on start, the latest checkpoint in ``workdir/checkpoints`` (if any) is
checked against this config's model, then parameters, optimizer state, step and RNG are
restored and training continues at the next step; the input pipeline is reseeded from the
restored step, so a resumed run does not replay the batches it already trained on.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax.metrics import tensorboard
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from adaptive_jax import config as config_lib
from adaptive_jax import distributed, profiling
from adaptive_jax.data import InputPipeline, prefetch
from adaptive_jax.models import AdaptiveViT
from adaptive_jax.models.learned import LearnedSelectionViT

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    """Build the configured classifier: ``AdaptiveViT``, or ``LearnedSelectionViT``."""
    m = config.model
    kwargs = dict(
        num_classes=num_classes,
        image_size=config_lib.model_image_size(config),
        patch_sizes=tuple(config.patch_sizes),
        hidden_size=m.hidden_size,
        depth=m.depth,
        num_heads=m.num_heads,
        mlp_dim=m.mlp_dim,
        pool=m.pool,
        embed_mode=m.embed_mode,
        dropout_rate=m.dropout_rate,
    )
    if uses_learned_selector(config):
        return LearnedSelectionViT(budget=config.selection.budget, **kwargs)
    return AdaptiveViT(**kwargs)


def uses_learned_selector(config: ml_collections.ConfigDict) -> bool:
    return config.selection.scorer == "learned" and len(config.patch_sizes) > 1


def model_signature(config: ml_collections.ConfigDict, num_classes: int) -> dict[str, Any]:
    """Return the settings that fix the parameter shapes, to check checkpoints against."""
    return {
        "num_classes": int(num_classes),
        "image_size": list(config_lib.model_image_size(config)),
        "patch_sizes": list(config.patch_sizes),
        "learned_selector": uses_learned_selector(config),
        "model": config.model.to_dict(),
    }


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW with linear warm-up and cosine decay; no decay on biases, norms and vectors."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        # A warm-up longer than the run is cut short so the cosine part keeps one step.
        warmup_steps=min(config.warmup_steps, config.total_steps - 1),
        decay_steps=config.total_steps,
    )
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim > 1, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip_norm),
        optax.adamw(schedule, weight_decay=config.weight_decay, mask=decay_mask),
    )


def normalize_images(images: jax.Array) -> jax.Array:
    """Map uint8 pixels to [-1, 1]."""
    return images.astype(jnp.float32) * (2.0 / 255.0) - 1.0


def _apply(model: nn.Module, params, batch: Batch, *, train: bool, rng=None,
           budget: int | None = None) -> jax.Array:
    images = normalize_images(batch["image"])
    rngs = {"dropout": rng} if rng is not None else None
    if isinstance(model, LearnedSelectionViT):
        return model.apply({"params": params}, images, budget=budget, train=train, rngs=rngs)
    return model.apply(
        {"params": params}, images, batch.get("patch_index"), batch.get("token_mask"),
        segment_ids=batch.get("segment_ids"), train=train, rngs=rngs,
    )


def _tokens_per_example(model: nn.Module, batch: Batch, budget: int | None = None) -> jax.Array:
    """Return the token count of each image, shaped like ``batch['label']``."""
    if "segment_ids" in batch:
        slots = batch["label"].shape[1]
        ids = jnp.arange(1, slots + 1)
        return (batch["segment_ids"][:, :, None] == ids).sum(axis=1).astype(jnp.float32)
    if "token_mask" in batch:
        return batch["token_mask"].sum(axis=1).astype(jnp.float32)
    if isinstance(model, LearnedSelectionViT):
        n = model.budget if budget is None else budget
    else:
        p = model.patch_sizes[0]
        n = (model.image_size[0] // p) * (model.image_size[1] // p)
    return jnp.full(batch["label"].shape, n, jnp.float32)


def train_step(
    state: TrainState, batch: Batch, *, model: nn.Module, tx: optax.GradientTransformation,
    label_smoothing: float, axis_name: str | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """Take one optimizer step; returns the new state and metrics.

    Under ``jax.jit`` the batch is global and ``axis_name`` is None. Under ``jax.pmap``
    pass the mapped axis name: each device then holds its share of the batch, and loss,
    gradients and metrics are summed over devices before dividing by the global weight,
    so both forms compute the same step, also when devices hold different numbers of
    real examples.
    """
    rng, dropout_rng = jax.random.split(state.rng)
    weight = batch["weight"]

    def global_sum(x):
        return jax.lax.psum(x, axis_name) if axis_name else x

    total_weight = jnp.maximum(global_sum(weight.sum()), 1.0)
    if axis_name:
        dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))

    def loss_fn(params):
        logits = _apply(model, params, batch, train=True, rng=dropout_rng)
        targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], logits.shape[-1]), label_smoothing)
        losses = optax.softmax_cross_entropy(logits, targets)
        return (losses * weight).sum() / total_weight, logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    loss, grads = global_sum(loss), global_sum(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    correct = (logits.argmax(-1) == batch["label"]).astype(jnp.float32)
    tokens = _tokens_per_example(model, batch)
    metrics = {
        "train_loss": loss,
        "train_accuracy": global_sum((correct * weight).sum()) / total_weight,
        "grad_norm": optax.global_norm(grads),
        "train_tokens_per_image": global_sum((tokens * weight).sum()) / total_weight,
    }
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
    return new_state, metrics


def init_state(
    rng: jax.Array, *, config: ml_collections.ConfigDict, model: nn.Module,
    tx: optax.GradientTransformation,
) -> TrainState:
    """Return the step-0 state: fresh parameters, optimizer state and dropout key."""
    init_rng, state_rng = jax.random.split(rng)
    h, w = config_lib.model_image_size(config)
    params = model.init(init_rng, jnp.zeros((1, h, w, 3), jnp.float32))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=state_rng)


def jit_train_step(
    config: ml_collections.ConfigDict, model: nn.Module, tx: optax.GradientTransformation,
    mesh: Mesh,
) -> Callable:
    """Return ``train_step`` jitted over ``mesh``: replicated state, batch split on 'data'.

    The state argument is donated, so its buffers are reused for the new state.
    """
    return jax.jit(
        functools.partial(train_step, model=model, tx=tx, label_smoothing=config.label_smoothing),
        in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))),
        out_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P())),
        donate_argnums=(0,),
    )


def eval_step(
    params, batch: Batch, *, model: nn.Module, budget: int | None = None
) -> dict[str, jax.Array]:
    """Return weighted sums over a batch; rows with weight 0 are padding and count nothing.

    ``budget`` overrides the token budget of a learned selector.
    """
    logits = _apply(model, params, batch, train=False, budget=budget)
    weight = batch["weight"]
    correct = (logits.argmax(-1) == batch["label"]).astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return {
        "correct": (correct * weight).sum(),
        "loss": (losses * weight).sum(),
        "tokens": (_tokens_per_example(model, batch, budget) * weight).sum(),
        "examples": weight.sum(),
    }


def is_due(step: int, every: int, total_steps: int) -> bool:
    """Decide every periodic action: each ``every`` steps and always at the last step."""
    return step == total_steps or (every > 0 and step % every == 0)


class MetricWriter:
    """Write metrics to ``workdir/metrics.jsonl`` (one JSON object per line) and TensorBoard."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        if enabled:
            self._path = os.path.join(workdir, "metrics.jsonl")
            self._summary = tensorboard.SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        with open(self._path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in metrics.items():
            self._summary.scalar(key, float(value), step)
        self._summary.flush()

    def close(self) -> None:
        if self.enabled:
            self._summary.close()


class Checkpoints:
    """Orbax checkpoints of the train state plus the model signature that wrote them."""

    def __init__(self, directory: str, config: ml_collections.ConfigDict, signature: dict):
        self.directory = directory
        self.signature = signature
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep_checkpoints, create=True, enable_async_checkpointing=True
        )
        self.manager = ocp.CheckpointManager(directory, options=options, item_names=("state", "model"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, abstract_state: TrainState) -> TrainState:
        """Restore the latest state after checking that the same model wrote it."""
        step = self.manager.latest_step()
        saved = self.manager.restore(step, args=ocp.args.Composite(model=ocp.args.JsonRestore()))
        saved_signature = saved["model"]
        if saved_signature != json.loads(json.dumps(self.signature)):
            raise ValueError(
                f"The checkpoint at {self.directory} (step {step}) was written by another "
                f"model: saved {saved_signature}, configured {self.signature}. Use a new "
                "--workdir, or the model settings that wrote it."
            )
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
        return restored["state"]

    def save(self, step: int, state: TrainState, force: bool = False) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), model=ocp.args.JsonSave(self.signature)
            ),
            force=force,
        )

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class _StopRequest:
    """Set by SIGTERM (the usual preemption notice) so the loop saves and stops cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread, for example inside a notebook worker
            self._previous = None
        return self

    def _handle(self, signum, frame):
        logging.warning("Received signal %d; saving a checkpoint and stopping.", signum)
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def make_mesh(batch_sizes: dict[str, int]) -> Mesh:
    """Return a 1-D data-parallel mesh over all devices after checking batch divisibility."""
    devices = jax.devices()
    for key, size in batch_sizes.items():
        if size % len(devices):
            raise ValueError(
                f"{key}={size} is not divisible by the {len(devices)} devices; use a "
                f"multiple of {len(devices)}."
            )
    return Mesh(np.asarray(devices), ("data",))


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> Batch:
    """Turn this process's NumPy batch into global arrays split over ``sharding``."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def global_batches(local_batches: Iterator, sharding: NamedSharding) -> Iterator[Batch]:
    """Turn this process's batches into global arrays, prefetched in a background thread.

    With several processes, shape alignment runs collectives, so it happens on the
    calling thread in step order; only host-side batch assembly is prefetched.
    """
    if jax.process_count() == 1:
        return prefetch(local_batches, transform=functools.partial(to_global, sharding=sharding))
    aligned = distributed.aligned_batches(prefetch(local_batches))
    return (to_global(batch, sharding) for batch in aligned)


def evaluate(
    eval_fn: Callable, params, pipeline: InputPipeline, sharding: NamedSharding
) -> dict[str, float]:
    """Evaluate on the whole eval split; every example counts exactly once."""
    totals = None
    for batch in global_batches(pipeline.eval_batches(), sharding):
        sums = eval_fn(params, batch)
        totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    n = float(totals["examples"])
    return {
        "eval_accuracy": float(totals["correct"]) / n,
        "eval_loss": float(totals["loss"]) / n,
        "eval_tokens_per_image": float(totals["tokens"]) / n,
        "eval_examples": n,
    }


def _restore_or_init(
    checkpoints: Checkpoints, init_fn: Callable, seed: int, sharding: NamedSharding, workdir: str
) -> TrainState:
    """Restore the latest checkpoint if there is one, else initialise a new state."""
    if checkpoints.latest_step() is None:
        return init_fn(jax.random.PRNGKey(seed))
    abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(seed))
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract
    )
    state = checkpoints.restore(abstract)
    logging.info("Resumed from the checkpoint at step %d in %s.", int(state.step), workdir)
    return state


class _ThroughputMeter:
    """Steps per second over each logging interval, compilation of the first step excluded."""

    def __init__(self, start_step: int):
        self.last_time: float | None = None
        self.last_step = start_step

    def start(self, step: int) -> None:
        """Start timing after ``step`` completed (call once its results are ready)."""
        self.last_time, self.last_step = time.time(), step

    def rate(self, step: int) -> float:
        now = time.time()
        rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_step = now, step
        return rate


def _log_train(writer: MetricWriter, pending: list, step: int, total: int,
               steps_per_sec: float | None, batch_size: int, train_seconds: float) -> None:
    """Write the mean train metrics since the last log; the rate is None for the first step."""
    means = {k: float(np.mean([m[k] for m in jax.device_get(pending)])) for k in pending[0]}
    means["train_seconds"] = train_seconds
    if steps_per_sec is None:
        writer.write(step, means)
        logging.info("step %d/%d: loss %.4f (includes compilation)", step, total, means["train_loss"])
        return
    means["steps_per_sec"] = steps_per_sec
    means["images_per_sec"] = steps_per_sec * batch_size
    writer.write(step, means)
    eta = (total - step) / max(steps_per_sec, 1e-9)
    logging.info(
        "step %d/%d: loss %.4f, tokens/image %.1f, %.2f steps/s, ETA %s",
        step, total, means["train_loss"], means["train_tokens_per_image"],
        steps_per_sec, time.strftime("%H:%M:%S", time.gmtime(eta)),
    )


def _log_eval(writer: MetricWriter, step: int, metrics: dict[str, float]) -> None:
    writer.write(step, metrics)
    logging.info(
        "step %d eval: accuracy %.4f over %d examples, %.1f tokens/image",
        step, metrics["eval_accuracy"], metrics["eval_examples"],
        metrics["eval_tokens_per_image"],
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Train, evaluate and checkpoint in ``workdir``; resume there if checkpoints exist.

    Returns the metrics of the last evaluation. A checkpoint is saved before the
    evaluation of the same step, so a failing evaluation loses no training.
    """
    config_lib.validate_config(config)
    distributed.initialize(config)
    workdir = os.path.abspath(workdir)
    is_chief = jax.process_index() == 0

    mesh = make_mesh({"batch_size": config.batch_size, "eval_batch_size": config.eval_batch_size})
    replicated = NamedSharding(mesh, P())
    data_sharding = NamedSharding(mesh, P("data"))

    pipeline = InputPipeline(
        config, process_index=jax.process_index(), process_count=jax.process_count()
    )
    model = create_model(config, pipeline.num_classes)
    tx = create_optimizer(config)
    logging.info(
        "Dataset %s: %d train and %d eval examples in this process, %d classes; %s.",
        config.dataset, pipeline.train_source.num_examples, pipeline.eval_source.num_examples,
        pipeline.num_classes, pipeline.describe_selection(),
    )
    os.makedirs(workdir, exist_ok=True)
    if is_chief:
        # The settings of the latest start; a resumed run may change schedules or data.
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    init_fn = jax.jit(
        functools.partial(init_state, config=config, model=model, tx=tx), out_shardings=replicated
    )
    checkpoints = Checkpoints(
        os.path.join(workdir, "checkpoints"), config, model_signature(config, pipeline.num_classes)
    )
    state = _restore_or_init(checkpoints, init_fn, config.seed, replicated, workdir)
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    logging.info("Model has %d parameters.", num_params)

    train_fn = jit_train_step(config, model, tx, mesh)
    eval_budget = config.eval_selection.budget if uses_learned_selector(config) else None
    eval_fn = jax.jit(
        functools.partial(eval_step, model=model, budget=eval_budget),
        in_shardings=(replicated, data_sharding),
        out_shardings=replicated,
    )

    writer = MetricWriter(workdir, enabled=is_chief)
    start_step = int(state.step)
    total = config.total_steps
    eval_metrics: dict[str, float] = {}
    if start_step >= total:
        logging.info("The checkpoint is at step %d >= total_steps=%d; evaluating only.", start_step, total)
        eval_metrics = evaluate(eval_fn, state.params, pipeline, data_sharding)
        _log_eval(writer, start_step, eval_metrics)
        writer.close()
        checkpoints.close()
        return eval_metrics

    batches = global_batches(pipeline.train_batches(seed=config.seed + start_step), data_sharding)
    pending: list[dict[str, jax.Array]] = []
    meter = _ThroughputMeter(start_step)
    # Wall time of this run's training loop without evaluation, for time-to-accuracy.
    loop_start, eval_seconds = time.time(), 0.0
    with _StopRequest() as stop, profiling.count_compilations() as compiled:
        for step in range(start_step + 1, total + 1):
            state, metrics = train_fn(state, next(batches))
            pending.append(metrics)
            if step == start_step + 1:
                jax.block_until_ready(metrics)
                meter.start(step)

            if is_due(step, config.log_every, total):
                # Steps are dispatched asynchronously. Waiting for them makes the rate and
                # the training time count finished steps, not queued ones.
                jax.block_until_ready(metrics)
                rate = meter.rate(step) if step > meter.last_step else None
                _log_train(writer, pending, step, total, rate, config.batch_size,
                           time.time() - loop_start - eval_seconds)
                pending = []

            if is_due(step, config.checkpoint_every, total) or stop.requested:
                checkpoints.save(step, state, force=True)

            if is_due(step, config.eval_every, total):
                eval_start = time.time()
                train_seconds = eval_start - loop_start - eval_seconds
                eval_metrics = evaluate(eval_fn, state.params, pipeline, data_sharding)
                eval_seconds += time.time() - eval_start
                _log_eval(writer, step, {**eval_metrics, "train_seconds": train_seconds})
                meter.start(step)  # keep evaluation out of the steps/s figure

            if stop.requested:
                logging.warning("Stopped at step %d; rerun with the same --workdir to resume.", step)
                break

    logging.info(
        "Compiled %d train and %d eval programs in this run.",
        compiled["train_step"], compiled["eval_step"],
    )
    checkpoints.close()
    writer.close()
    return eval_metrics
