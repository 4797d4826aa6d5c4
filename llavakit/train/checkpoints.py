"""Checkpoints that are either complete or invisible, and stops that leave one behind.

* A checkpoint is written into ``OUTPUT/.incomplete/checkpoint-N``; once every rank has finished writing,
  its files are fsync'd and the directory is renamed to ``OUTPUT/checkpoint-N`` (one atomic rename on the
  same filesystem). A run killed mid-save leaves only the staging directory, which nothing reads and the
  next save clears; ``--resume_from_checkpoint latest`` therefore always finds a complete checkpoint.
* ``--save_total_limit`` rotates only after the new checkpoint is published, so the newest complete
  checkpoint is never deleted before its successor is complete.
* SIGTERM / SIGINT (a preemption, Ctrl-C) ask for a checkpoint at the next step boundary and a clean stop;
  the flag is shared across ranks so that all of them stop at the same step. A second Ctrl-C interrupts at
  once.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

STAGING = ".incomplete"


class CheckpointMismatchError(ValueError):
    """A checkpoint to resume from does not hold this model's weights."""


def fsync_tree(path: str) -> None:
    """Flush every file and directory under ``path`` to disk."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not fsync directories
        pass
    finally:
        os.close(fd)


def publish(staged: str, final: str) -> None:
    """Make the complete checkpoint ``staged`` visible as ``final`` (replacing an older one of that name)."""
    fsync_tree(staged)
    parent = os.path.dirname(final)
    old = None
    if os.path.exists(final):  # the same step saved again (e.g. after a resume): swap, then delete
        old = os.path.join(os.path.dirname(staged), os.path.basename(final) + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staged, final)
    _fsync_dir(parent)
    if old:
        shutil.rmtree(old, ignore_errors=True)


class StopRequest:
    """Set by SIGTERM / SIGINT; read at step boundaries."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: nothing to install
                return

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signal_name = name
        logger.warning("%s received: saving a checkpoint at the end of this step, then stopping "
                       "(Ctrl-C again to interrupt at once)", name)


class StopOnSignal(TrainerCallback):
    """Turns a :class:`StopRequest` into "save a checkpoint and stop" at the next step boundary, agreed
    across ranks (a signal that reaches one rank stops them all at the same step)."""

    def __init__(self, trainer, request: StopRequest):
        self.trainer = trainer
        self.request = request
        self.stopped_at: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        import torch

        flag = torch.tensor([1 if self.request.signal_name else 0], device=args.device)
        if args.world_size > 1:
            flag = self.trainer.accelerator.reduce(flag, reduction="sum")
        if int(flag.item()) > 0:
            if self.request.signal_name is None:
                self.request.signal_name = "a peer's signal"
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control
