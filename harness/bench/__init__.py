"""Measurement: memory (CPU dispatch figure, CUDA allocator, NVML), time, and isolated cells."""
__all__: list[str] = []
