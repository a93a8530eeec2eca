"""The engine's checkpoints and where a run starts: the resume decision (rank 0 finds and reads the
checkpoint, every rank receives it), the saves handed to the background writer (at epoch ends and every
--train.checkpoint_minutes inside epochs, with every rank's part), the position inside an epoch a run
resumes at (on the same or another rank count), and the sample order the masking noise and
--train.trace_samples read. `Engine` (`supmae.train.engine`) takes these as a mixin: they work on its state.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from supmae.errors import UserError
from supmae.train import distributed as dist_utils
from supmae.train import faults
from supmae.train.process import open_early_record
from supmae.train.rng import gather_rng, restore_rank_rng

# ---------------------------------------------------------------------------------------------- resume, loads


def _shared_refusal(message: str, info: dist_utils.DistInfo) -> None:
    """Raise rank 0's refusal on every rank (so no rank is left waiting in a collective)."""
    message = dist_utils.broadcast_object(message) if info.distributed else message
    if message:
        raise UserError(message)


def load_on_main(path: str, info: dist_utils.DistInfo) -> dict[str, Any]:
    """Rank 0 reads checkpoint `path` from its own disk and every rank receives it: the other ranks
    need neither the file nor a shared filesystem."""
    from supmae.train.checkpoint import load_checkpoint

    ckpt, refusal = None, ""
    if info.is_main:
        try:
            ckpt = load_checkpoint(path)
        except UserError as exc:
            refusal = str(exc)
    _shared_refusal(refusal, info)
    return dist_utils.broadcast_object(ckpt) if info.distributed else ckpt


def decide_resume(resume: str, run_dir: Any, info: dist_utils.DistInfo, log: Callable[[str], None]
                  ) -> tuple[str, dict[str, Any] | None]:
    """(checkpoint path, its content) to continue from, or ("", None) for a fresh run; the same on every rank.

    Rank 0 alone takes the directory's lock (a second job on it is refused, naming the holder), looks
    at the directory and reads the file; the others receive its decision and the checkpoint. `resume`
    is "" (fresh: refused when the directory already holds a run), "auto" or a path. "auto" continues
    from the newest valid checkpoint; a run stopped before its first checkpoint (killed in epoch 0:
    books but no checkpoint file) starts over, its books moved to `interrupted-N/`; checkpoint files
    of which none loads are refused (they need a look, not a silent restart).
    """
    from supmae.train.checkpoint import find_resume_checkpoint, load_checkpoint

    path, ckpt, refusal = "", None, ""
    if info.is_main:
        try:
            refusal = run_dir.lock(log)
        except OSError as exc:
            refusal = f"cannot create or lock the run directory {run_dir.path}: {exc.strerror or exc}"
        if not refusal:  # locked: decide what to resume from
            try:
                if resume == "":
                    if run_dir.holds_a_run():
                        refusal = (f"run directory {run_dir.path} already holds a run (log or checkpoints); continue "
                                   f"it with --resume auto, or choose another --output-dir")
                elif resume == "auto":
                    found = find_resume_checkpoint(run_dir.path, log=log)
                    if found is not None:
                        path, ckpt = found
                    elif run_dir.checkpoint_files():
                        refusal = (f"--resume auto: no usable checkpoint in {run_dir.path} (none of its "
                                   f"checkpoint files loads); refusing to start over and overwrite it (choose "
                                   f"another --output-dir)")
                    elif run_dir.holds_a_run():
                        aside = run_dir.set_aside()
                        log(f"--resume auto: {run_dir.path} holds a run stopped before its first checkpoint; its "
                            f"books moved to {aside}, starting over")
                else:
                    path, ckpt = resume, load_checkpoint(resume)
            except UserError as exc:
                refusal = str(exc)
            except OSError as exc:  # moving the books aside failed (permissions, a full disk)
                refusal = f"--resume auto: cannot move the old books of {run_dir.path} aside: {exc}"
        if not refusal:  # this process's device time counts from here, set-up included
            start_epoch = int(ckpt.get("epoch", -1)) + 1 if isinstance(ckpt, dict) else 0
            open_early_record(run_dir.path, world_size=info.world_size, start_epoch=start_epoch)
    _shared_refusal(refusal, info)
    if info.distributed:
        path, ckpt = dist_utils.broadcast_object((path, ckpt))
    return path, ckpt


def resume_point(ckpt: dict[str, Any]) -> str:
    """Where a checkpoint resumes, in words: "epoch E complete, step S" or "inside epoch E: step S, ..."."""
    pos = ckpt.get("position")
    if pos:
        return (f"inside epoch {pos['epoch']}: step {ckpt['step']}, {pos['steps']} of the epoch's steps done, "
                f"at {pos['world_size']} rank(s)")
    return f"epoch {ckpt['epoch']} complete, step {ckpt['step']}"


