"""One checkpoint save in flight: written and committed in the background, awaited in one place.

A save is two parts (pretrain/checkpoint.py): what must happen while the training state holds
still (copy it to host memory, start DCP's `async_save`), done by the caller, and the rest
(DCP's writes finish, the small files, every rank's integrity entries gathered, the record,
the pointer, keep-last pruning), run here by a thread that first waits on DCP's future.
DCP writes the files in its own thread; this thread only waits for it and then publishes the
save, which takes collectives over the checkpoint's own gloo group (never the training group,
so the loop's collectives and these never interleave).

One save at a time: host memory holds one staged copy of this rank's state. A save that
comes while the previous one is still being written first waits for it (the wait counts as
blocking time, `waited_s`, and the console says so): a `checkpoint.interval` shorter than a
save's write time slows training to the disk's pace instead of queueing copies in memory.

A failure in the background (a full disk, a dead rank) is raised in the training thread at
the next `poll` or `wait`; the pointer then still names the previous complete save.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class SaveResult:
    """One save as the loop saw it: blocked `blocking_s` (of which `waited_s` waiting for the
    previous save), complete after `total_s` (None while in flight)."""

    tag: str
    step: int
    path: Path
    blocking_s: float = 0.0
    waited_s: float = 0.0
    total_s: float | None = None
    error: BaseException | None = None


class BackgroundSave:
    """The one save in flight and the saves completed since the last `poll`."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._current: SaveResult | None = None
        self._completed: list[SaveResult] = []

    @property
    def in_flight(self) -> SaveResult | None:
        return self._current

    def start(self, result: SaveResult, work: Callable[[], None], t0: float) -> None:
        """Run `work` (finish and commit the save of `result`) in the background; the previous
        save must have been awaited (`wait`)."""
        if self._current is not None:
            raise RuntimeError("a checkpoint save is already in flight (wait for it first)")

        def run() -> None:
            try:
                work()
            except BaseException as exc:  # re-raised in the training thread
                result.error = exc
            result.total_s = time.perf_counter() - t0

        self._current = result
        self._thread = threading.Thread(target=run, name=f"checkpoint-{result.tag}", daemon=False)
        self._thread.start()

    def run_inline(self, result: SaveResult, work: Callable[[], None], t0: float) -> None:
        """A synchronous save: `work` now, in this thread; reported by the next `poll`."""
        work()
        result.total_s = result.blocking_s = time.perf_counter() - t0
        self._completed.append(result)

    def wait(self) -> SaveResult | None:
        """Block until the save in flight is complete (None when there is none)."""
        if self._current is None:
            return None
        assert self._thread is not None
        self._thread.join()
        done, self._current, self._thread = self._current, None, None
        self._completed.append(done)
        return done

    def poll(self) -> list[SaveResult]:
        """The saves completed since the last call, without blocking; raises the error of a
        save that failed."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()
        done, self._completed = self._completed, []
        for r in done:
            if r.error is not None:
                raise r.error
        return done
