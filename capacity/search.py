"""The planner's upper level: which devices form a group and which phase (prefill or decode) each group
serves. An initial grouping by hierarchical clustering on link bandwidth, then a tabu search over the
moves {flip a group's phase, split a group, merge two groups, move devices between groups}.

Pure and deterministic: the same inventory, scorer and seed give the same result. Groups hold devices of
one type (a group becomes one pool, and a pool has one device type)."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from capacity.inventory import Device, Inventory

PREFILL, DECODE = "prefill", "decode"
PHASES = (PREFILL, DECODE)
MOVE_SIZES = (1, 2, 4)  # devices one "move" step carries from a group to another


@dataclass(frozen=True, order=True)
class Group:
    devices: tuple[int, ...]  # device ids, ascending
    phase: str

    def flipped(self) -> Group:
        return Group(self.devices, PREFILL if self.phase == DECODE else DECODE)


Solution = tuple[Group, ...]  # groups sorted by their devices: one spelling per grouping


def canonical(groups: list[Group] | tuple[Group, ...]) -> Solution:
    return tuple(sorted(Group(tuple(sorted(g.devices)), g.phase) for g in groups if g.devices))


def has_decode(solution: Solution) -> bool:
    return any(g.phase == DECODE for g in solution)


# --- initial grouping ---------------------------------------------------------------------------


def _agglomerate(distance: np.ndarray, threshold: float) -> list[int]:
    """Average-linkage agglomerative clustering: merge the two closest clusters while their mean pairwise
    distance is at most ``threshold``; returns a cluster label per point."""
    try:
        from scipy.cluster.hierarchy import fcluster, linkage
        from scipy.spatial.distance import squareform
    except ImportError:
        pass
    else:
        if len(distance) < 2:
            return [0] * len(distance)
        z = linkage(squareform(distance, checks=False), method="average")
        return [int(c) - 1 for c in fcluster(z, t=threshold, criterion="distance")]
    clusters = [[i] for i in range(len(distance))]
    while len(clusters) > 1:
        best = None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                d = float(distance[np.ix_(clusters[a], clusters[b])].mean())
                if best is None or d < best[0]:
                    best = (d, a, b)
        if best[0] > threshold:
            break
        _, a, b = best
        clusters[a] += clusters.pop(b)
    labels = [0] * len(distance)
    for label, members in enumerate(clusters):
        for i in members:
            labels[i] = label
    return labels


def cluster_devices(inv: Inventory) -> list[tuple[int, ...]]:
    """Devices clustered on link bandwidth (distance = 1 / bandwidth, average linkage), then split by device
    type; sorted by first device id. The cut sits halfway (geometrically) between the slowest link
    inside a server and the fastest link between servers, so servers stay whole and the network's
    faster links can join servers; when some network link is as fast as a server's own, between the
    two slowest distinct links."""
    bw = inv.bandwidth_gbps
    dist = 1.0 / bw
    np.fill_diagonal(dist, 0.0)
    off = ~np.eye(len(dist), dtype=bool)
    nodes = np.array([d.node for d in inv.devices])
    same = (nodes[:, None] == nodes[None, :]) & off
    between = nodes[:, None] != nodes[None, :]
    levels = np.unique(dist[off])
    if not between.any():
        threshold = float("inf")
    elif dist[same].size and dist[same].max() < dist[between].min():
        threshold = float(np.sqrt(dist[same].max() * dist[between].min()))
    else:
        threshold = float(np.sqrt(levels[-1] * levels[-2])) if levels.size > 1 else float("inf")
    labels = _agglomerate(dist, threshold)
    groups: dict[tuple[int, str], list[int]] = {}
    for d in inv.devices:
        groups.setdefault((labels[d.id], d.type), []).append(d.id)
    return sorted(tuple(g) for g in groups.values())


def initial_solution(inv: Inventory, prefill_rank: Callable[[str], float]) -> Solution:
    """The clusters, phases by device type: clusters whose type ranks highest for prefill (``prefill_rank``,
    e.g. compute per unit of bandwidth) serve prefill until they hold half the devices; at least one
    cluster decodes (a lone cluster is halved)."""
    clusters = cluster_devices(inv)
    if len(clusters) == 1 and len(clusters[0]) > 1:
        half = len(clusters[0]) // 2
        clusters = [clusters[0][:half], clusters[0][half:]]
    ordered = sorted(clusters, key=lambda c: (-prefill_rank(inv.devices[c[0]].type), c))
    total, taken, groups = len(inv.devices), 0, []
    for i, c in enumerate(ordered):
        prefill = taken < total / 2 and i < len(ordered) - 1
        taken += len(c) if prefill else 0
        groups.append(Group(c, PREFILL if prefill else DECODE))
    return canonical(groups)


# --- moves ---------------------------------------------------------------------------------------


def _ordered(inv: Inventory, devices: tuple[int, ...]) -> list[Device]:
    return sorted((inv.devices[i] for i in devices), key=lambda d: (d.node, d.id))


def split_group(inv: Inventory, g: Group) -> tuple[Group, Group]:
    """A group spanning nodes splits at its first node boundary; one node's group splits in halves."""
    devs = _ordered(inv, g.devices)
    first_node = [d for d in devs if d.node == devs[0].node]
    cut = len(first_node) if len(first_node) < len(devs) else len(devs) // 2
    return Group(tuple(d.id for d in devs[:cut]), g.phase), Group(tuple(d.id for d in devs[cut:]), g.phase)


