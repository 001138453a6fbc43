"""Training checkpoints: the learner's agent and train step, saved and resumed.

A restarted trainer resumes from the newest intact checkpoint; a damaged one
is named and skipped, and if every one is damaged the trainer refuses to
start rather than silently train from scratch. When to save is the loop's
(trainer/trainer.py).
"""

import logging
import pathlib
import shutil

import tensorflow as tf

from dqnfleet.trainer.learner import Learner

log = logging.getLogger(__name__)


class Checkpoints:
  """The newest `max_to_keep` checkpoints of a learner in `directory`."""

  def __init__(self, directory: str, learner: Learner, max_to_keep: int = 3):
    self._learner = learner
    # The object names are the checkpoints' format: older runs resume by them.
    self._checkpoint = tf.train.Checkpoint(agent=learner.agent, train_step=learner.train_step)
    self._manager = tf.train.CheckpointManager(self._checkpoint, directory, max_to_keep=max_to_keep)

  @property
  def directory(self) -> str:
    return self._manager.directory

  def remove_partial(self) -> None:
    """Removes what a failed save left (TensorFlow writes each into `<name>_temp/` and
    renames the files out of it; the manager never lists one)."""
    for partial in pathlib.Path(self.directory).glob("*_temp*"):
      shutil.rmtree(partial, ignore_errors=True) if partial.is_dir() else partial.unlink(True)

  @property
  def latest_checkpoint(self) -> str | None:
    return self._manager.latest_checkpoint

  def save(self) -> str:
    """A checkpoint numbered by the learner's train step."""
    return self._manager.save(checkpoint_number=self._learner.train_steps)

  def resume(self) -> None:
    """Restores the newest intact checkpoint; a damaged one is named and skipped."""
    damaged = []
    for path in reversed(self._manager.checkpoints):
      try:
        self._checkpoint.restore(path).assert_existing_objects_matched()
      except Exception as e:  # damaged files fail in TF's reader in many ways
        reason = (getattr(e, "message", None) or str(e)).splitlines()[0][:200]
        log.error("checkpoint %s is unreadable (%s); trying an older one", path, reason)
        damaged.append(path)
        continue
      log.info("resumed from %s at train step %d", path, self._learner.train_steps)
      return
    if damaged:  # starting over would silently throw the run away
      raise SystemExit(
        f"no intact training checkpoint in {self._manager.directory} "
        f"(unreadable: {', '.join(damaged)}); move them away to start over"
      )
