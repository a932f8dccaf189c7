"""The variants an audit compares: ``none``, ``example:<eps>``, ``client:<eps>``, each maybe ``@<batch>``.

``secagg`` (``none``) and a ``secagg+`` prefix run a variant under secure aggregation.
"""

from __future__ import annotations

from fedpeft.config import Config, parse_audit_variant, parse_config
from fedpeft.errors import ConfigError
from fedpeft.privacy.ledger import calibrate_noise


def variant_name(spec: str) -> str:
    """A folder-safe name: ``none``, ``example-eps-8``, ``none-batch-32``, ``secagg-client-eps-8`` ..."""
    variant = parse_audit_variant(spec)
    name = "none" if variant.unit is None else f"{variant.unit}-eps-{variant.target_epsilon:g}"
    if variant.secure_aggregation:
        name = "secagg" if variant.unit is None else f"secagg-{name}"
    return name if variant.batch_size is None else f"{name}-batch-{variant.batch_size}"


def variant_config(config: Config, spec: str) -> Config:
    """``config`` with its privacy sections (and batch size) replaced as ``spec`` says.

    ``none`` turns every DP mechanism off. ``example:<eps>`` turns on DP-SGD with the
    noise calibrated per client to spend ``eps`` (at ``privacy.example.delta``) over the
    whole run, and server-side DP off. ``client:<eps>`` turns on the server's
    DP-FedAvg with the noise calibrated so that the run's rounds, at the share of
    clients each round samples, spend ``eps`` (at ``privacy.client.delta``), and
    DP-SGD off. ``@<batch_size>`` sets ``train.batch_size``. Everything else, the
    planted audit examples included, stays the same, so the variants differ only in
    what the spec names.

    ``secagg`` (and the ``secagg+`` prefix) turns ``federation.secure_aggregation`` on,
    every other variant turns it off. The server then captures each captured round's
    sum, whatever ``capture.clients`` named (cleared here: it cannot pick a client's
    update). Under ``secagg+client:<eps>`` the clients add Skellam noise shares and each
    unmasked sum is one mechanism at sample rate 1 (the server knows who was sampled:
    :mod:`fedpeft.privacy.distributed`), so the noise is calibrated as the Gaussian
    mechanism at rate 1 over the rounds: the leading term of the Skellam bound, whose
    correction at the protocol's fine grid is negligible; the report shows the ledger's
    own epsilon.

    Raises:
        ConfigError: The target epsilon is out of reach for the run's rounds, or the
            config cannot run under secure aggregation (its codec or aggregator needs
            each client's update; the message names the key).

    """
    variant = parse_audit_variant(spec)
    data = config.to_dict()
    federation = data.setdefault("federation", {})
    federation.setdefault("secure_aggregation", {})["enabled"] = variant.secure_aggregation
    if variant.secure_aggregation:
        data.setdefault("capture", {})["clients"] = []
    privacy = data.setdefault("privacy", {})
    example = privacy.setdefault("example", {})
    client = privacy.setdefault("client", {})
    example["enabled"] = variant.unit == "example"
    client["enabled"] = variant.unit == "client"
    if variant.unit == "example":
        example["target_epsilon"] = variant.target_epsilon
        example.pop("noise_multiplier", None)
    if variant.unit == "client":
        rate = 1.0 if variant.secure_aggregation else client_sample_rate(config)
        client["noise_multiplier"] = _client_noise(config, float(variant.target_epsilon or 0), rate)
    if variant.batch_size is not None:
        data.setdefault("train", {})["batch_size"] = variant.batch_size
    return parse_config(data, f"audit variant {spec}")


def client_sample_rate(config: Config) -> float:
    """The Poisson rate q at which the server samples clients under user-level DP.

    ``federation.fraction_train``, what the strategy draws with and its ledger records
    (see :mod:`fedpeft.privacy.central`); ``min_train_clients`` does not raise it.
    """
    return config.federation.fraction_train


def _client_noise(config: Config, target_epsilon: float, sample_rate: float) -> float:
    """User-level DP's noise multiplier for ``target_epsilon`` over the run's rounds at ``sample_rate``."""
    central = config.privacy.client
    try:
        return calibrate_noise(
            target_epsilon,
            central.delta,
            sample_rate,
            config.federation.rounds,
            central.accountant,
        )
    except ValueError as err:
        raise ConfigError(f"audit.compare client:{target_epsilon:g}: {err}") from None
