"""Short end-to-end runs on 600 MNIST digits: learning, down-weighting of corrupted labels, records, resume."""

import json

import pytest
import torch

from applications.datacleaning.config import config_from_dict
from applications.datacleaning.experiment import run_experiment
from applications.datacleaning.methods import METHODS


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()  # the runs set cpu_threads: 1
    yield
    torch.set_num_threads(threads)


def small(tmp_path, name, methods, steps=60, **extra):
    raw = {"data": {"n_train": 600, "n_val": 200, "n_test": 200, "p": 0.5},
           "train": {"steps": steps, "eval_every": 20, "batch_size": 64, "val_batch_size": 64, "outer_lr": 0.3,
                     "baseline_steps": 200},
           "methods": methods, "output": {"dir": str(tmp_path), "name": name}, **extra}
    return config_from_dict(raw)


def test_a_short_run_improves_validation_and_down_weights_corrupted_samples(tmp_path):
    cfg = small(tmp_path, "amigo", [{"name": "amigo", "inner_lr": 0.01, "system_lr": 0.01}])
    results = run_experiment(cfg, log=lambda s: None, progress=False)
    history = results["histories"]["amigo"]
    assert history[0]["val_loss"] == pytest.approx(2.302585, abs=1e-4)  # zero model: log(10)
    assert history[-1]["val_loss"] < 0.8
    assert history[-1]["auc"] > 0.8
    state = torch.load(tmp_path / "amigo" / "state.pt", weights_only=True)
    w = state["runs"]["amigo"]["w"]
    from applications.datacleaning.data import load_cleaning_data

    corrupted = load_cleaning_data(n_train=600, n_val=200, n_test=200, p=0.5, seed=0).corrupted
    mean_clean, mean_corrupted = torch.sigmoid(w[~corrupted]).mean(), torch.sigmoid(w[corrupted]).mean()
    assert float(mean_clean - mean_corrupted) > 0.2
    base = results["baselines"]
    assert base["oracle"]["test_acc"] > base["unweighted"]["test_acc"]
    for f in ("metrics.csv", "metrics.jsonl", "plot.png", "results.json"):
        assert (tmp_path / "amigo" / f).is_file()
    assert len((tmp_path / "amigo" / "metrics.csv").read_text().splitlines()) == 1 + 4  # header + steps 0..60
    written = json.loads((tmp_path / "amigo" / "results.json").read_text())
    assert written["best"] == "amigo"
    # labelled with every option the method ran with, defaults included (not only those the config names)
    resolved = written["method_options"]["amigo"]
    from applications.common.config import resolved_options
    from applications.datacleaning.methods import build_method

    assert resolved == resolved_options(build_method("amigo")) | {k: v for k, v in cfg.methods[0].options.items()}
    assert {"outer_lr", "inner_steps", "system_steps"} <= set(resolved)


def test_a_short_run_of_the_weighting_network_improves_validation_and_down_weights_corrupted_samples(tmp_path):
    cfg = small(tmp_path, "mwn", ["bome"], steps=40, baselines=False, weighting={"name": "network", "hidden": 16})
    cfg.train.outer_lr = 1.0
    history = run_experiment(cfg, log=lambda s: None, progress=False)["histories"]["bome"]
    assert history[-1]["val_loss"] < 0.5 * history[0]["val_loss"]
    assert history[-1]["auc"] > 0.9
    state = torch.load(tmp_path / "mwn" / "state.pt", weights_only=True)
    phi, theta = state["runs"]["bome"]["w"], state["runs"]["bome"]["method"]["theta"]
    assert phi.shape == (3 * 16 + 1,)
    from applications.datacleaning.data import load_cleaning_data
    from applications.datacleaning.models import build_model
    from applications.datacleaning.problem import DataCleaning

    data = load_cleaning_data(n_train=600, n_val=200, n_test=200, p=0.5, seed=0)
    model = build_model("linear", tuple(data.x_train.shape[1:]), data.num_classes, 0)[0]
    problem = DataCleaning(data, model, 1e-3, cfg.weighting.build())
    weights = torch.sigmoid(problem.weight_scores(phi, theta))
    assert float(weights[~data.corrupted].mean() - weights[data.corrupted].mean()) > 0.1


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_lowers_the_validation_loss(tmp_path, name):
    cfg = small(tmp_path, name, [name], steps=20, baselines=False)
    history = run_experiment(cfg, log=lambda s: None, progress=False)["histories"][name]
    assert history[-1]["step"] == 20
    assert history[-1]["val_loss"] < 0.9 * history[0]["val_loss"]


@pytest.mark.parametrize("name", ["stocbio", "soba"])
def test_resume_continues_bit_exactly(tmp_path, name):
    straight = run_experiment(small(tmp_path, "a", [name], steps=40, baselines=False), log=lambda s: None,
                              progress=False)["histories"][name]
    run_experiment(small(tmp_path, "b", [name], steps=20, baselines=False), log=lambda s: None, progress=False)
    resumed = run_experiment(small(tmp_path, "b", [name], steps=40, baselines=False), log=lambda s: None,
                             progress=False)["histories"][name]
    assert [r["step"] for r in resumed] == [0, 20, 40]
    assert [r["val_loss"] for r in resumed] == [r["val_loss"] for r in straight]
    w_a = torch.load(tmp_path / "a" / "state.pt", weights_only=True)["runs"][name]["w"]
    w_b = torch.load(tmp_path / "b" / "state.pt", weights_only=True)["runs"][name]["w"]
    assert torch.equal(w_a, w_b)


def test_a_checkpoint_of_another_problem_is_refused(tmp_path):
    from applications.common.checkpoint import CheckpointError

    run_experiment(small(tmp_path, "c", ["f2sa"], steps=20, baselines=False), log=lambda s: None, progress=False)
    other = config_from_dict({**small(tmp_path, "c", ["f2sa"], steps=20, baselines=False).to_dict(),
                              "data": {"n_train": 600, "n_val": 200, "n_test": 200, "p": 0.3}})
    with pytest.raises(CheckpointError, match="data.p: saved=0.5 new=0.3"):
        run_experiment(other, log=lambda s: None, progress=False)
