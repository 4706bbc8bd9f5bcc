"""Realistic usage traffic: the generator behind `keypulse gen` and the benchmarks.

`TrafficGenerator` is pure and seedable: given the same seed, options and `now_ms` it
yields the same `(key, value)` byte pairs, where key is the `user_id` and value a JSON
usage event (DESIGN §1). Everything that can be decided up front (users, their services
and API keys, endpoint profiles, status tables) is precomputed, so the per-event work is
a handful of `random.Random` draws, one dict and one msgspec encode (several hundred
thousand events per second on one core).

Realism, in short: users differ in activity (Zipf-like) and each uses 1-5 services
drawn from a weighted catalogue with 1-3 keys per service; each endpoint has its own
method, log-normal latency, payload sizes and status profile (mostly 2xx, some
401/404/429, rare 5xx); LLM endpoints carry tokens, token-driven latency and cost.
An `Incident` turns one user's service into an error burst or a latency spike for a
time range, and a share of events can be malformed in the ways real clients get
things wrong (see `MALFORMED_KINDS`).
"""

from __future__ import annotations

import functools
import math
import random
import time
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Final, Literal

import msgspec

TsFormat = Literal["mixed", "ms", "rfc3339"]
IncidentKind = Literal["error-burst", "latency-spike"]
INCIDENT_KINDS: Final = ("error-burst", "latency-spike")

# Malformed event kinds, in the order they are drawn (uniformly).
MALFORMED_KINDS: Final = (
    "not-json",
    "truncated",
    "missing-field",
    "wrong-type",
    "empty-string",
    "status-out-of-range",
    "negative-latency",
    "nan-token",
    "invalid-utf8",
    "oversized-string",
    "bad-service",
    "ts-without-offset",
    "ts-out-of-range",
    "oversized-payload",
)

_ALPHABET: Final = "abcdefghijklmnopqrstuvwxyz0123456789"
_STATUS_TABLE_SIZE: Final = 1000
# Stratified standard-normal quantiles: a log-normal draw is exp(mu + sigma * _Z[i]) for a
# uniform index, far cheaper than random.lognormvariate and just as deterministic.
_Z_SIZE: Final = 8192
_Z: Final = tuple(NormalDist().inv_cdf((i + 0.5) / _Z_SIZE) for i in range(_Z_SIZE))
_exp: Final = math.exp
_UUID_BLOCK_MASK: Final = 63


@dataclass(frozen=True)
class Endpoint:
    """One endpoint of a service and its traffic profile."""

    path: str
    method: str
    weight: float
    latency_median_ms: float
    latency_sigma: float = 0.5
    request_bytes: tuple[int, int] = (200, 2_000)
    response_bytes: tuple[int, int] = (300, 5_000)
    # LLM endpoints: median tokens in/out and USD per 1M tokens in/out.
    tokens_in_median: int = 0
    tokens_out_median: int = 0
    usd_per_mtok_in: float = 0.0
    usd_per_mtok_out: float = 0.0
    ms_per_token_out: float = 0.0
    # Non-LLM endpoints with a per-call price (SMS, e-mail, geocoding…).
    usd_per_call: float = 0.0
    error_scale: float = 1.0  # multiplies the service's error rates


@dataclass(frozen=True)
class Service:
    name: str
    weight: float
    endpoints: tuple[Endpoint, ...]
    client_error_rate: float = 0.025
    server_error_rate: float = 0.004


def _llm(path: str, weight: float, latency: float, *, tokens: tuple[int, int],
         usd: tuple[float, float], ms_tok: float = 0.0) -> Endpoint:
    """An LLM endpoint: median tokens (in, out), USD per 1M tokens (in, out), ms per token out."""
    return Endpoint(path, "POST", weight, latency, 0.45, (0, 0), (0, 0),
                    tokens_in_median=tokens[0], tokens_out_median=tokens[1],
                    usd_per_mtok_in=usd[0], usd_per_mtok_out=usd[1], ms_per_token_out=ms_tok)


