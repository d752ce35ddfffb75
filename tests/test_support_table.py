"""The README's support tables are the generated ones (regenerate: python tests/support_table.py)."""

import support_table


def test_readme_tables_match_the_tests():
    assert support_table.current() == support_table.render(), "run: python tests/support_table.py"
