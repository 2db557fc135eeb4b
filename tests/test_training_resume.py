"""Killed training runs resume bit for bit, whatever the moment of the kill; bad launches touch nothing.

The kill tests count the file-system operations of a run (``os.write``, ``rename``, ``replace``, ``unlink``,
``rmdir``, ``mkdir``) and "kill" the run at the k-th one: a ``write`` is cut in half first (a torn file or log
line), then the run stops dead.  In-process the kill is an exception that nothing catches; in the forked test it
is a real ``SIGKILL``.  Kill points come from seeded generators, so every run of these tests is the same.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from navil_utils.errors import (
    CheckpointError,
    ConfigError,
    CorruptCheckpointError,
    RunDirectoryError,
)
from navil_utils.paths import repo_root
from navil_utils.tiny.checkpointing import (
    load_checkpoint,
    recover_checkpoint,
    save_checkpoint,
)
from navil_utils.tiny.train import TrainConfig, main, train

MICRO_MODEL = {"vit_width": 32, "vit_layers": 1, "vit_heads": 2, "llm_width": 64, "llm_layers": 1,
               "llm_heads": 2, "llm_kv_heads": 1, "llm_intermediate": 128}
TOKENIZER = str(repo_root() / "data/models/navil-tiny")


def micro_values(**overrides) -> dict:
    """4 steps, a checkpoint every 2 (the first one, one replacing it, the final one), a log record every
    step and evaluations at steps 3 and 4."""
    values = dict(tokenizer=TOKENIZER, total_steps=4, batch_size=4, lr=2e-3, warmup_steps=2, log_every=1,
                  eval_every=3, eval_batches=1, checkpoint_every=2, threads=1, progress=False, model=MICRO_MODEL,
                  max_pixels=64 * 64, data={"image_size_range": [64, 64], "aspect_ratios": [1.0]},
                  curriculum=[[0.0, {"color": 1.0}]])
    values.update(overrides)
    return values


def micro_config(out, **overrides) -> TrainConfig:
    return TrainConfig.from_dict(micro_values(out=str(out), **overrides))


class SimulatedKill(BaseException):
    """Stands for SIGKILL: nothing after it runs (not even ``except Exception`` blocks)."""


def _raise_kill() -> None:
    raise SimulatedKill


def _no_fsync(fd: int) -> None:
    """A kill of the process loses nothing that reached the kernel: fsync matters only on power loss."""


class KillSwitch:
    """Count the file-system operations inside the block and kill the process at the ``at``-th one.

    A ``write`` is torn first (half of its bytes reach the file).  ``killed`` describes the operation hit:
    ``(name, path)``.  ``die`` raises :class:`SimulatedKill` by default.
    """

    NAMES = ("write", "rename", "replace", "unlink", "rmdir", "mkdir")

    def __init__(self, at: int | None = None, die=_raise_kill) -> None:
        self.at, self.die, self.count, self.killed, self.log = at, die, 0, None, []
        self.originals = {name: getattr(os, name) for name in self.NAMES}

    def __enter__(self) -> KillSwitch:
        for name, function in self.originals.items():
            setattr(os, name, self._wrap(name, function))
        self.fsync, os.fsync = os.fsync, _no_fsync  # durability against power loss is not what is tested here
        return self

    def __exit__(self, *exc) -> None:
        for name, function in self.originals.items():
            setattr(os, name, function)
        os.fsync = self.fsync

    @staticmethod
    def _target(name: str, args, kwargs) -> str:
        if name == "write":
            return os.readlink(f"/proc/self/fd/{args[0]}")
        if kwargs.get("dir_fd") is not None:
            return os.path.join(os.readlink(f"/proc/self/fd/{kwargs['dir_fd']}"), os.fsdecode(args[0]))
        return os.fsdecode(args[0])

    def _wrap(self, name: str, function):
        def operation(*args, **kwargs):
            self.count += 1
            self.log.append((name, self._target(name, args, kwargs)))
            if self.count == self.at:
                self.killed = (name, self._target(name, args, kwargs))
                if name == "write":
                    data = memoryview(args[1])
                    function(args[0], data[: len(data) // 2])
                self.die()
            return function(*args, **kwargs)
        return operation


def run_until(config: TrainConfig, at: int | None) -> tuple[bool, KillSwitch]:
    """Train with a kill at operation ``at``; return (finished, switch)."""
    with KillSwitch(at) as switch:
        try:
            train(config)
        except SimulatedKill:
            return False, switch
    return True, switch


def log_records(run: Path) -> list[dict]:
    """The log without its wall-clock field."""
    return [{k: v for k, v in json.loads(line).items() if k != "minutes"}
            for line in (run / "log.jsonl").read_text().splitlines()]


def assert_same_run(run: Path, reference: Path) -> None:
    """Same log records (bar "minutes"), bit-identical final and checkpoint weights, no leftovers."""
    assert log_records(run) == log_records(reference)
    for name in ("final/model.safetensors", "checkpoint/model.safetensors", "checkpoint/optimizer.safetensors"):
        a, b = load_file(reference / name), load_file(run / name)
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} differs from the uninterrupted run"
    assert sorted(os.listdir(run)) == sorted(os.listdir(reference))


def committed_step(run: Path, scratch: Path) -> int | None:
    """The step of the checkpoint a resume would start from (recovered on a copy; its files must load)."""
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir()
    for name in ("checkpoint", "checkpoint.tmp", "checkpoint.old"):
        if (run / name).exists():
            shutil.copytree(run / name, scratch / name)
    if not recover_checkpoint(scratch / "checkpoint"):
        return None
    for name in ("model.safetensors", "optimizer.safetensors", "rng.safetensors"):
        load_file(scratch / "checkpoint" / name)
    return json.loads((scratch / "checkpoint" / "trainer_state.json").read_text())["step"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, int]:
    """An uninterrupted run and the number of file-system operations it makes."""
    run = tmp_path_factory.mktemp("reference") / "run"
    finished, switch = run_until(micro_config(run), None)
    assert finished
    return run, switch.count


def test_a_kill_at_any_file_operation_resumes_bit_for_bit(reference, tmp_path):
    """For every k: kill at operation k (inside a checkpoint file, between the renames, while deleting the
    old checkpoint, inside a log line, before the export, ...), kill the resumed run again at a seeded random
    operation (often inside its recovery), then resume to the end.  At every kill the checkpoint a resume
    would use is complete and never older than the one before; the end is the uninterrupted run bit for bit,
    its log included."""
    reference_run, total = reference
    assert total > 30  # checkpoint files, log lines and configuration are all written through os.write
    rng = random.Random(1234)
    hits = []
    for k in range(1, total + 1):
        run = tmp_path / f"k{k}"
        committed = None
        for at in (k, rng.randint(1, total)):
            finished, switch = run_until(micro_config(run), at)
            if finished:
                break
            hits.append(switch.killed)
            step = committed_step(run, tmp_path / "scratch")
            assert step is not None or committed is None, f"kill at {switch.killed} lost the only checkpoint"
            assert committed is None or step >= committed, f"kill at {switch.killed} went back to step {step}"
            committed = step
        assert run_until(micro_config(run), None)[0]
        assert_same_run(run, reference_run)
        shutil.rmtree(run)
    # the kills did land everywhere that matters
    where = {(name, Path(path).parent.name if Path(path).parent.name.startswith("checkpoint") else Path(path).name)
             for name, path in hits}
    for expected in [("write", "checkpoint.tmp"), ("write", "log.jsonl"), ("rename", "checkpoint"),
                     ("rename", "checkpoint.tmp"), ("unlink", "checkpoint.old"), ("rmdir", "checkpoint.old"),
                     ("mkdir", "checkpoint.tmp"), ("write", "train_config.json.tmp"), ("mkdir", "final")]:
        assert expected in where, (expected, sorted(where))
    assert len(hits) > total


def _sigkill_chain(run: Path, seed: int, notes: Path) -> int:
    """Fork children that train ``run`` and SIGKILL themselves at seeded random operations until one
    finishes; each kill's operation is appended to ``notes``.  Return the number of kills."""
    rng = random.Random(seed)
    for kills in range(40):
        at = rng.randint(1, 25)
        pid = os.fork()
        if pid == 0:  # child: nothing after the SIGKILL runs, not even finally blocks or atexit
            code = 1
            try:
                def die() -> None:
                    with open(notes, "a") as handle:
                        handle.write(json.dumps(switch.killed) + "\n")
                    os.kill(os.getpid(), signal.SIGKILL)

                with KillSwitch(at, die=die) as switch:
                    train(micro_config(run))
                code = 0
            finally:
                os._exit(code)
        deadline = time.monotonic() + 120
        while not (child := os.waitpid(pid, os.WNOHANG))[0]:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("a forked training child hung")
            time.sleep(0.01)
        status = child[1]
        if not os.WIFSIGNALED(status):
            assert os.WEXITSTATUS(status) == 0, "the child failed"
            return kills
        assert os.WTERMSIG(status) == signal.SIGKILL
    pytest.fail(f"{run} never finished")


