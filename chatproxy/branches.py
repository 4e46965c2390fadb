"""The tree a conversation's messages form: each has a parent, a conversation an active leaf.

Pure functions over ``(id, parent_id)`` pairs, so the history sent upstream (the path from the
root to the message answered) is found in one query of the conversation's rows. Nothing is
ever overwritten: a regenerated answer or an edited question is a new sibling.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

Row = TypeVar("Row", bound=Sequence[object])


def path(rows: Mapping[uuid.UUID, Row], leaf: uuid.UUID | None, parent_at: int = 1) -> list[Row]:
    """The rows from the root down to ``leaf`` (included), given each row by its id with its
    parent's id at index ``parent_at``; empty without a leaf."""
    found: list[Row] = []
    seen: set[uuid.UUID] = set()
    node = leaf
    while node is not None and node in rows and node not in seen:  # a cycle is a bug: stop
        seen.add(node)
        row = rows[node]
        found.append(row)
        node = row[parent_at]  # type: ignore[assignment]
    found.reverse()
    return found


Tree = dict[uuid.UUID | None, list[uuid.UUID]]  # each node's children, the roots under None


def children(pairs: Iterable[tuple[uuid.UUID, uuid.UUID | None]]) -> Tree:
    """Each message's children in the order given (the conversation's ``position`` order);
    the roots under ``None``."""
    found: Tree = {}
    for node, parent in pairs:
        found.setdefault(parent, []).append(node)
    return found


def newest_leaf(tree: Tree, start: uuid.UUID) -> uuid.UUID:
    """The leaf reached from ``start`` by always taking the newest child: where switching to
    ``start``'s branch lands."""
    node = start
    while tree.get(node):
        node = tree[node][-1]
    return node


def leaves(tree: Tree) -> list[uuid.UUID]:
    """Every leaf of the tree, each the end of one branch, in the order of the nodes."""
    parents = set(tree)
    return [node for kids in tree.values() for node in kids if node not in parents]


def chain_unlinked(rows: list[Row], parent_at: int = 1) -> list[Row]:
    """Rows in writing order, as given; if none has a parent (rows written before the tree,
    or by hand), each is made the child of the one before: one branch, as they were read."""
    if len(rows) < 2 or any(row[parent_at] is not None for row in rows):
        return rows
    chained = [rows[0]]
    for before, row in itertools.pairwise(rows):
        chained.append((*row[:parent_at], before[0], *row[parent_at + 1 :]))  # type: ignore[arg-type]
    return chained
