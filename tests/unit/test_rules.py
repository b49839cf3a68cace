"""Data-quality rules without a database: a rule that cannot hold is a ConfigError naming its
key; a compiled rule rejects exactly the values that break it, naming the rule."""

from __future__ import annotations

import pytest

from etlsvc.contract import Fields, Rule
from etlsvc.errors import ConfigError
from etlsvc.transform.rules import compile_rules
from etlsvc.transform.validate import RowValidator

MAPPED = {"source_id": "id", "amount": "price", "category": "cat", "title": "name"}


@pytest.mark.parametrize(("rules", "message"), [
    ({"nosuch": Rule()}, "rules.nosuch': unknown normalized field"),
    ({"url": Rule()}, "rules.url': the field has rules but is not mapped"),
    ({"amount": Rule(type="text")}, "rules.amount.type': amount is stored as numeric"),
    ({"title": Rule(min=1)}, "rules.title.min': min and max apply to numbers"),
    ({"amount": Rule(min=5.0, max=1.0)}, "rules.amount.min': min (5.0) is above max (1.0)"),
    ({"title": Rule(min_length=5, max_length=1)}, "rules.title.min_length'"),
    ({"category": Rule(type="enum")}, "rules.category.allowed': an enum field needs"),
    ({"title": Rule(regex="(")}, "rules.title.regex': not a valid regular expression"),
])
def test_a_rule_that_cannot_hold_names_its_key(rules: dict[str, Rule], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        compile_rules(MAPPED, rules, ";")


def test_each_rule_rejects_what_breaks_it_and_names_the_rule() -> None:
    rules = {"amount": Rule(min=0.0, max=100.0), "category": Rule(type="enum",
                                                              allowed=("Books", "Music")),
             "title": Rule(required=True, max_length=5, regex="^[a-z]+$")}
    fields = Fields(**MAPPED)
    validator = RowValidator(["id", "price", "cat", "name"], fields,
                             compile_rules(MAPPED, rules, ";"))
    rows = [["1", "50", "Books", "ab"],        # good
            ["2", "-1", "Books", "ab"],        # below min
            ["3", "50", "Toys", "ab"],         # not allowed
            ["4", "50", "Music", ""],          # required
            ["5", "50", "Music", "abcdefg"],   # too long
            ["6", "50", "Music", "AB"],        # regex
            ["", "50", "Music", "ab"]]         # source_id is always required
    found = {i: (p.rule, p.field) for i, p in validator.check(rows).items()}
    assert found == {1: ("min", "amount"), 2: ("allowed", "category"),
                     3: ("required", "title"), 4: ("max_length", "title"),
                     5: ("regex", "title"), 6: ("required", "source_id")}
