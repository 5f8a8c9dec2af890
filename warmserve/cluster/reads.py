"""The read side of `control.api.ClusterHandle`, answered from the books: the same for both
drivers (`sim.cluster.SimCluster`, `runtime.cluster.RuntimeCluster`), which differ only in how
they apply actions."""

from __future__ import annotations

from warmserve.cluster.books import Books
from warmserve.control.api import ClusterSnapshot, InstanceView
from warmserve.types import ModelName, ReplicaId


class BookReads:
    """Mixed into a driver that keeps its `Books` as `self.books`."""

    books: Books

    def snapshot(self) -> ClusterSnapshot:
        return self.books.snapshot()

    def versions(self) -> tuple[int, int, int]:
        return self.books.versions()

    def free_pages(self, gpus: tuple[int, ...]) -> list[int]:
        return self.books.free_pages(gpus)

    def instance_views(self) -> tuple[InstanceView, ...]:
        return self.books.instance_views()

    def demand_reads(self) -> tuple[tuple[tuple[ReplicaId, ModelName], ...], tuple[ModelName, ...]]:
        return self.books.demand_reads()

    @property
    def page_bytes(self) -> int:
        return self.books.page_bytes
