"""The Lua scripts ship as package data, each named once, and the order keys sort as numbers."""

from __future__ import annotations

from importlib import resources

from hypothesis import given
from hypothesis import strategies as st

from jobledger.stores.redis.keys import order_head
from jobledger.stores.redis.scripts import NAMES, source


def test_every_script_file_is_loaded_and_every_name_has_one() -> None:
    folder = resources.files("jobledger.stores.redis") / "lua"
    files = {p.name.removesuffix(".lua") for p in folder.iterdir() if p.name.endswith(".lua")}
    assert files == {*NAMES, "common"}
    for name in NAMES:
        assert source(name).startswith("-- Shared by every jobledger script")


@given(st.floats(allow_nan=False), st.floats(allow_nan=False))
def test_order_heads_sort_as_their_numbers(a: float, b: float) -> None:
    if a < b:
        assert order_head(a) < order_head(b)
    elif a > b:
        assert order_head(a) > order_head(b)
    assert len(order_head(a)) == 16
