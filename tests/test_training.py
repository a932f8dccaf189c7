from pathlib import Path

import datasets
import pytest
import torch

from fedpeft.config import ModelConfig, TrainConfig, parse_config
from fedpeft.models import adapter_state, build_model, load_adapter_state
from fedpeft.training import (
    LengthGroupedBatches,
    evaluate,
    make_eval_loader,
    make_loader,
    make_optimizer,
    resolve_device,
    tokenize,
    train_local,
)
from tests.conftest import make_sentiment_rows


@pytest.fixture()
def tiny(tiny_bert_dir: Path):
    config = parse_config(
        {
            "model": {"name_or_path": str(tiny_bert_dir)},
            "adapter": {"r": 4, "target_modules": ["query", "value"]},
        }
    )
    return build_model(config.model, config.adapter, num_labels=2)


@pytest.fixture()
def encoded(tiny) -> datasets.Dataset:
    rows = make_sentiment_rows(20)
    data = datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [y for _, y in rows]})
    return tokenize(data, tiny.tokenizer, 32, "sequence-classification")


def test_tokenize_keeps_the_tokenizers_ids_and_the_labels(tiny, monkeypatch) -> None:
    """Every row's ids are the tokenizer's (truncated), labels follow, and ``Dataset.map``,
    whose fingerprinting pickles the tokenizer each call (12x the tokenizing), is not used."""
    rows = make_sentiment_rows(12)
    data = datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [y for _, y in rows]})
    monkeypatch.setattr(datasets.Dataset, "map", lambda *a, **k: pytest.fail("map called"))
    encoded = tokenize(data, tiny.tokenizer, 5, "sequence-classification")
    assert encoded["labels"] == [y for _, y in rows]
    assert (
        encoded["input_ids"]
        == tiny.tokenizer([t for t, _ in rows], truncation=True, max_length=5)["input_ids"]
    )
    assert max(len(ids) for ids in encoded["input_ids"]) == 5
    assert "text" not in encoded.column_names
    empty = tokenize(data.select([]), tiny.tokenizer, 5, "sequence-classification")
    assert len(empty) == 0 and "labels" in empty.column_names
    monkeypatch.setattr("fedpeft.training.TOKENIZE_CHUNK", 5)  # 12 rows: chunks of 5, 5, 2
    assert tokenize(data, tiny.tokenizer, 5, "sequence-classification").to_dict() == encoded.to_dict()


def test_step_budget_counts_optimizer_steps(tiny, encoded) -> None:
    loader = make_loader(encoded, tiny.tokenizer, "sequence-classification", 4, shuffle=True)
    result = train_local(tiny.model, loader, TrainConfig(steps=7, grad_accumulation=2), torch.device("cpu"))
    assert result.steps == 7 and result.examples_seen == 7 * 2 * 4


def test_epoch_budget_sees_every_example_once_per_epoch(tiny, encoded) -> None:
    loader = make_loader(encoded, tiny.tokenizer, "sequence-classification", 6, shuffle=True)
    result = train_local(tiny.model, loader, TrainConfig(epochs=2, steps=0), torch.device("cpu"))
    assert result.examples_seen == 40 and result.steps == 2 * 4  # 20 examples in batches 6,6,6,2


def test_gradient_accumulation_matches_one_big_batch(tiny, encoded) -> None:
    """Two micro-batches of 4 with accumulation take the same step as one batch of 8.

    Catches stepping per micro-batch or dropping one; AdamW's first step is invariant
    to a global gradient scale, so a missing 1/accumulation factor is not caught here.
    """
    start = adapter_state(tiny.model)
    config = TrainConfig(steps=1, lr=1e-2, clip_grad_norm=None)
    small = make_loader(encoded.select(range(8)), tiny.tokenizer, "sequence-classification", 4, shuffle=False)
    big = make_loader(encoded.select(range(8)), tiny.tokenizer, "sequence-classification", 8, shuffle=False)

    def one_step(loader, accumulation: int) -> dict:
        load_adapter_state(tiny.model, start)
        train_local(
            tiny.model,
            loader,
            config.model_copy(update={"grad_accumulation": accumulation}),
            torch.device("cpu"),
        )
        return adapter_state(tiny.model)

    # train_local switches to train mode: switch dropout off so both runs see one function
    for module in tiny.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    accumulated, whole = one_step(small, 2), one_step(big, 1)
    for name in start:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-4, atol=1e-6)


def test_training_changes_only_trainable_tensors(tiny, encoded) -> None:
    frozen = {n: p.detach().clone() for n, p in tiny.model.named_parameters() if not p.requires_grad}
    before = adapter_state(tiny.model)
    loader = make_loader(encoded, tiny.tokenizer, "sequence-classification", 4, shuffle=True)
    train_local(tiny.model, loader, TrainConfig(steps=3), torch.device("cpu"))
    for name, param in tiny.model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
    assert any(not torch.equal(before[n], t) for n, t in adapter_state(tiny.model).items())


