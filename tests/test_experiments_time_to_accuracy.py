import json
import os

import numpy as np
import pytest
from PIL import Image

from experiments import time_to_accuracy


def _folder(root):
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("test", 4)):
        for label in ("a", "b"):
            os.makedirs(root / split / label)
            for i in range(count):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                pixels[:, 16:] = 128  # a flat half that coarse patches can cover
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    return root


def test_curves_and_ratio_written(tmp_path):
    data = _folder(tmp_path / "images")
    out = tmp_path / "out"
    result = time_to_accuracy.main([f"--data={data}", f"--out={out}", "--steps=2",
                                    "--eval-every=1", "--batch-size=8"])
    for name in ("adaptive", "uniform"):
        curve = result["curves"][name]
        assert [p["step"] for p in curve] == [1, 2]
        assert curve[0]["train_seconds"] <= curve[1]["train_seconds"]
    assert result["final"]["uniform"]["eval_tokens_per_image"] == 64
    assert result["final"]["adaptive"]["eval_tokens_per_image"] < 64
    assert result["seconds_to_target"]["uniform"] is not None
    saved = json.loads((out / "time_to_accuracy.json").read_text())
    assert saved["target_accuracy"] == result["target_accuracy"]
    assert saved["machine"]["cpu_count"] >= 1
    assert "experiments.time_to_accuracy" in saved["command"]
    assert (out / "time_to_accuracy.png").stat().st_size > 0


def test_time_to_reach_first_point_at_target():
    curve = [{"train_seconds": 1.0, "eval_accuracy": 0.2},
             {"train_seconds": 2.0, "eval_accuracy": 0.5},
             {"train_seconds": 3.0, "eval_accuracy": 0.4}]
    assert time_to_accuracy.time_to_reach(curve, 0.45) == 2.0
    assert time_to_accuracy.time_to_reach(curve, 0.9) is None


def test_existing_run_folder_rejected(tmp_path, capsys):
    data = _folder(tmp_path / "images")
    out = tmp_path / "out"
    (out / "adaptive").mkdir(parents=True)

    with pytest.raises(SystemExit):
        time_to_accuracy.main([f"--data={data}", f"--out={out}", "--steps=2"])

    error = capsys.readouterr().err
    assert str(out / "adaptive") in error
    assert "new --out" in error


def test_adaptive_steps_set_own_budget(tmp_path):
    data = _folder(tmp_path / "images")
    result = time_to_accuracy.main([f"--data={data}", f"--out={tmp_path / 'out'}", "--steps=2",
                                    "--adaptive-steps=3", "--eval-every=2", "--batch-size=8",
                                    "--seed=3"])

    # Evaluations every 2 steps and after the last one.
    assert [p["step"] for p in result["curves"]["adaptive"]] == [2, 3]
    assert [p["step"] for p in result["curves"]["uniform"]] == [2]
    assert result["settings"]["steps"] == {"adaptive": 3, "uniform": 2}
    assert result["settings"]["seed"] == 3
    for name in ("adaptive", "uniform"):
        saved = json.loads((tmp_path / "out" / name / "config.json").read_text())
        assert saved["seed"] == 3
        assert saved["total_steps"] == (3 if name == "adaptive" else 2)


@pytest.mark.parametrize("layout", ["absent", "train only"])
def test_data_without_splits_rejected(tmp_path, capsys, layout):
    data = tmp_path / "data"
    if layout == "train only":
        (data / "train" / "a").mkdir(parents=True)
    with pytest.raises(SystemExit):
        time_to_accuracy.main([f"--data={data}", f"--out={tmp_path / 'out'}"])
    error = capsys.readouterr().err
    expected = "test folder" if layout == "train only" else "train or test folder"
    assert f"--data {data} has no {expected}" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, named", [
    (["--steps=0"], "--steps 0"),
    (["--adaptive-steps=0"], "--adaptive-steps 0"),
    (["--eval-every=-1"], "--eval-every -1"),
    (["--patch-sizes=4,8,16", "--thresholds=4.0"], "--patch-sizes 4,8,16 with --thresholds 4.0"),
    (["--patch-sizes=4,7"], "--patch-sizes 4,7"),
])
def test_invalid_flags_named(tmp_path, capsys, flags, named):
    data = _folder(tmp_path / "images")
    with pytest.raises(SystemExit):
        time_to_accuracy.main([f"--data={data}", f"--out={tmp_path / 'out'}", *flags])
    assert named in capsys.readouterr().err
