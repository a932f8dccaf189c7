"""The variants an audit compares: ``none`` or ``example:<epsilon>``, optionally ``@<batch_size>``."""

from __future__ import annotations

from fedpeft.config import Config, parse_audit_variant, parse_config


def variant_name(spec: str) -> str:
    """A folder-safe name: ``none``, ``example-eps-8``, ``none-batch-32``."""
    variant = parse_audit_variant(spec)
    name = "none" if variant.target_epsilon is None else f"example-eps-{variant.target_epsilon:g}"
    return name if variant.batch_size is None else f"{name}-batch-{variant.batch_size}"


def variant_config(config: Config, spec: str) -> Config:
    """``config`` with its privacy sections (and batch size) replaced as ``spec`` says.

    ``none`` turns every DP mechanism off; ``example:<eps>`` turns on DP-SGD with the
    noise calibrated per client to spend ``eps`` (at ``privacy.example.delta``) over the
    whole run, and turns server-side DP off; ``@<batch_size>`` sets
    ``train.batch_size``. Everything else, the planted audit examples included, stays
    the same, so the variants differ only in what the spec names.
    """
    variant = parse_audit_variant(spec)
    data = config.to_dict()
    privacy = data.setdefault("privacy", {})
    example = privacy.setdefault("example", {})
    privacy.setdefault("client", {})["enabled"] = False
    if variant.target_epsilon is None:
        example["enabled"] = False
    else:
        example.update(enabled=True, target_epsilon=variant.target_epsilon)
        example.pop("noise_multiplier", None)
    if variant.batch_size is not None:
        data.setdefault("train", {})["batch_size"] = variant.batch_size
    return parse_config(data, f"audit variant {spec}")
