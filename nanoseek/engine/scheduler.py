"""Continuous batching: requests wait in a queue and join the running batch as cache slots free up."""

from __future__ import annotations

from collections import deque

from .sequence import Sequence


class Scheduler:
    def __init__(self, num_slots: int, max_prefill_tokens: int):
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[list[Sequence]] = deque()  # one group per request (its n completions)
        self.running: list[Sequence] = []

    def add(self, group: list[Sequence]) -> None:
        self.waiting.append(group)

    def admit(self) -> list[Sequence]:
        """Move waiting requests whose completions all fit in free slots into the running batch, in order,
        within the prefill token budget (a first request is admitted whatever its length)."""
        admitted: list[Sequence] = []
        tokens = 0
        while self.waiting and len(self.waiting[0]) <= len(self.free_slots):
            group = self.waiting[0]
            cost = len(group[0].prompt_ids)
            if admitted and tokens + cost > self.max_prefill_tokens:
                break
            self.waiting.popleft()
            for seq in group:
                seq.slot = self.free_slots.pop()
            admitted.extend(group)
            tokens += cost
        self.running.extend(admitted)
        return admitted

    def release(self, seq: Sequence) -> None:
        """Free a finished or aborted sequence's slot."""
        if seq.slot >= 0:
            self.free_slots.append(seq.slot)
            seq.slot = -1
        if seq in self.running:
            self.running.remove(seq)

    def abort(self, request_id: str) -> list[Sequence]:
        """Drop a request wherever it is; its slots are free at once."""
        dropped = [s for g in self.waiting if g[0].request_id == request_id for s in g]
        self.waiting = deque(g for g in self.waiting if g[0].request_id != request_id)
        dropped += [s for s in self.running if s.request_id == request_id]
        for seq in dropped:
            self.release(seq)
        return dropped

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)
