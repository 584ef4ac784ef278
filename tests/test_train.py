import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from adaptive_jax import train
from configs import cifar10, quickstart
from tests.conftest import REPO_ROOT


def _tiny(config, **overrides):
    config.unlock()
    config.model.hidden_size = 32
    config.model.depth = 1
    config.model.num_heads = 2
    config.model.mlp_dim = 32
    config.batch_size = 32
    config.eval_batch_size = 100
    config.log_every = 2
    config.eval_every = 4
    config.checkpoint_every = 2
    config.warmup_steps = 1
    for key, value in overrides.items():
        config[key] = value
    return config.lock()


def _lines(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_train_writes_metrics_and_checkpoints(tmp_path):
    workdir = str(tmp_path / "run")
    metrics = train.train_and_evaluate(_tiny(quickstart.get_config(), total_steps=4), workdir)
    assert metrics["eval_examples"] == 300
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert 4 <= metrics["eval_tokens_per_image"] <= 64
    lines = _lines(workdir)
    train_lines = [l for l in lines if "train_loss" in l]
    eval_lines = [l for l in lines if "eval_accuracy" in l]
    assert [l["step"] for l in train_lines] == [2, 4]
    assert [l["step"] for l in eval_lines] == [4]
    assert all(np.isfinite(l["train_loss"]) for l in train_lines)
    assert "eval_tokens_per_image" in eval_lines[0]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-1] == "4"
    assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_rerun_resumes_from_latest_step(tmp_path):
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(_tiny(quickstart.get_config(), total_steps=2), workdir)
    train.train_and_evaluate(_tiny(quickstart.get_config(), total_steps=4), workdir)
    steps = [l["step"] for l in _lines(workdir) if "train_loss" in l]
    assert steps == [2, 4]  # the second run started at step 3, not at step 1


def test_checkpoint_round_trip(tmp_path):
    config = _tiny(quickstart.get_config(), total_steps=2)
    model = train.create_model(config, 10)
    tx = train.create_optimizer(config)
    params = model.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))["params"]
    state = train.TrainState(step=np.int32(7), params=params, opt_state=tx.init(params),
                             rng=jax.random.PRNGKey(3))
    state = jax.tree_util.tree_map(jax.numpy.asarray, state)
    signature = train.model_signature(config, 10)
    checkpoints = train.Checkpoints(str(tmp_path / "ckpt"), config, signature)
    checkpoints.save(7, state, force=True)
    checkpoints.close()
    reopened = train.Checkpoints(str(tmp_path / "ckpt"), config, signature)
    assert reopened.latest_step() == 7
    restored = reopened.restore(jax.eval_shape(lambda: state))
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    reopened.close()


def test_checkpoint_from_other_model_rejected(tmp_path):
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(_tiny(quickstart.get_config(), total_steps=2), workdir)
    uniform = _tiny(quickstart.get_config("uniform"), total_steps=4)
    with pytest.raises(ValueError, match="written by another model"):
        train.train_and_evaluate(uniform, workdir)


def test_is_due_covers_interval_and_last_step():
    assert [s for s in range(1, 11) if train.is_due(s, 4, 10)] == [4, 8, 10]
    assert [s for s in range(1, 4) if train.is_due(s, 0, 3)] == [3]


def test_configs_accept_uniform_argument():
    adaptive = cifar10.get_config()
    uniform = cifar10.get_config("uniform")
    assert tuple(adaptive.patch_sizes) == (4, 8, 16)
    assert tuple(uniform.patch_sizes) == (4,)
    assert adaptive.model.to_dict() == uniform.model.to_dict()
    with pytest.raises(ValueError, match="Unknown config argument 'unifrom'"):
        cifar10.get_config("unifrom")


def test_config_rejects_unknown_key():
    config = quickstart.get_config()
    with pytest.raises(AttributeError, match="totl_steps"):
        config.totl_steps = 3


