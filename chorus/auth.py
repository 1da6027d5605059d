"""Viewer tokens: minting and checking JWTs with an explicit algorithm allowlist.

PyJWT checks only the claims it is told to require, so ``exp``, ``iss``, ``aud`` and ``sub``
are required here explicitly (DESIGN.md 10). Tokens are never logged.

A token signed with the right key can still carry anything (a leaked development key, an
issuer's bug), so every claim Chorus reads is type-checked and anything wrong is an
:class:`AuthError`, never a TypeError further on: ``exp``/``iat``/``nbf`` are JSON numbers (not
numeric strings, not booleans); ``sub`` is 1-128 characters of text without control,
bidirectional or surrounding space characters; ``name`` (optional) is text, cleaned like
comment text (chorus/protocol.py clean_text; invalid characters are dropped, not refused) and
cut to 64 characters; ``scope`` a space-separated string, ``role`` a string, ``streams`` a
list of strings, ``verified`` a boolean. Other claims (``scopes`` among them) are not read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import jwt

from chorus.config import AuthConfig
from chorus.errors import ChorusError
from chorus.protocol import clean_text

__all__ = ["MAX_NAME_CHARS", "MAX_USER_ID_CHARS", "MODERATE", "POST_SCOPES", "AuthError", "Identity", "TokenExpired",
           "mint_token", "verify_token"]

READ = "read"
WRITE = "write"  # everything a viewer may do; kept for tokens minted before the finer scopes
WRITE_COMMENTS = "write:comments"
# Either of these lets a token post comments.
POST_SCOPES = frozenset({WRITE, WRITE_COMMENTS})
MODERATE = "moderate"  # the moderator API (gateway/modapi.py), like role moderator
MAX_USER_ID_CHARS = 128  # claim ``sub``
MAX_NAME_CHARS = 64  # claim ``name``, after cleaning
# exp/iat/nbf: seconds since the Unix epoch, at most 2^53 (exact as a float; ~285 million years)
MAX_TIME_S = 2**53


class AuthError(ChorusError):
    """The token is missing, malformed, expired or signed with another key."""


class TokenExpired(AuthError):
    """The token verified but its ``exp`` (plus the leeway) has passed: the client needs a fresh one."""


@dataclass(frozen=True, slots=True)
class Identity:
    user_id: str
    name: str
    scopes: frozenset[str] = field(default_factory=frozenset)
    role: str = "viewer"
    expires_at: float = float("inf")
    # Claim ``streams``: the streams a broadcaster owns, or the only ones a moderator may moderate.
    streams: frozenset[str] = field(default_factory=frozenset)
    verified: bool = False  # claim ``verified``: the issuer vouches for the account (a badge, a priority lane)

    @property
    def can_write(self) -> bool:
        """May post comments: scope ``write:comments`` (or ``write``) and the token not expired."""
        return not POST_SCOPES.isdisjoint(self.scopes) and time.time() < self.expires_at

    def badges(self) -> list[str]:
        """The role's badge (moderator, broadcaster) and ``verified``: shown with each comment,
        and the priority lanes that sampling never drops (ingest/sampling.py)."""
        out = [self.role] if self.role in ("moderator", "broadcaster") else []
        return [*out, "verified"] if self.verified else out

    def may_moderate(self, stream: str) -> bool:
        """The moderator API: a moderator (role, or scope ``moderate``) on every stream unless the
        token names its streams; a broadcaster on the streams it owns (claim ``streams``)."""
        if time.time() >= self.expires_at:
            return False
        if self.role == "moderator" or MODERATE in self.scopes:
            return not self.streams or stream in self.streams
        return self.role == "broadcaster" and stream in self.streams


def mint_token(cfg: AuthConfig, user_id: str, name: str, scopes: list[str], role: str = "viewer",
               ttl_s: int | None = None, streams: list[str] | None = None, verified: bool = False) -> str:
    now = int(time.time())
    claims = {
        "sub": user_id,
        "name": name,
        "scope": " ".join(scopes),
        "role": role,
        "iss": cfg.issuer,
        "aud": cfg.audience,
        "iat": now,
        "exp": now + (ttl_s if ttl_s is not None else cfg.token_ttl_s),
    }
    if streams:
        claims["streams"] = list(streams)
    if verified:
        claims["verified"] = True
    return jwt.encode(claims, cfg.key, algorithm=cfg.algorithm)


def verify_token(cfg: AuthConfig, token: str) -> Identity:
    """The identity a valid token carries; AuthError for anything else, whatever the token holds."""
    try:
        claims = jwt.decode(
            token,
            cfg.key,
            algorithms=[cfg.algorithm],
            audience=cfg.audience,
            issuer=cfg.issuer,
            leeway=cfg.leeway_s,
            options={"require": ["exp", "iss", "aud", "sub"]},
        )
    except jwt.ExpiredSignatureError:
        raise TokenExpired("the token has expired") from None
    except jwt.PyJWTError as exc:
        raise AuthError(str(exc)) from None
    except ValueError:  # a str token that is not even UTF-8 (a lone surrogate)
        raise AuthError("the token is not text") from None
    return _identity(claims)


def _identity(claims: dict[str, Any]) -> Identity:
    """Checks each claim's type; PyJWT has checked the signature, iss, aud and the times' values."""
    for name in ("iat", "nbf"):
        if name in claims:
            _time_claim(claims, name)
    user_id = _user_id(claims.get("sub"))
    return Identity(
        user_id=user_id,
        name=_display_name(claims.get("name"), user_id),
        scopes=frozenset(_string_claim(claims, "scope", "").split()),
        role=_string_claim(claims, "role", "viewer"),
        expires_at=_time_claim(claims, "exp"),
        streams=frozenset(_streams(claims.get("streams", []))),
        verified=_verified(claims.get("verified", False)),
    )


def _time_claim(claims: dict[str, Any], name: str) -> float:
    # PyJWT compares int(value), which takes "1999999999" and true as well. The bound also
    # refuses NaN and infinities (no comparison holds for NaN) and ints too big for a float.
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not abs(value) <= MAX_TIME_S:
        raise AuthError(f"the {name} claim must be a number of seconds since the Unix epoch")
    return float(value)


def _string_claim(claims: dict[str, Any], name: str, default: str) -> str:
    value = claims.get(name, default)
    if not isinstance(value, str):
        raise AuthError(f"the {name} claim must be a string")
    return value


def _user_id(sub: object) -> str:
    if not isinstance(sub, str) or not 0 < len(sub) <= MAX_USER_ID_CHARS or clean_text(sub, "sub")[0] != sub:
        raise AuthError(f"the sub claim must be 1-{MAX_USER_ID_CHARS} characters of text without control, "
                        "bidirectional or surrounding space characters")
    return sub


def _display_name(name: object, user_id: str) -> str:
    """The claim ``name`` cleaned like comment text, or the user id if it has none."""
    if name is None:
        return user_id
    if not isinstance(name, str):
        raise AuthError("the name claim must be a string")
    clean = clean_text(name, "name", drop_invalid=True)[0] or ""
    return clean[:MAX_NAME_CHARS].rstrip() or user_id


def _streams(streams: object) -> list[str]:
    if not isinstance(streams, list) or not all(isinstance(s, str) for s in streams):
        raise AuthError("the streams claim must be a list of stream ids")
    return streams


def _verified(verified: object) -> bool:
    if not isinstance(verified, bool):
        raise AuthError("the verified claim must be true or false")
    return verified
