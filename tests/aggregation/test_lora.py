import torch

from fedpeft.aggregation import ClientUpdate, FedAvg, LoraProduct
from fedpeft.aggregation._lora import factor_averaging_error, lora_pairs, refactor_rank_r

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
    assert factor_averaging_error(zero, deltas, [1.0, 1.0]) == 1.0


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
