"""Topic names and wildcard patterns, with AMQP topic-exchange semantics.

A name is made of segments separated by ``.``: ``order.created``. In a pattern, ``*`` matches
exactly one segment and ``#`` matches zero or more segments:

* ``user.*`` matches ``user.registered``; not ``user``, not ``user.profile.updated``;
* ``user.#`` matches all three; ``#`` matches every name; ``*.created`` matches ``order.created``.

Matching is done by a trie (:class:`PatternIndex`): the cost of a match grows with the depth of
the name, not with the number of patterns (pymitter and similar emitters scan every pattern).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

__all__ = [
    "PatternIndex",
    "is_wildcard",
    "matches",
    "validate_name",
    "validate_pattern",
    "validated_names",
]

T = TypeVar("T", bound=Hashable)
_WILDCARDS = ("*", "#")
_valid_names: set[str] = set()  # names validated once; bounded below
validated_names = _valid_names  # read-only view for hot paths: `name in validated_names`
_valid_patterns: set[str] = set()
_CACHE_LIMIT = 65_536


def _check_segments(text: object, kind: str, allow_wildcards: bool) -> list[str]:
    if not isinstance(text, str):
        raise TypeError(f"{kind} must be a string, got {type(text).__name__}")
    if not text:
        raise ValueError(f"{kind} must not be empty")
    segments = text.split(".")
    for position, seg in enumerate(segments, 1):
        if not seg:
            raise ValueError(f"{kind} {text!r} has an empty segment at position {position}")
        if seg != seg.strip() or any(c.isspace() for c in seg):
            raise ValueError(f"{kind} {text!r} has white space in segment {seg!r}")
        if seg in _WILDCARDS:
            if not allow_wildcards:
                raise ValueError(
                    f"{kind} {text!r} contains the wildcard {seg!r}; "
                    "wildcards belong in subscription patterns, not in event names"
                )
        elif "*" in seg or "#" in seg:
            if allow_wildcards:
                raise ValueError(
                    f"{kind} {text!r} has a wildcard inside segment {seg!r}; "
                    "'*' and '#' must stand alone as a whole segment"
                )
            raise ValueError(f"{kind} {text!r} contains a wildcard character in segment {seg!r}")
    return segments


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid event name, else raise ValueError saying why."""
    if name in _valid_names:
        return name
    _check_segments(name, "event name", allow_wildcards=False)
    if len(_valid_names) >= _CACHE_LIMIT:
        _valid_names.clear()
    _valid_names.add(name)
    return name


def validate_pattern(pattern: str) -> str:
    """Return ``pattern`` if it is a valid subscription pattern, else raise ValueError."""
    if pattern in _valid_patterns:
        return pattern
    _check_segments(pattern, "pattern", allow_wildcards=True)
    if len(_valid_patterns) >= _CACHE_LIMIT:
        _valid_patterns.clear()
    _valid_patterns.add(pattern)
    return pattern


def is_wildcard(pattern: str) -> bool:
    return any(seg in _WILDCARDS for seg in pattern.split("."))


def matches(pattern: str, name: str) -> bool:
    """Does ``pattern`` match ``name``? A direct matcher, for one-off checks."""
    validate_pattern(pattern)
    validate_name(name)
    pat, segs = pattern.split("."), name.split(".")

    def walk(i: int, j: int) -> bool:
        while i < len(pat):
            p = pat[i]
            if p == "#":
                return any(walk(i + 1, k) for k in range(j, len(segs) + 1))
            if j == len(segs) or (p != "*" and p != segs[j]):
                return False
            i, j = i + 1, j + 1
        return j == len(segs)

    return walk(0, 0)


class _Node:
    __slots__ = ("children", "hash", "items", "star")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.star: _Node | None = None
        self.hash: _Node | None = None
        self.items: dict = {}  # insertion-ordered set of items ending here

    def empty(self) -> bool:
        return not (self.children or self.star or self.hash or self.items)


class PatternIndex(Generic[T]):
    """A trie from patterns to items. ``match(name)`` returns every item whose pattern matches.

    Not thread-safe by itself: the bus guards it with its lock and caches match results.
    """

    def __init__(self) -> None:
        self._root = _Node()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, pattern: str, item: T) -> bool:
        """Add ``item`` under ``pattern``; False if it was already there."""
        node = self._root
        for seg in validate_pattern(pattern).split("."):
            if seg == "*":
                node.star = node.star or _Node()
                node = node.star
            elif seg == "#":
                node.hash = node.hash or _Node()
                node = node.hash
            else:
                node = node.children.setdefault(seg, _Node())
        if item in node.items:
            return False
        node.items[item] = None
        self._count += 1
        return True

    def remove(self, pattern: str, item: T) -> bool:
        """Remove ``item`` from ``pattern``; False if it was not there. Prunes empty branches."""
        path: list[tuple[_Node, str]] = []
        node: _Node | None = self._root
        for seg in validate_pattern(pattern).split("."):
            assert node is not None
            path.append((node, seg))
            if seg == "*":
                node = node.star
            elif seg == "#":
                node = node.hash
            else:
                node = node.children.get(seg)
            if node is None:
                return False
        if item not in node.items:
            return False
        del node.items[item]
        self._count -= 1
        for parent, seg in reversed(path):
            if not node.empty():
                break
            if seg == "*":
                parent.star = None
            elif seg == "#":
                parent.hash = None
            else:
                del parent.children[seg]
            node = parent
        return True

    def match(self, name: str) -> list[T]:
        """Items whose pattern matches ``name``, each once (in no particular order)."""
        segs = validate_name(name).split(".")
        found: dict = {}
        n = len(segs)

        def walk(node: _Node, i: int) -> None:
            if i == n:
                found.update(node.items)
                if node.hash is not None:  # '#' also matches zero segments
                    walk(node.hash, n)
                return
            child = node.children.get(segs[i])
            if child is not None:
                walk(child, i + 1)
            if node.star is not None:
                walk(node.star, i + 1)
            if node.hash is not None:
                for j in range(i, n + 1):
                    walk(node.hash, j)

        walk(self._root, 0)
        return list(found)

    def patterns(self) -> Iterator[tuple[str, T]]:
        """Every (pattern, item) pair in the index."""

        def walk(node: _Node, prefix: list[str]) -> Iterator[tuple[str, T]]:
            for item in node.items:
                yield ".".join(prefix), item
            for seg, child in node.children.items():
                yield from walk(child, [*prefix, seg])
            if node.star is not None:
                yield from walk(node.star, [*prefix, "*"])
            if node.hash is not None:
                yield from walk(node.hash, [*prefix, "#"])

        return walk(self._root, [])
