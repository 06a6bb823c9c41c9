"""Small FM-shaped SavedModels with the export contract's signatures, for tests and benchmarks.

They exercise the server independently of fm_keras training: raw string/float features in,
``serving_default`` -> probability/logit/raw_probability, ``user_tower``, ``item_tower``, a
recall model -> item_ids/scores, and TF Serving warmup records. Versions are written like the
exporter writes them: under a temporary non-numeric name, then renamed into place.
"""

from __future__ import annotations

import os
import shutil

from fm_keras._tf import tf

RANKING_FEATURES = {"user_id": tf.string, "item_id": tf.string, "price": tf.float32}


def _spec(names):
    return [{n: tf.TensorSpec([None], RANKING_FEATURES[n], name=n) for n in names}]


class ToyRanking(tf.Module):
    """logit = bias + w_u + w_i + w_p * price + <v_u, v_i> with hashed ids (k factors)."""

    def __init__(self, bias: float = 0.0, k: int = 4, buckets: int = 1000, seed: int = 0):
        super().__init__()
        rng = tf.random.Generator.from_seed(seed)
        self.buckets = buckets
        self.bias = tf.Variable(bias, dtype=tf.float32)
        self.w_user = tf.Variable(rng.normal([buckets], stddev=0.5))
        self.w_item = tf.Variable(rng.normal([buckets], stddev=0.5))
        self.w_price = tf.Variable(0.1)
        self.v_user = tf.Variable(rng.normal([buckets, k], stddev=0.5))
        self.v_item = tf.Variable(rng.normal([buckets, k], stddev=0.5))

    def _ids(self, values):
        return tf.strings.to_hash_bucket_fast(values, self.buckets)

    @tf.function(input_signature=_spec(["user_id"]))
    def user_tower(self, features):
        u = self._ids(features["user_id"])
        v = tf.gather(self.v_user, u)
        ones = tf.ones_like(v[:, :1])
        return {"user_vector": tf.concat([ones, v], axis=1),
                "user_offset": self.bias + tf.gather(self.w_user, u)}

    @tf.function(input_signature=_spec(["item_id", "price"]))
    def item_tower(self, features):
        i = self._ids(features["item_id"])
        linear = tf.gather(self.w_item, i) + self.w_price * features["price"]
        return {"item_vector": tf.concat([linear[:, None], tf.gather(self.v_item, i)], axis=1)}

    @tf.function(input_signature=_spec(["user_id", "item_id", "price"]))
    def serve(self, features):
        user = self.user_tower({"user_id": features["user_id"]})
        item = self.item_tower({"item_id": features["item_id"], "price": features["price"]})
        logit = tf.reduce_sum(user["user_vector"] * item["item_vector"], axis=1) + user["user_offset"]
        probability = tf.sigmoid(logit)
        return {"probability": probability, "logit": logit, "raw_probability": probability}


class ToyRecall(tf.Module):
    """Brute-force top-k over a fixed catalogue of ``num_items`` items (``item_0``...)."""

    def __init__(self, ranking: ToyRanking, num_items: int = 50, k: int = 10):
        super().__init__()
        self.ranking = ranking
        self.top_k = k
        ids = tf.constant([f"item_{i}" for i in range(num_items)])
        self.item_ids = tf.Variable(ids)
        self.item_vectors = tf.Variable(ranking.item_tower(
            {"item_id": ids, "price": tf.ones([num_items])})["item_vector"])

    @tf.function(input_signature=_spec(["user_id"]))
    def serve(self, features):
        user = self.ranking.user_tower(features)
        scores = tf.matmul(user["user_vector"], self.item_vectors, transpose_b=True)
        scores += user["user_offset"][:, None]
        top = tf.math.top_k(scores, k=self.top_k)
        return {"item_ids": tf.gather(self.item_ids, top.indices), "scores": top.values}


class ToyScannRecall(tf.Module):
    """Like ``ToyRecall`` but searching a TFRS ScaNN index: the export holds ``Scann>`` ops."""

    def __init__(self, ranking: ToyRanking, num_items: int = 200, k: int = 10):
        super().__init__()
        import tensorflow_recommenders as tfrs

        self.ranking = ranking
        ids = tf.constant([f"item_{i}" for i in range(num_items)])
        vectors = ranking.item_tower({"item_id": ids, "price": tf.ones([num_items])})["item_vector"]
        self.scann = tfrs.layers.factorized_top_k.ScaNN(
            k=k, num_leaves=4, num_leaves_to_search=4, num_reordering_candidates=num_items)
        self.scann.index(vectors, ids)

    @tf.function(input_signature=_spec(["user_id"]))
    def serve(self, features):
        user = self.ranking.user_tower(features)
        scores, item_ids = self.scann(user["user_vector"])
        return {"item_ids": item_ids, "scores": scores + user["user_offset"][:, None]}


