"""Training the tiny NaViL: a short run learns, and a killed run resumes bit for bit."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from navil_utils.errors import ConfigError
from navil_utils.tiny.train import TrainConfig, curriculum_stage, lr_factor, main_process_threads, train
from navil_utils.paths import repo_root

MICRO_MODEL = {"vit_width": 32, "vit_layers": 1, "vit_heads": 2, "llm_width": 64, "llm_layers": 1,
               "llm_heads": 2, "llm_kv_heads": 1, "llm_intermediate": 128}


def micro_config(out, **overrides) -> TrainConfig:
    values = dict(out=str(out), tokenizer=str(repo_root() / "data/models/navil-tiny"), total_steps=6,
                  batch_size=4, lr=2e-3, warmup_steps=2, log_every=1, eval_every=1000, eval_batches=0,
                  checkpoint_every=2, threads=1, progress=False, model=MICRO_MODEL, max_pixels=64 * 64,
                  data={"image_size_range": [64, 64], "aspect_ratios": [1.0]},
                  curriculum=[[0.0, {"color": 1.0}]])
    values.update(overrides)
    return TrainConfig.from_dict(values)


def test_lr_schedule_and_curriculum():
    config = TrainConfig(total_steps=1000, warmup_steps=100, min_lr_ratio=0.1)
    assert lr_factor(config, 0) == pytest.approx(0.01)
    assert lr_factor(config, 99) == pytest.approx(1.0)
    assert lr_factor(config, 550) == pytest.approx(0.55)   # half-way through the cosine
    assert lr_factor(config, 1000) == pytest.approx(0.1)
    assert [curriculum_stage(config, s) for s in (0, 99, 100, 249, 250, 449, 450, 999)] == [0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(ConfigError, match="unknown training options"):
        TrainConfig.from_dict({"learning_rate": 1e-3})


def test_short_run_loss_drops_clearly(tmp_path):
    train(micro_config(tmp_path, total_steps=40, batch_size=8, log_every=5))
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 8
    assert losses[-1] < 0.5 * losses[0], losses   # from ~6 nats (uniform over the vocabulary) to the answer prior
    final = tmp_path / "final"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (final / name).exists(), name


def test_killed_run_resumes_bit_for_bit(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(micro_config(straight))
    train(micro_config(resumed), _simulate_kill_after=3)          # dies after step 3; checkpoint holds step 2
    state = json.loads((resumed / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2 and not (resumed / "final").exists()
    train(micro_config(resumed))                                  # same command again: resumes at step 2
    a = load_file(straight / "final" / "model.safetensors")
    b = load_file(resumed / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    log_a = [json.loads(x) for x in (straight / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (resumed / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in log_a] == [(r["step"], r["loss"]) for r in log_b]


def test_resuming_with_different_options_is_refused(tmp_path):
    train(micro_config(tmp_path, total_steps=2))
    with pytest.raises(ConfigError, match="different configuration"):
        train(micro_config(tmp_path, total_steps=2, lr=1e-3))


class SimulatedKill(BaseException):
    """Stands for SIGKILL: nothing after it runs (not even `except Exception` blocks)."""


def test_kill_between_the_checkpoint_renames_loses_nothing(tmp_path, monkeypatch):
    """Killed after the old checkpoint was moved aside but before the new one was moved into place: the
    next run recovers the complete new checkpoint, resumes from it, ends bit-identical to an uninterrupted
    run, and its log has each step exactly once."""
    import pathlib

    from navil_utils.tiny import checkpointing

    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    train(micro_config(straight))
    original_rename = pathlib.Path.rename
    saves = {"n": 0}

    def rename(self, target):
        if self.name == "checkpoint.tmp":
            saves["n"] += 1
            if saves["n"] == 2:  # the second periodic save (step 4): die between the two renames
                assert (self.parent / "checkpoint.old").exists() and not (self.parent / "checkpoint").exists()
                raise SimulatedKill
        return original_rename(self, target)

    monkeypatch.setattr(pathlib.Path, "rename", rename)
    with pytest.raises(SimulatedKill):
        train(micro_config(crashed))
    monkeypatch.setattr(pathlib.Path, "rename", original_rename)
    assert not (crashed / "checkpoint").exists() and (crashed / "checkpoint.old").exists()
    assert (crashed / "checkpoint.tmp" / checkpointing.COMPLETE_MARKER).exists()

    train(micro_config(crashed))
    assert not (crashed / "checkpoint.old").exists() and not (crashed / "checkpoint.tmp").exists()
    a = load_file(straight / "final" / "model.safetensors")
    b = load_file(crashed / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (crashed / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_recover_prefers_a_complete_new_checkpoint_and_falls_back_to_the_old(tmp_path):
    from navil_utils.tiny.checkpointing import COMPLETE_MARKER, recover_checkpoint

    directory = tmp_path / "checkpoint"
    assert recover_checkpoint(directory) is False
    for marker, expected in ((True, "new"), (False, "old")):
        for name, tag in (("checkpoint.old", "old"), ("checkpoint.tmp", "new")):
            (tmp_path / name).mkdir()
            (tmp_path / name / "tag").write_text(tag)
        if marker:
            (tmp_path / "checkpoint.tmp" / COMPLETE_MARKER).write_text("4")
        assert recover_checkpoint(directory) is True
        assert (directory / "tag").read_text() == expected
        assert not (tmp_path / "checkpoint.old").exists() and not (tmp_path / "checkpoint.tmp").exists()
        import shutil

        shutil.rmtree(directory)


def test_training_leaves_the_callers_threads_and_rng_alone(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    try:
        train(micro_config(tmp_path, total_steps=2, threads=1))
        assert torch.get_num_threads() == 2
        assert torch.equal(torch.get_rng_state(), before)
    finally:
        torch.set_num_threads(threads)


def test_main_process_threads_leave_the_data_workers_their_cores(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert main_process_threads(cuda, 14, None) == 2        # 14 workers + 2 threads = the 16 cores
    assert main_process_threads(cuda, 20, None) == 1        # never below one
    assert main_process_threads(cuda, 14, 6) == 6           # an explicit count wins
    assert main_process_threads(cuda, 0, None) is None      # no workers: torch's default
    assert main_process_threads(cpu, 1, None) is None       # CPU training keeps its configured behaviour
    assert main_process_threads(cpu, 1, 2) == 2


@pytest.mark.parametrize("variant", ["internlm2_ve", "qwen3_ve"])
def test_embedding_tables_of_both_backbones_get_no_weight_decay(variant):
    from navil_utils.reference.golden import load_golden_case
    from navil_utils.tiny.train import no_weight_decay

    model = load_golden_case(variant).model
    exempt = no_weight_decay(model)
    embedding = "language_model.model.tok_embeddings.weight" if variant == "internlm2_ve" \
        else "language_model.model.embed_tokens.weight"
    assert embedding in dict(model.named_parameters())
    assert {embedding, "special_token_embedding.weight"} <= exempt
    matrices = [n for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n]
    assert matrices and not exempt & set(matrices)
    assert all(p.ndim < 2 for n, p in model.named_parameters() if n in exempt and "embed" not in n)


def test_resume_message_only_when_resuming(tmp_path, capsys):
    train(micro_config(tmp_path, total_steps=2))
    assert "resuming" not in capsys.readouterr().out
    train(micro_config(tmp_path, total_steps=2))
    assert "resuming" in capsys.readouterr().out


def test_data_parallel_run_under_accelerate_launch_matches_one_process(tmp_path):
    """Two CPU processes under ``accelerate launch`` (gloo) split each batch and make the single-process
    updates: the same tokens, losses and weights up to float32 round-off."""
    import socket
    import sys

    config = tmp_path / "config.json"
    values = json.loads(micro_config(tmp_path, batch_size=8, eval_every=3, eval_batches=1).to_json())
    values.pop("out")
    config.write_text(json.dumps(values))
    env = {**{k: v for k, v in os.environ.items() if k not in DISTRIBUTED_VARIABLES},
           "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    single = run_with_stack_dump([sys.executable, "-m", "navil_utils.train", "--out", str(tmp_path / "one"),
                                  "--config", str(config)], env, tmp_path / "one.log")
    assert single.returncode == 0, single.stderr[-2000:]
    launcher = Path(sys.executable).with_name("accelerate")
    with socket.socket() as probe:      # a free rendezvous port: a stray process on the default 29500 cannot block it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    parallel = run_with_stack_dump([str(launcher), "launch", "--multi_gpu", "--num_processes", "2",
                                    "--num_machines", "1", "--main_process_port", str(port),
                                    "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "navil_utils.train",
                                    "--out", str(tmp_path / "two"), "--config", str(config)],
                                   env, tmp_path / "two.log")
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    assert "[rank1]" in parallel.stderr  # two processes ran
    logs = [[json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
            for run in ("one", "two")]
    assert [(r["step"], "loss" in r) for r in logs[0]] == [(r["step"], "loss" in r) for r in logs[1]]  # logged once
    for a, b in zip(*logs):
        assert a.get("tokens") == b.get("tokens") and a.get("answer_tokens") == b.get("answer_tokens")
        key = "loss" if "loss" in a else "eval_token_loss"
        assert b[key] == pytest.approx(a[key], rel=1e-5)
    one, two = (load_file(str(tmp_path / run / "final" / "model.safetensors")) for run in ("one", "two"))
    assert one.keys() == two.keys()
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-5


# variables an outer launcher may have set; the launched run must start its own process group
DISTRIBUTED_VARIABLES = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                         "MASTER_PORT", "TORCHELASTIC_RUN_ID"}


def run_with_stack_dump(command: list[str], env: dict[str, str], log: Path, timeout: float = 300):
    """Run ``command`` with stdout/stderr in files; returns a CompletedProcess. If it outlives ``timeout``, it
    and every process it started (torch's launcher puts each rank in a session of its own) get SIGABRT — with
    ``PYTHONFAULTHANDLER=1`` each Python process prints where it waits — then SIGKILL, and the test fails with
    those stacks: a hang is diagnosable and leaves no stray rank holding a core."""
    import signal
    import subprocess
    import time

    import psutil

    with open(log.with_suffix(".out"), "w+") as out, open(log.with_suffix(".err"), "w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env)
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            tree = [psutil.Process(process.pid)]
            with contextlib.suppress(psutil.Error):
                tree += tree[0].children(recursive=True)
            listing = []
            for member in tree:
                with contextlib.suppress(psutil.Error):
                    listing.append(f"{member.pid} {member.status()} {' '.join(member.cmdline())[:200]}")
                    member.send_signal(signal.SIGABRT)
            time.sleep(5)
            for member in tree:
                with contextlib.suppress(psutil.Error):
                    member.kill()
            process.wait()
            err.seek(0)
            listing_text = "\n".join(listing)
            pytest.fail(f"{command[:3]} still running after {timeout} s; processes:\n{listing_text}\n"
                        f"stderr with their stacks:\n{err.read()[-20000:]}")
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(command, returncode, out.read(), err.read())


def test_export_init_writes_the_model_a_run_starts_from(tmp_path, capsys):
    from navil_utils.models.loading import load_model
    from navil_utils.tiny.train import build_model, main
    from navil_utils.tiny.tokenizer import load_tiny_tokenizer

    config = micro_config(tmp_path / "run", seed=3)
    args = ["--out", str(tmp_path / "run"), "--set", "seed=3", "--set", f"model={json.dumps(MICRO_MODEL)}",
            "--set", f"tokenizer={json.dumps(config.tokenizer)}", "--set", "max_pixels=4096"]
    assert main(args + ["--export-init", str(tmp_path / "step0")]) == 0
    assert "exported the initial model" in capsys.readouterr().out
    assert not (tmp_path / "run" / "checkpoint").exists()                   # nothing was trained
    expected = build_model(config, load_tiny_tokenizer(config.tokenizer)).state_dict()
    exported = load_model(tmp_path / "step0").state_dict()
    assert exported.keys() == expected.keys() and all(torch.equal(exported[k], expected[k]) for k in expected)
    # with init_from, the run starts from those weights whatever its own seed
    assert main(args[:2] + ["--set", "seed=4"] + args[4:] + ["--set", f"init_from={json.dumps(str(tmp_path / 'step0'))}",
                                                             "--export-init", str(tmp_path / "again")]) == 0
    again = load_model(tmp_path / "again").state_dict()
    assert all(torch.equal(again[k], expected[k]) for k in expected)
    assert main(args + ["--set", "learning_rate=1e-3", "--export-init", str(tmp_path / "bad")]) == 2
    assert "unknown training options" in capsys.readouterr().err
