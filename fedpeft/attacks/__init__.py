"""Gradient-inversion attacks on the updates clients send, and their metrics.

Importing this package registers every attack in :data:`ATTACKS`.
"""

from fedpeft.attacks.base import ATTACKS, Attack, Reconstruction
from fedpeft.attacks.gradient_matching import GradientMatching
from fedpeft.attacks.lm_prior import LmPrior
from fedpeft.attacks.metrics import LeakageMetrics, score_reconstruction
from fedpeft.attacks.observation import Observation, ThreatModel
from fedpeft.attacks.recit import ReCIT
from fedpeft.attacks.sequence_assembly import SequenceAssembly
from fedpeft.attacks.token_set import TokenSet
from fedpeft.attacks.unigram_prior import UnigramPrior

__all__ = [
    "ATTACKS",
    "Attack",
    "GradientMatching",
    "LeakageMetrics",
    "LmPrior",
    "Observation",
    "ReCIT",
    "Reconstruction",
    "SequenceAssembly",
    "ThreatModel",
    "TokenSet",
    "UnigramPrior",
    "score_reconstruction",
]
