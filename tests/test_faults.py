"""The pipeline under faults (issue 28): two writers on one output, resumes with changed settings,
damaged files, interruptions at awkward moments, a full disk, closed pipes and signals.

Real processes and real signals where the fault is a process's (`adjust` started with
`python -m adjust.cli`, killed with SIGKILL, SIGTERM, SIGINT); real files damaged the way a
disk or a kill damages them otherwise. The long random kill sweep is scripts/fault_sweep.py.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from adjust.distill.rollouts import META, load_rollouts, shard_name
from adjust.distill.train import STATE_FILE as DISTILL_STATE
from adjust.distill.train import DistillConfig, distill
from adjust.errors import AdjustError
from adjust.lock import LOCK_FILE, acquire, release
from adjust.train_base import STATE_FILE, TrainConfig, train_base

from conftest import CORPUS
from test_cli import assert_one_error_line, cli

G = 8
ROLL = ["--gen-length", G, "--shard-size", 4, "--batch-size", 4, "--seed", 1, "--quiet"]
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def adjust_proc(*argv, **kw) -> subprocess.Popen:
    """`adjust argv...` as a process of its own."""
    return subprocess.Popen([sys.executable, "-m", "adjust.cli", *map(str, argv)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def wait_for(check, proc: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    end = time.time() + timeout
    while not check():
        if proc.poll() is not None:
            pytest.fail(f"the process ended (rc {proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        if time.time() > end:
            proc.kill()
            pytest.fail(f"no {what} after {timeout} s")
        time.sleep(0.05)


def one_error(rc, err, *words) -> str:
    """The one `adjust: error:` line (exit 2), holding every one of `words`."""
    assert_one_error_line(rc, err, *words)
    return err.strip()


def rollouts(capsys, base_dir, out, n, *extra):
    return cli(capsys, "rollouts", "--base", base_dir, "--out", out, "--num-samples", n, *ROLL, *extra)


def flip_tensor_byte(path: Path) -> None:
    """Flip one byte in the middle of the largest tensor stored in a torch.save file (a zip of raw data)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x10]))


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # the raw data of a safetensors file's last tensor
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "toy.txt"
    path.write_text("\n".join(CORPUS * 2))
    return path


TB = ["--vocab-size", 300, "--hidden-size", 32, "--layers", 1, "--heads", 2, "--intermediate-size", 64,
      "--seq-len", 32, "--batch-size", 8, "--warmup", 2, "--eval-every", 2, "--quiet"]


def tb_cfg(steps: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=8, seq_len=32, eval_every=2, warmup=2, eval_batches=2)


def tb_model(vocab: int = 300):
    from adjust.base.tiny import TinyConfig

    return TinyConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, tokenizer_size=vocab,
                      max_length=32)


@pytest.fixture(scope="module")
def made(tiny_model_dir, tmp_path_factory):
    """12 rollouts of the tiny base in shards of 4."""
    from adjust.cli import main

    out = tmp_path_factory.mktemp("faults") / "r"
    assert main([str(a) for a in ["rollouts", "--base", tiny_model_dir, "--out", out, "--num-samples", 12, *ROLL]]) == 0
    return out


DCFG = dict(steps=4, batch_size=4, lr=1e-3, warmup=1, max_unrolls=2, eval_every=2, val_examples=4)


# --------------------------------------------------------------------------------------------
# 1: one writer per output directory; the lock dies with its holder
# --------------------------------------------------------------------------------------------

def test_two_rollouts_runs_on_one_out_do_not_mix(capsys, tiny_model_dir, tmp_path):
    """Issue 28.1: two rollouts processes started together on one --out with different prompts: one runs,
    the other is refused naming the runner's PID (before: both ran, their shards mixed)."""
    out = tmp_path / "r"
    procs = {p: adjust_proc("rollouts", "--base", tiny_model_dir, "--out", out, "--num-samples", 100000, *ROLL,
                            "--prompt", p) for p in ("Omar lives in", "Ada lives in")}
    try:
        end = time.time() + 60
        while all(p.poll() is None for p in procs.values()) and time.time() < end:
            time.sleep(0.05)
        done = [p for p in procs.values() if p.poll() is not None]
        assert len(done) == 1, "both ran" if not done else "both ended"
        (loser,), (winner,) = done, [p for p in procs.values() if p not in done]
        one_error(loser.returncode, loser.stderr.read(), str(out), f"PID {winner.pid}", "in use")
        wait_for(lambda: any(out.glob("shard-*")), winner, "a shard")
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
    acquire(out)  # the lock died with its holder (kill -9)
    release(out)


