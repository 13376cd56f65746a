"""One error tree: every error spendstream raises on purpose is in the tree that opens
spendstream/errors.py, under the documented parent, and importable from `producers`."""

from __future__ import annotations

import re

import producers
from spendstream import errors


def test_the_documented_tree_is_the_class_tree_and_producers_exports_it() -> None:
    lines = [
        line
        for line in (errors.__doc__ or "").splitlines()
        if re.match(r"^[│├└─ ]*[A-Z]\w+Error\b|^[│├└─ ]+[A-Z]", line)
    ]
    documented: dict[str, str] = {}  # class -> documented parent
    stack: list[tuple[int, str]] = []
    for line in lines:
        name = re.search(r"[A-Z]\w+", line)
        assert name is not None
        depth = name.start()
        while stack and stack[-1][0] >= depth:
            stack.pop()
        documented[name.group()] = stack[-1][1] if stack else ""
        stack.append((depth, name.group()))
    classes = {
        n: c
        for n, c in vars(errors).items()
        if isinstance(c, type) and issubclass(c, errors.SpendstreamError)
    }
    assert set(documented) == set(classes) == set(errors.__all__)
    for error, parent in documented.items():
        if parent:
            assert classes[error].__bases__[0] is classes[parent], (error, parent)
        assert getattr(producers, error) is classes[error]  # one import for a service