def neighbours(inv: Inventory, solution: Solution) -> Iterator[tuple[str, Solution]]:
    """Every solution one move away, in a fixed order, each with the move's name."""
    groups = list(solution)
    typ = [inv.devices[g.devices[0]].type for g in groups]
    for i, g in enumerate(groups):
        s = canonical(groups[:i] + [g.flipped()] + groups[i + 1 :])
        if has_decode(s):
            yield f"flip {i}", s
    for i, g in enumerate(groups):
        if len(g.devices) > 1:
            yield f"split {i}", canonical(groups[:i] + list(split_group(inv, g)) + groups[i + 1 :])
    for i in range(len(groups)):
        for j in range(i + 1, len(groups)):
            if typ[i] != typ[j]:
                continue
            rest = [h for k, h in enumerate(groups) if k not in (i, j)]
            for phase in sorted({groups[i].phase, groups[j].phase}):
                s = canonical(rest + [Group(groups[i].devices + groups[j].devices, phase)])
                if has_decode(s):
                    yield f"merge {i} {j} {phase}", s
    for i, src in enumerate(groups):
        for j, dst in enumerate(groups):
            if i == j or typ[i] != typ[j]:
                continue
            dst_nodes = {inv.devices[d].node for d in dst.devices}
            # devices on a node the destination already uses go first (they keep its replicas node-local)
            order = sorted(_ordered(inv, src.devices), key=lambda d: (d.node not in dst_nodes, d.node, -d.id))
            for k in MOVE_SIZES:
                if k >= len(src.devices):
                    break
                moved = {d.id for d in order[:k]}
                new_src = Group(tuple(d for d in src.devices if d not in moved), src.phase)
                new_dst = Group(dst.devices + tuple(sorted(moved)), dst.phase)
                rest = [h for n, h in enumerate(groups) if n not in (i, j)]
                yield f"move {k} {i}->{j}", canonical(rest + [new_src, new_dst])


# --- tabu search ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchConfig:
    iterations: int = 60
    tenure: int = 8  # solutions visited in the last `tenure` steps are tabu (unless they beat the best)
    max_neighbours: int = 48  # a seeded sample of the neighbourhood when it is larger
    patience: int = 20  # stop after this many steps without a new best
    seed: int = 0


@dataclass(frozen=True)
class SearchResult:
    best: Solution
    best_score: float
    ranked: tuple[tuple[float, Solution], ...]  # every solution scored, best first
    iterations: int
    evaluations: int


def tabu_search(
    inv: Inventory, initial: Solution, score: Callable[[Solution], float], cfg: SearchConfig = SearchConfig()
) -> SearchResult:
    """Tabu search from ``initial``: each step moves to the best-scoring non-tabu neighbour (a tabu one
    only when it beats the best so far), even when that is worse than the current solution."""
    rng = random.Random(cfg.seed)
    scores: dict[Solution, float] = {}

    def scored(s: Solution) -> float:
        if s not in scores:
            scores[s] = score(s)
        return scores[s]

    current, best = initial, initial
    best_score = scored(initial)
    tabu: deque[Solution] = deque([initial], maxlen=cfg.tenure)
    since_best, steps = 0, 0
    for steps in range(1, cfg.iterations + 1):  # noqa: B007 (steps taken is reported)
        cands = list(neighbours(inv, current))
        if len(cands) > cfg.max_neighbours:
            cands = rng.sample(cands, cfg.max_neighbours)
        chosen = None
        for _, s in cands:
            v = scored(s)
            if s in tabu and v <= best_score:
                continue
            if chosen is None or v > chosen[0] or (v == chosen[0] and s < chosen[1]):
                chosen = (v, s)
        if chosen is None:
            break
        current = chosen[1]
        tabu.append(current)
        if chosen[0] > best_score:
            best, best_score, since_best = current, chosen[0], 0
        else:
            since_best += 1
            if since_best >= cfg.patience:
                break
    ranked = tuple(sorted(((v, s) for s, v in scores.items()), key=lambda x: (-x[0], x[1])))
    return SearchResult(best, best_score, ranked, steps, len(scores))
