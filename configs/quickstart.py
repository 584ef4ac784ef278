"""Quickstart: an adaptive ViT on scikit-learn's handwritten digits, offline, in minutes.

    python -m adaptive_jax.main --config=configs/quickstart.py --workdir=/tmp/quickstart

Config argument: 'uniform' trains the same model with the single patch size 4.
"""

from adaptive_jax.config import default_config, parse_config_arg


def get_config(arg: str | None = None):
    args = parse_config_arg(arg, {"uniform": bool})
    config = default_config()
    config.dataset = "digits"
    config.image_size = (32, 32)  # the 8x8 digits are upsampled 4x
    config.patch_sizes = (4,) if args.get("uniform") else (4, 8, 16)
    config.selection.scorer = "entropy"
    config.selection.bins = 64
    # About 40 of 64 tokens per image on the digits test split.
    config.selection.thresholds = (2.5, 4.3)
    config.augment = False
    config.model.hidden_size = 64
    config.model.depth = 2
    config.model.num_heads = 2
    config.model.mlp_dim = 128
    config.batch_size = 64
    config.eval_batch_size = 128
    config.total_steps = 300
    config.warmup_steps = 30
    config.learning_rate = 2e-3
    config.log_every = 50
    config.eval_every = 150
    config.checkpoint_every = 150
    return config.lock()
