"""Sentence peeling and polishing: pairing tokens into sentences past the layers' rank."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedpeft.attacks import ATTACKS, Observation
from fedpeft.attacks.peeling import ProjectedSpans, SentencePeeling, repeats_a_trigram
from fedpeft.attacks.polishing import SentencePolish, unexplained
from fedpeft.attacks.second_layer import prefix_layers_of
from fedpeft.config import AdapterConfig, ModelConfig
from fedpeft.models import LoadedModel, build_model, load_adapter_state
from tests.attacks.test_token_set import SENTENCES, fedsgd_observation, malicious_global_state, no_dropout
from tests.conftest import save_tiny_llama


def _decoder(folder: Path, r: int) -> LoadedModel:
    """The Llama in ``folder`` with LoRA of rank ``r`` on q/k/v and no dropout."""
    targets = ["q_proj", "k_proj", "v_proj"]
    adapter = AdapterConfig(method="lora", r=r, lora_dropout=0.0, target_modules=targets)  # type: ignore[call-arg]
    return no_dropout(build_model(ModelConfig(name_or_path=str(folder), task="causal-lm"), adapter))


def _observe(folder: Path, r: int, texts: list[str]) -> tuple[LoadedModel, Observation, list[list[int]]]:
    """One FedSGD step of ``texts`` seen by a malicious server, its model set to what it sent."""
    loaded = _decoder(folder, r)
    observation, truth = fedsgd_observation(loaded, malicious_global_state(loaded), texts, "causal-lm")
    load_adapter_state(loaded.model, observation.global_state)
    loaded.model.eval()
    return loaded, observation, truth


@pytest.fixture(scope="module")
def saturated(tmp_path_factory: pytest.TempPathFactory, minilm_tokenizer_dir: Path):
    """Two sentences (19 inputs per layer) against a stacked rank of 12 (r = 4 on q/k/v) in a
    3-layer Llama 256 wide: each sentence alone is below the rank, the batch is past it."""
    folder = save_tiny_llama(
        tmp_path_factory.mktemp("peel-llama"), minilm_tokenizer_dir, hidden_size=256, layers=3
    )
    return _observe(folder, 4, SENTENCES)


def test_projecting_out_the_other_sentence_makes_the_span_exact_again(saturated) -> None:
    loaded, observation, truth = saturated
    layers = prefix_layers_of(loaded.model, 0.0, 2 / 3)
    assert layers.layers == (1, 2)
    rows = layers.rows(observation.gradient_estimate())
    assert sum(len(sentence) - 1 for sentence in truth) > rows[0].shape[0]  # past the rank
    first, second = (layers.sentence(torch.tensor(sentence)) for sentence in truth)

    def worst(spans: ProjectedSpans, sentence: tuple[torch.Tensor, ...]) -> float:
        # Every input that reached the gradient (all but the last position), but the
        # [CLS] both sentences open with: once the other sentence is known it is explained.
        return max(float(spans.distance(layer, inputs[1:-1]).max()) for layer, inputs in enumerate(sentence))

    nothing_known = ProjectedSpans(rows, [], 1e-5)
    assert worst(nothing_known, first) > 0.1 and nothing_known.unexplained == pytest.approx(1.0)
    other_known = ProjectedSpans(rows, [second], 1e-5)
    assert worst(other_known, first) < 1e-4
    assert 0.1 < other_known.unexplained < 1.0
    assert ProjectedSpans(rows, [first, second], 1e-5).unexplained < 1e-6


def test_the_peeling_reads_both_sentences_past_the_rank(saturated) -> None:
    loaded, observation, truth = saturated
    result = ATTACKS.build("recit", {}, "x").reconstruct(observation, loaded)
    assert result.details["saturated"] == 1
    # The last token of each sentence predicts nothing, so no gradient shows it.
    assert sorted(result.sequences) == sorted(tuple(sentence[:-1]) for sentence in truth)


def test_the_peeling_stops_when_nothing_is_left_to_explain(saturated) -> None:
    loaded, observation, truth = saturated
    layers = prefix_layers_of(loaded.model, 0.0, 2 / 3)
    tokens = sorted({t for sentence in truth for t in sentence})
    found = SentencePeeling(max_sentences=8).sentences(layers, observation.gradient_estimate(), tokens)
    assert len(found) == 2  # not 8: both sentences make up the rows


def test_trigram_loops_are_forbidden() -> None:
    assert repeats_a_trigram((1, 2, 3, 1, 2), 3)
    assert not repeats_a_trigram((1, 2, 3, 1, 2), 4)
    assert not repeats_a_trigram((1,), 1)


@pytest.mark.parametrize(
    ("option", "value"), [("pairing_ratio", 1.5), ("start_ratio", 0.0), ("sweeps", -1), ("max_length", 0)]
)
def test_bad_peeling_options_are_named(option: str, value: float) -> None:
    with pytest.raises(ValueError, match=option):
        SentencePeeling(**{option: value})  # type: ignore[arg-type]


def test_a_one_layer_view_scores_starts_and_extensions_with_the_same_layer(tiny_llama: LoadedModel) -> None:
    observation, truth = fedsgd_observation(
        tiny_llama, malicious_global_state(tiny_llama), SENTENCES[:1], "causal-lm"
    )
    load_adapter_state(tiny_llama.model, observation.global_state)
    layers = prefix_layers_of(tiny_llama.model, 0.0, 2 / 3)
    assert layers.layers == (1,)
    found = SentencePeeling().sentences(layers, observation.gradient_estimate(), sorted(set(truth[0])))
    assert found == [tuple(truth[0][:-1])]


def test_a_sentence_longer_than_the_rank_is_read_once_its_prefix_is_projected_out(
    tmp_path: Path, minilm_tokenizer_dir: Path
) -> None:
    # r = 2 on q/k/v: a stacked rank of 6 against one sentence's 9 inputs.
    folder = save_tiny_llama(tmp_path, minilm_tokenizer_dir, hidden_size=256, layers=3)
    loaded, observation, truth = _observe(folder, 2, SENTENCES[1:])
    layers = prefix_layers_of(loaded.model, 0.0, 2 / 3)
    rows = layers.rows(observation.gradient_estimate())
    assert len(truth[0]) - 1 > rows[0].shape[0]
    found = SentencePeeling().sentences(layers, observation.gradient_estimate(), sorted(set(truth[0])))
    assert found == [tuple(truth[0][:-1])]


def test_sentences_that_share_their_first_words_branch_off_the_first_found(
    tmp_path: Path, minilm_tokenizer_dir: Path
) -> None:
    # Templated text: both open with "[CLS] the quiet river", whose inputs the first
    # sentence found explains whole.
    folder = save_tiny_llama(tmp_path, minilm_tokenizer_dir, hidden_size=256, layers=3)
    texts = ["the quiet river runs past old mills", "the quiet river froze over last winter"]
    loaded, observation, truth = _observe(folder, 4, texts)
    layers = prefix_layers_of(loaded.model, 0.0, 2 / 3)
    gradients = observation.gradient_estimate()
    tokens = sorted({t for sentence in truth for t in sentence})
    expected = sorted(tuple(sentence[:-1]) for sentence in truth)
    assert sorted(SentencePeeling(max_branch=8).sentences(layers, gradients, tokens)) == expected
    assert sorted(SentencePeeling().sentences(layers, gradients, tokens)) != expected  # [CLS] only


def test_polishing_mends_a_wrong_and_a_missing_token_by_the_exact_test(saturated) -> None:
    loaded, observation, truth = saturated
    layers = prefix_layers_of(loaded.model, 0.0, 2 / 3)
    rows = layers.rows(observation.gradient_estimate())
    read = [tuple(sentence[:-1]) for sentence in truth]  # the last token reaches no gradient
    vocabulary = torch.tensor(sorted({t for sentence in read for t in sentence}))
    wrong = list(read[0])
    wrong[3] = next(t for t in vocabulary.tolist() if t not in read[0])
    missing = read[1][:2] + read[1][3:]
    inputs = [layers.sentence(torch.tensor(s)) for s in (tuple(wrong), missing)]
    assert unexplained(rows, inputs) > 0.01  # the exact test sees both faults
    polished = SentencePolish().sentences(layers, rows, [tuple(wrong), missing], vocabulary)
    assert polished == read
    assert SentencePolish(max_edits=0).sentences(layers, rows, [tuple(wrong), missing], vocabulary) == [
        tuple(wrong),
        missing,
    ]


def test_polishing_leaves_sentences_that_explain_the_rows(saturated) -> None:
    loaded, observation, truth = saturated
    layers = prefix_layers_of(loaded.model, 0.0, 2 / 3)
    rows = layers.rows(observation.gradient_estimate())
    read = [tuple(sentence[:-1]) for sentence in truth]
    assert unexplained(rows, [layers.sentence(torch.tensor(s)) for s in read]) < 1e-6
    vocabulary = torch.tensor(sorted({t for sentence in read for t in sentence}))
    assert SentencePolish().sentences(layers, rows, read, vocabulary) == read
    with pytest.raises(ValueError, match="min_gain"):
        SentencePolish(min_gain=1.5)
