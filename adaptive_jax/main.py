"""Command-line entry point: ``python -m adaptive_jax.main --config=FILE --workdir=DIR``.

Override any config value with ``--config.KEY=VALUE``, for example
``--config.total_steps=2000`` or ``--config.dataset=imagefolder:/data/cifar10``.
"""

import logging as pylogging

from absl import app, flags, logging
from ml_collections import config_flags

from adaptive_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, optionally FILE:ARG.", lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics.jsonl and TensorBoard logs.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(pylogging.Filter):
    """Drop the per-save INFO records of orbax, which would bury the training log."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno > pylogging.INFO or "/orbax/" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    metrics = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    logging.info("Final evaluation: %s", metrics)


if __name__ == "__main__":
    app.run(main)
