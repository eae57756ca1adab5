"""The set of shard groups this router sends to, kept in step with where groups are found.

Sources (router/discovery.py), any of them at once; the set is their union: --shard-uri
(static), --shard-dns NAME:PORT (every address of a name, re-resolved every
--discovery-interval) and --shard-service [NAMESPACE/]NAME (the Service's ready EndpointSlice
endpoints, watched). A group that appears is connected at once; one that disappears is retired:
it gets nothing new, finishes what it runs (or hands it over), and is dropped.

Every group must serve the model and tokenizer of the groups already accepted; another is
refused with one log line. When no accepted group is streaming, the next one to connect sets the
model anew, so a rollout to another model goes through.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from router.shard_client import ShardGroup

log = logging.getLogger(__name__)


class ShardGroups:
    def __init__(self, on_change: Callable[[], None]):
        self._on_change = on_change
        self._groups: dict[str, ShardGroup] = {}
        self._tasks: dict[ShardGroup, asyncio.Task] = {}
        self._found: dict[str, set[str]] = {}  # by source: the addresses it last reported
        self._identity: tuple[str, str] | None = None  # of the groups accepted so far
        self._stopping = False

    def all(self) -> list[ShardGroup]:
        """Every group known: connecting, ready, draining, refused or retiring."""
        return list(self._tasks)

    def update(self, source: str, uris: set[str]) -> None:
        """`source` now finds the groups at `uris`: connect the new, retire the missing."""
        if self._found.get(source) == uris:
            return
        self._found[source] = set(uris)
        wanted = set().union(*self._found.values())
        for uri in sorted(wanted):
            if uri in self._groups:
                continue
            retiring = next((g for g in self._tasks if g.uri == uri), None)
            if retiring is not None and retiring.unretire():
                self._groups[uri] = retiring
            else:
                self._start(uri)
        for uri, group in list(self._groups.items()):
            if uri not in wanted:
                del self._groups[uri]
                group.retire()
        self._on_change()

    def check_identity(self, group: ShardGroup, identity: tuple[str, str]) -> str | None:
        """None if a group serving `identity` may serve this router's requests, else why not."""
        streaming = [g for g in self._tasks if g is not group and g.streaming]
        if not streaming or self._identity is None:
            if self._identity is not None and identity != self._identity:
                log.info("shard groups now serve %s (no group of %s is left)", identity[0],
                         self._identity[0])
            self._identity = identity
            return None
        if identity[0] != self._identity[0]:
            return (f"it serves model {identity[0]!r}, this router's groups serve "
                    f"{self._identity[0]!r}")
        if identity != self._identity:
            return f"its tokenizer differs from that of this router's groups ({identity[0]})"
        return None

    async def stop(self) -> None:
        self._stopping = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _start(self, uri: str) -> None:
        group = ShardGroup(uri, self._on_change, self.check_identity)
        self._groups[uri] = group
        task = asyncio.create_task(group.run(), name=f"shard group {uri}")
        self._tasks[group] = task
        task.add_done_callback(lambda _: self._ended(group))

    def _ended(self, group: ShardGroup) -> None:
        self._tasks.pop(group, None)
        if self._stopping:
            return
        if self._groups.get(group.uri) is group:  # ended though still wanted: a bug, not silence
            log.error("shard group %s: its task ended; connecting again", group.uri)
            del self._groups[group.uri]
            self._start(group.uri)
        else:
            log.info("shard group %s dropped", group.uri)
        self._on_change()
