"""What validation accepts, PostgreSQL casts: the msgspec types and the SQL casts agree."""

from __future__ import annotations

import asyncpg

from tests.unit.test_validate import validator


async def test_everything_validation_accepts_postgresql_casts(pool: asyncpg.Pool) -> None:
    """The SQL normalization casts what validation let through: that must never fail."""
    amounts = [
        "0",
        "-1",
        "+.5",
        "5.",
        "1e3",
        "1E-3",
        "12345678901234567890.123",
        "nan",
        "inf",
        "-Infinity",
        " 1",
        "1_000",
        "0x10",
        "1e400",
        "١٢",
    ]
    times = [
        "2024-05-01T12:00:00Z",
        "2024-05-01t12:00:00z",
        "2024-05-01 12:00:00+15:59",
        "2024-05-01T12:00:00.123456789-15:59",
        "0001-01-01T00:00:00Z",
        "9999-12-31T23:59:59Z",
        "2024-02-29T00:00:00",
        "2024-05-01T12:00:00+1600",
        "2024-05-01T24:00:00Z",
        "2024-05-01T12:00:60Z",
        "+002024-05-01T12:00:00Z",
    ]
    v = validator()
    ok_amounts = [a for a in amounts if not v.check([["k", a, "", ""]])]
    ok_times = [t for t in times if not v.check([["k", "", t, ""]])]
    assert len(ok_amounts) >= 6 and len(ok_times) >= 6
    for a in ok_amounts:
        assert await pool.fetchval("SELECT $1::text::numeric IS NOT NULL", a), a
    for t in ok_times:
        assert await pool.fetchval("SELECT $1::text::timestamptz IS NOT NULL", t), t
