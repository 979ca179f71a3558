"""Topic names and wildcard patterns: AMQP semantics, validation, the trie against a reference."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.patterns import PatternIndex, is_wildcard, matches, validate_name, validate_pattern


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("user.*", "user.registered", True),
        ("user.*", "user", False),
        ("user.*", "user.profile.updated", False),
        ("user.#", "user", True),  # '#' matches zero segments
        ("user.#", "user.registered", True),
        ("user.#", "user.profile.updated", True),
        ("#", "user", True),
        ("#", "a.b.c.d", True),
        ("*.created", "order.created", True),
        ("*.created", "created", False),
        ("*.created", "shop.order.created", False),
        ("#.created", "created", True),
        ("#.created", "shop.order.created", True),
        ("a.#.z", "a.z", True),
        ("a.#.z", "a.b.c.z", True),
        ("a.#.z", "a.b.c", False),
        ("*", "user", True),
        ("*", "user.registered", False),
        ("*.*", "user.registered", True),
        ("user.registered", "user.registered", True),
        ("user.registered", "user.registered.v2", False),
        ("#.#", "a", True),
        ("a.*.#", "a", False),
        ("a.*.#", "a.b", True),
    ],
)
def test_amqp_topic_semantics(pattern: str, name: str, expected: bool) -> None:
    assert matches(pattern, name) is expected
    index: PatternIndex[str] = PatternIndex()
    index.add(pattern, "item")
    assert (index.match(name) == ["item"]) is expected


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "must not be empty"),
        ("user..registered", "empty segment at position 2"),
        (".user", "empty segment at position 1"),
        ("user.", "empty segment at position 2"),
        ("user.*", "wildcards belong in subscription patterns"),
        ("user.#", "wildcards belong in subscription patterns"),
        ("us*r.created", "wildcard character"),
        ("user registered", "white space"),
    ],
)
def test_invalid_event_names_are_rejected_with_a_clear_message(name: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_name(name)


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("", "must not be empty"),
        ("user..*", "empty segment"),
        ("us*r", "wildcard inside segment 'us*r'"),
        ("user.#x", "wildcard inside segment '#x'"),
        ("a.**", "wildcard inside segment '**'"),
        ("a. b", "white space"),
    ],
)
def test_invalid_patterns_are_rejected_with_a_clear_message(pattern: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_pattern(pattern)


def test_non_strings_are_a_type_error() -> None:
    with pytest.raises(TypeError, match="must be a string"):
        validate_name(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be a string"):
        validate_pattern(None)  # type: ignore[arg-type]


def test_is_wildcard() -> None:
    assert is_wildcard("user.*") and is_wildcard("#")
    assert not is_wildcard("user.registered")


def test_index_add_remove_and_prune() -> None:
    index: PatternIndex[str] = PatternIndex()
    assert index.add("a.*.c", "x")
    assert not index.add("a.*.c", "x")  # already there
    assert index.add("a.#", "y")
    assert len(index) == 2
    assert sorted(index.match("a.b.c")) == ["x", "y"]
    assert index.remove("a.*.c", "x")
    assert not index.remove("a.*.c", "x")
    assert not index.remove("never.added", "x")
    assert index.match("a.b.c") == ["y"]
    assert index.remove("a.#", "y")
    assert len(index) == 0
    assert index._root.empty()  # every branch was pruned
    assert list(index.patterns()) == []


def test_index_lists_its_patterns() -> None:
    index: PatternIndex[int] = PatternIndex()
    for i, pattern in enumerate(["a.b", "a.*", "#", "a.#.c"]):
        index.add(pattern, i)
    assert sorted(index.patterns()) == [("#", 2), ("a.#.c", 3), ("a.*", 1), ("a.b", 0)]


def test_an_item_matched_by_several_paths_is_returned_once() -> None:
    index: PatternIndex[str] = PatternIndex()
    index.add("#.#.#", "x")
    assert index.match("a.b.c") == ["x"]


# -- property-based: the trie agrees with a straightforward reference matcher ---------------


def reference_match(pattern: str, name: str) -> bool:
    """The definition, by exhaustive backtracking: '#' tries every split, '*' takes one segment."""
    return _ref(pattern.split("."), name.split("."))


def _ref(pat: list[str], segs: list[str]) -> bool:
    if not pat:
        return not segs
    head, rest = pat[0], pat[1:]
    if head == "#":
        return any(_ref(rest, segs[k:]) for k in range(len(segs) + 1))
    if not segs:
        return False
    return (head == "*" or head == segs[0]) and _ref(rest, segs[1:])


segment = st.sampled_from(["a", "b", "c", "order", "user"])
pattern_segment = st.sampled_from(["a", "b", "c", "order", "user", "*", "#"])
names = st.lists(segment, min_size=1, max_size=5).map(".".join)
patterns = st.lists(pattern_segment, min_size=1, max_size=5).map(".".join)


@settings(max_examples=300, deadline=None)
@given(pats=st.lists(patterns, min_size=1, max_size=12, unique=True), name=names)
def test_trie_agrees_with_the_reference_matcher(pats: list[str], name: str) -> None:
    index: PatternIndex[str] = PatternIndex()
    for p in pats:
        index.add(p, p)
    expected = {p for p in pats if reference_match(p, name)}
    assert set(index.match(name)) == expected
    assert {p for p in pats if matches(p, name)} == expected


@settings(max_examples=100, deadline=None)
@given(pats=st.lists(patterns, min_size=1, max_size=12, unique=True), data=st.data())
def test_removing_patterns_leaves_exactly_the_rest(pats: list[str], data: st.DataObject) -> None:
    index: PatternIndex[str] = PatternIndex()
    for p in pats:
        index.add(p, p)
    removed = data.draw(st.sets(st.sampled_from(pats)))
    for p in removed:
        assert index.remove(p, p)
    name = data.draw(names)
    kept = [p for p in pats if p not in removed]
    assert set(index.match(name)) == {p for p in kept if reference_match(p, name)}
    assert len(index) == len(kept)
