"""Tokens (HS256 JWTs, PyJWT), roles and scoping.

Several secrets may be configured for rotation: the first signs, all verify.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Sequence

import jwt
import msgspec

from .model import Terminal
from .protocol import Identifier
from .rules import CAPABILITIES

ROLES = frozenset(CAPABILITIES)
# An HS256 key shorter than its hash can be guessed offline from any token (RFC 7518 3.2).
MIN_SECRET_BYTES = 32
_REQUIRED_CLAIMS = ["sub", "store", "role", "exp"]


class AuthError(Exception):
    pass


class Tokens:
    def __init__(self, secrets: Sequence[str]) -> None:
        if not secrets:
            raise ValueError("at least one secret is needed")
        self.secrets = list(secrets)

    def verify(self, token: str) -> tuple[Terminal, int]:
        """The terminal a token names, and when the token expires (epoch seconds)."""
        claims = None
        for secret in self.secrets:
            try:
                claims = jwt.decode(token, secret, algorithms=["HS256"],
                                    options={"require": _REQUIRED_CLAIMS})
                break
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError as exc:
                raise AuthError(str(exc)) from None
        if claims is None:
            raise AuthError("signature verification failed")
        return terminal_of(claims), int(claims["exp"])

    def mint(self, *, store: str, role: str, sub: str, table: str | None = None,
             ttl_s: int = 12 * 3600, name: str | None = None) -> str:
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(sorted(ROLES))}")
        if CAPABILITIES[role].table_scoped and not table:
            raise ValueError("an h5 token needs a table")
        claims: dict[str, object] = {"sub": sub, "store": store, "role": role,
                                     "exp": int(time.time()) + ttl_s}
        if table is not None:
            claims["table"] = table
        if name is not None:
            claims["name"] = name
        return jwt.encode(claims, self.secrets[0], algorithm="HS256")


def terminal_of(claims: dict[str, object]) -> Terminal:
    sub, store, role = claims.get("sub"), claims.get("store"), claims.get("role")
    table, name = claims.get("table"), claims.get("name")
    if not isinstance(sub, str) or not sub or not isinstance(store, str) or not store:
        raise AuthError("sub and store must be non-empty strings")
    if any(c in store for c in ":{}"):
        raise AuthError("store ids may not contain ':', '{' or '}'")
    if role not in ROLES:
        raise AuthError(f"unknown role {role!r}")
    if isinstance(table, int) and not isinstance(table, bool):
        table = str(table)
    if CAPABILITIES[role].table_scoped and (not isinstance(table, str) or not table):
        raise AuthError("an h5 token must name its table")
    if table is not None and not isinstance(table, str):
        raise AuthError("table must be a string")
    for claim, value in (("sub", sub), ("store", store), ("table", table)):
        if value is not None and not _is_identifier(value):
            raise AuthError(f"{claim} must be an id (printable, at most its bound in length)")
    if name is not None and not isinstance(name, str):
        raise AuthError("name must be a string")
    return Terminal(sub, role, name or sub, store, table)


def _is_identifier(value: str) -> bool:
    """The claims that become ids on the wire obey the ids' own bounds (protocol.Identifier)."""
    try:
        msgspec.convert(value, Identifier)
    except msgspec.ValidationError:
        return False
    return True


def short_secrets(secrets: Sequence[str]) -> list[str]:
    """What to warn about each secret shorter than MIN_SECRET_BYTES."""
    return [f"secret {n} of {len(secrets)} is {len(secret.encode())} bytes, under the "
            f"{MIN_SECRET_BYTES} HS256 needs: anyone holding a token can guess it offline. "
            f"Make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            for n, secret in enumerate(secrets, 1) if len(secret.encode()) < MIN_SECRET_BYTES]


def silence_key_length_warnings() -> None:
    """PyJWT warns on every token it signs or verifies with a short key; once the broker
    has said so at start, those repeats are noise."""
    warnings.filterwarnings("ignore", message="The HMAC key is", category=UserWarning)


_TTL = re.compile(r"^(\d+)([smhd])$")


def parse_ttl(text: str) -> int:
    """'12h' -> seconds. The unit is required: a bare '12' could mean hours as well."""
    match = _TTL.match(text.strip())
    if not match:
        raise ValueError(f"bad duration {text!r}: give a number and a unit (s, m, h or d), "
                         f"e.g. 90s, 30m, 12h or 7d")
    number, unit = int(match.group(1)), match.group(2)
    return number * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
