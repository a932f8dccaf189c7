from collections.abc import Mapping, Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fedpeft.aggregation import ClientUpdate, FedAvg, LoraProduct
from fedpeft.aggregation._lora import (
    FactoredProduct,
    factor_averaging_error,
    lora_pairs,
    product_norm,
    refactor_product_rank_r,
    refactor_rank_r,
)

A, B = "q.lora_A.default.weight", "q.lora_B.default.weight"


def test_pairs_follow_peft_names() -> None:
    pairs = lora_pairs([A, B, "head.weight", "v.lora_A.default.weight"])
    assert [(p.a, p.b) for p in pairs] == [(A, B)]


def test_factor_averaging_error_hand_example() -> None:
    zero = {A: torch.zeros(1, 1), B: torch.zeros(1, 1)}
    deltas = [
        {A: torch.tensor([[1.0]]), B: torch.tensor([[2.0]])},
        {A: torch.tensor([[3.0]]), B: torch.tensor([[0.0]])},
    ]
    # mean(B_i A_i) = (2 + 0) / 2 = 1; mean(B) mean(A) = 1 * 2 = 2
    assert factor_averaging_error(zero, deltas, [1.0, 1.0]) == pytest.approx(1.0, rel=1e-14)


def test_fedavg_reports_the_error_per_round() -> None:
    g = torch.Generator().manual_seed(0)
    base = {A: torch.randn(2, 5, generator=g), B: torch.randn(3, 2, generator=g)}
    updates = [
        ClientUpdate(i, {k: torch.randn(v.shape, generator=g) for k, v in base.items()}, 10) for i in range(3)
    ]
    assert FedAvg().aggregate(base, updates).metrics["lora_factor_averaging_error"] > 0.1


def test_ffa_lora_average_is_exact() -> None:
    """A frozen and shared: clients send only B, and mean(B_i) A == mean(B_i A) exactly."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 5, generator=g)
    base = {A: a, B: torch.zeros(3, 2)}
    deltas = [{A: torch.zeros(2, 5), B: torch.randn(3, 2, generator=g)} for _ in range(4)]
    weights = [3.0, 1.0, 7.0, 2.0]
    assert factor_averaging_error(base, deltas, weights) < 1e-12
    result = FedAvg().aggregate(
        base, [ClientUpdate(i, d, int(w)) for i, (d, w) in enumerate(zip(deltas, weights, strict=True))]
    )
    expected = sum(w * (d[B] @ a) for d, w in zip(deltas, weights, strict=True)) / sum(weights)
    torch.testing.assert_close(result.state[B] @ result.state[A], expected, rtol=0, atol=1e-6)


def test_refactor_is_the_best_rank_r_approximation() -> None:
    g = torch.Generator().manual_seed(2)
    product = torch.randn(6, 8, generator=g, dtype=torch.float64)
    b, a, dropped = refactor_rank_r(product, rank=3)
    u, s, vh = torch.linalg.svd(product)
    best = (u[:, :3] * s[:3]) @ vh[:3]
    torch.testing.assert_close(b @ a, best)
    assert abs(dropped - float(torch.linalg.norm(product - best))) < 1e-9


def test_lora_product_averages_products_then_truncates() -> None:
    g = torch.Generator().manual_seed(3)
    base = {A: torch.randn(2, 6, generator=g), B: torch.zeros(4, 2), "head": torch.zeros(3)}
    updates = [
        ClientUpdate(
            i,
            {
                A: 0.1 * torch.randn(2, 6, generator=g),
                B: torch.randn(4, 2, generator=g),
                "head": torch.full((3,), float(i)),
            },
            n,
        )
        for i, n in enumerate([1, 2, 5])
    ]
    result = LoraProduct().aggregate(base, updates)
    weights = torch.tensor([1.0, 2.0, 5.0]) / 8
    mean = sum(
        w * (base[B] + u.delta[B]).double() @ (base[A] + u.delta[A]).double()
        for w, u in zip(weights, updates, strict=True)
    )
    u, s, vh = torch.linalg.svd(mean)
    torch.testing.assert_close(
        (result.state[B] @ result.state[A]).double(), (u[:, :2] * s[:2]) @ vh[:2], rtol=1e-5, atol=1e-5
    )
    assert abs(result.metrics["svd_dropped_norm"] - float(s[2:].pow(2).sum().sqrt())) < 1e-5
    torch.testing.assert_close(result.state["head"], torch.full((3,), (0 * 1 + 1 * 2 + 2 * 5) / 8))


def test_lora_product_is_exact_when_clients_share_a() -> None:
    g = torch.Generator().manual_seed(4)
    a = torch.randn(2, 6, generator=g)
    base = {A: a, B: torch.zeros(4, 2)}
    updates = [
        ClientUpdate(i, {A: torch.zeros(2, 6), B: torch.randn(4, 2, generator=g)}, 1) for i in range(5)
    ]
    result = LoraProduct().aggregate(base, updates)
    assert result.metrics["svd_dropped_norm"] < 1e-6


# --- rank space against the dense formulas ------------------------------------------------


def local_factors(
    base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], a: str, b: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """A client's (B, A) in float64, dense and by hand (absent delta: unchanged)."""
    return (
        base[b].double() + (delta[b].double() if b in delta else 0),
        base[a].double() + (delta[a].double() if a in delta else 0),
    )


