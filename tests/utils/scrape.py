"""What a broker's /metrics says, read as a site's monitoring would."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def responses_by_status(api: str, admin: dict) -> dict[tuple[str, str, str], float]:
    """The broker's count of its answers, by (method, route, status)."""
    text = httpx.get(f"{api}/metrics", headers=admin, timeout=30).raise_for_status().text
    return {(s.labels["method"], s.labels["route"], s.labels["status"]): s.value
            for family in text_string_to_metric_families(text)
            if family.name == "parallex_http_responses"
            for s in family.samples if s.name.endswith("_total")}


def samples(url: str, headers: dict | None = None) -> dict[str, float]:
    """Every sample of a /metrics page by name (for metrics without labels)."""
    text = httpx.get(url, headers=headers, timeout=30).raise_for_status().text
    return {s.name: s.value for family in text_string_to_metric_families(text)
            for s in family.samples}
