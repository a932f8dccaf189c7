import torch

from fedpeft.aggregation import ClientUpdate, FedAvg


def test_matches_hand_computation() -> None:
    base = {"w": torch.tensor([1.0, 1.0])}
    ups = [
        ClientUpdate(0, {"w": torch.tensor([1.0, 0.0])}, num_examples=1),
        ClientUpdate(1, {"w": torch.tensor([0.0, 2.0])}, num_examples=3),
    ]
    # mean delta = (1*[1,0] + 3*[0,2]) / 4 = [0.25, 1.5]
    torch.testing.assert_close(FedAvg().aggregate(base, ups).state["w"], torch.tensor([1.25, 2.5]))
    # unweighted: [0.5, 1.0]; server_lr 2 doubles the step
    torch.testing.assert_close(
        FedAvg(weighted=False).aggregate(base, ups).state["w"], torch.tensor([1.5, 2.0])
    )
    torch.testing.assert_close(
        FedAvg(server_lr=2.0).aggregate(base, ups).state["w"], torch.tensor([1.5, 4.0])
    )


def test_global_state_is_not_modified_in_place() -> None:
    base = {"w": torch.tensor([1.0])}
    FedAvg().aggregate(base, [ClientUpdate(0, {"w": torch.tensor([5.0])}, 1)])
    assert base["w"].item() == 1.0
