"""Alert rules (DESIGN §3, §8): list, create, read, update, delete; published on `alert.rules`.

Who: the `user` role (a token without roles acts as one) and `admin`, each for the rules of
the token's own `sub`. Another user's rule answers 404, as an unknown one does.

What the list shows is what the pipeline evaluates (api/rules.py): the caller's rules and the
defaults that apply to them (`default: true`, id `default:{user}:{name}`). A default is edited
or switched off by a PUT on its id (`enabled: false`), which stores the caller's override;
deleting the override brings the default back; deleting a default itself is refused (409).

A change is checked, recorded in the audit trail, published on `alert.rules` (key `rule_id`,
a null value deletes) and answered once Kafka confirmed it (else 503, nothing changed), and
its `alert_rules` row is written at once so that the next read shows it. Updates and deletes
take the version they replace (`If-Match: "<version>"`, or `version` in a PUT's body): a
stale one is a 409, a PUT without either a 428; `If-Match: *` replaces whatever is stored.
Every answer carrying a rule has `ETag: "<version>"`.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from clickhouse_connect.driver.client import Client
from fastapi import APIRouter, Depends, Header, Path, Request, Response

from api import audit, rules
from api.deps import ClickHouseDep, OwnerDep, PublisherDep, SettingsDep
from api.errors import APIError
from api.ingest import EventProducer, read_body
from api.responses import MsgspecResponse, described, failures, schema
from api.rules import RuleInput, RuleList, RuleReplacement, RuleView, UserRules
from core.auth import Principal
from core.clock import Clock
from core.settings import Settings
from schemas.alerts import AlertRule, default_rule_id

router = APIRouter(prefix="/v1/alert-rules", tags=["alert rules"])

_EXAMPLE = {"name": "checkout errors", "metric": "error_rate", "op": ">", "threshold": 0.1,
            "service": "stripe", "for_windows": 2, "resolve_windows": 3, "min_requests": 50,
            "severity": "critical", "enabled": True}
_DISABLE = {"name": "Error rate above 5%", "metric": "error_rate", "op": ">",
            "threshold": 0.05, "for_windows": 2, "enabled": False}


def _request_body(kind: type[RuleInput], examples: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {
        "required": True,
        "description": f"the rule's fields (DESIGN §3), at most {rules.MAX_BODY_BYTES} bytes; "
                       "unknown fields are refused",
        "content": {"application/json": {"schema": schema(kind), "examples": {
            name: {"value": value} for name, value in examples.items()}}},
    }}


def _with_headers(answer: dict[int | str, dict[str, Any]], *names: str
                  ) -> dict[int | str, dict[str, Any]]:
    described_headers = {
        "ETag": "the rule's version, quoted: send it back as If-Match",
        "Location": "the new rule's URL",
    }
    for entry in answer.values():
        entry["headers"] = {name: {"description": described_headers[name],
                                   "schema": {"type": "string"}} for name in names}
    return answer


RuleIdPath = Annotated[str, Path(
    description="a rule's id (`rule_…`), or a default's id for the caller "
                "(`default:{user}:{name}`)",
    min_length=1, max_length=256, examples=[default_rule_id("user-1", "error_rate")])]
IfMatch = Annotated[str | None, Header(
    alias="If-Match", pattern=r'^(\*|"[0-9]{1,18}")$',
    description='the version this change replaces, as the ETag gave it (`"3"`); `*`: '
                "whatever version is stored", examples=["*"])]

_AUTH = {401: "no valid bearer token",
         403: "the token holds neither the user nor the admin role"}
_STORE = {503: "the store or Kafka is unreachable (nothing was changed); retry after "
               "`Retry-After` seconds"}
_NOT_FOUND = {404: "no such rule among the caller's rules and defaults"}
_BODY = {400: "the body is not JSON", 413: f"a body over {rules.MAX_BODY_BYTES} bytes",
         415: "a Content-Encoding other than gzip",
         422: "a field is missing, unknown, of the wrong type or out of range (`field` names "
              "it); a threshold outside its metric's range; a malformed If-Match"}


def _now_ms(request: Request) -> int:
    clock: Clock = request.app.state.clock
    return int(clock() * 1000)


async def _input(request: Request) -> RuleInput:
    return rules.parse(await read_body(request, rules.MAX_BODY_BYTES), RuleInput)


async def _replacement(request: Request) -> RuleReplacement:
    return rules.parse(await read_body(request, rules.MAX_BODY_BYTES), RuleReplacement)


def _etag(view: RuleView) -> dict[str, str]:
    return {"ETag": f'"{view.version}"'}


def _not_found(rule_id: str) -> APIError:
    return APIError(404, "not_found", f"no alert rule {rule_id[:256]!r} among yours")


def _expected(if_match: str | None, version: int | None) -> int | None:
    """The version a change replaces: from If-Match or the body; None for `If-Match: *`.
    Neither given: 428."""
    from_header = None if if_match is None or if_match == "*" else int(if_match.strip('"'))
    if from_header is not None and version is not None and from_header != version:
        msg = f"If-Match says version {from_header}, the body {version}: send one"
        raise APIError(400, "invalid_request", msg, field="version")
    found = from_header if from_header is not None else version
    if found is None and if_match is None:
        msg = ('say which version this replaces: If-Match: "<version>" (the ETag) or '
               "`version` in the body")
        raise APIError(428, "precondition_required", msg, field="If-Match")
    return found


def _check_version(rule_id: str, expected: int | None, current: int) -> None:
    if expected is not None and expected != current:
        msg = (f"rule {rule_id!r} is at version {current}, not {expected}: read it again "
               "and apply your change to that version")
        raise APIError(409, "conflict", msg, field="version")


def _details(rule: AlertRule) -> dict[str, object]:
    return {"version": rule.version, "name": rule.name, "metric": rule.metric.value,
            "op": rule.op.value, "threshold": rule.threshold, "service": rule.service or "",
            "enabled": rule.enabled}


@router.get("", summary="the caller's alert rules, defaults included", responses={
    **described(RuleList, description="every rule the pipeline evaluates for the caller"),
    **failures({**_AUTH, **_STORE})})
def list_rules(user: OwnerDep, settings: SettingsDep, client: ClickHouseDep,
               ) -> MsgspecResponse:
    """The caller's own rules (disabled ones included), then the defaults that apply to them.
    A default replaced by a rule of the caller's is not listed: that rule is, with the
    default's id in its `overrides`. One page (`next_cursor` is null): at most
    100 rules of one's own plus the defaults."""
    found = rules.load(client, settings.clickhouse_database, user.user_id)
    return MsgspecResponse(RuleList(items=found.views()))