def test_train_base_and_distill_take_the_lock_too(data_file, tiny_base, made, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from adjust.lock import acquire; "
                               "acquire(sys.argv[1]); print('held', flush=True); time.sleep(60)", str(tmp_path / "o")],
                              env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(AdjustError, match=f"in use by another adjust run \\(PID {holder.pid}\\)"):
            train_base(data_file, tmp_path / "o", tb_cfg(2), tb_model(), progress=False)
        with pytest.raises(AdjustError, match=f"PID {holder.pid}"):
            distill(tiny_base, load_rollouts(made), tmp_path / "o", DistillConfig(**DCFG), progress=False)
        assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [LOCK_FILE]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    acquire(tmp_path / "o")  # released by the OS with its holder
    release(tmp_path / "o")


# --------------------------------------------------------------------------------------------
# 2: every setting that shapes an output is recorded and checked on resume
# --------------------------------------------------------------------------------------------

def test_rollouts_resume_with_another_dtype_is_refused(capsys, tiny_model_dir, tmp_path):
    """Issue 28.2: float32 shards and bfloat16 shards never end up in one set."""
    out = tmp_path / "r"
    assert rollouts(capsys, tiny_model_dir, out, 4)[0] == 0
    one_error(*rollouts(capsys, tiny_model_dir, out, 8, "--dtype", "bfloat16")[::2], "other settings", "--dtype")
    assert sorted(p.name for p in out.glob("shard-*")) == [shard_name(0, 4)]
    assert json.loads((out / META).read_text())["dtype"] == "float32"


def test_rollouts_resume_with_a_changed_base_is_refused(capsys, tiny_model_dir, tmp_path):
    """Issue 28.5: an edited rope_theta or one flipped weight byte in the base is another base."""
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    out = tmp_path / "r"
    assert rollouts(capsys, base, out, 4)[0] == 0
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "rope_theta": cfg["rope_theta"] * 2}))
    one_error(*rollouts(capsys, base, out, 8)[::2], "other settings", "--base (its weights or config.json changed)")
    (base / "config.json").write_text(json.dumps(cfg))
    flip_last_byte(base / "model.safetensors")
    one_error(*rollouts(capsys, base, out, 8)[::2], "--base (its weights or config.json changed)")


def test_distill_refuses_a_base_changed_since_its_rollouts(capsys, tiny_model_dir, made, tmp_path):
    """Issue 28.5: one flipped weight byte in the base after the rollouts were drawn: distill would train the
    sampler on another model's samples; refused, naming --base."""
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    flip_last_byte(base / "model.safetensors")
    rc, _, err = cli(capsys, "distill", "--base", base, "--rollouts", made, "--out", tmp_path / "s", "--steps", 2,
                     "--batch-size", 4, "--max-unrolls", 2, "--quiet")
    one_error(rc, err, "--base tiny-test", "changed since these rollouts were drawn")


def test_train_base_resume_with_another_vocab_size_is_refused(capsys, data_file, tmp_path):
    """Issue 28.3."""
    out = tmp_path / "m"
    rc, _, err = cli(capsys, "train-base", "--data", data_file, "--out", out, "--steps", 2, *TB)
    assert rc == 0, err
    tb = [a if a != 300 else 400 for a in TB]
    one_error(*cli(capsys, "train-base", "--data", data_file, "--out", out, "--steps", 4, *tb)[::2],
              "--vocab-size was 300, now 400")


def test_steps_below_the_saved_step_are_refused_and_extension_follows_the_rule(data_file, tiny_base, made, tmp_path):
    """Issue 28.4: a lower --steps is refused (train-base and distill); a raised one continues at the end of
    the schedule the run started with (the documented rule), so its first steps are the shorter run's."""
    out = tmp_path / "m"
    train_base(data_file, out, tb_cfg(4), tb_model(), progress=False)
    with pytest.raises(AdjustError, match="--steps 2 is below it"):
        train_base(data_file, out, tb_cfg(2), tb_model(), progress=False)
    train_base(data_file, out, tb_cfg(6), tb_model(), progress=False)
    state = torch.load(out / STATE_FILE, weights_only=True)
    cfg = tb_cfg(6)
    assert state["step"] == 6 and state["settings"]["schedule_steps"] == 4
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(cfg.lr * cfg.min_lr_ratio)  # the end value

    # an interrupted run (a state at step 2 of a 6-step schedule) cannot be finished with a shorter schedule
    cut = tmp_path / "cut"
    train_base(data_file, cut, tb_cfg(2), tb_model(), progress=False)
    state = torch.load(cut / STATE_FILE, weights_only=True)
    state["settings"]["schedule_steps"] = 6
    from adjust.io import save_state

    save_state(cut / STATE_FILE, state)
    with pytest.raises(AdjustError, match="started with --steps 6; --steps 4 would cut its schedule short"):
        train_base(data_file, cut, tb_cfg(4), tb_model(), progress=False)

    r = load_rollouts(made)
    distill(tiny_base, r, tmp_path / "s", DistillConfig(**DCFG), progress=False)
    with pytest.raises(AdjustError, match="--steps 2 is below it"):
        distill(tiny_base, r, tmp_path / "s", DistillConfig(**{**DCFG, "steps": 2}), progress=False)


