"""Helpers shared by the reader's tests (`test_reading`, `test_libsvm`)."""

import types


class ReadableFile:
    """What Beam's ReadMatches gives `beam_scoring.read_rows`: the file's metadata.path and
    open()."""

    def __init__(self, path):
        self.metadata = types.SimpleNamespace(path=path)
        self._path = path

    def open(self):
        return open(self._path, "rb")
