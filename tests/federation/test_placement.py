"""The placement function: fit, locality, GPUs, random tiebreak and the 'never fits' message."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter

from federation.placement import (
    GpuSlot,
    LeaseRequest,
    ProviderCapacity,
    largest_offer,
    place,
    place_with_owner_priority,
    why_waiting,
)

GiB = 2**30


def cap(pid: str, lab: str, cpus: float = 4, mem: int = 8 * GiB, gpus=(), site: str = ""):
    return ProviderCapacity(pid, lab, site or lab, cpus, mem, list(gpus))


def req(lid: str, cluster: str = "c1", cpus: float = 1, mem: int = GiB, gpus: int = 0,
        model: str | None = None):
    return LeaseRequest(lid, cluster, cpus, mem, gpus, model)


def test_requests_that_do_not_fit_stay_pending():
    placed = place([req("big", cpus=8), req("ok")], [cap("p1", "a")], {}, random.Random(0))
    assert [p.lease_id for p in placed] == ["ok"]


def test_a_request_left_pending_says_why():
    providers = [cap("p1", "a", cpus=2), cap("p2", "b", cpus=1)]
    requests = [req("l1", cpus=2), req("l2", cpus=2)]
    placed = place(requests, providers, {}, random.Random(0))
    assert [p.lease_id for p in placed] == ["l1"]
    # The snapshot now holds what the pass left: p1 full, p2 with its one CPU.
    assert why_waiting(requests[1], providers) == (
        "waiting for 2 CPUs and 1.00 GiB to come free: all 2 online providers are busy (the "
        "most free has 1 CPU, 8.00 GiB)")
    only_c = LeaseRequest("l3", "c1", 1, GiB, allowed_labs=frozenset({"c"}))
    assert why_waiting(only_c, providers) == (
        "no provider of the labs c this cluster is restricted to is online")
    assert why_waiting(req("l4"), []) == "no provider is online"
    gpu = req("l5", gpus=1, model="a100")
    assert why_waiting(gpu, [cap("g", "a", gpus=[GpuSlot(0, "T4", 16 * GiB)])]).startswith(
        "waiting for 1 CPU and 1.00 GiB and 1 a100 GPUs to come free: the one online provider "
        "is busy")


def test_free_capacity_is_consumed_within_one_pass():
    placed = place([req(f"l{i}") for i in range(3)], [cap("p1", "a", cpus=2)], {},
                   random.Random(0))
    assert len(placed) == 2
    placed = place([req(f"l{i}", mem=3 * GiB) for i in range(3)],
                   [cap("p1", "a", mem=8 * GiB)], {}, random.Random(0))
    assert len(placed) == 2


def test_a_cluster_stays_on_its_lab_then_overflows():
    providers = [cap("pa", "a", cpus=2), cap("pb", "b", cpus=2)]
    placed = place([req(f"l{i}") for i in range(3)], providers, {"c1": Counter({"b": 1})},
                   random.Random(1))
    assert [p.provider_id for p in placed] == ["pb", "pb", "pa"]


def test_locality_prefers_the_site_when_the_lab_is_full():
    providers = [cap("far", "x", site="east"), cap("near", "y", site="west"),
                 cap("home", "z", cpus=0, site="west")]
    for seed in range(10):
        placed = place([req("l1")], [ProviderCapacity(**vars(p)) for p in providers],
                       {"c1": Counter({"z": 3})}, random.Random(seed))
        assert placed[0].provider_id == "near"


def test_ties_are_broken_at_random():
    chosen = set()
    for seed in range(20):
        providers = [cap("p1", "a"), cap("p2", "b"), cap("p3", "c")]
        chosen.add(place([req("l1")], providers, {}, random.Random(seed))[0].provider_id)
    assert chosen == {"p1", "p2", "p3"}


def test_machines_whose_owners_take_them_back_often_come_last():
    for seed in range(20):
        often, seldom = cap("p1", "a"), cap("p2", "b")
        often.preemption_rate, seldom.preemption_rate = 0.5, 0.04
        placed = place([req("l1")], [often, seldom], {}, random.Random(seed))
        assert placed[0].provider_id == "p2"
    # Locality still comes first: a cluster already on lab a stays there.
    often, seldom = cap("p1", "a"), cap("p2", "b")
    often.preemption_rate = 0.5
    placed = place([req("l1")], [often, seldom], {"c1": Counter({"a": 2})}, random.Random(0))
    assert placed[0].provider_id == "p1"


def test_a_cluster_with_workers_that_accept_no_peers_stays_within_their_site():
    from federation.placement import Reach, why_waiting

    closed = cap("behind-nat", "a", cpus=1, site="north")
    closed.accepts_peers = False
    elsewhere = cap("open-south", "b", cpus=4, site="south")
    reach: dict[str, Reach] = {}
    placed = place([req("l1")], [closed], {}, random.Random(0), reach)
    assert [p.provider_id for p in placed] == ["behind-nat"]
    assert reach["c1"].closed == {"north"}
    # The cluster's next worker may not go south (the north worker cannot be reached from
    # there); it waits, and says why.
    assert place([req("l2")], [elsewhere], {}, random.Random(0), reach) == []
    why = why_waiting(req("l2"), [elsewhere], reach["c1"])
    assert "at site north" in why and "accept no connections from other sites" in why
    # Another cluster, and a provider at the same site, are not held back.
    north = cap("open-north", "c", cpus=2, site="north")
    assert [p.provider_id for p in place([req("l3")], [elsewhere, north], {},
                                         random.Random(0), reach)] == ["open-north"]
    assert [p.provider_id for p in place([req("l4", cluster="c2")], [elsewhere], {},
                                         random.Random(0), reach)] == ["open-south"]
    # A closed provider joins only a cluster that is all at its own site.
    assert not Reach({"south"}, set()).admits(closed)
    assert Reach({"north"}, set()).admits(closed)
    assert Reach({"north", "south"}, set()).admits(elsewhere)


def test_gpus_by_model_and_never_twice():
    gpus = [GpuSlot(0, "NVIDIA A100-SXM4-40GB", 40 * GiB), GpuSlot(1, "NVIDIA A100-SXM4-40GB",
                                                                    40 * GiB),
            GpuSlot(2, "NVIDIA GeForce RTX 4090", 24 * GiB)]
    providers = [cap("g", "a", cpus=16, mem=64 * GiB, gpus=gpus)]
    placed = place([req("l1", gpus=1, model="a100"), req("l2", gpus=1, model="A100"),
                    req("l3", gpus=1, model="a100"), req("l4", gpus=1, model="4090")],
                   providers, {}, random.Random(0))
    assert [(p.lease_id, p.gpu_indices) for p in placed] == [("l1", (0,)), ("l2", (1,)),
                                                            ("l4", (2,))]


def test_largest_offer_explains_what_never_fits():
    providers = [cap("p1", "a", cpus=4, mem=8 * GiB, gpus=[GpuSlot(0, "T4", 16 * GiB)]),
                 cap("p2", "b", cpus=8, mem=4 * GiB)]
    assert largest_offer(providers, req("x", cpus=2)) is None
    assert largest_offer(providers, req("x", cpus=16)) == (
        "asked for 16 CPUs; the largest provider has 8")
    assert largest_offer(providers, req("x", gpus=4)) == (
        "asked for 4 GPUs; the largest provider has 1")
    assert "of memory; the largest provider has 8.00 GiB" in largest_offer(
        providers, req("x", mem=32 * GiB))
    # Each part fits somewhere, but not all on one machine.
    assert "no single provider has 8 CPUs" in largest_offer(providers,
                                                            req("x", cpus=8, mem=8 * GiB))
    assert largest_offer([], req("x")) == "no provider is registered with the federation yet"


def test_a_cluster_restricted_to_labs_or_sites_goes_nowhere_else():
    providers = [cap("pa", "lab-a", cpus=8, site="north"), cap("pb", "lab-b", cpus=2,
                                                                site="south")]
    only_b = LeaseRequest("l1", "c1", 1, GiB, lab="lab-a", allowed_labs=frozenset({"lab-b"}))
    placed = place_with_owner_priority([only_b], providers, {}, random.Random(0))
    assert [p.provider_id for p in placed] == ["pb"]  # not its own lab's bigger machine
    south = [LeaseRequest(f"l{i}", "c1", 1, GiB, allowed_sites=frozenset({"south"}))
             for i in range(3)]
    fresh = [cap("pa", "lab-a", cpus=8, site="north"), cap("pb", "lab-b", cpus=2, site="south")]
    placed = place(south, fresh, {}, random.Random(0))
    assert [p.provider_id for p in placed] == ["pb", "pb"]  # the third waits for room there
    nowhere = LeaseRequest("l9", "c1", 1, GiB, allowed_labs=frozenset({"lab-x"}))
    assert largest_offer([cap("pa", "lab-a")], nowhere) == (
        "no provider is online in the labs ['lab-x'] this cluster is restricted to")


def test_gpu_models_match_by_class_or_whole_words_never_by_substring():
    from accounting import gpus
    from accounting.pricing import DEFAULT_GPU_CLASSES as classes

    a100 = "NVIDIA A100-SXM4-80GB"
    assert gpus.matches("a100", a100, classes) and gpus.matches("A100", a100, classes)
    assert not gpus.matches("a10", a100, classes)  # the A10 class, not a prefix of A100
    assert gpus.matches("a10", "NVIDIA A10G", classes)
    assert gpus.matches("rtx 4090", "NVIDIA GeForce RTX 4090", classes)
    assert not gpus.matches("rtx 409", "NVIDIA GeForce RTX 4090", classes)
    assert gpus.matches(None, a100, classes) and gpus.matches(" ", a100, classes)
    assert gpus.class_of("NVIDIA H200", classes) == "h200"
    assert gpus.class_of("Some Future Card", classes) is None
    slots = [GpuSlot(0, a100, 80 * GiB), GpuSlot(1, "NVIDIA A10G", 24 * GiB)]
    placed = place([req("l1", gpus=1, model="a10")], [cap("p", "a", gpus=slots)], {},
                   random.Random(0))
    assert [(p.gpu_indices, p.gpu_model) for p in placed] == [((1,), "NVIDIA A10G")]


def test_the_indexed_pass_picks_a_best_fitting_provider_every_time():
    """Against the definition, on random federations: each placed request went to a provider
    that fits, its cluster can reach, and has the best (lab count, site count, preemption
    step) key among those at that moment; each unplaced request had no such provider."""
    from federation.placement import Reach, fits

    for seed in range(60):
        rng = random.Random(seed)
        providers = []
        for i in range(rng.randrange(1, 40)):
            lab = f"lab-{rng.randrange(5)}"
            site = f"site-{rng.randrange(3)}" if rng.random() < 0.3 else lab
            gpus = [GpuSlot(g, rng.choice(["NVIDIA A100", "NVIDIA T4"]), 16 * GiB)
                    for g in range(rng.choice([0, 0, 2]))]
            p = ProviderCapacity(f"p{i}", lab, site, float(rng.choice([1, 2, 4])),
                                 rng.choice([2, 4, 8]) * GiB, gpus,
                                 preemption_rate=rng.choice([0.0, 0.04, 0.3, 0.9]),
                                 accepts_peers=rng.random() < 0.8)
            providers.append(p)
        requests = []
        for i in range(rng.randrange(1, 60)):
            gpu = rng.random() < 0.15
            allowed = (frozenset({f"lab-{rng.randrange(5)}"}) if rng.random() < 0.15
                       else frozenset())
            sites = (frozenset({f"site-{rng.randrange(3)}", "lab-1"}) if rng.random() < 0.1
                     else frozenset())
            requests.append(LeaseRequest(f"l{i}", f"c{rng.randrange(6)}",
                                         rng.choice([0.5, 1, 2]), rng.choice([1, 2]) * GiB,
                                         1 if gpu else 0, "a100" if gpu else None,
                                         allowed_labs=allowed, allowed_sites=sites))
        held = {f"c{c}": Counter({f"lab-{rng.randrange(5)}": 1}) for c in range(3)}
        reference = {p.provider_id: ProviderCapacity(p.provider_id, p.lab, p.site,
                                                     p.free_cpus, p.free_memory,
                                                     list(p.free_gpus), p.preemption_rate,
                                                     p.accepts_peers) for p in providers}
        placed = {p.lease_id: p for p in place(requests, providers, held,
                                               random.Random(seed))}
        labs = {c: Counter(n) for c, n in held.items()}
        sites_of = {c: Counter() for c in held}
        site_of_lab = {p.lab: p.site for p in reference.values()}
        for c, counts in labs.items():
            for lab, n in counts.items():
                sites_of[c][site_of_lab.get(lab, "")] += n
        reach: dict[str, Reach] = {}
        for r in requests:
            where = reach.setdefault(r.cluster_id, Reach())
            lc = labs.setdefault(r.cluster_id, Counter())
            sc = sites_of.setdefault(r.cluster_id, Counter())
            ok = [p for p in reference.values() if fits(p, r) and where.admits(p)]

            def key(p, lc=lc, sc=sc):
                return (lc[p.lab], sc[p.site], -round(p.preemption_rate, 1))

            if r.lease_id not in placed:
                assert not ok, (seed, r, ok)
                continue
            chosen = reference[placed[r.lease_id].provider_id]
            assert chosen in ok, (seed, r, chosen)
            assert key(chosen) == max(map(key, ok)), (seed, r, chosen, ok)
            chosen.free_cpus -= r.cpus
            chosen.free_memory -= r.memory
            taken = set(placed[r.lease_id].gpu_indices)
            chosen.free_gpus = [g for g in chosen.free_gpus if g.index not in taken]
            lc[chosen.lab] += 1
            sc[chosen.site] += 1
            where.add(chosen)


def test_a_provider_with_the_environment_built_comes_first_and_one_that_cannot_run_it_never():
    """Placement prefers a machine that has the cluster's environment built (its worker
    starts with no build), falls back to others, and never uses one that cannot run it."""
    env = "0" * 32
    for seed in range(20):
        providers = [cap("cold-1", "a"), cap("cold-2", "b"),
                     dataclasses.replace(cap("warm", "c"), environments=frozenset({env}))]
        wanted = dataclasses.replace(req("l1"), environment=env)
        placed = place([wanted], providers, {}, random.Random(seed))
        assert [p.provider_id for p in placed] == ["warm"]
    full = [cap("cold", "a"), dataclasses.replace(cap("warm", "c", cpus=0),
                                                  environments=frozenset({env}))]
    placed = place([dataclasses.replace(req("l1"), environment=env)], full, {},
                   random.Random(0))
    assert [p.provider_id for p in placed] == ["cold"]  # a build beats waiting
    refused = dataclasses.replace(req("l1"), environment=env, excluded=frozenset({"fixed"}),
                                  environment_note="fixed (lab a) runs dask 1; needs dask 2")
    only = [cap("fixed", "a")]
    assert place([refused], only, {}, random.Random(0)) == []
    assert why_waiting(refused, only) == ("no online provider can run this cluster's software "
                                          "environment: fixed (lab a) runs dask 1; needs "
                                          "dask 2")
