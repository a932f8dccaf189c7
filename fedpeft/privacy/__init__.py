"""Differential privacy: the ledger, client DP-SGD (Opacus) and server user-level DP."""

from fedpeft.privacy.ledger import SERVER, DpEvent, PrivacyLedger, calibrate_noise, epsilon_of

__all__ = ["SERVER", "DpEvent", "PrivacyLedger", "calibrate_noise", "epsilon_of"]
