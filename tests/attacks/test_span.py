import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.attacks.span import distance_to_span, row_span_basis


def test_inputs_of_a_linear_layer_lie_in_its_weight_gradient_span() -> None:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(5, 40, generator=generator, dtype=torch.float64)  # 5 tokens, d = 40
    layer = torch.nn.Linear(40, 12, bias=False).double()
    layer(inputs).pow(2).sum().backward()
    basis = row_span_basis([layer.weight.grad])
    assert basis.shape == (40, 5)
    assert distance_to_span(basis, inputs).max() < 1e-10
    others = torch.randn(100, 40, generator=generator, dtype=torch.float64)
    assert distance_to_span(basis, others).min() > 0.5


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(0, 10_000))
def test_distance_is_in_zero_one_and_zero_on_the_basis(rank: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(rank, 16, generator=generator, dtype=torch.float64)
    basis = row_span_basis([rows])
    distances = distance_to_span(basis, torch.randn(20, 16, generator=generator, dtype=torch.float64))
    assert ((distances >= 0) & (distances <= 1 + 1e-12)).all()
    assert distance_to_span(basis, rows).max() < 1e-10


def test_zero_gradient_has_an_empty_span() -> None:
    basis = row_span_basis([torch.zeros(4, 8)])
    assert basis.shape == (8, 0)
    assert (distance_to_span(basis, torch.randn(3, 8)) == 1).all()
