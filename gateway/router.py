"""Path routing: a table of (method, path template, handler), matched in order.

The gateway's GET routes (gateway/routes.py) and the moderator API (gateway/modapi.py) are
both such tables. A template is a path with ``{name}`` for one segment (one or more
characters, no ``/``) or ``{name:pattern}`` for a regular expression of its own (which may
cross segments, or match nothing); everything else is literal::

    /streams/{stream}/comments
    /mod/streams/{stream}/comments/{id:[^/]*}/{op:delete|pin}
    /static/{name:.*}

:meth:`Router.match` gives the first route whose template matches the whole path and whose
method is the request's; when only routes of other methods match, it says which methods the
path takes (for a 405 and its ``Allow``), with the arguments of the first of them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Route", "RouteMatch", "Router", "compile_template"]

H = TypeVar("H")
_PLACEHOLDER = re.compile(r"\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::(?P<pattern>[^{}]*))?\}")
SEGMENT = "[^/]+"  # what {name} matches


def compile_template(template: str) -> re.Pattern[str]:
    """The regular expression of a path template (matched against the whole path)."""
    out, at = [], 0
    for found in _PLACEHOLDER.finditer(template):
        out.append(re.escape(template[at:found.start()]))
        out.append(f"(?P<{found['name']}>{found['pattern'] if found['pattern'] is not None else SEGMENT})")
        at = found.end()
    out.append(re.escape(template[at:]))
    return re.compile("".join(out))


@dataclass(frozen=True, slots=True)
class Route(Generic[H]):
    method: str
    template: str
    handler: H
    pattern: re.Pattern[str]


@dataclass(frozen=True, slots=True)
class RouteMatch(Generic[H]):
    """A route found for a path: ``handler`` is None when the path takes only ``allow``'s methods."""

    handler: H | None
    args: dict[str, str]
    allow: str  # on a refusal, every method the path takes (comma-separated, table order); else the method

    @property
    def allowed(self) -> bool:
        return self.handler is not None


class Router(Generic[H]):
    """Routes (method, path) to the first handler whose template matches."""

    def __init__(self, routes: Iterable[tuple[str, str, H]]) -> None:
        self.routes = [Route(method, template, handler, compile_template(template))
                       for method, template, handler in routes]

    def match(self, method: str, path: str) -> RouteMatch[H] | None:
        """The route for ``method`` at ``path``; a match without handler if only other methods
        are served there; None if nothing is."""
        other: RouteMatch[H] | None = None
        methods: list[str] = []
        for route in self.routes:
            found = route.pattern.fullmatch(path)
            if found is None:
                continue
            if route.method == method:
                return RouteMatch(route.handler, found.groupdict(), route.method)
            if route.method not in methods:
                methods.append(route.method)
            if other is None:
                other = RouteMatch(None, found.groupdict(), "")
        return None if other is None else RouteMatch(None, other.args, ", ".join(methods))
