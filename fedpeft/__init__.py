"""fedpeft: federated, privacy-aware parameter-efficient fine-tuning."""

__version__ = "0.1.0"
