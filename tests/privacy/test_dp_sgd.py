"""Client DP-SGD with Opacus on peft models: the peft trap, per-example clipping, noise."""

from pathlib import Path

import datasets
import pytest
import torch
from opacus import PrivacyEngine
from torch import nn

from fedpeft.config import ExamplePrivacyConfig, TrainConfig, parse_config
from fedpeft.models import adapter_state, build_model
from fedpeft.privacy.dp_sgd import per_example_loss, resolve_grad_sample_mode, train_local_private
from fedpeft.training import make_collator, make_loader, tokenize, train_local
from tests.conftest import make_sentiment_rows, tiny_config


def tiny_model(tiny_bert_dir: Path, sentiment_files: dict[str, Path], lm_dir: Path | None = None):
    data = tiny_config(tiny_bert_dir, sentiment_files)
    data["adapter"]["lora_dropout"] = 0.0
    if lm_dir is not None:
        data["model"] = {"name_or_path": str(lm_dir), "task": "causal-lm"}
        data["adapter"]["target_modules"] = ["q_proj", "v_proj"]
        data["data"]["label_column"] = ""
    config = parse_config(data)
    loaded = build_model(config.model, config.adapter, num_labels=None if lm_dir else 2, seed=0)
    for module in loaded.model.modules():  # deterministic forward: per-example references
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return config, loaded


def encoded_rows(tokenizer, task: str, n: int = 12) -> datasets.Dataset:
    rows = make_sentiment_rows(n, seed=3)
    raw = datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [y for _, y in rows]})
    return tokenize(raw, tokenizer, 24, task)  # type: ignore[arg-type]


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in adapter_state(model).values()])


