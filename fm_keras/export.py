"""Export a finished run as a versioned ranking SavedModel with user and item towers.

    saved_models/NAME/<version>/
        saved_model.pb, variables/        signatures, all taking raw feature values:
            serving_default  all features  -> probability, logit, raw_probability
                             (probability = the run's calibrator, in-graph: fm_keras.calibration)
            user_tower       query features -> user_vector [B, k+1], user_offset [B]
            item_tower       item features  -> item_vector [B, k+1]
        assets.extra/fm_keras.json              feature spec, versions, calibration, metrics
        assets.extra/tf_serving_warmup_requests TF Serving warmup (PredictionLog TFRecords)

The decomposition (see DESIGN.md): user_vector = [1, S_Q], item_vector = [L_I + P_I, S_I],
user_offset = w0 + L_Q + P_Q, so user_vector . item_vector + user_offset == logit. Every
export is loaded back and checked on sample rows; a model that fails the check is not written.
A version is built under a non-numeric temp name and renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Mapping

import numpy as np

from fm_keras import __version__, fsutil
from fm_keras._tf import tf
from fm_keras.errors import ExportError
from fm_keras.model import FMModel
from fm_keras.servables import FORMAT_VERSION
from fm_keras.progress import log
from fm_keras.runs import Run, load_run
from fm_keras.towers import item_vector, user_outputs
from fm_keras.versions import version_dirs

METADATA = "fm_keras.json"
WARMUP = "tf_serving_warmup_requests"
FORMAT_RANKING = "fm_keras.ranking"
PARITY_ROWS = 10_000
PARITY_TOLERANCE = 1e-4


def signature_function(fn, inputs: dict[str, tf.TensorSpec]):
    """`fn` (one dict argument of tensors) traced for `inputs`: the concrete function to save
    as a signature of an export (`RankingServable`, `fm_keras.recall.RecallServable`).

    Traced without AutoGraph: the signature functions branch on Python values only, and the
    source conversion was most of an export's tracing time. Not kept as an attribute of the
    saved module: `tf.saved_model.save` traces a tf.function attribute once more and saves it
    beside the signature that already holds it (a ranking export's save took 2.9-3.4 s with
    them, 0.8 s without; BENCHMARKS.md "Session 15").
    """
    return tf.function(fn, input_signature=[inputs], autograph=False).get_concrete_function()


class RankingServable(tf.Module):
    """The tf.Module that is saved: the encoder and FM layer; `signatures` gives the functions.

    The signature functions are not attributes of the module (`signature_function`); the
    loaded model is used through ``loaded.signatures``.
    """

    def __init__(self, model: FMModel):
        super().__init__(name="fm_ranking")
        self.encoder = model.encoder
        self.fm = model.fm
        self._task = model.task_name
        self._calibration = model.calibration
        self.query_names = model.encoder.side_names(query_side=True)
        self.item_names = model.encoder.side_names(query_side=False)
        self.has_towers = bool(self.query_names and self.item_names)

    def signatures(self) -> dict:
        """Signature name -> concrete function (traced here): ``serving_default``, and
        ``user_tower`` / ``item_tower`` when the model has both sides."""
        functions = {"serving_default": (self._serve, None)}
        if self.has_towers:
            functions["user_tower"] = (self._user_tower, self.query_names)
            functions["item_tower"] = (self._item_tower, self.item_names)
        return {name: signature_function(fn, self.encoder.input_signature(names))
                for name, (fn, names) in functions.items()}

    def _serve(self, features):
        ids, values = self.encoder.encode(features)
        logit = self.fm((ids, values))[:, 0]
        if self._task == "regression":
            return {"prediction": logit}
        return {"probability": self._calibration.probability(logit), "logit": logit,
                "raw_probability": tf.sigmoid(logit)}

    def _user_tower(self, features):
        return user_outputs(self.fm, *self.encoder.encode(features, self.query_names))

    def _item_tower(self, features):
        return {"item_vector": item_vector(self.fm,
                                           *self.encoder.encode(features, self.item_names))}


def export_run(run_dir: str, name: str, base: str = "saved_models",
               version: int | None = None, parity_rows: int = PARITY_ROWS) -> str:
    """Exports a finished run as ``base/name/<version>``; returns the version directory.

    Raises:
        ExportError: the name or version is unusable, or the written model fails the
            tower parity check (nothing is left behind then).
    """
    check_model_name(name)
    run = load_run(run_dir)
    final = new_version_path(base, name, version)
    started = time.time()
    servable = RankingServable(run.model)
    rows = sample_rows(run, parity_rows)
    with building(final) as tmp:
        tf.saved_model.save(servable, tmp, signatures=servable.signatures())
        loaded = tf.saved_model.load(tmp)
        parity = check_parity(loaded, rows, servable.query_names, servable.item_names)
        extra = os.path.join(tmp, "assets.extra")
        os.makedirs(extra)
        write_warmup(os.path.join(extra, WARMUP), loaded.signatures, rows)
        fsutil.write_json(os.path.join(extra, METADATA), _metadata(
            run, servable, loaded, name, int(os.path.basename(final)), parity,
            time.time() - started))
    log(f"exported {final} (parity max |diff| {parity['max_abs_diff']:.2e} "
        f"on {parity['rows']:,} rows)")
    return final


def new_version_path(base: str, name: str, version: int | None = None) -> str:
    """``base/name/<version>`` for a new version (default: the next one). Nothing is created
    (`building` creates the directories). Raises ExportError for an existing version or a
    directory that cannot be written."""
    model_dir = os.path.join(base, name)
    version = next_version(model_dir) if version is None else int(version)
    final = os.path.join(model_dir, str(version))
    if os.path.exists(final):
        raise ExportError(f"{final} exists already; versions are immutable, pick another "
                          "--version or leave it out to take the next one")
    _check_writable(model_dir)
    return final


@contextlib.contextmanager
def building(final: str, prefix: str | None = None):
    """Yields a temp directory with a non-numeric name beside `final`; renames it to `final`
    (with the usual permissions) if the block succeeds, removes it otherwise, together with
    the parent directories it had to create (a failed export leaves no empty model directory).

    ``prefix`` (default ``.tmp-<version>-``) names the temp directory, e.g. so that a crashed
    writer's leftovers can be recognised later.
    """
    created = _make_parents(os.path.dirname(os.path.abspath(final)))
    try:
        tmp = tempfile.mkdtemp(prefix=prefix or f".tmp-{os.path.basename(final)}-",
                               dir=os.path.dirname(final))
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it 0700
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise


def _make_parents(directory: str) -> list[str]:
    """Creates `directory` and its missing parents; returns the created ones, deepest first."""
    missing = []
    while not os.path.isdir(directory):
        missing.append(directory)
        directory = os.path.dirname(directory)
    for path in reversed(missing):
        os.makedirs(path, exist_ok=True)
    return missing


def _remove_empty(directories: list[str]) -> None:
    for path in directories:  # deepest first; a directory another writer filled stays
        with contextlib.suppress(OSError):
            os.rmdir(path)


def next_version(model_dir: str) -> int:
    """One more than the highest numeric version under `model_dir` (1 for none)."""
    versions = version_dirs(model_dir) if os.path.isdir(model_dir) else []
    return max(versions, default=0) + 1


def sample_rows(run: Run, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """`n` rows drawn from the run's own data (test, else valid, else train), a tenth of them
    with values the model never saw (new ids, extreme and missing numbers)."""
    from fm_keras.data import load_data_split

    data = run.config.data
    role = "test" if data.test else "valid" if data.valid else "train"
    if run.config.model.task == "retrieval":  # item features come from the catalog
        from fm_keras.interactions import load_catalog, load_interactions
        from fm_keras.retrieval import catalog_path

        catalog = load_catalog(catalog_path(run.config), run.config.features, data.item_id)
        split = load_interactions(getattr(data, role), run.config, catalog)
    else:
        split = load_data_split(data, role, run.config.features, run.config.model.task)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(split), size=n, replace=n > len(split))
    rows = {k: v[pick] for k, v in split.features.items()}
    unseen = rng.random(len(pick)) < 0.1
    for f in run.features:
        col = rows[f.config.name]
        if f.config.kind == "numeric":
            col = col.astype(np.float32)
            wild = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30], np.float32)
            col[unseen] = wild[rng.integers(0, len(wild), unseen.sum())]
        else:
            col = col.astype(object)
            col[unseen] = [f"never-seen-{i}" for i in range(unseen.sum())]
        rows[f.config.name] = col
    return {k: _as_input(v) for k, v in rows.items()}


def _as_input(column: np.ndarray) -> np.ndarray:
    if column.dtype == object:
        return column.astype(str).astype(object)
    return column.astype(np.float32)


def check_parity(loaded, rows: Mapping[str, np.ndarray], query_names, item_names,
                 batch_size: int = 4096) -> dict:
    """Checks the loaded export: finite outputs, and user . item + offset == the FM score
    (``logit``; a regression model's ``prediction``, which is its FM score)."""
    sigs = loaded.signatures
    worst, n = 0.0, len(next(iter(rows.values())))
    for start in range(0, n, batch_size):
        batch = {k: tf.constant(v[start:start + batch_size]) for k, v in rows.items()}
        out = sigs["serving_default"](**batch)
        for key, value in out.items():
            if not np.all(np.isfinite(value.numpy())):
                raise ExportError(f"export check failed: serving_default output {key!r} is not "
                                  "finite for some sample rows; the model cannot be served")
        if "user_tower" not in sigs:
            continue
        user = sigs["user_tower"](**{k: batch[k] for k in query_names})
        item = sigs["item_tower"](**{k: batch[k] for k in item_names})
        recon = (tf.reduce_sum(user["user_vector"] * item["item_vector"], 1)
                 + user["user_offset"])
        score = "logit" if "logit" in out else "prediction"
        worst = max(worst, float(tf.reduce_max(tf.abs(recon - out[score]))))
    if worst > PARITY_TOLERANCE:
        raise ExportError(f"export check failed: user_vector . item_vector + user_offset differs "
                          f"from {score} by {worst:.3g} (> {PARITY_TOLERANCE}); not exported")
    return {"rows": int(n), "max_abs_diff": worst, "tolerance": PARITY_TOLERANCE}


def write_warmup(path: str, signatures, rows: Mapping[str, np.ndarray], per_signature: int = 4,
                 model_name: str = "") -> None:
    """TF Serving warmup file: one PredictRequest of a few rows per signature."""
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    with tf.io.TFRecordWriter(path) as writer:
        for sig_name, fn in signatures.items():
            request = predict_pb2.PredictRequest()
            request.model_spec.name = model_name
            request.model_spec.signature_name = sig_name
            for input_name in fn.structured_input_signature[1]:
                request.inputs[input_name].CopyFrom(
                    tf.make_tensor_proto(_proto_values(rows[input_name][:per_signature])))
            log_record = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log_record.SerializeToString())


