"""ReCIT: the statistical token filter, token pairing, and the memorisation boost."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from fedpeft.attacks import ATTACKS, score_reconstruction
from fedpeft.attacks.memorisation_boost import boost_adapter, pnote_dataset
from fedpeft.attacks.recit import robust_z
from fedpeft.codecs import CODECS, CodecContext
from fedpeft.config import AdapterConfig, ModelConfig, parse_config
from fedpeft.errors import AttackError, ConfigError
from fedpeft.models import LoadedModel, adapter_state, build_model
from tests.attacks.test_token_set import (
    SENTENCES,
    dp_sgd_observation,
    fedsgd_observation,
    malicious_global_state,
    no_dropout,
)
from tests.conftest import save_tiny_bert, save_tiny_llama


def recit(**options: object):
    return ATTACKS.build("recit", dict(options), "attack.options")


def test_robust_z_ignores_the_outliers_it_is_meant_to_find() -> None:
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, -100.0])
    # median 3, MAD 2: the outlier does not widen the spread it is measured by.
    assert robust_z(values)[-1] == pytest.approx((-100 - 3) / (1.4826 * 2))


def test_a_decoder_batch_of_one_is_filtered_and_paired_exactly(tiny_llama: LoadedModel) -> None:
    observation, truth = fedsgd_observation(
        tiny_llama, malicious_global_state(tiny_llama), SENTENCES[:1], "causal-lm"
    )
    result = recit().reconstruct(observation, tiny_llama)
    special = set(tiny_llama.tokenizer.all_special_ids)
    assert set(result.token_ids) == set(truth[0][:-1]) - special
    assert result.sequences[0] == tuple(truth[0][:-1])
    metrics = score_reconstruction(result, truth, tiny_llama.tokenizer)
    assert metrics.token_precision == 1.0 and metrics.rougeL == pytest.approx(1.0)


@pytest.fixture(scope="module")
def wide_llama_dir(tmp_path_factory: pytest.TempPathFactory, minilm_tokenizer_dir: Path) -> Path:
    """A 2-layer Llama 256 wide: a statistical filter needs room (in 32 dimensions a
    random token lies near any small span by chance)."""
    return save_tiny_llama(tmp_path_factory.mktemp("wide-llama"), minilm_tokenizer_dir, hidden_size=256)


def test_past_the_rank_the_pursuit_reads_the_tokens_an_exact_span_test_loses(wide_llama_dir: Path) -> None:
    # r = 2 on q and v: a stacked rank of 4 against the ~15 distinct tokens of two sentences.
    adapter = AdapterConfig(method="lora", r=2, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])  # type: ignore[call-arg]
    loaded = no_dropout(build_model(ModelConfig(name_or_path=str(wide_llama_dir), task="causal-lm"), adapter))
    observation, truth = fedsgd_observation(loaded, malicious_global_state(loaded), SENTENCES, "causal-lm")
    exact = ATTACKS.build("token_set", {}, "x").reconstruct(observation, loaded)
    special = set(loaded.tokenizer.all_special_ids)
    true = {t for sequence in truth for t in sequence[:-1]} - special
    assert len(set(exact.token_ids) & true) < len(true) // 2  # the rank limit bites
    filtered = recit().reconstruct(observation, loaded)
    assert (filtered.details["saturated"], filtered.details["filter"]) == (1, "pursuit")
    assert filtered.details["pursuit_residual"] < 1e-5
    assert set(filtered.token_ids) == true


def test_past_the_rank_without_an_exact_fit_the_z_filter_still_ranks(wide_llama_dir: Path) -> None:
    adapter = AdapterConfig(method="lora", r=2, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])  # type: ignore[call-arg]
    loaded = no_dropout(build_model(ModelConfig(name_or_path=str(wide_llama_dir), task="causal-lm"), adapter))
    observation, truth = fedsgd_observation(loaded, malicious_global_state(loaded), SENTENCES, "causal-lm")
    # Noise of 1 % of each gradient's scale: no sparse combination fits it exactly.
    generator = torch.Generator().manual_seed(0)
    noisy = {
        name: value + 0.01 * value.abs().mean() * torch.randn(value.shape, generator=generator)
        for name, value in observation.update.items()
    }
    filtered = recit().reconstruct(dataclasses.replace(observation, update=noisy), loaded)
    assert filtered.details["filter"] == "z_score"
    special = set(loaded.tokenizer.all_special_ids)
    true = {t for sequence in truth for t in sequence[:-1]} - special
    # Among its len(true) closest tokens most were in the batch (chance: len(true) of 30k).
    top = filtered.token_ids[: len(true)]
    assert len(set(top) & true) >= len(true) // 2


def test_an_encoder_batch_of_one_is_read_position_by_position(tiny_bert: LoadedModel) -> None:
    observation, truth = fedsgd_observation(
        tiny_bert, malicious_global_state(tiny_bert), SENTENCES[1:], "sequence-classification"
    )
    result = recit().reconstruct(observation, tiny_bert)
    special = set(tiny_bert.tokenizer.all_special_ids)
    assert set(result.token_ids) == set(truth[0]) - special
    metrics = score_reconstruction(result, truth, tiny_bert.tokenizer)
    assert metrics.rougeL == pytest.approx(1.0)


def test_dp_sgd_noise_defeats_the_filter(tiny_llama: LoadedModel) -> None:
    state = malicious_global_state(tiny_llama)
    clean, truth = dp_sgd_observation(tiny_llama, state, 0.0, 1e6)
    assert (
        score_reconstruction(recit().reconstruct(clean, tiny_llama), truth, tiny_llama.tokenizer).token_recall
        == 1.0
    )
    recalls = []
    for _ in range(3):  # OS-seeded noise: a statistical claim over 3 draws
        noisy, truth = dp_sgd_observation(tiny_llama, state, 1.0, 1.0)
        result = recit().reconstruct(noisy, tiny_llama)
        recalls.append(score_reconstruction(result, truth, tiny_llama.tokenizer).token_recall)
    assert sum(recalls) / 3 < 0.3


def test_bad_options_are_named() -> None:
    with pytest.raises(ConfigError, match="pairing_ratio"):
        recit(pairing_ratio=1.5)
    with pytest.raises(ConfigError, match="filter_z"):
        recit(filter_z=0)


def causal_lm_loss(loaded: LoadedModel, texts: list[str]) -> float:
    """The model's own mean next-token loss over ``texts``."""
    loaded.model.eval()
    with torch.no_grad():
        losses = [
            float(loaded.model(input_ids=ids, labels=ids).loss)
            for ids in (loaded.tokenizer(text, return_tensors="pt")["input_ids"] for text in texts)
        ]
    return sum(losses) / len(losses)


