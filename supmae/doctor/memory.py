"""The doctor's memory probe: the per-device batch that fits, one code path on every device (CUDA's
allocator statistics, or on the CPU the tensor bytes counted op by op)."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

from supmae.doctor.measure import synthetic_batch


def _live_tensor_bytes_mode() -> Any:
    """A dispatch mode counting the bytes of tensor storage created inside it that are still alive, and
    their peak: the CPU's counterpart of CUDA's allocator statistics. It sees every op (autograd's
    backward and the optimiser's included), so it counts exactly what the step allocates; the process's
    resident set does not (glibc keeps freed heap, so a later, larger step may add nothing to it)."""
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    from torch.utils.weak import WeakIdKeyDictionary

    class LiveTensorBytes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.live = 0
            self.peak = 0
            self._seen: Any = WeakIdKeyDictionary()

        def _free(self, n: int) -> None:
            self.live -= n

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    st = t.untyped_storage()
                    if st not in self._seen:  # a view or an in-place result shares a storage already counted
                        n = st.nbytes()
                        self._seen[st] = n
                        self.live += n
                        self.peak = max(self.peak, self.live)
                        weakref.finalize(st, self._free, n)
            return out

    return LiveTensorBytes()


class _SavedBytes:
    """Bytes of the distinct tensor storages autograd saves for the backward inside the block (the
    activations, plus the weights, which do not depend on the batch): the same on every device."""

    def __init__(self) -> None:
        self.bytes = 0
        self._seen: set[int] = set()
        self._ctx: Any = None

    def _pack(self, t: Any) -> Any:
        st = t.untyped_storage()
        if st.data_ptr() not in self._seen:
            self._seen.add(st.data_ptr())
            self.bytes += st.nbytes()
        return t

    def __enter__(self) -> _SavedBytes:  # noqa: PYI034 (typing.Self needs Python 3.11; we support 3.10)
        import torch

        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


class MemoryMeter:
    """The one device-specific part of the batch probe: memory a block of work adds at its peak.

    CUDA: torch's allocator statistics (peak allocated minus allocated before). CPU: the peak bytes of
    the tensors the block creates and keeps alive at once, counted op by op (torch has no CPU
    allocator statistics; the allocator's own slack comes on top, which is why the estimate keeps 10%
    of the available memory aside)."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.added = 0  # peak bytes above what was allocated when the block began
        self.kept = 0  # bytes the block left allocated (a backward's gradients)
        self._mode: Any = None
        self._before = 0

    def __enter__(self) -> MemoryMeter:  # noqa: PYI034 (typing.Self needs Python 3.11; we support 3.10)
        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
        else:
            self._mode = _live_tensor_bytes_mode()
            self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.added = torch.cuda.max_memory_allocated(self.device) - self._before
            self.kept = torch.cuda.memory_allocated(self.device) - self._before
        else:
            self._mode.__exit__(*exc)
            self.added = self._mode.peak
            self.kept = self._mode.live

    def available(self) -> int:
        """Bytes the device could still give: free CUDA memory plus what torch caches, or what psutil
        reports available on the CPU."""
        import torch

        if self.cuda:
            free, _total = torch.cuda.mem_get_info(self.device)
            return int(free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device))
        import psutil

        return int(psutil.virtual_memory().available)

    def out_of_memory(self) -> tuple[type[BaseException], ...]:
        import torch

        return (torch.cuda.OutOfMemoryError,) if self.cuda else ()