def test_sigkilled_runs_resume_bit_for_bit(reference, tmp_path):
    """Real SIGKILLs in forked children at seeded random operations, again and again on one run directory
    until a child finishes (four such chains): each result is the uninterrupted run bit for bit."""
    reference_run, _ = reference
    notes = tmp_path / "kills.jsonl"
    kills = 0
    for seed in (99, 100, 101, 102):
        run = tmp_path / f"run{seed}"
        kills += _sigkill_chain(run, seed, notes)
        assert_same_run(run, reference_run)
    hit = [tuple(json.loads(line)) for line in notes.read_text().splitlines()]
    assert kills == len(hit) >= 12
    assert any("checkpoint.tmp" in path and name == "write" for name, path in hit), hit
    assert any("log.jsonl" in path for _, path in hit), hit


def test_two_processes_resume_a_run_killed_between_the_checkpoint_renames(tmp_path):
    """Killed after the old checkpoint was moved aside and before the new one was moved into place: a
    two-process ``accelerate launch`` (where every process used to run the recovery at once) resumes from the
    new checkpoint (step 4), logs each step once and ends where a single uninterrupted process does."""
    import subprocess
    import sys

    straight, run = tmp_path / "straight", tmp_path / "run"
    train(micro_config(straight, total_steps=6, eval_batches=0))
    with KillSwitch() as counter:
        train(micro_config(tmp_path / "count", total_steps=6, eval_batches=0))
    renames = [i + 1 for i, (name, path) in enumerate(counter.log) if (name, Path(path).name) == ("rename", "checkpoint.tmp")]
    finished, _ = run_until(micro_config(run, total_steps=6, eval_batches=0), renames[1])  # the save of step 4
    assert not finished and (run / "checkpoint.old").exists() and not (run / "checkpoint").exists()
    config = tmp_path / "config.json"
    config.write_text(json.dumps(micro_values(total_steps=6, eval_batches=0)))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    launcher = Path(sys.executable).with_name("accelerate")
    result = subprocess.run([str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                             "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "navil_utils.train",
                             "--out", str(run), "--config", str(config)],
                            check=False, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" in result.stdout and "at step 4" in result.stdout, result.stdout
    assert [r["step"] for r in log_records(run)] == [1, 2, 3, 4, 5, 6]
    a, b = load_file(straight / "final" / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert sorted(os.listdir(run)) == sorted(os.listdir(straight))


@pytest.mark.parametrize(("kill_after", "torn"), [(1, False), (1, True), (3, False), (3, True)])
def test_resume_keeps_each_log_record_once(reference, tmp_path, kill_after, torn):
    """Killed before the first checkpoint (step 1) or after it (step 3, checkpoint at 2), with or without
    a half-written last log line: the resumed log is the uninterrupted one, no record twice."""
    reference_run, _ = reference
    run = tmp_path / "run"
    train(micro_config(run), _simulate_kill_after=kill_after)
    steps = [r["step"] for r in log_records(run)]
    assert steps == ([1] if kill_after == 1 else [1, 2, 3, 3])
    if torn:
        with open(run / "log.jsonl", "a") as log:
            log.write('{"step": 4, "samples": 16, "loss": 2.3')
    train(micro_config(run))
    assert_same_run(run, reference_run)
    assert [r["step"] for r in log_records(run)] == [1, 2, 3, 3, 4, 4]


def test_a_corrupt_line_inside_the_log_is_named(tmp_path):
    run = tmp_path / "run"
    train(micro_config(run), _simulate_kill_after=3)
    lines = (run / "log.jsonl").read_text().splitlines()
    lines[1] = lines[1][:10]
    (run / "log.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(RunDirectoryError, match=r"log\.jsonl line 2"):
        train(micro_config(run))


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory) -> Path:
    """A run killed after step 3: its checkpoint holds step 2."""
    run = tmp_path_factory.mktemp("killed") / "run"
    train(micro_config(run), _simulate_kill_after=3)
    return run


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "rng.safetensors",
                                  "trainer_state.json"])
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_corrupt_checkpoint_file_is_named(killed_run, tmp_path, name, damage):
    run = tmp_path / "run"
    shutil.copytree(killed_run, run)
    path = run / "checkpoint" / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x07garbage" + data[8:])
    with pytest.raises(CorruptCheckpointError, match=str(path)):
        train(micro_config(run))


