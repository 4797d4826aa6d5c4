"""Fault tolerance with real processes and real signals: kill -9 mid-save, SIGTERM / SIGINT, one rank
signalled under DDP."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from llavakit.train.checkpoints import STAGING

from .conftest import assert_same_losses, free_port, logged_losses, stage1_config, stage1_flags

#: runs llavakit train with a fault injected from outside the library (argv[1]: the flags as JSON)
CHILD = r"""
import json, os, signal, sys, time
from llavakit.train.trainer import LlavaTrainer

fault = os.environ["FAULT"]
if fault == "hang-in-second-save":  # stay inside the second checkpoint save until killed
    orig = LlavaTrainer._save_rng_state
    calls = []
    def slow(self, output_dir):
        calls.append(output_dir)
        orig(self, output_dir)
        if len(calls) == 2:
            open(os.environ["MARK"], "w").write(output_dir)
            time.sleep(600)
    LlavaTrainer._save_rng_state = slow
else:  # "SIGTERM@3" / "SIGINT@3" [on rank R]: the process signals itself during step 4
    name, _, rest = fault.partition("@")
    step, _, rank = rest.partition(":")
    orig_step = LlavaTrainer.training_step
    def step_fn(self, *a, **k):
        if self.state.global_step == int(step) and (not rank or self.args.process_index == int(rank)):
            os.kill(os.getpid(), getattr(signal, name))
        return orig_step(self, *a, **k)
    LlavaTrainer.training_step = step_fn

from llavakit.train.entry import main
sys.exit(main(json.loads(sys.argv[1])))
"""


def _child(flags, fault, tmp_path, **env):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    e = {**os.environ, "FAULT": fault, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **env}
    return script, e


COMMON = {"save_steps": 2, "per_device_train_batch_size": 2, "num_train_epochs": 1, "warmup_ratio": 0.25,
          "logging_steps": 1}


@pytest.fixture(scope="module")
def reference(backbones, train_data, tmp_path_factory):
    from llavakit.train.entry import run

    out = tmp_path_factory.mktemp("ref")
    run(stage1_config(backbones, train_data, out, **COMMON, save_total_limit=1))
    return logged_losses(out)


def test_kill_9_mid_save_leaves_the_previous_checkpoint_and_resumes(backbones, train_data, reference, tmp_path):
    out = tmp_path / "run"
    flags = stage1_flags(backbones, train_data, out, **COMMON, save_total_limit=1)
    script, env = _child(flags, "hang-in-second-save", tmp_path, MARK=str(tmp_path / "mark"))
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(flags)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not (tmp_path / "mark").exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    # the half-written checkpoint is invisible; the previous one survived --save_total_limit 1
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (out / STAGING / "checkpoint-4").is_dir()
    assert {"mm_projector.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= {
        p.name for p in (out / "checkpoint-2").iterdir()}

    from llavakit.train.entry import run

    resumed = run(stage1_config(backbones, train_data, out, **COMMON, save_total_limit=1,
                               resume_from_checkpoint="latest"))
    assert resumed.stopped is None and (out / "mm_projector.bin").is_file()
    got = logged_losses(out)
    assert sorted(got) == sorted(reference)
    assert_same_losses(reference, got, got, 1e-6)
    assert not (out / STAGING / "checkpoint-4").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-8"]


@pytest.mark.parametrize("sig,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_signal_saves_a_checkpoint_and_stops_cleanly(backbones, train_data, reference, tmp_path, sig, code):
    out = tmp_path / "run"
    flags = stage1_flags(backbones, train_data, out, **{**COMMON, "save_steps": 100}, save_total_limit=1)
    script, env = _child(flags, f"{sig}@3", tmp_path)
    r = subprocess.run([sys.executable, str(script), json.dumps(flags)], env=env, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == code, r.stderr[-3000:]
    assert f"stopped by {sig} at step 4" in r.stdout and "--resume_from_checkpoint latest" in r.stdout
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    assert not (out / "mm_projector.bin").exists()  # not finished: no final output pretending to be one

    from llavakit.train.entry import run

    run(stage1_config(backbones, train_data, out, **{**COMMON, "save_steps": 100}, save_total_limit=1,
                     resume_from_checkpoint="latest"))
    got = logged_losses(out)
    assert sorted(got) == sorted(reference)
    assert_same_losses(reference, got, got, 1e-6)


@pytest.mark.slow
def test_ddp_one_rank_signalled_stops_both_at_the_same_step(backbones, train_data, tmp_path):
    out = tmp_path / "ddp"
    flags = stage1_flags(backbones, train_data, out, **{**COMMON, "save_steps": 100, "per_device_train_batch_size": 1},
                         ddp_backend="gloo")
    script, env = _child(flags, "SIGTERM@2:1", tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), json.dumps(flags)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert "stopped by a peer's signal at step 3" in r.stdout or "stopped by SIGTERM at step 3" in r.stdout, \
        r.stdout[-2000:] + r.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3


@pytest.mark.parametrize("launched", [True, False])
def test_a_launched_rank_ends_without_interpreter_teardown(tmp_path, launched):
    """A rank started by a launcher leaves through os._exit once its work is done (the interpreter's teardown
    can abort after a successful DeepSpeed run): exit handlers still run, printed output still arrives and the
    exit code is the run's. Without a launcher the code is returned to the caller."""
    script = (
        "import atexit, pathlib, sys\n"
        "from llavakit.train.entry import _end_launched_rank\n"
        f"atexit.register(lambda: pathlib.Path({str(tmp_path / 'handler')!r}).write_text('ran'))\n"
        "print('last line', end='')\n"
        "code = _end_launched_rank(3)\n"
        "print(' returned', code, end='')\n"
        "sys.exit(code + 1)\n")
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_RANK"}
    if launched:
        env["LOCAL_RANK"] = "0"
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert (tmp_path / "handler").read_text() == "ran"
    if launched:
        assert (r.returncode, r.stdout) == (3, "last line")
    else:
        assert (r.returncode, r.stdout) == (4, "last line returned 3")