CATALOGUE: Final[tuple[Service, ...]] = (
    Service("openai", 30, (
        _llm("/v1/chat/completions", 60, 350, tokens=(600, 180), usd=(2.5, 10.0), ms_tok=9.0),
        _llm("/v1/responses", 15, 400, tokens=(900, 250), usd=(2.5, 10.0), ms_tok=9.0),
        _llm("/v1/embeddings", 20, 90, tokens=(300, 0), usd=(0.02, 0.0)),
        Endpoint("/v1/models", "GET", 5, 60, 0.3, (0, 0), (2_000, 8_000)),
    ), server_error_rate=0.006),
    Service("anthropic", 20, (
        _llm("/v1/messages", 85, 450, tokens=(800, 220), usd=(3.0, 15.0), ms_tok=11.0),
        _llm("/v1/messages/count_tokens", 15, 80, tokens=(800, 0), usd=(0.0, 0.0)),
    ), server_error_rate=0.006),
    Service("stripe", 12, (
        Endpoint("/v1/payment_intents", "POST", 35, 320, 0.4, (300, 1_500), (1_500, 4_000)),
        Endpoint("/v1/customers", "POST", 15, 180, 0.4, (200, 900), (1_000, 2_500)),
        Endpoint("/v1/charges", "GET", 25, 140, 0.4, (0, 0), (2_000, 30_000)),
        Endpoint("/v1/refunds", "POST", 5, 260, 0.4, (150, 600), (800, 1_500)),
        Endpoint("/v1/subscriptions", "GET", 20, 160, 0.4, (0, 0), (1_500, 20_000)),
    ), client_error_rate=0.035),
    Service("github", 10, (
        Endpoint("/repos/{owner}/{repo}", "GET", 30, 110, 0.5, (0, 0), (3_000, 9_000)),
        Endpoint("/repos/{owner}/{repo}/issues", "GET", 25, 180, 0.5, (0, 0), (5_000, 80_000)),
        Endpoint("/repos/{owner}/{repo}/pulls", "POST", 10, 420, 0.5, (500, 4_000),
                 (4_000, 12_000)),
        Endpoint("/graphql", "POST", 35, 260, 0.6, (300, 3_000), (1_000, 60_000)),
    ), client_error_rate=0.04),
    Service("twilio", 8, (
        Endpoint("/2010-04-01/Accounts/{sid}/Messages.json", "POST", 80, 230, 0.35,
                 (200, 800), (700, 1_200), usd_per_call=0.0079),
        Endpoint("/2010-04-01/Accounts/{sid}/Calls.json", "POST", 20, 310, 0.35,
                 (200, 600), (900, 1_500), usd_per_call=0.014),
    )),
    Service("sendgrid", 6, (
        Endpoint("/v3/mail/send", "POST", 90, 140, 0.4, (1_000, 40_000), (0, 50),
                 usd_per_call=0.0006),
        Endpoint("/v3/templates", "GET", 10, 90, 0.4, (0, 0), (2_000, 15_000)),
    )),
    Service("mapbox", 5, (
        Endpoint("/geocoding/v5/mapbox.places/{query}.json", "GET", 60, 70, 0.4, (0, 0),
                 (1_500, 6_000), usd_per_call=0.00075),
        Endpoint("/directions/v5/mapbox/driving/{coordinates}", "GET", 40, 120, 0.45,
                 (0, 0), (5_000, 60_000), usd_per_call=0.002),
    )),
    Service("slack", 4, (
        Endpoint("/api/chat.postMessage", "POST", 70, 160, 0.4, (200, 3_000), (300, 1_200)),
        Endpoint("/api/conversations.history", "GET", 30, 210, 0.5, (0, 0), (2_000, 40_000)),
    ), client_error_rate=0.03),
    Service("mistral", 3, (
        _llm("/v1/chat/completions", 80, 280, tokens=(500, 160), usd=(0.4, 2.0), ms_tok=7.0),
        _llm("/v1/embeddings", 20, 70, tokens=(250, 0), usd=(0.1, 0.0)),
    )),
    Service("google-maps", 3, (
        Endpoint("/maps/api/geocode/json", "GET", 60, 85, 0.4, (0, 0), (1_000, 5_000),
                 usd_per_call=0.005),
        Endpoint("/maps/api/place/nearbysearch/json", "GET", 40, 160, 0.45, (0, 0),
                 (4_000, 30_000), usd_per_call=0.032),
    )),
    Service("aws-s3", 3, (
        Endpoint("/{bucket}/{key}", "GET", 60, 45, 0.6, (0, 0), (1_000, 500_000)),
        Endpoint("/{bucket}/{key}", "PUT", 40, 70, 0.6, (1_000, 500_000), (0, 200)),
    ), client_error_rate=0.015, server_error_rate=0.002),
    Service("cohere", 2, (
        _llm("/v2/chat", 60, 320, tokens=(500, 170), usd=(0.15, 0.6), ms_tok=8.0),
        _llm("/v2/embed", 25, 60, tokens=(250, 0), usd=(0.1, 0.0)),
        _llm("/v2/rerank", 15, 110, tokens=(1_200, 0), usd=(2.0, 0.0)),
    )),
)
SERVICE_NAMES: Final = tuple(s.name for s in CATALOGUE)