def _proto_values(column: np.ndarray) -> np.ndarray:
    """Strings as UTF-8 bytes, any shape (the exclusion list of a recall model is 2-D)."""
    if column.dtype == object:
        flat = [v if isinstance(v, bytes) else str(v).encode() for v in column.ravel()]
        return np.array(flat, dtype=object).reshape(column.shape)
    return column


def signature_info(signatures) -> dict:
    """{signature: {"inputs": {name: dtype}, "outputs": {name: dtype}}} of loaded signatures."""
    info = {}
    for sig_name, fn in signatures.items():
        info[sig_name] = {
            "inputs": {k: s.dtype.name for k, s in fn.structured_input_signature[1].items()},
            "outputs": {k: s.dtype.name for k, s in fn.structured_outputs.items()},
        }
    return info


def _metadata(run: Run, servable: RankingServable, loaded, name: str, version: int,
              parity: dict, seconds: float) -> dict:
    training = run.config.training
    return {
        "format": FORMAT_RANKING,
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run": os.path.abspath(run.path),
        "task": run.config.model.task,
        "embedding_dim": run.config.model.embedding_dim,
        "features": [_feature_summary(f) for f in run.features],
        "query_features": servable.query_names,
        "item_features": servable.item_names,
        "signatures": signature_info(loaded.signatures),
        # A regression model's prediction is the FM score itself: no probability to calibrate.
        **({} if run.config.model.task == "regression" else {"calibration": {
            **run.model.calibration.to_dict(), "pos_weight": training.pos_weight,
            "class_weight": training.class_weight,
            "neg_sample_rate": training.neg_sample_rate}}),
        "metrics": run.info.get("metrics", {}),
        "parity": parity,
        "custom_ops": [],
        "versions": {**run.info.get("versions", {}), "fm_keras_export": __version__},
        "export_seconds": round(seconds, 2),
    }


def _feature_summary(f) -> dict:
    summary = {"config": {k: v for k, v in f.to_dict()["config"].items() if v is not None},
               "ids": f.size, "slots": f.slots}
    if f.vocabulary:
        summary["vocabulary_size"] = len(f.vocabulary)
    return summary


def check_model_name(name: str) -> None:
    """`ExportError` unless `name` can name a model directory (plain, non-numeric)."""
    if not name or name.isdigit() or os.sep in name or name.startswith("."):
        raise ExportError(f"--name {name!r} is not a usable model name: give a plain, "
                          "non-numeric directory name such as 'ctr'")


def _check_writable(directory: str) -> None:
    """`directory` (or, if missing, the nearest existing parent that would hold it) is a
    writable directory."""
    existing = os.path.abspath(directory)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ExportError(f"{directory}: cannot create the model directory ({existing} is not "
                          "a directory)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ExportError(f"{directory}: not writable" if existing == os.path.abspath(directory)
                          else f"{directory}: cannot create the model directory ({existing} "
                          "is not writable)")
