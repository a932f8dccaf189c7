"""How decoded client updates combine into the next global adapter.

Importing this package registers every aggregator in :data:`AGGREGATORS`.
"""

from fedpeft.aggregation.base import AGGREGATORS, AggregationResult, Aggregator, ClientUpdate
from fedpeft.aggregation.fedavg import FedAvg

__all__ = ["AGGREGATORS", "AggregationResult", "Aggregator", "ClientUpdate", "FedAvg"]
