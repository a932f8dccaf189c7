"""Exceptions fedpeft raises for problems a user can fix.

The CLI turns any :class:`FedPeftError` into one line on stderr and a non-zero exit;
everything else is a bug and keeps its traceback.
"""


class FedPeftError(Exception):
    """Base class of every error caused by input (config, files, data, messages)."""


class ConfigError(FedPeftError):
    """A config key is unknown, missing or has a bad value; the message names the key."""


class DataError(FedPeftError):
    """A data file, split or column is missing or cannot be partitioned as asked."""


class ModelLoadError(FedPeftError):
    """A base model or adapter cannot be loaded from the given name or path."""


class PayloadError(FedPeftError):
    """A client update has wrong keys, shapes or dtypes, non-finite values or is too large."""


class ClientStateError(FedPeftError):
    """A device's saved state (DP ledger, codec memory) cannot be read or trusted."""


class AggregationError(FedPeftError):
    """A round's aggregate is not finite or does not fit the global adapter; it is refused."""


class PrivacyBudgetExhausted(FedPeftError):
    """A client's next round would spend more than its privacy.example.target_epsilon."""


class AttackError(FedPeftError):
    """An attack cannot run on this observation or model (the message says which part)."""
