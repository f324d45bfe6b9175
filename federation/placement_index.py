"""An index of providers by lab, preemption step and GPUs, so a placement pass over thousands
of providers does not score every provider for every request.

``place`` wants, for each request, a provider chosen uniformly at random among the fitting
ones with the best key (workers of the cluster in its lab, then at its site, then the lowest
preemption rate in 10 % steps). The index keeps lists of providers that still have room, per
(lab, site, step) and per step for all, for any request and for GPU requests; a request walks
the key's tiers from the best, and in each draws providers at random from the tier's lists,
taking the first that fits (a uniform choice among the fitting ones); only when a tier is
mostly full does it scan it. A provider too full for the smallest request of the pass leaves
every list.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Callable

#: Random draws within one tier before it is scanned instead.
DRAWS = 24

Key = tuple  # (lab or None, site or None, preemption step, GPUs only)


def step(rate: float) -> float:
    """A preemption rate in 10 % steps: smaller differences leave the choice random."""
    return round(rate, 1)


class ProviderLists:
    """Providers in lists with O(1) removal (swap with the last)."""

    def __init__(self) -> None:
        self.lists: dict[Key, list] = defaultdict(list)
        self._where: dict[int, dict[Key, int]] = defaultdict(dict)

    def add(self, key: Key, cap) -> None:
        items = self.lists[key]
        self._where[id(cap)][key] = len(items)
        items.append(cap)

    def remove(self, cap, keys: list[Key] | None = None) -> None:
        places = self._where.get(id(cap), {})
        for key in list(places if keys is None else keys):
            if key not in places:
                continue
            items, at = self.lists[key], places.pop(key)
            last = items.pop()
            if last is not cap:
                items[at] = last
                self._where[id(last)][key] = at


class CandidateIndex:
    """The providers of one placement pass, for finding the best fitting one quickly."""

    def __init__(self, providers: list, min_cpus: float, min_memory: int):
        self.min_cpus, self.min_memory = min_cpus, min_memory
        self.lists = ProviderLists()
        self.labs_at: dict[str, set[str]] = defaultdict(set)
        self.sites_of: dict[str, set[str]] = defaultdict(set)
        for cap in providers:
            self.labs_at[cap.site].add(cap.lab)
            self.sites_of[cap.lab].add(cap.site)
            if not self._has_room(cap):
                continue
            s = step(cap.preemption_rate)
            for lab, site in ((cap.lab, cap.site), (None, None)):
                self.lists.add((lab, site, s, False), cap)
                if cap.free_gpus:
                    self.lists.add((lab, site, s, True), cap)
        self.steps: list[float] = sorted({k[2] for k in self.lists.lists})

    def _has_room(self, cap) -> bool:
        return cap.free_cpus >= self.min_cpus and cap.free_memory >= self.min_memory

    def taken(self, cap) -> None:
        """``cap`` lost capacity: drop it where it can no longer serve."""
        if not self._has_room(cap):
            self.lists.remove(cap)
        elif not cap.free_gpus:
            s = step(cap.preemption_rate)
            self.lists.remove(cap, [(cap.lab, cap.site, s, True), (None, None, s, True)])

    def best(self, labs_allowed: set[str] | None, lab_counts: Counter, site_counts: Counter,
             gpus: bool, ok: Callable[[object], bool], rng: random.Random):
        """A provider for which ``ok`` holds, uniformly at random among those with the best
        (lab count, site count, -preemption step) key; None when none fits."""
        gpu = bool(gpus)
        # Machines where the cluster already is (by lab or by site) come first, by their key.
        pairs = {(lab, site) for lab in lab_counts for site in self.sites_of.get(lab, ())}
        pairs |= {(lab, site) for site in site_counts for lab in self.labs_at.get(site, ())}
        near: dict[tuple, list[Key]] = defaultdict(list)
        for lab, site in pairs:
            if labs_allowed is not None and lab not in labs_allowed:
                continue
            lc, sc = lab_counts.get(lab, 0), site_counts.get(site, 0)
            if lc or sc:
                for s in self.steps:
                    near[(lc, sc, -s)].append((lab, site, s, gpu))
        for key in sorted(near, reverse=True):
            found = self._pick(near[key], ok, rng)
            if found is not None:
                return found
        for s in self.steps:
            keys = ([(None, None, s, gpu)] if labs_allowed is None
                    else [(lab, site, s, gpu) for lab in sorted(labs_allowed)
                          for site in sorted(self.sites_of.get(lab, ()))])
            found = self._pick(keys, ok, rng)
            if found is not None:
                return found
        return None

    def _pick(self, keys: list[Key], ok: Callable[[object], bool], rng: random.Random):
        lists = [items for k in keys if (items := self.lists.lists.get(k))]
        total = sum(len(items) for items in lists)
        if not total:
            return None
        for _ in range(min(DRAWS, total)):
            r = rng.randrange(total)
            for items in lists:
                if r < len(items):
                    cap = items[r]
                    break
                r -= len(items)
            if ok(cap):
                return cap
        fitting = [cap for items in lists for cap in items if ok(cap)]
        return rng.choice(fitting) if fitting else None
