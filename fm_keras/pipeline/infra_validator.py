"""InfraValidator: the candidate must load in the model server and answer every signature.

A temporary ``models.config`` points at the candidate as version 1 of a model; the server
(``fm-keras serve`` in a subprocess on a free loopback port, or in-process) loads it with its
warmup requests, and each signature the server reports (GetModelMetadata) is queried with eval
rows through the official tensorflow-serving-api stubs. Outputs must be finite. The server is
always stopped, and a failure is a recorded outcome, not an exception.

A pipeline killed with SIGKILL cannot stop its server: the ``fm-keras serve`` child is started
so that the kernel kills it with its parent (`orphans.die_with_parent`), and the temporary
directory (``fm-keras-infra-<pid>-*``) of a process that is gone is removed by the next
validation.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pandas as pd

from fm_keras.loopback import free_ports
from fm_keras.pipeline import orphans
from fm_keras.pipeline.config import InfraValidatorConfig

MODEL = "candidate"
ROWS = 8
TEMP_PREFIX = "fm-keras-infra-"


def infra_validate(export_dir: str, examples_dir: str, config: InfraValidatorConfig) -> dict:
    """Loads and queries the candidate; returns {"valid", "signatures", "error", "seconds"}.

    First removes the temporary directories of earlier validations whose process is gone (a
    pipeline killed with SIGKILL)."""
    started = time.time()
    for path in orphans.remove_stale_dirs(TEMP_PREFIX):
        print(f"fm-keras: pipeline: removed {path}, left by a killed validation",
              file=sys.stderr, flush=True)
    frame = pd.read_parquet(os.path.join(examples_dir, "eval.parquet")).head(ROWS)
    with tempfile.TemporaryDirectory(prefix=orphans.owned_dir_prefix(TEMP_PREFIX)) as tmp:
        os.makedirs(os.path.join(tmp, MODEL))
        os.symlink(os.path.abspath(export_dir), os.path.join(tmp, MODEL, "1"))
        config_file = os.path.join(tmp, "models.config")
        with open(config_file, "w", encoding="utf-8") as f:
            f.write(f'model_config_list {{ config {{ name: "{MODEL}" base_path: '
                    f'"{os.path.join(tmp, MODEL)}" model_platform: "tensorflow" }} }}\n')
        try:
            with _server(config_file, config) as target:
                result = _query_all(target, frame, config.timeout_seconds)
        except _ServerFailed as err:
            result = {"valid": False, "signatures": {}, "error": str(err)}
    result["seconds"] = round(time.time() - started, 2)
    result["mode"] = config.mode
    return result


class _ServerFailed(Exception):
    pass


class _server:
    """Context manager: a running server on a free loopback port; yields ``host:port``."""

    def __init__(self, config_file: str, config: InfraValidatorConfig):
        self.config_file, self.config = config_file, config
        self.proc = self.server = None

    def __enter__(self) -> str:
        if self.config.mode == "in_process":
            from fm_keras.serving.config import ServerOptions
            from fm_keras.serving.server import ModelServer

            self.server = ModelServer(ServerOptions(
                port=0, host="127.0.0.1", model_config_file=self.config_file,
                file_system_poll_wait_seconds=0, max_num_load_retries=0)).start()
            target = f"127.0.0.1:{self.server.grpc_port}"
        else:
            port = free_ports(1)[0]
            self.log = tempfile.TemporaryFile(mode="w+")
            self.proc = subprocess.Popen(orphans.die_with_parent(
                [sys.executable, "-m", "fm_keras.cli", "serve", f"--port={port}",
                 "--host=127.0.0.1", f"--model_config_file={self.config_file}",
                 "--file_system_poll_wait_seconds=0", "--max_num_load_retries=0"]),
                stdout=self.log, stderr=subprocess.STDOUT, env=child_env())
            target = f"127.0.0.1:{port}"
        self._wait_available(target)
        return target

    def _wait_available(self, target: str) -> None:
        from fm_keras.serving.client import GrpcClient
        from fm_keras.serving.errors import ServingError

        deadline = time.time() + self.config.timeout_seconds
        with GrpcClient(target, timeout=2.0, retries=0) as client:
            while time.time() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    self.log.seek(0)
                    tail = self.log.read().strip().splitlines()[-3:]
                    raise _ServerFailed(f"fm-keras serve exited with status "
                                        f"{self.proc.returncode}: {' | '.join(tail)}")
                try:
                    status = client.status(MODEL)
                except ServingError:
                    time.sleep(0.2)
                    continue
                state = status[0]
                if state["state"] == "AVAILABLE":
                    return
                if state["state"] == "END":
                    raise _ServerFailed(f"the server could not load the candidate: "
                                        f"{state['error_code']}: {state['error_message']}")
                time.sleep(0.2)
        raise _ServerFailed(f"the candidate was not AVAILABLE within "
                            f"{self.config.timeout_seconds}s")

    def __exit__(self, *exc):
        if self.server is not None:
            self.server.stop()
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.log.close()


def _query_all(target: str, frame: pd.DataFrame, timeout: float) -> dict:
    from fm_keras.serving.client import GrpcClient
    from fm_keras.serving.errors import ServingError

    signatures = {}
    with GrpcClient(target, timeout=min(timeout, 30.0)) as client:
        try:
            defs = client.metadata(MODEL).signature_def
            for name, sig in sorted(defs.items()):
                if name.startswith("__"):  # e.g. __saved_model_init_op
                    continue
                inputs = {k: _input(frame, k, v) for k, v in sig.inputs.items()}
                t0 = time.time()
                response = client.predict_response(MODEL, inputs, signature=name)
                outputs = _outputs(response)
                bad = [k for k, v in outputs.items()
                       if v.dtype.kind == "f" and not np.all(np.isfinite(v))]
                if bad:
                    return {"valid": False, "signatures": signatures,
                            "error": f"signature {name!r}: outputs {bad} are not finite"}
                signatures[name] = {"outputs": sorted(outputs), "rows": len(frame),
                                    "version": response.model_spec.version.value,
                                    "ms": round(1000 * (time.time() - t0), 1)}
        except ServingError as err:
            return {"valid": False, "signatures": signatures,
                    "error": f"{err.code}: {err.message}"}
        except KeyError as err:
            return {"valid": False, "signatures": signatures,
                    "error": f"the eval data has no column {err} the model needs"}
    return {"valid": bool(signatures), "signatures": signatures,
            "error": None if signatures else "the model has no signatures"}


def _input(frame: pd.DataFrame, name: str, info) -> np.ndarray:
    """A signature input from eval rows; a 2-D input no column has (a recall model's
    ``exclude_item_ids`` or ``exclude_item_keys``) gets one pad per row ("" or 0), which
    excludes nothing."""
    if info.dtype == 1:  # DT_FLOAT
        return pd.to_numeric(frame[name], errors="coerce").to_numpy(np.float32)
    if name not in frame.columns and len(info.tensor_shape.dim) == 2:
        if info.dtype == 9:  # DT_INT64: item keys, 0 pads
            return np.zeros((len(frame), 1), np.int64)
        return np.full((len(frame), 1), b"", dtype=object)
    return np.array([s.encode() for s in frame[name].astype(str)], dtype=object)


def _outputs(response) -> dict:
    from fm_keras._tf import tf

    return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}


def child_env() -> dict:
    """The environment of ``fm-keras serve``: this process's, with this fm_keras first on the
    path, so the server runs the same code that exported the candidate."""
    import fm_keras

    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(fm_keras.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env

