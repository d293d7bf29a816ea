"""Writing the training checkpoints from the workers (the :class:`~training.loop.TrainWorker` part that saves and
reports): DDP, rank 0 writes the whole checkpoint; FSDP, every rank writes its DCP shards, by default in the
background, reported once complete. The checkpoint's layout: :mod:`training.checkpointing`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training import checkpointing, parallel


@dataclass
class PendingCheckpoint:
    """A sharded checkpoint being written by ``dcp.async_save``, reported once its files are complete."""

    future: Any  # concurrent.futures.Future of dcp.async_save; None: written synchronously
    folder: Path  # this rank's local folder (Ray Train merges every rank's into one checkpoint)
    name: str
    metrics: dict[str, Any]
    started: float
    blocking_s: float  # time the training loop waited for this save (async: staging the state in CPU memory)
    final: bool = False
    written: float | None = None  # when the background write finished (perf_counter)


class CheckpointSaving:
    """Mixed into :class:`~training.loop.TrainWorker`: uses its ``cfg``, ``rank``, ``model``, ``optimizer``,
    ``ema``, ``state``, ``encoders``, ``tracker``, ``loop_config``, ``checkpoint_group`` and ``full_model()``."""

    pending: PendingCheckpoint | None = None

    def save_and_report(self, metrics: dict[str, Any], final: bool = False) -> None:
        """Write a checkpoint and report it from every rank: DDP, rank 0 writes it; FSDP, every rank its
        shards (:meth:`save_sharded`)."""
        import ray.train

        if self.fsdp:
            self.save_sharded(metrics, final)
            return
        name = f"checkpoint_step_{self.state.step:08d}"
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if self.rank == 0:
                checkpointing.save_training_checkpoint(
                    Path(tmp), parallel.unwrap(self.model), self.optimizer.state_dict(),
                    self.ema.state_dict() if self.ema else None, self.state,
                    self.cfg, self.encoders, meta=self.loop_config.get("meta", {}))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
                if final:
                    self.tracker.log_artifacts(tmp, "checkpoint")
                    self.tracker.set_tag("fdreamer.checkpoint", f"{self.loop_config['run_dir']}/{name}")
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    def save_sharded(self, metrics: dict[str, Any], final: bool) -> None:
        """FSDP: every rank writes its shards of model and optimizer (DCP) into its own folder, rank 0 the
        trainer state, RNG and configs (and, for the final checkpoint, the full weights gathered into
        ``model.safetensors`` for the consumers of the next stage, serving and evaluation). With
        ``checkpoint.async_save`` (not the final one) the files are written in the background and the
        checkpoint is reported by :meth:`flush_checkpoint` after the next step."""
        self.flush_checkpoint()  # an earlier asynchronous save first: Ray registers checkpoints in order
        started = time.perf_counter()
        name = f"checkpoint_step_{self.state.step:08d}"
        folder = Path(tempfile.mkdtemp(prefix=f"fdreamer-{name}-rank{self.rank}-"))
        if self.rank == 0:
            checkpointing.save_sharded_files(folder, self.model, self.state, self.cfg, self.encoders,
                                             self.loop_config.get("meta", {}))
        if final:  # collective: every rank sends its shards to rank 0
            full = self.full_model()
            if self.rank == 0:
                checkpointing.save_full_weights(folder, full.state_dict())
        use_async = self.cfg.checkpoint.async_save and not final
        future = checkpointing.save_sharded(folder, self.model, self.optimizer, process_group=self.checkpoint_group,
                                            use_async=use_async)
        self.pending = PendingCheckpoint(future, folder, name, metrics, started, time.perf_counter() - started, final)
        if future is not None:
            future.add_done_callback(lambda _, pending=self.pending: setattr(pending, "written", time.perf_counter()))
        if not use_async:
            self.flush_checkpoint()

    def flush_checkpoint(self) -> None:
        """Wait for the pending sharded checkpoint's files and report it (every rank; a no-op when none)."""
        import ray.train

        pending, self.pending = self.pending, None
        if pending is None:
            return
        if pending.future is not None:
            pending.future.result()
        shards = list((pending.folder / checkpointing.DCP_DIR).glob("*.distcp"))
        now = time.perf_counter()
        stats = {"step": int(pending.name.rsplit("_", 1)[1]), "rank": self.rank,
                 "mode": "async" if pending.future is not None else "sync",
                 "bytes": sum(f.stat().st_size for f in shards), "blocking_s": round(pending.blocking_s, 4),
                 "written_s": round((pending.written or now) - pending.started, 4),  # files complete
                 "total_s": round(now - pending.started, 4)}  # until reported (async: after the next step)
        (pending.folder / f"save_stats_rank{self.rank}.json").write_text(json.dumps(stats) + "\n")
        try:
            if self.rank == 0:
                self.tracker.log_metrics({"checkpoint_blocking_s": stats["blocking_s"],
                                          "checkpoint_save_s": stats["total_s"]}, step=stats["step"])
                if pending.final:  # the consumers' part: everything but the (rank 0 only) DCP shards
                    for f in sorted(pending.folder.iterdir()):
                        if f.is_file():
                            self.tracker.log_artifact(f, "checkpoint")
                    self.tracker.set_tag("fdreamer.checkpoint", f"{self.loop_config['run_dir']}/{pending.name}")
            ray.train.report(pending.metrics, checkpoint=ray.train.Checkpoint.from_directory(str(pending.folder)),
                             checkpoint_dir_name=pending.name)
        finally:
            shutil.rmtree(pending.folder, ignore_errors=True)
