"""The one Flower Strategy: sampling and messages here, the math in codecs/aggregation.

Why not subclass Flower's FedAvg: its constructor, sampling and reply validation are
built for whole-model arrays; fedpeft sends a codec payload up and needs to decode,
validate and count every message, while the aggregation rule is a plug-in.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import Tensor

from fedpeft.aggregation import AggregationResult, Aggregator, ClientUpdate
from fedpeft.attacks.capture import CapturePlan
from fedpeft.codecs import CodecContext, UpdateCodec
from fedpeft.config import ClientPrivacyConfig, FederationConfig
from fedpeft.errors import PayloadError
from fedpeft.flower.records import (
    DECLINED,
    GLOBAL_ADAPTER,
    ROUND_CONFIG,
    TRAIN_METRICS,
    UPDATE,
    content_nbytes,
    record_to_state,
    state_to_record,
)
from fedpeft.history import ClientRoundRecord
from fedpeft.privacy.central import noisy_mean, poisson_sample

logger = logging.getLogger("fedpeft")


@dataclass
class RoundTraffic:
    """What one round's training exchange did, for metrics.json."""

    bytes_down_by_node: dict[int, int] = field(default_factory=dict)
    clients: list[ClientRoundRecord] = field(default_factory=list)
    rejected: list[dict[str, object]] = field(default_factory=list)
    aggregation: AggregationResult | None = None


