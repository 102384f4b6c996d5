from __future__ import annotations

import dataclasses
import os
import typing

from m2flow.config import Config, configuration_doc, options_markdown

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_option_has_a_doc():
    rows = [line for line in options_markdown().splitlines()[2:]]
    assert rows
    for row in rows:
        assert row.rstrip("|").rsplit("|", 1)[1].strip(), f"option without a doc comment: {row}"


def test_every_leaf_option_is_listed():
    def leaves(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from leaves(hints[f.name], f"{prefix}{f.name}.")
            else:
                yield prefix + f.name

    text = options_markdown()
    for key in leaves(Config):
        assert f"| `{key}` |" in text


def test_docs_configuration_md_is_up_to_date():
    with open(os.path.join(ROOT, "docs", "configuration.md")) as f:
        assert f.read() == configuration_doc(), "regenerate: python -m m2flow.config > docs/configuration.md"
