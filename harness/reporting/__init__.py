"""Result files (typed rows, schema version, atomic writes), tables, plots and regression checks."""
__all__: list[str] = []
