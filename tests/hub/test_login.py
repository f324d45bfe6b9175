"""Sign-in through real institutional identity providers into a real JupyterHub, and the
broker (the hub's managed service) accepting hub tokens only with its scope."""

from __future__ import annotations

import contextlib
import html
import shutil

import httpx
import pytest

from tests.utils.kernels import parallex_kernel, run
from tests.utils.procs import agents_folder, kill_workers_under, wait_until


def broker_whoami(hub, token: str) -> httpx.Response:
    return httpx.get(f"{hub.broker_url}/api/v1/whoami", timeout=30,
                     headers={"Authorization": f"Bearer {token}"})


def test_picker_lists_both_institutions(hub):
    page = httpx.get(f"{hub.url}/hub/login", timeout=30)
    assert page.status_code == 200
    assert "North University" in page.text and "South Institute" in page.text
    assert "institution=north" in page.text


def test_login_through_each_institution_lands_with_username_groups_and_lab(hub):
    landed = hub.login("north", "alice", "alice-pw")
    assert landed.status_code == 200 and str(landed.url).endswith("/hub/home"), landed.text[:500]
    assert "alice@north" in hub.users()
    assert hub.groups_of("alice@north") == {"north-physics"}

    # The same local name at another institution is another person.
    landed = hub.login("south", "alice", "alice-pw")
    assert landed.status_code == 200 and str(landed.url).endswith("/hub/home")
    assert hub.groups_of("alice@south") == {"south-chemistry"}

    pi = hub.login("north", "petra", "petra-pw")
    assert pi.status_code == 200
    assert hub.groups_of("petra@north") == {"north-physics", "north-physics-pis"}
    admin = hub.login("south", "root", "root-pw")
    assert admin.status_code == 200
    assert hub.groups_of("root@south") == {"south-hpc", "south-hpc-pis", "parallex-admins"}
    assert hub.api("GET", "/users/root@south").json()["admin"] is True

    # The memberships were written into the broker's books, with their roles.
    with httpx.Client(base_url=f"{hub.broker_url}/api/v1", timeout=30,
                      headers={"Authorization": f"Bearer {hub.admin_token}"}) as broker:
        members = broker.get("/labs/north-physics/members").json()["members"]
        assert {(m["user"], m["role"]) for m in members} == {("alice@north", "member"),
                                                             ("petra@north", "pi")}


@pytest.mark.parametrize(("mode", "says"), [
    ("tamper", "signature does not match North University's keys"),
    ("wrong_issuer", "was issued by another provider"),
    ("expired", "has expired"),
    ("nonce", "does not belong to this sign-in (nonce mismatch)"),
    ("wrong_audience", "was meant for another application"),
])
def test_bad_id_tokens_are_refused_and_create_no_user(hub, mode, says):
    hub.institutions["north"].relay.mode = mode
    before = hub.users()
    page = hub.login("north", "newcomer", "newcomer-pw")
    assert page.status_code == 403, page.text[:500]
    assert says in html.unescape(page.text)
    assert hub.users() == before


def test_unknown_institution_and_user_without_lab_are_refused(hub):
    before = hub.users()
    page = httpx.get(f"{hub.url}/hub/login", params={"institution": "atlantis"}, timeout=30)
    assert page.status_code == 400
    text = html.unescape(page.text)
    assert "There is no institution 'atlantis'" in text and "North University" in text

    page = hub.login("north", "nolab", "nolab-pw")
    assert page.status_code == 403
    assert "not linked to any lab that takes part in Parallex" in page.text
    assert "rc-help@north.example.edu" in page.text  # whom to ask
    assert hub.users() == before


def test_a_blocked_user_gets_no_lab_membership(hub):
    """JupyterHub's blocked_users check runs after authenticate(); the membership is written
    only for a login it let through (run_post_auth_hook)."""
    page = hub.login("north", "blocked", "blocked-pw")
    assert page.status_code == 403, page.status_code
    assert "blocked@north" not in hub.users()
    with httpx.Client(base_url=f"{hub.broker_url}/api/v1", timeout=30,
                      headers={"Authorization": f"Bearer {hub.admin_token}"}) as broker:
        # alice (not blocked) signs in too, so the lab exists and the check can fail.
        assert hub.login("north", "alice", "alice-pw").status_code == 200
        members = broker.get("/labs/north-physics/members")
        assert members.status_code == 200, members.text
        names = {m["user"] for m in members.json()["members"]}
    assert "alice@north" in names and "blocked@north" not in names


