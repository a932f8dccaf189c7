"""The JSON schema of ``report.json`` (Draft 2020-12); tests validate real reports against it."""

from __future__ import annotations

from typing import Any

_NUMBER_OR_NULL = {"type": ["number", "null"]}
_PROBABILITY = {"type": "number", "minimum": 0, "maximum": 1}

_ATTACK = {
    "type": "object",
    "required": ["name", "auc", "tpr_at_fpr", "roc"],
    "properties": {
        "name": {"enum": ["loss", "lira_online", "lira_offline"]},
        "auc": _PROBABILITY,
        "tpr_at_fpr": {
            "type": "object",
            "required": ["0.001", "0.01"],
            "additionalProperties": _PROBABILITY,
        },
        "roc": {
            "type": "object",
            "required": ["fpr", "tpr"],
            "properties": {
                "fpr": {"type": "array", "items": _PROBABILITY, "minItems": 2},
                "tpr": {"type": "array", "items": _PROBABILITY, "minItems": 2},
            },
        },
    },
}

_UNIT = {
    "type": "object",
    "required": [
        "unit",
        "mechanism",
        "accountant",
        "delta",
        "epsilon_final",
        "epsilon_max",
        "epsilon_by_round",
    ],
    "properties": {
        "unit": {"enum": ["example", "client"]},
        "accountant": {"enum": ["rdp", "prv"]},
        "delta": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
        "target_epsilon": _NUMBER_OR_NULL,
        "epsilon_final": {"type": "object", "additionalProperties": _NUMBER_OR_NULL},
        "epsilon_max": _NUMBER_OR_NULL,
        "epsilon_example": _NUMBER_OR_NULL,
        "epsilon_by_round": {
            "type": "object",
            "additionalProperties": {"type": "array", "items": _NUMBER_OR_NULL},
        },
    },
}

_CANARIES = {
    "type": ["object", "null"],
    "required": ["count", "included", "repetitions", "references", "max_exposure", "items", "secrets_shown"],
    "properties": {
        "count": {"type": "integer", "minimum": 1},
        "repetitions": {"type": "integer", "minimum": 1},
        "references": {"type": "integer", "minimum": 1},
        "max_exposure": {"type": "number", "minimum": 0},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["text", "label", "included", "loss", "exposure", "extrapolated_exposure"],
                "properties": {
                    "text": {"type": "string"},
                    "label": {"type": ["integer", "null"]},
                    "included": {"type": "boolean"},
                    "loss": {"type": "number"},
                    "exposure": {"type": "number", "minimum": 0},
                    "extrapolated_exposure": _NUMBER_OR_NULL,
                },
            },
        },
    },
}

_ONE_RUN = {
    "type": "object",
    "required": [
        "source",
        "score",
        "epsilon_lower_bound",
        "reported_epsilon",
        "delta",
        "m",
        "correct",
        "violation",
    ],
    "properties": {
        "source": {"enum": ["membership examples", "canaries"]},
        "epsilon_lower_bound": {"type": ["number", "null"], "minimum": 0},
        "reported_epsilon": _NUMBER_OR_NULL,
        "m": {"type": "integer", "minimum": 1},
        "k_plus": {"type": "integer", "minimum": 0},
        "k_minus": {"type": "integer", "minimum": 0},
        "correct": {"type": "integer", "minimum": 0},
        "confidence": _PROBABILITY,
        "violation": {"type": "boolean"},
    },
}

_VARIANT = {
    "type": "object",
    "required": [
        "name",
        "spec",
        "config_fingerprint",
        "utility",
        "reported_example_epsilon",
        "guarantees",
        "canaries",
        "membership",
        "one_run",
        "attacks",
    ],
    "properties": {
        "name": {"type": "string"},
        "spec": {
            "type": "string",
            "pattern": "^(none|secagg|(secagg\\+)?(example|client):[0-9.eE+-]+)(@[0-9]+)?$",
        },
        "secure_aggregation": {"type": "boolean"},
        "config_fingerprint": {"type": "string", "pattern": "^[0-9a-f]{16}$"},
        "utility": {
            "type": "object",
            "required": ["accuracy", "loss"],
            "properties": {"accuracy": _PROBABILITY, "loss": {"type": "number"}},
        },
        "reported_example_epsilon": _NUMBER_OR_NULL,
        "guarantees": {
            "type": "object",
            "required": ["dp", "units", "assumptions"],
            "properties": {
                "dp": {"type": "boolean"},
                "units": {"type": "array", "items": _UNIT},
                "assumptions": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            },
        },
        "canaries": _CANARIES,
        "membership": {
            "type": ["object", "null"],
            "required": ["members", "non_members", "attacks", "shadow_models"],
            "properties": {
                "members": {"type": "integer", "minimum": 1},
                "non_members": {"type": "integer", "minimum": 1},
                "attacks": {"type": "array", "items": _ATTACK, "minItems": 1},
            },
        },
        "one_run": {"type": "array", "items": _ONE_RUN},
        "attacks": {
            "type": "object",
            "required": ["status", "attack"],
            "properties": {
                "status": {"enum": ["ran", "skipped"]},
                "outcomes": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["round", "client", "token_recall"],
                        "properties": {
                            # A secure round's sum: client -1, sum true, the summed clients.
                            "clients": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                            "sum": {"type": "boolean"},
                        },
                    },
                },
                "examples": {
                    "type": "array",
                    "items": {"type": "object", "required": ["true", "recovered"]},
                },
            },
        },
    },
}

_FIGURE = {
    "type": "object",
    "required": ["id", "title", "kind", "x_label", "y_label", "x_scale", "y_scale", "series"],
    "properties": {
        "id": {"type": "string", "pattern": "^[a-z_]+$"},
        "kind": {"enum": ["line", "stairs", "category"]},
        "x_scale": {"enum": ["linear", "log"]},
        "y_scale": {"enum": ["linear", "log"]},
        "series": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "x", "y"],
                "properties": {"name": {"type": "string"}, "x": {"type": "array"}, "y": {"type": "array"}},
            },
        },
    },
}

REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "fedpeft privacy audit report",
    "type": "object",
    "required": [
        "schema_version",
        "fedpeft_version",
        "config_fingerprint",
        "created",
        "settings",
        "flags",
        "verdict",
        "variants",
        "figures",
    ],
    "properties": {
        "schema_version": {"const": 1},
        "fedpeft_version": {"type": "string", "minLength": 1},
        "config_fingerprint": {"type": "string", "pattern": "^[0-9a-f]{16}$"},
        "created": {"type": "string"},
        "settings": {"type": "object", "required": ["model", "task", "clients", "rounds", "compare"]},
        "flags": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["level", "variant", "message"],
                "properties": {"level": {"enum": ["error", "warning"]}},
            },
        },
        "verdict": {
            "type": "object",
            "required": ["summary", "variants"],
            "properties": {
                "summary": {"type": "string"},
                "variants": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["variant", "level", "guarantee", "reasons", "recommendations"],
                        "properties": {"level": {"enum": ["low", "moderate", "high", "violation"]}},
                    },
                },
            },
        },
        "variants": {"type": "array", "items": _VARIANT, "minItems": 1},
        "figures": {
            "type": "array",
            "items": _FIGURE,
            "contains": {"properties": {"id": {"const": "epsilon_over_rounds"}}},
        },
    },
}
