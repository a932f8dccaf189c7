"""Secure aggregation on the server: one fedpeft round run through Flower's SecAgg+.

Flower implements SecAgg+ (Bell et al., 2020) as ``SecAggPlusWorkflow``, a workflow of
its legacy ServerApp API: it asks a legacy ``Strategy`` for the round's fit
instructions and hands it the unmasked aggregate. fedpeft's ServerApp runs its own
round loop on the Message API, so this module bridges the two for one round, and
writes no cryptography of its own:

* a legacy strategy (:class:`_RoundCohort`) that names the nodes
  :class:`~fedpeft.flower.strategy.AdapterStrategy` sampled and keeps the aggregate
  Flower computes;
* a :class:`ProtocolGrid` between the workflow and the real grid that puts fedpeft's
  own records (the global adapter, the round config) into the stage that trains,
  counts every byte of all four stages per node, and checks every reply before the
  workflow touches it: a reply that is too large or malformed becomes an error reply,
  which SecAgg+ treats as a dropped client (its masks are rebuilt from the others'
  shares), so one misbehaving client never ends the round or the run.

What the server then holds is the (weighted) mean of the round's payloads: it decodes
it once with the round-wide randomness (only codecs whose ``summable`` is true are
allowed, checked at start) and steps the aggregator with it as the round's one
update. Under ``privacy.client`` the clients clip their payloads and add integer
Skellam noise shares (:mod:`fedpeft.privacy.distributed`), so the sum the server
unmasks is already noised; each unmasked sum is one ledger event, accounted with the
noise of the clients it actually holds.

Flower's SecAgg+ assumes honest-but-curious parties: it hides each update from the
server, but it does not check what a client masks. A client can still send any
values, so secure aggregation gives no protection against poisoning; the robust
aggregators, which need individual updates, are refused with it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarray_to_bytes,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid
from torch import Tensor

from fedpeft.aggregation import ClientUpdate
from fedpeft.codecs import CodecContext, UpdateCodec
from fedpeft.codecs.base import check_decoded_delta
from fedpeft.config import Config
from fedpeft.errors import PayloadError
from fedpeft.flower.grid_delegate import DelegatingGrid
from fedpeft.flower.payload_layout import PayloadLayout
from fedpeft.flower.records import GLOBAL_ADAPTER, ROUND_CONFIG, content_nbytes
from fedpeft.flower.replies import clip_text, npy_to_array, reply_nbytes
from fedpeft.flower.strategy import AdapterStrategy
from fedpeft.history import ClientRoundRecord
from fedpeft.privacy.distributed import SkellamShare, clamp_probability
from fedpeft.privacy.ledger import DpEvent, skellam_event

logger = logging.getLogger("fedpeft")

MODULUS = 2**32
"""Flower's SecAgg+ modulus: masked vectors are uint32 sums."""
FIT_RESULT = "fitres.parameters"
"""The record Flower's client mod empties once it has masked the update in it."""
MAX_RESTARTS = 3
"""How often one round's protocol starts again without clients lost before training."""
MAX_KEY_BYTES = 4096
"""The most bytes of one public key, ciphertext or secret share a reply may carry."""


def payload_layout(
    codec: UpdateCodec, global_state: Mapping[str, Tensor], context: CodecContext
) -> PayloadLayout:
    """The layout of the payload ``codec`` makes of a delta shaped like ``global_state``."""
    zeros = {name: torch.zeros_like(tensor) for name, tensor in global_state.items()}
    return PayloadLayout.of(codec.encode(zeros, context, {}))


class LostBeforeTraining(Exception):
    """Clients that left a SecAgg+ round before sharing their keys (``nodes``)."""

    def __init__(self, nodes: set[int]) -> None:
        super().__init__(f"nodes {sorted(nodes)} left before sharing their keys")
        self.nodes = nodes


