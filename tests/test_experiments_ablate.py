import csv
import os

import pytest

from experiments import ablate
from tests.conftest import REPO_ROOT


def test_grid_axis_keeps_bracketed_values():
    key, values = ablate.parse_grid_axis("selection.thresholds=(1.0,2.0),(3.0,4.0)")
    assert key == "selection.thresholds"
    assert values == ["(1.0,2.0)", "(3.0,4.0)"]
    with pytest.raises(Exception, match="KEY=VALUE"):
        ablate.parse_grid_axis("novalue")


def test_grid_points_and_names():
    points = ablate.grid_points([("a.x", ["1", "2"]), ("b", ["p", "q"])])
    assert points == [{"a.x": "1", "b": "p"}, {"a.x": "1", "b": "q"},
                      {"a.x": "2", "b": "p"}, {"a.x": "2", "b": "q"}]
    assert ablate.point_name({"selection.thresholds": "(1.0,2.0)"}) == "thresholds-1.0_2.0"


def test_sweep_writes_rows_and_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    out = str(tmp_path / "sweep")
    common = ["--config=configs/quickstart.py", f"--out={out}",
              "--set=total_steps=2", "--set=log_every=1", "--set=model.depth=1",
              "--set=selection.mode=budget"]
    rows = ablate.main(common + ["--grid=selection.budget=22,31"])
    assert [r["point"] for r in rows] == ["budget-22", "budget-31"]
    with open(os.path.join(out, "results.csv")) as f:
        table = list(csv.DictReader(f))
    assert [float(r["eval_tokens_per_image"]) for r in table] == [22.0, 31.0]
    assert all(0.0 <= float(r["eval_accuracy"]) <= 1.0 for r in table)
    assert os.path.getsize(os.path.join(out, "accuracy_vs_tokens.png")) > 0
    # A rerun with one more point trains only the new one.
    rows = ablate.main(common + ["--grid=selection.budget=22,31,40"])
    assert [r["point"] for r in rows] == ["budget-40"]
