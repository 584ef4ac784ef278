"""Run one training job for the multi-device and multi-process tests.

Usage: python tests/distributed_worker.py WORKDIR JSON_OVERRIDES

The overrides are applied to a tiny quickstart config (dotted keys). Device count and
process settings come from the environment and the overrides, so the test launches this
script in fresh processes. The last line printed is the final eval metrics as JSON.
"""

import json
import sys

from adaptive_jax import train
from configs import quickstart


def main(workdir: str, overrides: dict) -> None:
    config = quickstart.get_config()
    config.unlock()
    config.model.hidden_size = 32
    config.model.depth = 1
    config.model.num_heads = 2
    config.model.mlp_dim = 32
    config.batch_size = 32
    config.eval_batch_size = 96
    config.log_every = 1
    config.warmup_steps = 1
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = tuple(value) if isinstance(value, list) else value
    config.lock()
    metrics = train.train_and_evaluate(config, workdir)
    print(json.dumps(metrics), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
