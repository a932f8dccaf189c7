"""Shadow training: what a shadow starts from and what it is trained on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedpeft.audit.shadows import federate_shadow
from fedpeft.config import parse_config
from fedpeft.errors import ConfigError
from fedpeft.experiment import Experiment
from fedpeft.models import adapter_state, load_adapter_state
from tests.conftest import tiny_config


def _audited(tiny_bert_dir: Path, sentiment_files: dict[str, Path], **audit: object) -> Experiment:
    data = tiny_config(tiny_bert_dir, sentiment_files)
    data["federation"]["rounds"] = 1
    data["train"]["steps"] = 3
    data["audit"] = {"membership_examples": 40, "clients": [0, 1], "shadow_models": 2} | audit
    return Experiment(parse_config(data))


def test_initial_state_is_the_built_adapter_even_after_another_was_loaded(
    tiny_bert_dir: Path, sentiment_files: dict[str, Path]
) -> None:
    # The audit loads the final global adapter, then trains shadows "from the initial
    # adapter": that must not be the final one.
    experiment = Experiment(parse_config(tiny_config(tiny_bert_dir, sentiment_files)))
    built = adapter_state(experiment.model.model)
    load_adapter_state(experiment.model.model, {n: t + 1.0 for n, t in built.items()})
    initial = experiment.initial_state
    assert initial.keys() == built.keys()
    for name, tensor in built.items():
        torch.testing.assert_close(initial[name], tensor, rtol=0, atol=0)


def test_a_shadow_plan_plants_its_half_and_keeps_the_canaries(
    tiny_bert_dir: Path, sentiment_files: dict[str, Path]
) -> None:
    experiment = _audited(tiny_bert_dir, sentiment_files, canaries=4, canary_repetitions=2, references=20)
    plan = experiment.audit_plan
    assert plan is not None
    mask = [i % 3 == 0 for i in range(len(plan.examples))]
    shadow = experiment.with_audit_plan(plan.with_membership(mask))
    texts = [t for part in shadow.partitions for t in part["text"]]
    for example, inside in zip(plan.examples, mask, strict=True):
        assert texts.count(example.text) == int(inside)
    for canary in plan.canaries:
        assert texts.count(canary.text) == (2 if canary.included else 0)
    assert shadow.model is experiment.model  # loaded once, shared
    assert experiment.partitions.sizes() != shadow.partitions.sizes()
    with pytest.raises(ValueError, match="3 inclusion flags for 40"):
        plan.with_membership([True, False, True])


def test_a_federated_shadow_depends_on_its_half_and_on_nothing_else(
    tiny_bert_dir: Path, sentiment_files: dict[str, Path]
) -> None:
    experiment = _audited(tiny_bert_dir, sentiment_files)
    plan = experiment.audit_plan
    assert plan is not None
    half = [i % 2 == 0 for i in range(len(plan.examples))]

    def shadow_state(mask: list[bool]) -> dict[str, torch.Tensor]:
        federate_shadow(experiment.with_audit_plan(plan.with_membership(mask)), shadow=0)
        return adapter_state(experiment.model.model)

    first, again, other = shadow_state(half), shadow_state(half), shadow_state([not x for x in half])
    initial = experiment.initial_state
    name = next(n for n in initial if "lora_B" in n)
    assert not torch.equal(first[name], initial[name])  # it trained
    assert all(torch.equal(first[n], again[n]) for n in first)  # from the initial adapter, seeded
    assert not torch.equal(first[name], other[name])  # on its own half


def test_shadow_steps_belong_to_local_shadows(tiny_bert_dir: Path, sentiment_files: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="shadow_training = 'local'"):
        _audited(tiny_bert_dir, sentiment_files, shadow_steps=10)
    local = _audited(tiny_bert_dir, sentiment_files, shadow_steps=10, shadow_training="local")
    assert local.config.audit.shadow_steps == 10
