"""The optimisation baseline (DLG/TAG/LAMP family) on a tiny decoder, honest FedSGD."""

from __future__ import annotations

import pytest

from fedpeft.attacks import ATTACKS, Observation, score_reconstruction
from fedpeft.errors import AttackError, ConfigError
from fedpeft.models import LoadedModel, adapter_state
from tests.attacks.test_token_set import fedsgd_observation

SENTENCE = "the quiet river runs past old mills"


def honest_observation(loaded: LoadedModel, noise_std: float = 0.0) -> tuple[Observation, list[list[int]]]:
    """An honest server (LoRA B = 0: only B's gradient is non-zero) and one SGD step."""
    observation, truth = fedsgd_observation(
        loaded, adapter_state(loaded.model), [SENTENCE], "causal-lm", noise_std
    )
    return Observation(
        "fedsgd", observation.global_state, observation.update, observation.learning_rate
    ), truth


def attack(length: int, **options: object):
    return ATTACKS.build("gradient_matching", {"length": length, "steps": 150, **options}, "attack.options")


def test_matching_the_gradient_recovers_tokens_of_the_batch(tiny_llama: LoadedModel) -> None:
    observation, truth = honest_observation(tiny_llama)
    reconstruction = attack(len(truth[0])).reconstruct(observation, tiny_llama)
    details = reconstruction.details
    assert float(details["distance_continuous"]) < 0.2 * float(details["distance_first"])
    assert len(reconstruction.sequences) == 1 and len(reconstruction.sequences[0]) == len(truth[0])
    metrics = score_reconstruction(reconstruction, truth, tiny_llama.tokenizer)
    # 7 content tokens out of a 30k vocabulary: chance recovers none.
    assert metrics.token_recall >= 2 / 7


def test_a_noised_gradient_leaks_less(tiny_llama: LoadedModel) -> None:
    clean, truth = honest_observation(tiny_llama)
    update_scale = max(float(v.abs().max()) for v in clean.update.values())
    noisy, _ = honest_observation(tiny_llama, noise_std=5 * update_scale)
    scores = [
        score_reconstruction(attack(len(truth[0])).reconstruct(obs, tiny_llama), truth, tiny_llama.tokenizer)
        for obs in (clean, noisy)
    ]
    assert scores[1].token_recall < scores[0].token_recall


def test_a_zero_update_is_refused(tiny_llama: LoadedModel) -> None:
    observation, truth = honest_observation(tiny_llama)
    zero = {k: 0 * v for k, v in observation.update.items()}
    with pytest.raises(AttackError, match="update is zero"):
        attack(len(truth[0])).reconstruct(
            Observation("fedsgd", observation.global_state, zero, 0.1), tiny_llama
        )


@pytest.mark.parametrize("options", [{"distance": "manhattan"}, {"length": 1}, {"final_temperature": 0}])
def test_bad_options_are_named(options: dict) -> None:
    with pytest.raises(ConfigError, match=r"attack\.options"):
        ATTACKS.build("gradient_matching", {"length": 8, **options}, "attack.options")
