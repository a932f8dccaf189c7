"""The privacy variants an audit compares: ``none`` and ``example:<target_epsilon>``."""

from __future__ import annotations

from fedpeft.config import Config, parse_config


def variant_name(spec: str) -> str:
    """A folder-safe name: ``none``, ``example-eps-8``."""
    if spec == "none":
        return "none"
    kind, _, value = spec.partition(":")
    return f"{kind}-eps-{float(value):g}"


def variant_config(config: Config, spec: str) -> Config:
    """``config`` with its privacy sections replaced as ``spec`` says.

    ``none`` turns every DP mechanism off; ``example:<eps>`` turns on DP-SGD with the
    noise calibrated per client to spend ``eps`` (at ``privacy.example.delta``) over the
    whole run, and turns server-side DP off. Everything else, the planted audit
    examples included, stays the same, so the variants differ only in privacy.
    """
    data = config.to_dict()
    privacy = data.setdefault("privacy", {})
    example = privacy.setdefault("example", {})
    privacy.setdefault("client", {})["enabled"] = False
    if spec == "none":
        example["enabled"] = False
    else:
        kind, _, value = spec.partition(":")
        if kind != "example":
            raise ValueError(f"unknown audit variant {spec!r}")
        example.update(enabled=True, target_epsilon=float(value))
        example.pop("noise_multiplier", None)
    return parse_config(data, f"audit variant {spec}")