@dataclass(frozen=True)
class ProtocolSettings:
    """What one SecAgg+ round runs with, from ``federation.secure_aggregation``."""

    num_shares: int | float
    reconstruction_threshold: int | float
    clipping_range: float
    quantization_range: int
    max_weight: float
    timeout: float

    @classmethod
    def of(cls, config: Config, partition_sizes: Sequence[int]) -> ProtocolSettings:
        """The settings of ``config``'s runs (``partition_sizes``: the server's partitions)."""
        secure = config.federation.secure_aggregation
        central = config.privacy.client
        if central.enabled:
            max_weight = 1.0  # every client counts once: the noise is calibrated to one
        else:
            cap = config.federation.max_client_examples
            max_weight = float(cap if cap is not None else max(partition_sizes, default=1))
        return cls(
            num_shares=secure.num_shares,
            reconstruction_threshold=secure.reconstruction_threshold,
            clipping_range=secure.range_for(central),
            quantization_range=2 ** secure.bits_for(config.partition.num_clients),
            max_weight=max_weight,
            timeout=config.federation.round_timeout,
        )

    @property
    def scale(self) -> float:
        """Integer grid steps per payload unit: ``levels / (2 R)``."""
        return self.quantization_range / (2 * self.clipping_range)

    def noise(self, config: Config, dim: int) -> SkellamShare | None:
        """The clients' Skellam mechanism for a payload of ``dim`` coordinates (None: no DP)."""
        central = config.privacy.client
        if not central.enabled:
            return None
        return SkellamShare(central.clipping_norm, central.noise_multiplier, self.scale, dim)

    def clamp_bound(self, config: Config, dim: int) -> float:
        """The most probability, over any cohort of the run, that a round clamps a noise share.

        Charged to delta for every unmasked sum (see
        :func:`fedpeft.privacy.distributed.delta_with_clamps`); 0 without DP.
        """
        noise = self.noise(config, dim)
        if noise is None:
            return 0.0
        cohorts = range(2, max(config.partition.num_clients, 2) + 1)
        return max(clamp_probability(noise, cohort, self.clipping_range) for cohort in cohorts)

    def workflow(self) -> SecAggPlusWorkflow:
        """Flower's workflow for one round."""
        return SecAggPlusWorkflow(
            num_shares=self.num_shares,
            reconstruction_threshold=self.reconstruction_threshold,
            max_weight=self.max_weight,
            clipping_range=self.clipping_range,
            quantization_range=self.quantization_range,
            modulus_range=MODULUS,
            timeout=self.timeout,
        )


class _RoundCohort(LegacyStrategy):
    """The legacy strategy SecAgg+ talks to: the round's cohort in, the aggregate out."""

    def __init__(self, node_ids: Sequence[int], grid: Grid, run_id: int) -> None:
        self.proxies = [GridClientProxy(node_id, grid, run_id) for node_id in node_ids]
        self.aggregate: list[np.ndarray] | None = None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Every sampled node; what it trains from travels in fedpeft's own records."""
        return [(proxy, FitIns(Parameters(tensors=[], tensor_type=""), {})) for proxy in self.proxies]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Keep the unmasked aggregate (every result carries the same one)."""
        if results:
            self.aggregate = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Unused: fedpeft keeps the global adapter itself."""
        return None

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """No federated evaluation."""
        return []

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """No federated evaluation."""
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        """The server evaluates centrally, outside this round."""
        return None


