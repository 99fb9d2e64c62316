"""Reading what clients send: form or JSON bodies, and the job filter in query parameters.

Everything is checked here, before the ledger is touched, so a bad request changes nothing and
ends in a 4xx naming the field. Text that a database cannot store (NUL, lone surrogates) is
refused too: it would otherwise surface as a driver error, after the fact.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData

from jobledger.config import parse_duration
from jobledger.errors import ConfigError
from jobledger.model import JobState, validate_job_id, validate_unique_key
from jobledger.query import JobQuery
from jobledger.server.errors import ApiError
from jobledger.server.limits import BodyTooLarge

M = TypeVar("M", bound=BaseModel)

FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


def storable(value: str, field: str) -> str:
    """``value`` if every database can store it; a 422 naming ``field`` otherwise."""
    if "\x00" in value:
        raise ApiError(422, "text must not contain NUL characters", field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(422, "text must be valid Unicode (no lone surrogates)", field) from None
    return value


def job_id(value: str, field: str = "job_id") -> str:
    try:
        return validate_job_id(value)
    except ConfigError as exc:
        raise ApiError(422, str(exc), field) from None


async def read_form(request: Request) -> FormData:
    """The posted form; :class:`ApiError` 413 for a body past the size limit (also a streamed
    one, without Content-Length), 400 for one that cannot be parsed."""
    try:
        return await request.form()
    except BodyTooLarge as exc:
        raise ApiError(413, str(exc.detail), "body") from None
    except Exception as exc:  # the multipart parser's errors have no common base
        raise ApiError(400, f"malformed form body: {exc}", "body") from None


async def read_body(request: Request) -> dict[str, Any]:
    """The request's fields from a JSON object or a form, whichever its content type says."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind in FORM_TYPES:
        form = await read_form(request)
        fields: dict[str, Any] = {}
        for key, value in form.multi_items():
            if not isinstance(value, str):
                raise ApiError(422, "file uploads are not accepted", key)
            fields[key] = value
        return fields
    raw = await request.body()
    if kind not in ("application/json", "") and not kind.endswith("+json"):
        raise ApiError(415, f"unsupported content type {kind!r}: send JSON or a form", "body")
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(400, "malformed JSON body", "body") from None
    if not isinstance(data, dict):
        raise ApiError(422, "the JSON body must be an object", "body")
    return data


def validated(model: type[M], data: Mapping[str, Any]) -> M:
    """``data`` as ``model``; the first problem becomes a 422 naming its field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(422, str(first["msg"]), field) from None


def parse_arguments(text: str | None, field: str = "arguments") -> tuple[list[Any], dict[str, Any]]:
    """The seed's ``arguments`` (a JSON string) as (args, kwargs): a list is the positional
    arguments, an object the keyword arguments, anything else one positional argument."""
    if text is None or text == "":
        return [], {}
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise ApiError(422, "arguments must be a JSON string (e.g. '[1, \"a\"]')", field) from None
    try:
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (ValueError, UnicodeEncodeError):
        raise ApiError(422, "arguments must be finite JSON in valid Unicode", field) from None
    if isinstance(value, list):
        return value, {}
    if isinstance(value, dict):
        return [], value
    return [value], {}


def job_query(
    state: list[str] | None = None,
    queue: list[str] | None = None,
    name: list[str] | None = None,
    system: list[str] | None = None,
    match: str | None = None,
    regex: bool = False,
    older_than: str | None = None,
    recovered: bool = False,
    unique_key: list[str] | None = None,
) -> JobQuery:
    """The filter of a listing or a bulk action; a 422 naming the parameter at fault."""
    states = set()
    for s in state or ():
        try:
            states.add(JobState.parse(s))
        except ConfigError as exc:
            raise ApiError(422, str(exc), "state") from None
    for label, values in (("queue", queue), ("name", name), ("system", system)):
        for v in values or ():
            storable(v, label)
    keys = set()
    for key in unique_key or ():
        try:
            keys.add(validate_unique_key(storable(key, "unique_key")))
        except ConfigError as exc:
            raise ApiError(422, str(exc), "unique_key") from None
    if match is not None:
        storable(match, "match")
    age = None
    if older_than not in (None, ""):
        try:
            age = parse_duration(str(older_than))
        except ConfigError as exc:
            raise ApiError(422, str(exc), "older_than") from None
    try:
        return JobQuery(
            states=frozenset(states),
            queues=frozenset(q for q in queue or () if q),
            names=frozenset(n for n in name or () if n),
            systems=frozenset(s for s in system or () if s),
            match=match or None,
            regex=regex and bool(match),
            older_than=age,
            recovered=recovered,
            unique_keys=frozenset(keys),
        )
    except ConfigError as exc:
        raise ApiError(422, str(exc), "match") from None
