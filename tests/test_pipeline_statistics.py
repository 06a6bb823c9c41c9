"""Statistics, schema and validation: each anomaly, with its configured severity."""

import pandas as pd

from fm_keras.config import FeatureConfig
from fm_keras.pipeline.config import DriftCheck, ValidationConfig
from fm_keras.pipeline.statistics import anomalies_fail, generate_statistics, validate

FEATURES = (FeatureConfig("user_id", "categorical", "user"),
            FeatureConfig("tags", "multi_hot", "item"),
            FeatureConfig("price", "numeric", "item"))


def _span(tmp_path, name, users, click_every=10, price="1.5", extra=None):
    n = 400
    frame = pd.DataFrame({"user_id": [users[i % len(users)] for i in range(n)],
                          "tags": ["a|b" if i % 2 else "c:0.5" for i in range(n)],
                          "price": [price] * n,
                          "click": [int(i % click_every == 0) for i in range(n)]})
    if extra:
        frame = frame.rename(columns=extra)
    out = tmp_path / name
    out.mkdir()
    frame.iloc[:300].to_parquet(out / "train.parquet", index=False)
    frame.iloc[300:].to_parquet(out / "eval.parquet", index=False)
    stats, schema = generate_statistics(str(out), FEATURES, "click", str(out / "stats"))
    return str(out), stats, schema


def _examples(tmp_path, features, label="click", spans=(1,), name="examples"):
    """ExampleGen and the statistics over the span files under tmp_path (span-N/*.csv)."""
    from fm_keras.pipeline.config import InputConfig
    from fm_keras.pipeline.examplegen import run_examplegen

    data = InputConfig(input=(str(tmp_path / "span-{SPAN}" / "*.csv"),), label=label,
                       spans=len(spans))
    out = str(tmp_path / name)
    run_examplegen(data, [str(tmp_path / f"span-{s}" / "*.csv") for s in spans], out)
    stats, schema = generate_statistics(out, features, label, str(tmp_path / f"{name}-stats"))
    return out, stats, schema


def _kinds(anomalies):
    return sorted((a["kind"], a["column"], a["severity"]) for a in anomalies)


def test_statistics_and_schema(tmp_path):
    _, stats, schema = _span(tmp_path, "s1", [f"u{i}" for i in range(20)])
    assert schema["columns"] == {"user_id": "string", "tags": "string", "price": "numeric",
                                 "click": "numeric"}
    assert stats["label_rate"] == 0.1
    assert sorted(schema["vocabularies"]["tags"]) == ["a", "b", "c"]  # elements, no weights
    assert stats["holdout_oov_rate"]["user_id"] == 0.0
    assert stats["columns"]["price"]["min"] == 1.5


def test_same_data_has_no_anomalies(tmp_path):
    users = [f"u{i}" for i in range(20)]
    _, _, old = _span(tmp_path, "s1", users)
    examples, stats, schema = _span(tmp_path, "s2", users)
    assert validate(stats, schema, FEATURES, old, ValidationConfig(), examples) == []


def test_numeric_looking_ids_are_text_and_new_ids_are_no_retyping(tmp_path):
    # item ids 1..20 in one span, and "new-7" among them in the next: the spec says text
    _, stats, old = _span(tmp_path, "s1", [str(i) for i in range(20)])
    assert old["columns"]["user_id"] == "string" and "top" in stats["columns"]["user_id"]
    examples, stats, schema = _span(tmp_path, "s2", [str(i) for i in range(19)] + ["new-7"])
    assert validate(stats, schema, FEATURES, old, ValidationConfig(), examples) == []
    # a schema written before ids were text by the spec said numeric: still no retyping
    older = {**old, "columns": {**old["columns"], "user_id": "numeric"}}
    assert validate(stats, schema, FEATURES, older, ValidationConfig(), examples) == []


def test_breaking_changes_and_drift(tmp_path):
    _, _, old = _span(tmp_path, "s1", [f"u{i}" for i in range(20)])
    examples, stats, schema = _span(tmp_path, "s2", [f"new{i}" for i in range(20)],
                                    click_every=4, price="cheap", extra={"tags": "tag_list"})
    config = ValidationConfig(new_column="warn", oov_rate_drift=DriftCheck(0.2, "warn"))
    anomalies = validate(stats, schema, FEATURES, old, config, examples)
    assert _kinds(anomalies) == [
        ("label_rate_drift", "click", "fail"), ("missing_column", "tags", "fail"),
        ("new_column", "tag_list", "warn"), ("oov_rate_drift", "user_id", "warn"),
        ("retyped_column", "price", "fail")]
    assert [a["column"] for a in anomalies_fail(anomalies)] == ["tags", "price", "click"]
    relaxed = ValidationConfig(missing_column="warn", retyped_column="warn",
                               label_rate_drift=DriftCheck(2.0, "fail"))
    assert anomalies_fail(validate(stats, schema, FEATURES, old, relaxed, examples)) == []


def test_a_gone_column_no_feature_reads_is_a_warning(tmp_path):
    """A column one span added and the next dropped (a new user's trial: every later span
    failed on it) is no input of the model: `missing_unused_column` (warn by default)."""
    users = [f"u{i}" for i in range(20)]
    _, _, old = _span(tmp_path, "s1", users)
    old = {**old, "columns": {**old["columns"], "rating_src": "string"}}
    examples, stats, schema = _span(tmp_path, "s2", users)
    anomalies = validate(stats, schema, FEATURES, old, ValidationConfig(), examples)
    assert _kinds(anomalies) == [("missing_column", "rating_src", "warn")]
    assert "no feature or label reads it" in anomalies[0]["detail"]
    strict = ValidationConfig(missing_unused_column="fail")
    assert _kinds(validate(stats, schema, FEATURES, old, strict, examples)) == [
        ("missing_column", "rating_src", "fail")]


