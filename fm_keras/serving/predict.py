"""Signatures of a loaded SavedModel, and Predict with TF Serving's validation and messages.

A request's tensors are validated against the SignatureDef stored in ``saved_model.pb`` (the
same one TF Serving reads), converted to NumPy with ``tf.make_ndarray``, and passed to the
concrete signature function. Messages follow tensorflow_serving/servables/tensorflow/
predict_util.cc so that clients see the same errors as from TF Serving.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from fm_keras.serving.errors import ServingError, failed_precondition, invalid_argument

DEFAULT_SIGNATURE = "serving_default"
PREDICT_METHOD = "tensorflow/serving/predict"


@dataclasses.dataclass
class Signature:
    """One serving signature: its concrete function and its declared inputs and outputs.

    Attributes:
        name: signature key, e.g. ``serving_default``.
        function: the loaded concrete function; called with keyword tensors.
        inputs: alias -> (numpy dtype, shape as a tuple with None for unknown dims).
        dtype_enums: alias -> the DataType enum number in the SignatureDef (for TensorProtos).
        outputs: output aliases, sorted.
        method_name: e.g. ``tensorflow/serving/predict``.
    """

    name: str
    function: object
    inputs: dict
    dtype_enums: dict
    outputs: list
    method_name: str = PREDICT_METHOD
    fast_call: object = None

    @property
    def batchable(self) -> bool:
        """True when every input has a leading batch dimension (dim 0 unknown)."""
        return bool(self.inputs) and all(
            shape is not None and len(shape) >= 1 and shape[0] is None
            for _, shape in self.inputs.values())


def load_signatures(loaded, signature_defs) -> dict[str, Signature]:
    """Pairs the loaded object's signature functions with their stored SignatureDefs."""
    from fm_keras._tf import tf

    result = {}
    for name, sig_def in signature_defs.items():
        if name.startswith("__") or name not in loaded.signatures:
            continue  # __saved_model_init_op is listed in metadata but not callable
        inputs, enums = {}, {}
        for alias, info in sig_def.inputs.items():
            dtype = tf.dtypes.as_dtype(info.dtype)
            shape = None if info.tensor_shape.unknown_rank else tuple(
                None if d.size < 0 else d.size for d in info.tensor_shape.dim)
            inputs[alias] = (dtype.as_numpy_dtype, shape)
            enums[alias] = info.dtype
        function = loaded.signatures[name]
        result[name] = Signature(name, function, inputs, enums, sorted(sig_def.outputs),
                                 sig_def.method_name or PREDICT_METHOD,
                                 _fast_caller(function, sorted(inputs)))
    return result


def _fast_caller(function, aliases):
    """A direct flat call of the concrete function, or None when its structure is unusual.

    Calling with keywords costs ~40% more per request (argument binding and structure
    checks on every call); the flat call skips them. Inputs are flattened in sorted-key order
    (``tf.nest`` order for a dict), as are dict outputs. Any doubt -> None, the public call.
    """
    from fm_keras._tf import tf

    try:
        call_flat, captured = function._call_flat, function.captured_inputs
        args, kwargs = function.structured_input_signature
        outputs = function.structured_outputs
    except AttributeError:
        return None
    if args or sorted(kwargs) != aliases or not isinstance(outputs, dict) or not all(
            isinstance(t, (tf.Tensor, tf.TensorSpec)) for t in outputs.values()):
        return None
    out_names = sorted(outputs)
    dtypes = [kwargs[a].dtype for a in aliases]

    def call(arrays):
        tensors = [tf.constant(arrays[a], dtype=d) for a, d in zip(aliases, dtypes)]
        result = call_flat(tensors, captured)
        # a restored signature (_WrapperFunction) already packs its outputs into the dict
        return result if isinstance(result, dict) else dict(zip(out_names, result))

    return call


def find_signature(signatures: dict[str, Signature], name: str) -> Signature:
    sig = signatures.get(name or DEFAULT_SIGNATURE)
    if sig is None:
        raise failed_precondition(f'Serving signature key "{name or DEFAULT_SIGNATURE}" not found.')
    return sig


def _dtype_name(enum: int) -> str:
    from fm_keras._tf import tf

    try:
        return tf.dtypes.as_dtype(enum).name
    except TypeError:
        return f"<invalid dtype {enum}>"