def reference_clipped_mean(
    model, dataset, collate, task, indices, clip: float, expected: int
) -> torch.Tensor:
    """sum_i clip(g_i) / expected, each g_i from a forward/backward of example i alone."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = torch.zeros(sum(p.numel() for p in params))
    for i in indices:
        batch = collate([dataset[i]])
        labels = batch.pop("labels")
        loss = per_example_loss(model(**batch).logits, labels, task)[0]
        grads = torch.autograd.grad(loss, params)
        g = torch.cat([t.reshape(-1) for t in grads])
        total += g * min(1.0, clip / float(g.norm()))
    return total / expected


def test_the_peft_opacus_trap_is_eval_mode_and_train_local_private_avoids_it(
    tiny_bert_dir: Path, sentiment_files: dict[str, Path]
) -> None:
    """from_pretrained leaves every module in eval mode while the fresh PeftModel says
    training; Opacus then records no activation for the classifier head copy."""
    config, loaded = tiny_model(tiny_bert_dir, sentiment_files)
    model = loaded.model
    assert model.training and not model.base_model.model.classifier.modules_to_save["default"].training
    dataset = encoded_rows(loaded.tokenizer, config.model.task)
    loader = make_loader(dataset, loaded.tokenizer, config.model.task, 4, shuffle=False)
    params = [p for p in model.parameters() if p.requires_grad]
    engine = PrivacyEngine()
    wrapped, _optimizer, private_loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(params, lr=0.1),
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
    )
    batch = next(iter(private_loader))
    with pytest.raises(ValueError, match="No activations detected"):
        wrapped(**batch).loss.backward()
    wrapped._close()

    config, loaded = tiny_model(tiny_bert_dir, sentiment_files)  # fresh, again in the trap's state
    privacy = ExamplePrivacyConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=1.0)
    for mode in ("hooks", "ghost"):
        before = flat_params(loaded.model)
        result, spent = train_local_private(
            loaded.model,
            dataset,
            make_collator(loaded.tokenizer, "sequence-classification"),
            "sequence-classification",
            TrainConfig(steps=3, batch_size=4),
            privacy.model_copy(update={"grad_sample_mode": mode}),
            1.0,
            torch.device("cpu"),
        )
        assert result.steps == 3 and spent.grad_sample_mode == mode
        assert not torch.equal(before, flat_params(loaded.model))
        assert not any(hasattr(p, "grad_sample") for p in loaded.model.parameters())  # hooks removed


def test_auto_mode_picks_hooks_for_small_adapters_and_ghost_for_large_ones(
    tiny_bert_dir: Path, sentiment_files: dict[str, Path]
) -> None:
    _, loaded = tiny_model(tiny_bert_dir, sentiment_files)
    assert resolve_grad_sample_mode(loaded.model, "auto", batch_size=16) == "hooks"
    assert resolve_grad_sample_mode(loaded.model, "auto", batch_size=16, budget_bytes=1024) == "ghost"
    assert resolve_grad_sample_mode(loaded.model, "hooks", batch_size=16, budget_bytes=1024) == "hooks"
    # A trainable LayerNorm has no ghost norm sampler: hooks whatever the size.
    loaded.model.base_model.model.bert.embeddings.LayerNorm.weight.requires_grad_(True)
    assert resolve_grad_sample_mode(loaded.model, "auto", batch_size=16, budget_bytes=1024) == "hooks"


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
@pytest.mark.parametrize("task", ["sequence-classification", "causal-lm"])
def test_clipped_gradient_matches_a_per_example_reference(
    tiny_bert_dir: Path, tiny_llama_dir: Path, sentiment_files: dict[str, Path], mode: str, task: str
) -> None:
    """One SGD step of lr 1 with sigma 0 moves the adapter by exactly -sum_i clip(g_i) / B."""
    _config, loaded = tiny_model(
        tiny_bert_dir, sentiment_files, tiny_llama_dir if task == "causal-lm" else None
    )
    model, collate = loaded.model, make_collator(loaded.tokenizer, task)  # type: ignore[arg-type]
    model.train()
    dataset = encoded_rows(loaded.tokenizer, task)
    indices, clip = [0, 3, 5, 7], 0.05
    expected = reference_clipped_mean(model, dataset, collate, task, indices, clip, expected=4)
    before = flat_params(model)
    privacy = ExamplePrivacyConfig(
        enabled=True, noise_multiplier=0.0, max_grad_norm=clip, grad_sample_mode=mode
    )  # type: ignore[arg-type]
    train_local_private(
        model,
        dataset,
        collate,
        task,
        TrainConfig(steps=1, batch_size=4, lr=1.0, optimizer="sgd"),  # type: ignore[arg-type]
        privacy,
        0.0,
        torch.device("cpu"),
        batches=[indices],
    )
    moved = before - flat_params(model)
    torch.testing.assert_close(moved, expected, atol=1e-5, rtol=1e-4)
    # The clip binds: each example's contribution is at most C, so the step is <= C.
    assert float(moved.norm()) <= clip + 1e-6


def test_zero_noise_and_huge_clip_reproduce_non_private_training(
    tiny_bert_dir: Path, sentiment_files: dict[str, Path]
) -> None:
    train = TrainConfig(steps=3, batch_size=4, lr=1e-2, clip_grad_norm=None)
    results = []
    for private in (False, True):
        config, loaded = tiny_model(tiny_bert_dir, sentiment_files)
        dataset = encoded_rows(loaded.tokenizer, config.model.task)
        if private:
            privacy = ExamplePrivacyConfig(enabled=True, noise_multiplier=0.0, max_grad_norm=1e6)
            train_local_private(
                loaded.model,
                dataset,
                make_collator(loaded.tokenizer, config.model.task),
                config.model.task,
                train,
                privacy,
                0.0,
                torch.device("cpu"),
                batches=[[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]],
            )
        else:
            loader = make_loader(dataset, loaded.tokenizer, config.model.task, 4, shuffle=False)
            train_local(loaded.model, loader, train, torch.device("cpu"))
        results.append(flat_params(loaded.model))
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_an_empty_poisson_batch_still_adds_noise(
    tiny_bert_dir: Path, sentiment_files: dict[str, Path], mode: str
) -> None:
    config, loaded = tiny_model(tiny_bert_dir, sentiment_files)
    dataset = encoded_rows(loaded.tokenizer, config.model.task)
    collate = make_collator(loaded.tokenizer, config.model.task)
    for sigma, moves in ((0.0, False), (1.0, True)):
        before = flat_params(loaded.model)
        privacy = ExamplePrivacyConfig(
            enabled=True, noise_multiplier=sigma, max_grad_norm=1.0, grad_sample_mode=mode
        )  # type: ignore[arg-type]
        result, _ = train_local_private(
            loaded.model,
            dataset,
            collate,
            config.model.task,
            TrainConfig(steps=1, batch_size=4, optimizer="sgd"),
            privacy,
            sigma,
            torch.device("cpu"),
            batches=[[]],
        )
        assert result.steps == 1 and result.examples_seen == 0
        assert (not torch.equal(before, flat_params(loaded.model))) == moves


def test_poisson_sampling_draws_the_expected_batch_size(
    tiny_bert_dir: Path, sentiment_files: dict[str, Path]
) -> None:
    from fedpeft.privacy.dp_sgd import poisson_batches

    sizes = [len(b) for b in poisson_batches(1000, 0.02, 400)]
    assert len(sizes) == 400
    assert 19 < sum(sizes) / len(sizes) < 21  # mean 20, std of the mean 0.22
    assert len(set(sizes)) > 5  # sizes vary: it is Poisson sampling, not fixed batches


@pytest.mark.parametrize("private", [False, True])
def test_head_lr_scales_the_heads_step_alone(
    tiny_bert_dir: Path, sentiment_files: dict[str, Path], private: bool
) -> None:
    """One SGD step from the same start on the same batch: with ``head_lr`` = lr / 4 the
    adapter moves exactly as without it and the head moves a quarter as far."""
    moves = []
    for head_lr in (None, 0.25):
        config, loaded = tiny_model(tiny_bert_dir, sentiment_files)
        model, task = loaded.model, config.model.task
        dataset = encoded_rows(loaded.tokenizer, task)
        collate = make_collator(loaded.tokenizer, task)
        before = adapter_state(model)
        train = TrainConfig(steps=1, batch_size=4, lr=1.0, head_lr=head_lr, optimizer="sgd")  # type: ignore[arg-type]
        if private:
            privacy = ExamplePrivacyConfig(enabled=True, noise_multiplier=0.0, max_grad_norm=0.05)  # type: ignore[arg-type]
            train_local_private(
                model,
                dataset,
                collate,
                task,
                train,
                privacy,
                0.0,
                torch.device("cpu"),
                batches=[[0, 3, 5, 7]],
            )
        else:
            loader = make_loader(dataset.select([0, 3, 5, 7]), loaded.tokenizer, task, 4, shuffle=False)
            train_local(model, loader, train.model_copy(update={"clip_grad_norm": None}), torch.device("cpu"))
        after = adapter_state(model)
        moves.append({name: after[name] - before[name] for name in before})
    plain, scaled = moves
    heads = [name for name in plain if ".modules_to_save." in name]
    assert heads and any(float(plain[name].abs().max()) > 0 for name in heads)
    for name in plain:
        factor = 0.25 if name in heads else 1.0
        torch.testing.assert_close(scaled[name], factor * plain[name], atol=1e-7, rtol=1e-5, msg=name)