def test_first_span_is_checked_against_the_feature_spec(tmp_path):
    examples, stats, schema = _span(tmp_path, "s1", ["u1"], extra={"price": "cost"})
    anomalies = validate(stats, schema, FEATURES, None, ValidationConfig(), examples)
    assert _kinds(anomalies) == [("missing_column", "price", "fail")]


def test_column_gone_from_one_span_of_the_window_is_missing(tmp_path):
    from pipeline_testlib import write_small_span

    write_small_span(tmp_path, 1)
    renamed = write_small_span(tmp_path, 2)  # item_id renamed to item in the newest span
    text = open(renamed).read()
    open(renamed, "w").write(text.replace("item_id", "item", 1))
    features = (FeatureConfig("user_id", "categorical", "user"),
                FeatureConfig("item_id", "categorical", "item"))
    out, stats, schema = _examples(tmp_path, features, spans=(1, 2))
    assert "item_id" in schema["columns"]  # the older span's rows still have it
    anomalies = validate(stats, schema, features, None, ValidationConfig(), out)
    assert _kinds(anomalies) == [("missing_column", "item_id", "fail")]
    assert anomalies[0]["detail"] == (f"column 'item_id' (in the feature spec) is not in "
                                      f"{renamed}")
    # Against the last schema (span 1's), the newest span's rows without the column are not
    # also "new values" of it (an oov_rate_drift on top of the missing column).
    *_, baseline = _examples(tmp_path, features, spans=(1,), name="baseline")
    assert baseline["vocabularies"]["item_id"]
    anomalies = validate(stats, schema, features, baseline, ValidationConfig(), out)
    assert _kinds(anomalies) == [("missing_column", "item_id", "fail"),
                                 ("new_column", "item", "warn"),
                                 ("oov_rate_drift", "user_id", "warn")]  # span 2's new users


def test_non_numeric_cell_of_a_numeric_feature_names_its_value_file_and_row(tmp_path):
    # the detail shows the bad cell and where it is, not the column's (valid) top values
    from pipeline_testlib import write_small_span

    path = write_small_span(tmp_path, 1)
    lines = open(path).read().splitlines()
    lines[6] = lines[6].replace(",0,", ",abc,")  # is_cached of data row 6
    open(path, "w").write("\n".join(lines) + "\n")
    features = (FeatureConfig("user_id", "categorical", "user"),
                FeatureConfig("is_cached", "numeric", "item"))
    out, stats, schema = _examples(tmp_path, features)
    assert stats["columns"]["is_cached"]["non_numeric"] == {
        "count": 1, "examples": ["abc"], "where": [{"value": "abc", "file": path, "row": 6}]}
    anomalies = validate(stats, schema, features, None, ValidationConfig(), out)
    assert _kinds(anomalies) == [("retyped_column", "is_cached", "fail")]
    assert anomalies[0]["detail"] == (f"{path}: numeric feature 'is_cached': non-numeric value "
                                      f"'abc' at data row 6")


def test_missing_label_or_feature_column_is_named_as_such_with_the_data_file(tmp_path):
    # a wrong label is the label (not "in the feature spec"); both name the span file
    from pipeline_testlib import write_small_span

    path = write_small_span(tmp_path, 1)
    features = (FeatureConfig("user_id", "categorical", "user"),
                FeatureConfig("item_ids", "categorical", "item"))
    out, stats, schema = _examples(tmp_path, features, label="clicked")
    anomalies = validate(stats, schema, features, None, ValidationConfig(), out)
    assert [a["detail"] for a in anomalies] == [
        f"column 'item_ids' (in the feature spec) is not in {path} (did you mean 'item_id'?)",
        f"label column 'clicked' is not in {path} (did you mean 'click'?)"]


def test_labels_a_binary_model_cannot_train_on_name_their_file_and_row(tmp_path):
    """A label 2 or an empty label passed ExampleGen and the validator and stopped the
    trainer, naming ExampleGen's train.parquet (a new user's trial)."""
    from pipeline_testlib import write_small_span

    path = write_small_span(tmp_path, 1)
    lines = open(path).read().splitlines()
    for row, label in ((6, "2"), (9, ""), (12, "2")):
        lines[row] = lines[row].rsplit(",", 1)[0] + "," + label
    open(path, "w").write("\n".join(lines) + "\n")
    features = (FeatureConfig("user_id", "categorical", "user"),)
    out, stats, schema = _examples(tmp_path, features)
    anomalies = validate(stats, schema, features, None, ValidationConfig(), out)
    assert sorted((a["kind"], a["severity"], a["detail"]) for a in anomalies) == [
        ("invalid_label", "fail", f"{path}: label 'click': a missing value at data row 9"),
        ("invalid_label", "fail", f"{path}: label 'click': value '2' at data row 6 "
                                  "(2 label cells not 0 or 1)")]
    regression = validate(stats, schema, features, None, ValidationConfig(), out, "regression")
    assert [a["detail"] for a in regression] == [
        f"{path}: label 'click': a missing value at data row 9"]
    assert validate(stats, schema, features, None, ValidationConfig(), out, "retrieval") == []