@pytest.mark.parametrize(
    "override,message",
    [
        ("--config.totl_steps=3", "totl_steps"),
        ("--config.image_size=(30,30)", "use an image size of 16 or 32"),
        ("--config.dataset=no_such_dataset_xyz", "not found in tensorflow-datasets"),
    ],
)
def test_command_line_rejects_bad_input(tmp_path, override, message):
    result = subprocess.run(
        [sys.executable, "-m", "adaptive_jax.main", "--config=configs/quickstart.py",
         f"--workdir={tmp_path}", override],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode != 0
    assert message in result.stderr


def test_parameter_counts_pinned():
    counts = {}
    for name, module in (("quickstart", quickstart), ("cifar10", cifar10)):
        for arg in ("", "uniform"):
            config = module.get_config(arg)
            model = train.create_model(config, 10)
            h, w = config.image_size
            params = jax.eval_shape(model.init, jax.random.PRNGKey(0), np.zeros((1, h, w, 3), np.float32))
            counts[(name, arg)] = sum(x.size for x in jax.tree_util.tree_leaves(params))
    # cifar10 uniform, by hand: patch projection 4*4*3*128+128, positions 64*128, one
    # size embedding 128, four blocks of 132,480 (norms 512, attention 66,048, MLP 65,920),
    # final norm 256 and head 128*10+10. The adaptive model adds the 8- and 16-px
    # projections and two size embeddings.
    assert counts == {
        ("quickstart", ""): 136_714,
        ("quickstart", "uniform"): 75_018,
        ("cifar10", ""): 669_450,
        ("cifar10", "uniform"): 546_058,
    }


def test_pack_mode_trains_and_counts_every_example(tmp_path):
    config = _tiny(quickstart.get_config(), total_steps=4)
    config.unlock()
    config.sequence.mode = "pack"
    config.sequence.pack_length = 96
    config.sequence.max_images_per_row = 4
    config.sequence.pack_lookahead_batches = 2
    config.lock()
    metrics = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert metrics["eval_examples"] == 300
    assert 4 <= metrics["eval_tokens_per_image"] <= 64
    lines = [l for l in _lines(str(tmp_path / "run")) if "train_loss" in l]
    assert all(np.isfinite(l["train_loss"]) for l in lines)


def test_budget_mode_has_exact_tokens(tmp_path):
    config = _tiny(quickstart.get_config(), total_steps=2)
    config.unlock()
    config.selection.mode = "budget"
    config.selection.budget = 31
    config.lock()
    metrics = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert metrics["eval_tokens_per_image"] == 31


def test_learned_selector_trains_at_budget(tmp_path):
    config = _tiny(quickstart.get_config(), total_steps=3)
    config.unlock()
    config.selection.scorer = "learned"
    config.selection.mode = "budget"
    config.selection.budget = 25
    config.lock()
    workdir = str(tmp_path / "run")
    metrics = train.train_and_evaluate(config, workdir)
    assert metrics["eval_tokens_per_image"] == 25
    config.unlock()
    config.eval_selection.budget = 40
    config.lock()
    # Rerunning a finished run evaluates it at the new budget without training.
    metrics = train.train_and_evaluate(config, workdir)
    assert metrics["eval_tokens_per_image"] == 40


def test_eval_thresholds_override(tmp_path):
    config = _tiny(quickstart.get_config(), total_steps=2)
    workdir = str(tmp_path / "run")
    base = train.train_and_evaluate(config, workdir)
    config.unlock()
    config.eval_selection.thresholds = (0.0, 0.0)  # keep no coarse patch
    config.lock()
    finest = train.train_and_evaluate(config, workdir)
    assert finest["eval_tokens_per_image"] == 64
    assert base["eval_tokens_per_image"] < 64


def test_learned_scorer_needs_budget_mode(tmp_path):
    config = _tiny(quickstart.get_config(), total_steps=2)
    config.unlock()
    config.selection.scorer = "learned"
    config.lock()
    with pytest.raises(ValueError, match="selection.mode='budget'"):
        train.train_and_evaluate(config, str(tmp_path / "run"))


@pytest.mark.parametrize("mode", ["bucket", "pack"])
def test_compilations_bounded_by_config(tmp_path, mode):
    from adaptive_jax.profiling import count_compilations

    config = _tiny(quickstart.get_config(), total_steps=30, eval_every=10, log_every=10,
                   checkpoint_every=0)
    config.unlock()
    config.sequence.mode = mode
    config.sequence.pack_length = 128
    config.lock()
    with count_compilations() as counts:
        train.train_and_evaluate(config, str(tmp_path / "run"))
    buckets = 4  # default_buckets(4, 64, 4) == (24, 40, 56, 64)
    limit = 1 if mode == "pack" else buckets
    assert 1 <= counts["train_step"] <= limit
    assert 1 <= counts["eval_step"] <= limit


def test_sigterm_saves_and_rerun_resumes(tmp_path):
    import signal
    import time

    workdir = tmp_path / "run"
    command = [sys.executable, "-m", "adaptive_jax.main", "--config=configs/quickstart.py",
               f"--workdir={workdir}", "--config.total_steps=100000", "--config.log_every=1",
               "--config.checkpoint_every=0", "--config.eval_every=0"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-2000:]
    saved = sorted(int(name) for name in os.listdir(workdir / "checkpoints") if name.isdigit())
    assert saved, "no checkpoint after SIGTERM"
    stopped_at = saved[-1]
    assert stopped_at >= 3
    # The rerun starts after the saved step and evaluates at its new end.
    rerun = subprocess.run(command[:5] + [f"--config.total_steps={stopped_at + 2}", "--config.log_every=1"],
                           cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"Resumed from the checkpoint at step {stopped_at}" in rerun.stderr
    steps = [l["step"] for l in _lines(str(workdir)) if "train_loss" in l]
    assert steps[-2:] == [stopped_at + 1, stopped_at + 2]
