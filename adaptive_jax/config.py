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
    # When the largest patch size does not divide image_size, 'reject' raises an error
    # naming the nearest valid sizes. 'crop' rounds image_size down to a multiple and
    # center-crops; 'pad' rounds it up and pads with zeros at the bottom and right.
    c.fit_image_size = "reject"
    c.augment = True  # random crop (4-px reflected border) and horizontal flip in training
    c.cache = True  # keep decoded images in memory; turn off for datasets larger than RAM
    c.shuffle_buffer = 10_000
    c.selection_chunk = 256  # images scored and tiled together on the host

    # Patch sizes p_min * 2**k, smallest first; a single size gives a uniform ViT.
    c.patch_sizes = (4, 8, 16)

    c.selection = ml_collections.ConfigDict()
    # One of scoring.SCORERS, or 'learned': the importance net trained with the classifier
    # on the device (budget mode only).
    c.selection.scorer = "entropy"
    # 'threshold': a variable token count set by thresholds; 'budget': split the
    # highest-scoring patches until every image has exactly `budget` tokens.
    c.selection.mode = "threshold"
    # One threshold per size except the smallest: a patch of size patch_sizes[k] is kept
    # whole where its score is below thresholds[k - 1].
    c.selection.thresholds = (4.5, 6.0)
    c.selection.budget = 40  # tokens per image in budget mode
    c.selection.bins = 64  # histogram bins over grey levels 0..255 for the entropy scorer

    # Selection used at evaluation only; unset values fall back to `selection`. Evaluate a
    # trained run at other trade-offs by rerunning it with total_steps at or below its last
    # step, e.g. --config.eval_selection.budget=28.
    c.eval_selection = ml_collections.ConfigDict()
    c.eval_selection.thresholds = ml_collections.config_dict.placeholder(tuple)
    c.eval_selection.budget = ml_collections.config_dict.placeholder(int)

    # How variable token counts become static shapes. 'bucket': pad each image to the
    # smallest bucket length that holds it, one bucket per batch (one compiled program per
    # bucket). 'pack': first-fit several images into rows of `pack_length` tokens with
    # segment ids (one program); a batch then has batch_size // max_images_per_row rows.
    c.sequence = ml_collections.ConfigDict()
    c.sequence.mode = "bucket"
    c.sequence.buckets = ()  # token lengths; empty means `num_buckets` evenly spaced ones
    c.sequence.num_buckets = 4
    c.sequence.pack_length = 0  # tokens per packed row; 0 means the all-smallest count
    c.sequence.max_images_per_row = 2
    # Batches of images the packer keeps pending so that it can fill rows with little
    # padding (0: plain first fit). An image waits at most about this many batches.
    c.sequence.pack_lookahead_batches = 0

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

    # Multi-process runs (TPU pods, multi-host GPU): see distributed.initialize. Unset
    # values are read from the environment by jax.distributed.initialize.
    c.distributed = ml_collections.ConfigDict()
    c.distributed.enabled = False
    c.distributed.coordinator_address = ml_collections.config_dict.placeholder(str)  # "host:port"
    c.distributed.num_processes = ml_collections.config_dict.placeholder(int)
    c.distributed.process_id = ml_collections.config_dict.placeholder(int)

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


FIT_RULES = ("reject", "crop", "pad")
SELECTION_MODES = ("threshold", "budget")
SEQUENCE_MODES = ("bucket", "pack")


def model_image_size(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """Return the image size the model sees after ``config.fit_image_size`` is applied."""
    size = tuple(int(s) for s in config.image_size)
    if len(size) != 2:
        raise ValueError(f"image_size={size} must be (height, width).")
    if config.fit_image_size not in FIT_RULES:
        raise ValueError(
            f"fit_image_size={config.fit_image_size!r} is unknown; choose one of {FIT_RULES}."
        )
    largest = int(config.patch_sizes[-1])
    if config.fit_image_size == "crop":
        fitted = tuple(max(largest, s // largest * largest) for s in size)
    elif config.fit_image_size == "pad":
        fitted = tuple(-(-s // largest) * largest for s in size)
    else:
        fitted = size
    return fitted


def _check_thresholds(name: str, thresholds, patch_sizes) -> None:
    expected = len(patch_sizes) - 1
    if expected > 0 and len(thresholds) != expected:
        raise ValueError(
            f"{name}={tuple(thresholds)} has {len(thresholds)} values for patch_sizes="
            f"{tuple(patch_sizes)}; give {expected}, one per size except the smallest."
        )


def _validate_selection(config: ml_collections.ConfigDict, image_size: tuple[int, int]) -> None:
    sel = config.selection
    if sel.scorer not in scoring.SCORERS + ("learned",):
        raise ValueError(
            f"selection.scorer={sel.scorer!r} is unknown; choose one of "
            f"{scoring.SCORERS + ('learned',)}."
        )
    if sel.mode not in SELECTION_MODES:
        raise ValueError(f"selection.mode={sel.mode!r} is unknown; choose one of {SELECTION_MODES}.")
    if sel.scorer == "learned" and sel.mode != "budget" and len(config.patch_sizes) > 1:
        raise ValueError(
            "selection.scorer='learned' runs on the device and needs a static token count; "
            "set selection.mode='budget' and selection.budget."
        )

    _check_thresholds("selection.thresholds", sel.thresholds, config.patch_sizes)
    if config.eval_selection.thresholds is not None:
        _check_thresholds("eval_selection.thresholds", config.eval_selection.thresholds, config.patch_sizes)
    if len(config.patch_sizes) > 1 and sel.mode == "budget":
        selection.validate_budget(sel.budget, image_size, config.patch_sizes)
        if config.eval_selection.budget is not None:
            selection.validate_budget(config.eval_selection.budget, image_size, config.patch_sizes)


def _validate_sequence(config: ml_collections.ConfigDict) -> None:
    if config.sequence.mode not in SEQUENCE_MODES:
        raise ValueError(
            f"sequence.mode={config.sequence.mode!r} is unknown; choose one of {SEQUENCE_MODES}."
        )
    if config.sequence.mode == "pack":
        per_row = config.sequence.max_images_per_row
        for key in ("batch_size", "eval_batch_size"):
            if per_row < 1 or config[key] % per_row:
                raise ValueError(
                    f"{key}={config[key]} is not divisible by sequence.max_images_per_row="
                    f"{per_row}; in pack mode a batch has {key} // max_images_per_row rows."
                )


def _validate_model(config: ml_collections.ConfigDict) -> None:
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


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the bad value and its fix for an inconsistent config."""
    image_size = model_image_size(config)
    selection.validate_patch_sizes(config.patch_sizes, image_size)
    _validate_selection(config, image_size)
    _validate_sequence(config)
    _validate_model(config)
    for key in ("batch_size", "eval_batch_size", "total_steps"):
        if config[key] < 1:
            raise ValueError(f"{key}={config[key]} must be at least 1.")