def test_the_boost_teaches_the_note_format(tiny_llama: LoadedModel) -> None:
    from fedpeft.attacks.pii import make_pii_records

    held_out = [f"{r.text} {r.note}" for r in make_pii_records(8, seed=99)]
    initial = adapter_state(tiny_llama.model)
    before = causal_lm_loss(tiny_llama, held_out)
    boosted = boost_adapter(tiny_llama, initial, steps=30, seed=0, records=64, lr=1e-2)
    after = causal_lm_loss(tiny_llama, held_out)
    assert after < before - 0.05
    assert any(not torch.equal(boosted[k], initial[k]) for k in initial if ".lora_B." in k)


def test_the_boost_needs_a_causal_lm(tiny_bert: LoadedModel) -> None:
    with pytest.raises(AttackError, match="causal language model"):
        boost_adapter(tiny_bert, adapter_state(tiny_bert.model), steps=1, seed=0)


def test_pnote_samples_restate_each_secret() -> None:
    samples = pnote_dataset(4, seed=0)
    assert len(samples) == 6
    assert all(sample.count("'s ") >= 1 for sample in samples)


def test_boost_steps_need_a_malicious_server(tiny_config_data: dict) -> None:
    tiny_config_data["capture"] = {"rounds": [1], "boost_steps": 10}
    with pytest.raises(Exception, match="malicious = true"):
        parse_config(tiny_config_data)


@pytest.mark.parametrize("codec", ["random_mask", "topk"])
def test_a_sparsified_update_is_read_by_the_masked_pursuit(wide_llama_dir: Path, codec: str) -> None:
    qkv = ["q_proj", "k_proj", "v_proj"]
    adapter = AdapterConfig(method="lora", r=8, lora_dropout=0.0, target_modules=qkv)  # type: ignore[call-arg]
    loaded = no_dropout(build_model(ModelConfig(name_or_path=str(wide_llama_dir), task="causal-lm"), adapter))
    sent = malicious_global_state(loaded)
    observation, truth = fedsgd_observation(loaded, sent, SENTENCES, "causal-lm")
    # What the server decodes: 30 % of each tensor's entries, as float16, exactly the
    # codec's wire path (the mask from the seed both sides share; top-k's indices).
    sparsifier = CODECS.build(codec, {"density": 0.3, "dtype": "float16"}, "federation.codec_options")
    context = CodecContext(run_seed=0, server_round=1, client_id=0)
    decoded = sparsifier.decode(sparsifier.encode(observation.update, context, {}), context, sent)
    assert all(float((value == 0).float().mean()) > 0.6 for value in decoded.values())
    result = recit().reconstruct(dataclasses.replace(observation, update=decoded), loaded)
    assert result.details["filter"] == "masked_pursuit"
    special = set(loaded.tokenizer.all_special_ids)
    assert set(result.token_ids) == {t for sequence in truth for t in sequence[:-1]} - special
    assert result.sequences == ()  # no pairing: the second layer's rows are cut too


