"""Packaging: the sdist, a wheel built from that sdist, and the editable wheel all install `nnunet_green.pth`, and
the .pth makes a fresh interpreter list the trainers folder in `nnUNet_extTrainer` (docs/design.md, "How the
stock CLIs find the trainers").

The build runs on a copy of the project's files (tracked plus untracked-not-ignored, as `git ls-files` lists
them): the sdist through the build backend's PEP 517 hook, the wheel from the sdist through pip (a real
frontend), both without network or build isolation. Installed wheels go to throw-away folders that a fresh
`python -I -S` adds as site dirs, so the interpreter's own site-packages (where this project may be installed
already) play no part. Nothing here imports torch.
"""
from __future__ import annotations

import ast
import base64
import configparser
import csv
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import shutil
import site
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
PTH = "nnunet_green.pth"
ENV = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1", "PYTHONDONTWRITEBYTECODE": "1"}
PROBE = "nnunet_green/zz_discovery_probe/__init__.py"  # a subpackage no config file names
NOT_BUILT = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                   "work", "bench_out", "demo_out", "nnUNet_raw", "nnUNet_preprocessed",
                                   "nnUNet_results")


def _run(cmd: list[str], cwd: Path | None = None, env: dict | None = None, timeout: int = 120):
    proc = subprocess.run(cmd, cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                                  f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}")
    return proc


def _project_files(repo: Path) -> list[str] | None:
    """The files a fresh clone with the current changes would have; None outside a git checkout."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                             capture_output=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [name for name in out.decode().split("\0") if name and (repo / name).is_file()]


def _build_system(src: Path) -> dict:
    return tomllib.loads((src / "pyproject.toml").read_text())["build-system"]


def _backend_file(src: Path) -> Path:
    """The in-tree backend module named by pyproject.toml."""
    build_system = _build_system(src)
    module = build_system["build-backend"].partition(":")[0]
    candidates = [src / p / (module.replace(".", "/") + ".py") for p in build_system.get("backend-path", [])]
    found = [c for c in candidates if c.is_file()]
    assert found, f"backend {module} not found under backend-path {build_system.get('backend-path')}"
    return found[0]


def _call_hook(src: Path, hook: str, out: Path, suffix: str) -> Path:
    """Call one PEP 517/660 hook of the project's backend in a fresh interpreter, as a frontend does."""
    build_system = _build_system(src)
    paths = [str(src / p) for p in build_system.get("backend-path", [])]
    code = ("import importlib, sys\n"
            "module, _, obj = sys.argv[1].partition(':')\n"
            "sys.path[:0] = sys.argv[4:]\n"
            "backend = importlib.import_module(module)\n"
            "for name in filter(None, obj.split('.')):\n"
            "    backend = getattr(backend, name)\n"
            "getattr(backend, sys.argv[2])(sys.argv[3])\n")
    out.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-c", code, build_system["build-backend"], hook, str(out), *paths], cwd=src)
    (built,) = out.glob(f"*{suffix}")
    return built


def _pip(*args) -> None:
    _run([sys.executable, "-m", "pip", *args, "--no-deps", "--no-index", "--quiet"], timeout=180)


def _fresh_python(site_dir: Path, code: str, ext_trainer: str | None = "/elsewhere/trainers"):
    """`code` in an interpreter whose only site dir is `site_dir` (its .pth files processed by site.addsitedir)."""
    env = {k: v for k, v in ENV.items() if k not in ("PYTHONPATH", "nnUNet_extTrainer")}
    if ext_trainer is not None:
        env["nnUNet_extTrainer"] = ext_trainer
    prelude = f"import site, sys; site.addsitedir({str(site_dir)!r})\n"
    # -I: neither the cwd nor PYTHON* variables on sys.path; -S: no site-packages of this interpreter.
    return subprocess.run([sys.executable, "-I", "-S", "-c", prelude + code], env=env, capture_output=True, text=True,
                          timeout=60)


REPORT = ("import importlib.util, json, os\n"
          "spec = importlib.util.find_spec('nnunet_green')\n"
          "green = spec and importlib.util.find_spec('nnunet_green.trainers.nnUNetTrainerGreen')\n"
          "print(json.dumps({'ext': os.environ.get('nnUNet_extTrainer'),\n"
          "                  'package': spec and spec.origin, 'trainer': green and green.origin,\n"
          "                  'torch': 'torch' in sys.modules}))\n")


def _report(site_dir: Path, **kw) -> dict:
    proc = _fresh_python(site_dir, REPORT, **kw)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    return json.loads(proc.stdout)


