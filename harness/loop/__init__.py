"""The one way through a run: the cell's spec (:mod:`~harness.loop.spec`), the agreement check
(:mod:`~harness.loop.agreement`), the training loop (:mod:`~harness.loop.train`), data-parallel ranks
(:mod:`~harness.loop.distributed`)."""

__all__: list[str] = []
