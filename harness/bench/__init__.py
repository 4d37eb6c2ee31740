"""Measurement: one cell (``cells``), measured in its own process (``process`` launches it, ``child`` runs in
it: ``measure`` for memory and time, ``nvml`` for the driver's view), many cells as a resumable matrix
shared safely between processes (``matrix`` over the results directory's rows, lock and claims in ``store``)."""
__all__: list[str] = []