# (status, error_type, weight) within each class.
_CLIENT_ERRORS: Final = (
    (400, "invalid_request", 25), (401, "authentication_error", 18), (403, "permission_denied", 7),
    (404, "not_found", 20), (409, "conflict", 3), (422, "validation_error", 7),
    (429, "rate_limit_exceeded", 20),
)
_SERVER_ERRORS: Final = (
    (500, "internal_server_error", 45), (502, "bad_gateway", 20),
    (503, "service_unavailable", 25), (504, "gateway_timeout", 10),
)
_SUCCESSES: Final = ((200, None, 90), (201, None, 8), (202, None, 2))

_REGIONS: Final = ("us-east-1", "us-west-2", "eu-west-1", "eu-central-1", "ap-southeast-1",
                   "ap-northeast-1", "sa-east-1")
_REGION_WEIGHTS: Final = (35, 15, 20, 12, 8, 6, 4)
_SDKS: Final = ("keypulse-python/1.8.2", "keypulse-python/1.7.0", "keypulse-node/3.2.1",
                "keypulse-node/3.1.4", "keypulse-go/0.12.0", "keypulse-java/2.4.0",
                "keypulse-ruby/1.1.3")
_SDK_WEIGHTS: Final = (30, 10, 25, 8, 12, 10, 5)

# Status/latency overrides during an incident.
_BURST_STATUSES: Final = ((500, "internal_server_error", 40), (502, "bad_gateway", 15),
                          (503, "service_unavailable", 30), (429, "rate_limit_exceeded", 15))
BURST_ERROR_SHARE: Final = 0.6
SPIKE_LATENCY_FACTOR: Final = 12.0


@dataclass(frozen=True)
class Incident:
    """An error burst or latency spike for one user's service during [start_ms, end_ms)."""

    kind: IncidentKind
    user_id: str
    service: str
    start_ms: int
    end_ms: int


@dataclass(frozen=True)
class UserProfile:
    user_id: str
    services: tuple[str, ...]
    api_keys: dict[str, tuple[str, ...]]  # service -> key ids
    region: str
    activity: float


# A status draw: (status_code, JSON fragment with status_code and error_type).
StatusEntry = tuple[int, str]
_json: Final = msgspec.json.encode


def _status_fragment(code: int, error_type: str | None) -> str:
    text = f',"status_code":{code}'
    if error_type:
        text += f',"error_type":{_json(error_type).decode()}'
    return text


@functools.cache
def _status_table(client_rate: float, server_rate: float,
                  entries: tuple[tuple[int, str | None, int], ...] | None = None
                  ) -> tuple[StatusEntry, ...]:
    """A table of `_STATUS_TABLE_SIZE` statuses in the requested proportions.

    Drawn by uniform index, so the order does not matter.
    """
    table: list[StatusEntry] = []
    groups = ((entries, _STATUS_TABLE_SIZE),) if entries else (
        (_CLIENT_ERRORS, round(client_rate * _STATUS_TABLE_SIZE)),
        (_SERVER_ERRORS, round(server_rate * _STATUS_TABLE_SIZE)),
    )
    for group, count in groups:
        total = sum(w for _, _, w in group)
        for code, err, w in group:
            table.extend([(code, _status_fragment(code, err))] * round(count * w / total))
    n_ok = _STATUS_TABLE_SIZE - len(table)
    total_ok = sum(w for _, _, w in _SUCCESSES)
    for code, err, w in _SUCCESSES:
        table.extend([(code, _status_fragment(code, err))] * round(n_ok * w / total_ok))
    while len(table) < _STATUS_TABLE_SIZE:
        table.append((200, _status_fragment(200, None)))
    return tuple(table[:_STATUS_TABLE_SIZE])


