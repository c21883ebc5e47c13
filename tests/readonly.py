"""`simulate_read_only(monkeypatch, folder)`: the writability check (`train.run.check_out_dir`, a temporary file made
in the folder) sees `folder` as a read-only mount. Tests run as root, where chmod does not stop a write."""

import tempfile
from pathlib import Path

import dyndepth.train.run as run_module


def simulate_read_only(monkeypatch, folder: Path) -> None:
    real = tempfile.TemporaryFile

    def read_only(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve() == Path(folder).resolve():
            raise PermissionError(13, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(run_module.tempfile, "TemporaryFile", read_only)
