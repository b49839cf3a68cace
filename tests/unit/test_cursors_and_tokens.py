"""Read API cursors and change-feed tokens: round trips, and every altered one refused."""

from __future__ import annotations

import pytest

from etlsvc import db
from etlsvc.api import changes
from etlsvc.api.http import (
    ApiError,
    decode_cursor,
    encode_cursor,
    feed_token,
    keyset_page,
    token_tag,
)

FILTERS = ("Books", None)


@pytest.mark.parametrize("position", [0, 1, 41, db.MAX_ID])
def test_a_cursor_gives_back_its_position_for_the_same_filters(position: int) -> None:
    assert decode_cursor(encode_cursor(position, FILTERS), FILTERS) == position


def test_a_cursor_made_for_other_filters_is_refused() -> None:
    with pytest.raises(ApiError, match="made for other filters") as err:
        decode_cursor(encode_cursor(5, FILTERS), ("Music", None))
    assert err.value.status_code == 400


@pytest.mark.parametrize("cursor", ["", "x", "AAAA", "not base64!", "eyJhZnRlciI6MX0"])
def test_an_altered_cursor_is_refused(cursor: str) -> None:
    with pytest.raises(ApiError, match="not one this API gave out"):
        decode_cursor(cursor, FILTERS)


def test_a_flipped_character_is_refused() -> None:
    good = encode_cursor(12345, FILTERS)
    flipped = good[:-3] + ("A" if good[-3] != "A" else "B") + good[-2:]
    with pytest.raises(ApiError):
        decode_cursor(flipped, FILTERS)


def test_a_keyset_page_says_whether_there_is_more() -> None:
    rows = [{"id": i} for i in (3, 5, 8)]
    page, meta = keyset_page(rows, 2, FILTERS)
    assert page == rows[:2] and meta["has_more"]
    assert decode_cursor(meta["next_cursor"], FILTERS) == 5
    page, meta = keyset_page(rows, 3, FILTERS)
    assert page == rows and meta == {"limit": 3, "next_cursor": None, "has_more": False}


def test_a_change_token_round_trips_and_0_is_the_beginning() -> None:
    assert changes.parse_token("0") == changes.BEGINNING
    position = changes.Position(123456, 789)
    assert changes.parse_token(position.token) == position


def test_a_change_token_carries_whom_it_was_given_to() -> None:
    """The feed tags each token with its caller's tenant and grants (http.feed_token):
    another caller's is refused; one from before tags (none) is still taken."""
    position = changes.Position(42, 7)
    acme, globex = db.ReadScope("acme"), db.ReadScope("globex")
    token = db.READ_SCOPE.set(acme)
    try:
        given = feed_token(position)
        assert given.startswith("42-7.") and changes.parse_token(given, token_tag) == position
        assert changes.parse_token("42-7", token_tag) == position
        db.READ_SCOPE.set(globex)
        with pytest.raises(changes.ForeignToken, match="given to another caller"):
            changes.parse_token(given, token_tag)
        assert changes.parse_token(feed_token(position), token_tag) == position
    finally:
        db.READ_SCOPE.reset(token)


@pytest.mark.parametrize("token", ["", "now-1", "1", "1-", "-1-2", "1-2-3", "a-b", "1-2.",
                                   "1-2.abcdefg", "1-2.ABCDEF12", "1-2.abcdef123",
                                   f"1-{db.MAX_ID + 1}", "99999999999999999999999-1"])
def test_anything_else_is_not_a_token(token: str) -> None:
    with pytest.raises(ValueError, match="is not a change feed token"):
        changes.parse_token(token)
