"""CIFAR-10 at 32x32: an adaptive ViT with patch sizes 4, 8 and 16 and entropy selection.

    python -m adaptive_jax.main --config=configs/cifar10.py --workdir=/tmp/cifar10 \
        --config.dataset=imagefolder:/path/to/cifar10

Config arguments (comma-separated): 'uniform' trains the same model with the single patch
size 4, the baseline; 'scorer=NAME' picks the selection scorer.
"""

from adaptive_jax.config import default_config, parse_config_arg


def get_config(arg: str | None = None):
    args = parse_config_arg(arg, {"uniform": bool, "scorer": str})
    config = default_config()
    config.dataset = "cifar10"  # tfds; or imagefolder:PATH with train/ and test/ folders
    config.image_size = (32, 32)
    config.patch_sizes = (4,) if args.get("uniform") else (4, 8, 16)
    config.selection.scorer = args.get("scorer", "entropy")
    config.selection.bins = 64
    # About 38 of 64 tokens per image on the CIFAR-10 test split (64-bin entropy).
    config.selection.thresholds = (4.0, 4.4)
    config.model.hidden_size = 128
    config.model.depth = 4
    config.model.num_heads = 4
    config.model.mlp_dim = 256
    config.batch_size = 128
    config.eval_batch_size = 500
    config.total_steps = 2000
    config.warmup_steps = 200
    config.learning_rate = 1e-3
    config.log_every = 100
    config.eval_every = 1000
    config.checkpoint_every = 500
    return config.lock()
