"""`FMModel`: the feature encoder and the FM layer inside a TensorFlow Recommenders model.

Training runs on pre-encoded slots (the training data is encoded once, not every epoch), so
`fit` and `evaluate` take batches ``({"ids", "values"}, labels)`` or
``({"ids", "values"}, labels, weights)``. Calling the model takes raw
features and returns the logit, the raw probability and the calibrated probability.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow_recommenders as tfrs

from fm_keras._tf import keras, tf
from fm_keras.calibration import Calibration
from fm_keras.compiled_steps import CompiledSteps, unsupported
from fm_keras.config import ModelConfig, TrainingConfig
from fm_keras.features import FeatureEncoder, FittedFeature
from fm_keras.layers import FactorizationMachine
from fm_keras.optimizers import LazyAdam, SparseAdagrad, SparseFtrl
from fm_keras.towers import ItemTower, SavedModelOnly, UserTower


class FMModel(SavedModelOnly, tfrs.Model):
    """A Factorization Machine for CTR (``binary``), ratings (``regression``) or recall.

    ``user_tower`` and ``item_tower`` are the two towers of the decomposition as Keras models
    (TFRS's query and candidate models); ``fm_keras.retrieval.RetrievalModel`` trains them
    with ``tfrs.tasks.Retrieval`` (``task: retrieval``).

    ``save`` writes a SavedModel (no first call needed); ``keras.models.load_model`` of it
    takes raw features and gives the same outputs. The ``.keras`` and ``.h5`` formats raise
    a ValueError (`fm_keras.towers.SavedModelOnly`).

    Args:
        encoder: raw features -> slots.
        fm: the FM layer over the encoder's id space.
        task: ``binary`` (logistic loss; AUC and logloss), ``regression`` (squared; RMSE) or
            ``retrieval`` (outputs as ``binary``; trained by ``RetrievalModel``).
        calibration: logit -> probability: the logit correction undoing positive weighting
            and negative downsampling (see `TrainingConfig.logit_correction`), then the
            calibrator fitted on validation data at the end of training (`fm_keras.calibration`;
            training sets it). Default: sigmoid(logit).
    """

    def __init__(self, encoder: FeatureEncoder, fm: FactorizationMachine, task: str = "binary",
                 calibration: Calibration | None = None, **kwargs):
        super().__init__(**kwargs)
        if task not in ("binary", "regression", "retrieval"):
            raise ValueError(f"task must be 'binary', 'regression' or 'retrieval', got {task!r}")
        if fm.num_ids != encoder.num_ids:
            raise ValueError(f"the FM layer has {fm.num_ids} ids but the encoder produces "
                             f"{encoder.num_ids}; build both from the same features")
        self.encoder = encoder
        self.fm = fm
        self.task_name = task
        self.calibration = calibration or Calibration()
        # Per-row losses, averaged in `compute_loss` over the global batch: the same mean on one
        # machine, and the right one when gradients are summed over synchronous replicas.
        none = keras.losses.Reduction.NONE
        if task == "binary":
            self.task = tfrs.tasks.Ranking(
                loss=keras.losses.BinaryCrossentropy(from_logits=True, reduction=none),
                metrics=[keras.metrics.AUC(from_logits=True, name="auc", num_thresholds=2000),
                         keras.metrics.BinaryCrossentropy(from_logits=True, name="logloss")])
        elif task == "regression":
            self.task = tfrs.tasks.Ranking(
                loss=keras.losses.MeanSquaredError(reduction=none),
                metrics=[keras.metrics.RootMeanSquaredError(name="rmse")])
        self._compiled_batch_rows = None  # set by `use_compiled_steps`
        has_towers = all(encoder.side_names(side) for side in (True, False))
        self._towers = (UserTower(encoder, fm), ItemTower(encoder, fm)) if has_towers else None
        self._set_raw_save_spec()

    def _raw_input_signature(self):
        return self.encoder.input_signature()

    @property
    def user_tower(self) -> UserTower:
        """Raw user + context features -> ``{"user_vector", "user_offset"}`` (Keras model)."""
        return self._tower(0)

    @property
    def item_tower(self) -> ItemTower:
        """Raw item features -> ``item_vector`` [batch, k + 1] (Keras model)."""
        return self._tower(1)

    def _tower(self, which: int):
        if self._towers is None:
            raise ValueError("the model has no towers: it needs both query-side (user/context) "
                             "and item features")
        return self._towers[which]

    def call(self, features, training=False):
        """Raw features (dict of [batch] tensors) -> dict of [batch] outputs."""
        return self.outputs_from_logit(self.fm(self.encoder(features))[:, 0])

    @property
    def logit_correction(self) -> float:
        """The logit shift undoing positive weighting and negative downsampling."""
        return self.calibration.logit_correction

    def outputs_from_logit(self, logit):
        """[batch] logits -> dict of [batch] outputs: the calibrated `probability`, the
        `raw_probability` sigmoid(logit), and the `logit` itself (``prediction`` for
        regression)."""
        if self.task_name == "regression":
            return {"prediction": logit}
        return {"logit": logit,
                "raw_probability": tf.sigmoid(logit),
                "probability": self.calibration.probability(logit)}

    def logits(self, ids, values):
        """The FM score of encoded slots, shape [batch]."""
        return self.fm((ids, values))[:, 0]

    def compile(self, *args, **kwargs):
        """Keras' `compile`; compiled steps are off until `use_compiled_steps` (again)."""
        super().compile(*args, **kwargs)
        self._compiled_batch_rows = None

    def use_compiled_steps(self, batch_rows: int | None) -> str | None:
        """Makes `fit` run each execution's steps in one XLA call (`CompiledSteps`) where
        that applies; call after `compile`.

        Args:
            batch_rows: the most rows a training batch holds (``training.batch_size``), or
                None for batches of varying size (then Keras' own step runs).

        Returns:
            None, or why Keras' own step runs instead (`fm_keras.compiled_steps.unsupported`).
        """
        why = unsupported(self, batch_rows)
        self._compiled_batch_rows = None if why else batch_rows
        self.train_function = None
        return why

    @property
    def uses_compiled_steps(self) -> bool:
        """Whether `fit` runs `CompiledSteps` (`use_compiled_steps` turned them on)."""
        return self._compiled_batch_rows is not None

    def make_train_function(self, force=False):
        """Keras' train function, or `CompiledSteps` after `use_compiled_steps`."""
        if self._compiled_batch_rows is None:
            return super().make_train_function(force)
        if self.train_function is None or force:
            self.train_function = CompiledSteps(self, self._compiled_batch_rows)
        return self.train_function

    def train_step(self, inputs):
        """TFRS's step, reporting only the losses, and correct under `tf.distribute`.

        Ranking metrics are computed on validation only (`compute_loss` skips them while
        training, an AUC update costs as much as the FM step), so their training values would
        print as misleading zeros; the progress line shows loss and the ``val_`` metrics.
        Under a synchronous strategy each replica's loss and regularization are divided by
        the number of replicas, because their gradients are summed (and so are the reported
        per-replica values: Keras sums them).
        """
        with tf.GradientTape() as tape:
            loss = self.compute_loss(inputs, training=True)
            regularization_loss = tf.nn.scale_regularization_loss(
                tf.reduce_sum([tf.reduce_sum(x) for x in self.losses]))
            total_loss = loss + regularization_loss
        gradients = tape.gradient(total_loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_variables))
        return {"loss": loss, "regularization_loss": regularization_loss,
                "total_loss": total_loss}

    def compute_loss(self, inputs, training: bool = False):
        """The mean loss of a batch of encoded slots (the step of `fit` and `evaluate`).

        Args:
            inputs: ``(encoded, labels)`` or ``(encoded, labels, weights)``, as Keras unpacks
                a batch (`keras.utils.unpack_x_y_sample_weight`): ``encoded`` is
                ``{"ids": int32 [batch, slots], "values": float32 [batch, slots]}`` (see
                `FeatureEncoder.encode_numpy`), labels and weights are float [batch]; no
                weights weigh every row 1.
            training: metrics are updated only when False.

        Returns:
            float32 scalar: the weighted per-row losses summed, divided by the rows of the
            global batch (`tf.nn.compute_average_loss`).

        Raises:
            ValueError: the batch has no labels (``(x,)`` or a bare ``x``).
        """
        encoded, labels, weights = keras.utils.unpack_x_y_sample_weight(inputs)
        if labels is None:
            raise ValueError("FMModel trains and evaluates on labelled batches: give fit/"
                             "evaluate (x, y) or (x, y, sample_weight) with x = "
                             "{'ids', 'values'}; got batches without labels")
        if weights is not None:
            weights = tf.reshape(weights, [-1, 1])
        logits = self.fm((encoded["ids"], encoded["values"]))
        per_row = self.task(labels=tf.reshape(labels, [-1, 1]), predictions=logits,
                            sample_weight=weights, compute_metrics=not training)
        return tf.nn.compute_average_loss(per_row)