@dataclass
class ProtocolGrid(DelegatingGrid):
    """The grid SecAgg+ sends through: fedpeft's records in, bytes counted, replies checked.

    Args:
        grid: The real grid.
        strategy: Checks the training stage's metrics (and binds client ids).
        server_round: The round.
        contents: node id -> fedpeft's message for it (global adapter, round config).
        layout: The payload layout every masked vector must have.

    """

    grid: Grid
    strategy: AdapterStrategy
    server_round: int
    contents: Mapping[int, RecordDict]
    layout: PayloadLayout
    bytes_down: dict[int, int] = field(default_factory=dict)
    bytes_up: dict[int, int] = field(default_factory=dict)
    records: dict[int, ClientRoundRecord] = field(default_factory=dict)
    stages: list[str] = field(default_factory=list)
    cohort: set[int] = field(default_factory=set)
    """The nodes of the protocol's current run (every node a share may belong to)."""

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Forward one stage's messages; return its replies, bad ones as error replies."""
        outgoing = list(messages)
        stage = str(outgoing[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]) if outgoing else ""
        self.stages.append(stage)
        for message in outgoing:
            node_id = message.metadata.dst_node_id
            if stage == Stage.COLLECT_MASKED_VECTORS:
                ours = self.contents[node_id]
                message.content.array_records[GLOBAL_ADAPTER] = ours.array_records[GLOBAL_ADAPTER]
                message.content.config_records[ROUND_CONFIG] = ours.config_records[ROUND_CONFIG]
            self.bytes_down[node_id] = self.bytes_down.get(node_id, 0) + content_nbytes(message.content)
        by_node = {m.metadata.dst_node_id: m for m in outgoing}
        replies = []
        for reply in self.grid.send_and_receive(outgoing, timeout=timeout):
            node_id = reply.metadata.src_node_id
            try:
                size = reply_nbytes(reply)
                self.bytes_up[node_id] = self.bytes_up.get(node_id, 0) + size
                if size > self.strategy.federation.max_payload_bytes:
                    raise PayloadError(
                        f"reply of {size} bytes exceeds federation.max_payload_bytes = "
                        f"{self.strategy.federation.max_payload_bytes}"
                    )
                if not reply.has_error():
                    self._check(stage, reply, node_id, self.cohort)
            except Exception as err:
                if not isinstance(err, PayloadError):
                    logger.error(
                        "round %d: checking node %d raised", self.server_round, node_id, exc_info=True
                    )
                reason = f"secure aggregation, stage {stage}: {clip_text(err)}"
                self.strategy.reject(self.server_round, reply, node_id, reason)
                reply = Message(Error(code=0, reason=reason), reply_to=by_node[node_id])
            else:
                if reply.has_error():
                    reason = (
                        f"secure aggregation, stage {stage}: client failed: {clip_text(reply.error.reason)}"
                    )
                    self.strategy.reject(self.server_round, reply, node_id, reason)
            replies.append(reply)
        if stage in (Stage.SETUP, Stage.SHARE_KEYS):
            answered = {r.metadata.src_node_id for r in replies if not r.has_error()}
            if lost := set(by_node) - answered:
                raise LostBeforeTraining(lost)
        return replies

    def _check(self, stage: str, reply: Message, node_id: int, cohort: set[int]) -> None:
        """Raise PayloadError unless ``reply`` holds what SecAgg+ expects at ``stage``."""
        configs = reply.content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is None:
            raise PayloadError(f"reply lacks the {RECORD_KEY_CONFIGS!r} record")
        if stage == Stage.SETUP:
            for key in (Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2):
                _check_bytes(configs.get(key), key)
        elif stage == Stage.SHARE_KEYS:
            destinations = _int_list(configs.get(Key.DESTINATION_LIST), Key.DESTINATION_LIST)
            ciphertexts = configs.get(Key.CIPHERTEXT_LIST)
            if not isinstance(ciphertexts, list) or len(ciphertexts) != len(destinations):
                raise PayloadError("ciphertexts do not match the destinations")
            for ciphertext in ciphertexts:
                _check_bytes(ciphertext, Key.CIPHERTEXT_LIST)
            if not set(destinations) <= cohort:
                raise PayloadError("shares addressed to nodes outside the round")
        elif stage == Stage.COLLECT_MASKED_VECTORS:
            record = self.strategy.client_record(reply, self.server_round, node_id, FIT_RESULT)
            configs[Key.MASKED_PARAMETERS] = self._unpack_masked(configs.get(Key.MASKED_PARAMETERS))
            self.strategy.bind(node_id, record.client_id)
            self.records[node_id] = record
        elif stage == Stage.UNMASK:
            owners = _int_list(configs.get(Key.NODE_ID_LIST), Key.NODE_ID_LIST)
            shares = configs.get(Key.SHARE_LIST)
            if not isinstance(shares, list) or len(shares) != len(owners):
                raise PayloadError("shares do not match their owners")
            for share in shares:
                _check_bytes(share, Key.SHARE_LIST)
            if not set(owners) <= cohort:
                raise PayloadError("shares of nodes outside the round")

    def _unpack_masked(self, masked: object) -> list[bytes]:
        """The masked vector, checked, as the int64 arrays Flower's workflow sums.

        It travels as uint32 (:func:`fedpeft.flower.secure_client.pack_masked_vector`):
        the weight factor, then one array per payload tensor in layout order.
        """
        expected = [(1,), *(shape for _, shape in self.layout.shapes)]
        if not isinstance(masked, list) or len(masked) != len(expected):
            raise PayloadError(f"masked vector: expected {len(expected)} arrays")
        unpacked = []
        for index, (data, shape) in enumerate(zip(masked, expected, strict=True)):
            array = npy_to_array(f"masked array {index}", data)
            if array.dtype != np.uint32 or array.shape != shape:
                raise PayloadError(
                    f"masked array {index}: {array.dtype} {array.shape}, expected uint32 {shape}"
                )
            unpacked.append(ndarray_to_bytes(array.astype(np.int64)))
        return unpacked


