"""Chorus benchmark suite: ``python -m bench <scenario>`` (see ``bench/README.md``).

Not part of the installed package. ``bench/micro`` holds the pytest-benchmark microbenchmarks;
the rest drives real servers over loopback with the C load generator.
"""
