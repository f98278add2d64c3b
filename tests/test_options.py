"""Settings are frozen dataclasses whose fields declare their checks (``gradalign._options``).

For every settings class, every declared field refuses a value of the wrong kind with a
``GradAlignError`` naming the class, the field and the rule; a built object cannot be changed.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any, get_args

import numpy as np
import pytest

import gradalign as ga
from gradalign.distributed import Distributed
from gradalign.errors import GradAlignError
from gradalign.objective import LOSS_AGGREGATIONS, REWARD_SCALINGS, LossAgg, ScaleRewards
from gradalign.projection import KINDS, ProjectionKind, Projector

SETTINGS: dict[str, Any] = {
    "FullGradient": lambda **kw: ga.FullGradient(**kw),
    "RandomProjectedGradient": lambda **kw: ga.RandomProjectedGradient(**kw),
    "FactorizedGradient": lambda **kw: ga.FactorizedGradient(**kw),
    "LoRAGradient": lambda **kw: ga.LoRAGradient(**kw),
    "GRPOObjective": lambda **kw: ga.GRPOObjective(**kw),
    "Projector": lambda **kw: Projector(**{"dim": 4, **kw}),
    "Distributed": lambda **kw: Distributed(**kw),
    "TopK": lambda **kw: ga.policies.TopK(**{"k": 2, **kw}),
    "TopFraction": lambda **kw: ga.policies.TopFraction(**{"fraction": 0.5, **kw}),
    "Threshold": lambda **kw: ga.policies.Threshold(**{"min_score": 0.0, **kw}),
    "AccuracyBand": lambda **kw: ga.policies.AccuracyBand(**kw),
    "Random": lambda **kw: ga.policies.Random(**{"k": 2, **kw}),
    "Softmax": lambda **kw: ga.policies.Softmax(**{"k": 2, **kw}),
    "DiverseTopK": lambda **kw: ga.policies.DiverseTopK(**{"k": 2, **kw}),
    "TaskQuota": lambda **kw: ga.policies.TaskQuota(**{"quotas": [1, 2], **kw}),
    "EpsilonMix": lambda **kw: ga.policies.EpsilonMix(
        **{"policy": ga.policies.TopK(1), "epsilon": 0.1, **kw}
    ),
}


def _declared(obj: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(obj) if "rule" in f.metadata]


@pytest.mark.parametrize("name", list(SETTINGS))
def test_settings_are_frozen_and_every_declared_field_is_checked(name: str) -> None:
    obj = SETTINGS[name]()
    fields = _declared(obj)
    assert fields, f"{name} declares no checked field"
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, fields[0], getattr(obj, fields[0]))
    for field in fields:
        if name == "RandomProjectedGradient" and field == "projection":
            continue  # built from dim/kind/seed when None; a wrong type is checked the same way
        with pytest.raises(GradAlignError, match=rf"^{name}: {field} must be "):
            SETTINGS[name](**{field: object()})


def test_every_built_in_policy_is_a_frozen_dataclass_with_its_old_repr() -> None:
    from gradalign import policies

    for name in policies.__all__:
        cls = getattr(policies, name)
        if (
            isinstance(cls, type)
            and issubclass(cls, policies.Policy)
            and cls is not policies.Policy
        ):
            assert dataclasses.is_dataclass(cls), name
            assert cls.__dataclass_params__.frozen, name  # type: ignore[attr-defined]
    assert repr(policies.Softmax(3, seed=2)) == "Softmax(k=3, temperature=1.0, seed=2)"
    chain = policies.Chain(policies.DropZeroVariance(), policies.TopK(2))
    assert repr(chain) == "Chain(DropZeroVariance(), TopK(k=2))"
    assert policies.TaskQuota([1, 2]).quotas == (1, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        chain.policies = ()  # type: ignore[misc]


def test_numpy_integers_are_stored_as_ints() -> None:
    ext = ga.FactorizedGradient(np.int64(8), np.int32(4), seed=np.uint8(3), batch_size=np.int64(2))
    assert (ext.dim_in, ext.dim_out, ext.seed, ext.batch_size) == (8, 4, 3, 2)
    assert all(type(v) is int for v in (ext.dim_in, ext.dim_out, ext.seed, ext.batch_size))
    with pytest.raises(
        GradAlignError, match="FactorizedGradient: dim_in must be an int >= 1 or None, got True"
    ):
        ga.FactorizedGradient(dim_in=True)


def test_choices_are_literal_types() -> None:
    assert KINDS == get_args(ProjectionKind) == ("rademacher", "gaussian", "sjlt")
    assert get_args(ScaleRewards) == REWARD_SCALINGS and get_args(LossAgg) == LOSS_AGGREGATIONS
    with pytest.raises(GradAlignError, match=r"GRPOObjective: loss_agg must be one of \("):
        ga.GRPOObjective(loss_agg="sum")  # type: ignore[arg-type]
    with pytest.raises(GradAlignError, match=r"LoRAGradient: kind must be one of \('rademacher'"):
        ga.LoRAGradient(dim=8, kind="dense")  # type: ignore[arg-type]


def test_changed_settings_come_from_replace_and_are_checked_again() -> None:
    ext = ga.FactorizedGradient(8, 8)
    assert dataclasses.replace(ext, batch_size=3).batch_size == 3 and ext.batch_size != 3
    with pytest.raises(GradAlignError, match="FactorizedGradient: batch_size must be an int >= 1"):
        dataclasses.replace(ext, batch_size=0)
    assert Distributed(timeout=timedelta(seconds=5)).timedelta == timedelta(seconds=5)
    with pytest.raises(GradAlignError, match="Distributed: timeout must be > 0 seconds or None"):
        Distributed(timeout=timedelta(0))


def test_integration_settings_use_the_same_rules() -> None:
    verl = pytest.importorskip("gradalign.integrations.verl")
    verl_v1 = pytest.importorskip("gradalign.integrations.verl_v1")
    settings = {
        "GradAlignSampler": lambda **kw: verl.SamplerSettings(**kw),
        "GradAlignReplayBuffer": lambda **kw: verl_v1.BufferSettings(**{"scorer": "m:f", **kw}),
    }
    for call, make in settings.items():
        fields = [f for f in _declared(make()) if f != "scorer" or call == "GradAlignSampler"]
        assert fields
        for field in fields:
            with pytest.raises(GradAlignError, match=rf"^{call}: {field} must be "):
                make(**{field: object()})
    with pytest.raises(GradAlignError, match=r"GradAlignSampler: scorer must be one of \('cosine'"):
        verl.SamplerSettings(scorer="dot")


def test_selector_settings_are_checked_by_the_same_rules() -> None:
    for name, bad in {"extractor": 3, "objective": "grpo", "scorer": "dot", "target": "sum",
                      "aggregate": "median", "policy": 5, "keep_grads": 1}.items():  # fmt: skip
        with pytest.raises(GradAlignError, match=rf"^GradAlign: {name} must be "):
            ga.GradAlign(**{name: bad})


def test_projector_checks_sjlt_nnz_against_dim_after_its_fields() -> None:
    with pytest.raises(GradAlignError, match=r"^Projector: sjlt_nnz must be <= dim=4, got 5"):
        Projector(dim=4, sjlt_nnz=5)
    assert Projector(dim=4, kind="gaussian", sjlt_nnz=5).sjlt_nnz == 5  # only sjlt uses it
