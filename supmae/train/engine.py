"""The training engine the three jobs (pretrain, finetune, linprobe) share.

Where the seam is: a job contributes its *step* (`supmae.train.steps`: forward, loss, backward of
one micro-batch and the optimiser update) and its *evaluation*; everything around them lives here
and is the same for every job:

- device and precision resolution (bf16 / fp16 + grad scaler / fp32), TF32, `torch.compile`;
- DDP wrapping (`no_sync` accumulation is the step's, through `step.ddp`);
- the epoch loop skeleton (`Engine.train_epoch`): per-iteration lr, host-side data-wait
  accounting, device-side loss sums read only at log points, the tqdm progress bar;
- per-rank RNG capture and restore (every rank's state saved, each rank restores its own);
- buffer sync (rank 0's BatchNorm statistics) before every evaluation and every save;
- evaluation sample accounting (`real_samples`: each validation sample counted once across ranks);
- the resume decision (rank 0 finds and reads the checkpoint, then broadcasts it: no shared
  filesystem needed) and checkpoint writing (rank 0 only; a numbered checkpoint is serialised once
  and copied);
- the run directory's books (`config.json`, `log.jsonl` with the same per-epoch keys in every job,
  `steps.jsonl`, `starts.jsonl`).
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from supmae.errors import UserError
from supmae.train import distributed as dist_utils

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------- precision


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> bf16 on CUDA where supported (else fp16), fp32 on the CPU; fp16 needs CUDA (its scaler)."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise UserError(f"--train.precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and device.type != "cuda":
        raise UserError("--train.precision fp16 needs a CUDA device (its grad scaler); use bf16 or fp32 on the CPU")
    return precision


def amp_dtype_of(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (None: no autocast)."""
    return AMP_DTYPES[precision]


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def grad_scaler(device: torch.device) -> Any:
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device.type)
    return torch.cuda.amp.GradScaler()


def set_matmul_precision(device: torch.device, deterministic: bool) -> None:
    """TF32 matmuls and convolutions on CUDA unless deterministic (TF32 rounding differs per kernel choice)."""
    if device.type != "cuda" or deterministic:
        return
    torch.set_float32_matmul_precision("high")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def configure_determinism(device: torch.device, deterministic: bool) -> None:
    """Deterministic kernels (exact resume on the CPU), or cudnn autotuning on CUDA."""
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


# ---------------------------------------------------------------------------------------------- compile, DDP


def resolve_compile(setting: str, device: torch.device) -> tuple[bool, str]:
    """(compile?, why not: "" when compiled) for `--train.compile auto|on|off`; auto = on for CUDA."""
    if setting not in ("auto", "on", "off"):
        raise UserError(f"--train.compile must be auto, on or off, got {setting!r}")
    if setting == "off":
        return False, "--train.compile off"
    if setting == "auto" and device.type != "cuda":
        return False, f"--train.compile auto compiles on CUDA only (device {device.type})"
    if not hasattr(torch, "compile"):
        if setting == "on":
            raise UserError("--train.compile on needs torch.compile, which this torch lacks")
        return False, "this torch has no torch.compile"
    return True, ""


def compile_backend(setting: str) -> str:
    """`auto` -> inductor (its CPU path needs a C++ compiler; `aot_eager` needs none)."""
    return "inductor" if setting in ("", "auto") else setting


def maybe_compile(model: nn.Module, enabled: bool, backend: str, device: torch.device) -> nn.Module:
    """`torch.compile(model)` with `backend` when `enabled`. Compiled after DDP wrapping, so that the
    compiler sees DDP's buckets and splits the graph at them."""
    if not enabled:
        return model
    return torch.compile(model, backend=compile_backend(backend))


