"""``pipeline status`` (runs and what serves), ``pipeline rollback`` (pin a version), and the
record of one run (``run_summary``)."""

from __future__ import annotations

import os
import socket
import time

from fm_keras.errors import ConfigError
from fm_keras.pipeline import orphans, serving_config
from fm_keras.pipeline.config import SpanWindow
from fm_keras.pipeline.metadata import DONE
from fm_keras.versions import parse_version, version_dirs, version_path


RECALL_SUFFIX = "_recall"


def rollback(model_config_file: str, name: str, to: str, force: bool = False) -> dict:
    """Makes the server answer ``name`` (and ``name_recall``, when listed) from version ``to``,
    or from the latest version again with ``to="latest"``.

    A ranking model and its recall model serve the same version number: rolling back the
    ranking model pins its recall model too, and is refused when that recall version is
    missing (a run killed between the two pushes), unless ``force``. Rolling back the recall
    model alone to another version than the ranking model's serves, or going forward to
    latest versions that differ, is done with a warning.

    Version labels that would name a version no longer served are removed from the file (TF
    Serving rejects a label on an unavailable version at every config poll).

    Returns:
        {"models": names rewritten, "version": the version or "latest", "config": the file,
        "warnings": one line per label removed and per version pair that does not match}.

    Raises:
        ConfigError: the file does not list ``name``, the version is not on disk, or its recall
            version is missing (without ``force``).
    """
    policy = serving_config.served_policy(model_config_file, name)
    if policy is None:
        raise ConfigError(f"{model_config_file}: lists no model {name!r}; --name must be a "
                          "model the pipeline pushed")
    version = None
    if to != "latest":
        try:
            version = parse_version(to)
        except ValueError as err:
            raise ConfigError(f"--to must be a version number or 'latest': {err}") from None
        path = version_path(policy["base_path"], version)
        if not os.path.isdir(path):
            raise ConfigError(f"--to {version}: {path} does not exist; versions on disk: "
                              f"{_versions(policy['base_path'])}")
    names, pair_warnings = [name], []
    recall = serving_config.served_policy(model_config_file, name + RECALL_SUFFIX)
    ranking = name[:-len(RECALL_SUFFIX)] if name.endswith(RECALL_SUFFIX) else None
    if recall is not None:
        if version is None or os.path.isdir(version_path(recall["base_path"], version)):
            names.append(name + RECALL_SUFFIX)
        elif not force:
            raise ConfigError(
                f"--to {version}: {name + RECALL_SUFFIX}/{version} does not exist "
                f"({recall['base_path']}), so {name} {version} would serve beside another recall "
                f"version; roll back to a version both have "
                f"({_both(policy['base_path'], recall['base_path'])}), or pass --force to pin "
                f"{name} alone")
        else:
            pair_warnings.append(f"--force: {name} pinned to version {version}, "
                                 f"{name + RECALL_SUFFIX} left as it is: "
                                 f"{name + RECALL_SUFFIX}/{version} does not exist")
    warnings = serving_config.set_version(model_config_file, names, version)
    if recall is not None and version is None:
        pair_warnings += _pair_mismatch(model_config_file, name, name + RECALL_SUFFIX)
    elif ranking is not None and serving_config.served_policy(model_config_file, ranking):
        pair_warnings += _pair_mismatch(model_config_file, ranking, name)
    return {"models": names, "version": version or "latest", "config": model_config_file,
            "warnings": pair_warnings + warnings}


def _both(ranking_base: str, recall_base: str) -> list[int]:
    return sorted(set(_versions(ranking_base)) & set(_versions(recall_base)))


def _pair_mismatch(model_config_file: str, ranking: str, recall: str) -> list[str]:
    """A warning when the ranking and recall models do not serve the same versions."""
    ranks = serving_config.served_versions(model_config_file, ranking)
    recalls = serving_config.served_versions(model_config_file, recall)
    if ranks == recalls:
        return []
    return [f"{ranking} serves version(s) {ranks} but {recall} serves {recalls}: candidates "
            f"and scores come from different model versions; 'fm-keras pipeline rollback "
            f"--name {ranking} --to V' pins both to one version"]


def _versions(base_path: str) -> list[int]:
    if not os.path.isdir(base_path):
        return []
    return version_dirs(base_path)


