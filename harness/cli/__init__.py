"""The command line: ``python -m harness <command>``; one thin module per command, dispatched by ``harness.cli.main``.

Each command module parses its arguments, calls one library function and prints.
"""
__all__: list[str] = []
