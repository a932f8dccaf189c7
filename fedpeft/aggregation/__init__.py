"""How decoded client updates combine into the next global adapter.

Importing this package registers every aggregator in :data:`AGGREGATORS`.
"""

from fedpeft.aggregation.base import AGGREGATORS, AggregationResult, Aggregator, ClientUpdate
from fedpeft.aggregation.clipped import ClippedUpdates
from fedpeft.aggregation.fedadam import FedAdam
from fedpeft.aggregation.fedavg import FedAvg
from fedpeft.aggregation.fedavgm import FedAvgM
from fedpeft.aggregation.fedyogi import FedYogi
from fedpeft.aggregation.krum import Krum
from fedpeft.aggregation.lora_product import LoraProduct
from fedpeft.aggregation.median import Median
from fedpeft.aggregation.trimmed_mean import TrimmedMean

__all__ = [
    "AGGREGATORS",
    "AggregationResult",
    "Aggregator",
    "ClientUpdate",
    "ClippedUpdates",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedYogi",
    "Krum",
    "LoraProduct",
    "Median",
    "TrimmedMean",
]
