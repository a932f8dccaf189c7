"""Server optimisers and robust rules give Flower's own strategies' results on the same inputs.

Flower's strategies average full arrays sent by clients; fedpeft's aggregators
average deltas. Client i's arrays are ``global + delta_i``, so both must agree.
"""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import strategy as flower
from flwr.supercore.task_identity import TaskIdentity

from fedpeft.aggregation import AGGREGATORS, ClientUpdate

CASES = {
    "fedavg": (flower.FedAvg, {}, {}),
    "fedavgm": (
        flower.FedAvgM,
        {"server_learning_rate": 0.7, "server_momentum": 0.8},
        {"server_lr": 0.7, "momentum": 0.8},
    ),
    "fedadam": (
        flower.FedAdam,
        {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-2},
        {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-2},
    ),
    "fedyogi": (
        flower.FedYogi,
        {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-2},
        {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-2},
    ),
    # Robust rules on full arrays (global + delta_i) step like fedpeft's on the deltas.
    "median": (flower.FedMedian, {}, {}),
    "trimmed_mean": (flower.FedTrimmedAvg, {"beta": 0.2}, {"beta": 0.2}),
    "krum": (flower.Krum, {"num_malicious_nodes": 1}, {"num_malicious": 1}),
    "multikrum": (
        flower.MultiKrum,
        {"num_malicious_nodes": 1, "num_nodes_to_select": 3},
        {"num_malicious": 1, "num_to_keep": 3},
    ),
}


def reply(arrays: dict[str, np.ndarray], num_examples: int, node: int) -> Message:
    instruction = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": num_examples}),
        }
    )
    return Message(content=content, reply_to=instruction)


@pytest.mark.parametrize("name", list(CASES))
def test_three_rounds_match_flower(name: str) -> None:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    flower_class, flower_options, our_options = CASES[name]
    theirs = flower_class(**flower_options)
    ours = AGGREGATORS.build(name.removeprefix("multi"), our_options, "x")
    rng = np.random.default_rng(0)
    state = {"a": rng.normal(size=(4, 3)), "b": rng.normal(size=5)}
    ours_state = {k: torch.from_numpy(v.copy()) for k, v in state.items()}
    theirs_state = {k: v.copy() for k, v in state.items()}

    class NodeList:  # configure_train only asks the grid for node ids (to sample from)
        def get_node_ids(self) -> list[int]:
            return [1, 2, 3, 4, 5]

    for server_round in (1, 2, 3):
        # Five clients, so that the trimmed mean cuts one per side and Krum has a choice.
        deltas = [{k: rng.normal(scale=0.1, size=v.shape) for k, v in state.items()} for _ in range(5)]
        weights = [5, 17, 2, 9, 11]
        list(
            theirs.configure_train(
                server_round,
                ArrayRecord({k: Array(v) for k, v in theirs_state.items()}),
                ConfigRecord(),
                NodeList(),
            )
        )
        replies = [
            reply({k: theirs_state[k] + d[k] for k in d}, w, i + 1)
            for i, (d, w) in enumerate(zip(deltas, weights, strict=True))
        ]
        arrays, _ = theirs.aggregate_train(server_round, replies)
        theirs_state = {k: a.numpy() for k, a in arrays.items()}
        updates = [
            ClientUpdate(i, {k: torch.from_numpy(v) for k, v in d.items()}, w)
            for i, (d, w) in enumerate(zip(deltas, weights, strict=True))
        ]
        ours_state = ours.aggregate(ours_state, updates).state
        for k in state:
            np.testing.assert_allclose(ours_state[k].numpy(), theirs_state[k], rtol=1e-6, atol=1e-9)