# --------------------------------------------------------------------------------------------
# 3: integrity
# --------------------------------------------------------------------------------------------

def test_a_flipped_byte_in_a_resume_state_is_refused(capsys, data_file, tiny_base, tiny_model_dir, made, tmp_path):
    """Issue 28.5: trainer_state.pt and distill_state.pt."""
    out = tmp_path / "m"
    train_base(data_file, out, tb_cfg(2), tb_model(), progress=False)
    flip_tensor_byte(out / STATE_FILE)
    with pytest.raises(AdjustError, match=f"trainer state {out / STATE_FILE} fails its checksum.*delete it"):
        train_base(data_file, out, tb_cfg(4), tb_model(), progress=False)

    s = tmp_path / "s"
    distill(tiny_base, load_rollouts(made), s, DistillConfig(**DCFG), progress=False)
    flip_tensor_byte(s / DISTILL_STATE)
    rc, _, err = cli(capsys, "distill", "--base", tiny_model_dir, "--rollouts", made, "--out", s, "--steps", 6,
                     "--batch-size", 4, "--lr", 1e-3, "--warmup", 1, "--max-unrolls", 2, "--eval-every", 2, "--quiet")
    one_error(rc, err, f"distill state {s / DISTILL_STATE} fails its checksum", "delete it")


def test_a_damaged_shard_or_edited_metadata_is_refused_and_a_rerun_repairs_the_shard(capsys, tiny_model_dir,
                                                                                    tiny_base, made, tmp_path):
    """Issue 28.5 and 28.12: a flipped byte or a truncation names the shard; the same command recomputes it."""
    r = tmp_path / "r"
    shutil.copytree(made, r)
    flipped, cut = r / shard_name(4, 8), r / shard_name(8, 12)
    flip_last_byte(flipped)
    with pytest.raises(AdjustError, match=f"rollout shard {flipped} fails its checksum.*rerun `adjust rollouts`"):
        load_rollouts(r, tiny_base)
    cut.write_bytes(cut.read_bytes()[:-40])
    rc, _, err = rollouts(capsys, tiny_model_dir, r, 12)
    assert rc == 0, err
    assert f"{flipped.name} fails its checksum" in err and f"{cut.name}" in err and err.count("recomputing it") == 2
    assert torch.equal(load_rollouts(r).tokens, load_rollouts(made).tokens)

    meta = json.loads((r / META).read_text())
    meta["prompts"] = [[5, 6]]
    (r / META).write_text(json.dumps(meta))
    with pytest.raises(AdjustError, match="rollouts metadata .* fails its checksum"):
        load_rollouts(r)


# --------------------------------------------------------------------------------------------
# 4: every interruption is resumable by rerunning the same command
# --------------------------------------------------------------------------------------------

def test_train_base_resumes_after_a_kill_in_its_first_checkpoint(data_file, tmp_path, capsys):
    """Issue 28.6: trainer_state.pt written, tokenizer.json not yet: the same command starts over."""
    straight = tmp_path / "straight"
    train_base(data_file, straight, tb_cfg(4), tb_model(), progress=False)
    out = tmp_path / "m"
    train_base(data_file, out, tb_cfg(2), tb_model(), progress=False)
    for f in out.iterdir():  # what a kill between the state's rename and the tokenizer's leaves
        if f.name not in (STATE_FILE, LOCK_FILE):
            f.unlink()
    capsys.readouterr()
    train_base(data_file, out, tb_cfg(4), tb_model(), progress=False)
    assert "starting over" in capsys.readouterr().err
    a, b = (torch.load(d / STATE_FILE, weights_only=True) for d in (straight, out))
    assert a["step"] == b["step"] == 4 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


class Killed(Exception):
    pass