def test_a_corrupt_checkpoint_is_reported_by_the_command_line(killed_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(killed_run, run)
    path = run / "checkpoint" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    config = tmp_path / "config.json"
    config.write_text(json.dumps(micro_values()))
    assert main(["--out", str(run), "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "truncated or corrupt" in err and str(path) in err and "Traceback" not in err


def test_load_checkpoint_names_a_missing_file(killed_run, tmp_path):
    directory = tmp_path / "checkpoint"
    shutil.copytree(killed_run / "checkpoint", directory)
    (directory / "rng.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing \['rng.safetensors'\]"):
        load_checkpoint(directory, torch.nn.Linear(2, 2), torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()), None)


@pytest.mark.parametrize(("option", "value"), [
    ("lr", -1), ("lr", 0), ("lr", "fast"), ("total_steps", 0), ("total_steps", 2.5), ("batch_size", 0),
    ("warmup_steps", -1), ("min_lr_ratio", 1.5), ("log_every", 0), ("checkpoint_every", 0), ("eval_every", 0),
    ("eval_batches", -1), ("weight_decay", -0.1), ("grad_clip", 0), ("betas", [0.9, 1.0]), ("betas", [0.9]),
    ("qa_packing", "packed"), ("eval_seed", 1), ("max_pixels", 8), ("threads", 0), ("time_limit_minutes", 0),
    ("curriculum", []), ("curriculum", [[0.5, {"color": 1.0}], [0.1, {"count": 1.0}]]),
    ("curriculum", [[0.0, {"color": -1.0}]]), ("device", "gpu0"), ("bf16", "yes"), ("seed", True),
])
def test_a_bad_option_is_refused_before_the_directory_is_touched(tmp_path, option, value):
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=rf"training option {option}="):
        train(micro_config(run, **{option: value}))
    assert not run.exists()


def test_a_launch_refused_on_the_command_line_leaves_no_trace(reference, tmp_path, capsys):
    """``--set lr=-1`` is refused with the option named and writes nothing; the corrected launch runs."""
    reference_run, _ = reference
    run = tmp_path / "run"
    config = tmp_path / "config.json"
    config.write_text(json.dumps(micro_values()))
    assert main(["--out", str(run), "--config", str(config), "--set", "lr=-1"]) == 2
    assert "lr=-1" in capsys.readouterr().err
    assert not run.exists()
    assert main(["--out", str(run), "--config", str(config)]) == 0
    assert_same_run(run, reference_run)


def test_a_directory_poisoned_by_an_old_refused_launch_accepts_the_corrected_one(reference, tmp_path):
    """A ``train_config.json`` without any checkpoint (older versions wrote it before refusing lr=-1)
    binds nothing: the corrected launch replaces it and trains."""
    reference_run, _ = reference
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.json").write_text(TrainConfig.from_dict(micro_values(out=str(run), lr=-1)).to_json())
    train(micro_config(run))
    assert json.loads((run / "train_config.json").read_text())["lr"] == 2e-3
    assert_same_run(run, reference_run)


def test_a_refused_relaunch_names_each_differing_option_and_both_values(killed_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(killed_run, run)
    saved = (run / "train_config.json").read_text()
    with pytest.raises(RunDirectoryError) as info:
        train(micro_config(run, lr=1e-3, total_steps=5, progress=True))
    message = str(info.value)
    assert "different configuration" in message and str(run / "train_config.json") in message
    assert "lr: saved 0.002, given 0.001" in message
    assert "total_steps: saved 4, given 5" in message
    assert "progress" not in message and "batch_size" not in message
    assert (run / "train_config.json").read_text() == saved
    assert json.loads((run / "checkpoint" / "trainer_state.json").read_text())["step"] == 2


@pytest.mark.parametrize("spelling", ["relative/", "./relative", "absolute", "tokenizer-relative"])
def test_the_same_run_spelled_differently_resumes(reference, tmp_path, monkeypatch, spelling):
    reference_run, _ = reference
    monkeypatch.chdir(tmp_path)
    train(micro_config("relative"), _simulate_kill_after=3)
    out, tokenizer = {"relative/": ("relative/", TOKENIZER), "./relative": ("./relative", TOKENIZER),
                      "absolute": (str(tmp_path / "relative"), TOKENIZER),
                      "tokenizer-relative": ("relative", os.path.relpath(TOKENIZER, tmp_path))}[spelling]
    train(micro_config(out, tokenizer=tokenizer))
    assert_same_run(tmp_path / "relative", reference_run)


def _tiny_state(step: int):
    """A Linear + AdamW whose weights are all ``step`` (one optimiser step taken)."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(step))
    return model, optimizer


def _load_tiny(directory: Path) -> int:
    model, optimizer = _tiny_state(0)
    state = load_checkpoint(directory, model, optimizer, None)
    assert all(torch.equal(p, torch.full_like(p, float(state["step"]))) for p in model.parameters())
    return state["step"]


@pytest.mark.parametrize("previous", [None, 1])
def test_a_kill_inside_a_save_or_its_recovery_never_loses_the_last_checkpoint(tmp_path, previous):
    """Every kill point of a save of step 2 (over a checkpoint of step 1, or the first save), then every
    kill point of the recovery that follows, then a clean recovery: the checkpoint is the old one until the
    old one was moved aside (the first save: none until its COMPLETE manifest is whole), the new one after,
    always complete, and no ``.tmp``/``.old`` is left."""
    base = tmp_path / "base"
    base.mkdir()
    if previous is not None:
        save_checkpoint(base / "checkpoint", *_tiny_state(previous), None, {"step": previous})
    shutil.copytree(base, tmp_path / "count")
    with KillSwitch() as counter:
        save_checkpoint(tmp_path / "count" / "checkpoint", *_tiny_state(2), None, {"step": 2})
    names = [(name, Path(path).name) for name, path in counter.log]
    # the number of the operation after which a recovery yields the new checkpoint
    commit = 1 + names.index(("rename", "checkpoint") if previous else ("write", "COMPLETE"))
    recoveries = 0
    for k in range(1, counter.count + 1):
        expected = previous if k <= commit else 2
        for j in range(1, 20):
            work = tmp_path / "work"
            if work.exists():
                shutil.rmtree(work)
            shutil.copytree(base, work)
            with KillSwitch(k), pytest.raises(SimulatedKill):
                save_checkpoint(work / "checkpoint", *_tiny_state(2), None, {"step": 2})
            with KillSwitch(j):
                try:
                    recover_checkpoint(work / "checkpoint")
                    finished = True
                except SimulatedKill:
                    finished = False
                    recoveries += 1
            found = recover_checkpoint(work / "checkpoint")
            assert found == (expected is not None), (k, j, names[k - 1])
            if found:
                assert _load_tiny(work / "checkpoint") == expected, (k, j, names[k - 1])
            assert not (work / "checkpoint.tmp").exists() and not (work / "checkpoint.old").exists()
            if finished:
                break
    assert recoveries > 0
