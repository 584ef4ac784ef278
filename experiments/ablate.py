"""Run a grid of config overrides, one training run per point, and tabulate the results.

    python -m experiments.ablate --config=configs/cifar10.py --out=runs/ablation \\
        --set=dataset=imagefolder:/data/cifar10 --set=selection.mode=budget \\
        --set=total_steps=1000 \\
        --grid=selection.scorer=entropy,laplacian,learned,random \\
        --grid=selection.budget=28,40

Each point trains in its own process (``python -m adaptive_jax.main``) with the shared
``--set`` overrides plus its own grid values, in ``OUT/runs/<point>``. When it finishes,
one row goes to ``OUT/results.csv``: the overrides, the last evaluation's accuracy and
tokens per image, the training throughput and the wall time. ``OUT/accuracy_vs_tokens.png``
plots accuracy against tokens per image.

An interrupted sweep continues where it stopped when rerun with the same arguments:
points already in the CSV are skipped, and a point that was cut short resumes from its
last checkpoint.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence

FIELDS = (
    "point", "overrides", "eval_accuracy", "eval_tokens_per_image", "step",
    "train_images_per_sec", "wall_seconds",
)


def parse_assignment(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"Expected KEY=VALUE, got {text!r}.")
    return key, value


def parse_grid_axis(text: str) -> tuple[str, list[str]]:
    """Parse 'KEY=V1,V2,...'; a value with commas, such as a tuple, goes in brackets."""
    key, values = parse_assignment(text)
    parts, depth, current = [], 0, ""
    for char in values:
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        depth += char in "(["
        depth -= char in ")]"
        current += char
    parts.append(current)
    if not all(parts):
        raise argparse.ArgumentTypeError(f"Empty value in grid axis {text!r}.")
    return key, parts


def grid_points(axes: Sequence[tuple[str, list[str]]]) -> list[dict[str, str]]:
    """Return the Cartesian product of the axes as override dicts, in a stable order."""
    keys = [key for key, _ in axes]
    return [dict(zip(keys, combo)) for combo in itertools.product(*[v for _, v in axes])]


def point_name(overrides: dict[str, str]) -> str:
    """Name a point by its overrides, safe as a folder name."""
    parts = []
    for key, value in overrides.items():
        short = key.split(".")[-1]
        clean = "".join(c if c.isalnum() or c in "-." else "_" for c in value).strip("_")
        parts.append(f"{short}-{clean}")
    return "__".join(parts) or "default"


def read_metrics(workdir: str) -> dict[str, float]:
    """Return the last eval line and the mean steady-state training throughput."""
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    evals = [l for l in lines if "eval_accuracy" in l]
    if not evals:
        raise RuntimeError(f"{path} has no evaluation line; the run did not finish.")
    rates = [l["images_per_sec"] for l in lines if "images_per_sec" in l]
    last = evals[-1]
    return {
        "eval_accuracy": last["eval_accuracy"],
        "eval_tokens_per_image": last["eval_tokens_per_image"],
        "step": last["step"],
        "train_images_per_sec": sum(rates) / len(rates) if rates else float("nan"),
    }


def completed_points(csv_path: str) -> set[str]:
    if not os.path.exists(csv_path):
        return set()
    with open(csv_path) as f:
        return {row["point"] for row in csv.DictReader(f)}


def append_row(csv_path: str, row: dict) -> None:
    new_file = not os.path.exists(csv_path)
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new_file:
            writer.writeheader()
        writer.writerow(row)


def plot_results(csv_path: str, png_path: str) -> None:
    """Plot eval accuracy against tokens per image, one labelled marker per point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for row in rows:
        x, y = float(row["eval_tokens_per_image"]), float(row["eval_accuracy"])
        ax.scatter(x, y)
        ax.annotate(row["point"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("tokens per image (eval)")
    ax.set_ylabel("eval accuracy")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def run_point(config: str, workdir: str, overrides: dict[str, str], log_path: str) -> None:
    command = [sys.executable, "-m", "adaptive_jax.main", f"--config={config}",
               f"--workdir={workdir}"]
    command += [f"--config.{key}={value}" for key, value in overrides.items()]
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(
            f"Point failed with exit code {result.returncode}; see {log_path}. Rerun the "
            "same command to retry it and continue the sweep."
        )


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="Config file, optionally FILE:ARG.")
    parser.add_argument("--out", required=True, help="Folder for runs, results.csv and the plot.")
    parser.add_argument("--set", dest="shared", action="append", default=[], type=parse_assignment,
                        help="KEY=VALUE override applied to every point; repeatable.")
    parser.add_argument("--grid", action="append", default=[], type=parse_grid_axis,
                        help="KEY=V1,V2,... one grid axis; repeatable.")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("matplotlib") is None:
        parser.error("matplotlib is missing, and the plot needs it. Install the project with "
                     "its dev extra: pip install -e '.[dev]'.")

    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    csv_path = os.path.join(args.out, "results.csv")
    done = completed_points(csv_path)
    rows = []
    for overrides in grid_points(args.grid):
        name = point_name(overrides)
        if name in done:
            print(f"{name}: already in {csv_path}, skipped.")
            continue
        workdir = os.path.join(args.out, "runs", name)
        start = time.time()
        print(f"{name}: training in {workdir} ...", flush=True)
        run_point(args.config, workdir, {**dict(args.shared), **overrides},
                  os.path.join(args.out, "runs", f"{name}.log"))
        row = {"point": name, "overrides": json.dumps(overrides),
               **read_metrics(workdir), "wall_seconds": round(time.time() - start, 1)}
        append_row(csv_path, row)
        rows.append(row)
        print(f"{name}: accuracy {row['eval_accuracy']:.4f}, "
              f"{row['eval_tokens_per_image']:.1f} tokens/image", flush=True)
    if os.path.exists(csv_path):
        plot_results(csv_path, os.path.join(args.out, "accuracy_vs_tokens.png"))
    return rows


if __name__ == "__main__":
    main()
