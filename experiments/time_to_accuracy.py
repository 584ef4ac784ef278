"""Test accuracy against training wall-clock time for the adaptive and the uniform model.

    python -m experiments.time_to_accuracy --data=/data/cifar10 --out=runs/time_to_accuracy \\
        --steps=1500 --eval-every=250

Trains ``configs/cifar10.py`` (adaptive) and ``configs/cifar10.py:uniform`` with the same
encoder, batch size, schedule and step budget, one after the other in this process,
evaluating on the whole test split every ``--eval-every`` steps and after the last step.
Training time excludes evaluation. ``--adaptive-steps`` gives the adaptive run its own
step budget, for a comparison at a fixed wall-clock budget: an adaptive step costs less
than a uniform one, so the adaptive model can take more steps in the same time. Its
learning-rate schedule then spans its own steps. Writes ``OUT/time_to_accuracy.json`` (the
curves, the time each model needs to reach the uniform model's final accuracy, the machine
and the command) and ``OUT/time_to_accuracy.png``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Sequence

from absl import logging as absl_logging

from adaptive_jax import config as config_lib
from adaptive_jax import train
from configs import cifar10
from experiments.reporting import command_line, utc_now
from experiments.throughput import describe_machine, parse_float_list, parse_int_list

RUNS = (("adaptive", ""), ("uniform", "uniform"))


def read_curve(workdir: str) -> list[dict[str, float]]:
    """Return the eval points of a run: step, train_seconds, accuracy, tokens per image."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return [
        {"step": l["step"], "train_seconds": l["train_seconds"],
         "eval_accuracy": l["eval_accuracy"], "eval_tokens_per_image": l["eval_tokens_per_image"]}
        for l in lines if "eval_accuracy" in l
    ]


def time_to_reach(curve: Sequence[dict[str, float]], accuracy: float) -> float | None:
    """Return the training time of the first eval point at or above ``accuracy``."""
    for point in curve:
        if point["eval_accuracy"] >= accuracy:
            return point["train_seconds"]
    return None


