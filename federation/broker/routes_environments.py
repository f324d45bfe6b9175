"""User endpoints for software environments: describe one, ship the wheels of local
packages. A cluster then names the environment's hash (POST /clusters, ``environment``)."""

from __future__ import annotations

import re

from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import run_in_threadpool

from ..environment import MAX_WHEEL_BYTES
from .auth import Principal, require_user
from .errors import Invalid
from .id_params import Sha256Path
from .models import WHEEL_NAME, EnvironmentCreate

router = APIRouter(prefix="/environments")


@router.post("", status_code=200)
def describe(body: EnvironmentCreate, request: Request,
             principal: Principal = Depends(require_user)) -> dict:
    """Store an environment (idempotent); returns its hash and the SHA-256 of the wheels it
    ships that the broker still needs (PUT /environments/wheels/{sha256})."""
    digest, missing = request.app.state.broker.store_environment(principal, body)
    return {"hash": digest, "missing_wheels": missing}


@router.put("/wheels/{sha256}", status_code=201)
async def upload_wheel(sha256: Sha256Path, request: Request,
                       filename: str = Query(..., max_length=204, pattern=WHEEL_NAME,
                                             description="The wheel's file name."),
                       principal: Principal = Depends(require_user)) -> dict:
    """Ship a wheel (the request body, at most 64 MiB) that an environment lists."""
    declared = request.headers.get("content-length")
    if declared is not None and re.fullmatch(r"\d+", declared) \
            and int(declared) > MAX_WHEEL_BYTES:
        raise Invalid("wheel-too-large", f"a wheel may be at most {MAX_WHEEL_BYTES // 2**20} "
                      f"MiB; this one is {int(declared) / 2**20:.0f} MiB. Publish it on your "
                      "lab's package index")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_WHEEL_BYTES:
            raise Invalid("wheel-too-large", f"a wheel may be at most "
                          f"{MAX_WHEEL_BYTES // 2**20} MiB")
    stored = await run_in_threadpool(request.app.state.broker.store_wheel, principal, sha256,
                                     filename, bytes(data))
    return {"sha256": sha256, "stored": stored}
