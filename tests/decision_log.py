"""A fold fed like the coordinator's, for tests of pure decisions: events in, decisions out."""

from __future__ import annotations

from datetime import datetime

from dtf import events as ev
from dtf import schedule, subjects
from dtf.state import Fold


class DecisionLog:
    def __init__(self, policy: schedule.Policy) -> None:
        self.policy = policy
        self.fold = Fold()
        self.messages: list[tuple[str, int, bytes]] = []

    def add(self, *events: ev.Event) -> list[ev.Event | None]:
        """Store and fold; returns what the fold accepted (None for a refused message)."""
        accepted = []
        for event in events:
            subject, data = subjects.subject_for(event), ev.encode(event)
            self.messages.append((subject, len(self.messages) + 1, data))
            accepted.append(self.fold.apply(subject, len(self.messages), data).event)
        return accepted

    def decide(self, at: datetime) -> list[ev.Event]:
        return list(schedule.decide(self.fold, at, "c", self.policy))

    def settle(self, at: datetime) -> list[ev.Event]:
        """Publish what is decided (as the coordinator would) until nothing more is."""
        published = []
        while decisions := self.decide(at):
            self.add(*decisions)
            published += decisions
        return published