def check_input_names(sig: Signature, sent) -> None:
    """TF Serving's message for missing or extra inputs (predict_util.cc)."""
    sent = set(sent)
    expected = set(sig.inputs)
    if sent != expected:
        raise invalid_argument(
            f"input size does not match signature: {len(sent)}!={len(expected)} "
            f"len({{{','.join(sorted(sent))}}}) != len({{{','.join(sorted(expected))}}}). "
            f"Sent extra: {{{','.join(sorted(sent - expected))}}}. "
            f"Missing but required: {{{','.join(sorted(expected - sent))}}}.")


def check_shapes(sig: Signature, arrays: dict[str, np.ndarray]) -> int:
    """Checks each array against its declared shape; returns the batch size (dim 0)."""
    batch = None
    for alias, array in arrays.items():
        shape = sig.inputs[alias][1]
        if shape is not None and (len(shape) != array.ndim or any(
                d is not None and d != a for d, a in zip(shape, array.shape))):
            want = "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"
            raise invalid_argument(f"input tensor alias {alias} has shape {list(array.shape)}, "
                                   f"which is not compatible with the signature's {want}")
        if array.ndim >= 1:
            if batch is not None and array.shape[0] != batch:
                raise invalid_argument(
                    f"all inputs must have the same batch size (dim 0): {alias} has "
                    f"{array.shape[0]}, another input has {batch}")
            batch = array.shape[0]
    return batch or 0


def arrays_from_request(sig: Signature, inputs) -> dict[str, np.ndarray]:
    """PredictRequest.inputs (alias -> TensorProto) -> validated NumPy arrays."""
    from fm_keras._tf import tf

    check_input_names(sig, inputs.keys())
    arrays = {}
    for index, alias in enumerate(sorted(sig.inputs)):
        proto = inputs[alias]
        if proto.dtype != sig.dtype_enums[alias]:
            raise invalid_argument(
                f"Expects arg[{index}] ({alias}) to be {_dtype_name(sig.dtype_enums[alias])} "
                f"but {_dtype_name(proto.dtype)} is provided")
        check_tensor_proto(proto, alias)
        try:
            arrays[alias] = array_from_proto(proto, sig.inputs[alias][0])
        except (TypeError, ValueError) as err:
            raise invalid_argument(f"input tensor alias {alias} is not a valid tensor: {err}") from err
    check_shapes(sig, arrays)
    return arrays


def check_output_filter(sig: Signature, output_filter) -> list[str]:
    names = list(output_filter) or sig.outputs
    for name in names:
        if name not in sig.outputs:
            raise invalid_argument(
                f"output tensor alias not found in signature: {name} Outputs expected to be "
                f"in the set {{{','.join(sig.outputs)}}}.")
    if len(set(names)) != len(names):
        raise invalid_argument(f"duplicate output tensor alias in output_filter: {names}")
    return names


