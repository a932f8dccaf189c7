"""Poisson batches larger than memory: split into physical batches, one noised step each."""

from pathlib import Path

import pytest
import torch
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

import fedpeft.privacy.dp_sgd as dp_sgd
from fedpeft.config import ExamplePrivacyConfig, TrainConfig
from fedpeft.models import adapter_state, load_adapter_state
from fedpeft.privacy.dp_sgd import train_local_private
from fedpeft.training import make_collator
from tests.privacy.test_dp_sgd import encoded_rows, flat_params, tiny_model

BATCHES = [[0, 1, 2, 3, 4, 5, 6, 7], [2, 3, 5, 7, 8, 9, 10, 11, 1]]
"""Two Poisson draws (sizes 8 and 9 around the expected 8) of the 12 rows."""


def run(loaded, dataset, mode: str, sigma: float, physical: int | None):
    """Train on BATCHES; returns the adapter, what Opacus noised, pass sizes and the round."""
    optimizer_class = DPOptimizerFastGradientClipping if mode == "ghost" else DPOptimizer
    noised: list[tuple[float, int]] = []
    add_noise = optimizer_class.add_noise

    def recorded(optimizer: DPOptimizer) -> None:
        noised.append((optimizer.noise_multiplier * optimizer.max_grad_norm, optimizer.expected_batch_size))
        add_noise(optimizer)

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(optimizer_class, "add_noise", recorded)
    # The noise generator's seed normally comes from OS randomness; fixed here so
    # that runs draw the same noise and can be compared with noise on.
    monkeypatch.setattr(dp_sgd.secrets, "randbits", lambda _bits: 12345)
    passes: list[int] = []
    hook = loaded.model.register_forward_pre_hook(
        lambda _m, _a, kwargs: passes.append(int(kwargs["input_ids"].shape[0])), with_kwargs=True
    )
    privacy = ExamplePrivacyConfig(
        enabled=True,
        noise_multiplier=sigma,
        max_grad_norm=0.05,  # below most gradients' norms: clipping binds
        grad_sample_mode=mode,  # type: ignore[arg-type]
        max_physical_batch_size=physical,
    )
    try:
        _, spent = train_local_private(
            loaded.model,
            dataset,
            make_collator(loaded.tokenizer, "sequence-classification"),
            "sequence-classification",
            TrainConfig(steps=2, batch_size=8, lr=0.5, optimizer="sgd", clip_grad_norm=None),
            privacy,
            sigma,
            torch.device("cpu"),
            batches=BATCHES,
        )
    finally:
        hook.remove()
        monkeypatch.undo()
    return flat_params(loaded.model), noised, passes, spent


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_logical_batches_match_one_physical_batch(
    tiny_bert_dir: Path, sentiment_files: dict[str, Path], mode: str
) -> None:
    """Same update (noise off, and noise on from the same stream), same noise std and
    divisor, same accountant inputs (q, steps) as each Poisson batch in one pass."""
    config, loaded = tiny_model(tiny_bert_dir, sentiment_files)
    dataset = encoded_rows(loaded.tokenizer, config.model.task)
    start = adapter_state(loaded.model)
    initial = torch.cat([t.reshape(-1) for t in start.values()])
    for sigma in (0.0, 1.0):
        outcomes = {}
        for physical in (None, 3):
            load_adapter_state(loaded.model, start)
            outcomes[physical] = run(loaded, dataset, mode, sigma, physical)
        whole, split = outcomes[None], outcomes[3]
        assert not torch.equal(whole[0], initial)  # it trained
        torch.testing.assert_close(split[0], whole[0], atol=1e-6, rtol=1e-5)
        assert whole[2] == [8, 9] and split[2] == [3, 3, 2, 3, 3, 3]  # the bound holds
        # One noising per Poisson batch, of the same std, divided by the expected batch.
        assert split[1] == whole[1] and len(whole[1]) == 2 and all(b == 8 for _, b in whole[1])
        assert split[3] == whole[3] and (whole[3].sample_rate, whole[3].steps) == (8 / 12, 2)


def test_physical_batches_group_similar_lengths() -> None:
    """A split Poisson batch is sorted by length first: every example once, and each
    pass pads to a length close to its own examples' rather than the batch's longest."""
    lengths = dict(enumerate([30, 2, 29, 3, 28, 4, 27, 5]))
    indices = list(lengths)

    class Optimizer:  # what BatchSplittingSampler signals: skip the noise and step until the last
        def __init__(self) -> None:
            self.signal_skip_step_calls: list[bool] = []

        def signal_skip_step(self, do_skip: bool = True) -> None:
            self.signal_skip_step_calls.append(do_skip)

    optimizer = Optimizer()
    chunks = list(dp_sgd.physical_batches(indices, 4, optimizer, lengths))  # type: ignore[arg-type]
    assert sorted(i for chunk in chunks for i in chunk) == indices
    padded = sum(len(chunk) * max(lengths[i] for i in chunk) for chunk in chunks)
    unsorted = sum(4 * max(lengths[i] for i in indices[k : k + 4]) for k in (0, 4))
    assert [sorted(lengths[i] for i in chunk) for chunk in chunks] == [[2, 3, 4, 5], [27, 28, 29, 30]]
    assert padded == 4 * 5 + 4 * 30 < unsorted == 4 * 30 + 4 * 28
    assert optimizer.signal_skip_step_calls == [True, False]
    # Unsplit batches keep their order (nothing to pad differently).
    assert list(dp_sgd.physical_batches(indices, None, optimizer, lengths)) == [indices]  # type: ignore[arg-type]
