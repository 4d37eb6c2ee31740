"""The seed report's stateful engine, kept faithful to its bug, and the diagnosis that explains it."""
__all__: list[str] = []
