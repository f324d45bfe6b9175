"""The hub settings file: the gateway keys are read, and bad ones are refused with what to
write instead."""

from __future__ import annotations

import pytest
import yaml

from hub_config.settings import SettingsError, load_settings

INSTITUTION = {"north": {"issuer": "https://login.north.example.edu", "client_id": "hub",
                         "client_secret": "s", "labs": [{"claim": "groups", "value": "physics",
                                                         "lab": "north-physics"}]}}


def settings_with(tmp_path, **keys):
    path = tmp_path / "hub.yaml"
    path.write_text(yaml.safe_dump({"institutions": INSTITUTION, **keys}))
    return load_settings(path, env={})


def test_the_gateway_runs_beside_the_broker_when_named(tmp_path):
    plain = settings_with(tmp_path)
    assert (plain.gateway, plain.gateway_public, plain.broker_listen) == (None, None, None)
    named = settings_with(tmp_path, gateway="0.0.0.0:8786",
                          gateway_public="gw.hub.example.edu:8786", broker_listen="0.0.0.0")
    assert (named.gateway, named.gateway_public, named.broker_listen) == (
        "0.0.0.0:8786", "gw.hub.example.edu:8786", "0.0.0.0")
    # A gateway of its own (`parallex gateway`): only where workers and schedulers dial it.
    apart = settings_with(tmp_path, gateway_public="gw.hub.example.edu:8786",
                          gateway_internal="10.0.0.5:8786")
    assert (apart.gateway, apart.gateway_public, apart.gateway_internal) == (
        None, "gw.hub.example.edu:8786", "10.0.0.5:8786")


@pytest.mark.parametrize("key, value", [("gateway", "8786"), ("gateway", "host:port"),
                                        ("gateway_public", "gw:99999"), ("gateway", ":8786"),
                                        ("gateway_internal", "10.0.0.5")])
def test_a_bad_gateway_address_is_refused_with_the_form_to_use(tmp_path, key, value):
    with pytest.raises(SettingsError, match=f"{key} must be HOST:PORT"):
        settings_with(tmp_path, **{key: value})
