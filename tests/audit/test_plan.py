import datasets
import pytest

from fedpeft.audit.canaries import make_canaries
from fedpeft.audit.plan import AuditPlan
from fedpeft.config import AuditConfig, PartitionConfig, parse_config
from fedpeft.errors import ConfigError
from fedpeft.privacy.ledger import DpEvent


def test_canaries_are_deterministic_distinct_and_formatted() -> None:
    canaries, references = make_canaries(50, 6, "my secret code is", 2, seed=3, references=200)
    again, _ = make_canaries(50, 6, "my secret code is", 2, seed=3, references=200)
    assert canaries == again
    texts = [c.text for c in canaries] + references
    assert len(set(texts)) == 250
    first = canaries[0]
    assert first.text == f"my secret code is {first.secret}"
    assert len(first.secret.split()) == 6 and first.secret.replace(" ", "").isdigit()
    assert {c.label for c in canaries} == {0, 1}
    assert 10 < sum(c.included for c in canaries) < 40
    assert make_canaries(5, 6, "x", None, seed=4)[0] != canaries[:5]
    assert all(c.label is None for c in make_canaries(5, 6, "x", None, seed=4)[0])
    with pytest.raises(ValueError, match="distinct secrets"):
        make_canaries(8, 1, "x", None, seed=0, references=3)


def _train(n: int = 60) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {"text": [f"row {i}" for i in range(n)], "label": [i % 2 for i in range(n)]}
    )


def test_plan_inserts_only_included_rows_into_audit_clients() -> None:
    audit = AuditConfig(canaries=6, canary_repetitions=3, references=10, membership_examples=20, clients=[1])
    partition = PartitionConfig(scheme="iid", num_clients=3)
    plan = AuditPlan.build(audit, _train(), seed=0, num_labels=2)
    assert len(plan.remaining) == 40 and len(plan.examples) == 20 and len(plan.references) == 10
    held = {e.text for e in plan.examples}
    assert held.isdisjoint(plan.remaining["text"])
    parts = plan.partitions(partition, seed=0)
    base = plan.base_partitions(partition, seed=0)
    assert parts.sizes()[0] == base.sizes()[0] and parts.sizes()[2] == base.sizes()[2]
    texts = [t for p in parts for t in p["text"]]
    for example in plan.examples:
        assert texts.count(example.text) == (1 if example.included else 0)
    for canary in plan.canaries:
        assert texts.count(canary.text) == (3 if canary.included else 0)
    inserted = sum(e.included for e in plan.examples) + 3 * sum(c.included for c in plan.canaries)
    assert parts.sizes()[1] == base.sizes()[1] + inserted
    row = parts[1][len(parts[1]) - 1]
    assert set(row) == {"text", "label"}
    again = AuditPlan.build(audit, _train(), seed=0, num_labels=2)  # deterministic
    assert (again.examples, again.canaries, again.references) == (
        plan.examples,
        plan.canaries,
        plan.references,
    )
    assert again.remaining["text"] == plan.remaining["text"]


def test_plan_splits_inserted_rows_over_several_clients() -> None:
    audit = AuditConfig(membership_examples=30, clients=[0, 2])
    plan = AuditPlan.build(audit, _train(), seed=1, num_labels=2)
    counts = [len(plan.inserted_rows(c)) for c in range(3)]
    assert counts[1] == 0 and abs(counts[0] - counts[2]) <= 1
    assert counts[0] + counts[2] == sum(e.included for e in plan.examples)


def test_plan_refuses_to_hold_out_everything() -> None:
    with pytest.raises(ConfigError, match="membership_examples"):
        AuditPlan.build(AuditConfig(membership_examples=60), _train(), seed=0, num_labels=2)


