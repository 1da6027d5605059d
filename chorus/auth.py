"""Viewer tokens: minting and checking JWTs with an explicit algorithm allowlist.

PyJWT checks only the claims it is told to require, so ``exp``, ``iss``, ``aud`` and ``sub``
are required here explicitly (DESIGN.md 10). Tokens are never logged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import jwt

from chorus.config import AuthConfig

__all__ = ["MODERATE", "POST_SCOPES", "AuthError", "Identity", "mint_token", "verify_token"]

READ = "read"
WRITE = "write"  # everything a viewer may do; kept for tokens minted before the finer scopes
WRITE_COMMENTS = "write:comments"
# Either of these lets a token post comments.
POST_SCOPES = frozenset({WRITE, WRITE_COMMENTS})
MODERATE = "moderate"  # the moderator API (gateway/modapi.py), like role moderator


class AuthError(Exception):
    """The token is missing, malformed, expired or signed with another key."""


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
    except jwt.PyJWTError as exc:
        raise AuthError(str(exc)) from None
    scope = claims.get("scope", "")
    name = claims.get("name") or claims["sub"]
    if not isinstance(scope, str) or not isinstance(name, str):
        raise AuthError("scope and name claims must be strings")
    streams = claims.get("streams", [])
    if not isinstance(streams, list) or not all(isinstance(s, str) for s in streams):
        raise AuthError("the streams claim must be a list of stream ids")
    verified = claims.get("verified", False)
    if not isinstance(verified, bool):
        raise AuthError("the verified claim must be true or false")
    return Identity(
        user_id=str(claims["sub"]),
        name=name[:64],
        scopes=frozenset(scope.split()),
        role=str(claims.get("role", "viewer")),
        expires_at=float(claims["exp"]),
        streams=frozenset(streams),
        verified=verified,
    )
