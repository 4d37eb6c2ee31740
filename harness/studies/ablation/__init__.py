"""The learning effect of each variant: training runs over seeds, statistics, tables and curves."""
__all__: list[str] = []