def test_an_interrupted_extension_keeps_the_set_and_the_command_finishes_it(capsys, tiny_model_dir, tiny_base,
                                                                            tmp_path, monkeypatch):
    """Issue 28.11: killed after the first new shard of 10 -> 16, the 10 still load, both commands work."""
    from adjust.distill import rollouts as ro

    out = tmp_path / "r"
    assert rollouts(capsys, tiny_model_dir, out, 10)[0] == 0
    real, calls = ro.write_shard, []

    def dying(*a, **kw):
        calls.append(1)
        if len(calls) > 1:
            raise Killed
        return real(*a, **kw)

    monkeypatch.setattr(ro, "write_shard", dying)
    from adjust.cli import main

    with pytest.raises(Killed):
        main([str(a) for a in ["rollouts", "--base", tiny_model_dir, "--out", out, "--num-samples", 16, *ROLL]])
    monkeypatch.setattr(ro, "write_shard", real)
    assert (out / shard_name(8, 12)).is_file() and (out / shard_name(8, 10)).is_file()
    assert len(load_rollouts(out, tiny_base)) == 10  # the earlier set, whole
    assert rollouts(capsys, tiny_model_dir, out, 10)[0] == 0  # the original command
    assert rollouts(capsys, tiny_model_dir, out, 16)[0] == 0  # and the extension
    assert sorted(p.name for p in out.glob("shard-*")) == [shard_name(0, 4), shard_name(4, 8), shard_name(8, 12),
                                                           shard_name(12, 16)]
    fresh = tmp_path / "fresh"
    assert rollouts(capsys, tiny_model_dir, fresh, 16)[0] == 0
    assert torch.equal(load_rollouts(out).tokens, load_rollouts(fresh).tokens)


def test_temporary_files_of_killed_runs_are_removed(capsys, tiny_model_dir, made, tmp_path):
    """Issue 28.13: a run killed with SIGKILL mid-write leaves its temporary; the next run removes it."""
    r = tmp_path / "r"
    shutil.copytree(made, r)
    left = [r / ".shard-00000012-00000016.safetensors.k3j2.tmp", r / f".{META}.x9q1.tmp"]
    for f in left:
        f.write_bytes(b"half")
    (r / ".sampler.abc.tmp").mkdir()
    rc, _, err = rollouts(capsys, tiny_model_dir, r, 12)
    assert rc == 0, err
    assert not list(r.glob(".*.tmp"))


# --------------------------------------------------------------------------------------------
# 6: errors, not tracebacks
# --------------------------------------------------------------------------------------------

def _fsize(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.parametrize("command", ["rollouts", "train-base"])
def test_a_file_size_limit_is_one_line_naming_the_file(command, tiny_model_dir, data_file, tmp_path):
    """Issue 28.10: EFBIG (ulimit -f) while writing a shard (safetensors) or a state (torch.save)."""
    out = tmp_path / "o"
    argv = (["rollouts", "--base", tiny_model_dir, "--out", out, "--num-samples", 400, *ROLL, "--shard-size", 400,
             "--batch-size", 200] if command == "rollouts"
            else ["train-base", "--data", data_file, "--out", out, "--steps", 2, *TB])
    proc = adjust_proc(*argv, preexec_fn=_fsize(6000))
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err and not [x for x in err.splitlines()[:-1] if not x.startswith("{")], err
    line = one_error(proc.returncode, err.splitlines()[-1], "writing", str(out))  # after train-base's history lines
    assert "file-size limit" in line, line
    assert not list(out.glob(".*.tmp"))


def test_a_closed_pipe_ends_quietly(tiny_model_dir):
    """Issue 28.10: `adjust generate | head` with the reader gone."""
    proc = adjust_proc("generate", "--base", tiny_model_dir, "--gen-length", 8, "--num-samples", 4, "--prompt", "a",
                       "--json")
    proc.stdout.close()  # the reader is gone before anything is written
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and err == "", err


@pytest.mark.parametrize("sig, rc, line", [(signal.SIGTERM, 143, "adjust: terminated"),
                                           (signal.SIGINT, 130, "adjust: interrupted")])
def test_sigterm_and_ctrl_c_while_running_are_one_line(tiny_model_dir, tmp_path, sig, rc, line):
    out = tmp_path / "r"
    proc = adjust_proc("rollouts", "--base", tiny_model_dir, "--out", out, "--num-samples", 100000, *ROLL)
    wait_for(lambda: any(out.glob("shard-*")), proc, "a shard")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == rc and err.strip() == line, err
    assert not list(out.glob(".*.tmp"))


def test_ctrl_c_during_start_up_is_one_line(tiny_model_dir, tmp_path):
    """Issue 28.10: Ctrl-C while torch is being imported."""
    proc = adjust_proc("rollouts", "--base", tiny_model_dir, "--out", tmp_path / "r", "--num-samples", 4, *ROLL)
    maps = Path(f"/proc/{proc.pid}/maps")
    if not maps.exists():
        proc.kill()
        pytest.skip("needs /proc")
    wait_for(lambda: "libtorch" in maps.read_text(), proc, "torch being loaded")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip() == "adjust: interrupted", err
