"""What a valid option is: one set of rules for ``run``, ``bench``, ``sweep`` and ``ablate``.

Issue 13: the same value is valid or invalid for every command, and it is checked before anything
runs or is written.  Sizes are bounded so that a typo (``--inner-steps 1000000000``) is refused
instead of eating the machine; ``--allow-huge`` raises the bounds to larger, still finite ones.

Issue 11: the one ``--set KEY=VALUE`` parser with its one list of accepted keys
(:data:`SETTING_KEYS`, plus ``model.<kw>`` and ``task.<kw>`` of the preset's model and task),
used by the commands and by :meth:`harness.bench.cells.Cell.overrides`.
Try: ``python -m harness bench --set width=abc`` (exit 2, nothing written).

The rules live in three modules: :mod:`~harness.settings.bounds` (numbers, seconds, run-ids, the
environment), :mod:`~harness.settings.keys` (``--set``, ``--param``, where a setting goes) and
:mod:`~harness.settings.devices` (device and precision).
"""
from __future__ import annotations

from harness.settings.bounds import (BOUNDS, Bound, CELL_START_ENV, CELL_STARTS, CPU_MEM_CAP_ENV, DEVICES, DIST_TIMEOUT_ENV, DTYPES,
                                     NAME_MAX_BYTES, NUMBER_ENV, SEED_MAX, MEMORY_UNITS, check_environment, check_folder_name,
                                     cell_start, check_int, check_seconds, env_number, parse_memory)
from harness.settings.devices import check_amp, check_device, check_precision, parse_amps, valid_amps
from harness.settings.devices import check_memory_snapshot
from harness.settings.keys import (ACCEPTED, CellSettings, DATA_SETTINGS, LAUNCH_SETTINGS, MODEL_SETTINGS,
                                   SETTING_KEYS, SPEC_SETTINGS, SWEEP_PARAMS, VARIANT_SETTINGS, check_data_root,
                                   check_ranks, dedupe, parse_mem_caps, parse_param, parse_settings, parse_value,
                                   split_settings, validate_setting, variant_with)

__all__ = ["ACCEPTED", "BOUNDS", "MEMORY_UNITS", "parse_memory", "Bound", "CELL_START_ENV", "CELL_STARTS", "CPU_MEM_CAP_ENV", "cell_start", "CellSettings", "DATA_SETTINGS", "DEVICES",
           "DIST_TIMEOUT_ENV", "DTYPES", "LAUNCH_SETTINGS", "MODEL_SETTINGS", "NAME_MAX_BYTES", "NUMBER_ENV",
           "SEED_MAX", "SETTING_KEYS", "SPEC_SETTINGS", "SWEEP_PARAMS", "VARIANT_SETTINGS", "check_amp",
           "check_data_root", "check_device", "check_environment", "check_memory_snapshot", "check_folder_name", "check_int",
           "check_precision", "check_ranks", "check_seconds", "dedupe", "env_number", "parse_amps", "parse_mem_caps",
           "parse_param", "parse_settings", "parse_value", "split_settings", "valid_amps", "validate_setting",
           "variant_with"]
