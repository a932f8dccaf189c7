"""Text data: reading the user's files or Hugging Face datasets, and splitting them among clients."""

from fedpeft.data.loading import TextData, load_text_data
from fedpeft.data.partition import Partitions, partition_dataset

__all__ = ["Partitions", "TextData", "load_text_data", "partition_dataset"]