def wrap_ddp(core: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(core, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=find_unused_parameters)


# ---------------------------------------------------------------------------------------------- RNG state


def _to_lists(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return [_to_lists(x) for x in obj]
    return obj


def _to_tuples(obj: Any) -> Any:
    if isinstance(obj, list):
        return tuple(_to_tuples(x) for x in obj)
    return obj


def capture_rng(device: torch.device) -> dict[str, Any]:
    """This process's global RNG states as tensors and plain types (loadable with weights_only)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": list(_to_lists(random.getstate())),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(_to_tuples(state["python"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def gather_rng(device: torch.device) -> dict[str, Any]:
    """Every rank's RNG state (a collective when distributed): rank 0's at the top level (so a 1-rank
    resume of a multi-rank run works), all of them under `by_rank`."""
    states = dist_utils.all_gather_object(capture_rng(device))
    return {**states[0], "by_rank": states if len(states) > 1 else None}


def restore_rank_rng(saved: dict[str, Any], rank: int, world_size: int, device: torch.device) -> None:
    """Restore this rank's own state from `gather_rng`'s dict (rank 0's when the world size changed)."""
    per_rank = saved.get("by_rank")
    restore_rng(per_rank[rank] if per_rank and len(per_rank) == world_size else saved, device)


# ---------------------------------------------------------------------------------------------- process


@contextlib.contextmanager
def process_settings() -> Any:
    """Put back the process-wide torch settings a run changes (deterministic algorithms, intra-op
    threads), for callers of the Python API that run several jobs in one process."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads())
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.set_num_threads(saved[1])


def set_cpu_threads(threads: int) -> None:
    """`--train.cpu_threads`, applied after the loaders are built: FFCV's loader constructor sets torch's
    thread count itself, and the user's value must win."""
    if threads:
        torch.set_num_threads(threads)


_JOBS_STARTED_IN_THIS_PROCESS = 0


def process_start_time(run_call: float | None = None) -> tuple[float, str]:
    """(unix time this process started, "process") from /proc on Linux, so that startup_seconds includes
    the interpreter start and imports; (`run_call` or now, "run_call") where that cannot be read, and for
    every job after the first one of a process (the demo runs pretraining, then a probe, in one
    process: the probe's start-up must not include the whole pretraining)."""
    global _JOBS_STARTED_IN_THIS_PROCESS
    _JOBS_STARTED_IN_THIS_PROCESS += 1
    fallback = (run_call if run_call is not None else time.time(), "run_call")
    if _JOBS_STARTED_IN_THIS_PROCESS > 1:
        return fallback
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat(5), counted after the ")" that ends the command
        with open("/proc/stat", encoding="ascii") as fh:
            btime = next(int(line.split()[1]) for line in fh if line.startswith("btime"))
        return btime + start_ticks / os.sysconf("SC_CLK_TCK"), "process"
    except (OSError, ValueError, IndexError, StopIteration):
        return fallback


# ---------------------------------------------------------------------------------------------- evaluation


def real_samples(loader: Any) -> int:
    """How many of this rank's validation samples are not repeats.

    Without drop_last every rank reads ceil(N / S) samples; to even the ranks out the backends repeat
    a few (fewer than S in all) at the *end* of some ranks' unshuffled order. Which ranks depends on
    how each backend splits the N samples: torchvision's DistributedSampler deals them out in turn
    (rank r gets r, r + S, ...), FFCV's order (pipelines.base.rank_order) cuts the padded list into
    contiguous pieces, DALI's reader cuts the unpadded list into contiguous shards. Counting only
    these samples, the ranks together count each validation sample exactly once.
    """
    n, s, r, per = loader.num_total, loader.world_size, loader.rank, loader.num_samples
    if s == 1:
        return per
    if loader.kind == "torchvision":
        real = len(range(r, n, s))
    elif loader.kind == "dali":
        real = (r + 1) * n // s - r * n // s
    else:
        real = n - r * per
    return max(0, min(per, real))


class RealBatches:
    """Iterate a validation loader and yield (images, labels) cut to this rank's real samples (the
    padding repeats of `real_samples` dropped), so that summing over ranks counts each sample once."""

    def __init__(self, loader: Any, max_batches: int = 0):
        self.loader = loader
        self.max_batches = max_batches

    def __iter__(self) -> Any:
        real = real_samples(self.loader)
        done = 0
        for i, (images, labels) in enumerate(self.loader):
            if self.max_batches and i >= self.max_batches:
                break
            keep = max(0, min(labels.shape[0], real - done))
            done += labels.shape[0]
            if keep == 0:
                continue
            if keep < labels.shape[0]:
                images, labels = images[:keep], labels[:keep]
            yield images, labels


# ---------------------------------------------------------------------------------------------- energy


class EnergyMeter:
    """Energy of an epoch from NVML's total-energy counters (nvidia-ml-py, feature-detected; CUDA only).

    It reads the GPUs of rank 0's node that this job uses (LOCAL_WORLD_SIZE of them) and scales by
    world_size / that count: an estimate for the whole job that assumes every node draws what rank 0's does.
    """

    def __init__(self, device: torch.device, world_size: int, enabled: bool):
        self.handles: list[Any] = []
        self.scale = 1.0
        self._nvml: Any = None
        self._start: list[int] = []
        if not enabled or device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            local = max(1, min(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), pynvml.nvmlDeviceGetCount()))
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(local)]
            for h in handles:
                pynvml.nvmlDeviceGetTotalEnergyConsumption(h)  # unsupported boards raise here
        except Exception:  # noqa: BLE001 - missing package, driver, or an unsupported board: no energy figures
            return
        self._nvml, self.handles, self.scale = pynvml, handles, world_size / len(handles)

    @property
    def available(self) -> bool:
        return bool(self.handles)

    def start(self) -> None:
        if self.available:
            self._start = [self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self.handles]

    def stop(self, seconds: float) -> dict[str, float]:
        """{"energy_kwh", "avg_watts"} since `start` (empty without NVML)."""
        if not self.available or not self._start:
            return {}
        now = [self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self.handles]
        joules = sum(b - a for a, b in zip(self._start, now)) / 1000.0 * self.scale  # NVML counts millijoules
        return {"energy_kwh": joules / 3.6e6, "avg_watts": joules / max(seconds, 1e-9)}


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

    Rank 0 alone looks at the run directory and reads the file; the others receive its decision and
    the checkpoint. `resume` is "" (fresh: refused when the directory already holds a run), "auto"
    (the newest valid checkpoint; refused when there is none but the directory holds a run) or a path.
    """
    from supmae.train.checkpoint import find_resume_checkpoint, load_checkpoint

    path, ckpt, refusal = "", None, ""
    if info.is_main:
        try:
            if resume == "":
                if run_dir.holds_a_run():
                    refusal = (f"run directory {run_dir.path} already holds a run (log or checkpoints); continue "
                               f"it with --resume auto, or choose another --output-dir")
            elif resume == "auto":
                found = find_resume_checkpoint(run_dir.path, log=log)
                if found is not None:
                    path, ckpt = found
                elif run_dir.holds_a_run():
                    refusal = (f"--resume auto: no usable checkpoint in {run_dir.path}, but it holds a run; "
                               f"refusing to start over and overwrite it (choose another --output-dir)")
            else:
                path, ckpt = resume, load_checkpoint(resume)
        except UserError as exc:
            refusal = str(exc)
    _shared_refusal(refusal, info)
    if info.distributed:
        path, ckpt = dist_utils.broadcast_object((path, ckpt))
    return path, ckpt


# ---------------------------------------------------------------------------------------------- the loop


class Job:
    """What one job contributes to the engine: its step (through `micro`) and its evaluation, plus the
    job-specific parts of its books and checkpoints. Subclassed by pretrain and downstream."""

    name = ""
    meter_names: tuple[str, ...] = ()

    def epoch_start(self, epoch: int) -> None:
        """Per-epoch set-up of the job's own generators (the engine sets the loader's epoch)."""

    def micro(self, images: torch.Tensor, labels: torch.Tensor, sync: bool) -> Sequence[torch.Tensor]:
        """One micro-batch through the step; the detached device values to accumulate (`meter_names`)."""
        raise NotImplementedError

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

    def extra_saves(self, epoch: int, row: dict[str, Any]) -> None:
        """Further files rank 0 writes with the checkpoint (e.g. the best weights)."""

    def message(self, row: dict[str, Any]) -> str:
        raise NotImplementedError


class Engine:
    """The epoch loop, the books and the checkpoints of one run, around a job's step.

    Every rank constructs one; only rank 0's `run_dir` writes. `run` trains epochs
    [start_epoch, end_epoch) and returns the last log row.
    """

    def __init__(self, job: Job, *, cfg: Any, info: dist_utils.DistInfo, run_dir: Any, log: Callable[[str], None],
                 step: Any, train_loader: Any, schedule: Any, micro_steps: int, accum: int, start_epoch: int,
                 global_step: int, prev_elapsed: float, t_start: float, total_epochs: int,
                 flops_per_image: int | None, last_ckpt: str | None = None):
        self.job, self.cfg, self.info, self.run_dir, self.log = job, cfg, info, run_dir, log
        self.tc = cfg.train
        self.device = info.device
        self.step_obj, self.train_loader, self.schedule = step, train_loader, schedule
        self.micro_steps, self.accum = micro_steps, accum
        self.updates_per_epoch = micro_steps // accum
        self.start_epoch, self.global_step = start_epoch, global_step
        self.prev_elapsed, self.t_start = prev_elapsed, t_start
        self.total_epochs = total_epochs
        self.flops_per_image = flops_per_image
        self.last_ckpt = last_ckpt
        self.dev_name = _device_name(self.device)
        self.process_epochs = 0
        self.energy = EnergyMeter(self.device, info.world_size, enabled=info.is_main)

    # ---- time

    def elapsed(self) -> float:
        """Seconds of this run over all its processes (the previous ones' from the checkpoint)."""
        return self.prev_elapsed + time.perf_counter() - self.t_start

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
            rd.truncate_after(done)
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
        started, source = process_start_time(time.time() - (time.perf_counter() - self.t_start))
        self.run_dir.log_start({
            "job": self.job.name,
            "start_epoch": self.start_epoch,
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

    def restore_rng(self, ckpt: dict[str, Any] | None) -> None:
        """This rank's own RNG state from the checkpoint; call it last before the first epoch, so that
        everything up to the epoch loop consumes the RNG exactly as in an uninterrupted run."""
        if ckpt is not None and ckpt.get("rng"):
            restore_rank_rng(ckpt["rng"], self.info.rank, self.info.world_size, self.device)

    def save(self, epoch: int, row: dict[str, Any]) -> str:
        """checkpoint-last.pth (and a numbered one when the job asks), serialised by rank 0 once: the numbered
        file is a copy of the same bytes. A collective (every rank's RNG is gathered)."""
        from supmae.config import to_dict
        from supmae.train.checkpoint import LAST_NAME, atomic_save, copy_checkpoint

        rng = gather_rng(self.device)
        last = self.run_dir.file(LAST_NAME)
        if not self.info.is_main:
            return last
        payload = {**self.job.payload(epoch), "epoch": epoch, "step": self.global_step, "config": to_dict(self.cfg),
                   "rng": rng, "elapsed_seconds": self.elapsed(), "log_row": row}
        atomic_save(payload, last)
        self.job.extra_saves(epoch, row)
        if self.job.numbered(epoch):
            numbered = self.run_dir.file(f"checkpoint-{epoch:04d}.pth")
            copy_checkpoint(last, numbered)
            return numbered
        return last

    # ---- the epoch loop

    def run(self, end_epoch: int, *, precision_config: str, compile_config: str, augmentation: str
            ) -> dict[str, Any] | None:
        from supmae.train.metrics import DeviceMeter, TimedIterator, synchronize

        show_bar = bool(getattr(self.tc, "progress", True)) and self.info.is_main and sys.stderr.isatty()
        meter = DeviceMeter(self.job.meter_names, self.device)
        final_row: dict[str, Any] | None = None
        try:
            for epoch in range(self.start_epoch, end_epoch):
                self.train_loader.set_epoch(epoch)
                self.job.epoch_start(epoch)
                self.step_obj.core.train()
                meter.reset()
                _reset_peak_memory(self.device)
                if self.process_epochs == 0:
                    self.write_start(precision_config, compile_config, augmentation)
                bar = None
                if show_bar:
                    from tqdm import tqdm

                    bar = tqdm(total=self.updates_per_epoch, desc=f"epoch {epoch + 1}/{self.tc.epochs}",
                               unit="step", dynamic_ncols=True, leave=False)
                synchronize(self.device)
                self.energy.start()
                t_epoch = time.perf_counter()
                batches = TimedIterator(self.train_loader)
                try:
                    lr_sum = self._train_epoch(epoch, batches, meter, bar)
                finally:
                    batches.close()
                    if bar is not None:
                        bar.close()
                synchronize(self.device)
                epoch_seconds = time.perf_counter() - t_epoch
                final_row = self._end_epoch(epoch, meter, batches, lr_sum, epoch_seconds)
                self.process_epochs += 1
        finally:
            self.run_dir.close()
        return final_row

    def _train_epoch(self, epoch: int, batches: Any, meter: Any, bar: Any) -> float:
        from supmae.train.schedule import set_lr

        step, accum, opt = self.step_obj, self.accum, self.step_obj.optimizer
        window = {"t": time.perf_counter(), "wait": 0.0, "sums": [0.0] * len(self.job.meter_names), "count": 0,
                  "micro": 0}
        lr_sum, lr = 0.0, 0.0
        for i in range(self.micro_steps):
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
            meter.add(*self.job.micro(images, labels, boundary))
            if not boundary:
                continue
            step.update()
            self.global_step += 1
            if bar is not None:
                bar.update(1)
            if self.global_step % self.tc.log_every == 0:
                self._log_window(meter, batches, window, epoch, lr, bar, i + 1)
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
        self.run_dir.log_step(row)
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        window.update(t=now, wait=batches.wait_seconds, sums=sums, count=count, micro=micro_done)

    def _end_epoch(self, epoch: int, meter: Any, batches: Any, lr_sum: float, epoch_seconds: float
                   ) -> dict[str, Any]:
        from supmae.train.metrics import peak_memory_mb

        info, device = self.info, self.device
        sums, count, first_bad = meter.read_sums()
        check_finite(first_bad, epoch, self.last_ckpt)
        energy = self.energy.stop(epoch_seconds)
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
        images = self.micro_steps * self.cfg.data.batch_size * info.world_size
        total_elapsed = self.elapsed()
        row.update({
            "epoch_seconds": epoch_seconds,
            "images_per_sec": images / epoch_seconds,
            "step_time_ms": 1000.0 * epoch_seconds / self.updates_per_epoch,
            "data_wait_frac": wait_seconds / epoch_seconds,
            "data_wait_seconds": wait_seconds,
            "eval_seconds": eval_seconds,
            "peak_mem_mb": float(mem.item()),
            "elapsed_seconds": total_elapsed,
            "device_hours": total_elapsed * info.world_size / 3600.0,
            "world_size": info.world_size,
            "device": self.dev_name,
            "steps": self.updates_per_epoch,
            "images": images,
            "total_epochs": self.total_epochs,
            "process_epoch": self.process_epochs,
            "flops_per_image": self.flops_per_image,
            **energy,
        })
        t_ckpt = time.perf_counter()
        self.last_ckpt = self.save(epoch, row)
        row["checkpoint_seconds"] = time.perf_counter() - t_ckpt
        self.run_dir.log_epoch(row)
        self.log(self.job.message(row))
        return row

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
