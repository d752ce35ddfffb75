"""The generated support tables are current (regenerate: python tests/support_table.py)."""

import support_table


def test_readme_support_table_matches_the_tests():
    assert support_table.current(support_table.SUPPORT) == support_table.render_support(), \
        "run: python tests/support_table.py"


def test_guide_lookalike_table_matches_the_tests():
    assert support_table.current(support_table.LOOKALIKES) == support_table.render_lookalikes(), \
        "run: python tests/support_table.py"
