"""Claims about variant discovery: by convention and entry point; broken plugins are errors."""
from __future__ import annotations

from importlib.metadata import EntryPoint
from unittest import mock

import pytest

from harness import variants as reg
from harness.variants import RegistryError, Variant, build_registry, canonical_name


def test_names_follow_the_flag_order() -> None:
    assert canonical_name(False, False, False) == "maml"
    assert canonical_name(True, True, False) == "ckpt_lr"
    assert canonical_name(True, True, True) == "ckpt_lr_fo"
    for v in reg.registry().values():
        # vectorized ones: a 'v' before the name (vmaml, vlr_fo); step-checkpointed ones are named sckpt*, bckpt*
        if v.step_ckpt == 0 and not v.snapshots and not v.lr_per_step:
            assert v.name == "v" * v.vectorize + canonical_name(v.layer_ckpt, v.learn_lr, v.first_order, v.estimator)
    assert canonical_name(True, True, False, "truncated") == "ckpt_lr_trunc" and canonical_name(
        False, False, False, "implicit") == "imaml"


def test_duplicate_names_are_an_error() -> None:
    with pytest.raises(RegistryError, match="duplicate variant name 'maml'"):
        build_registry([Variant("maml"), Variant("maml", first_order=True)])


def _entry_points(*eps: EntryPoint):
    return lambda group: list(eps) if group == reg.ENTRY_POINT_GROUP else []


def test_a_third_party_variant_is_discovered_through_the_entry_point_group() -> None:
    ep = EntryPoint("mine", "tests.test_registry:THIRD_PARTY", reg.ENTRY_POINT_GROUP)
    with mock.patch.object(reg, "entry_points", _entry_points(ep)):
        found = reg.build_registry(reg._collect())
    assert found["my_lslr"].lr_per_step


def test_a_plugin_that_fails_to_import_is_an_error_not_a_skip() -> None:
    ep = EntryPoint("broken", "no_such_module_xyz:VARIANT", reg.ENTRY_POINT_GROUP)
    with mock.patch.object(reg, "entry_points", _entry_points(ep)):
        with pytest.raises(RegistryError, match="failed to import"):
            reg._collect()


def test_a_plugin_without_a_variant_is_an_error() -> None:
    ep = EntryPoint("empty", "tests.test_registry:NOT_A_VARIANT", reg.ENTRY_POINT_GROUP)
    with mock.patch.object(reg, "entry_points", _entry_points(ep)):
        with pytest.raises(RegistryError, match="must define VARIANT"):
            reg._collect()


THIRD_PARTY = Variant("my_lslr", learn_lr=True, lr_per_step=True, description="third-party LSLR")
NOT_A_VARIANT = 42