def dense_mean_product(
    base: Mapping[str, torch.Tensor],
    deltas: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    a: str,
    b: str,
) -> torch.Tensor:
    """sum_i w_i B_i A_i / sum_i w_i, every product out x in."""
    total = sum(weights)
    mean = torch.zeros(base[b].shape[0], base[a].shape[1], dtype=torch.float64)
    for delta, weight in zip(deltas, weights, strict=True):
        mean += weight / total * torch.matmul(*local_factors(base, delta, a, b))
    return mean


def dense_factor_averaging_error(
    base: Mapping[str, torch.Tensor], deltas: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> float:
    """The diagnostic as first written: every client's d_out x d_in product."""
    total = sum(weights)
    squared = 0.0
    for pair in lora_pairs(list(base)):
        factors = [local_factors(base, d, pair.a, pair.b) for d in deltas]
        mean_b = sum(w / total * f[0] for f, w in zip(factors, weights, strict=True))
        mean_a = sum(w / total * f[1] for f, w in zip(factors, weights, strict=True))
        gap = dense_mean_product(base, deltas, weights, pair.a, pair.b) - mean_b @ mean_a  # type: ignore[operator]
        squared += float((gap**2).sum())
    return squared**0.5


def lora_state(
    g: torch.Generator, shapes: Sequence[tuple[int, int, int]], scale: float = 1.0
) -> dict[str, torch.Tensor]:
    """One LoRA pair per (out, rank, in) plus a head bias, as peft names them."""
    state = {"head.bias": scale * torch.randn(3, generator=g)}
    for i, (out, rank, inner) in enumerate(shapes):
        state[f"l{i}.lora_A.default.weight"] = scale * torch.randn(rank, inner, generator=g)
        state[f"l{i}.lora_B.default.weight"] = scale * torch.randn(out, rank, generator=g)
    return state


# Up to 40 wide and 28 stacked factors: both of product_norm's routes (Grams, one product).
layer_shapes = st.lists(
    st.tuples(st.integers(1, 40), st.integers(1, 4), st.integers(1, 40)), min_size=1, max_size=3
)


@settings(max_examples=60, deadline=None)
@given(
    shapes=layer_shapes,
    weights=st.lists(st.floats(0.01, 100.0), min_size=1, max_size=7),
    seed=st.integers(0, 2**31),
    drop=st.integers(0, 2),
)
def test_factor_averaging_error_equals_the_dense_formula(
    shapes: list[tuple[int, int, int]], weights: list[float], seed: int, drop: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    base = lora_state(g, shapes)
    deltas = [lora_state(g, shapes, scale=0.5) for _ in weights]
    for delta in deltas[:drop]:  # some clients leave a factor unchanged (absent from the delta)
        del delta["l0.lora_A.default.weight"]
    expected = dense_factor_averaging_error(base, deltas, weights)
    assert factor_averaging_error(base, deltas, weights) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_fedavg_metric_equals_the_dense_formula_for_weighted_and_unweighted() -> None:
    g = torch.Generator().manual_seed(5)
    shapes = [(64, 4, 48), (48, 4, 64), (8, 2, 8)]  # Gram route for the first two, a product for the last
    base = lora_state(g, shapes)
    updates = [ClientUpdate(i, lora_state(g, shapes, 0.1), n) for i, n in enumerate([3, 50, 7, 1, 20])]
    deltas = [u.delta for u in updates]
    for weighted, weights in [(True, [3.0, 50.0, 7.0, 1.0, 20.0]), (False, [1.0] * 5)]:
        metric = FedAvg(weighted=weighted).aggregate(base, updates).metrics["lora_factor_averaging_error"]
        assert metric == pytest.approx(dense_factor_averaging_error(base, deltas, weights), rel=1e-9)


def test_factor_averaging_error_does_not_drown_in_large_global_factors() -> None:
    """The gap depends only on the deltas: a global adapter 1e8 times larger leaves it as is.

    The dense formula subtracts two products of the size of the global factors and
    keeps only rounding noise of the small gap between them.
    """
    g = torch.Generator().manual_seed(6)
    shapes = [(6, 2, 5)]
    base = lora_state(g, shapes)
    deltas = [lora_state(g, shapes, scale=1e-3) for _ in range(4)]
    weights = [1.0, 2.0, 3.0, 4.0]
    small = factor_averaging_error(base, deltas, weights)
    large = factor_averaging_error({k: 1e8 * v for k, v in base.items()}, deltas, weights)
    assert small > 0
    assert large == pytest.approx(small, rel=1e-10)


def test_factor_averaging_error_is_accurate_when_the_clients_gaps_cancel() -> None:
    """Three clients whose products nearly cancel: the gap is 1e-6 of the factors.

    B deltas u, -u, 0 and A deltas v, v + eps w, -2v - eps w (both mean zero) leave the
    gap ``-(eps / 3) u w``; squaring magnitudes (Gram matrices alone) would lose it in
    rounding.
    """
    g = torch.Generator().manual_seed(9)
    u = torch.randn(40, 1, generator=g, dtype=torch.float64)
    v = torch.randn(1, 30, generator=g, dtype=torch.float64)
    w = torch.randn(1, 30, generator=g, dtype=torch.float64)
    eps = 1e-6
    a, b = "l0.lora_A.default.weight", "l0.lora_B.default.weight"
    base = {a: torch.zeros(1, 30, dtype=torch.float64), b: torch.zeros(40, 1, dtype=torch.float64)}
    deltas = [{b: u, a: v}, {b: -u, a: v + eps * w}, {b: 0 * u, a: -2 * v - eps * w}]
    expected = eps / 3 * float(torch.linalg.norm(u)) * float(torch.linalg.norm(w))
    assert factor_averaging_error(base, deltas, [1.0, 1.0, 1.0]) == pytest.approx(expected, rel=1e-8)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any torch operation returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.numel = max(self.numel, leaf.numel())
        return out


def test_no_out_x_in_matrix_is_formed() -> None:
    """The hot path stays in rank space: nothing as large as a d_out x d_in product."""
    g = torch.Generator().manual_seed(7)
    shapes = [(96, 2, 80)]
    base = lora_state(g, shapes)
    updates = [ClientUpdate(i, lora_state(g, shapes, 0.1), i + 1) for i in range(3)]
    with LargestTensor() as seen:
        FedAvg().aggregate(base, updates)
        LoraProduct().aggregate(base, updates)
    # the largest legitimate tensors: a factor (96 x 2 or 2 x 80), 3 of them stacked, a Q
    assert seen.numel < 96 * 80 // 4


@settings(max_examples=60, deadline=None)
@given(
    out=st.integers(1, 10),
    inner=st.integers(1, 10),
    stacked=st.integers(1, 14),
    rank=st.integers(1, 10),
    seed=st.integers(0, 2**31),
)
def test_rank_space_refactor_equals_the_dense_svd(
    out: int, inner: int, stacked: int, rank: int, seed: int
) -> None:
    rank = min(rank, out, inner)
    g = torch.Generator().manual_seed(seed)
    product = FactoredProduct(
        left=torch.randn(out, stacked, generator=g, dtype=torch.float64),
        right=torch.randn(stacked, inner, generator=g, dtype=torch.float64),
    )
    dense = product.left @ product.right
    b, a, dropped = refactor_rank_r(dense, rank)
    refactored = refactor_product_rank_r(product, rank)
    assert refactored.b.shape == (out, rank) and refactored.a.shape == (rank, inner)
    scale = float(torch.linalg.matrix_norm(dense))
    torch.testing.assert_close(refactored.b @ refactored.a, b @ a, rtol=0, atol=1e-9 * (1 + scale))
    assert refactored.dropped == pytest.approx(dropped, rel=1e-7, abs=1e-9 * (1 + scale))
    assert product_norm(product) == pytest.approx(scale, rel=1e-12, abs=1e-300)


@pytest.mark.parametrize(("out", "stacked", "inner"), [(50, 4, 40), (50, 30, 40), (3, 40, 2), (1, 1, 1)])
def test_product_norm_equals_the_dense_norm_by_either_route(out: int, stacked: int, inner: int) -> None:
    """Gram matrices while K (out + in) <= out in (first and last), one product beyond."""
    g = torch.Generator().manual_seed(out + stacked + inner)
    product = FactoredProduct(
        left=torch.randn(out, stacked, generator=g, dtype=torch.float64),
        right=torch.randn(stacked, inner, generator=g, dtype=torch.float64),
    )
    dense = float(torch.linalg.matrix_norm(product.left @ product.right))
    assert product_norm(product) == pytest.approx(dense, rel=1e-12)


def test_rank_space_refactor_rejects_a_rank_beyond_the_product() -> None:
    product = FactoredProduct(
        left=torch.ones(3, 2, dtype=torch.float64), right=torch.ones(2, 5, dtype=torch.float64)
    )
    with pytest.raises(ValueError, match=r"rank must be in \[1, 3\] for a 3 x 5 product, got 4"):
        refactor_product_rank_r(product, 4)


@settings(max_examples=40, deadline=None)
@given(
    shapes=layer_shapes,
    counts=st.lists(st.integers(1, 500), min_size=1, max_size=6),
    seed=st.integers(0, 2**31),
)
def test_lora_product_equals_the_dense_product_svd(
    shapes: list[tuple[int, int, int]], counts: list[int], seed: int
) -> None:
    shapes = [(out, min(rank, out, inner), inner) for out, rank, inner in shapes]  # as peft builds them
    g = torch.Generator().manual_seed(seed)
    base = lora_state(g, shapes)
    updates = [ClientUpdate(i, lora_state(g, shapes, 0.5), n) for i, n in enumerate(counts)]
    result = LoraProduct().aggregate(base, updates)
    dropped_squared = 0.0
    for pair in lora_pairs(list(base)):
        mean = dense_mean_product(
            base, [u.delta for u in updates], [float(n) for n in counts], pair.a, pair.b
        )
        b, a, dropped = refactor_rank_r(mean, rank=base[pair.a].shape[0])
        scale = 1 + float(torch.linalg.matrix_norm(mean))
        got = result.state[pair.b].double() @ result.state[pair.a].double()
        torch.testing.assert_close(got, b @ a, rtol=0, atol=1e-5 * scale)
        dropped_squared += dropped**2
    assert result.metrics["svd_dropped_norm"] == pytest.approx(dropped_squared**0.5, rel=1e-5, abs=1e-5)


def test_lora_product_factors_do_not_depend_on_client_order() -> None:
    g = torch.Generator().manual_seed(8)
    shapes = [(10, 3, 7)]
    base = lora_state(g, shapes)
    updates = [ClientUpdate(i, lora_state(g, shapes, 0.5), i + 2) for i in range(5)]
    forward = LoraProduct().aggregate(base, updates).state
    backward = LoraProduct().aggregate(base, updates[::-1]).state
    for name in base:
        torch.testing.assert_close(forward[name], backward[name], rtol=0, atol=1e-6)
