"""errors: the error types and the "did you mean" hint they share."""

import pytest

from fm_keras.errors import CLOSE_MATCH_CUTOFF, ConfigError, DataError, FMKerasError, close_match


@pytest.mark.parametrize("word,candidates,expected", [
    ("lable", ["label", "train"], "label"),  # a transposition
    ("clik", ["user", "click"], "click"),  # a letter left out
    ("pos_wieght", ["pos_weight", "neg_sample_rate"], "pos_weight"),
    ("popular", ("uniform", "popularity"), "popularity"),
    ("genres", ["user_id", "gender", "age"], None),  # another word with shared letters
    ("zip", ["zip_code"], None),
    ("anything", [], None),
])
def test_close_match_offers_typos_only(word, candidates, expected):
    assert close_match(word, candidates) == expected


def test_close_match_cutoff_matches_difflib_ratio():
    import difflib

    ratio = difflib.SequenceMatcher(None, "genres", "gender").ratio()
    assert ratio < CLOSE_MATCH_CUTOFF <= difflib.SequenceMatcher(None, "lable", "label").ratio()
    assert close_match(7, [7, 8]) == "7"  # keys of any type are compared as text


def test_user_errors_are_value_errors_the_cli_reports():
    for cls in (ConfigError, DataError):
        assert issubclass(cls, FMKerasError) and issubclass(cls, ValueError)


@pytest.mark.parametrize("err,expected", [
    (DataError("a.csv: row 3: bad\n  value 'x'\n"), "DataError: a.csv: row 3: bad value 'x'"),
    (RuntimeError(), "RuntimeError"),  # no message: no dangling "RuntimeError: "
    (KeyboardInterrupt(), "interrupted by SIGINT"),
])
def test_error_line_is_one_line_naming_the_type(err, expected):
    from fm_keras.errors import error_line

    assert error_line(err) == expected


def test_error_line_of_sigterm_says_so():
    """Regression: a terminated pipeline run recorded ``"Terminated: "`` (no detail)."""
    from fm_keras.cli import Terminated as CliTerminated
    from fm_keras.errors import Terminated, error_line

    assert CliTerminated is Terminated  # the CLI's SIGTERM handler raises this one
    assert error_line(Terminated()) == "terminated by SIGTERM"
