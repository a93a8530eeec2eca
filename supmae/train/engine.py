"""The training engine the three jobs (pretrain, finetune, linprobe) share.

Where the seam is: a job contributes its *step* (`supmae.train.steps`: forward, loss, backward of
one micro-batch and the optimiser update) and its *evaluation*; everything around them lives here
and is the same for every job:

- the epoch loop skeleton (`Engine.train_epoch`): per-iteration lr, host-side data-wait
  accounting, device-side loss sums read only at log points, the tqdm progress bar;
- per-rank RNG restore at the start and capture at every save (`supmae.train.rng`);
- buffer sync (rank 0's BatchNorm statistics) before every evaluation and every save;
- the resume decision (rank 0 finds and reads the checkpoint, then broadcasts it: no shared
  filesystem needed) and checkpoint writing (rank 0 only; a numbered checkpoint is serialised once
  and copied);
- the run directory's books (`config.json`, `log.jsonl` with the same per-epoch keys in every job,
  `steps.jsonl`, `starts.jsonl`) and this process's record (`supmae.train.process`: device time per
  process, heartbeats, energy over the whole process).

Precision and TF32 (`supmae.train.precision`), DDP and `torch.compile` (`supmae.train.compiling`),
evaluation sample accounting (`supmae.train.evaluation`) and energy (`supmae.train.energy`) are
their own modules; the step objects (`supmae.train.steps`) use them.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from supmae.errors import UserError
from supmae.train import distributed as dist_utils
from supmae.train.energy import EnergyMeter
from supmae.train.process import (
    ProcessRecord,
    previous_processes,
    process_span,
    process_start_time,
    take_early_record,
)
from supmae.train.saving import (  # noqa: F401  (re-exported: the jobs import them from the engine)
    CheckpointMixin,
    _EpochCosts,
    _shared_refusal,
    decide_resume,
    load_on_main,
    resume_point,
)

# ---------------------------------------------------------------------------------------------- the books


class Log:
    """Messages of rank 0 on stdout (tqdm-aware, so a progress bar is not torn)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        try:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stdout)
        except ImportError:
            print(message, flush=True)
        sys.stdout.flush()


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; the run stops before writing any checkpoint after that step."""


def check_finite(first_bad: int | None, epoch: int, last_ckpt: str | None) -> None:
    if first_bad is None:
        return
    kept = f"the last good checkpoint ({last_ckpt}) is intact" if last_ckpt else "no checkpoint was written"
    raise NonFiniteLossError(f"non-finite loss at step {first_bad} (epoch {epoch}); stopping without saving: {kept}. "
                             f"Lower the lr (--optim.blr / --optim.lr) or use --train.precision fp32")


def describe_augmentation(loader: Any) -> str:
    """What the pipeline applies, as it says itself (`augmentation`), else its repr."""
    aug = getattr(loader, "augmentation", None)
    if aug is None:
        return repr(loader)
    return aug if isinstance(aug, str) else repr(aug)


# ---------------------------------------------------------------------------------------------- the loop


class Job:
    """What one job contributes to the engine: its step (through `micro`) and its evaluation, plus the
    job-specific parts of its books and checkpoints. Subclassed by pretrain and downstream."""

    name = ""
    meter_names: tuple[str, ...] = ()

    def epoch_start(self, epoch: int) -> None:
        """Per-epoch set-up of the job's own generators (the engine sets the loader's epoch)."""

    # Whether `micro` uses the batch's sample indices (then the engine passes them when the pipeline knows them).
    wants_indices = False

    def micro(self, images: torch.Tensor, labels: torch.Tensor, sync: bool, indices: torch.Tensor | None = None
              ) -> Sequence[torch.Tensor]:
        """One micro-batch through the step; the detached device values to accumulate (`meter_names`).
        `indices`: the batch's dataset indices on the device, or None."""
        raise NotImplementedError

    def rank_state(self) -> Any:
        """This rank's own generator states inside an epoch (for a checkpoint taken there), or None."""
        return None

    def restore_rank_state(self, state: Any) -> None:
        """Put back what `rank_state` returned (None: nothing to restore)."""

    def loss_row(self, means: dict[str, float]) -> dict[str, Any]:
        """The epoch's loss keys of log.jsonl from the meter means."""
        raise NotImplementedError

    def evaluate(self, epoch: int) -> dict[str, Any]:
        """The evaluation's keys of log.jsonl (empty when this epoch does not evaluate)."""
        return {}

    def payload(self, epoch: int) -> dict[str, Any]:
        """The job's part of checkpoint-last (model, optimiser, ...)."""
        raise NotImplementedError

    def numbered(self, epoch: int) -> bool:
        """Whether epoch `epoch` also keeps a numbered checkpoint."""
        return False

    def extra_saves(self, epoch: int, row: dict[str, Any], save: Callable[[dict[str, Any], str], None]) -> None:
        """Further files rank 0 writes with the checkpoint (e.g. the best weights), each through `save(payload,
        path)`: a host snapshot now, the file written in the background."""

    def message(self, row: dict[str, Any]) -> str:
        raise NotImplementedError


