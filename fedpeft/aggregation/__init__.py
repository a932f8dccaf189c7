"""How decoded client updates combine into the next global adapter.

Importing this package registers every aggregator in :data:`AGGREGATORS`.
"""

from fedpeft.aggregation.base import AGGREGATORS, AggregationResult, Aggregator, ClientUpdate
from fedpeft.aggregation.fedadam import FedAdam
from fedpeft.aggregation.fedavg import FedAvg
from fedpeft.aggregation.fedavgm import FedAvgM
from fedpeft.aggregation.fedyogi import FedYogi
from fedpeft.aggregation.lora_product import LoraProduct

__all__ = [
    "AGGREGATORS",
    "AggregationResult",
    "Aggregator",
    "ClientUpdate",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedYogi",
    "LoraProduct",
]