def build_model(features: Sequence[FittedFeature], model: ModelConfig,
                training: TrainingConfig | None = None,
                calibration: Calibration | None = None) -> FMModel:
    """Builds an `FMModel` from fitted features and the model/training configs.

    `calibration` defaults to the training config's logit correction alone (no calibrator).
    """
    encoder = FeatureEncoder(features, name="encoder")
    l2_embeddings, l2_linear = model.l2_embeddings, model.l2_linear
    if any(f.config.l2 is not None for f in encoder.features):
        def per_slot(default):
            return [default if f.config.l2 is None else f.config.l2
                    for f in encoder.features for _ in range(f.slots)]
        l2_embeddings, l2_linear = per_slot(l2_embeddings), per_slot(l2_linear)
    fm = FactorizationMachine(
        encoder.num_ids, model.embedding_dim, l2_embeddings=l2_embeddings,
        l2_linear=l2_linear,
        embeddings_initializer=keras.initializers.RandomNormal(stddev=model.init_stddev),
        l2_prior=model.l2_prior, name="fm")
    correction = training.logit_correction if (training and model.task == "binary") else 0.0
    fm_model = FMModel(encoder, fm, task=model.task,
                       calibration=calibration or Calibration(logit_correction=correction))
    fm_model.fm((tf.zeros([1, encoder.num_slots], tf.int32), tf.zeros([1, encoder.num_slots])))
    return fm_model


def make_optimizer(training: TrainingConfig) -> keras.optimizers.Optimizer:
    """The configured optimizer; FTRL is the classic choice for very sparse CTR data.

    Adam, Adagrad and FTRL update only the table rows a step touches (`fm_keras.optimizers`),
    so a step costs the same with 10k or 5M ids.
    """
    lr, wd = training.learning_rate, training.weight_decay or None
    return {
        "adam": lambda: LazyAdam(lr, weight_decay=wd),
        "adagrad": lambda: SparseAdagrad(lr, initial_accumulator_value=0.1, weight_decay=wd),
        "ftrl": lambda: SparseFtrl(lr, weight_decay=wd),
        "sgd": lambda: keras.optimizers.SGD(lr, weight_decay=wd),
    }[training.optimizer]()