def _ini(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # keep names as written
    parser.read_string(text)
    return parser


def _declared_console_scripts(setup_cfg: str) -> dict[str, str]:
    """console_scripts as setup.cfg declares them (`name = module:function` lines)."""
    lines = _ini(setup_cfg)["options.entry_points"]["console_scripts"].strip().splitlines()
    return {k.strip(): v.strip() for k, v in (line.split("=", 1) for line in lines if line.strip())}


# ---------------------------------------------------------------------------------------------- built artefacts

@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """A copy of the project, plus one new subpackage that automatic discovery must pick up."""
    import setuptools
    version = tuple(int(p) for p in setuptools.__version__.split(".")[:2] if p.isdigit())
    assert version >= (70, 1), f"setuptools {setuptools.__version__} < 70.1: install the test extra (setup.cfg)"
    dest = tmp_path_factory.mktemp("src") / "nnunet-green"
    files = _project_files(REPO)
    if files is None:
        shutil.copytree(REPO, dest, ignore=NOT_BUILT)
    else:
        for name in files:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    (dest / PROBE).parent.mkdir()
    (dest / PROBE).write_text('"""Stands for a subpackage added after this test was written."""\n')
    return dest


@pytest.fixture(scope="module")
def sdist(src, tmp_path_factory) -> Path:
    return _call_hook(src, "build_sdist", tmp_path_factory.mktemp("sdist"), ".tar.gz")


@pytest.fixture(scope="module")
def wheel(sdist, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _pip("wheel", "--no-build-isolation", "--wheel-dir", str(out), str(sdist))
    (built,) = out.glob("*.whl")
    return built


@pytest.fixture(scope="module")
def editable_wheel(src, tmp_path_factory) -> Path:
    return _call_hook(src, "build_editable", tmp_path_factory.mktemp("editable"), ".whl")


def _install(wheel_file: Path, target: Path) -> Path:
    _pip("install", "--target", str(target), str(wheel_file))
    return target


# ----------------------------------------------------------------------------------------------------- sdist

def test_sdist_carries_pth_setup_files_backend_and_trainers(src, sdist):
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
        top = sdist.name.removesuffix(".tar.gz")
        rel = {n[len(top) + 1:] for n in names if n.startswith(top + "/")}
        pth = tar.extractfile(f"{top}/{PTH}").read() if PTH in rel else None
    required = {PTH, "setup.py", "setup.cfg", "pyproject.toml", "MANIFEST.in", "README.md",
                _backend_file(src).relative_to(src).as_posix(),
                "nnunet_green/__init__.py", "nnunet_green/contract.py"}
    required |= {f"trainers/{p.name}" for p in (src / "trainers").glob("*.py")}
    assert "trainers/nnUNetTrainerGreen.py" in required
    assert required <= rel, f"missing from the sdist: {sorted(required - rel)}"
    assert pth == (src / PTH).read_bytes()
    assert not {n.split("/")[0] for n in rel} & {"tests", "benchmarks", "docs", ".git", "build", "dist"}


# ----------------------------------------------------------------------------------------- wheel from sdist

def test_wheel_from_sdist_contents(src, wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        pth = z.read(PTH)
        (dist_info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        entry_points = z.read(f"{dist_info}/entry_points.txt").decode()
        record = z.read(f"{dist_info}/RECORD").decode()
        contents = {n: z.read(n) for n in names}

    assert pth == (src / PTH).read_bytes()
    assert {n.split("/")[0] for n in names} == {"nnunet_green", PTH, dist_info}  # no trainers/, tests/, docs/ ...
    assert "nnunet_green/contract.py" in names
    for trainer in (src / "trainers").glob("*.py"):
        assert f"nnunet_green/trainers/{trainer.name}" in names
    assert "nnunet_green/trainers/nnUNetTrainerGreen.py" in names
    # Automatic discovery: every package below nnunet_green/ in the source tree is in the wheel.
    assert PROBE in names
    for init in (src / "nnunet_green").rglob("__init__.py"):
        assert f"{init.relative_to(src).as_posix()}" in names

    scripts = dict(_ini(entry_points)["console_scripts"])
    assert scripts == _declared_console_scripts((src / "setup.cfg").read_text())
    assert "nnunet-green-compress" in scripts

    # RECORD (rewritten by the backend when it added the .pth) lists every file once, with its hash and size.
    rows = {row[0]: row[1:] for row in csv.reader(io.StringIO(record)) if row}
    assert set(rows) == names
    for name, (digest, size) in rows.items():
        if name == f"{dist_info}/RECORD":
            assert digest == size == ""
            continue
        data = contents[name]
        expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        assert (digest, int(size)) == (f"sha256={expected}", len(data)), name


def test_installed_wheel_lists_trainers_in_ext_trainer(wheel, tmp_path):
    target = _install(wheel, tmp_path / "site")
    assert (target / PTH).is_file()
    assert (target / "bin" / "nnunet-green-compress").is_file()
    report = _report(target)
    trainers = target / "nnunet_green" / "trainers"
    assert report["ext"] == os.pathsep.join(["/elsewhere/trainers", str(trainers)])  # user's folders kept
    assert report["package"] == str(target / "nnunet_green" / "__init__.py")
    assert report["trainer"] == str(trainers / "nnUNetTrainerGreen.py")
    assert report["torch"] is False
    assert _report(target, ext_trainer=None)["ext"] == str(trainers)


# -------------------------------------------------------------------------------------------------- editable

def test_editable_wheel_points_at_the_source_and_installs_the_pth(src, editable_wheel, tmp_path):
    with zipfile.ZipFile(editable_wheel) as z:
        names = set(z.namelist())
        assert z.read(PTH) == (src / PTH).read_bytes()
    assert not any(n.startswith("nnunet_green/") for n in names)  # modules stay in the source tree
    target = _install(editable_wheel, tmp_path / "site")
    report = _report(target)
    assert report["ext"] == os.pathsep.join(["/elsewhere/trainers", str(src / "trainers")])
    assert report["package"] == str(src / "nnunet_green" / "__init__.py")
    assert report["trainer"] == str(src / "trainers" / "nnUNetTrainerGreen.py")
    assert report["torch"] is False


def test_build_uses_only_public_setuptools_hooks(src):
    """The backend calls nothing of setuptools but its PEP 517/660 hooks; setup.py overrides no command."""
    import setuptools.build_meta

    backend = _backend_file(src)
    tree = ast.parse(backend.read_text())
    aliases = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               and node.module == "setuptools" for a in node.names if a.name == "build_meta"}
    aliases |= {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for a in node.names if a.name == "setuptools.build_meta"}
    used = {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases}
    assert used and used <= set(setuptools.build_meta.__all__), used
    setup_py = ast.parse((src / "setup.py").read_text())
    keywords = {kw.arg for node in ast.walk(setup_py) if isinstance(node, ast.Call) for kw in node.keywords}
    assert "cmdclass" not in keywords
    assert not [n for n in ast.walk(setup_py) if isinstance(n, ast.ClassDef)]


# --------------------------------------------------------------------------------------------- the .pth alone

def test_pth_is_one_guarded_import_line():
    lines = (REPO / PTH).read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("import ")  # site executes only lines starting with "import"
    assert "find_spec" in lines[0] and "nnunet_green.trainers" in lines[0]


def test_pth_without_the_package_is_silent(tmp_path):
    shutil.copy(REPO / PTH, tmp_path / PTH)
    report = _report(tmp_path)  # asserts exit code 0 and an empty stderr
    assert report == {"ext": "/elsewhere/trainers", "package": None, "trainer": None, "torch": False}
    assert _report(tmp_path, ext_trainer=None)["ext"] is None


def test_pth_with_a_broken_package_does_not_stop_the_interpreter(tmp_path):
    """nnunet_green importable but its trainers missing: site reports the line, the interpreter runs on."""
    shutil.copy(REPO / PTH, tmp_path / PTH)
    (tmp_path / "nnunet_green").mkdir()
    (tmp_path / "nnunet_green" / "__init__.py").write_text("")
    proc = _fresh_python(tmp_path, "import os; print('alive', os.environ.get('nnUNet_extTrainer'))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "alive /elsewhere/trainers"


# ------------------------------------------------------------------------------------- the running environment

def test_running_environment_has_the_pth_and_the_trainers_folder():
    """Where the project is installed in this interpreter (`make install`): the installer put the .pth into a
    site dir (it is in the distribution's RECORD) and the trainers folder is listed in nnUNet_extTrainer."""
    site_dirs = [p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(p)]
    # Only site dirs: a checkout's own nnunet_green.egg-info (cwd on sys.path) is no installation.
    dists = list(importlib.metadata.distributions(name="nnunet-green", path=site_dirs))
    if not dists:
        pytest.skip("nnunet-green is not installed in this interpreter")
    recorded = [f for f in dists[0].files or [] if f.name == PTH]
    assert recorded, "the installed distribution's RECORD does not list nnunet_green.pth"
    installed = Path(dists[0].locate_file(recorded[0]))
    assert installed.parent.resolve() in {Path(p).resolve() for p in site_dirs}
    assert installed.read_bytes() == (REPO / PTH).read_bytes()
    spec = importlib.util.find_spec("nnunet_green.trainers")
    folder = os.path.dirname(os.path.abspath(spec.origin))
    assert folder in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep)