def _ident(rng: random.Random, prefix: str, length: int) -> str:
    return prefix + "".join(rng.choice(_ALPHABET) for _ in range(length))


class _Combo:
    """A precomputed (user, service, endpoint) row: everything an event needs but the draws.

    `heads` holds, per API key, the JSON fragment of the fields that never change for the
    row; `tails` the region/sdk fragment per SDK. Fragments are encoded by msgspec once.
    """

    __slots__ = ("endpoint", "heads", "key", "lat_mu", "lat_sigma", "llm", "n_heads",
                 "service", "statuses", "tails", "user_id")

    def __init__(self, user: UserProfile, service: Service, endpoint: Endpoint,
                 statuses: tuple[StatusEntry, ...], sdks: tuple[str, ...]) -> None:
        self.user_id = user.user_id
        self.key = user.user_id.encode()
        self.service = service.name
        self.endpoint = endpoint
        self.llm = endpoint.tokens_in_median > 0
        self.lat_mu = math.log(endpoint.latency_median_ms)
        self.lat_sigma = endpoint.latency_sigma
        self.statuses = statuses
        self.heads = tuple(
            _json({"user_id": user.user_id, "api_key_id": key, "service": service.name,
                   "endpoint": endpoint.path, "method": endpoint.method})[1:-1].decode()
            for key in user.api_keys[service.name]
        )
        self.n_heads = len(self.heads)
        self.tails = tuple(
            "," + _json({"region": user.region, "sdk": sdk})[1:].decode() for sdk in sdks
        )


