"""Where a Redis ledger keeps what: the key layout every script and the store agree on.

Every key starts with the ledger's prefix, a hash tag (``{jobledger}`` by default), so one
ledger lives in one hash slot: each script touches one slot, as Redis Cluster requires, and a
job's record and all its index entries move together. (The price: a ledger is not spread over
a cluster's shards; one shard serves it.)

``P:job:<id>``                hash, the job's row (fields of :mod:`jobledger.stores.rows`)
``P:order``                   sorted set by lexicographic member ``order_head(created_at) + id``:
                              every job, the order listings page through (newest first)
``P:order:<state>``           the same, per state
``P:state:<state>``           score = ``updated_at``: counts per state, ages, the relay's oldest
``P:qs:<state>:<queue>``      score = when the job entered a pending state: counts and lag
``P:queues``                  set of queue names that ever had a job
``P:owner:<instance>``        score = ``started_at``: the started jobs an instance holds
``P:owners``                  set of instances holding started jobs
``P:instance:<id>``           hash, an instance's row; expires after a long silence
``P:beats``                   score = last heartbeat, member = instance id
``P:unique:<key>``            string, the id of the unfinished job that holds unique key
                              ``<key>`` (set by the create script, deleted by the move that
                              ends the job or by its deletion)
``P:lock:<name>``             string, the holder's token, with a TTL (``SET NX PX``)
``P:meta``                    hash: ``ledger_id``, ``schema``
"""

from __future__ import annotations

import struct

#: The prefix of a ledger's keys unless the URL's ``prefix`` names another.
DEFAULT_PREFIX = "jobledger"

#: Length of :func:`order_head` (the id follows it in an ``order`` member).
HEAD_LENGTH = 16


def hash_tagged(prefix: str) -> str:
    """``prefix`` as the hash tag every key of the ledger starts with."""
    return prefix if prefix.startswith("{") and prefix.endswith("}") else f"{{{prefix}}}"


def order_head(moment: float) -> str:
    """16 hex digits whose text order is the numeric order of the double ``moment`` (as
    ``order_head`` in ``common.lua`` computes it): sign bit flipped for positives, every bit
    flipped for negatives."""
    raw = bytearray(struct.pack(">d", moment))
    if raw[0] >= 0x80:
        raw = bytearray(0xFF - b for b in raw)
    else:
        raw[0] += 0x80
    return raw.hex()


def order_member(created_at: float, job_id: str) -> str:
    return order_head(created_at) + job_id


class Keys:
    """The names of one ledger's keys."""

    def __init__(self, prefix: str) -> None:
        self.prefix = hash_tagged(prefix)

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def job(self, job_id: str) -> str:
        return self._key("job", job_id)

    def order(self, state: str | None = None) -> str:
        return self._key("order") if state is None else self._key("order", state)

    def state(self, state: str) -> str:
        return self._key("state", state)

    def instance(self, instance_id: str) -> str:
        return self._key("instance", instance_id)

    def lock(self, name: str) -> str:
        return self._key("lock", name)

    @property
    def beats(self) -> str:
        return self._key("beats")

    @property
    def meta(self) -> str:
        return self._key("meta")

    @property
    def pattern(self) -> str:
        """A SCAN pattern for every key of the ledger (glob characters of the prefix escaped)."""
        escaped = "".join(f"\\{c}" if c in "*?[]\\" else c for c in self.prefix)
        return f"{escaped}:*"
