"""Energy of a run from NVML's total-energy counters (nvidia-ml-py, feature-detected; CUDA only).

Each rank reads the GPU it computes on. NVML numbers the GPUs of the whole machine, while CUDA
numbers only those `CUDA_VISIBLE_DEVICES` lets the process see (and in its own order), so a rank's
CUDA device is matched to its NVML handle by UUID, or by PCI bus id where the UUID is not
available; never by index. The ranks' readings are summed (a collective the engine already makes
at each epoch end), so the figure covers every GPU of the job. Without NVML, on a board without an
energy counter, or on the CPU, energy is "not measured": no figure is ever estimated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def _norm_uuid(uuid: Any) -> str:
    """'GPU-58389f41-...' (NVML), '58389f41-...' (torch) -> '58389f41-...'."""
    text = str(uuid).strip().lower()
    for prefix in ("gpu-", "mig-"):
        text = text.removeprefix(prefix)
    return text


def _norm_pci(bus_id: Any) -> tuple[int, int, int, int] | None:
    """'00000000:3B:00.0' (NVML) or '0000:3b:00.0' -> (domain, bus, device, function)."""
    try:
        text = bus_id.decode() if isinstance(bus_id, bytes) else str(bus_id)
        domain, bus, rest = text.strip().split(":")
        device, function = rest.split(".")
        return int(domain, 16), int(bus, 16), int(device, 16), int(function, 16)
    except (AttributeError, ValueError):
        return None


def match_nvml_index(uuid: str | None, pci_bus_id: str | None, nvml_devices: Sequence[tuple[Any, Any]]
                     ) -> int | None:
    """Index into `nvml_devices` ((uuid, pci bus id) of each NVML handle) of the device with `uuid`,
    else with `pci_bus_id`; None when neither matches exactly one (then nothing is measured)."""
    if uuid:
        hits = [i for i, (u, _) in enumerate(nvml_devices) if u and _norm_uuid(u) == _norm_uuid(uuid)]
        if len(hits) == 1:
            return hits[0]
    pci = _norm_pci(pci_bus_id) if pci_bus_id else None
    if pci is not None:
        hits = [i for i, (_, p) in enumerate(nvml_devices) if p and _norm_pci(p) == pci]
        if len(hits) == 1:
            return hits[0]
    return None


def cuda_device_ids(index: int) -> tuple[str | None, str | None]:
    """(UUID, PCI bus id) of CUDA device `index` as torch sees it (feature-detected: older torch has
    neither in its device properties)."""
    props = torch.cuda.get_device_properties(index)
    uuid = getattr(props, "uuid", None)
    pci = None
    if all(hasattr(props, k) for k in ("pci_domain_id", "pci_bus_id", "pci_device_id")):
        pci = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
    return (str(uuid) if uuid else None), pci


class EnergyMeter:
    """This rank's GPU energy since `start` (joules), or None when it cannot be measured."""

    def __init__(self, device: torch.device):
        self._nvml: Any = None
        self._handle: Any = None
        self._start: int | None = None
        self.reason = "not measured: no CUDA device"
        if device.type != "cuda":
            return
        try:
            import pynvml
        except ImportError:
            self.reason = "not measured: nvidia-ml-py (pynvml) is not installed"
            return
        try:
            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            ids = []
            for h in handles:
                uuid = pynvml.nvmlDeviceGetUUID(h)
                pci = pynvml.nvmlDeviceGetPciInfo(h).busId
                ids.append((uuid.decode() if isinstance(uuid, bytes) else uuid, pci))
            index = device.index if device.index is not None else torch.cuda.current_device()
            found = match_nvml_index(*cuda_device_ids(index), ids)
            if found is None:
                self.reason = f"not measured: CUDA device {index} matches no NVML device by UUID or PCI bus id"
                return
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handles[found])  # boards without the counter raise here
        except Exception as exc:  # noqa: BLE001 - a driver or board without NVML energy: no figures, say why
            self.reason = f"not measured: NVML: {type(exc).__name__}: {exc}"
            return
        self._nvml, self._handle, self.reason = pynvml, handles[found], ""

    @property
    def available(self) -> bool:
        return self._handle is not None

    def _millijoules(self) -> int:
        return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))

    def start(self) -> None:
        """Mark now as zero (call it as early in the process as the device is known)."""
        if self.available:
            self._start = self._millijoules()

    def joules(self) -> float | None:
        """Joules since `start` on this rank's GPU (None: not measured)."""
        if not self.available or self._start is None:
            return None
        return (self._millijoules() - self._start) / 1000.0  # NVML counts millijoules
