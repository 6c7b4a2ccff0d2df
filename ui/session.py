"""What every view of one browser tab shares: the process's feed, the tab's theme, and a cache that
lets all tabs reuse one computation of a view's content per board version (and per second, for ages)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from dtf.ui.feed import Feed
from dtf.ui.theme import css


@dataclass
class SharedCache:
    """Process-wide: (view, theme) -> (stamp, value). One entry per view, so it never grows."""

    entries: dict[tuple[str, str], tuple[tuple, Any]] = field(default_factory=dict)

    def get(self, name: str, theme: str, stamp: tuple, compute: Callable[[], Any]) -> Any:
        found = self.entries.get((name, theme))
        if found is not None and found[0] == stamp:
            return found[1]
        value = compute()
        self.entries[(name, theme)] = (stamp, value)
        return value


@dataclass
class Session:
    feed: Feed
    theme: str
    cache: SharedCache
    now: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def stylesheet(self) -> str:
        return css(self.theme)

    def shared(self, name: str, compute: Callable[[], Any], per_second: bool = False) -> Any:
        """`compute()` once per board version (and second, when it shows ages) for every tab."""
        stamp = (self.feed.board.version, int(self.now.timestamp()) if per_second else 0)
        return self.cache.get(name, self.theme, stamp, compute)
