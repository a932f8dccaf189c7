"""Under DP-SGD nothing un-noised about the examples leaves the client: no training loss."""

from flwr.app import ConfigRecord, Context, RecordDict

from fedpeft.aggregation import AGGREGATORS
from fedpeft.codecs import CODECS
from fedpeft.config import parse_config
from fedpeft.experiment import Experiment
from fedpeft.flower.client_app import build_client_app
from fedpeft.flower.records import TRAIN_METRICS, state_to_record
from fedpeft.flower.strategy import AdapterStrategy
from tests.flower.test_messages import _Grid, server_identity, train_message  # noqa: F401 - autouse fixture

PUBLIC_UNDER_DP = {
    "client-id",
    "num-examples",  # assumed public, as in Opacus and TF Privacy
    "steps",  # train.steps, or epochs / q: the config and num-examples
    "train-seconds",  # no more than the reply's arrival time tells
    "dp-noise-multiplier",
    "dp-sample-rate",
    "dp-steps",
    "epsilon",  # computed from the four above
}


def _reply_metrics(tiny_config_data: dict, dp_sgd: bool) -> tuple[Experiment, object]:
    tiny_config_data["train"] = {"steps": 2, "batch_size": 8}
    if dp_sgd:
        tiny_config_data["privacy"] = {"example": {"enabled": True, "noise_multiplier": 1.0}}
    experiment = Experiment(parse_config(tiny_config_data))
    Experiment._cache[experiment.config.fingerprint()] = experiment
    app = build_client_app(lambda _: experiment.config)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    return experiment, app(train_message(experiment), context)


def test_a_dp_sgd_client_sends_no_training_loss_and_the_server_accepts_it(tiny_config_data: dict) -> None:
    experiment, reply = _reply_metrics(tiny_config_data, dp_sgd=True)
    metrics = reply.content.metric_records[TRAIN_METRICS]
    assert "train-loss" not in metrics
    assert set(metrics) <= PUBLIC_UNDER_DP
    strategy = AdapterStrategy(
        experiment.config.federation, CODECS.build("dense", {}, ""), AGGREGATORS.build("fedavg", {}, ""), 0
    )
    strategy.configure_train(
        1,
        state_to_record(experiment.initial_state),
        ConfigRecord(),
        _Grid(experiment.config.partition.num_clients),
    )
    strategy.aggregate_train(1, [reply])
    assert not strategy.traffic.rejected
    assert [c.train_loss for c in strategy.traffic.clients] == [None]


def test_without_dp_sgd_the_training_loss_is_still_reported(tiny_config_data: dict) -> None:
    _, reply = _reply_metrics(tiny_config_data, dp_sgd=False)
    assert reply.content.metric_records[TRAIN_METRICS]["train-loss"] > 0
