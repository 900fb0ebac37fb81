"""Damage a cache record behind the cache's back (tests of the CRC and the corrupt-record paths)."""

import lmdb


def flip_record_byte(path, seq: int, offset: int, mask: int = 0xFF) -> None:
    """XOR byte ``offset`` of record ``seq``'s stored value with ``mask``, in a write transaction
    of its own (no ``SyntheticCache`` may hold the environment open in this process)."""
    env = lmdb.open(str(path), max_dbs=4)
    db = env.open_db(b"records")
    key = seq.to_bytes(8, "big")
    with env.begin(write=True) as txn:
        value = bytearray(txn.get(key, db=db))
        value[offset] ^= mask
        txn.put(key, bytes(value), db=db)
    env.close()
