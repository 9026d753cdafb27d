"""`adjust rollouts` and `adjust distill` under `accelerate launch` with 2 processes on CPUs (gloo).

Launch: accelerate 1.x's `--cpu` flag runs ONE process unless MPI is set up (`--mpirun_hostfile`),
so two CPU processes are started the way accelerate starts GPU processes (`--multi_gpu`, torchrun)
with ACCELERATE_USE_CPU=true, which makes accelerate use gloo on the CPU. CUDA is hidden so the
test does the same on a machine with GPUs.

Checked against a single-process run with the same seed, on a tiny random TinyBase:
* rollouts: the shards of both processes together hold every sample index exactly once and
  are identical (tokens and unmasking order) to the single-process rollouts;
* distill: the sampler after 3 steps equals the single-process one. Each process takes a
  slice of the same global batch; its loss is its slice's KL summed over the *global* count
  of scored positions (times the world size, since DDP averages gradients), so the averaged
  gradient is the full batch's — exact up to float summation order, even with slices of
  unequal sizes (batch 7 over 2 processes).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("accelerate")

from adjust.cli import main  # noqa: E402
from adjust.distill.rollouts import check_complete, load_rollouts  # noqa: E402

ROLLOUT_ARGS = ["--num-samples", "12", "--gen-length", "12", "--shard-size", "3", "--batch-size", "4", "--seed", "5",
                "--quiet"]
DISTILL_ARGS = ["--steps", "3", "--batch-size", "7", "--warmup", "1", "--max-unrolls", "2", "--eval-every", "3",
                "--lr", "1e-3", "--seed", "3", "--quiet"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch2_args(*argv) -> tuple[list[str], dict]:
    """The command and environment of `accelerate launch` with 2 CPU processes of `python -m adjust.cli argv...`."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "adjust.cli", *map(str, argv)]
    return cmd, env


def launch2(*argv) -> subprocess.CompletedProcess:
    cmd, env = launch2_args(*argv)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


def single(*argv) -> None:
    assert main([str(a) for a in argv]) == 0


