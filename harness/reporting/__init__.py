"""Result files (typed rows, schema version, atomic writes), tables, plots, regression checks and the
generated tables of the docs.  Import the modules themselves (``harness.reporting.schema`` ...)."""

__all__ = ["schema", "frame", "render", "tables", "plots", "compare", "docblocks", "provenance"]
