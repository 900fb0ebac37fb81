"""The LMDB cache of synthetic images: record codec and store."""

from synthaug.cache.codec import FORMAT_VERSION, Encoding, Record
from synthaug.cache.store import DEFAULT_ENCODING, SyntheticCache

__all__ = ["SyntheticCache", "Record", "Encoding", "FORMAT_VERSION", "DEFAULT_ENCODING"]