class ToyFileAccess(tf.Module):
    """A hostile model (issue 14): its signature reads a file, writes one and prints.

    Served, each call would copy ``source`` to ``target`` on the server host and print the
    source's contents to the log; ``fm-keras serve`` must refuse it at load.
    """

    def __init__(self, source: str, target: str):
        super().__init__()
        self.source, self.target = source, target

    @tf.function(input_signature=_spec(["user_id"]))
    def serve(self, features):
        contents = tf.io.read_file(self.source)
        tf.print("model read:", contents)
        tf.io.write_file(self.target, contents)
        return {"length": tf.strings.length(features["user_id"])}


def warmup_records(requests) -> list[bytes]:
    """Serialized PredictionLog records for (signature_name, {name: array}) pairs."""
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    records = []
    for signature_name, inputs in requests:
        request = predict_pb2.PredictRequest()
        request.model_spec.signature_name = signature_name
        for name, value in inputs.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
        records.append(prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=request)).SerializeToString())
    return records


RANKING_WARMUP = [
    ("serving_default", {"user_id": ["u1", "u2"], "item_id": ["item_1", "item_2"],
                         "price": [1.0, 2.0]}),
    ("user_tower", {"user_id": ["u1"]}),
    ("item_tower", {"item_id": ["item_1"], "price": [1.0]}),
]
RECALL_WARMUP = [("serving_default", {"user_id": ["u1", "u2"]})]


def save_version(module, signatures: dict, base_path: str, version: int, warmup=None) -> str:
    """Saves ``module`` as ``base_path/<version>`` atomically (temp name, then rename)."""
    os.makedirs(base_path, exist_ok=True)
    final = os.path.join(base_path, str(version))
    tmp = os.path.join(base_path, f".tmp-{version}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tf.saved_model.save(module, tmp, signatures=signatures)
    if warmup:
        os.makedirs(os.path.join(tmp, "assets.extra"), exist_ok=True)
        with tf.io.TFRecordWriter(os.path.join(tmp, "assets.extra",
                                               "tf_serving_warmup_requests")) as writer:
            for record in warmup_records(warmup):
                writer.write(record)
    os.rename(tmp, final)
    return final


def write_ranking_model(base_path: str, version: int = 1, bias: float = 0.0, **kwargs) -> str:
    model = ToyRanking(bias=bias, **kwargs)
    return save_version(model, {"serving_default": model.serve, "user_tower": model.user_tower,
                                "item_tower": model.item_tower}, base_path, version, RANKING_WARMUP)


def write_recall_model(base_path: str, version: int = 1, **kwargs) -> str:
    model = ToyRecall(ToyRanking(**kwargs))
    return save_version(model, {"serving_default": model.serve}, base_path, version, RECALL_WARMUP)


def write_scann_recall_model(base_path: str, version: int = 1, **kwargs) -> str:
    """A recall export with ScaNN custom ops (needs ``import scann`` to load)."""
    model = ToyScannRecall(ToyRanking(**kwargs))
    model.serve({"user_id": tf.constant(["u1"])})  # a ScaNN layer must be called before saving
    return save_version(model, {"serving_default": model.serve}, base_path, version, RECALL_WARMUP)


def write_file_access_model(base_path: str, source: str, target: str, version: int = 1) -> str:
    """A ``ToyFileAccess`` version, with a warmup record (which would run it at load)."""
    model = ToyFileAccess(source, target)
    return save_version(model, {"serving_default": model.serve}, base_path, version,
                        [("serving_default", {"user_id": ["u1"]})])


def copy_version(source: str, base_path: str, version: int) -> str:
    """Publishes a copy of an existing version directory as ``version`` (atomic rename)."""
    tmp = os.path.join(base_path, f".tmp-copy-{version}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    final = os.path.join(base_path, str(version))
    os.rename(tmp, final)
    return final
