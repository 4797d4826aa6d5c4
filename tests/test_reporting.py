"""--report_to wandb (offline, no network), tensorboard and none."""

import os
import subprocess
import sys

from .conftest import stage1_flags

THROUGHPUT = ("samples_per_second", "real_tokens_per_second", "real_token_fraction", "data_wait_fraction")


def _train(backbones, train_data, out, report_to, env_extra):
    env = {**os.environ, **env_extra}
    r = subprocess.run([sys.executable, "-m", "llavakit", "train",
                        *stage1_flags(backbones, train_data, out, report_to=report_to, max_steps=2,
                                      logging_dir=str(out / "tb"))],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_wandb_offline(backbones, train_data, tmp_path):
    out = tmp_path / "w"
    _train(backbones, train_data, out, "wandb",
           {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"})
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and any(p.suffix == ".wandb" for p in runs[0].iterdir())
    logged = b"".join(p.read_bytes() for p in runs[0].iterdir() if p.suffix == ".wandb")
    for key in THROUGHPUT:  # the throughput meter reaches wandb with the loss
        assert key.encode() in logged, key


def test_tensorboard_events(backbones, train_data, tmp_path):
    out = tmp_path / "t"
    _train(backbones, train_data, out, "tensorboard", {})
    events = list((out / "tb").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert "train/loss" in tags
    for key in THROUGHPUT:  # the throughput meter reaches tensorboard with the loss, every logging step
        assert f"train/{key}" in tags, sorted(tags)
        assert len(acc.Scalars(f"train/{key}")) == 2
