"""Filters of the router pipeline: which replicas may be picked at all, by name (``router.pipeline.filters``).
Pure: stdlib only."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from router.types import EndpointState


class Filter(Protocol):
    def keep(self, e: EndpointState) -> bool: ...


class Healthy:
    """Replicas the pool directory counts healthy (fresh stats, not suspected after a failed call)."""

    def keep(self, e: EndpointState) -> bool:
        return e.healthy


FILTERS: dict[str, Callable[[], Filter]] = {"healthy": Healthy}


def build_filters(names: Iterable[str]) -> tuple[Filter, ...]:
    return tuple(FILTERS[n]() for n in names)


def apply_filters(filters: Sequence[Filter], endpoints: Iterable[EndpointState]) -> list[EndpointState]:
    return [e for e in endpoints if all(f.keep(e) for f in filters)]
