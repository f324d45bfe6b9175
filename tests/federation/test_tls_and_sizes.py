"""Certificates carry their role and lease id; sizes parse with readable errors."""

from __future__ import annotations

import pytest

from federation.inventory import Capacity, offer, parse_gpu_list
from federation.sizes import parse_memory
from federation.tls import (
    ROLE_WORKER,
    ClusterAuthority,
    certificate_identity,
    is_ca_certificate,
    key_matches,
    signed_by,
)


def test_worker_certificate_names_its_lease_and_role():
    ca = ClusterAuthority("t")
    creds = ca.worker_credentials("ls-0123456789abcdef")
    assert certificate_identity(creds.cert) == ("ls-0123456789abcdef", ROLE_WORKER)
    assert signed_by(creds.cert, ca.ca_pem)
    assert not signed_by(creds.cert, ClusterAuthority("other").ca_pem)
    assert key_matches(creds.cert, creds.key)
    assert not key_matches(creds.cert, ca.worker_credentials("ls-x").key)
    assert is_ca_certificate(ca.ca_pem) and not is_ca_certificate(creds.cert)
    assert not signed_by("not a certificate", ca.ca_pem)


@pytest.mark.parametrize(("value", "expected"), [("4 GiB", 4 * 2**30), ("512MB", 512 * 10**6),
                                                 (1024, 1024), ("1.5 GiB", int(1.5 * 2**30))])
def test_parse_memory(value, expected):
    assert parse_memory(value) == expected


@pytest.mark.parametrize(("value", "message"), [("lots", "memory 'lots' is not a size"),
                                                (0, "must be more than 0 bytes"),
                                                ("-1 GiB", "must be more than 0 bytes"),
                                                (True, "is not a size"), (None, "is not a size")])
def test_parse_memory_refuses(value, message):
    with pytest.raises(ValueError, match=message):
        parse_memory(value)


def test_offer_caps_by_flags():
    machine = Capacity(cpus=8, memory=16 * 2**30,
                       gpus=[{"index": 0, "model": "T4", "memory": 1},
                             {"index": 1, "model": "T4", "memory": 1}])
    offered = offer(cpus=4, memory="8 GiB", gpus="1", detected=machine)
    assert (offered.cpus, offered.memory, [g["index"] for g in offered.gpus]) == (4, 8 * 2**30,
                                                                                   [1])
    assert offer(detected=machine).gpus == machine.gpus
    assert offer(gpus="none", detected=machine).gpus == []
    with pytest.raises(ValueError, match="more than this machine has"):
        offer(memory="32 GiB", detected=machine)
    with pytest.raises(ValueError, match="must be a whole number of cores, at least 1; got 0"):
        offer(cpus=0, detected=machine)
    with pytest.raises(ValueError, match="must be a whole number of cores, at least 1; got 1.5"):
        offer(cpus=1.5, detected=machine)
    with pytest.raises(ValueError, match="not a list of GPU indices"):
        parse_gpu_list("first", machine.gpus)
