"""Compare one training step under jax.pmap with the same step under jax.jit.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=8. Prints a JSON line with the
largest parameter difference and both losses.
"""

import functools
import json

import jax
import numpy as np

from adaptive_jax import train
from adaptive_jax.data import InputPipeline
from configs import quickstart


def main() -> None:
    config = quickstart.get_config()
    config.unlock()
    config.model.depth = 1
    config.batch_size = 32
    config.warmup_steps = 0  # a non-zero learning rate in the first step
    config.lock()
    devices = jax.local_device_count()
    pipeline = InputPipeline(config)
    batch = next(pipeline.train_batches(seed=0))
    batch["weight"][-5:] = 0.0  # uneven real examples per device
    model = train.create_model(config, pipeline.num_classes)
    tx = train.create_optimizer(config)
    params = model.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))["params"]
    # A random head, so that gradients reach every layer in the first step.
    head = params["head"]["kernel"]
    params["head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(2), head.shape) * 0.1
    state = train.TrainState(step=np.int32(0), params=params, opt_state=tx.init(params),
                             rng=jax.random.PRNGKey(1))

    step = functools.partial(train.train_step, model=model, tx=tx, label_smoothing=0.0)
    jit_state, jit_metrics = jax.jit(step)(state, batch)

    replicated = jax.tree_util.tree_map(lambda x: np.broadcast_to(x, (devices, *np.shape(x))), state)
    sharded = jax.tree_util.tree_map(lambda x: x.reshape(devices, -1, *x.shape[1:]), batch)
    pmap_step = jax.pmap(functools.partial(step, axis_name="batch"), axis_name="batch")
    pmap_state, pmap_metrics = pmap_step(replicated, sharded)

    diffs = jax.tree_util.tree_map(
        lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)[0]).max()),
        jit_state.params, pmap_state.params,
    )
    print(json.dumps({
        "devices": devices,
        "max_param_diff": max(jax.tree_util.tree_leaves(diffs)),
        "jit_loss": float(jit_metrics["train_loss"]),
        "pmap_loss": float(np.asarray(pmap_metrics["train_loss"])[0]),
        "jit_grad_norm": float(jit_metrics["grad_norm"]),
        "pmap_grad_norm": float(np.asarray(pmap_metrics["grad_norm"])[0]),
        "learning_rate": config.learning_rate,
        "pmap_losses_equal": bool(np.allclose(np.asarray(pmap_metrics["train_loss"]), np.asarray(pmap_metrics["train_loss"])[0])),
    }))


if __name__ == "__main__":
    main()
