"""Broadcast servers the bench drives: baselines (picows, websockets) and Chorus itself.

Each runs as ``python -m bench.servers.<name> --port P --rate R`` and publishes the same
~120-byte messages stamped with ``"bt":<ns>`` (see :mod:`bench.servers.common`).
"""
