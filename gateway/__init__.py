"""The WebSocket edge: HTTP upgrade and auth on picows + uvloop, the hub that fans out to
viewers, and the node that keeps a stream's channel subscribed while it has local viewers."""

if __name__ != "chorus.gateway":  # one import name: the folder is installed as chorus.gateway
    raise ImportError(f"import chorus.gateway, not {__name__} (pip install -e . maps gateway/ to chorus.gateway)")


__all__: list[str] = []
