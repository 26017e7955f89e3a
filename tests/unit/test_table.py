"""Command-line tables: header, rule, one unwrapped line per row, numbers right-aligned."""

from tinytale.table import format_table


def test_a_table_is_plain_text_that_split_takes_apart():
    long_name = "dropout=0.2,weight_decay=0.1," * 8
    text = format_table(("run", "best_epoch", "tokens/s"),
                        [(long_name, "5", "20,000"), ("[b] :smile:", "12", "-")], right={1, 2})
    header, rule, first, second = text.splitlines()
    assert header.split() == ["run", "best_epoch", "tokens/s"]
    assert set(rule) == {"-", " "} and len(rule.split()) == 3
    assert first.split() == [long_name, "5", "20,000"]
    assert second.split() == ["[b]", ":smile:", "12", "-"]  # no markup, no emoji
    assert first.index("20,000") + len("20,000") == second.index("-") + 1  # right-aligned
    assert "\x1b" not in text and not any(line.endswith(" ") for line in text.splitlines())


def test_an_empty_table_is_its_header_and_rule():
    assert format_table(("a", "b"), []).splitlines()[0].split() == ["a", "b"]
    assert len(format_table(("a", "b"), []).splitlines()) == 2


def test_a_terminal_gets_a_bold_header():
    assert "\x1b[1m" in format_table(("a",), [("1",)], styled=True)
