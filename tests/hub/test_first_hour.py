"""A student's first hour, driven in headless Chromium: sign in through the institution, the
server spawns with the example notebooks, the launcher offers the Parallex kernel, a new
notebook runs a P2P merge on the pool and shows only the answer, the Dask dashboard opens
through the user's own server, and the Dask sidebar finds the kernel's cluster and makes a new
FederatedCluster. The screenshots it takes are the README's (saved under docs/screenshots/ with
PARALLEX_SCREENSHOTS=1, else in the test's temporary folder)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import httpx

from tests.utils.browser import chromium
from tests.utils.notebook import UI_TIMEOUT_MS, open_jupyterlab, run_cell
from tests.utils.procs import agents_folder, kill_workers_under, wait_until

SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"

MERGE_CELL = """\
import pandas as pd, dask.dataframe as dd
left = dd.from_pandas(pd.DataFrame({'k': range(2000), 'a': 1}), npartitions=4)
right = dd.from_pandas(pd.DataFrame({'k': range(0, 2000, 2), 'b': 2}), npartitions=2)
print(len(left.merge(right, on='k').compute()))"""

def test_a_students_first_hour_in_jupyterlab(hub, tmp_path):
    user = "alice@north"
    agents = agents_folder()
    agent = None
    shots = SCREENSHOTS if os.environ.get("PARALLEX_SCREENSHOTS") else tmp_path
    shots.mkdir(parents=True, exist_ok=True)
    try:
        with chromium() as browser:
            # 1-2. Sign in through the institution; the hub spawns the server and opens Lab.
            context, page = open_jupyterlab(browser, hub.url, "north", "alice", "alice-pw")
            # The lab (made by the sign-in) gets a machine.
            agent = hub.start_lab_agent("north-physics", agents / "agent", "north-lab-1")
            # 3. The examples are in the new home.
            listing = page.locator(".jp-DirListing-content")
            listing.get_by_text("quickstart.ipynb").wait_for()
            assert listing.get_by_text("remote.ipynb").count() == 1
            # 4. The launcher offers the Parallex kernel; a new notebook merges on the pool.
            card = page.locator('.jp-LauncherCard[data-category="Notebook"]',
                                has_text="Parallex")
            assert card.count() == 1
            card.click()
            page.wait_for_selector(".jp-Notebook .jp-Cell .cm-content")
            page.get_by_text("Parallex | Idle").wait_for()
            answer = run_cell(page, MERGE_CELL, 0)
            # 5. Only the answer (and the one progress line of a first dask cell).
            lines = [ln for ln in answer.splitlines() if ln.strip()]
            assert lines[-1] == "1000", answer
            assert set(lines[:-1]) <= {"Parallex: waiting for the pool connection…"}, answer
            # JupyterLab's "get news?" toast would cover the screenshot: answer it.
            news = page.locator(".Toastify__toast", has_text="Jupyter news")
            if news.count():
                news.get_by_text("No", exact=True).click()
                news.wait_for(state="detached")
            page.screenshot(path=str(shots / "notebook-merge.png"))
            # 6. The dashboard link points into the user's own server and opens there.
            status = run_cell(page, "%parallex", 1)
            link = re.search(r"dashboard: (\S+)", status)
            assert link, status
            assert link.group(1).startswith(f"/user/{user}/proxy/"), status
            dashboard = context.new_page()  # the same browser session (hub cookies)
            dashboard.goto(hub.url + link.group(1))
            dashboard.wait_for_function("document.title.includes('Dask')",
                                        timeout=UI_TIMEOUT_MS)
            dashboard.locator(".bk-Canvas, canvas").first.wait_for()
            dashboard.screenshot(path=str(shots / "dask-dashboard-through-hub.png"))
            dashboard.close()
            # 7. The Dask sidebar finds the kernel's cluster, and NEW makes a FederatedCluster.
            page.locator('.lm-TabBar-tab[data-id="dask-dashboard-launcher"]').click()
            url_box = page.locator(".dask-URLInput-wrapper input")
            # The sidebar asks the notebook's kernel for its default client's dashboard_link
            # (the search button does it on demand; it also does when the notebook changes).
            page.locator('jp-button[title="Auto-detect dashboard URL"]').click()
            wait_until(lambda: url_box.input_value().startswith(f"/user/{user}/proxy/"), 60,
                       "the sidebar to find the kernel's dashboard")
            assert url_box.input_value() in link.group(1), url_box.input_value()
            page.locator('jp-button[data-command="dask:launch-cluster"]').click()
            page.locator(".dask-ClusterListingItem-title",
                         has_text="FederatedCluster 1").wait_for()
            page.screenshot(path=str(shots / "dask-sidebar.png"))
            with httpx.Client(base_url=f"{hub.broker_url}/api/v1", timeout=30,
                              headers={"Authorization": f"Bearer {hub.admin_token}"}) as b:
                active = [c for c in b.get("/clusters").json() if c["active"]]
            assert sorted(c["user"] for c in active) == [user, user], active
    except BaseException:
        # What the student's kernel logged (Dask, Parallex, its scheduler process).
        for log in (hub.tmp / "hub" / "users" / user / ".parallex" / "logs").glob("*.log"):
            print(f"==== {log}\n{log.read_text(errors='replace')[-6000:]}")
        raise
    finally:
        hub.api("DELETE", f"/users/{user}/server")
        if agent is not None:
            agent.stop()
        kill_workers_under([agents / "agent"])
        shutil.rmtree(agents, ignore_errors=True)