@dataclass
class JobContext:
    """The process's part of a job, made before its set-up: the distributed info, the run directory,
    the log, when the process started (`time.perf_counter()`) and the energy meter started then."""

    info: dist_utils.DistInfo
    run_dir: Any
    log: Callable[[str], None]
    t_start: float
    energy: EnergyMeter


@dataclass
class EpochPlan:
    """What an epoch of training is: the loader, the lr schedule, the micro-batches read per epoch
    (whole optimiser steps only) and the micro-batches per optimiser step."""

    train_loader: Any
    schedule: Any
    micro_steps: int
    accum: int


@dataclass
class StartPoint:
    """Where a run starts: epoch and optimiser step, the wall seconds of the earlier processes (the
    checkpoint's figure), and the checkpoint read (with its path) when it resumes."""

    start_epoch: int = 0
    global_step: int = 0
    prev_elapsed: float = 0.0
    ckpt: dict[str, Any] | None = None
    ckpt_path: str | None = None


class Engine(CheckpointMixin):
    """The epoch loop, the books and the checkpoints of one run, around a job's step.

    Every rank constructs one; only rank 0's `run_dir` writes. `run` trains epochs
    [start_epoch, end_epoch) and returns the last log row.
    """

    # Optimiser steps of a process before --train.sync_debug starts watching (compilation and autotuning
    # sync). Counted per process, not per run: a resumed process compiles again.
    SYNC_DEBUG_AFTER = 3

    def __init__(self, job: Job, ctx: JobContext, *, cfg: Any, step: Any, plan: EpochPlan, start: StartPoint,
                 total_epochs: int, flops_per_image: int | None):
        info, run_dir, energy = ctx.info, ctx.run_dir, ctx.energy
        start_epoch, prev_elapsed = start.start_epoch, start.prev_elapsed
        self.job, self.cfg, self.info, self.run_dir, self.log = job, cfg, info, run_dir, ctx.log
        self.tc = cfg.train
        self.device = info.device
        self.step_obj, self.train_loader, self.schedule = step, plan.train_loader, plan.schedule
        self.micro_steps, self.accum = plan.micro_steps, plan.accum
        self.updates_per_epoch = plan.micro_steps // plan.accum
        self.start_epoch, self.global_step = start_epoch, start.global_step
        self.prev_elapsed, self.t_start = prev_elapsed, ctx.t_start
        self.total_epochs = total_epochs
        self.flops_per_image = flops_per_image
        self.last_ckpt = start.ckpt_path or None
        self.dev_name = _device_name(self.device)
        self.process_epochs = 0
        self.process_steps = 0  # optimiser steps taken by this process (a resumed run starts again at 0)
        # When this process's first optimiser step had finished (synchronised once): that step holds the
        # compilation, so the first epoch's figures are also given without it.
        self._first_step_done: float | None = None
        self._t_epoch = 0.0
        # Energy over the whole process: the jobs start the meter as soon as the device is known.
        self.energy = energy
        self._epoch_joules_start: float | None = None
        self.process_energy_kwh: float | None = None
        early = take_early_record(run_dir.path) if info.is_main else None
        if early is not None:  # written when the lock was taken, beating since (set-up counted)
            self.record = early
            self.started, self.started_from = float(early.row["start"]), str(early.row["start_from"])
            early.row.update(job=job.name, device=self.dev_name, start_epoch=start_epoch, start_step=start.global_step)
        else:
            self.started, self.started_from = process_start_time(time.time() - (time.perf_counter() - ctx.t_start))
            self.record = ProcessRecord(run_dir.path, info.is_main, job=job.name, world_size=info.world_size,
                                        device=self.dev_name, start_epoch=start_epoch, started=self.started,
                                        started_from=self.started_from)
            self.record.row["start_step"] = start.global_step
        self.record.row["energy_note"] = energy.reason or "measured (NVML, every rank's GPU)"
        # Checkpoints: rank 0 writes them on a background thread (the loop waits only for a host snapshot),
        # at every epoch end and, inside epochs, every --train.checkpoint_minutes (decided at log points).
        from supmae.train.async_checkpoint import CheckpointWriter

        self.writer = CheckpointWriter() if info.is_main else None
        self._extra_writer: CheckpointWriter | None = None
        self.checkpoint_every = 60.0 * float(getattr(self.tc, "checkpoint_minutes", 0.0) or 0.0)
        self._t_saved = time.perf_counter()
        self._costs = _EpochCosts()
        self._written: list[Any] = []  # SaveStats of finished background writes, appended by the writer's thread
        # Where the first epoch of this process starts (a checkpoint taken inside an epoch): micro-batch index.
        self.start_micro = 0
        self._resume_meter: tuple[list[float], int] | None = None
        self._resume_job_state: Any = None
        self._resume_lr_sum = 0.0
        self._epoch_order: Any = None  # this rank's sample indices of the running epoch, on the device
        self.trace = bool(getattr(self.tc, "trace_samples", False))
        # The earlier processes of this run, each at its own world size from its start to its last
        # heartbeat (their records survive a SIGKILL); a run begun before those records existed falls
        # back to the checkpoint's elapsed time at this process's world size.
        earlier = previous_processes(run_dir.path, self.record) if info.is_main else []
        if earlier:
            self.prior_seconds = sum(process_span(r) for r in earlier)
            self.prior_device_seconds = sum(process_span(r) * int(r.get("world_size") or 1) for r in earlier)
        else:
            self.prior_seconds = prev_elapsed
            self.prior_device_seconds = prev_elapsed * info.world_size

    # ---- time

    def elapsed(self) -> float:
        """Wall seconds of this run over all its processes: the earlier ones' spans (start to last
        heartbeat, so work lost to a kill counts) plus this one's from its start."""
        return self.prior_seconds + self.record.span()

    def device_seconds(self) -> float:
        """Device seconds of this run: every process's span times its own world size."""
        return self.prior_device_seconds + self.record.span() * self.info.world_size

    # ---- books

    def open_books(self, ckpt: dict[str, Any] | None) -> None:
        """Create the run directory, drop log lines past the resumed checkpoint (they are about to be
        redone), put back the checkpoint's own row if a kill came between its save and its log line,
        write config.json and open TensorBoard."""
        from supmae.config import to_dict
        from supmae.train.run_dir import LOG_FILE, read_jsonl

        rd = self.run_dir
        rd.create()
        if ckpt is not None:
            done = self.start_epoch - 1
            rd.truncate_after(done, step=int(ckpt["step"]) if ckpt.get("position") else None)
            row = ckpt.get("log_row")
            logged = rd.writer and any(int(r.get("epoch", -1)) == done for r in read_jsonl(rd.file(LOG_FILE)))
            if rd.writer and isinstance(row, dict) and not logged:
                rd.log_epoch({**row, "checkpoint_seconds": None})
        rd.write_config(to_dict(self.cfg))
        if getattr(self.tc, "tensorboard", False):
            rd.open_tensorboard()

    def write_start(self, precision_config: str, compile_config: str, augmentation: str) -> None:
        """One starts.jsonl row (rank 0): how this process started, measured right before its first step.
        The matmul peak is measured with its own generator: the run's RNG streams stay untouched."""
        if not self.info.is_main:
            return
        from supmae.train.metrics import measure_matmul_peak

        step = self.step_obj
        dtype = step.amp_dtype or torch.float32
        peak = measure_matmul_peak(self.device, dtype, seconds=0.5)
        started, source = self.started, self.started_from
        self.record.beat(first_step=time.time())
        self.run_dir.log_start({
            "job": self.job.name,
            "process": self.record.name,
            "start_epoch": self.start_epoch,
            "start_step": self.global_step,
            "start_micro": self.start_micro,
            "startup_seconds": time.time() - started,
            "startup_from": source,
            "time": time.time(),
            "precision_config": precision_config,
            "precision": step.precision,
            "compile_config": compile_config,
            "compile": bool(step.compiled),
            "compile_reason": step.compile_reason,
            "device": self.dev_name,
            "world_size": self.info.world_size,
            "peak_flops": peak,
            "peak_dtype": str(dtype).replace("torch.", ""),
            "augmentation": augmentation,
        })

    # ---- checkpoints

    # ---- the epoch loop

    def train(self, ckpt: dict[str, Any] | None) -> tuple[dict[str, Any] | None, bool | None]:
        """A job's whole training in this process: open the books, restore this rank's RNG from `ckpt`,
        run the epochs up to --train.epochs (or --train.epochs_per_run of them) and check that the
        ranks agree. Returns (the last log row, `check_in_sync()`)."""
        tc = self.tc
        if self.trace and self.train_loader.batch_indices(self.start_epoch, 0) is None:
            raise UserError(f"--train.trace_samples needs a pipeline that knows its sample order (ffcv, torchvision); "
                            f"{self.train_loader.kind}'s reader does not tell it")
        self.restore_position(ckpt)
        self.open_books(ckpt)
        self.restore_rng(ckpt)
        end_epoch = tc.epochs if not tc.epochs_per_run else min(tc.epochs, self.start_epoch + tc.epochs_per_run)
        final_row = self.run(end_epoch, precision_config=tc.precision, compile_config=tc.compile,
                             augmentation=describe_augmentation(self.train_loader))
        return final_row, self.check_in_sync()

    def run(self, end_epoch: int, *, precision_config: str, compile_config: str, augmentation: str
            ) -> dict[str, Any] | None:
        from supmae.train.metrics import DeviceMeter, TimedIterator, synchronize

        show_bar = bool(getattr(self.tc, "progress", True)) and self.info.is_main and sys.stderr.isatty()
        meter = DeviceMeter(self.job.meter_names, self.device)
        final_row: dict[str, Any] | None = None
        completed = False
        self.record.beat()
        try:
            for epoch in range(self.start_epoch, end_epoch):
                first_micro = self.start_micro if self.process_epochs == 0 else 0
                self.train_loader.set_epoch(epoch, first_micro)
                self.job.epoch_start(epoch)
                if first_micro:  # after epoch_start's reseeding: the generators as they stood at the save
                    self.job.restore_rank_state(self._resume_job_state)
                self.step_obj.core.train()
                meter.reset()
                lr_start = 0.0
                if first_micro:
                    if self._resume_meter is not None:
                        meter.restore(*self._resume_meter)
                    lr_start = self._resume_lr_sum
                self._costs = _EpochCosts()
                self._prepare_epoch_order(epoch)
                if self.process_epochs == 0:
                    self.write_start(precision_config, compile_config, augmentation)
                # After write_start: its matmul-peak buffers are not the training step's memory.
                _reset_peak_memory(self.device)
                bar = None
                if show_bar:
                    from tqdm import tqdm

                    bar = tqdm(total=self.updates_per_epoch, desc=f"epoch {epoch + 1}/{self.tc.epochs}",
                               unit="step", dynamic_ncols=True, leave=False)
                synchronize(self.device)
                self._epoch_joules_start = self.energy.joules()
                t_epoch = self._t_epoch = time.perf_counter()
                batches = TimedIterator(self.train_loader)
                try:
                    lr_sum = self._train_epoch(epoch, batches, meter, bar, first_micro, lr_start)
                finally:
                    batches.close()
                    if bar is not None:
                        bar.close()
                synchronize(self.device)
                epoch_seconds = time.perf_counter() - t_epoch
                final_row = self._end_epoch(epoch, meter, batches, lr_sum, epoch_seconds, first_micro)
                self.process_epochs += 1
            # Every rank gets here after the same epochs: one last energy reading covers the last
            # epoch's evaluation and checkpoint too.
            self._read_energy(None)
            self._close_writers(completed=True)  # the job is done when its last checkpoint is on disk
            completed = True
        finally:
            if not completed:  # on an error too: a save in flight is a valid older state, finished first
                self._close_writers(completed=False)
            # Also when the run stops on an error: the process is over, and its span ends here.
            self.record.beat(ended=True, energy_kwh=self.process_energy_kwh)
            self.run_dir.close()
        return final_row

    def _train_epoch(self, epoch: int, batches: Any, meter: Any, bar: Any, first_micro: int, lr_start: float
                     ) -> float:
        debug = getattr(self.tc, "sync_debug", "off")
        if debug != "off" and self.device.type != "cuda":
            raise UserError(f"--train.sync_debug {debug} watches CUDA host syncs; this run is on {self.device.type}")
        try:
            return self._train_epoch_steps(epoch, batches, meter, bar, first_micro, lr_start)
        finally:
            if debug != "off":
                torch.cuda.set_sync_debug_mode("default")

    def _train_epoch_steps(self, epoch: int, batches: Any, meter: Any, bar: Any, first_micro: int, lr_start: float
                           ) -> float:
        from supmae.train.schedule import set_lr

        step, accum, opt = self.step_obj, self.accum, self.step_obj.optimizer
        sums0, count0 = [0.0] * len(self.job.meter_names), 0
        if first_micro:  # the restored partial sums, all ranks' (a collective, once per resumed epoch)
            sums0, count0, _ = meter.read_sums()
        window = {"t": time.perf_counter(), "wait": 0.0, "sums": sums0, "count": count0, "micro": first_micro}
        lr_sum, lr = lr_start, 0.0
        step_ids: list[Any] = []  # --train.trace_samples: this rank's sample indices of the step so far
        # --train.sync_debug (CUDA): torch reports every host sync in the steps between log reads, once
        # the first SYNC_DEBUG_AFTER optimiser steps (compilation, cudnn autotuning) are behind.
        debug = getattr(self.tc, "sync_debug", "off")
        for i in range(first_micro, self.micro_steps):
            if debug != "off" and self.process_steps >= self.SYNC_DEBUG_AFTER:
                torch.cuda.set_sync_debug_mode(debug)
            if i % accum == 0:
                lr = self.schedule(epoch, i)
                set_lr(opt, lr)
                lr_sum += lr
                meter.set_step(self.global_step + 1)
            try:
                images, labels = next(batches)
            except StopIteration:
                raise RuntimeError(f"the {self.train_loader.kind} pipeline ended after {i} batches, but its "
                                   f"len() promised {len(self.train_loader)}") from None
            boundary = (i + 1) % accum == 0
            ids = None
            if self._epoch_order is not None:  # this batch's sample indices, sliced on the device (no copy)
                b = self.cfg.data.batch_size
                ids = self._epoch_order[i * b : i * b + images.shape[0]]
                if self.trace:
                    step_ids.append(ids)
            meter.add(*self.job.micro(images, labels, boundary, ids))
            if not boundary:
                continue
            step.update()
            if debug != "off":
                torch.cuda.set_sync_debug_mode("default")  # the log read below syncs on purpose
            self.global_step += 1
            self.process_steps += 1
            if self.process_steps == 1:
                from supmae.train.metrics import synchronize

                synchronize(self.device)  # once per process, before any watched step
                self._first_step_done = time.perf_counter()
            if bar is not None:
                bar.update(1)
            if self.trace:
                self._trace_step(epoch, step_ids)
                step_ids = []
            if self.global_step % self.tc.log_every == 0:
                self._log_window(meter, batches, window, epoch, lr, bar, i + 1)
                if i + 1 < self.micro_steps and self._save_due():
                    self._save_inside(epoch, i + 1, meter, lr_sum)
            elif self.record.due():
                # Host-side only (a clock read, a small file renamed): no device sync in the step.
                self.record.beat(step=self.global_step)
        return lr_sum

    def _log_window(self, meter: Any, batches: Any, window: dict[str, Any], epoch: int, lr: float, bar: Any,
                    micro_done: int) -> None:
        """A log point: read the device sums (the only sync inside an epoch), check them, write steps.jsonl."""
        sums, count, first_bad = meter.read_sums()
        check_finite(first_bad, epoch, self.last_ckpt)
        now = time.perf_counter()
        dt = max(now - window["t"], 1e-9)
        n = count - window["count"]
        loss = (sums[0] - window["sums"][0]) / max(n, 1)
        images = (micro_done - window["micro"]) * self.cfg.data.batch_size * self.info.world_size
        row = {
            "step": self.global_step,
            "epoch": epoch,
            "lr": lr,
            "loss": loss,
            "images_per_sec": images / dt,
            "data_wait_frac": (batches.wait_seconds - window["wait"]) / dt,
            "elapsed_seconds": self.elapsed(),
        }
        # The heartbeat first: whoever sees this step line (a supervisor about to preempt the job) knows
        # that the process record already covers it.
        self.record.beat(step=self.global_step)
        self.run_dir.log_step(row)
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        window.update(t=now, wait=batches.wait_seconds, sums=sums, count=count, micro=micro_done)

    def _end_epoch(self, epoch: int, meter: Any, batches: Any, lr_sum: float, epoch_seconds: float,
                   first_micro: int = 0) -> dict[str, Any]:
        from supmae.train.metrics import peak_memory_mb

        info, device = self.info, self.device
        sums, count, first_bad = meter.read_sums()
        check_finite(first_bad, epoch, self.last_ckpt)
        energy = self._read_energy(epoch_seconds)
        wait = torch.tensor([batches.wait_seconds], dtype=torch.float64, device=device)
        dist_utils.all_reduce_sum(wait)
        mem = torch.tensor([peak_memory_mb(device)], dtype=torch.float64, device=device)
        dist_utils.all_reduce_max(mem)
        wait_seconds = float(wait.item()) / info.world_size
        means = {name: sums[k] / max(count, 1) for k, name in enumerate(self.job.meter_names)}
        row: dict[str, Any] = {"epoch": epoch, "train_lr": lr_sum / self.updates_per_epoch,
                               **self.job.loss_row(means)}
        # Every rank evaluates, and rank 0 saves, the same model: rank 0's buffers (BatchNorm running
        # statistics; DDP broadcast them only at the start of each forward). Nothing between here and the
        # save changes a buffer (evaluation runs in eval mode), so this one sync serves both.
        t_eval = time.perf_counter()
        dist_utils.broadcast_buffers(self.step_obj.core)
        evaluated = self.job.evaluate(epoch)
        row.update(evaluated)
        eval_seconds = time.perf_counter() - t_eval if evaluated else 0.0
        self.record.beat()  # an evaluation can take a while: a kill during the save must not hide it
        images = (self.micro_steps - first_micro) * self.cfg.data.batch_size * info.world_size
        total_elapsed = self.elapsed()
        row.update({
            "epoch_seconds": epoch_seconds,
            "images_per_sec": images / epoch_seconds,
            "step_time_ms": 1000.0 * epoch_seconds / self.updates_per_epoch,
            **self._without_first_step(epoch_seconds, images),
            "data_wait_frac": wait_seconds / epoch_seconds,
            "data_wait_seconds": wait_seconds,
            "eval_seconds": eval_seconds,
            "peak_mem_mb": float(mem.item()),
            "elapsed_seconds": total_elapsed,
            "device_hours": self.device_seconds() / 3600.0,
            "world_size": info.world_size,
            "device": self.dev_name,
            "steps": self.updates_per_epoch,
            "images": images,
            **({"resumed_at_step": first_micro // self.accum} if first_micro else {}),
            # The loop's own costs: the epoch's first batch (loader restart: FFCV's thread, DALI's next
            # pipeline, DataLoader workers), the saves' stall inside the epoch (the one at its end follows).
            "epoch_start_wait_seconds": batches.first_wait,
            "checkpoints_inside": self._costs.saves,
            "checkpoint_stall_inside_seconds": self._costs.stall,
            "total_epochs": self.total_epochs,
            "process_epoch": self.process_epochs,
            "flops_per_image": self.flops_per_image,
            **energy,
        })
        t_ckpt = time.perf_counter()
        self.last_ckpt = self.save(epoch, row)
        row["checkpoint_seconds"] = time.perf_counter() - t_ckpt  # the loop's stall: the host snapshot
        # The background writes finished since the last epoch row (usually the previous epoch's saves).
        written, self._written[:] = list(self._written), []
        row["checkpoint_write_seconds"] = sum(w.write_seconds for w in written)
        row["checkpoint_writes"] = len(written)
        self.run_dir.log_epoch(row)
        self.log(self.job.message(row))
        return row

    def _without_first_step(self, epoch_seconds: float, images: int) -> dict[str, float]:
        """The process's first epoch once more without its first optimiser step (compilation, autotuning,
        allocator warm-up): `first_step_seconds` and `images_per_sec_after_first_step`. Empty in later
        epochs of the process, or when the epoch had a single step."""
        if self.process_epochs != 0 or self._first_step_done is None or self.updates_per_epoch < 2:
            return {}
        first = self._first_step_done - self._t_epoch
        rest = max(epoch_seconds - first, 1e-9)
        rest_images = images * (self.updates_per_epoch - 1) / self.updates_per_epoch
        return {"first_step_seconds": first, "images_per_sec_after_first_step": rest_images / rest}

    def _read_energy(self, epoch_seconds: float | None) -> dict[str, float]:
        """Energy of every rank's GPU, summed (a collective on every rank, also without NVML, so that all
        ranks make the same calls): {"energy_kwh", "avg_watts"} of the epoch's training loop when
        `epoch_seconds` is given, and "process_energy_kwh", this process's whole energy so far (start-up,
        evaluation and checkpoints included). Empty where any rank cannot measure: never an estimate."""
        total = self.energy.joules()
        start = self._epoch_joules_start
        epoch = total - start if total is not None and start is not None and epoch_seconds is not None else None
        packed = torch.tensor([epoch or 0.0, total or 0.0, float(epoch is not None), float(total is not None)],
                              dtype=torch.float64).to(self.device)
        dist_utils.all_reduce_sum(packed)
        epoch_j, total_j, n_epoch, n_total = packed.tolist()
        world = self.info.world_size
        out: dict[str, float] = {}
        if n_total == world:
            self.process_energy_kwh = total_j / 3.6e6
            out["process_energy_kwh"] = self.process_energy_kwh
        if n_epoch == world and epoch_seconds:
            out.update(energy_kwh=epoch_j / 3.6e6, avg_watts=epoch_j / max(epoch_seconds, 1e-9))
        if self.process_energy_kwh is not None:
            self.record.row["energy_kwh"] = self.process_energy_kwh
        return out

    def check_in_sync(self) -> bool | None:
        """After the last epoch (buffers already synchronised there): whether every rank holds identical
        weights and buffers; None in a single process. RuntimeError when they differ."""
        if not self.info.distributed:
            return None
        if not dist_utils.check_in_sync(self.step_obj.core, self.device):
            raise RuntimeError("the ranks ended with different weights (DDP went out of sync)")
        self.log(f"weights identical on all {self.info.world_size} ranks")
        return True


def _device_name(device: torch.device) -> str:
    from supmae.train.metrics import device_name

    return device_name(device)


def _reset_peak_memory(device: torch.device) -> None:
    from supmae.train.metrics import reset_peak_memory

    reset_peak_memory(device)