def test_broker_accepts_hub_tokens_only_with_its_scope(hub):
    assert hub.login("north", "alice", "alice-pw").status_code == 200
    scoped = hub.api("POST", "/users/alice@north/tokens",
                     json={"scopes": ["access:services!service=parallex"]})
    assert scoped.status_code == 201, scoped.text
    me = broker_whoami(hub, scoped.json()["token"])
    assert me.status_code == 200, me.text
    assert me.json() | {"token_id": None} == {"kind": "user", "lab": "north-physics",
                                              "user": "alice@north", "role": "member",
                                              "token_id": None, "max_cpus": None,
                                              "max_gpus": None}

    unscoped = hub.api("POST", "/users/alice@north/tokens",
                       json={"scopes": ["read:users!user=alice@north"]})
    assert unscoped.status_code == 201, unscoped.text
    refused = broker_whoami(hub, unscoped.json()["token"])
    assert refused.status_code == 403
    assert refused.json()["error"] == "missing-scope"
    assert "access:services!service=parallex" in refused.json()["message"]

    bogus = broker_whoami(hub, "not-a-token-of-anyone")
    assert bogus.status_code == 401


def test_auth_state_is_encrypted_and_refreshed_before_expiry(hub):
    with httpx.Client(follow_redirects=True, timeout=30) as browser:
        assert hub.login_with(browser, "north", "petra", "petra-pw").status_code == 200
        first = hub.api("GET", "/users/petra@north").json()["auth_state"]
        assert first["lab"] == "north-physics" and first["role"] == "pi"
        assert first["refresh_token"] and first["access_token"]
        with contextlib.closing(hub.db()) as con:
            (stored,) = con.execute("SELECT encrypted_auth_state FROM users WHERE name = ?",
                                    ("petra@north",)).fetchone()
        assert stored and first["access_token"].encode() not in stored  # encrypted at rest

        # The access token lives 60 s, less than the 300 s refresh margin: the hub's next
        # refresh_user call (asked every second here) renews it with the refresh token.
        def renewed():
            browser.get(f"{hub.url}/hub/home")
            state = hub.api("GET", "/users/petra@north").json()["auth_state"]
            return state if state["access_token"] != first["access_token"] else None

        state = wait_until(renewed, 30, "the access token to be refreshed")
        assert state["expires_at"] >= first["expires_at"]
        assert state["lab"] == "north-physics"


def test_kernel_on_the_hub_uses_the_server_token_through_the_proxy(hub, tmp_path):
    """What a notebook server on this hub does: the kernel holds the server's hub token (with
    the broker's scope) and reaches the broker through the hub's proxy at /services/parallex."""
    assert hub.login("north", "alice", "alice-pw").status_code == 200
    token = hub.api("POST", "/users/alice@north/tokens", json={
        "scopes": ["users:activity!user=alice@north", "access:services!service=parallex"]}
    ).json()["token"]
    agents = agents_folder()
    agent = hub.start_lab_agent("north-physics", agents / "agent", "north-server")
    try:
        env = {"PARALLEX_BROKER_URL": f"{hub.url}/services/parallex",
               "JUPYTERHUB_API_TOKEN": token}
        with parallex_kernel(tmp_path / "k", env) as (_km, kc):
            out = run(kc, "import dask.array as da\n"
                          "print(int(da.arange(1000, chunks=100).sum().compute()))\n"
                          "print(parallex_pool.me['user'], parallex_pool.cluster.workers_by_lab())")
            assert out.status == "ok", out.error + out.stderr
            assert "499500" in out.stdout
            assert "alice@north {'north-physics': " in out.stdout
    finally:
        agent.stop()
        kill_workers_under([agents / "agent"])
        shutil.rmtree(agents, ignore_errors=True)