def test_evaluate_counts_accuracy(tiny, encoded) -> None:
    loader = make_loader(encoded, tiny.tokenizer, "sequence-classification", 8, shuffle=False)
    result = evaluate(tiny.model, loader, "sequence-classification", torch.device("cpu"))
    assert result.num_examples == 20 and 0.0 <= result.accuracy <= 1.0
    with torch.no_grad():
        predictions = []
        for batch in loader:
            predictions += tiny.model(**batch).logits.argmax(-1).tolist()
    assert result.accuracy == pytest.approx(
        sum(p == y for p, y in zip(predictions, encoded["labels"], strict=True)) / 20
    )


def test_eval_loader_batches_by_length_and_evaluates_the_same(tiny, encoded) -> None:
    """Length-sorted batches cover every example once, pad less, and change no result."""
    in_order = make_loader(encoded, tiny.tokenizer, "sequence-classification", 8, shuffle=False)
    by_length = make_eval_loader(encoded, tiny.tokenizer, "sequence-classification", 8)
    lengths = [len(ids) for ids in encoded["input_ids"]]
    assert sorted(i for batch in by_length.batch_sampler for i in batch) == list(range(20))
    assert [len(b) for b in by_length.batch_sampler] == [8, 8, 4]
    seen = [int(b["attention_mask"].sum(1).max()) for b in by_length]
    assert seen == sorted(seen) and seen[-1] == max(lengths)
    padded = sum(b["input_ids"].numel() for b in by_length)
    assert padded <= sum(b["input_ids"].numel() for b in in_order)
    sorted_result = evaluate(tiny.model, by_length, "sequence-classification", torch.device("cpu"))
    ordered_result = evaluate(tiny.model, in_order, "sequence-classification", torch.device("cpu"))
    assert sorted_result.num_examples == ordered_result.num_examples == 20
    assert sorted_result.accuracy == ordered_result.accuracy
    assert sorted_result.loss == pytest.approx(ordered_result.loss, rel=1e-5)


def test_length_grouped_batches_cover_every_example_once_a_pass_and_pad_less() -> None:
    lengths = [int(x) for x in torch.randint(3, 60, (1000,), generator=torch.Generator().manual_seed(1))]
    sampler = LengthGroupedBatches(lengths, 16, torch.Generator().manual_seed(0), window=10)
    first, second = list(sampler), list(sampler)
    for batches in (first, second):
        assert sorted(i for batch in batches for i in batch) == list(range(1000))
        assert len(batches) == len(sampler) == 63 and sum(len(b) < 16 for b in batches) <= 7
    assert first != second  # reshuffled each pass
    again = list(LengthGroupedBatches(lengths, 16, torch.Generator().manual_seed(0), window=10))
    assert again == first  # seeded
    uniform = torch.randperm(1000, generator=torch.Generator().manual_seed(0)).tolist()
    padded_uniform = sum(16 * max(lengths[i] for i in uniform[s : s + 16]) for s in range(0, 1000, 16))
    padded_grouped = sum(len(b) * max(lengths[i] for i in b) for b in first)
    assert padded_grouped < 0.7 * padded_uniform


def test_group_by_length_reaches_the_client_loader(tiny, encoded) -> None:
    grouped = make_loader(
        encoded, tiny.tokenizer, "sequence-classification", 4, shuffle=True, group_by_length=True
    )
    assert isinstance(grouped.batch_sampler, LengthGroupedBatches)
    assert sum(int(b["labels"].shape[0]) for b in grouped) == 20
    plain = make_loader(
        encoded, tiny.tokenizer, "sequence-classification", 4, shuffle=False, group_by_length=True
    )
    assert not isinstance(plain.batch_sampler, LengthGroupedBatches)  # evaluation order stays


def test_causal_lm_loss_and_token_accuracy(tiny_llama_dir: Path) -> None:
    config = parse_config(
        {
            "model": {"name_or_path": str(tiny_llama_dir), "task": "causal-lm"},
            "adapter": {"r": 2, "target_modules": ["q_proj", "v_proj"]},
        }
    )
    loaded = build_model(config.model, config.adapter)
    data = datasets.Dataset.from_dict({"text": ["the cat sat on the mat"] * 8})
    encoded_lm = tokenize(data, loaded.tokenizer, 16, "causal-lm")
    loader = make_loader(encoded_lm, loaded.tokenizer, "causal-lm", 4, shuffle=True)
    before = evaluate(loaded.model, loader, "causal-lm", torch.device("cpu"))
    train_local(loaded.model, loader, TrainConfig(steps=40, lr=3e-2), torch.device("cpu"))
    after = evaluate(loaded.model, loader, "causal-lm", torch.device("cpu"))
    assert after.loss < before.loss - 0.3, (before, after)


def test_device_auto_is_cpu_without_cuda() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert ModelConfig().dtype == "float32"


def test_sgd_momentum_accumulates_past_gradients() -> None:
    """``train.momentum`` is heavy-ball SGD: the second step with a zero gradient still
    moves by momentum x the first; plain SGD (the default) does not move."""
    moved = {}
    for momentum in (0.0, 0.9):
        weight = torch.nn.Parameter(torch.zeros(1))
        optimizer = make_optimizer([weight], TrainConfig(optimizer="sgd", lr=1.0, momentum=momentum))
        for gradient in (1.0, 0.0):
            weight.grad = torch.tensor([gradient])
            optimizer.step()
        moved[momentum] = float(weight)
    assert moved[0.0] == pytest.approx(-1.0)
    assert moved[0.9] == pytest.approx(-1.9)