def run_signature(sig: Signature, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Calls the concrete function; TF runtime errors become TF Serving status codes."""
    from fm_keras._tf import tf

    try:
        outputs = sig.fast_call(arrays) if sig.fast_call is not None else sig.function(**arrays)
    except tf.errors.OpError as err:
        code = {tf.errors.InvalidArgumentError: "INVALID_ARGUMENT",
                tf.errors.ResourceExhaustedError: "RESOURCE_EXHAUSTED",
                tf.errors.DeadlineExceededError: "DEADLINE_EXCEEDED",
                tf.errors.OutOfRangeError: "OUT_OF_RANGE",
                tf.errors.FailedPreconditionError: "FAILED_PRECONDITION"}.get(type(err), "INTERNAL")
        raise ServingError(code, err.message) from err
    except (TypeError, ValueError) as err:  # argument conversion inside the function call
        raise invalid_argument(str(err)) from err
    return {name: value.numpy() for name, value in outputs.items()}


# DataType enum -> (repeated field of the values, proto values per element, bytes per element)
_VALUE_FIELDS = {
    1: ("float_val", 1, 4), 2: ("double_val", 1, 8), 3: ("int_val", 1, 4), 4: ("int_val", 1, 1),
    5: ("int_val", 1, 2), 6: ("int_val", 1, 1), 7: ("string_val", 1, None),
    8: ("scomplex_val", 2, 8), 9: ("int64_val", 1, 8), 10: ("bool_val", 1, 1),
    14: ("half_val", 1, 2), 17: ("int_val", 1, 2), 18: ("dcomplex_val", 2, 16),
    19: ("half_val", 1, 2), 22: ("uint32_val", 1, 4), 23: ("uint64_val", 1, 8),
}
# A single value broadcasts to the whole shape (as tf.make_ndarray and TF's Tensor::FromProto
# do); beyond this many elements that is an allocation the request did not pay for.
MAX_BROADCAST_ELEMENTS = 2**24


def check_tensor_proto(proto, alias: str) -> int:
    """Validates a request TensorProto before anything is allocated; returns its element count.

    A shape must be known, with dims >= 0; its element count must match the data carried:
    ``tensor_content`` of exactly count x element-size bytes, or exactly count values in the
    dtype's repeated field (one value may broadcast up to ``MAX_BROADCAST_ELEMENTS``; none
    only for an empty tensor). Without this a dim of -1 was inferred by ``reshape`` and a
    string tensor claiming 2**62 elements with no values reached a MemoryError.

    Raises:
        ServingError: INVALID_ARGUMENT naming the input alias, the shape and what was sent.
    """
    where = f"input tensor alias {alias}"
    if proto.tensor_shape.unknown_rank:
        raise invalid_argument(f"{where}: a request tensor must have a known shape (unknown_rank)")
    dims = [d.size for d in proto.tensor_shape.dim]
    if any(d < 0 for d in dims):
        raise invalid_argument(f"{where}: shape {dims} has a negative dimension; request tensors "
                               "need every dimension given")
    count = math.prod(dims)  # exact (Python ints), so 2**62 x 2**62 cannot wrap
    field, per_element, itemsize = _VALUE_FIELDS.get(proto.dtype, (None, 1, None))
    if proto.tensor_content:
        if itemsize is None:
            raise invalid_argument(f"{where}: tensor_content is not valid for "
                                   f"{_dtype_name(proto.dtype)}")
        if len(proto.tensor_content) != count * itemsize:
            raise invalid_argument(
                f"{where}: shape {dims} needs {count} elements ({count * itemsize} bytes of "
                f"tensor_content), got {len(proto.tensor_content)} bytes")
        return count
    if field is None:
        raise invalid_argument(f"{where}: unsupported dtype {_dtype_name(proto.dtype)}")
    values = len(getattr(proto, field))
    if values % per_element:
        raise invalid_argument(f"{where}: {field} holds {values} numbers, not whole elements")
    values //= per_element
    if values == count or (values == 1 and count <= MAX_BROADCAST_ELEMENTS):
        return count
    raise invalid_argument(
        f"{where}: shape {dims} has {count} elements but {field} holds {values} values "
        f"(give one value per element, or one value for at most {MAX_BROADCAST_ELEMENTS})")


def array_from_proto(proto, np_dtype) -> np.ndarray:
    """TensorProto -> NumPy, fast for the common encodings, ``tf.make_ndarray`` otherwise.

    Call ``check_tensor_proto`` first: this trusts the shape.
    """
    shape = [d.size for d in proto.tensor_shape.dim]
    size = math.prod(shape)
    if proto.tensor_content and np_dtype != object:
        return np.frombuffer(proto.tensor_content, dtype=np_dtype).reshape(shape)
    if np_dtype == object and len(proto.string_val) == size:
        array = np.empty(size, dtype=object)
        array[:] = list(proto.string_val)
        return array.reshape(shape)
    if np_dtype == np.float32 and len(proto.float_val) == size:
        return np.array(proto.float_val, dtype=np.float32).reshape(shape)
    from fm_keras._tf import tf

    return tf.make_ndarray(proto)  # broadcast scalars, other dtypes


_DTYPE_ENUMS: dict = {}


def proto_from_array(array: np.ndarray, proto) -> None:
    """Fills ``proto`` (a TensorProto) from an array; what ``tf.make_tensor_proto`` does, faster."""
    enum = _DTYPE_ENUMS.get(array.dtype)
    if enum is None:
        from fm_keras._tf import tf

        enum = _DTYPE_ENUMS[array.dtype] = tf.as_dtype(array.dtype).as_datatype_enum
    proto.dtype = enum
    for size in array.shape:
        proto.tensor_shape.dim.add(size=size)
    if array.dtype == object:
        proto.string_val.extend(array.ravel().tolist())
    else:
        proto.tensor_content = np.ascontiguousarray(array).tobytes()


def fill_outputs(response_outputs, outputs: dict[str, np.ndarray], names) -> None:
    """Writes the selected outputs into a response's ``outputs`` map as TensorProtos."""
    for name in names:
        proto_from_array(outputs[name], response_outputs[name])


def signature_def_map(signature_defs):
    """A ``SignatureDefMap`` for GetModelMetadata (all signatures, as TF Serving lists them)."""
    from tensorflow_serving.apis import get_model_metadata_pb2

    result = get_model_metadata_pb2.SignatureDefMap()
    for name, sig_def in signature_defs.items():
        result.signature_def[name].CopyFrom(sig_def)
    return result
