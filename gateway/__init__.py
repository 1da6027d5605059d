"""The WebSocket edge: HTTP upgrade and auth on picows + uvloop, the hub that fans out to
viewers, and the node that keeps a stream's channel subscribed while it has local viewers."""

__all__: list[str] = []
