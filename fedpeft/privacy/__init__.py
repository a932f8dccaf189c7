"""Differential privacy: the ledger, DP-SGD, server user-level DP and distributed Skellam shares."""

from fedpeft.privacy.distributed import SkellamShare
from fedpeft.privacy.ledger import SERVER, DpEvent, PrivacyLedger, calibrate_noise, epsilon_of

__all__ = ["SERVER", "DpEvent", "PrivacyLedger", "SkellamShare", "calibrate_noise", "epsilon_of"]
