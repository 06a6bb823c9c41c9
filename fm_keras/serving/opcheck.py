"""Refuse, at load, a model whose served signatures reach dangerous ops.

A SavedModel is a program (TensorFlow's SECURITY.md): a signature may read or write files,
print to the server's log or run Python. ``check_served_ops`` walks what each served
signature can execute — the graph nodes its outputs depend on, the library functions those
call, and the functions those call in turn (``PartitionedCall``/``StatefulPartitionedCall``,
``While``/``If``/``Case`` bodies and branches, any function-valued attribute) — and refuses the
model when it finds an op of a dangerous kind that is not allowed. The checkpoint-restore graph
(``SaveV2``/``RestoreV2``, run by the loader, not by requests) is not reachable from a
signature's outputs, so it does not count; ``__saved_model_init_op`` runs at load and is
checked like a served signature.

The ops of fm_keras's own exports (ranking, ScaNN and brute-force recall) are listed in
serving/README.md; none of them is of a dangerous kind, so the default allowlist is empty.
``--allow_ops=ReadFile,PrintV2`` accepts the named ops knowingly.
"""

from __future__ import annotations

import re

from fm_keras.serving.errors import ServingError

# Dangerous kinds: what each pattern matches (op names of TF 2.20's registry).
DANGEROUS = {
    "file system": re.compile(
        r"(ReadFile|WriteFile|MatchingFiles|DeleteFile|FileSystemSetConfiguration|ImmutableConst"
        r"|.*Reader(V2)?|ReaderRead.*|.*Dataset.*File.*|TextLineDataset|TFRecordDataset(V2)?"
        r"|FixedLengthRecordDataset(V2)?|.*SaveDataset.*|LoadDataset|DatasetToTFRecord"
        r"|SnapshotDataset.*|CacheDataset(V2)?|InitializeTableFromTextFile(V2)?|LoadAndRemapMatrix"
        r"|DecodeImage.*File|.*Summary.*Writer.*|Write.*Summary|ImportEvent|DebugIdentity.*"
        r"|DebugNanCount|DebugNumericSummary.*)"),
    "print": re.compile(r"(Print|PrintV2)"),
    "save/restore": re.compile(r"(Save|SaveV2|SaveSlices|Restore|RestoreV2|RestoreSlice"
                               r"|MergeV2Checkpoints)"),
    "py_func": re.compile(r"(PyFunc|PyFuncStateless|EagerPyFunc)"),
}
DEFAULT_ALLOWED_OPS: frozenset[str] = frozenset()
INIT_OP_SIGNATURE = "__saved_model_init_op"


def dangerous_kind(op: str) -> str | None:
    """The dangerous kind of an op type (``"file system"``, ...), or None."""
    for kind, pattern in DANGEROUS.items():
        if pattern.fullmatch(op):
            return kind
    return None


def _called_functions(node) -> list[str]:
    """Library functions a NodeDef calls: function-valued attrs (f, body, cond, branches...)."""
    names = []
    for value in node.attr.values():
        if value.HasField("func"):
            names.append(value.func.name)
        names.extend(f.name for f in value.list.func)
    return names


def _node_name(tensor: str) -> str:
    return tensor.lstrip("^").split(":", 1)[0]


def signature_ops(meta_graph, signature_key: str) -> dict[str, str]:
    """{op type: where it was found} for every op one signature can run.

    Args:
        meta_graph: a ``MetaGraphDef`` (from ``saved_model.pb``).
        signature_key: a key of ``meta_graph.signature_def``.

    Returns:
        Op type -> the function (or ``graph``) that holds the first node of that type seen.
    """
    graph = meta_graph.graph_def
    nodes = {node.name: node for node in graph.node}
    library = {f.signature.name: f for f in graph.library.function}
    sig = meta_graph.signature_def[signature_key]
    roots = [t.name for t in sig.outputs.values()]
    if signature_key == INIT_OP_SIGNATURE or not roots:
        roots += [t.name for t in sig.inputs.values()]
    ops: dict[str, str] = {}
    seen_nodes, seen_functions = set(), set()
    functions: list[str] = []
    stack = [_node_name(t) for t in roots]
    while stack:  # the graph nodes the outputs depend on
        name = stack.pop()
        if name in seen_nodes or name not in nodes:
            continue
        seen_nodes.add(name)
        node = nodes[name]
        ops.setdefault(node.op, "graph")
        functions.extend(_called_functions(node))
        if node.op in library:
            functions.append(node.op)
        stack.extend(_node_name(i) for i in node.input)
    while functions:  # and every function reachable from them
        name = functions.pop()
        if name in seen_functions or name not in library:
            continue
        seen_functions.add(name)
        for node in library[name].node_def:
            ops.setdefault(node.op, name)
            functions.extend(_called_functions(node))
            if node.op in library:
                functions.append(node.op)
    return {op: where for op, where in ops.items() if op not in library}


def check_served_ops(meta_graph, path: str, allowed=DEFAULT_ALLOWED_OPS) -> None:
    """Refuses a model whose served signatures reach dangerous ops that are not allowed.

    Args:
        meta_graph: the ``serve`` MetaGraphDef of the SavedModel at ``path``.
        path: the version directory (for the message).
        allowed: op types accepted although dangerous (``--allow_ops``).

    Raises:
        ServingError: FAILED_PRECONDITION naming each refused op, its kind, the signature and
            the function that holds it, and the flag that accepts it.
    """
    problems = []
    for key in sorted(meta_graph.signature_def):
        for op, where in sorted(signature_ops(meta_graph, key).items()):
            kind = dangerous_kind(op)
            if kind is not None and op not in allowed:
                problems.append(f"op {op} ({kind}) in signature {key!r} (function {where})")
    if problems:
        ops = sorted({p.split()[1] for p in problems})
        raise ServingError(
            "FAILED_PRECONDITION",
            f"Refusing to serve the SavedModel at {path}: a model is a program, and its served "
            f"signatures can run {'; '.join(problems)}. Serve it only if you trust it, with "
            f"--allow_ops={','.join(ops)}")


def parse_allow_ops(text: str) -> frozenset[str]:
    """``--allow_ops=A,B`` -> {A, B} (op type names, comma separated)."""
    return frozenset(op.strip() for op in text.split(",") if op.strip())


def main(argv=None) -> int:
    """``python -m fm_keras.serving.opcheck VERSION_DIR...``: the op sets each signature can
    run, and the dangerous ones, as one JSON document (how serving/README.md's lists are made)."""
    import argparse
    import json

    from tensorflow.python.saved_model import loader_impl

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="SavedModel version directories")
    args = parser.parse_args(argv)
    result = {}
    for path in args.paths:
        meta = next(m for m in loader_impl.parse_saved_model(path).meta_graphs
                    if "serve" in m.meta_info_def.tags)
        result[path] = {key: sorted(signature_ops(meta, key)) for key in sorted(meta.signature_def)}
        result[path]["dangerous"] = sorted(
            {op for ops in result[path].values() for op in ops if dangerous_kind(op)})
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
