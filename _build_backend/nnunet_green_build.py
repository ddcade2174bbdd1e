"""In-tree PEP 517/660 build backend: setuptools' own hooks, plus `nnunet_green.pth` at the root of every wheel.

pyproject.toml names this module (`backend-path = ["_build_backend"]`). Every hook is setuptools' public
`setuptools.build_meta` hook, unchanged; `build_wheel` and `build_editable` then add the project's
`nnunet_green.pth` to the wheel they returned and list it in the wheel's RECORD, so an installer puts it into
site-packages for a regular install (`pip install .`, a wheel built from the sdist) and for an editable one
(`pip install -e .`) alike. setuptools itself has no public way to place a top-level file into an editable wheel;
the reasons and the alternatives are in docs/design.md ("How the stock CLIs find the trainers").
"""
from __future__ import annotations

import base64
import hashlib
import os
import zipfile
from pathlib import Path

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  every other hook (sdist, metadata, requirements) unchanged

PTH = "nnunet_green.pth"


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    name = _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)
    add_to_wheel(Path(wheel_directory, name), Path(PTH))
    return name


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    name = _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
    add_to_wheel(Path(wheel_directory, name), Path(PTH))
    return name


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode("ascii")
    return f"sha256={digest}"


def add_to_wheel(wheel: Path, source: Path) -> None:
    """Add `source` (a file of the source tree, the cwd of every PEP 517 hook) at the root of `wheel`.

    The wheel is rewritten entry by entry (names, timestamps, modes and compression kept) with the new file and
    its line in `*.dist-info/RECORD`. A wheel that already holds a file of that name is left as it is.
    """
    data = source.read_bytes()  # a missing file (an incomplete sdist) fails the build here
    tmp = wheel.with_name(wheel.name + ".tmp")
    with zipfile.ZipFile(wheel) as src:
        if source.name in src.namelist():
            return
        records = [n for n in src.namelist() if n.count("/") == 1 and n.endswith(".dist-info/RECORD")]
        if len(records) != 1:
            raise RuntimeError(f"{wheel.name}: expected one .dist-info/RECORD, found {records}")
        record = src.getinfo(records[0])
        try:
            with zipfile.ZipFile(tmp, "w") as dst:
                for info in src.infolist():
                    if info.filename != record.filename:
                        dst.writestr(info, src.read(info))
                added = zipfile.ZipInfo(source.name, date_time=record.date_time)
                added.external_attr = 0o644 << 16
                added.compress_type = zipfile.ZIP_DEFLATED
                dst.writestr(added, data)
                own = f"{record.filename},,"
                lines = [line for line in src.read(record).decode("utf-8").splitlines() if line != own]
                lines += [f"{source.name},{_record_hash(data)},{len(data)}", own]
                dst.writestr(record, ("\n".join(lines) + "\n").encode("utf-8"))
            os.replace(tmp, wheel)
        finally:
            tmp.unlink(missing_ok=True)
