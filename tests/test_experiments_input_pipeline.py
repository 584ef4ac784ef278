import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path, config, *extra):
    out = tmp_path / "pipeline.json"
    command = [
        sys.executable, "-m", "experiments.input_pipeline", f"--config={config}",
        "--batches=3", "--rounds=2", "--warmup=1", "--drain=2", f"--out={out}",
        "--config.batch_size=16", "--config.selection_chunk=16",
        "--config.shuffle_buffer=64", *extra,
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done


@pytest.mark.parametrize("config", ["configs/quickstart.py", "configs/quickstart.py:uniform"])
def test_rates_and_ratios_reported(tmp_path, config):
    result, done = _run(tmp_path, config)
    for kind in ("pipeline", "step", "fed"):
        assert result[f"{kind}_batches_per_s"] > 0
        assert len(result["round_seconds"][kind]) == 2
    ratio = result["pipeline_batches_per_s"] / result["step_batches_per_s"]
    assert result["pipeline_over_step"] == pytest.approx(ratio)
    assert "pipeline/step" in done.stdout
    assert result["batch_size"] == 16
    if config.endswith("uniform"):
        assert result["selection_fraction_of_pipeline"] == 0.0
    else:
        assert 0.0 < result["selection_fraction_of_pipeline"] < 1.0
        assert "entropy scores on the host" in result["selection"]


def test_bad_counts_rejected(tmp_path):
    command = [sys.executable, "-m", "experiments.input_pipeline",
               "--config=configs/quickstart.py", "--rounds=0"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "--rounds=0" in done.stderr
