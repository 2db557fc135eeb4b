"""Scaling sweeps: grid expansion, one JSON line per finished run, resume after a kill, same results
in a process pool as in a single process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from navil_utils.errors import ConfigError
from navil_utils.tiny.sweep import ScalingRun, expand_grid, read_results, run_sweep

MICRO = {"llm": [[32, 1], [64, 1]], "vit": [[32, 1]], "seeds": [0, 1], "samples": [64, 128], "batch_size": 16,
         "eval_batches": 2, "warmup_samples": 32, "study": "micro"}


def test_expand_grid_builds_every_combination_with_unique_ids():
    runs = expand_grid(MICRO)
    assert len(runs) == 4 and len({r.run_id for r in runs}) == 4
    assert runs[0].run_id == "micro-llm32x1-vit32x1-lr0.001-bs16-n128-s0"
    assert runs[0].model_overrides()["llm_heads"] == 1 and runs[-1].model_overrides()["llm_kv_heads"] == 1
    with pytest.raises(ConfigError, match="multiple of 32"):
        ScalingRun(48, 1, 32, 1, (64,))
    with pytest.raises(ConfigError, match="multiples of batch_size"):
        ScalingRun(32, 1, 32, 1, (50,))
    with pytest.raises(ConfigError, match="unknown sweep options"):
        expand_grid({**MICRO, "learning_rate": 1})
    with pytest.raises(ConfigError, match="same run twice"):
        expand_grid({**MICRO, "seeds": [0, 0]})


def test_torn_last_line_is_dropped_and_earlier_damage_is_an_error(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"run_id": "a"}\n{"run_id": "b"')
    assert [r["run_id"] for r in read_results(path)] == ["a"]
    assert path.read_text() == '{"run_id": "a"}\n'
    path.write_text('{"run_id": "a"\n{"run_id": "b"}\n')
    with pytest.raises(ConfigError, match="line 1"):
        read_results(path)


def _sweep_cli(grid, results, out_root, workers=1):
    return [sys.executable, "-m", "navil_utils.tiny.sweep", str(grid), "--results", str(results),
            "--out-root", str(out_root), "--workers", str(workers), "--no-progress"]


def test_a_killed_sweep_resumes_losing_and_duplicating_nothing(tmp_path):
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps(MICRO))
    straight = tmp_path / "straight.jsonl"
    done = subprocess.run(_sweep_cli(grid, straight, tmp_path / "runs_straight", workers=2), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]

    killed = tmp_path / "killed.jsonl"
    process = subprocess.Popen(_sweep_cli(grid, killed, tmp_path / "runs_killed"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (killed.exists() and killed.read_text().count("\n") >= 1):
        time.sleep(0.05)
    time.sleep(0.5)  # let the next run start, so the kill interrupts it mid-training
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    partial = read_results(killed)
    assert 1 <= len(partial) < 4
    resumed = subprocess.run(_sweep_cli(grid, killed, tmp_path / "runs_killed"), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    a = {r["run_id"]: r for r in read_results(straight)}
    b = read_results(killed)
    assert len(b) == 4 and sorted(r["run_id"] for r in b) == sorted(a)
    for record in b:  # deterministic training: the same losses, whatever the interruption or process
        assert record["budgets"] == a[record["run_id"]]["budgets"]
        assert record["params_total"] == a[record["run_id"]]["params_total"]


def test_records_hold_what_a_scaling_analysis_needs(tmp_path):
    run = ScalingRun(32, 1, 32, 1, (64, 128), batch_size=16, eval_batches=2, warmup_samples=32)
    (record,) = run_sweep([run], tmp_path / "r.jsonl", out_root=tmp_path / "runs", progress=False)
    assert record["params_encoder"] < record["params_active"] < record["params_total"]
    assert [b["samples"] for b in record["budgets"]] == [64, 128]
    assert record["budgets"][1]["tokens"] > record["budgets"][0]["tokens"] > 0
    assert 0 < record["budgets"][0]["caption_tokens"] < record["budgets"][0]["tokens"]
    assert record["val_loss"] == record["budgets"][-1]["val_loss"] < record["budgets"][0]["val_loss"]
    assert record["device"] == "cpu" and record["train_seconds"] >= 0 and "cores" in record["machine"]
    assert run_sweep([run], tmp_path / "r.jsonl", out_root=tmp_path / "runs", progress=False) == [record]


def test_ray_backend_gives_the_local_results(tmp_path):
    """Runs as Ray tasks on a local Ray that this test starts and stops: same records as in-process."""
    import ray
    runs = expand_grid({**MICRO, "seeds": [0]})
    local = run_sweep(runs, tmp_path / "local.jsonl", out_root=tmp_path / "local", progress=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = run_sweep(runs, tmp_path / "ray.jsonl", out_root=tmp_path / "ray", backend="ray", progress=False)
    finally:
        ray.shutdown()
    assert not ray.is_initialized()
    assert [r["run_id"] for r in remote] == [r["run_id"] for r in local]
    assert [r["budgets"] for r in remote] == [r["budgets"] for r in local]
    assert len(read_results(tmp_path / "ray.jsonl")) == len(runs)


def test_explicit_runs_take_the_shared_seed_and_lr():
    spec = {"samples": [64], "seeds": [1, 2], "lr": 0.002,
            "runs": [{"llm_width": 32, "llm_layers": 1, "vit_width": 32, "vit_layers": 1},
                     {"llm_width": 64, "llm_layers": 1, "vit_width": 32, "vit_layers": 1, "lr": 0.004}]}
    runs = expand_grid(spec)
    assert [(r.llm_width, r.seed, r.lr) for r in runs] == [(32, 1, 0.002), (32, 2, 0.002), (64, 1, 0.004),
                                                         (64, 2, 0.004)]
    single = {k: v for k, v in spec.items() if k != "seeds"}
    assert [r.seed for r in expand_grid({**single, "seed": 3})] == [3, 3]


def test_a_2x2_sweep_end_to_end_from_the_command_line_to_notebook_05(tmp_path, monkeypatch):
    """The CI-sized study: a 2 LLM x 2 encoder sweep on the command line (two workers), then chapter 05
    re-plotted from its results through papermill parameters, as a user would point it at their sweep."""
    import papermill

    from navil_utils.analysis.scaling import optimal_encoders, sweep_frame
    from navil_utils.paths import repo_root

    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({**MICRO, "vit": [[32, 1], [32, 2]], "seeds": [0], "study": "ci"}))
    results = tmp_path / "ci.jsonl"
    done = subprocess.run(_sweep_cli(grid, results, tmp_path / "runs", workers=2), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"runs": 4, "finished": 4, "results": str(results)}
    records = read_results(results)
    frame = sweep_frame(records)
    assert sorted(frame.groupby(["llm_params", "encoder_params"]).size()) == [2, 2, 2, 2]  # 2x2 cells, 2 budgets
    assert set(optimal_encoders(frame[frame["samples"] == 128])) == set(frame["llm_params"])

    monkeypatch.setenv("NAVIL_FIGURES_DIR", str(tmp_path / "figures"))
    out = tmp_path / "05.ipynb"
    papermill.execute_notebook(str(repo_root() / "notebooks" / "05_scaling_curves.ipynb"), str(out),
                               parameters={"results": str(results), "ablation_results": str(tmp_path / "none.jsonl"),
                                           "long_results": str(tmp_path / "none.jsonl"), "n_boot": 20},
                               cwd=str(repo_root() / "notebooks"), progress_bar=False, kernel_name="python3")
    text = out.read_text()
    assert "4 finished runs in" in text and "no complete ablation" in text and "no long runs" in text
    assert (tmp_path / "figures" / "05_loss_vs_encoder.png").exists()