@router.post("", status_code=201, summary="create an alert rule",
             openapi_extra=_request_body(RuleInput, {"rule": _EXAMPLE}),
             responses={**_with_headers(described(RuleView, 201, "the stored rule"), "ETag",
                                        "Location"),
                        **failures({**_AUTH, **_BODY, **_STORE,
                                    409: f"the caller has {rules.MAX_RULES_PER_USER} rules "
                                         "already"})})
def create_rule(user: OwnerDep, body: Annotated[RuleInput, Depends(_input)],
                request: Request, settings: SettingsDep, client: ClickHouseDep,
                producer: PublisherDep) -> MsgspecResponse:
    """Stores a new rule of the caller's (version 1, a new `rule_id`); it is evaluated from
    the next window the pipeline closes after Kafka confirmed it. An unfiltered rule (no
    `service`) with a default's metric replaces that default."""
    database = settings.clickhouse_database
    with rules.lock_for(user.user_id):
        found = rules.load(client, database, user.user_id)
        if len(found.own) >= rules.MAX_RULES_PER_USER:
            msg = (f"you have {len(found.own)} alert rules, the most one user may have: "
                   "delete or reuse one")
            raise APIError(409, "too_many_rules", msg)
        rule = rules.new_rule(body, rule_id=f"rule_{uuid.uuid4().hex}", user_id=user.user_id,
                              version=1)
        view = _apply(request, user, client, producer, found, rule, "alert_rule.create")
    return MsgspecResponse(view, status_code=201, headers={
        **_etag(view), "Location": f"{router.prefix}/{rule.rule_id}"})


def _apply(request: Request, user: Principal, client: Client, producer: EventProducer,
           found: UserRules, rule: AlertRule, action: str) -> RuleView:
    """Audit, publish and store `rule` (under the user's lock); its view afterwards."""
    settings: Settings = request.app.state.settings
    audit.record(request, client, user, action, target=rule.rule_id, user_id=user.user_id,
                 details=_details(rule))
    rules.publish(producer, settings, rule.rule_id, rule)
    now_ms = _now_ms(request)
    rules.store(client, settings.clickhouse_database, rule, deleted=False, updated_ms=now_ms)
    after = UserRules(found.user_id, {**found.own, rule.rule_id: rule}, found.templates,
                      {**found.updated_ms, rule.rule_id: now_ms})
    view = after.find(rule.rule_id)
    assert view is not None
    return view


