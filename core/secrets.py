"""What an API key secret looks like, so `api_key_*` events can refuse one (metadata only).

`find_secret(fields, allowed)` names the first field that is called like a secret or holds a
string shaped like one; the bridge answers it with `secret_refused`, the API with 422.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

# Field names a client must never send us: the secret itself, under any of its usual names.
_SECRET_NAME = re.compile(
    r"(secret|passw|passphrase|token|credential|private|bearer|auth|^key$|api_?key$|_key$)",
    re.IGNORECASE,
)
# Shapes of real provider keys: sk-..., sk_live_..., rk_..., pk_..., xox[bp]-..., AKIA..., ghp_...
_SECRET_VALUE = re.compile(
    r"^(sk|rk|pk|ak|xox[abpr])[-_][A-Za-z0-9_-]{8,}|^AKIA[0-9A-Z]{12,}|^gh[pousr]_[A-Za-z0-9]{20,}"
    r"|^AIza[0-9A-Za-z_-]{20,}|^eyJ[A-Za-z0-9_-]{10,}\.",
)
_UUID = re.compile(
    r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$"
)
_ENTROPY_MIN_LEN = 24
_ENTROPY_BITS_PER_CHAR = 3.5
_MAX_DEPTH = 4  # strings nested deeper than this are not looked at


def find_secret(fields: dict[str, Any], allowed: frozenset[str]) -> str | None:
    """Why `fields` must be refused (a message for the client), or None."""
    for name, value in fields.items():
        if secret_field_name(name, allowed):
            return f"field {name[:64]!r} looks like a key secret; send metadata only"
        for text in _strings(value):
            if looks_like_secret(text):
                return f"field {name[:64]!r} holds what looks like a key secret; never send it"
    return None


def secret_field_name(name: str, allowed: frozenset[str]) -> bool:
    """True if `name` (not an allowed field like `api_key_id`) names a secret."""
    return name not in allowed and bool(_SECRET_NAME.search(name))


def looks_like_secret(value: str) -> bool:
    """True for provider-key shapes (sk-…, AKIA…, JWTs) and long high-entropy strings.

    "High entropy" means ≥ 24 characters, ≥ 3.5 bits per character and lower case, upper
    case and digits mixed, the shape of a base62 secret; UUIDs and hex ids pass.
    """
    if _SECRET_VALUE.search(value):
        return True
    if len(value) < _ENTROPY_MIN_LEN or " " in value or _UUID.match(value):
        return False
    return shannon_bits_per_char(value) >= _ENTROPY_BITS_PER_CHAR and _mixed_classes(value)


def shannon_bits_per_char(value: str) -> float:
    counts = Counter(value)
    n = len(value)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def _mixed_classes(value: str) -> bool:
    classes = (
        any(c.islower() for c in value),
        any(c.isupper() for c in value),
        any(c.isdigit() for c in value),
    )
    return sum(classes) == 3


def _strings(value: Any, depth: int = 0) -> list[str]:
    if isinstance(value, str):
        return [value]
    if depth > _MAX_DEPTH:
        return []
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k, depth + 1),
                                                       *_strings(v, depth + 1))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v, depth + 1)]
    return []
