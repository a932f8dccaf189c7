"""How an update travels: a client encodes its adapter delta, the server decodes it.

Importing this package registers every codec in :data:`CODECS`.
"""

from fedpeft.codecs.base import CODECS, CodecContext, Payload, UpdateCodec
from fedpeft.codecs.dense import Dense

__all__ = ["CODECS", "CodecContext", "Dense", "Payload", "UpdateCodec"]
