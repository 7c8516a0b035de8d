"""The devices a worker computes on: one thread per device, so model calls never block the
event loop and never race each other; on a GPU a second thread and CUDA stream prepare the
next batch (decode, resize, copy) while the current one computes."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import torch

from imgstream.analysis.models.base import Model


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside a collated batch (tensors, lists, tuples, dicts, dataclasses)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _tensors(getattr(value, f.name))


class Device:
    """One CPU or GPU: its threads, its CUDA streams, and how busy it has been."""

    def __init__(self, device: torch.device, index: int = 0) -> None:
        self.torch_device = device
        self.index = index
        self.name = str(device)
        self.is_cuda = device.type == "cuda"
        # Each thread's current CUDA device is this one, so library code that allocates on "the
        # current device" stays on this GPU.
        bind = {"initializer": torch.cuda.set_device, "initargs": (device,)} if self.is_cuda else {}
        self.compute = ThreadPoolExecutor(1, thread_name_prefix=f"imgstream-dev{index}-{self.name}", **bind)
        # On the CPU preparing and computing share the cores: one thread, one batch at a time.
        self.prep = ThreadPoolExecutor(1, thread_name_prefix=f"imgstream-dev{index}-{self.name}-prep", **bind) \
            if self.is_cuda else self.compute
        self.slots = 2 if self.is_cuda else 1  # batches in its pipeline at once
        self.running = 0
        self.batches = 0
        self.busy_s = 0.0
        self._prep_stream = torch.cuda.Stream(device) if self.is_cuda else None

    @property
    def free(self) -> bool:
        return self.running < self.slots

    async def run(self, model: Model, items: list[Any], prepare_only: bool = False) -> list[Any]:
        """`model.forward(model.collate(items))` on this device; `prepare_only` models (the JPEG
        decoder) run wholly on the preparing thread."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            if not self.is_cuda:
                return await loop.run_in_executor(self.compute, _collate_and_forward, model, items)
            if prepare_only:
                return await loop.run_in_executor(self.prep, self._prepare_only, model, items)
            batch, ready = await loop.run_in_executor(self.prep, self._collate, model, items)
            return await loop.run_in_executor(self.compute, self._forward, model, batch, ready)
        finally:
            self.batches += 1
            self.busy_s += time.perf_counter() - started

    def _collate(self, model: Model, items: list[Any]) -> tuple[Any, torch.cuda.Event]:
        with torch.cuda.stream(self._prep_stream):
            batch = model.collate(items)
            ready = torch.cuda.Event()
            ready.record(self._prep_stream)
        return batch, ready

    def _forward(self, model: Model, batch: Any, ready: torch.cuda.Event) -> list[Any]:
        stream = torch.cuda.current_stream(self.torch_device)
        stream.wait_event(ready)  # the batch's copies and resizes are done
        for tensor in _tensors(batch):
            # Made on the preparing stream, used on this one: the allocator must not reuse them early.
            tensor.record_stream(stream)
        return model.forward(batch)

    def _prepare_only(self, model: Model, items: list[Any]) -> list[Any]:
        with torch.cuda.stream(self._prep_stream):
            outputs = model.forward(model.collate(items))
        self._prep_stream.synchronize()  # outputs are read from other streams and threads
        return outputs

    def shutdown(self) -> None:
        self.compute.shutdown(wait=False, cancel_futures=True)
        if self.prep is not self.compute:
            self.prep.shutdown(wait=False, cancel_futures=True)


def _collate_and_forward(model: Model, items: list[Any]) -> list[Any]:
    return model.forward(model.collate(items))
