"""Spreading workers over zones.

Odd/even split: worker ``i`` (0-based) goes to zone ``i mod len(zones)``, so with two zones
the first zone gets ``ceil(n/2)`` and the second ``floor(n/2)``. The split then respects what
each zone can host right now:

* ``healthy_capacity[zone]`` is the most workers the zone can host now (``None`` or absent =
  unlimited). A zone that lost nodes keeps what it can host; the shortfall moves to the other
  zones, filling the least-loaded zone with spare room first.
* A zone in ``degraded`` hosts nothing while another zone is healthy: its whole share moves.
  When every zone is degraded the split ignores degradation (there is nowhere better to go).
* Workers no zone can host stay in their home zone (Nomad keeps them pending until nodes come
  back) and the note says so. The counts always sum to ``total``.

Pure code: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from nomadscale.core.errors import InputError
from nomadscale.core.values import ZoneCount


@dataclass(frozen=True, slots=True)
class ZoneSplit:
    counts: tuple[ZoneCount, ...]
    moved: int  # workers placed outside their odd/even home zone
    note: str  # one line, empty when the plain odd/even split was used
    unplaced: int = 0  # workers no zone can host now (kept in their home zone)

    @property
    def total(self) -> int:
        return sum(z.count for z in self.counts)

    def as_mapping(self) -> dict[str, int]:
        return {z.zone: z.count for z in self.counts}


def even_shares(total: int, n_zones: int) -> list[int]:
    """Round-robin shares: zone ``j`` gets the workers ``i`` with ``i % n_zones == j``."""
    if n_zones <= 0:
        raise InputError("zones: at least one zone is needed")
    if total < 0:
        raise InputError(f"zones: worker count must not be negative, got {total}")
    base, extra = divmod(total, n_zones)
    return [base + (1 if j < extra else 0) for j in range(n_zones)]


def _groups_for(
    zones: Sequence[str], groups: Sequence[str] | Mapping[str, str] | None
) -> list[str]:
    if groups is None:
        return ["" for _ in zones]
    if isinstance(groups, Mapping):
        return [groups.get(z, "") for z in zones]
    if len(groups) != len(zones):
        raise InputError(f"zones: {len(zones)} zones but {len(groups)} groups")
    return list(groups)


def split(
    total: int,
    *,
    zones: Sequence[str],
    groups: Sequence[str] | Mapping[str, str] | None = None,
    healthy_capacity: Mapping[str, int | None] | None = None,
    degraded: Collection[str] = frozenset(),
) -> ZoneSplit:
    """Split ``total`` workers over ``zones`` (odd/even), moving what a zone cannot host."""
    if len(set(zones)) != len(zones):
        raise InputError(f"zones: zone names must be unique, got {list(zones)}")
    shares = even_shares(total, len(zones))
    group_names = _groups_for(zones, groups)
    cap_in = healthy_capacity or {}
    all_degraded = all(z in degraded for z in zones)

    caps: list[int | None] = []
    for z in zones:
        c = cap_in.get(z)
        if c is not None and c < 0:
            raise InputError(f"zones: capacity of {z} must not be negative, got {c}")
        if z in degraded and not all_degraded:
            c = 0
        caps.append(c)

    counts = [s if c is None else min(s, c) for s, c in zip(shares, caps, strict=True)]
    shortfall = total - sum(counts)
    moved = 0
    # Fill the least-loaded zone that has room, one worker at a time (keeps the spread even).
    while shortfall > 0:
        room = [j for j, c in enumerate(caps) if c is None or counts[j] < c]
        if not room:
            break
        j = min(room, key=lambda k: (counts[k], k))
        counts[j] += 1
        shortfall -= 1
        moved += 1
    unplaced = shortfall
    if unplaced:
        # Nowhere to host them: keep them in their home zone, Nomad holds them pending.
        for j, s in enumerate(shares):
            cap = caps[j]
            home_short = 0 if cap is None else max(s - cap, 0)
            give = min(home_short, shortfall)
            counts[j] += give
            shortfall -= give

    notes: list[str] = []
    lost = [z for z, s, c in zip(zones, shares, caps, strict=True) if c is not None and s > c]
    for z, s, c in zip(zones, shares, caps, strict=True):
        if c is None or s <= c:
            continue
        why = "degraded" if (z in degraded and not all_degraded) else f"can host {c}"
        notes.append(f"{z} {why}, short {s - c}")
    if moved:
        targets = [
            z for z, s, n in zip(zones, shares, counts, strict=True) if n > s and z not in lost
        ]
        notes.append(f"moved {moved} to {','.join(targets)}")
    if unplaced:
        notes.append(f"{unplaced} unplaceable now, left pending in home zone")
    if all_degraded and degraded and len(zones) > 0:
        notes.append("all zones degraded, plain split")
    return ZoneSplit(
        counts=tuple(
            ZoneCount(zone=z, count=n, group=g)
            for z, n, g in zip(zones, counts, group_names, strict=True)
        ),
        moved=moved,
        note="; ".join(notes),
        unplaced=unplaced,
    )