class CheckpointMixin:
    """The Engine's saves, resume position and sample order (see the module docstring); it uses the Engine's
    attributes (info, cfg, tc, job, run_dir, record, train_loader, writer, accum, micro_steps, ...)."""

    def restore_rng(self, ckpt: dict[str, Any] | None) -> None:
        """This rank's own RNG state from the checkpoint; call it last before the first epoch, so that
        everything up to the epoch loop consumes the RNG exactly as in an uninterrupted run."""
        if ckpt is not None and ckpt.get("rng"):
            restore_rank_rng(ckpt["rng"], self.info.rank, self.info.world_size, self.device)

    def save(self, epoch: int, row: dict[str, Any] | None, position: dict[str, Any] | None = None,
             rank_part: dict[str, Any] | None = None) -> str:
        """checkpoint-last.pth (and a numbered one when the job asks, a copy of the same bytes), handed to the
        background writer by rank 0: the loop waits for the host snapshot only (`_costs` books the stall).
        `epoch` is the last complete epoch; a checkpoint inside epoch `epoch + 1` also carries its
        `position` (micro-batches read, partial sums) and every rank's `rank_part` (its job generators,
        pipeline position, meter sums). A collective: every rank's RNG (and part) is gathered."""
        from supmae.config import to_dict
        from supmae.train.checkpoint import LAST_NAME

        t0 = time.perf_counter()
        rng = gather_rng(self.device)
        parts = None
        if position is not None:
            parts = dist_utils.all_gather_object(rank_part) if self.info.distributed else [rank_part]
        last = self.run_dir.file(LAST_NAME)
        if not self.info.is_main:
            self._costs.add_stall(time.perf_counter() - t0)
            return last
        payload = {**self.job.payload(epoch), "epoch": epoch, "step": self.global_step, "config": to_dict(self.cfg),
                   "rng": rng, "elapsed_seconds": self.elapsed(), "log_row": row, "position": position,
                   "ranks": parts}
        copies: list[str] = []
        if row is not None and self.job.numbered(epoch):
            copies.append(self.run_dir.file(f"checkpoint-{epoch:04d}.pth"))
        record, written, step = self.record, self._written, self.global_step

        def done(stats: Any) -> None:  # on the writer's thread, once the files are in place
            written.append(stats)
            record.saved(epoch, step=step)
            faults.after_saved(step)  # test hook (SUPMAE_TEST_KILL_AT=done=S): a kill right after this save

        assert self.writer is not None
        self.writer.save(payload, last, copies=copies, on_done=done)
        if row is not None:
            self.job.extra_saves(epoch, row, self._save_extra)
        self._t_saved = time.perf_counter()
        self._costs.add_stall(self._t_saved - t0)
        return copies[0] if copies else last

    def _save_extra(self, payload: dict[str, Any], path: str) -> None:
        """A job's further file (the best weights) through a writer of its own, so that it does not wait for
        the checkpoint being written."""
        if self._extra_writer is None:
            from supmae.train.async_checkpoint import CheckpointWriter

            self._extra_writer = CheckpointWriter()
        self._extra_writer.save(payload, path)

    def _close_writers(self, completed: bool) -> None:
        """Wait for the files in flight (the job is done when they are on disk). After an error, a write's own
        failure is only told: the error that stopped the run goes on."""
        for writer in (self.writer, self._extra_writer):
            if writer is None:
                continue
            if completed:
                writer.close()
                continue
            try:
                writer.close()
            except Exception as exc:  # noqa: BLE001
                self.log(f"error: {exc}")

    def _save_due(self) -> bool:
        """Whether --train.checkpoint_minutes have passed since the last save, on any rank (a collective:
        called at log points, where the loop reads the device anyway)."""
        if self.checkpoint_every <= 0:
            return False
        due = time.perf_counter() - self._t_saved >= self.checkpoint_every
        if self.info.distributed:
            due = not dist_utils.agree(not due, self.device)
        return due

    def _save_inside(self, epoch: int, micro_done: int, meter: Any, lr_sum: float) -> None:
        """A checkpoint after micro-batch `micro_done` of `epoch` (an optimiser step's end): resuming from it
        continues this epoch exactly where it stands."""
        position = {"epoch": epoch, "micro": micro_done, "steps": micro_done // self.accum, "lr_sum": lr_sum,
                    "world_size": self.info.world_size, "accum": self.accum,
                    "batch_size": self.cfg.data.batch_size, "pipeline": self.train_loader.kind}
        rank_part = {"job": self.job.rank_state(), "data": self.train_loader.position_state(),
                     "meter": [meter.sums.tolist(), meter.count]}
        self.last_ckpt = self.save(epoch - 1, None, position, rank_part)

    def restore_position(self, ckpt: dict[str, Any] | None) -> None:
        """A checkpoint taken inside an epoch: where this process's first epoch starts, and this rank's part
        (its job generators, pipeline position and meter sums). The same world size resumes bit for bit; a
        different one (same effective batch) continues with the same global batches (ffcv, torchvision)."""
        pos = ckpt.get("position") if isinstance(ckpt, dict) else None
        if not pos:
            return
        if pos.get("pipeline") != self.train_loader.kind:
            raise UserError(f"the checkpoint was taken inside epoch {pos['epoch']} with the {pos.get('pipeline')} "
                            f"pipeline; resume it with --data.pipeline {pos.get('pipeline')} (its position in the "
                            f"epoch means nothing to {self.train_loader.kind})")
        world, old_world = self.info.world_size, int(pos["world_size"])
        eff_old = int(pos["batch_size"]) * old_world * int(pos["accum"])
        eff_new = self.cfg.data.batch_size * world * self.accum
        if eff_new != eff_old:
            raise UserError(f"the checkpoint was taken inside epoch {pos['epoch']} at an effective batch of {eff_old} "
                            f"({pos['batch_size']} x {old_world} ranks x {pos['accum']}); resume it with the same "
                            f"effective batch (now {eff_new}): set --optim.effective_batch {eff_old}")
        parts = ckpt.get("ranks") or []
        if world == old_world:
            part = parts[self.info.rank] if self.info.rank < len(parts) else None
            self.start_micro = int(pos["micro"])
            if part:
                self._resume_job_state = part.get("job")
                self.train_loader.restore_position(part.get("data"))
                sums, count = part["meter"]
                self._resume_meter = (list(sums), int(count))
        else:
            if self.train_loader.batch_indices(int(pos["epoch"]), 0) is None:
                raise UserError(f"the checkpoint was taken inside epoch {pos['epoch']} on {old_world} rank(s) with "
                                f"the {pos.get('pipeline')} pipeline, whose order depends on the rank count: resume "
                                f"it on {old_world} rank(s) (ffcv and torchvision resume on any)")
            self.start_micro = int(pos["steps"]) * self.accum
            # The epoch's partial sums so far, all on rank 0 (the other ranks start theirs at zero).
            total = [0.0] * len(self.job.meter_names)
            count = 0
            for part in parts:
                if part:
                    total = [a + b for a, b in zip(total, part["meter"][0], strict=True)]
                    count += int(part["meter"][1])
            self._resume_meter = (total, count) if self.info.is_main else ([0.0] * len(total), 0)
            self.log(f"resuming inside epoch {pos['epoch']} on {world} rank(s) (the checkpoint's: {old_world}): the "
                     f"same global batches from step {pos['steps']} of the epoch on")
        self._resume_lr_sum = float(pos["lr_sum"])
        if not 0 < self.start_micro < self.micro_steps:
            raise UserError(f"the checkpoint's position in epoch {pos['epoch']} (micro-batch {self.start_micro}) is "
                            f"outside this run's {self.micro_steps} micro-batches per epoch: the epoch length changed")

    def _prepare_epoch_order(self, epoch: int) -> None:
        """This rank's sample indices of `epoch`, on the device once per epoch, when the job wants them (the
        per-sample masking noise) or --train.trace_samples is on, and the pipeline can tell them."""
        self._epoch_order = None
        if not (getattr(self.job, "wants_indices", False) or self.trace):
            return
        loader = self.train_loader
        first = loader.batch_indices(epoch, 0)
        if first is None:
            return
        import numpy as np

        order = np.concatenate([loader.batch_indices(epoch, k) for k in range(self.micro_steps)])
        self._epoch_order = torch.from_numpy(order).to(self.device)

    def _trace_step(self, epoch: int, ids: list[Any]) -> None:
        """One samples.jsonl line: the global step and the sorted sample indices of its global batch."""
        mine = torch.cat(ids).tolist() if ids else []
        every = dist_utils.all_gather_object(mine) if self.info.distributed else [mine]
        if self.info.is_main:
            self.run_dir.log_samples({"step": self.global_step, "epoch": epoch,
                                      "indices": sorted(i for part in every for i in part)})


class _EpochCosts:
    """What the loop spent on its own books in one epoch: checkpoint stalls (host snapshots, and waits for
    a previous write) and their count."""

    def __init__(self) -> None:
        self.saves = 0
        self.stall = 0.0

    def add_stall(self, seconds: float) -> None:
        self.saves += 1
        self.stall += seconds
