"""Job records for a site's accounting collector: ``GET /api/v1/usage/records``."""

from __future__ import annotations

import datetime as dt
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import PlainTextResponse

from .access import scope_of, usage_scope
from .auth import Principal, require_user
from .job_records import as_csv, job_records, parse_cursor

router = APIRouter()


@router.get("/usage/records", responses={200: {"content": {"text/csv": {}}}})
def records(request: Request,
            since: dt.datetime | None = Query(None, description="Leases that ended at or "
                                                                "after this time."),
            until: dt.datetime | None = Query(None, description="Leases that ended before."),
            lab: str | None = Query(None, max_length=64, description="Only this lab's users."),
            after: str | None = Query(None, max_length=200,
                                      description="The 'next' cursor of the previous page."),
            limit: int = Query(1000, ge=1, le=10_000, description="Records per page."),
            format: Literal["json", "csv"] = Query("json"),
            principal: Principal = Depends(require_user)):
    """One record per ended lease (docs/job-records.md): resources, times, user, lab,
    provider and PCU. Members see their own, PIs their lab's, administrators everyone's; pages
    in the order leases ended, with a cursor for the next."""
    cursor = parse_cursor(after)
    with request.app.state.session() as s:
        scope = usage_scope(s, scope_of(principal), lab, provided=False)
        found, next_cursor = job_records(s, lab_id=scope.lab_id, user_id=scope.user_id,
                                         since=since, until=until, after=cursor, limit=limit)
    if format == "csv":
        headers = {"X-Next-Cursor": next_cursor} if next_cursor else {}
        return PlainTextResponse(as_csv(found), media_type="text/csv", headers=headers)
    return {"records": found, "next": next_cursor}
