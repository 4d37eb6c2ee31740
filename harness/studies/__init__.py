"""Studies built on the engine: the seed report's diagnosis, the ablation, the peer libraries."""
__all__: list[str] = []
