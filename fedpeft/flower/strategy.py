"""The one Flower Strategy: sampling and messages here, the math in codecs/aggregation.

Why not subclass Flower's FedAvg: its constructor, sampling and reply validation are
built for whole-model arrays; fedpeft sends a codec payload up and needs to decode,
validate and count every message, while the aggregation rule is a plug-in.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import Tensor

from fedpeft.aggregation import AggregationResult, Aggregator, ClientUpdate
from fedpeft.aggregation.base import Accumulator, accumulator_for, check_aggregate
from fedpeft.attacks.capture import CapturePlan
from fedpeft.codecs import CodecContext, UpdateCodec
from fedpeft.codecs.base import check_decoded_delta
from fedpeft.config import ClientPrivacyConfig, FederationConfig
from fedpeft.errors import AggregationError, PayloadError
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
from fedpeft.flower.replies import (
    MAX_CLIENT_ID,
    MAX_COUNT,
    checked_record_to_state,
    clip_text,
    float_metric,
    int_metric,
    optional_float_metric,
    reply_nbytes,
)
from fedpeft.history import ClientRoundRecord
from fedpeft.privacy.central import AdaptiveClipping, NoisyMean, poisson_sample

logger = logging.getLogger("fedpeft")


REJECTION_CHARS = 600
"""The most characters of a rejection reason kept in a log line or metrics.json."""


@dataclass
class RoundTraffic:
    """What one round's training exchange did, for metrics.json.

    Attributes:
        bytes_down_by_node: node id -> bytes sent to it.
        clients: The accepted replies.
        rejected: ``{"node_id", "client_id", "reason"}`` of every rejected reply.
        aggregation: The aggregate, when one was made and accepted.
        refused: Why the round's aggregate was refused (None: it was not).

    """

    bytes_down_by_node: dict[int, int] = field(default_factory=dict)
    clients: list[ClientRoundRecord] = field(default_factory=list)
    rejected: list[dict[str, object]] = field(default_factory=list)
    aggregation: AggregationResult | None = None
    refused: str | None = None


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
        partition_sizes: Examples in each client's partition, when the server made the
            partitions: a client's example count (its FedAvg / Multi-Krum weight) is
            capped at its partition's size, or at the largest partition for an id
            beyond them. ``federation.max_client_examples``, when set, is the cap
            instead. Neither: claims are taken as sent.
        bind_client_ids: Bind the first client id each node sends to that node for the
            run and reject a node that claims another id or another node's id
            (deployment, where Flower's node id is authenticated by the node's key).

    """

    def __init__(
        self,
        federation: FederationConfig,
        codec: UpdateCodec,
        aggregator: Aggregator,
        run_seed: int,
        central_privacy: ClientPrivacyConfig | None = None,
        capture: CapturePlan | None = None,
        partition_sizes: Sequence[int] | None = None,
        bind_client_ids: bool = False,
    ) -> None:
        self.federation = federation
        self.codec = codec
        self.aggregator = aggregator
        self.run_seed = run_seed
        self.central_privacy = central_privacy if central_privacy and central_privacy.enabled else None
        self.adaptive_clipping: AdaptiveClipping | None = None
        """Under ``privacy.client.adaptive_clipping``, the run's moving C (the ServerApp
        sets it, and restores it from a checkpoint); None: C is the config's."""
        self.capture = capture
        self.sampled = 0
        self.run_key = ""
        """The run's id (kept in its checkpoint, the same after a resume); clients key
        the state they keep on disk by it."""
        self.partition_sizes = list(partition_sizes) if partition_sizes is not None else None
        self.bind_client_ids = bind_client_ids
        self.node_clients: dict[int, int] = {}
        """node id -> the client id it is bound to (checkpointed, so a resume keeps it)."""
        self._global: dict[str, Tensor] = {}
        self._warned: set[str] = set()
        self.traffic = RoundTraffic()
        self.expected_clients = 0.0
        """q N of the latest Poisson sampling: the noised mean's fixed denominator."""
        self.releases: list[float] = []
        """The client sample rate of each noised mean released in the current round (one
        per release, for the ledger; empty without user-level DP)."""
        self._releases_round = 0

    @property
    def current_global(self) -> dict[str, Tensor]:
        """The adapter the current round's clients were sent (crafted in malicious rounds)."""
        return self._global

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
        """Decode and check every reply; fold the good ones in as they are decoded; log and skip the rest.

        No reply can end the run: whatever is wrong with one (its size, records,
        arrays, metrics, its decoded delta, or an error no check foresaw) rejects that
        reply alone, naming the node. An aggregate that is not finite is refused and
        the global adapter (and the aggregator's state) stay as they were.

        Streaming: each accepted update goes into the round's accumulator (the
        aggregator's own when it streams, DP-FedAvg's clipped sum under
        user-level DP) as soon as it is decoded, and is dropped; only rules that need
        every update at once (median, trimmed mean, Krum, ``lora_product``) keep them
        all. The replies are folded in the order of the client ids they claim (sorted
        before anything is decoded), so the same seeds give the same global adapter
        bit for bit whatever order the replies arrived in (another order would change
        the sums by float rounding only).
        """
        ordered = sorted(replies, key=_fold_order)
        crafted = self.capture is not None and self.capture.crafts(server_round)
        private = (
            NoisyMean(self.expected_clients, self.central_privacy, self._global, self.adaptive_clipping)
            if self.central_privacy is not None
            else None
        )
        accumulator: Accumulator | None = (
            accumulator_for(self.aggregator, self._global, len(ordered)) if private is None else None
        )
        accepted = 0
        fold_error: Exception | None = None
        for reply in ordered:
            node_id = reply.metadata.src_node_id
            try:
                update, record = self._decode_reply(reply, server_round, node_id)
            except PayloadError as err:
                self.reject(server_round, reply, node_id, str(err))
                continue
            except Exception as err:  # the last line of defence
                # A reply no check foresaw must not end the run (a --resume would only
                # meet it again). The exception type and traceback are logged, so that a
                # bug of fedpeft's own is seen, not mistaken for a client's fault.
                logger.error(
                    "round %d: decoding the reply of node %d raised %s (a check is missing)",
                    server_round,
                    node_id,
                    type(err).__name__,
                    exc_info=True,
                )
                self.reject(server_round, reply, node_id, f"{type(err).__name__} while decoding: {err}")
                continue
            accepted += 1
            self.traffic.clients.append(record)
            if self.capture is not None and self.capture.wants(server_round, update.client_id):
                path = self.capture.save(
                    server_round, update.client_id, self._global, update.delta, update.num_examples
                )
                logger.info(
                    "round %d: captured the update of client %d in %s", server_round, update.client_id, path
                )
            if crafted or fold_error is not None:
                continue
            if private is not None:
                private.add(update)
                continue
            assert accumulator is not None  # set whenever private is not
            try:
                accumulator.add(update)
            except Exception as err:
                # As an aggregator that fails on the whole round: the round is refused
                # (in finish_round) and the aggregator's state is untouched.
                fold_error = err
        if crafted:
            logger.warning(
                "round %d: the server sent a crafted adapter (capture.malicious); the global "
                "adapter stays as it was",
                server_round,
            )
            return None, None
        if private is not None and accepted < self.federation.min_train_clients:
            # Under user-level DP the release must not depend on who took part: the
            # noised mean (over q N) goes out anyway, noise alone if nobody replied.
            logger.warning(
                "round %d: %d usable update(s), fewer than federation.min_train_clients = %d; "
                "under privacy.client the noised mean is released all the same",
                server_round,
                accepted,
                self.federation.min_train_clients,
            )
        elif accepted < self.federation.min_train_clients:
            logger.warning(
                "round %d: %d usable update(s), fewer than federation.min_train_clients = %d; "
                "the global adapter is unchanged",
                server_round,
                accepted,
                self.federation.min_train_clients,
            )
            return None, None
        if private is not None:
            # User-level DP: the aggregator only ever sees the noised mean, divided by the
            # expected cohort q N; each one computed is a release the ledger counts.
            noised, privacy_metrics = private.finish()
            self.releases.append(self.federation.fraction_train)
            return self.step(server_round, [noised], privacy_metrics)
        if fold_error is not None or accumulator is None:
            return self.finish_round(server_round, _raise(fold_error or AggregationError("no round")), {})
        return self.finish_round(server_round, accumulator.finish, {})

    def step(
        self, server_round: int, updates: list[ClientUpdate], extra_metrics: Mapping[str, float]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The aggregator's step from the round's global adapter with ``updates`` (batch).

        Secure aggregation steps with the round's one unmasked mean; see
        :meth:`finish_round` for what is refused.
        """
        return self.finish_round(
            server_round, lambda: self.aggregator.aggregate(self._global, updates), extra_metrics
        )

    def finish_round(
        self,
        server_round: int,
        aggregate: Callable[[], AggregationResult],
        extra_metrics: Mapping[str, float],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Run ``aggregate`` (a batch aggregation or a streamed round's finish) and check it.

        An aggregate that is not finite (or an aggregator that fails) is refused: the
        global adapter and the aggregator's state stay as they were, and the round counts
        as one without a usable update. ``extra_metrics`` join the aggregation's own.
        """
        aggregator_state = copy.deepcopy(self.aggregator.state_dict())
        try:
            result = aggregate()
            check_aggregate(result.state, self._global)
        except Exception as err:
            # Finite deltas can still step to Inf (or break an aggregator's linear
            # algebra); the previous adapter (and optimizer state) is kept, and the
            # round counts as one without a usable update. Anything but the check's own
            # AggregationError is logged with its traceback: a check may be missing.
            self.aggregator.load_state_dict(aggregator_state)
            problem = str(err) if isinstance(err, AggregationError) else f"{type(err).__name__}: {err}"
            self.traffic.refused = f"aggregate refused: {clip_text(problem, REJECTION_CHARS)}"
            logger.error(
                "round %d: %s; the global adapter is unchanged",
                server_round,
                self.traffic.refused,
                exc_info=not isinstance(err, AggregationError),
            )
            return None, None
        for warning in result.warnings:
            if warning not in self._warned:
                self._warned.add(warning)
                logger.warning("round %d: %s", server_round, warning)
        result = AggregationResult(result.state, {**extra_metrics, **result.metrics}, result.warnings)
        self.traffic.aggregation = result
        clients = self.traffic.clients
        values: dict[str, int | float | list[int] | list[float]] = {
            "num-examples": sum(c.num_examples for c in clients)
        }
        train_loss = mean_train_loss(clients)
        if train_loss is not None:
            values["train-loss"] = train_loss
        return state_to_record(result.state), MetricRecord(values)

    def reject(self, server_round: int, reply: Message, node_id: int, reason: str) -> None:
        """Log and record a rejected reply; every client-chosen character is clipped and escaped."""
        client_id = _claimed_client_id(reply)
        reason = clip_text(reason, REJECTION_CHARS)
        sender = f"node {node_id}" + (f" (client {client_id})" if client_id is not None else "")
        logger.warning("round %d: rejected update from %s: %s", server_round, sender, reason)
        self.traffic.rejected.append({"node_id": node_id, "client_id": client_id, "reason": reason})

    def _decode_reply(
        self, reply: Message, server_round: int, node_id: int
    ) -> tuple[ClientUpdate, ClientRoundRecord]:
        """One reply -> its decoded, checked update; PayloadError names what is wrong."""
        record = self.client_record(reply, server_round, node_id)
        payload = checked_record_to_state(reply.content.array_records[UPDATE])
        context = CodecContext(run_seed=self.run_seed, server_round=server_round, client_id=record.client_id)
        delta = self.codec.decode(payload, context, self._global)
        check_decoded_delta(delta, self._global)
        self.bind(node_id, record.client_id)
        update = ClientUpdate(client_id=record.client_id, delta=delta, num_examples=record.num_examples)
        return update, record

    def client_record(
        self, reply: Message, server_round: int, node_id: int, update_record: str = UPDATE
    ) -> ClientRoundRecord:
        """A reply's size, decline and metrics, checked: what the round records of its client.

        Raises:
            PayloadError: Too large, an error or a decline, ``update_record`` or the
                metrics missing, or a metric missing, of the wrong type or out of range.

        """
        # The size first, whatever the reply holds: an error or a decline is as much
        # the client's choice as an update is.
        bytes_up = reply_nbytes(reply)
        if bytes_up > self.federation.max_payload_bytes:
            raise PayloadError(
                f"reply of {bytes_up} bytes exceeds federation.max_payload_bytes = "
                f"{self.federation.max_payload_bytes}"
            )
        if reply.has_error():
            raise PayloadError(f"client failed: {clip_text(reply.error.reason or 'no reason given')}")
        content = reply.content
        if DECLINED in content.config_records:
            reason = content.config_records[DECLINED].get("reason", "no reason given")
            raise PayloadError(f"client declined to train: {clip_text(reason)}")
        if update_record not in content.array_records or TRAIN_METRICS not in content.metric_records:
            raise PayloadError(f"reply lacks the {update_record!r} or {TRAIN_METRICS!r} record")
        metrics = content.metric_records[TRAIN_METRICS]
        client_id = int_metric(metrics, "client-id", 0, MAX_CLIENT_ID)
        # Optional: a DP-SGD client does not send its un-noised training loss.
        train_loss = optional_float_metric(metrics, "train-loss")
        train_seconds = float_metric(metrics, "train-seconds")
        num_examples = self._example_weight(
            client_id, int_metric(metrics, "num-examples", 1, MAX_COUNT), server_round, node_id
        )
        dp: dict[str, float | int] = {}
        if "dp-noise-multiplier" in metrics:
            dp = {
                "dp_noise_multiplier": float_metric(metrics, "dp-noise-multiplier"),
                "dp_sample_rate": float_metric(metrics, "dp-sample-rate"),
                "dp_steps": int_metric(metrics, "dp-steps", 0, MAX_COUNT),
            }
            if "epsilon" in metrics:  # absent when infinite (noise multiplier 0)
                dp["epsilon"] = float_metric(metrics, "epsilon")
            if not 0 < dp["dp_sample_rate"] <= 1 or dp["dp_noise_multiplier"] < 0 or dp.get("epsilon", 0) < 0:
                raise PayloadError(f"DP metrics out of range: {dp}")
        return ClientRoundRecord(
            client_id=client_id,
            bytes_up=bytes_up,
            bytes_down=self.traffic.bytes_down_by_node.get(node_id, 0),
            num_examples=num_examples,
            train_loss=train_loss,
            train_seconds=train_seconds,
            **dp,  # type: ignore[arg-type]
        )

    def _example_weight(self, client_id: int, claimed: int, server_round: int, node_id: int) -> int:
        """A client's example count, capped where the server knows better than the client.

        FedAvg and Multi-Krum weight a client by its count; uncapped, one client
        claiming 10^15 examples would be the global model.
        """
        cap = self.federation.max_client_examples
        source = "federation.max_client_examples"
        if cap is None and self.partition_sizes:
            if client_id < len(self.partition_sizes):
                cap, source = self.partition_sizes[client_id], "its partition's size"
            else:
                cap, source = max(self.partition_sizes), "the largest partition's size"
        if cap is None or claimed <= cap:
            return claimed
        logger.warning(
            "round %d: node %d (client %d) claims %d examples; weighted as %d (%s)",
            server_round,
            node_id,
            client_id,
            claimed,
            cap,
            source,
        )
        return cap

    def bind(self, node_id: int, client_id: int) -> None:
        """Bind ``client_id`` to ``node_id`` for the run, or raise if either is bound elsewhere."""
        if not self.bind_client_ids:
            return
        bound = self.node_clients.get(node_id)
        if bound is not None and bound != client_id:
            raise PayloadError(f"node {node_id} is bound to client {bound} and now claims client {client_id}")
        owner = next((node for node, client in self.node_clients.items() if client == client_id), None)
        if owner is not None and owner != node_id:
            raise PayloadError(f"client {client_id} is bound to node {owner}; node {node_id} claims it")
        self.node_clients[node_id] = client_id

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


def mean_train_loss(clients: Iterable[ClientRoundRecord]) -> float | None:
    """Example-weighted mean training loss over the clients that sent one (None: none did)."""
    reported = [(c.train_loss, c.num_examples) for c in clients if c.train_loss is not None]
    total = sum(n for _, n in reported)
    return sum(loss * n for loss, n in reported) / total if total else None


def _fold_order(reply: Message) -> tuple[int, int]:
    """Where a reply is folded in: by the client id it claims, then its node (no id: last)."""
    client_id = _claimed_client_id(reply)
    return (client_id if client_id is not None else MAX_CLIENT_ID + 1, reply.metadata.src_node_id)


def _raise(error: Exception) -> Callable[[], AggregationResult]:
    """A finish that raises ``error`` (an update the round could not fold in)."""

    def finish() -> AggregationResult:
        raise error

    return finish


def _claimed_client_id(reply: Message) -> int | None:
    """The client id a reply names in its metrics, if it names a valid one (for log lines)."""
    try:
        if reply.has_error() or TRAIN_METRICS not in reply.content.metric_records:
            return None
        return int_metric(reply.content.metric_records[TRAIN_METRICS], "client-id", 0, MAX_CLIENT_ID)
    except Exception:  # only for a log line; the reply is rejected anyway
        return None
