"""A notebook in JupyterLab, driven in headless Chromium: type a cell, run it, read its output."""

from __future__ import annotations

import re
from pathlib import Path

from tests.utils.procs import wait_until

REPO = Path(__file__).resolve().parents[2]

# Generous: the first JupyterLab load builds nothing, but a 2-core CI machine is slow.
UI_TIMEOUT_MS = 120_000


def open_jupyterlab(browser, hub_url: str, institution: str, username: str, password: str):
    """Sign in through ``institution`` in a new browser context, as a person does; returns
    (context, page) once the hub has spawned the server and JupyterLab shows its launcher."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    page.goto(f"{hub_url}/hub/login?institution={institution}")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    user = f"{username}@{institution}"
    page.wait_for_url(re.compile(rf".*/user/{re.escape(user)}/lab.*"), timeout=UI_TIMEOUT_MS)
    page.wait_for_selector(".jp-Launcher")
    return context, page


def run_cell(page, code: str, index: int) -> str:
    """Type ``code`` into the notebook's cell ``index`` (0-based), run it and return the text
    of its output once the cell has finished (its prompt shows a number again)."""
    cell = page.locator(".jp-Notebook .jp-Cell").nth(index)
    editor = cell.locator(".cm-content")
    editor.click()
    # insert_text, not typing: the editor's auto-indent and bracket closing would alter code.
    page.keyboard.insert_text(code)
    wait_until(lambda: editor.inner_text().strip() == code.strip(), 10,
               f"cell {index} to hold the code")
    run = page.locator('.jp-NotebookPanel-toolbar '
                       '[data-command="notebook:run-cell-and-select-next"]')
    run.click()
    prompt = cell.locator(".jp-InputArea-prompt")
    try:
        wait_until(lambda: prompt.inner_text().strip() != "[ ]:", 5, f"cell {index} to queue")
    except AssertionError:
        # Not queued: the click can land while Lab is still wiring the new notebook to its
        # kernel. A person clicks again; so do we, once, then select the cell back.
        cell.locator(".jp-InputArea-prompt").click()
        run.click()
    outputs = cell.locator(".jp-OutputArea-output")

    def text() -> str:
        return "\n".join(outputs.nth(i).inner_text() for i in range(outputs.count()))

    try:
        wait_until(lambda: re.fullmatch(r"\[\d+\]:", prompt.inner_text().strip()), 180,
                   f"cell {index} to finish")
    except AssertionError as exc:
        page.screenshot(path=str(REPO / ".pytest-failure.png"))
        raise AssertionError(f"{exc}; prompt {prompt.inner_text()!r}, output {text()!r}") \
            from None
    return text()
