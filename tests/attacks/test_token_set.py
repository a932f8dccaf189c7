"""Token-set recovery on tiny models loaded through from_pretrained, with updates made
by fedpeft's own local training (one plain-SGD step: the FedSGD threat model)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import datasets
import pytest
import torch

from fedpeft.attacks import ATTACKS, Observation, score_reconstruction
from fedpeft.attacks.capture import malicious_adapter
from fedpeft.config import AdapterConfig, ModelConfig, TrainConfig
from fedpeft.errors import AttackError, DataError
from fedpeft.models import LoadedModel, adapter_state, build_model, load_adapter_state, state_delta
from fedpeft.training import make_loader, tokenize, train_local

SENTENCES = ["the quiet river runs past old mills", "a bright comet crossed the northern sky tonight"]


def malicious_global_state(loaded: LoadedModel, seed: int = 0) -> dict[str, torch.Tensor]:
    """The adapter a malicious server sends (A = 0, B drawn): see ``malicious_adapter``."""
    return malicious_adapter(adapter_state(loaded.model), seed)


def fedsgd_observation(
    loaded: LoadedModel, global_state: dict, texts: list[str], task: str, noise_std: float = 0.0
) -> tuple[Observation, list[list[int]]]:
    """One client round under FedSGD: one SGD step on one batch of ``texts``."""
    load_adapter_state(loaded.model, global_state)
    rows = {"text": texts} | ({"label": [0] * len(texts)} if task == "sequence-classification" else {})
    encoded = tokenize(datasets.Dataset.from_dict(rows), loaded.tokenizer, 64, task)  # type: ignore[arg-type]
    loader = make_loader(encoded, loaded.tokenizer, task, batch_size=len(texts), shuffle=False)  # type: ignore[arg-type]
    lr = 0.1
    torch.manual_seed(0)
    train_local(
        loaded.model,
        loader,
        TrainConfig(steps=1, batch_size=len(texts), lr=lr, optimizer="sgd"),
        torch.device("cpu"),
    )
    update = state_delta(adapter_state(loaded.model), global_state)
    if noise_std:
        generator = torch.Generator().manual_seed(1)
        update = {k: v + noise_std * torch.randn(v.shape, generator=generator) for k, v in update.items()}
    observation = Observation("malicious", global_state, update, learning_rate=lr)
    return observation, [list(ids) for ids in encoded["input_ids"]]


def no_dropout(loaded: LoadedModel) -> LoadedModel:
    """The malicious server ships the model config: no dropout on the way to layer 0."""
    for module in loaded.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return loaded


def test_decoder_batch_of_one_is_recovered_exactly(tiny_llama: LoadedModel) -> None:
    observation, truth = fedsgd_observation(
        tiny_llama, malicious_global_state(tiny_llama), SENTENCES[:1], "causal-lm"
    )
    result = ATTACKS.build("token_set", {}, "attack.options").reconstruct(observation, tiny_llama)
    # The last token of a causal-LM example feeds only the unused last logit, so it
    # never reaches the gradient; here it is [SEP], a special token.
    visible = set(truth[0][:-1])
    assert set(result.token_ids) == visible
    assert max(result.token_scores) < 1e-3
    metrics = score_reconstruction(result, truth, tiny_llama.tokenizer)
    assert metrics.token_recall == 1.0 and metrics.token_precision == 1.0
    assert metrics.rouge1 == pytest.approx(1.0)


def test_encoder_batch_of_one_is_recovered_token_by_position(tiny_bert: LoadedModel) -> None:
    observation, truth = fedsgd_observation(
        tiny_bert, malicious_global_state(tiny_bert), SENTENCES[1:], "sequence-classification"
    )
    result = ATTACKS.build("token_set", {}, "attack.options").reconstruct(observation, tiny_bert)
    assert set(result.token_ids) == set(truth[0])
    assert result.sequences == (tuple(truth[0]),)
    metrics = score_reconstruction(result, truth, tiny_bert.tokenizer)
    assert metrics.exact_sequence_rate == 1.0 and metrics.rougeL == pytest.approx(1.0)


def test_span_check_rejects_tokens_absent_from_the_batch(tiny_llama: LoadedModel) -> None:
    observation, truth = fedsgd_observation(
        tiny_llama, malicious_global_state(tiny_llama), SENTENCES[:1], "causal-lm"
    )
    attack = ATTACKS.build("token_set", {}, "attack.options")
    recovered = set(attack.reconstruct(observation, tiny_llama).token_ids)
    absent = set(tiny_llama.tokenizer(SENTENCES[1])["input_ids"]) - set(truth[0])
    assert absent and not (absent & recovered)


def test_peft_init_with_b_zero_reveals_nothing(tiny_llama: LoadedModel) -> None:
    observation, _ = fedsgd_observation(
        tiny_llama, adapter_state(tiny_llama.model), SENTENCES[:1], "causal-lm"
    )
    result = ATTACKS.build("token_set", {}, "attack.options").reconstruct(observation, tiny_llama)
    assert result.token_ids == () and result.details["gradient_rank"] == 0


def dp_sgd_observation(
    loaded: LoadedModel, global_state: dict, noise_multiplier: float, max_grad_norm: float
) -> tuple[Observation, list[list[int]]]:
    """One client round of real DP-SGD (Opacus, fedpeft's client path) on one sentence."""
    from fedpeft.config import ExamplePrivacyConfig
    from fedpeft.privacy.dp_sgd import train_local_private
    from fedpeft.training import make_collator

    load_adapter_state(loaded.model, global_state)
    encoded = tokenize(datasets.Dataset.from_dict({"text": SENTENCES[:1]}), loaded.tokenizer, 64, "causal-lm")
    privacy = ExamplePrivacyConfig(
        enabled=True, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm
    )
    lr = 0.1
    train_local_private(
        loaded.model,
        encoded,
        make_collator(loaded.tokenizer, "causal-lm"),
        "causal-lm",
        TrainConfig(steps=1, batch_size=1, lr=lr, optimizer="sgd"),
        privacy,
        noise_multiplier,
        torch.device("cpu"),
        batches=[[0]],
    )
    update = state_delta(adapter_state(loaded.model), global_state)
    return Observation("malicious", global_state, update, learning_rate=lr), [list(encoded[0]["input_ids"])]


def test_dp_sgd_noise_hides_the_batch_from_the_span_check(tiny_llama: LoadedModel) -> None:
    state = malicious_global_state(tiny_llama)
    attack = ATTACKS.build("token_set", {}, "attack.options")
    recall = {}
    # sigma = 0 with a clip no gradient reaches is non-private training through the
    # same Opacus path; sigma = 1 is the noise of a typical epsilon-8 run. The noise
    # comes from the OS (never seeded), so this is a statistical claim: over 3 draws.
    for sigma, clip in ((0.0, 1e6), (1.0, 1.0)):
        recalls = []
        for _ in range(3 if sigma else 1):
            observation, truth = dp_sgd_observation(tiny_llama, state, sigma, clip)
            metrics = score_reconstruction(
                attack.reconstruct(observation, tiny_llama), truth, tiny_llama.tokenizer
            )
            recalls.append(metrics.token_recall)
        recall[sigma] = sum(recalls) / len(recalls)
    assert recall[0.0] == 1.0
    assert recall[1.0] < 0.2


def test_without_lora_on_the_first_layer_the_attack_says_why(tiny_llama_dir: Path) -> None:
    adapter = AdapterConfig(method="lora", r=4, target_modules=["o_proj"])  # type: ignore[call-arg]
    loaded = build_model(ModelConfig(name_or_path=str(tiny_llama_dir), task="causal-lm"), adapter)
    observation, _ = fedsgd_observation(loaded, adapter_state(loaded.model), SENTENCES[:1], "causal-lm")
    with pytest.raises(AttackError, match="no LoRA on the first layer"):
        ATTACKS.build("token_set", {}, "attack.options").reconstruct(observation, loaded)


def test_sequence_assembly_orders_a_decoder_batch_of_one(tiny_llama: LoadedModel) -> None:
    observation, truth = fedsgd_observation(
        tiny_llama, malicious_global_state(tiny_llama), SENTENCES[:1], "causal-lm"
    )
    result = ATTACKS.build("sequence_assembly", {}, "attack.options").reconstruct(observation, tiny_llama)
    # Everything but the last token ([SEP] here), in order.
    assert result.sequences[0] == tuple(truth[0][:-1])
    metrics = score_reconstruction(result, truth, tiny_llama.tokenizer)
    assert metrics.rouge2 == pytest.approx(1.0) and metrics.rougeL == pytest.approx(1.0)


def test_sequence_assembly_refuses_encoders_and_says_what_to_use(tiny_bert: LoadedModel) -> None:
    observation, _ = fedsgd_observation(
        tiny_bert, malicious_global_state(tiny_bert), SENTENCES[1:], "sequence-classification"
    )
    with pytest.raises(AttackError, match="token_set attack orders tokens by position"):
        ATTACKS.build("sequence_assembly", {}, "attack.options").reconstruct(observation, tiny_bert)


def test_sequence_assembly_separates_a_batch_of_two(tiny_llama_dir: Path) -> None:
    # q, k and v with r = 8 stack to rank 24: room for the 2 x 9 positions of the batch.
    adapter = AdapterConfig(
        method="lora", r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj"]
    )  # type: ignore[call-arg]
    loaded = no_dropout(build_model(ModelConfig(name_or_path=str(tiny_llama_dir), task="causal-lm"), adapter))
    texts = ["the quiet river runs past old mills", "a bright comet crossed the sky"]
    observation, truth = fedsgd_observation(loaded, malicious_global_state(loaded), texts, "causal-lm")
    result = ATTACKS.build("sequence_assembly", {}, "attack.options").reconstruct(observation, loaded)
    pad = loaded.tokenizer.pad_token_id
    expected = {tuple(t for t in ids if t != pad)[:-1] for ids in truth}
    assert expected <= set(result.sequences)
    metrics = score_reconstruction(result, truth, loaded.tokenizer)
    assert metrics.token_recall == 1.0 and metrics.rouge1 > 0.9


def test_lm_prior_baseline_reads_no_update_and_recovers_far_less(tiny_llama: LoadedModel) -> None:
    state = malicious_global_state(tiny_llama)
    observation, truth = fedsgd_observation(tiny_llama, state, SENTENCES[:1], "causal-lm")
    prior = ATTACKS.build("lm_prior", {"num_sequences": 1, "length": len(truth[0])}, "attack.options")
    guess = prior.reconstruct(observation, tiny_llama)
    zeroed = Observation(
        "malicious", state, {k: v * 0 for k, v in observation.update.items()}, learning_rate=0.1
    )
    assert prior.reconstruct(zeroed, tiny_llama) == guess  # the update is never read
    baseline = score_reconstruction(guess, truth, tiny_llama.tokenizer)
    attack = score_reconstruction(
        ATTACKS.build("sequence_assembly", {}, "attack.options").reconstruct(observation, tiny_llama),
        truth,
        tiny_llama.tokenizer,
    )
    assert baseline.rouge1 < 0.5 < attack.rouge1


def test_lm_prior_refuses_a_classifier(tiny_bert: LoadedModel) -> None:
    observation, _ = fedsgd_observation(
        tiny_bert, malicious_global_state(tiny_bert), SENTENCES[1:], "sequence-classification"
    )
    with pytest.raises(AttackError, match="causal language model"):
        ATTACKS.build("lm_prior", {}, "attack.options").reconstruct(observation, tiny_bert)


def test_unigram_prior_guesses_the_commonest_reference_tokens(tiny_bert: LoadedModel, tmp_path: Path) -> None:
    reference = tmp_path / "public.tsv"
    reference.write_text("sentence\nthe river the sky\nthe comet and the river\n", encoding="utf-8")
    observation, truth = fedsgd_observation(
        tiny_bert, malicious_global_state(tiny_bert), SENTENCES[1:], "sequence-classification"
    )
    prior = ATTACKS.build("unigram_prior", {"num_tokens": 2, "reference": str(reference)}, "attack.options")
    guess = prior.reconstruct(observation, tiny_bert)
    ids = tiny_bert.tokenizer.convert_tokens_to_ids(["the", "river"])
    assert guess.token_ids == tuple(ids)  # 4 x "the", 2 x "river"
    zeroed = dataclasses.replace(observation, update={k: v * 0 for k, v in observation.update.items()})
    assert prior.reconstruct(zeroed, tiny_bert) == guess  # the update is never read
    # "the" is in "a bright comet crossed the northern sky tonight"; "river" is not.
    assert score_reconstruction(guess, truth, tiny_bert.tokenizer).token_precision == 0.5


def test_unigram_prior_names_a_missing_reference(tiny_bert: LoadedModel, tmp_path: Path) -> None:
    observation, _ = fedsgd_observation(
        tiny_bert, malicious_global_state(tiny_bert), SENTENCES[1:], "sequence-classification"
    )
    prior = ATTACKS.build("unigram_prior", {"reference": str(tmp_path / "nowhere.tsv")}, "attack.options")
    with pytest.raises(DataError, match=r"nowhere\.tsv"):
        prior.reconstruct(observation, tiny_bert)
