"""Identifiers as the API validates them: annotated types for request bodies and path
parameters, refused with a 422 when malformed.

They live with the broker, not in federation.ids, so that the provider agent (which checks
the same patterns with ``re``) does not import FastAPI and pydantic at start-up.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Path as PathParam
from pydantic import StringConstraints

from accounting.identifiers import LAB_NAME, USER_NAME

from ..ids import ENVIRONMENT_HASH, LEASE_ID, MAX_ROW_ID, OBJECT_ID, SHA256

#: A lease id in a request body.
LeaseId = Annotated[str, StringConstraints(pattern=LEASE_ID)]

LeaseIdPath = Annotated[str, PathParam(pattern=LEASE_ID, description="A lease id.")]
ClusterIdPath = Annotated[str, PathParam(pattern=OBJECT_ID, description="A cluster id (cl_…).")]
ProviderIdPath = Annotated[str, PathParam(pattern=OBJECT_ID,
                                          description="A provider id (prv_…).")]
TokenIdPath = Annotated[str, PathParam(pattern=OBJECT_ID, description="A token id (tok_…).")]
LabPath = Annotated[str, PathParam(pattern=LAB_NAME, description="A lab's name.")]
UserPath = Annotated[str, PathParam(pattern=USER_NAME, description="A user's name.")]
EnvironmentHashPath = Annotated[str, PathParam(pattern=ENVIRONMENT_HASH,
                                               description="An environment's hash.")]
Sha256Path = Annotated[str, PathParam(pattern=SHA256, description="A wheel's SHA-256 (hex).")]
RowIdPath = Annotated[int, PathParam(ge=1, le=MAX_ROW_ID,
                                     description="A row id (a positive integer).")]