class AdapterStrategy(Strategy):
    """Samples clients, sends the global adapter, decodes and aggregates their deltas.

    Args:
        federation: Sampling, limits and timeouts.
        codec: Decodes each client's payload.
        aggregator: Combines decoded deltas into the next global state.
        run_seed: Seeds client sampling and the codecs' shared randomness.
        central_privacy: User-level DP (DP-FedAvg): clip, average equally, add noise
            before the aggregator steps. None or disabled: off.
        capture: Client updates to save for the attack suite (and whether to craft
            what is sent in those rounds). None: nothing is saved.

    """

    def __init__(
        self,
        federation: FederationConfig,
        codec: UpdateCodec,
        aggregator: Aggregator,
        run_seed: int,
        central_privacy: ClientPrivacyConfig | None = None,
        capture: CapturePlan | None = None,
    ) -> None:
        self.federation = federation
        self.codec = codec
        self.aggregator = aggregator
        self.run_seed = run_seed
        self.central_privacy = central_privacy if central_privacy and central_privacy.enabled else None
        self.capture = capture
        self.sampled = 0
        self.run_key = ""
        """The run's id (kept in its checkpoint, the same after a resume); clients key
        the state they keep on disk by it."""
        self._global: dict[str, Tensor] = {}
        self.traffic = RoundTraffic()
        self.expected_clients = 0.0
        """q N of the latest Poisson sampling: the noised mean's fixed denominator."""
        self.releases: list[float] = []
        """The client sample rate of each noised mean released in the current round (one
        per release, for the ledger; empty without user-level DP)."""
        self._releases_round = 0

    def sample_nodes(self, server_round: int, grid: Grid) -> list[int]:
        """Wait for enough connected nodes, then draw the round's cohort.

        Under user-level DP (``privacy.client``) each connected node is drawn
        independently with probability q = ``federation.fraction_train`` from OS
        randomness (Poisson sampling, what the ledger's amplification assumes; see
        :mod:`fedpeft.privacy.central`), and the server waits until the expected cohort
        q N reaches ``min_train_clients``. Otherwise a fixed-size sample seeded from the
        run seed (reproducible runs; no amplification is credited for it).
        """
        federation = self.federation
        needed = federation.min_available_clients
        if self.central_privacy is not None:
            needed = max(needed, math.ceil(federation.min_train_clients / federation.fraction_train - 1e-9))
        deadline = time.monotonic() + federation.round_timeout
        while len(nodes := sorted(grid.get_node_ids())) < needed:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(nodes)} client(s) connected, {needed} needed: "
                    f"federation.min_available_clients = {federation.min_available_clients}"
                    + (
                        f", and under privacy.client the expected cohort federation.fraction_train "
                        f"x clients must reach federation.min_train_clients = {federation.min_train_clients}"
                        if self.central_privacy is not None
                        else ""
                    )
                )
            time.sleep(1.0)
        if server_round != self._releases_round:
            self.releases, self._releases_round = [], server_round
        if self.central_privacy is not None:
            self.expected_clients = federation.fraction_train * len(nodes)
            return poisson_sample(nodes, federation.fraction_train)
        rng = random.Random(self.run_seed * 7_919 + server_round)
        return sorted(rng.sample(nodes, federation.clients_per_round(len(nodes))))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One TRAIN message per sampled node carrying the global adapter."""
        self._global = record_to_state(arrays)
        if self.capture is not None and self.capture.crafts(server_round):
            # A malicious server: every sampled client gets the crafted adapter, and
            # decodes and captures are relative to it.
            self._global = self.capture.craft(self._global, self.run_seed * 7_919 + server_round)
            arrays = state_to_record(self._global)
        self.traffic = RoundTraffic()
        round_config = ConfigRecord({**config, "server-round": server_round, "run-key": self.run_key})
        messages = []
        nodes = self.sample_nodes(server_round, grid)
        self.sampled = len(nodes)
        for node_id in nodes:
            content = RecordDict({GLOBAL_ADAPTER: arrays, ROUND_CONFIG: round_config})
            self.traffic.bytes_down_by_node[node_id] = content_nbytes(content)
            messages.append(
                Message(
                    content=content,
                    dst_node_id=node_id,
                    message_type=MessageType.TRAIN,
                    group_id=str(server_round),
                )
            )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode and check every reply; aggregate the good ones; log and skip the rest."""
        updates: list[ClientUpdate] = []
        losses: list[tuple[float, int]] = []
        for reply in replies:
            node_id = reply.metadata.src_node_id
            try:
                update, record = self._decode_reply(reply, server_round, node_id)
            except PayloadError as err:
                client_id = _claimed_client_id(reply)
                sender = f"node {node_id}" + (f" (client {client_id})" if client_id is not None else "")
                logger.warning("round %d: rejected update from %s: %s", server_round, sender, err)
                self.traffic.rejected.append({"node_id": node_id, "client_id": client_id, "reason": str(err)})
                continue
            updates.append(update)
            losses.append((record.train_loss, update.num_examples))
            self.traffic.clients.append(record)
            if self.capture is not None and self.capture.wants(server_round, update.client_id):
                path = self.capture.save(
                    server_round, update.client_id, self._global, update.delta, update.num_examples
                )
                logger.info(
                    "round %d: captured the update of client %d in %s", server_round, update.client_id, path
                )
        if self.capture is not None and self.capture.crafts(server_round):
            logger.warning(
                "round %d: the server sent a crafted adapter (capture.malicious); the global "
                "adapter stays as it was",
                server_round,
            )
            return None, None
        if self.central_privacy is not None and len(updates) < self.federation.min_train_clients:
            # Under user-level DP the release must not depend on who took part: the
            # noised mean (over q N) goes out anyway, noise alone if nobody replied.
            logger.warning(
                "round %d: %d usable update(s), fewer than federation.min_train_clients = %d; "
                "under privacy.client the noised mean is released all the same",
                server_round,
                len(updates),
                self.federation.min_train_clients,
            )
        elif len(updates) < self.federation.min_train_clients:
            logger.warning(
                "round %d: %d usable update(s), fewer than federation.min_train_clients = %d; "
                "the global adapter is unchanged",
                server_round,
                len(updates),
                self.federation.min_train_clients,
            )
            return None, None
        # A fixed order, whatever order the replies arrived in: float sums then give the
        # same global adapter bit for bit on every run with the same seeds.
        updates.sort(key=lambda u: u.client_id)
        privacy_metrics: dict[str, float] = {}
        if self.central_privacy is not None:
            # User-level DP: the aggregator only ever sees the noised mean, divided by the
            # expected cohort q N; each one computed is a release the ledger counts.
            noised, privacy_metrics = noisy_mean(
                updates, self.expected_clients, self.central_privacy, like=self._global
            )
            self.releases.append(self.federation.fraction_train)
            updates = [noised]
        result = self.aggregator.aggregate(self._global, updates)
        result = AggregationResult(result.state, {**privacy_metrics, **result.metrics})
        self.traffic.aggregation = result
        total = sum(n for _, n in losses)
        metrics = MetricRecord(
            {"train-loss": sum(loss * n for loss, n in losses) / max(total, 1), "num-examples": total}
        )
        return state_to_record(result.state), metrics

    def _decode_reply(
        self, reply: Message, server_round: int, node_id: int
    ) -> tuple[ClientUpdate, ClientRoundRecord]:
        if reply.has_error():
            raise PayloadError(f"client failed: {reply.error.reason}")
        content = reply.content
        if DECLINED in content.config_records:
            reason = content.config_records[DECLINED].get("reason", "no reason given")
            text = reason.decode(errors="replace") if isinstance(reason, bytes) else str(reason)
            raise PayloadError(f"client declined to train: {text}")
        if UPDATE not in content.array_records or TRAIN_METRICS not in content.metric_records:
            raise PayloadError(f"reply lacks the {UPDATE!r} or {TRAIN_METRICS!r} record")
        bytes_up = content_nbytes(content)
        if bytes_up > self.federation.max_payload_bytes:
            raise PayloadError(
                f"reply of {bytes_up} bytes exceeds federation.max_payload_bytes = "
                f"{self.federation.max_payload_bytes}"
            )
        metrics = content.metric_records[TRAIN_METRICS]
        client_id = _int_metric(metrics, "client-id")
        train_loss = _float_metric(metrics, "train-loss")
        train_seconds = _float_metric(metrics, "train-seconds")
        num_examples = _int_metric(metrics, "num-examples")
        if num_examples <= 0:
            raise PayloadError(f"num-examples must be positive, got {num_examples}")
        context = CodecContext(run_seed=self.run_seed, server_round=server_round, client_id=client_id)
        delta = self.codec.decode(record_to_state(content.array_records[UPDATE]), context, self._global)
        dp: dict[str, float | int] = {}
        if "dp-noise-multiplier" in metrics:
            dp = {
                "dp_noise_multiplier": _float_metric(metrics, "dp-noise-multiplier"),
                "dp_sample_rate": _float_metric(metrics, "dp-sample-rate"),
                "dp_steps": _int_metric(metrics, "dp-steps"),
            }
            if "epsilon" in metrics:  # absent when infinite (noise multiplier 0)
                dp["epsilon"] = _float_metric(metrics, "epsilon")
            if not 0 < dp["dp_sample_rate"] <= 1 or dp["dp_noise_multiplier"] < 0 or dp["dp_steps"] < 0:
                raise PayloadError(f"DP metrics out of range: {dp}")
        record = ClientRoundRecord(
            client_id=client_id,
            bytes_up=bytes_up,
            bytes_down=self.traffic.bytes_down_by_node.get(node_id, 0),
            num_examples=num_examples,
            train_loss=train_loss,
            train_seconds=train_seconds,
            **dp,  # type: ignore[arg-type]
        )
        return ClientUpdate(client_id=client_id, delta=delta, num_examples=num_examples), record

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No federated evaluation: the server evaluates the global adapter centrally."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Nothing to aggregate (see :meth:`configure_evaluate`)."""
        return None

    def summary(self) -> None:
        """Log the update path and sampling settings."""
        logger.info(
            "AdapterStrategy: codec=%s aggregator=%s fraction_train=%s min_train_clients=%d",
            type(self.codec).__name__,
            type(self.aggregator).__name__,
            self.federation.fraction_train,
            self.federation.min_train_clients,
        )


def _claimed_client_id(reply: Message) -> int | None:
    """The client id a reply names in its metrics, if it names one (for log lines)."""
    if reply.has_error() or TRAIN_METRICS not in reply.content.metric_records:
        return None
    try:
        return _int_metric(reply.content.metric_records[TRAIN_METRICS], "client-id")
    except PayloadError:
        return None


def _int_metric(metrics: Mapping[str, object], key: str) -> int:
    value = metrics.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != int(value):
        raise PayloadError(f"metric {key!r} missing or not an integer: {value!r}")
    return int(value)


def _float_metric(metrics: Mapping[str, object], key: str) -> float:
    value = metrics.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise PayloadError(f"metric {key!r} missing or not a finite number: {value!r}")
    return float(value)
