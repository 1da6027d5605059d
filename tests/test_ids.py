"""Comment ids: time-ordered, unique per node, decodable to their time."""

from chorus.ids import IdGenerator, id_time_ms


def test_ids_increase_and_carry_their_time() -> None:
    now = [1_764_037_000_123]
    gen = IdGenerator(5, clock_ms=lambda: now[0])
    ids = [gen.next_int() for _ in range(5000)]  # more than 4096 in one millisecond
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert id_time_ms(ids[0]) == now[0]
    now[0] -= 10  # the clock steps back: ids keep increasing
    assert gen.next_int() > ids[-1]


def test_nodes_never_collide() -> None:
    a = IdGenerator(1, clock_ms=lambda: 1_764_037_000_000)
    b = IdGenerator(2, clock_ms=lambda: 1_764_037_000_000)
    assert {a.next() for _ in range(1000)}.isdisjoint({b.next() for _ in range(1000)})
