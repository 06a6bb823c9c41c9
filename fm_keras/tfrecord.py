"""Reading TFRecord files of ``tf.train.Example`` rows (e.g. TFX ExampleGen output) as columns.

One Example per row: categorical and multi-hot features as bytes, numeric features as float
(a missing number is NaN), the label as float. `fm_keras.data.load_split` reads ``*.tfrecord``
files through `read_examples` for evaluation, validation and in-memory training. Clusters and
out-of-core training read the encoded shard directory of ``fm-keras convert`` instead
(`fm_keras.convert`, `fm_keras.out_of_core`), never Examples: an Example would be parsed and
encoded again every epoch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fm_keras.config import FeatureConfig
from fm_keras.errors import DataError

EXTENSIONS = (".tfrecord", ".tfrecords")


def is_tfrecord(path: str) -> bool:
    return path.endswith(EXTENSIONS)


def example_spec(features: Sequence[FeatureConfig], label: str | None) -> dict:
    """The `tf.io.parse_example` spec: strings for categorical/multi-hot, float32 numbers."""
    from fm_keras._tf import tf

    spec = {f.name: tf.io.FixedLenFeature([], tf.float32, default_value=np.nan)
            if f.kind == "numeric" else tf.io.FixedLenFeature([], tf.string, default_value="")
            for f in features}
    if label:
        spec[label] = tf.io.FixedLenFeature([], tf.float32)
    return spec


def read_examples(files: Sequence[str], features: Sequence[FeatureConfig], label: str | None,
                  task: str = "binary", batch_size: int = 65_536
                  ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Reads TFRecord Examples whole into columns.

    Args:
        files: TFRecord files, read in order.
        features: the feature spec; categorical and multi-hot columns come back as object
            arrays of str, numeric ones as float32 with NaN for a missing value.
        label: the label feature, or None for unlabeled rows.
        task: ``binary`` requires labels in {0, 1}.

    Returns:
        (feature name -> array [rows], float32 labels [rows] or None).

    Raises:
        DataError: a file that is not Examples of this spec, no rows, or a bad label.
    """
    from fm_keras._tf import tf

    spec = example_spec(features, label)
    dataset = tf.data.TFRecordDataset(list(files)).batch(batch_size).map(
        lambda records: tf.io.parse_example(records, spec))
    parts = {name: [] for name in spec}
    try:
        for batch in dataset:
            for name, value in batch.items():
                parts[name].append(value.numpy())
    except tf.errors.OpError as err:
        raise DataError(f"{', '.join(files)}: cannot read as TFRecord Examples of this feature "
                        f"spec: {' '.join(err.message.split())[:200]}") from None
    if not parts[next(iter(spec))]:
        raise DataError(f"{', '.join(files)}: no rows")
    columns = {name: np.concatenate(chunks) for name, chunks in parts.items()}
    for f in features:
        if f.kind != "numeric":
            columns[f.name] = np.char.decode(columns[f.name].astype(bytes), "utf-8").astype(object)
    labels = columns.pop(label) if label else None
    if labels is not None and task == "binary" and not np.isin(labels, (0.0, 1.0)).all():
        raise DataError(f"{files[0]}: label {label!r}: task 'binary' needs labels in {{0, 1}}")
    return columns, labels
