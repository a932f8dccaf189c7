"""Secure aggregation on a client: Flower's SecAgg+ mod around fedpeft's training.

Flower's ``secaggplus_mod`` runs the client's side of SecAgg+ (keys, shares, masking)
and calls the ClientApp's train function once per round, in the stage that collects
masked vectors; it then masks the ``FitRes`` parameters that train function returns.
:func:`secure_aggregation_mod` hands it exactly the messages of that protocol, so one
ClientApp serves secure and plain rounds. :func:`secure_reply` is what the train
function returns in a secure round: the codec payload as one vector, under
``privacy.client`` clipped, rounded onto the protocol's integer grid and with the
client's Skellam noise share added (:mod:`fedpeft.privacy.distributed`).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from typing import TYPE_CHECKING, cast

import numpy as np
from flwr.app import Context, Message, MessageType, MetricRecord
from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState, secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, bytes_to_ndarray, ndarray_to_bytes, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key
from flwr.compat.common import recorddict_compat as compat

from fedpeft.config import Config
from fedpeft.flower.payload_layout import PayloadLayout
from fedpeft.flower.records import TRAIN_METRICS

if TYPE_CHECKING:  # imported where used: the key stages' processes need neither
    from torch import Tensor

    from fedpeft.privacy.distributed import SkellamShare


def is_secure_round(msg: Message) -> bool:
    """Whether ``msg`` is a message of a SecAgg+ round."""
    return msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run Flower's SecAgg+ client mod on SecAgg+ messages; pass everything else through.

    The masked vector Flower's mod returns is int64, though every value is below its
    2**32 modulus: it travels as uint32 (:func:`pack_masked_vector`), half the bytes.
    """
    if not is_secure_round(msg):
        return call_next(msg, context)
    reply = secaggplus_mod(msg, context, call_next)
    if not reply.has_error():
        configs = reply.content.config_records[RECORD_KEY_CONFIGS]
        if Key.MASKED_PARAMETERS in configs:
            masked = cast(list[bytes], configs[Key.MASKED_PARAMETERS])
            configs[Key.MASKED_PARAMETERS] = pack_masked_vector(masked)
    return reply


def pack_masked_vector(masked: list[bytes]) -> list[bytes]:
    """Flower's int64 masked arrays (values in [0, 2**32)) as uint32 ``numpy.save`` bytes."""
    packed = []
    for data in masked:
        array = bytes_to_ndarray(data)
        if array.size and (array.min() < 0 or array.max() >= 2**32):
            raise ValueError("masked vector outside [0, 2**32): not a SecAgg+ vector")
        packed.append(ndarray_to_bytes(array.astype(np.uint32)))
    return packed


def protocol_state(context: Context) -> SecAggPlusState:
    """What Flower's mod agreed on in the setup stage (range, levels, cohort, max weight)."""
    return SecAggPlusState(**context.state.config_records[RECORD_KEY_STATE])


def distributed_noise(config: Config, state: SecAggPlusState, dim: int) -> SkellamShare:
    """The round's Skellam mechanism as the protocol's grid makes it.

    The grid step is ``2 R / levels``; with R and the levels powers of two (checked at
    start), a share in grid units divided by the scale is a float that Flower's
    quantiser maps back to the same integer exactly.
    """
    from fedpeft.privacy.distributed import SkellamShare

    central = config.privacy.client
    return SkellamShare(
        clipping_norm=central.clipping_norm,
        noise_multiplier=central.noise_multiplier,
        scale=state.target_range / (2 * state.clipping_range),
        dim=dim,
    )


def secure_reply(
    msg: Message,
    context: Context,
    config: Config,
    payload: Mapping[str, Tensor],
    num_examples: int,
    metrics: MetricRecord,
) -> Message:
    """The train function's reply in a secure round, for Flower's mod to mask.

    Without ``privacy.client`` the payload goes as it is (clipped to
    ``federation.max_update_norm`` when set: honest clients bound themselves, as the
    server cannot), weighted by the client's example count up to the protocol's
    ``max_weight``. Under it, the client's integer share: weight 1, every client counts once.
    """
    state = protocol_state(context)
    layout = PayloadLayout.of(payload)
    if config.privacy.client.enabled:
        noise = distributed_noise(config, state, layout.size)
        rng = np.random.default_rng(secrets.randbits(128))
        share = noise.client_share(layout.flatten(payload), state.sample_num, rng)
        values = share.astype(np.float64) / noise.scale
        weight = 1
    else:
        from fedpeft.aggregation._math import clip_update_norm

        bound = config.federation.max_update_norm
        clipped = clip_update_norm(payload, bound) if bound is not None else payload
        values = layout.flatten(clipped)
        weight = max(1, min(num_examples, math.floor(state.max_weight)))
    fit = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(layout.split(values)), weight, {})
    content = compat.fitres_to_recorddict(fit, keep_input=False)
    content.metric_records[TRAIN_METRICS] = metrics
    return Message(content, reply_to=msg)