def status(config, server: str | None = None, runs: int = 10) -> dict:
    """The last ``runs`` runs from the metadata store, and what serves: the config's version
    policy, the versions it serves (``latest``: the newest on disk), the versions on disk, and
    with ``server`` (host:port) the server's own GetModelStatus; ``warnings`` name ranking
    versions without their recall version (``missing_recall``) and a ranking and recall model
    that serve different versions."""
    from fm_keras.pipeline.metadata import MetadataStore

    path = os.path.join(config.root, "metadata.sqlite")
    records = []
    if os.path.exists(path):
        store = MetadataStore(path)
        try:
            for ctx in store.contexts("run")[-runs:]:
                s = run_summary(store, ctx)
                if s["status"] == "running" and process_gone(ctx["properties"]):
                    s["status"] = "abandoned?"
                records.append({k: s[k] for k in ("run_id", "status", "span", "window",
                                                  "blessed", "pushed_version", "seconds")}
                               | {"started": time.strftime("%Y-%m-%d %H:%M:%S",
                                                           time.localtime(s["started"])),
                                  "cached_steps": sum(x["cached"] for x in s["steps"])})
        finally:
            store.close()
    serving, path = {}, config.pusher.model_config_file
    for name in (config.name, config.recall_name):
        policy = serving_config.served_policy(path, name)
        if policy is None:
            continue
        entry = {**policy, "on_disk": _versions(policy["base_path"])}
        if policy["policy"] != "specific":  # the versions the policy serves, e.g. the newest
            entry["versions"] = serving_config.served_versions(path, name)
        if server:
            entry["server"] = server_status(server, name)
        serving[name] = entry
    warnings = []
    if config.name in serving and config.recall_name in serving:
        missing = missing_recall_versions(serving[config.name]["on_disk"],
                                          serving[config.recall_name]["on_disk"])
        serving[config.name]["missing_recall"] = missing
        warnings += [f"{config.name} version {v} has no {config.recall_name}/{v}: a rollback "
                     f"to {v} is refused (or pins {config.name} alone with --force)"
                     for v in missing]
        warnings += _pair_mismatch(path, config.name, config.recall_name)
    return {"runs": records, "serving": serving, "warnings": warnings,
            "model_config_file": path}


def process_gone(run_properties: dict) -> bool:
    """True when a ``running`` run's process is known to be gone: it recorded its pid and
    host, the host is this one and no process has that pid (a run killed with SIGKILL; the
    next run marks it ``abandoned``). False when it cannot tell (an older run, another
    host)."""
    pid, host = run_properties.get("pid"), run_properties.get("host")
    return bool(pid) and host == socket.gethostname() and not orphans.pid_alive(pid)


def missing_recall_versions(ranking: list[int], recall: list[int]) -> list[int]:
    """Ranking versions on disk without the recall version of the same number (a run killed
    between the two pushes), from the first recall version on (older ranking versions may
    predate the recall model)."""
    if not recall:
        return []
    have = set(recall)
    return [v for v in ranking if v >= recall[0] and v not in have]


def server_status(server: str, name: str) -> list[dict] | str:
    """GetModelStatus of ``name`` on a running server, or the error in words."""
    from fm_keras.serving.client import GrpcClient
    from fm_keras.serving.errors import ServingError

    try:
        with GrpcClient(server, timeout=5.0, retries=1) as client:
            return [{"version": s["version"], "state": s["state"]} for s in client.status(name)]
    except ServingError as err:
        return f"{err.code}: {err.message}"


def run_summary(store, context: dict) -> dict:
    """A run's record: status, span and its rolling window of spans (first, last, the spans
    read, the spans missing, in words), the validator's anomalies, blessing and its reasons,
    steps (state, seconds, cached, outcome), pushed version, warnings (a span missing from the
    window, empty part files ExampleGen skipped, the trainer's, e.g. still improving at the
    epoch cap, a push that does not serve, a version label the push removed)."""
    steps, pushed, blessed, reasons, anomalies, warnings = [], None, None, None, None, []
    for x in store.executions(context["id"]):
        p = x["properties"]
        steps.append({"step": x["type"], "state": x["state"], "seconds": p.get("seconds"),
                      "cached": p.get("cached", False), "stop": p.get("stop"),
                      "error": p.get("error")})
        if x["type"] == "pusher" and x["state"] in DONE:
            pushed = p.get("version")
            warnings += [p["warning"]] if p.get("warning") else []
            warnings += p.get("warnings") or []  # version labels the push made stale
        if x["type"] == "trainer" and x["state"] in DONE:  # e.g. still improving at the cap
            warnings += [f"trainer: {w}" for w in p.get("warnings") or []]
        skipped = p.get("empty_files_skipped") if x["type"] == "examplegen" else None
        if skipped and x["state"] in DONE:  # Spark/Hive's empty partitions, not read
            more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
            warnings.append(f"examplegen: skipped {len(skipped)} empty file(s) (0 bytes, or a "
                            f"header and no rows) that a pattern matches: {skipped[0]}{more}")
        if x["type"] == "evaluator" and x["state"] in DONE:
            blessed, reasons = p.get("blessed"), p.get("reasons")
        if x["type"] == "validator" and x["state"] in DONE:
            anomalies = p.get("anomalies")
    props = context["properties"]
    window = SpanWindow.from_dict(props.get("window"), props.get("span"))
    if window.missing:
        warnings.insert(0, f"rolling window of {window.describe()}: reading spans "
                           f"{', '.join(map(str, window.spans)) or 'none'}")
    return {"run_id": context["name"], "status": props.get("status"), "span": props.get("span"),
            "window": window.as_dict(),
            "started": props.get("started"), "finished": props.get("finished"),
            "seconds": round(props["finished"] - props["started"], 2)
            if props.get("finished") else None,
            "anomalies": anomalies, "blessed": blessed, "not_blessed_reasons": reasons,
            "pushed_version": pushed, "warnings": warnings, "error": props.get("error"),
            "steps": steps}