def probe_batch(cfg: Any, device: Any, num_classes: int, limit: int | None = None,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """The per-device batch that fits memory: one code path on every device.

    The trainer's step, built uncompiled (a compiled step would recompile for every new batch
    size; compiled code needs no more memory than eager, so the answer errs on the safe side), runs
    one warm step first: AdamW allocates its state at the first update, and a measurement that
    included that allocation made per-image memory come out about twice too high. Then, at half the
    recipe's batch and at the batch itself, the memory the micro-batch (forward + backward) adds at
    its peak, and the update's peak on top of the gradients the backward left: the micro-batch
    grows as fixed + per image x batch, the update does not grow with the batch (at small batches
    its peak is the step's, so one line through the whole step's peaks would miss the per-image
    part). A step at b needs max(micro line at b, update). Then batches double from the recipe's
    while that says they fit, up to `limit` (default: 4096 on CUDA; on the CPU the recipe's batch,
    where far larger batches take minutes per step), until one runs out of memory; the largest that
    ran is the answer, or, when none ran out, the estimate of what fits 90% of the memory still
    available."""
    import copy

    from supmae.train.steps import build_pretrain_step

    cfg = copy.deepcopy(cfg)
    cfg.train.compile = "off"
    batch, size = cfg.data.batch_size, cfg.data.img_size
    meter = MemoryMeter(device)
    if limit is None:
        limit = 4096 if meter.cuda else batch
    small = max(2, batch // 2)
    steps = [build_pretrain_step(cfg, device, num_classes)]

    def run(b: int) -> tuple[int, int, int]:
        """(what the micro-batch adds at its peak, the bytes its forward saves for the backward, what the
        update needs: the gradients + its own peak)."""
        imgs, labels = synthetic_batch(b, size, num_classes, device)
        with MemoryMeter(device) as micro, _SavedBytes() as saved:
            steps[0].micro(imgs, labels)
        del imgs, labels
        with MemoryMeter(device) as update:
            steps[0].update()
        return micro.added, saved.bytes, micro.kept + update.added

    try:
        run(small)  # the warm step: AdamW's state exists from here on
        if small == batch:
            return {"max_batch": None, "method": "not estimated (the recipe's batch is too small to measure two "
                    "sizes)", "per_image_bytes": None}
        (added_small, saved_small, update_small), (added_full, saved_full, update_full) = run(small), run(batch)
        # Per image: the larger of the peaks' slope and the slope of the activations saved for the
        # backward. At small batches the backward's peak is the gradients (fixed), so the peaks hardly
        # grow until the activations take over (ViT-B at 4 -> 8: 3 MiB per image by the peaks, 37.5 by
        # the saved activations); once they lead, the peaks grow a little faster than the saved
        # activations (the backward's per-image temporaries).
        per_image = max(saved_full - saved_small, added_full - added_small) / (batch - small)
        update_need = max(update_small, update_full)
        available = meter.available()
        out: dict[str, Any] = {"per_image_bytes": per_image, "available_bytes": available,
                               "added_bytes": {str(small): added_small, str(batch): added_full},
                               "saved_bytes": {str(small): saved_small, str(batch): saved_full},
                               "update_bytes": update_need, "limit": limit}
        if per_image <= 0:
            out.update(max_batch=None, method=f"not estimated: the step's memory did not grow from batch {small} "
                       f"to {batch}")
            return out
        # What the step at `batch` adds is the only room it needs; everything else is already held.
        # A micro-batch at b adds added_full + (b - batch) x per_image; it fits while that stays within
        # 90% of what is available now (the rest for the loaders and the allocator's slack).
        estimate = max(batch, batch + int((0.9 * available - added_full) / per_image))
        fits, tried, oom = batch, batch * 2, False
        while tried <= limit and tried <= estimate:
            log(f"[doctor] batch probe: {tried}")
            try:
                run(tried)
                fits = tried
            except meter.out_of_memory():
                steps[0].optimizer.zero_grad(set_to_none=True)
                oom = True
                break
            tried *= 2
        if oom:
            how = f"ran doubling batches: {fits} fit, {tried} ran out of memory"
            max_batch = fits
        else:
            max_batch = max(fits, estimate)
            how = ((f"ran batches up to {fits} (limit {limit})" if fits > batch else f"ran batch {batch}") +
                   f"; a micro-batch adds {added_full / 2**20:.0f} MiB at its peak at batch {batch} and saves "
                   f"{(saved_full - saved_small) / (batch - small) / 2**20:.2f} MiB per image for its backward (measured at "
                   f"{small} and {batch}), so {per_image / 2**20:.2f} MiB per image is counted; the "
                   f"update needs {update_need / 2**20:.0f} MiB whatever the batch; 90% of the "
                   f"{available / 2**30:.1f} GiB still available holds batch {estimate}")
        out.update(max_batch=max_batch, largest_run=fits, hit_oom=oom, estimate=estimate, method=how)
        return out
    finally:
        steps.clear()
        gc.collect()
        if meter.cuda:
            import torch

            torch.cuda.empty_cache()


def predicted_added_bytes(memory: dict[str, Any], batch: int) -> float:
    """What a whole step (micro-batch + update) at `batch` adds at its peak, by the probe's measurements."""
    largest, added = max((int(k), v) for k, v in memory["added_bytes"].items())
    return max(added + (batch - largest) * memory["per_image_bytes"], memory["update_bytes"])
