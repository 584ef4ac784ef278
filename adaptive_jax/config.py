"""Default configuration, config-argument parsing and validation.

Config files under ``configs/`` start from ``default_config()``, change what their
experiment needs and return the locked result, so that a misspelt override such as
``--config.totl_steps=10`` fails with the key's name instead of being ignored.
"""

from __future__ import annotations

import ml_collections

from adaptive_jax import scoring, selection
from adaptive_jax.models import vit
from adaptive_jax.patch_embed import EMBED_MODES


def default_config() -> ml_collections.ConfigDict:
    """Return every configuration key with its default; config files override values."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    # Data. `dataset` is a tfds name ('cifar10'), 'imagefolder:PATH' (PATH/<split>/<class>/
    # <image>) or 'digits' (scikit-learn's 8x8 handwritten digits, shipped with the package).
    c.dataset = "digits"
    c.data_dir = None  # tfds data_dir, for example a bucket on TPU pods
    c.download = False  # let tfds download and prepare a missing dataset
    c.train_split = "train"
    c.eval_split = "test"
    c.image_size = (32, 32)  # (height, width) the model sees, in pixels
    c.augment = True  # random crop (4-px reflected border) and horizontal flip in training
    c.cache = True  # keep decoded images in memory; turn off for datasets larger than RAM
    c.shuffle_buffer = 10_000
    c.selection_chunk = 256  # images scored and tiled together on the host

    # Patch sizes p_min * 2**k, smallest first; a single size gives a uniform ViT.
    c.patch_sizes = (4, 8, 16)

    c.selection = ml_collections.ConfigDict()
    c.selection.scorer = "entropy"  # one of scoring.SCORERS
    # One threshold per size except the smallest: a patch of size patch_sizes[k] is kept
    # whole where its score is below thresholds[k - 1].
    c.selection.thresholds = (4.5, 6.0)
    c.selection.bins = 64  # histogram bins over grey levels 0..255 for the entropy scorer

    c.sequence = ml_collections.ConfigDict()
    c.sequence.mode = "bucket"
    c.sequence.buckets = ()  # token lengths; empty means `num_buckets` evenly spaced ones
    c.sequence.num_buckets = 4

    c.model = ml_collections.ConfigDict()
    c.model.hidden_size = 128
    c.model.depth = 4
    c.model.num_heads = 4
    c.model.mlp_dim = 256
    c.model.pool = "gap"  # 'gap' (masked mean of tokens) or 'cls'
    c.model.embed_mode = "separate"  # one of patch_embed.EMBED_MODES
    c.model.dropout_rate = 0.0

    c.batch_size = 128  # global, over all devices and processes
    c.eval_batch_size = 256
    c.total_steps = 1000
    c.warmup_steps = 100
    c.learning_rate = 1e-3  # peak of the linear warm-up and cosine decay schedule
    c.weight_decay = 0.05
    c.grad_clip_norm = 1.0
    c.label_smoothing = 0.0

    c.log_every = 50  # steps between train metric lines
    c.eval_every = 500  # steps between evaluations; the last step always evaluates
    c.checkpoint_every = 500  # steps between checkpoints; the last step always saves
    c.keep_checkpoints = 3
    return c


def parse_config_arg(arg: str | None, known: dict[str, type]) -> dict[str, object]:
    """Parse a config argument such as 'uniform,total_steps=200' into a dict.

    A bare word sets a boolean switch to True; ``key=value`` is converted with the type in
    ``known``. Unknown words raise ValueError listing the accepted ones.
    """
    parsed: dict[str, object] = {}
    for part in (arg or "").split(","):
        part = part.strip()
        if not part:
            continue
        key, _, value = part.partition("=")
        if key not in known:
            raise ValueError(
                f"Unknown config argument {key!r} in {arg!r}; accepted: {sorted(known)}."
            )
        kind = known[key]
        if kind is bool:
            parsed[key] = value.lower() in ("", "1", "true", "yes")
        else:
            parsed[key] = kind(value)
    return parsed


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the bad value and its fix for an inconsistent config."""
    image_size = tuple(config.image_size)
    if len(image_size) != 2:
        raise ValueError(f"image_size={image_size} must be (height, width).")
    selection.validate_patch_sizes(config.patch_sizes, image_size)
    if config.selection.scorer not in scoring.SCORERS:
        raise ValueError(
            f"selection.scorer={config.selection.scorer!r} is unknown; choose one of "
            f"{scoring.SCORERS}."
        )
    expected = len(config.patch_sizes) - 1
    if len(config.selection.thresholds) != expected and expected > 0:
        raise ValueError(
            f"selection.thresholds={tuple(config.selection.thresholds)} has "
            f"{len(config.selection.thresholds)} values for patch_sizes="
            f"{tuple(config.patch_sizes)}; give {expected}, one per size except the smallest."
        )
    if config.sequence.mode != "bucket":
        raise ValueError(f"sequence.mode={config.sequence.mode!r} is unknown; use 'bucket'.")
    if config.model.embed_mode not in EMBED_MODES:
        raise ValueError(
            f"model.embed_mode={config.model.embed_mode!r} is unknown; choose one of {EMBED_MODES}."
        )
    if config.model.pool not in vit.POOLS:
        raise ValueError(f"model.pool={config.model.pool!r} is unknown; choose one of {vit.POOLS}.")
    if config.model.hidden_size % config.model.num_heads:
        raise ValueError(
            f"model.hidden_size={config.model.hidden_size} is not divisible by "
            f"model.num_heads={config.model.num_heads}."
        )
    for key in ("batch_size", "eval_batch_size", "total_steps"):
        if config[key] < 1:
            raise ValueError(f"{key}={config[key]} must be at least 1.")
