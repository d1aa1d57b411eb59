"""Peak memory of a piece of work, three ways, each giving bytes above what was live before it.

- cuda: the caching allocator's `max_memory_allocated` (what an OOM is decided on).
- cpu: the profiler's allocation events (`profile_memory=True`): every CPU allocation and free
  of torch's allocator, kernel workspaces included, summed in time order. RSS is no use here:
  glibc keeps freed pages, so it only ever grows.
- meta (or any device): a dispatch-level ledger of tensor storages, created at the op that
  returns them and dropped when Python frees them. On the meta device nothing is allocated, so
  this sizes a 2B model's activations in seconds on a laptop. It cannot see memory a kernel
  allocates internally (cuDNN / im2col workspaces): it is a lower bound there.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class StorageLedger(TorchDispatchMode):
    """Live bytes of the tensor storages created by ops while the mode is active, and their peak."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def _drop(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = None
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in self._sizes:
                continue
            if inputs is None:
                inputs = {id(a.untyped_storage()) for a in tree_flatten((args, kwargs))[0]
                          if isinstance(a, torch.Tensor)}
            if key in inputs:  # a view or an in-place result (e.g. of a weight made earlier): no new memory
                continue
            nbytes = storage.nbytes()
            self._sizes[key] = nbytes
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            # torch keeps a storage's Python object alive as long as the storage itself
            weakref.finalize(storage, self._drop, key)
        return out


def peak_bytes_ledger(fn: Callable[[], None]) -> int:
    with StorageLedger() as ledger:
        fn()
    return ledger.peak


def peak_bytes_cpu_profiler(fn: Callable[[], None]) -> int:
    """Peak of the net CPU bytes allocated while `fn` runs, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def peak_bytes_cuda(fn: Callable[[], None], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start


def measure_peak_bytes(fn: Callable[[], None], device: torch.device) -> tuple[int, str]:
    """(peak bytes above the live bytes before `fn`, the method used)."""
    device = torch.device(device)
    if device.type == "cuda":
        return peak_bytes_cuda(fn, device), "torch.cuda.max_memory_allocated"
    if device.type == "cpu":
        return peak_bytes_cpu_profiler(fn), "torch.profiler CPU allocation events"
    return peak_bytes_ledger(fn), "tensor-storage ledger (dispatch mode; no kernel workspaces)"