def _check_bytes(value: object, key: str) -> None:
    if not isinstance(value, bytes) or len(value) > MAX_KEY_BYTES:
        raise PayloadError(f"{key}: expected at most {MAX_KEY_BYTES} bytes")


def _int_list(value: object, key: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise PayloadError(f"{key}: expected a list of node ids")
    return cast(list[int], value)


@dataclass
class SecureRound:
    """What one secure round produced, beyond the strategy's traffic.

    Attributes:
        cohort: Nodes sampled (the protocol's sample number).
        survivors: Clients whose masked vectors are in the unmasked sum.
        event: The ledger event of the unmasked sum under ``privacy.client`` (None:
            no DP, or nothing was unmasked).
        failure: Why no sum was unmasked (None: one was).

    """

    cohort: int = 0
    survivors: int = 0
    event: DpEvent | None = None
    failure: str | None = None


def secure_train_round(
    grid: Grid,
    strategy: AdapterStrategy,
    config: Config,
    server_round: int,
    arrays: ArrayRecord,
    settings: ProtocolSettings,
) -> tuple[ArrayRecord | None, SecureRound]:
    """One round's training exchange under SecAgg+; the next global adapter or None.

    ``strategy.traffic`` records the round as a plain round does (the survivors as its
    clients, every rejected or failed reply, bytes of all four stages).
    """
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
    global_state = strategy.current_global
    context = CodecContext(strategy.run_seed, server_round, 0).round_wide()
    layout = payload_layout(strategy.codec, global_state, context)
    noise = settings.noise(config, layout.size)
    nodes = [m.metadata.dst_node_id for m in messages]
    protocol = ProtocolGrid(
        grid, strategy, server_round, {m.metadata.dst_node_id: m.content for m in messages}, layout
    )
    run_id = grid.run.run_id
    outcome = SecureRound()
    cohort = _RoundCohort([], grid, run_id)
    # Flower's SecAgg+ survives a client lost once it has shared its keys, not before:
    # the unmask stage would ask its neighbours for shares they never got. Nobody has
    # trained yet at that point, so the protocol starts again without it.
    for attempt in range(MAX_RESTARTS + 1):
        outcome = SecureRound(cohort=len(nodes))
        if len(nodes) < 2:
            outcome.failure = f"{len(nodes)} client(s) left in the round; secure aggregation needs at least 2"
            break
        cohort = _RoundCohort(nodes, grid, run_id)
        legacy = LegacyContext(
            Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}),
            strategy=cohort,
            client_manager=SimpleClientManager(),
        )
        legacy.state.config_records["config"] = ConfigRecord({"current_round": server_round})
        legacy.state.array_records["parameters"] = ArrayRecord()
        protocol.cohort = set(nodes)
        try:
            settings.workflow()(protocol, legacy)
        except LostBeforeTraining as lost:
            nodes = [node for node in nodes if node not in lost.nodes]
            if attempt == MAX_RESTARTS:
                outcome.failure = (
                    f"secure aggregation started {attempt + 1} times; clients kept leaving before "
                    "sharing their keys"
                )
                break
            logger.warning(
                "round %d: %d client(s) lost before sharing their keys; secure aggregation starts "
                "again with the other %d (%d/%d)",
                server_round,
                len(lost.nodes),
                len(nodes),
                attempt + 1,
                MAX_RESTARTS,
            )
            continue
        except Exception as err:  # Flower's workflow: a failed round, never a failed run
            logger.error("round %d: secure aggregation failed", server_round, exc_info=True)
            outcome.failure = f"secure aggregation failed: {type(err).__name__}: {clip_text(err)}"
        break
    traffic = strategy.traffic
    traffic.bytes_down_by_node = dict(protocol.bytes_down)
    # Every client whose masked vector was accepted trained (and spent any DP-SGD budget),
    # and its vector is in the sum if one is unmasked.
    for node_id, record in sorted(protocol.records.items()):
        traffic.clients.append(
            replace(
                record,
                bytes_up=protocol.bytes_up.get(node_id, 0),
                bytes_down=protocol.bytes_down.get(node_id, 0),
            )
        )
    outcome.survivors = len(protocol.records)
    if cohort.aggregate is None:
        outcome.failure = outcome.failure or (
            f"secure aggregation halted after stage {protocol.stages[-1] if protocol.stages else 'none'}: "
            "too few clients kept enough live neighbours (reconstruction_threshold)"
        )
        traffic.refused = outcome.failure
        logger.error("round %d: %s", server_round, outcome.failure)
        return None, outcome
    if noise is not None:
        outcome.event = skellam_event(server_round, noise, outcome.cohort, outcome.survivors)
    try:
        mean_payload = layout.to_payload(cohort.aggregate)
        mean_delta = strategy.codec.decode(mean_payload, context, global_state)
        check_decoded_delta(mean_delta, global_state)
    except PayloadError as err:
        traffic.refused = f"aggregate refused: {clip_text(err)}"
        logger.error("round %d: %s; the global adapter is unchanged", server_round, traffic.refused)
        return None, outcome
    weight = sum(record.num_examples for record in traffic.clients) or 1
    if strategy.capture is not None and server_round in strategy.capture.rounds:
        # What the server sees: the round's mean and how many updates it holds. The mean
        # times their number is their sum (under DP and with equal example counts, where
        # every weight is the same; otherwise the example-weighted sum over the mean weight).
        total = {name: t * outcome.survivors for name, t in mean_delta.items()}
        path = strategy.capture.save_sum(server_round, global_state, total, outcome.survivors)
        logger.info("round %d: captured the sum of %d updates in %s", server_round, outcome.survivors, path)
    if strategy.capture is not None and strategy.capture.crafts(server_round):
        logger.warning(
            "round %d: the server sent a crafted adapter (capture.malicious); the global adapter "
            "stays as it was",
            server_round,
        )
        return None, outcome
    metrics = {"secagg_cohort": float(outcome.cohort), "secagg_survivors": float(outcome.survivors)}
    if noise is not None:
        # The noise std of the mean, payload units: survivors' shares over survivors.
        std = math.sqrt(noise.share_variance(outcome.cohort) * outcome.survivors) / noise.scale
        metrics["dp_noise_std"] = std / outcome.survivors
    new_arrays, _ = strategy.step(server_round, [ClientUpdate(-1, mean_delta, weight)], metrics)
    return new_arrays, outcome
