"""Several devices in one process: one thread per device, chunks of members from a queue.

:func:`run_on_devices` is the dispatch behind :class:`~enkal.executors.MultiDevice` (for
forward models with ``replicate(device)``) and ``NeuralModel(devices=...)``: each device's
thread takes the next chunk of members as soon as it finished its previous one, so a faster
or less loaded device does more of them.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import torch

__all__ = ["run_on_devices"]


def run_on_devices(work, spans, devices) -> dict:
    """Run ``work(index, start, stop)`` for every span of members, dynamically over devices.

    One thread per entry of ``devices``; the spans wait in a shared queue and each thread
    takes the next one as soon as it finished its previous one, so a faster (or less loaded)
    device does more of them (the paper's section III). ``index`` is the device's position in
    ``devices`` (two entries may name the same device: each has its own thread and should
    have its own replica of the model). With one device everything runs in the calling
    thread, in order. The first exception raised by ``work`` stops the other threads from
    taking new spans and is re-raised here once they are done.

    Parameters
    ----------
    work : callable
        ``work(index, start, stop) -> result`` for members ``start:stop``.
    spans : list of (int, int)
        Member ranges, e.g. ``[(0, 16), (16, 32)]``.
    devices : sequence
        One entry per thread (``torch.device`` or str).

    Returns
    -------
    dict
        ``{(start, stop): result}`` for every span.

    >>> out = run_on_devices(lambda i, a, b: list(range(a, b)), [(0, 2), (2, 3)],
    ...                      ["cpu", "cpu"])
    >>> [out[s] for s in sorted(out)]
    [[0, 1], [2]]
    """
    spans = [(int(a), int(b)) for a, b in spans]
    devices = list(devices)
    if not devices:
        raise ValueError("devices: expected at least one device, got none")
    if len(devices) == 1 or len(spans) <= 1:
        return {span: work(0, *span) for span in spans}
    return _run_threads(work, spans, devices)


def _run_threads(work, spans: list, devices: list) -> dict:
    """:func:`run_on_devices` with several threads: a shared queue of spans."""
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for span in spans:
        todo.put(span)
    results: dict = {}
    failures: list[BaseException] = []
    stop = threading.Event()

    def loop(index: int) -> None:
        while not stop.is_set():
            try:
                span = todo.get_nowait()
            except queue.Empty:
                return
            try:
                results[span] = work(index, *span)
            except BaseException as err:  # noqa: BLE001 - re-raised in the caller
                failures.append(err)
                stop.set()
                return

    threads = [threading.Thread(target=loop, args=(i,), name=f"enkal-device-{i}", daemon=True)
               for i in range(len(devices))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise failures[0]
    return results


def _check_devices(devices: Any, name: str) -> tuple[torch.device, ...]:
    """A non-empty sequence of devices (one may be given alone): ``TypeError`` for what is not
    a sequence of ``torch.device``, str or int (a CUDA index), ``ValueError`` for a device
    torch does not know or an empty sequence."""
    if isinstance(devices, (str, torch.device)):
        devices = (devices,)
    try:
        items = tuple(devices)
    except TypeError:
        items = None
    if items is None or any(isinstance(d, bool) or not isinstance(d, (str, torch.device, int))
                            for d in items):
        raise TypeError(
            f"{name}: expected a sequence of devices such as ['cuda:0', 'cuda:1'], got "
            f"{devices!r}"[:300]
        )
    try:
        out = tuple(torch.device(d) for d in items)
    except RuntimeError as err:
        raise ValueError(
            f"{name}: expected devices such as 'cpu' or 'cuda:0', got {devices!r} ({err})"[:300]
        ) from None
    if not out:
        raise ValueError(f"{name}: expected at least one device, got none")
    return out