@router.get("/{rule_id}", summary="one of the caller's rules or defaults", responses={
    **_with_headers(described(RuleView), "ETag"), **failures({**_AUTH, **_NOT_FOUND, **_STORE,
                                                              422: "a malformed rule id"})})
def get_rule(user: OwnerDep, rule_id: RuleIdPath, settings: SettingsDep,
             client: ClickHouseDep) -> MsgspecResponse:
    """The rule, or the default with this per-user id (also when a rule of the caller's
    replaces it: `overridden_by` names that rule)."""
    found = rules.load(client, settings.clickhouse_database, user.user_id).find(rule_id)
    if found is None:
        raise _not_found(rule_id)
    return MsgspecResponse(found, headers=_etag(found))


@router.put("/{rule_id}", summary="replace a rule, or override a default",
            openapi_extra=_request_body(RuleReplacement, {"disable a default": _DISABLE,
                                                          "rule": _EXAMPLE}),
            responses={**_with_headers(described(RuleView, description="the stored rule"),
                                       "ETag"),
                       **failures({**_AUTH, **_BODY, **_NOT_FOUND, **_STORE,
                                   400: _BODY[400] + "; If-Match and `version` disagree",
                                   409: "the rule is at another version than the one given "
                                        "(the message says which)",
                                   428: "neither If-Match nor `version` given"})})
def replace_rule(user: OwnerDep, rule_id: RuleIdPath,
                 body: Annotated[RuleReplacement, Depends(_replacement)], request: Request,
                 settings: SettingsDep, client: ClickHouseDep, producer: PublisherDep,
                 if_match: IfMatch = None) -> MsgspecResponse:
    """Replaces the whole rule (fields left out take their defaults) as version + 1. On a
    default's id it stores the caller's override of that default: the way to change or
    switch off (`enabled: false`) a default for oneself."""
    expected = _expected(if_match, body.version)
    database = settings.clickhouse_database
    with rules.lock_for(user.user_id):
        found = rules.load(client, database, user.user_id)
        current = found.own.get(rule_id)
        if current is not None:
            _check_version(rule_id, expected, current.version)
            version = current.version + 1
        else:
            default = found.default(rule_id)
            if default is None:
                raise _not_found(rule_id)
            instance = default[0]
            _check_version(rule_id, expected, instance.version)
            version = max(instance.version,
                          rules.last_version(client, database, user.user_id, rule_id)) + 1
        rule = rules.new_rule(body, rule_id=rule_id, user_id=user.user_id, version=version)
        view = _apply(request, user, client, producer, found, rule, "alert_rule.update")
    return MsgspecResponse(view, headers=_etag(view))


@router.delete("/{rule_id}", status_code=204, summary="delete a rule (or an override)",
               response_class=Response,
               responses={204: {"description": "deleted (Kafka confirmed the tombstone)"},
                          **failures({**_AUTH, **_NOT_FOUND, **_STORE,
                                      409: "a default without an override (disable it "
                                           "instead), or If-Match names another version",
                                      422: "a malformed If-Match or rule id"})})
def delete_rule(user: OwnerDep, rule_id: RuleIdPath, request: Request,
                settings: SettingsDep, client: ClickHouseDep, producer: PublisherDep,
                if_match: IfMatch = None) -> Response:
    """Deletes one of the caller's rules: a tombstone on `alert.rules`. Deleting the
    override of a default brings the default back. If-Match is checked when given."""
    expected = None if if_match is None or if_match == "*" else int(if_match.strip('"'))
    database = settings.clickhouse_database
    with rules.lock_for(user.user_id):
        found = rules.load(client, database, user.user_id)
        current = found.own.get(rule_id)
        if current is None:
            if found.default(rule_id) is not None:
                msg = (f"{rule_id!r} is a default: it cannot be deleted; disable it instead "
                       "(PUT enabled=false)")
                raise APIError(409, "conflict", msg)
            raise _not_found(rule_id)
        _check_version(rule_id, expected, current.version)
        audit.record(request, client, user, "alert_rule.delete", target=rule_id,
                     user_id=user.user_id, details={"version": current.version})
        rules.publish(producer, settings, rule_id, None)
        rules.store(client, database, current, deleted=True, updated_ms=_now_ms(request))
    return Response(status_code=204)