@pytest.fixture(scope="module")
def wide_bert_dir(tmp_path_factory: pytest.TempPathFactory, minilm_tokenizer_dir: Path) -> Path:
    """A 2-layer BERT 256 wide whose position embeddings are a tenth of its word embeddings,
    as in a pretrained encoder (MiniLM: an input moves far less with its position than
    with its word); BERT's dropout of 0.1 stays on."""
    from transformers import BertForSequenceClassification

    folder = save_tiny_bert(
        tmp_path_factory.mktemp("wide-bert"), minilm_tokenizer_dir, hidden_size=256, initializer_range=0.2
    )
    model = BertForSequenceClassification.from_pretrained(str(folder))
    with torch.no_grad():
        model.bert.embeddings.position_embeddings.weight.mul_(0.1)
    model.save_pretrained(str(folder))
    return folder


def _wide_bert(folder: Path, r: int) -> LoadedModel:
    qkv = ["query", "key", "value"]
    adapter = AdapterConfig(method="lora", r=r, lora_dropout=0.0, target_modules=qkv)  # type: ignore[call-arg]
    loaded = build_model(ModelConfig(name_or_path=str(folder)), adapter, num_labels=2)
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in loaded.model.modules())
    return loaded


def test_under_embedding_dropout_an_encoder_batch_of_one_is_read_relative_to_the_median(
    wide_bert_dir: Path,
) -> None:
    loaded = _wide_bert(wide_bert_dir, r=8)
    observation, truth = fedsgd_observation(
        loaded, malicious_global_state(loaded), SENTENCES[1:], "sequence-classification"
    )
    special = set(loaded.tokenizer.all_special_ids)
    # DAGER's exact test finds nothing: dropout moved every input off the span.
    assert ATTACKS.build("token_set", {}, "x").reconstruct(observation, loaded).token_ids == ()
    result = recit().reconstruct(observation, loaded)
    assert result.details["filter"] == "relative_span"
    assert set(result.token_ids) == set(truth[0]) - special
    # Each token placed once by the assignment: the sentence comes back in order, where
    # each position's own best token repeats neighbours (checked: it fails this).
    assert result.sequences == (tuple(t for t in truth[0] if t not in special),)


def test_past_the_rank_an_encoder_gets_a_token_set_from_position_averaged_inputs(
    wide_bert_dir: Path,
) -> None:
    loaded = _wide_bert(wide_bert_dir, r=4)  # a stacked rank of 12 against ~20 positions
    observation, truth = fedsgd_observation(
        loaded, malicious_global_state(loaded), SENTENCES, "sequence-classification"
    )
    result = recit().reconstruct(observation, loaded)
    assert result.details["filter"] == "position_averaged_pursuit"
    metrics = score_reconstruction(result, truth, loaded.tokenizer)
    # Chance is ~20 tokens of 30k; on MiniLM itself see benchmarks/attacks.py (README).
    assert metrics.token_precision >= 0.5 and metrics.token_recall >= 0.3
    assert result.sequences == ()


def test_the_pairing_reads_the_middle_third_of_the_layers(tmp_path: Path, minilm_tokenizer_dir: Path) -> None:
    from fedpeft.attacks.second_layer import prefix_layers_of, second_layer_of

    folder = save_tiny_llama(tmp_path, minilm_tokenizer_dir, layers=6)
    adapter = AdapterConfig(method="lora", r=2, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])  # type: ignore[call-arg]
    loaded = build_model(ModelConfig(name_or_path=str(folder), task="causal-lm"), adapter)
    layers = prefix_layers_of(loaded.model)
    assert layers.layers == (2, 3, 4)
    assert all(".layers.3.self_attn." in name for name in layers.lora_a_names[1])
    prefixes = torch.tensor([[5, 6, 7], [5, 6, 8]])
    view = layers.last_position(prefixes)
    assert [tuple(x.shape) for x in view.layer_inputs] == [(2, 32)] * 3
    # One forward pass serves every layer; the log-probabilities are the model's.
    assert torch.allclose(view.log_probs, second_layer_of(loaded.model).last_position(prefixes).log_probs)
    two = save_tiny_llama(tmp_path / "two", minilm_tokenizer_dir)
    shallow = build_model(ModelConfig(name_or_path=str(two), task="causal-lm"), adapter)
    assert prefix_layers_of(shallow.model).layers == (1,)  # never the first layer