@pytest.mark.parametrize(
    ("audit", "match"),
    [
        ({"compare": ["example:x"]}, "example:<epsilon>"),
        ({"compare": ["user:8"]}, "client:<epsilon>"),
        ({"compare": ["none@0"]}, "@<batch_size>"),
        ({"compare": ["example:inf"]}, "example:<epsilon>"),
        ({"compare": ["none", "none"]}, "listed twice"),
        ({"compare": []}, "at least one variant"),
        ({"canaries": 5, "canary_digits": 1, "references": 10}, "do not fit"),
        ({"membership_examples": 5, "clients": [9]}, "outside"),
    ],
)
def test_audit_config_is_validated(audit: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config({"partition": {"num_clients": 3}, "audit": audit})


def test_variants_parse_and_change_only_what_they_name() -> None:
    from fedpeft.audit.variants import variant_config, variant_name
    from fedpeft.config import parse_audit_variant

    assert parse_audit_variant("none").target_epsilon is None
    assert parse_audit_variant("example:8@64").model_dump() == {
        "unit": "example",
        "target_epsilon": 8.0,
        "batch_size": 64,
        "secure_aggregation": False,
    }
    assert [variant_name(s) for s in ("none", "example:8", "client:2", "none@32")] == [
        "none",
        "example-eps-8",
        "client-eps-2",
        "none-batch-32",
    ]
    base = parse_config({"privacy": {"client": {"enabled": True}}, "audit": {"membership_examples": 10}})
    private = variant_config(base, "example:3@32")
    assert private.privacy.example.enabled and private.privacy.example.target_epsilon == 3.0
    assert not private.privacy.client.enabled and private.train.batch_size == 32
    plain = variant_config(base, "none")
    assert not plain.privacy.example.enabled and not plain.privacy.client.enabled
    assert plain.audit == base.audit and plain.train == base.train


def test_a_user_level_variant_is_calibrated_to_its_epsilon_over_the_rounds() -> None:
    from fedpeft.audit.variants import client_sample_rate, variant_config
    from fedpeft.privacy.ledger import epsilon_of

    base = parse_config(
        {
            "privacy": {"example": {"enabled": True, "noise_multiplier": 1.0}},
            "partition": {"num_clients": 8},
            "federation": {"rounds": 5, "fraction_train": 0.5, "min_train_clients": 2},
            "audit": {"membership_examples": 10},
        }
    )
    private = variant_config(base, "client:4")
    assert private.privacy.client.enabled and not private.privacy.example.enabled
    assert client_sample_rate(private) == 0.5
    # What the server's ledger will hold after the run: one event per round at that rate.
    events = [
        DpEvent(r, "server", "client", private.privacy.client.noise_multiplier, 0.5, 1) for r in range(1, 6)
    ]
    assert epsilon_of(events, private.privacy.client.delta, "rdp") == pytest.approx(4.0, rel=0.01)
    with pytest.raises(ConfigError, match="client:1e-06"):
        variant_config(base, "client:0.000001")


@pytest.mark.parametrize(
    ("spec", "unit", "epsilon", "batch", "name"),
    [
        ("secagg", None, None, None, "secagg"),
        ("secagg@4", None, None, 4, "secagg-batch-4"),
        ("secagg+client:8", "client", 8.0, None, "secagg-client-eps-8"),
        ("secagg+example:3@4", "example", 3.0, 4, "secagg-example-eps-3-batch-4"),
    ],
)
def test_secure_aggregation_variants_parse(
    spec: str, unit: str | None, epsilon: float | None, batch: int | None, name: str
) -> None:
    from fedpeft.audit.variants import variant_name
    from fedpeft.config import parse_audit_variant

    variant = parse_audit_variant(spec)
    assert (variant.unit, variant.target_epsilon, variant.batch_size) == (unit, epsilon, batch)
    assert variant.secure_aggregation
    assert variant_name(spec) == name
    assert AuditConfig(compare=["none", spec]).compare == ["none", spec]


@pytest.mark.parametrize("spec", ["secagg+none", "secagg+", "secagg:8", "secaggclient:8", "client:8+secagg"])
def test_malformed_secure_aggregation_variants_are_refused(spec: str) -> None:
    from fedpeft.config import parse_audit_variant

    with pytest.raises(ValueError, match="secagg\\+"):
        parse_audit_variant(spec)


def test_a_secure_aggregation_variant_runs_the_protocol_and_captures_sums() -> None:
    from fedpeft.audit.variants import variant_config

    base = parse_config(
        {
            "partition": {"num_clients": 4},
            "capture": {"rounds": [2], "clients": [0]},
            "audit": {"membership_examples": 10, "compare": ["none", "secagg"]},
        }
    )
    secure = variant_config(base, "secagg")
    assert secure.federation.secure_aggregation.enabled
    assert not secure.privacy.example.enabled and not secure.privacy.client.enabled
    # The server cannot pick one client's update out of a sum: it captures the round's sum.
    assert secure.capture.clients == [] and secure.capture.rounds == [2]
    assert secure.audit == base.audit and secure.train == base.train
    # Only what the spec names changes: a plain variant of a secure config runs without it.
    plain = variant_config(secure, "none")
    assert not plain.federation.secure_aggregation.enabled and plain.capture.clients == []
    assert not variant_config(base, "example:8").federation.secure_aggregation.enabled


@pytest.mark.parametrize(
    ("federation", "match"),
    [
        ({"aggregator": "median"}, "federation.aggregator 'median' needs each client's update"),
        ({"codec": "topk", "codec_options": {"density": 0.1}}, "codec 'topk' cannot be summed"),
    ],
)
def test_a_secure_aggregation_variant_of_an_unsummable_config_is_refused(
    federation: dict, match: str
) -> None:
    from fedpeft.audit.variants import variant_config

    base = parse_config({"federation": federation, "audit": {"membership_examples": 10}})
    assert variant_config(base, "none")  # runs without the protocol
    with pytest.raises(ConfigError, match=f"audit variant secagg: .*{match}"):
        variant_config(base, "secagg")


def test_a_secure_user_level_variant_is_calibrated_at_sample_rate_one() -> None:
    from fedpeft.audit.variants import variant_config
    from fedpeft.flower.secure_aggregation import ProtocolSettings
    from fedpeft.privacy.ledger import epsilon_of, skellam_event

    base = parse_config(
        {
            "partition": {"num_clients": 8},
            "federation": {"rounds": 5, "fraction_train": 0.5, "min_train_clients": 2},
            "audit": {"membership_examples": 10},
        }
    )
    secure = variant_config(base, "secagg+client:4")
    central = variant_config(base, "client:4")
    assert secure.privacy.client.enabled and secure.federation.secure_aggregation.enabled
    # No amplification by sampling is credited to the clients' shares: more noise for the same epsilon.
    assert secure.privacy.client.noise_multiplier > 1.5 * central.privacy.client.noise_multiplier
    # What the server's ledger will hold: one Skellam event per unmasked sum (every sampled
    # client survives), on the protocol's grid, for an adapter of 100,000 coordinates.
    noise = ProtocolSettings.of(secure, [50] * 8).noise(secure, 100_000)
    assert noise is not None
    events = [skellam_event(r, noise, cohort=4, survivors=4) for r in range(1, 6)]
    assert epsilon_of(events, secure.privacy.client.delta, "rdp") == pytest.approx(4.0, rel=0.01)