def plot_curves(curves: dict[str, list[dict[str, float]]], png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, curve in curves.items():
        axes[0].plot([p["train_seconds"] for p in curve], [p["eval_accuracy"] for p in curve],
                     marker="o", label=name)
        axes[1].plot([p["step"] for p in curve], [p["eval_accuracy"] for p in curve],
                     marker="o", label=name)
    axes[0].set_xlabel("training time (s, evaluation excluded)")
    axes[1].set_xlabel("step")
    for ax in axes:
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.time_to_accuracy",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--data", required=True, help="CIFAR-10 image folder with train/ and test/.")
    parser.add_argument("--out", required=True, help="Folder for the runs, JSON and plot.")
    parser.add_argument("--steps", type=int, default=1500,
                        help="Training steps of each run (default: %(default)s).")
    parser.add_argument(
        "--adaptive-steps", type=int, default=None,
        help="Training steps of the adaptive run, for a comparison at a fixed time budget "
             "(default: --steps).",
    )
    parser.add_argument("--eval-every", type=int, default=250,
                        help="Steps between evaluations (default: %(default)s).")
    parser.add_argument("--batch-size", type=int, default=128,
                        help="Batch size of both runs (default: %(default)s).")
    parser.add_argument(
        "--seed", type=int, default=0,
        help="Seed of both runs: initial parameters, data order and augmentation "
             "(default: %(default)s).",
    )
    parser.add_argument(
        "--patch-sizes", type=parse_int_list, default=None,
        help="Adaptive patch sizes, e.g. 2,4,8; the uniform model uses the smallest. "
             "Default: those of configs/cifar10.py (4,8,16).",
    )
    parser.add_argument(
        "--thresholds", type=parse_float_list, default=None,
        help="Entropy thresholds of the adaptive model, one per coarse size, "
             "e.g. 3.0,4.0. Default: those of configs/cifar10.py.",
    )
    args = parser.parse_args(argv)
    if args.adaptive_steps is None:
        args.adaptive_steps = args.steps
    for flag, value in (("--steps", args.steps), ("--adaptive-steps", args.adaptive_steps),
                        ("--eval-every", args.eval_every), ("--batch-size", args.batch_size)):
        if value < 1:
            parser.error(f"{flag} {value} is invalid. Give at least 1.")
    missing = [split for split in ("train", "test")
               if not os.path.isdir(os.path.join(args.data, split))]
    if missing:
        parser.error(f"--data {args.data} has no {' or '.join(missing)} folder. Give the "
                     "CIFAR-10 image folder laid out as DATA/<split>/<class>/<image>, with "
                     "the splits train and test.")
    if importlib.util.find_spec("matplotlib") is None:
        parser.error("matplotlib is missing, and the plot needs it. Install the project with "
                     "its dev extra: pip install -e '.[dev]'.")
    for name, _ in RUNS:
        workdir = os.path.join(args.out, name)
        if os.path.exists(workdir):
            # A resumed run restarts its training clock, which would break the curves.
            parser.error(f"--out {args.out} already contains the run folder {workdir}. "
                         "Give a new --out or delete that folder.")
    # Show the trainer's progress lines (steps/s, ETA, evaluations) on stderr.
    absl_logging.set_verbosity(absl_logging.INFO)

    curves, patch_sizes = {}, {}
    for name, arg in RUNS:
        config = cifar10.get_config(arg)
        config.unlock()
        config.dataset = f"imagefolder:{os.path.abspath(args.data)}"
        steps = args.adaptive_steps if name == "adaptive" else args.steps
        config.total_steps = steps
        config.eval_every = args.eval_every
        config.log_every = args.eval_every
        config.checkpoint_every = steps
        config.batch_size = args.batch_size
        config.seed = args.seed
        if args.patch_sizes:
            config.patch_sizes = args.patch_sizes[:1] if name == "uniform" else args.patch_sizes
        if args.thresholds and name == "adaptive":
            config.selection.thresholds = args.thresholds
        config.lock()
        try:
            config_lib.validate_config(config)
        except ValueError as error:
            flags_given = [f"{flag} {','.join(str(v) for v in value)}"
                     for flag, value in (("--patch-sizes", args.patch_sizes),
                                         ("--thresholds", args.thresholds)) if value]
            parser.error(f"{' with '.join(flags_given) or 'The defaults'} give an invalid {name} "
                         f"model: {error}")
        patch_sizes[name] = tuple(config.patch_sizes)
        if name == "adaptive":
            thresholds = tuple(config.selection.thresholds)
        workdir = os.path.join(args.out, name)
        train.train_and_evaluate(config, workdir)
        curves[name] = read_curve(workdir)

    target = curves["uniform"][-1]["eval_accuracy"]
    times = {name: time_to_reach(curve, target) for name, curve in curves.items()}
    ratio = (times["adaptive"] / times["uniform"]
             if times["adaptive"] is not None and times["uniform"] else None)
    result = {
        "target_accuracy": target,
        "seconds_to_target": times,
        "time_ratio_adaptive_over_uniform": ratio,
        "final": {name: curve[-1] for name, curve in curves.items()},
        "curves": curves,
        "settings": {"steps": {"adaptive": args.adaptive_steps, "uniform": args.steps},
                     "eval_every": args.eval_every,
                     "batch_size": args.batch_size, "seed": args.seed, "config": "configs/cifar10.py",
                     "patch_sizes": list(patch_sizes["adaptive"]),
                     "uniform_patch_size": patch_sizes["uniform"][0],
                     "thresholds": list(thresholds)},
        "machine": describe_machine(),
        "command": command_line("experiments.time_to_accuracy",
                                list(argv if argv is not None else sys.argv[1:])),
        "date": utc_now(),
    }
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "time_to_accuracy.json")
    png_path = os.path.join(args.out, "time_to_accuracy.png")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    plot_curves(curves, png_path)
    print(json.dumps({k: result[k] for k in ("target_accuracy", "seconds_to_target",
                                             "time_ratio_adaptive_over_uniform")}))
    print(f"Wrote {json_path} and {png_path}")
    return result


if __name__ == "__main__":
    main()