def test_a_new_users_server_spawns_with_the_example_notebooks_and_the_kernel(hub):
    """The student's path after sign-in: the server starts (as root too, where the tests and
    `./dev up` in containers run), the home holds the examples, the Parallex kernel is there."""
    assert hub.login("north", "petra", "petra-pw").status_code == 200
    started = hub.api("POST", "/users/petra@north/server")
    assert started.status_code in (201, 202), started.text
    try:
        wait_until(lambda: hub.api("GET", "/users/petra@north").json()["servers"]
                   .get("", {}).get("ready"), 120, "petra's server to be ready")
        home = hub.tmp / "hub" / "users" / "petra@north"
        assert sorted(p.name for p in home.glob("*.ipynb")) == ["quickstart.ipynb",
                                                                 "remote.ipynb"]
        token = hub.api("POST", "/users/petra@north/tokens",
                        json={"scopes": ["access:servers!user=petra@north"]}).json()["token"]
        specs = httpx.get(f"{hub.url}/user/petra@north/api/kernelspecs", timeout=30,
                          headers={"Authorization": f"token {token}"})
        assert specs.status_code == 200, specs.text
        assert "parallex" in specs.json()["kernelspecs"]
    finally:
        hub.api("DELETE", "/users/petra@north/server")


def test_dask_labextension_makes_a_federated_cluster_whose_dashboard_opens_through_the_server(
        hub):
    """The Dask sidebar's "new cluster" button (dask-labextension's REST API in the user's
    server) makes an adaptive FederatedCluster on the pool; its dashboard link points into the
    user's own server (jupyter-server-proxy), and that link serves the Dask dashboard."""
    user = "alice@north"
    assert hub.login("north", "alice", "alice-pw").status_code == 200
    agents = agents_folder()
    agent = hub.start_lab_agent("north-physics", agents / "agent", "north-box")
    started = hub.api("POST", f"/users/{user}/server")
    assert started.status_code in (201, 202), started.text
    try:
        wait_until(lambda: hub.api("GET", f"/users/{user}").json()["servers"]
                   .get("", {}).get("ready"), 120, "alice's server to be ready")
        token = hub.api("POST", f"/users/{user}/tokens",
                        json={"scopes": [f"access:servers!user={user}"]}).json()["token"]
        with httpx.Client(base_url=hub.url, timeout=120,
                          headers={"Authorization": f"token {token}"}) as server:
            made = server.put(f"/user/{user}/dask/clusters")
            assert made.status_code == 200, made.text
            model = made.json()
            assert model["name"] == "FederatedCluster 1"
            assert model["adapt"] == {"minimum": 0, "maximum": 4}
            port = model["dashboard_link"].split("/proxy/")[1].split("/")[0]
            assert model["dashboard_link"] == f"/user/{user}/proxy/{port}/status"
            dashboard = server.get(model["dashboard_link"])
            assert dashboard.status_code == 200, dashboard.text[:500]
            assert "Dask" in dashboard.text
            with httpx.Client(base_url=f"{hub.broker_url}/api/v1", timeout=30,
                              headers={"Authorization": f"Bearer {hub.admin_token}"}) as b:
                clusters = [c for c in b.get("/clusters").json() if c["active"]]
            assert [c["user"] for c in clusters] == [user], clusters
            # The sidebar's scale box: a fixed size instead of adaptive.
            scaled = server.patch(f"/user/{user}/dask/clusters/{model['id']}",
                                  json={"workers": 1})
            assert scaled.status_code == 200, scaled.text
            wait_until(lambda: server.get(f"/user/{user}/dask/clusters/{model['id']}")
                       .json()["workers"] == 1, 60, "the sidebar's cluster to get 1 worker")
            assert server.delete(f"/user/{user}/dask/clusters/{model['id']}").status_code == 204
            assert server.get(f"/user/{user}/dask/clusters").json() == []
            with httpx.Client(base_url=f"{hub.broker_url}/api/v1", timeout=30,
                              headers={"Authorization": f"Bearer {hub.admin_token}"}) as b:
                assert not [c for c in b.get("/clusters").json() if c["active"]]
    finally:
        hub.api("DELETE", f"/users/{user}/server")
        agent.stop()
        kill_workers_under([agents / "agent"])
        shutil.rmtree(agents, ignore_errors=True)
