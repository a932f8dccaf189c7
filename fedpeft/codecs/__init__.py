"""How an update travels: a client encodes its adapter delta, the server decodes it.

Importing this package registers every codec in :data:`CODECS`.
"""

from fedpeft.codecs.base import CODECS, CodecContext, CodecMemory, Payload, UpdateCodec
from fedpeft.codecs.dense import Dense
from fedpeft.codecs.projection import Projection
from fedpeft.codecs.random_mask import RandomMask
from fedpeft.codecs.topk import TopK

__all__ = [
    "CODECS",
    "CodecContext",
    "CodecMemory",
    "Dense",
    "Payload",
    "Projection",
    "RandomMask",
    "TopK",
    "UpdateCodec",
]
