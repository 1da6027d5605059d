"""gateway/router.py: templates match whole paths, in table order, and say which methods a path takes."""

from __future__ import annotations

import pytest

from chorus.gateway.router import Router, compile_template

TABLE = Router([
    ("POST", "/mod/streams/{stream}/comments/{id:[^/]*}/{op:delete|pin}", "comment_op"),
    ("POST", "/mod/streams/{stream}/queue/{id:[^/]*}", "resolve"),
    ("GET", "/mod/streams/{stream}/queue", "queue"),
    ("PUT", "/mod/streams/{stream}/queue", "queue_put"),
    ("GET", "/static/{name:.*}", "static"),
    ("GET", "/streams/{stream:.*}/comments", "history"),
    ("GET", "/streams/{stream:[^/]*/*}", "page"),
])


@pytest.mark.parametrize(("method", "path", "handler", "args"), [
    ("POST", "/mod/streams/s1/comments/42/delete", "comment_op", {"stream": "s1", "id": "42", "op": "delete"}),
    ("POST", "/mod/streams/s1/comments//pin", "comment_op", {"stream": "s1", "id": "", "op": "pin"}),
    ("POST", "/mod/streams/s1/queue/7", "resolve", {"stream": "s1", "id": "7"}),
    ("GET", "/mod/streams/s1/queue", "queue", {"stream": "s1"}),
    ("GET", "/static/", "static", {"name": ""}),
    ("GET", "/static/a/b.css", "static", {"name": "a/b.css"}),
    ("GET", "/streams/a/comments", "history", {"stream": "a"}),
    ("GET", "/streams/a//", "page", {"stream": "a//"}),
])
def test_the_first_matching_route_of_the_method_answers(method: str, path: str, handler: str,
                                                        args: dict[str, str]) -> None:
    found = TABLE.match(method, path)
    assert found is not None and (found.handler, found.args) == (handler, args)


@pytest.mark.parametrize("path", [
    "/mod/streams/s1/comments/42/delete/", "/mod/streams/s1/comments/42/ban", "/mod/streams//queue",
    "/mod/streams/s1/queue\n", "/streams/a/b", "/nothing", "",
])
def test_a_path_no_template_matches_whole_is_not_served(path: str) -> None:
    assert TABLE.match("GET", path) is None and TABLE.match("POST", path) is None


def test_a_path_served_for_other_methods_says_which_with_its_arguments() -> None:
    found = TABLE.match("DELETE", "/mod/streams/s1/queue")
    assert found is not None and not found.allowed
    assert (found.allow, found.args) == ("GET, PUT", {"stream": "s1"})
    wrong = TABLE.match("GET", "/mod/streams/s1/queue/9")
    assert wrong is not None and (wrong.handler, wrong.allow) == (None, "POST")


def test_literal_parts_of_a_template_are_not_patterns() -> None:
    dotted = compile_template("/index.html")
    assert dotted.fullmatch("/index.html") and not dotted.fullmatch("/indexXhtml")
    assert compile_template("/a/{b}").fullmatch("/a/x/y") is None