class TrafficGenerator:
    """Seedable, fast source of realistic usage events.

    >>> gen = TrafficGenerator(seed=7, users=10)
    >>> key, value = next(gen.events(1, now_ms=1_700_000_000_000))
    """

    def __init__(
        self,
        seed: int | None = 0,
        users: int = 50,
        services: Sequence[str] | None = None,
        *,
        malformed: float = 0.0,
        incidents: Sequence[Incident] = (),
        ts_format: TsFormat = "mixed",
    ) -> None:
        if users < 1:
            msg = "users must be at least 1"
            raise ValueError(msg)
        if not 0.0 <= malformed <= 1.0:
            msg = f"malformed must be a share in [0, 1], got {malformed}"
            raise ValueError(msg)
        if ts_format not in ("mixed", "ms", "rfc3339"):
            msg = f"ts_format must be mixed, ms or rfc3339, got {ts_format!r}"
            raise ValueError(msg)
        catalogue = CATALOGUE
        if services:
            unknown = sorted(set(services) - set(SERVICE_NAMES))
            if unknown:
                msg = (f"unknown service(s) {', '.join(unknown)}; "
                       f"known: {', '.join(SERVICE_NAMES)}")
                raise ValueError(msg)
            catalogue = tuple(s for s in CATALOGUE if s.name in set(services))
        self.seed = seed
        self.malformed = malformed
        self.ts_format: TsFormat = ts_format
        # seq & mask: nonzero → epoch ms. ms: always; rfc3339: never; mixed: odd events.
        self._ts_ms_mask = {"ms": -1, "rfc3339": 0, "mixed": 1}[ts_format]
        self._rng = random.Random(seed)
        self._random = self._rng.random
        self._getrandbits = self._rng.getrandbits
        self._seq = 0
        self._uuid_prefix = self._new_uuid_prefix()
        self._rfc_second = -1
        self._rfc_prefix = ""

        setup = random.Random(seed)
        self.users: tuple[UserProfile, ...] = tuple(
            self._make_user(setup, i, catalogue) for i in range(users)
        )
        by_name = {s.name: s for s in catalogue}
        combos: list[_Combo] = []
        cum_weights: list[float] = []
        total = 0.0
        for user in self.users:
            sdks = tuple(setup.choices(_SDKS, _SDK_WEIGHTS, k=2))
            for rank, name in enumerate(user.services):
                service = by_name[name]
                # A user's main service gets most of their traffic; each user/service pair
                # has its own health (a misconfigured integration fails more often).
                health = setup.choice((0.5, 1.0, 1.0, 1.0, 1.5, 3.0))
                service_share = 1.0 / (rank + 1)
                ep_total = sum(e.weight for e in service.endpoints)
                for endpoint in service.endpoints:
                    statuses = _status_table(
                        min(0.5, service.client_error_rate * health * endpoint.error_scale),
                        min(0.2, service.server_error_rate * health * endpoint.error_scale),
                    )
                    combos.append(_Combo(user, service, endpoint, statuses, sdks))
                    total += user.activity * service_share * endpoint.weight / ep_total
                    cum_weights.append(total)
        self._combos = tuple(combos)
        self._cum_weights = (*(w / total for w in cum_weights[:-1]), 1.0)  # random() < 1.0
        self._burst_statuses = _status_table(0.0, 0.0, _BURST_STATUSES)
        self._incidents: dict[tuple[str, str], tuple[Incident, ...]] = {}
        for incident in incidents:
            self.add_incident(incident)

    # -- setup ------------------------------------------------------------------------

    @staticmethod
    def _make_user(rng: random.Random, index: int, catalogue: Sequence[Service]) -> UserProfile:
        user_id = _ident(rng, "usr_", 10)
        n_services = min(len(catalogue), rng.choices((1, 2, 3, 4, 5), (25, 30, 25, 12, 8))[0])
        services: list[str] = []
        names = [s.name for s in catalogue]
        sweights = [s.weight for s in catalogue]
        while len(services) < n_services:
            name = rng.choices(names, sweights)[0]
            if name not in services:
                services.append(name)
        api_keys = {
            name: tuple(_ident(rng, "key_", 16)
                        for _ in range(rng.choices((1, 2, 3), (55, 30, 15))[0]))
            for name in services
        }
        region = rng.choices(_REGIONS, _REGION_WEIGHTS)[0]
        activity = 1.0 / (index + 1) ** 0.8  # Zipf-like: a few heavy users, a long tail
        return UserProfile(user_id, tuple(services), api_keys, region, activity)

    # -- public API -------------------------------------------------------------------

    def default_incident_target(self) -> tuple[str, str]:
        """The busiest user and their main service: where an incident is most visible."""
        user = self.users[0]
        return user.user_id, user.services[0]

    def add_incident(self, incident: Incident) -> None:
        user = next((u for u in self.users if u.user_id == incident.user_id), None)
        if user is None:
            sample = ", ".join(u.user_id for u in self.users[:3])
            msg = f"incident user {incident.user_id!r} is not a generated user (e.g. {sample})"
            raise ValueError(msg)
        if incident.service not in user.services:
            msg = (f"user {incident.user_id} does not use {incident.service!r}; "
                   f"their services: {', '.join(user.services)}")
            raise ValueError(msg)
        key = (incident.user_id, incident.service)
        self._incidents[key] = (*self._incidents.get(key, ()), incident)

    def events(self, n: int, now_ms: int, step_ms: float = 0.0) -> Iterator[tuple[bytes, bytes]]:
        """`n` (key, value) pairs; event i has ts = now_ms + i * step_ms."""
        if self.malformed:
            for key, value, _ in self.labeled_events(n, now_ms, step_ms):
                yield key, value
            return
        random_ = self._random
        combos = self._combos
        cum_weights = self._cum_weights
        event = self._event
        for i in range(n):
            combo = combos[bisect_right(cum_weights, random_())]
            yield combo.key, event(combo, now_ms + int(i * step_ms) if step_ms else now_ms).encode()

    def labeled_events(
        self, n: int, now_ms: int, step_ms: float = 0.0
    ) -> Iterator[tuple[bytes, bytes, str | None]]:
        """Like `events`, plus the malformed kind of each event (None when valid)."""
        random_ = self._random
        combos = self._combos
        cum_weights = self._cum_weights
        malformed = self.malformed
        event = self._event
        for i in range(n):
            ts_ms = now_ms + int(i * step_ms) if step_ms else now_ms
            combo = combos[bisect_right(cum_weights, random_())]
            value = event(combo, ts_ms).encode()
            if malformed and random_() < malformed:
                kind = MALFORMED_KINDS[int(random_() * len(MALFORMED_KINDS))]
                yield combo.key, self._malform(kind, value, ts_ms), kind
            else:
                yield combo.key, value, None

    # -- per event ----------------------------------------------------------------------

    def _new_uuid_prefix(self) -> str:
        """`xxxxxxxx-xxxx-4xxx-Vxxx-`: 76 random bits, version 4, variant 10xx."""
        bits = self._getrandbits(76)
        variant = 0x8 | (bits & 0x3)
        bits >>= 2
        h = f"{bits:019x}"[-19:]
        return f"{h[:8]}-{h[8:12]}-4{h[12:15]}-{variant:x}{h[15:18]}-"

    def _event(self, combo: _Combo, ts_ms: int) -> str:
        """One valid event as JSON text: precomputed fragments plus this event's draws.

        Dynamic values are numbers, a uuid and an RFC 3339 time, none of which needs
        escaping; every string from the catalogue went through msgspec in `_Combo`.
        """
        random_ = self._random
        z = _Z
        ep = combo.endpoint
        statuses = combo.statuses
        latency_factor = 1.0
        if self._incidents:
            for incident in self._incidents.get((combo.user_id, combo.service), ()):
                if incident.start_ms <= ts_ms < incident.end_ms:
                    if incident.kind == "error-burst":
                        if random_() < BURST_ERROR_SHARE:
                            statuses = self._burst_statuses
                    else:
                        latency_factor = SPIKE_LATENCY_FACTOR
        status, status_json = statuses[int(random_() * _STATUS_TABLE_SIZE)]
        latency = _exp(combo.lat_mu + combo.lat_sigma * z[int(random_() * _Z_SIZE)])

        # event_id: a UUID version 4 (RFC 4122 variant). The first 80 bits are drawn once
        # per block of _UUID_BLOCK events, the last 48 per event: formatting a fresh
        # 128-bit uuid costs more than the rest of the event.
        self._seq = seq = self._seq + 1
        if not seq & _UUID_BLOCK_MASK:
            self._uuid_prefix = self._new_uuid_prefix()
        event_id = f"{self._uuid_prefix}{self._getrandbits(48):012x}"
        if self._ts_ms_mask & seq:
            ts = str(ts_ms)
        else:
            second = ts_ms // 1000
            if second != self._rfc_second:
                self._rfc_second = second
                self._rfc_prefix = time.strftime('"%Y-%m-%dT%H:%M:%S', time.gmtime(second))
            ts = f"{self._rfc_prefix}.{ts_ms % 1000:03d}Z\""
        head = combo.heads[int(random_() * combo.n_heads)] if combo.n_heads > 1 else combo.heads[0]

        ok = status < 400
        if combo.llm:
            tokens_in = int(_exp(0.8 * z[int(random_() * _Z_SIZE)]) * ep.tokens_in_median) + 1
            if ok:
                tokens_out = (int(_exp(0.7 * z[int(random_() * _Z_SIZE)])
                                  * ep.tokens_out_median) if ep.tokens_out_median else 0)
                latency += tokens_out * ep.ms_per_token_out
                cost = (tokens_in * ep.usd_per_mtok_in + tokens_out * ep.usd_per_mtok_out) * 1e-6
                extra = (f',"tokens_in":{tokens_in},"tokens_out":{tokens_out},'
                         f'"cost_usd":{cost:.6g},"request_bytes":{tokens_in * 4 + 120},'
                         f'"response_bytes":{tokens_out * 4 + 350}')
            else:
                extra = (f',"tokens_in":{tokens_in},"tokens_out":0,"cost_usd":0.0,'
                         f'"request_bytes":{tokens_in * 4 + 120},"response_bytes":180')
        else:
            lo, hi = ep.request_bytes
            request_bytes = lo + int(random_() * (hi - lo))
            if ok:
                lo, hi = ep.response_bytes
                response_bytes = lo + int(random_() * (hi - lo))
            else:
                response_bytes = 150
            extra = f',"request_bytes":{request_bytes},"response_bytes":{response_bytes}'
            if ep.usd_per_call:
                extra += f',"cost_usd":{ep.usd_per_call if ok else 0.0!r}'
        if not ok:
            if status == 504:
                latency = 30_000.0 + random_() * 30_000.0
            elif status < 500:
                latency *= 0.3
        latency *= latency_factor
        latency = min(latency, 3_600_000.0)
        return (f'{{"event_id":"{event_id}","ts":{ts},{head}{status_json},'
                f'"latency_ms":{latency:.2f}{extra}{combo.tails[seq & 1]}')

    def _malform(self, kind: str, value: bytes, ts_ms: int) -> bytes:
        """A valid event broken the way `kind` says; every result fails `decode_event`."""
        rng = self._rng
        if kind == "not-json":
            return rng.choice((b"status=500 latency=12ms", b"<html>502 Bad Gateway</html>",
                               b"{'event_id': 'x'}", b""))
        if kind == "truncated":
            return value[: len(value) // 2]
        if kind == "nan-token":
            token = rng.choice((b"NaN", b"Infinity", b"-Infinity"))
            return value[:-1] + b',"tokens_in":' + token + b"}"
        if kind == "invalid-utf8":
            at = value.index(b'"user_id":"') + len(b'"user_id":"')
            return value[:at] + b"\xff\xfe" + value[at:]
        doc: dict[str, Any] = msgspec.json.decode(value)
        if kind == "missing-field":
            del doc[rng.choice(("event_id", "ts", "user_id", "api_key_id", "service",
                                "status_code", "latency_ms"))]
        elif kind == "wrong-type":
            field, bad = rng.choice((("status_code", "200"), ("latency_ms", "12ms"),
                                     ("tokens_in", 1.5), ("user_id", 42), ("ts", True)))
            doc[field] = bad
        elif kind == "empty-string":
            doc[rng.choice(("event_id", "user_id", "api_key_id"))] = ""
        elif kind == "status-out-of-range":
            doc["status_code"] = rng.choice((99, 600, 0, 1200))
        elif kind == "negative-latency":
            doc["latency_ms"] = rng.choice((-1.0, -0.5, 3_600_001.0))
        elif kind == "oversized-string":
            field, size = rng.choice((("event_id", 65), ("endpoint", 257), ("user_id", 129),
                                      ("region", 65)))
            doc[field] = "x" * size
        elif kind == "bad-service":
            doc["service"] = rng.choice(("OpenAI", "-stripe", "git hub", "x" * 65))
        elif kind == "ts-without-offset":
            doc["ts"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts_ms // 1000))
        elif kind == "ts-out-of-range":
            doc["ts"] = rng.choice((1_700_000_000, 0, 10**16))  # seconds, zero, microseconds
        elif kind == "oversized-payload":
            doc["debug"] = "x" * 70_000
        else:  # pragma: no cover - MALFORMED_KINDS and this chain move together
            msg = f"unknown malformed kind {kind!r}"
            raise ValueError(msg)
        return _json(doc)


def generate_bytes(
    n: int,
    *,
    seed: int = 0,
    users: int = 50,
    now_ms: int = 1_700_000_000_000,
    step_ms: float = 0.0,
    malformed: float = 0.0,
    ts_format: TsFormat = "mixed",
) -> list[bytes]:
    """`n` encoded event values, for benchmarks (deterministic for a given seed and now_ms)."""
    gen = TrafficGenerator(seed, users, malformed=malformed, ts_format=ts_format)
    return [value for _, value, _ in gen.labeled_events(n, now_ms, step_ms)]


def generate_pairs(
    n: int,
    *,
    seed: int = 0,
    users: int = 50,
    now_ms: int = 1_700_000_000_000,
    step_ms: float = 0.0,
    malformed: float = 0.0,
) -> list[tuple[bytes, bytes]]:
    """`n` (key, value) pairs, for pre-producing a topic in benchmarks."""
    gen = TrafficGenerator(seed, users, malformed=malformed)
    return list(gen.events(n, now_ms, step_ms))
