"""Device runs in processes beside the engine; imports the sim's devices, never a tier or trio.

The engine spends about two thirds of a large async run training simulated
devices and sealing their updates (``LocalTraining.run``), and the rest
admitting and folding them in the tier core. A device run depends only on the
device's own state (its trainer's shuffling RNG, its run count, its error
feedback) and the model version it starts from, and the engine needs its
result only when the run's compute time is over (virtual seconds later,
thousands of events later). So the runs can go to other processes while the
engine goes on, and the results are the same bytes as in process:

* each device always trains in the same worker (``device % workers``), and a
  worker runs its jobs in the order they were submitted, so every device's
  state advances exactly as it would in process;
* the engine reserves the event's sequence number when the run starts and
  turns the result into its event (``_UPDATE`` or ``_SKIPPED``) before it pops
  anything that sorts after the run's end, so the event order is unchanged.

Workers are forked after the engine has built the data and the trainers'
shared parts, so they read the same arrays without copying or rebuilding
them. Only the built-in numpy models use workers (a forked torch is not safe,
and a model with tensors kept on the devices is scored from the trainers).
"""

from __future__ import annotations

import multiprocessing
import queue
import traceback
from collections import deque
from collections.abc import Sequence
from multiprocessing.context import ForkProcess
from typing import Final, cast

import numpy as np
import numpy.typing as npt

from fedtier.protocol.errors import FedtierError
from fedtier.protocol.identity import VerifyKey
from fedtier.simulations.sim.devices import DeviceRun, LocalTraining

__all__ = ["DeviceWorkers"]

# Jobs are sent in batches: one message per job would cost more than a small run.
_BATCH: Final = 64
# How long the engine waits for a result before checking that its worker lives.
_POLL_S: Final = 5.0

_Job = tuple[int, int, float]  # device, base version, virtual time at the start
# A run's outcome: the run (None when skipped) and the raw public keys of the
# identities it made (the engine's key registry must learn them).
_Result = tuple[DeviceRun | None, list[bytes]]


class DeviceWorkers:
    """Worker processes that run ``LocalTraining.run`` for the engine, in submission order.

    Args:
        training: the engine's trainers, already built (forked into each worker;
            the engine must not run devices itself while workers exist).
        workers: how many processes.
        params: model version 0.
    """

    def __init__(
        self, training: LocalTraining, workers: int, params: npt.NDArray[np.float32]
    ) -> None:
        context = multiprocessing.get_context("fork")
        self._training = training
        self._jobs = [context.Queue() for _ in range(workers)]
        self._results = [context.Queue() for _ in range(workers)]
        self._outbox: list[list[tuple[str, object]]] = [[] for _ in range(workers)]
        # Tickets of the jobs each worker has yet to answer, in submission order, and
        # the answers already read but not yet asked for.
        self._tickets: list[deque[int]] = [deque() for _ in range(workers)]
        self._answers: dict[int, _Result] = {}
        self._queued: list[int] = [0] * workers  # jobs in the outbox (not yet sent)
        self._procs: list[ForkProcess] = []
        for index in range(workers):
            proc = context.Process(
                target=_serve,
                args=(training, self._jobs[index], self._results[index], params),
                name=f"fedtier-sim-devices-{index}",
                daemon=True,
            )
            proc.start()
            self._procs.append(proc)

    def __len__(self) -> int:
        return len(self._procs)

    def worker_of(self, device: int) -> int:
        """The worker that runs ``device`` (always the same one)."""
        return device % len(self._procs)

    def version(self, version: int, params: npt.NDArray[np.float32]) -> None:
        """Tell every worker about a new model version (before any job trains from it)."""
        for index in range(len(self._procs)):
            self._outbox[index].append(("version", (version, params)))

    def forget_before(self, version: int) -> None:
        """Let the workers drop the parameters of versions older than ``version``."""
        for index in range(len(self._procs)):
            self._outbox[index].append(("forget", version))

    def submit(self, ticket: int, device: int, base_version: int, now_s: float) -> None:
        """Queue one run of ``device`` from ``base_version``, started at ``now_s``.

        ``ticket`` names the job (unique); :meth:`result` asks for it by that name.
        """
        index = self.worker_of(device)
        job: _Job = (device, base_version, now_s)
        self._outbox[index].append(("run", job))
        self._tickets[index].append(ticket)
        self._queued[index] += 1
        if self._queued[index] >= _BATCH:
            self._flush(index)

    def result(self, ticket: int, device: int) -> DeviceRun | None:
        """The run of job ``ticket`` (of ``device``), waiting for its worker when needed."""
        index = self.worker_of(device)
        if ticket not in self._answers:
            self._flush(index)
            while ticket not in self._answers:
                try:
                    message = self._results[index].get(timeout=_POLL_S)
                except queue.Empty:
                    if not self._procs[index].is_alive():
                        raise FedtierError(
                            f"simulated device worker {index} died (exit status "
                            f"{self._procs[index].exitcode})"
                        ) from None
                    continue
                if isinstance(message, str):
                    raise FedtierError(f"simulated device worker {index} failed:\n{message}")
                # A worker answers its jobs in the order they were submitted.
                tickets = self._tickets[index]
                for answer in message:
                    self._answers[tickets.popleft()] = answer
        run, raw_keys = self._answers.pop(ticket)
        for raw in raw_keys:
            self._training.keys.enrol(VerifyKey(raw))
        return run

    def close(self) -> None:
        """Stop the workers (jobs not yet run are dropped)."""
        for index, proc in enumerate(self._procs):
            if proc.is_alive():
                self._jobs[index].put([("stop", None)])
        for proc in self._procs:
            proc.join(timeout=_POLL_S)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for q in (*self._jobs, *self._results):
            q.close()
            q.join_thread()

    def _flush(self, index: int) -> None:
        if self._outbox[index]:
            self._jobs[index].put(self._outbox[index])
            self._outbox[index] = []
            self._queued[index] = 0


def _serve(
    training: LocalTraining,
    jobs: multiprocessing.Queue[Sequence[tuple[str, object]]],
    results: multiprocessing.Queue[list[_Result] | str],
    params: npt.NDArray[np.float32],
) -> None:
    """A worker's loop: run the jobs of each batch in order and send their results back."""
    versions: dict[int, npt.NDArray[np.float32]] = {0: params}
    training.take_new_keys()  # made before the fork: the engine has them
    try:
        while True:
            out: list[_Result] = []
            for kind, body in jobs.get():
                if kind == "run":
                    device, base_version, now_s = cast("_Job", body)
                    run = training.run(device, versions[base_version], base_version, now_s=now_s)
                    out.append((run, training.take_new_keys()))
                elif kind == "version":
                    version, new_params = cast("tuple[int, npt.NDArray[np.float32]]", body)
                    versions[version] = new_params
                elif kind == "forget":
                    oldest = cast("int", body)
                    for old in [v for v in versions if v < oldest]:
                        del versions[old]
                else:
                    return
            if out:
                results.put(out)
    except Exception:  # the engine re-raises it with the worker's traceback
        results.put(traceback.format_exc())
