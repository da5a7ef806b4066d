"""An upstream worker lets go of each job (a whole partial or model blob) once it is done."""

from __future__ import annotations

import gc
import weakref

import trio
import trio.testing

from fedtier.tiers._upstream import UpstreamWorker


class Job:
    """Stands for a job holding a model's bytes; weak-referenceable."""

    def __init__(self, name: str) -> None:
        self.name = name


class Recorder(UpstreamWorker[Job]):
    def __init__(self) -> None:
        super().__init__(capacity=4, on_room=lambda: None)
        self.done: list[weakref.ref[Job]] = []
        self.ran = trio.Event()

    async def run(self, job: Job) -> None:
        self.done.append(weakref.ref(job))
        self.ran.set()


async def test_neither_a_recovered_nor_a_queued_job_outlives_its_run() -> None:
    worker = Recorder()
    async with trio.open_nursery() as nursery:
        # Recovered jobs: the caller hands its list over and keeps nothing.
        await nursery.start(worker.serve, [Job("recovered-1"), Job("recovered-2")])
        await worker.put(Job("queued"))
        await worker.drain()
        await trio.testing.wait_all_tasks_blocked()
        gc.collect()
        # The worker now waits for the next job and holds none of the done ones.
        assert [ref() for ref in worker.done] == [None, None, None]
        assert worker.outstanding == 0
        nursery.cancel_scope.cancel()