@pytest.fixture(scope="module")
def single_rollouts(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("acc") / "rollouts-1"
    single("rollouts", "--base", tiny_model_dir, "--out", out, *ROLLOUT_ARGS)
    return out


def test_rollouts_two_processes_complete_and_identical(tiny_model_dir, single_rollouts, tmp_path):
    out = tmp_path / "rollouts-2"
    proc = launch2("rollouts", "--base", tiny_model_dir, "--out", out, *ROLLOUT_ARGS)
    assert proc.stdout.count("rollouts in") == 1  # only the main process reports, after checking the union
    check_complete(out, 12)
    names = sorted(p.name for p in out.glob("shard-*"))
    assert names == sorted(p.name for p in single_rollouts.glob("shard-*")) and len(names) == 4
    two, one = load_rollouts(out), load_rollouts(single_rollouts)
    assert len(two) == 12
    assert torch.equal(two.tokens, one.tokens) and torch.equal(two.order, one.order)
    assert two.meta == one.meta


@pytest.fixture(scope="module")
def single_sampler(tiny_model_dir, single_rollouts, tmp_path_factory):
    out = tmp_path_factory.mktemp("acc") / "sampler-1"
    proc = subprocess.run([sys.executable, "-m", "adjust.cli", "distill", "--base", str(tiny_model_dir), "--rollouts",
                           str(single_rollouts), "--out", str(out), *DISTILL_ARGS],
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, json.loads(proc.stdout.strip().splitlines()[-1])


def assert_same_sampler(out1, res1, out2, res2):
    from adjust.sampler import JointSampler

    assert res2["step"] == res1["step"] == 3
    assert res2["train_kl"] == pytest.approx(res1["train_kl"], rel=1e-4)
    assert res2["val_kl"] == pytest.approx(res1["val_kl"], rel=1e-4)
    s1, s2 = JointSampler.load(out1).state_dict(), JointSampler.load(out2).state_dict()
    cfg = JointSampler.load(out1).cfg
    torch.manual_seed(3)  # distill's initialisation (--seed 3), to check that training moved the weights
    init = JointSampler(cfg).state_dict()
    assert set(s1) == set(s2)
    moved = max((s1[k] - init[k]).abs().max().item() for k in s1 if not k.endswith("norm.weight"))
    diff = max((s1[k] - s2[k]).abs().max().item() for k in s1)
    assert 1e-3 < moved < 1e-2 and diff < 1e-5, (moved, diff)
    assert not list(out2.glob(".*.tmp"))


def main_process_result(proc) -> dict:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # only the main process prints (and writes the checkpoint)
    return json.loads(lines[0])


def test_distill_two_processes_matches_one(tiny_model_dir, single_rollouts, single_sampler, tmp_path):
    out2 = tmp_path / "sampler-2"
    proc = launch2("distill", "--base", tiny_model_dir, "--rollouts", single_rollouts, "--out", out2, *DISTILL_ARGS)
    res2 = main_process_result(proc)
    assert "base_sharding" not in res2
    assert_same_sampler(*single_sampler, out2, res2)


def test_distill_with_the_base_sharded_matches_one(tiny_model_dir, single_rollouts, single_sampler, tmp_path):
    """FSDP2 over the frozen base's layers (each process holds half of every layer): same sampler."""
    out2 = tmp_path / "sampler-fsdp"
    proc = launch2("distill", "--base", tiny_model_dir, "--rollouts", single_rollouts, "--out", out2, "--shard-base",
                   *DISTILL_ARGS)
    res2 = main_process_result(proc)
    sh = res2["base_sharding"]
    assert sh["world"] == 2 and sh["layers"] >= 1
    assert sh["local_layer_params"] * 2 == sh["layer_params"]  # half of every layer on each process
    assert sh["replicated_params"] > 0  # embedding and norms stay whole
    assert_same_sampler(*single_sampler, out2, res2)


def test_shard_base_needs_several_processes(tiny_model_dir, single_rollouts, tmp_path, capsys):
    assert main(["distill", "--base", str(tiny_model_dir), "--rollouts", str(single_rollouts), "--out",
                 str(tmp_path / "s"), "--shard-base", *DISTILL_ARGS]) == 2
    assert "--shard-base needs several processes" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def _descendants(pid: int) -> set[int]:
    """The processes below `pid` (from /proc)."""
    parents = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                parents[int(d)] = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        kids = {c for c, pp in parents.items() if pp == p}
        found |= kids
        todo += kids
    return found


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the workers in /proc")
def test_a_launched_run_holds_the_lock_and_its_workers_die_with_the_launcher(capsys, tiny_model_dir, tmp_path):
    """Issue 28.1 and 28.9: a second run on the --out of a 2-process launch is refused, naming the main worker's
    PID; after kill -9 of the launcher its workers exit (none keeps writing), and the lock is free again."""
    import signal
    import time

    from adjust.lock import LOCK_FILE, acquire, release
    from test_cli import cli

    out = tmp_path / "r"
    cmd, env = launch2_args("rollouts", "--base", tiny_model_dir, "--out", out, "--num-samples", 100000,
                            *ROLLOUT_ARGS[2:])
    launcher = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    workers = set()
    try:
        end = time.time() + 180
        while len(list(out.glob("shard-*"))) < 2:  # both workers are writing
            assert launcher.poll() is None and time.time() < end, launcher.stderr.read()[-3000:]
            time.sleep(0.1)
        workers = _descendants(launcher.pid)
        holder = int((out / LOCK_FILE).read_text())
        assert holder in workers
        rc, _, err = cli(capsys, "rollouts", "--base", tiny_model_dir, "--out", out, *ROLLOUT_ARGS, "--prompt", "x")
        assert rc == 2 and f"PID {holder}" in err, err
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        end = time.time() + 20
        while any(_alive(p) for p in workers) and time.time() < end:
            time.sleep(0.1)
        assert not any(_alive(p) for p in workers), [p for p in workers if _alive(p)]
    finally:
        launcher.kill()
        launcher.wait()
        for p in workers | _descendants(launcher.pid):
            if _alive(p):
                os.kill(p, signal.SIGKILL)
    from adjust.errors import AdjustError

    end = time.time() + 20  # the lock is free once the dying workers' last threads are gone
    while True:
        try:
            acquire(out)
            break
        except AdjustError:
            assert time.time() < end, "the lock outlived the launcher's workers"
            time.sleep(0.1)
    release(out)
