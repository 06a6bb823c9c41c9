"""Classify, Regress and MultiInference: tf.Example APIs for classify/regress signatures.

They work only on signatures whose ``method_name`` is ``tensorflow/serving/classify`` or
``.../regress`` with one string input of serialized tf.Examples, exactly as in TF Serving;
fm_keras exports predict signatures, so on those they answer TF Serving's INVALID_ARGUMENT
("Expected classification signature method_name to be ...").
"""

from __future__ import annotations

import numpy as np

from fm_keras.serving.errors import ServingError, invalid_argument, request_version
from fm_keras.serving.predict import run_signature

CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"


def serialized_examples(request_input) -> np.ndarray:
    """``Input`` (example_list or example_list_with_context) -> serialized tf.Examples."""
    kind = request_input.WhichOneof("kind")
    if kind == "example_list":
        examples = [e.SerializeToString() for e in request_input.example_list.examples]
    elif kind == "example_list_with_context":
        lists = request_input.example_list_with_context
        examples = []
        for example in lists.examples:
            merged = type(example)()
            merged.CopyFrom(lists.context)
            merged.MergeFrom(example)
            examples.append(merged.SerializeToString())
    else:
        raise invalid_argument("Input is empty")
    if not examples:
        raise invalid_argument("Input is empty")
    return np.array(examples, dtype=object)


def _run_examples(servable, signature_name: str, method: str, request_input):
    sig = servable.signature(signature_name)
    if sig.method_name != method:
        kind = "classification" if method == CLASSIFY_METHOD else "regression"
        raise invalid_argument(f"Expected {kind} signature method_name to be {method}. "
                               f"Was: {sig.method_name}")
    if len(sig.inputs) != 1:
        raise invalid_argument(f"Expected one input Tensor, got {len(sig.inputs)}")
    (alias,) = sig.inputs
    examples = serialized_examples(request_input)
    return run_signature(sig, {alias: examples}), len(examples)


def classify(servable, signature_name: str, request_input, result) -> None:
    """Fills a ClassificationResult from the signature's ``classes`` and/or ``scores``."""
    outputs, n = _run_examples(servable, signature_name, CLASSIFY_METHOD, request_input)
    classes, scores = outputs.get("classes"), outputs.get("scores")
    if classes is None and scores is None:
        raise invalid_argument("Expected classification signature outputs 'classes' or 'scores'")
    ref = classes if classes is not None else scores
    if ref.shape[0] != n:
        raise ServingError("INVALID_ARGUMENT", f"Expected output batch size {n}, got {ref.shape[0]}")
    for row in range(n):
        classification = result.classifications.add()
        for j in range(ref.shape[1] if ref.ndim > 1 else 1):
            entry = classification.classes.add()
            if classes is not None:
                value = classes[row][j] if classes.ndim > 1 else classes[row]
                entry.label = value.decode() if isinstance(value, bytes) else str(value)
            if scores is not None:
                entry.score = float(scores[row][j] if scores.ndim > 1 else scores[row])


def regress(servable, signature_name: str, request_input, result) -> None:
    """Fills a RegressionResult from the signature's ``outputs`` ([batch] or [batch, 1])."""
    outputs, n = _run_examples(servable, signature_name, REGRESS_METHOD, request_input)
    if "outputs" not in outputs:
        raise invalid_argument("Expected regression signature output 'outputs'")
    values = np.asarray(outputs["outputs"]).reshape(n, -1)
    if values.shape[1] != 1:
        raise invalid_argument(f"Expected output Tensor shape to be [{n}] or [{n}, 1], "
                               f"got {list(outputs['outputs'].shape)}")
    for value in values[:, 0]:
        result.regressions.add().value = float(value)


def multi_inference(manager, request, response) -> None:
    """Runs each task on the shared input; all tasks must name the same model and version."""
    if not request.tasks:
        raise invalid_argument("Tasks field is empty")
    specs = {(t.model_spec.name, t.model_spec.version.value) for t in request.tasks}
    if len(specs) != 1:
        raise invalid_argument("All ModelSpecs in a MultiInferenceRequest must access the same model "
                               "name and version")
    signatures = [t.model_spec.signature_name or "serving_default" for t in request.tasks]
    if len(set(signatures)) != len(signatures):
        raise invalid_argument("Duplicate evaluation of signature: " + ",".join(signatures))
    first = request.tasks[0].model_spec
    version = request_version(first.version.value) if first.HasField("version") else None
    servable = manager.lookup(first.name, version, first.version_label or None)
    for task in request.tasks:
        entry = response.results.add()
        entry.model_spec.name = servable.name
        entry.model_spec.version.value = servable.version
        entry.model_spec.signature_name = task.model_spec.signature_name or "serving_default"
        if task.method_name == CLASSIFY_METHOD:
            classify(servable, task.model_spec.signature_name, request.input,
                     entry.classification_result)
        elif task.method_name == REGRESS_METHOD:
            regress(servable, task.model_spec.signature_name, request.input,
                    entry.regression_result)
        else:
            raise ServingError("UNIMPLEMENTED", f"Unsupported signature method_name: {task.method_name}")
