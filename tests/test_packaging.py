"""The wheel a user gets from `pip install .`: its files, its metadata, and a build without
setuptools warnings (a deprecation today is a failed build on a later setuptools).

Built from a copy of the checkout's files (tracked and untracked, not ignored) so the checkout
gets no build/ or egg-info; the C++ extension is skipped (SEGPCL_NO_EXT=1), its build has tests
of its own (tests/ops)."""
import email
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _source_files():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout (lists the files a clean clone holds)")
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [p for p in out.splitlines() if (ROOT / p).is_file() or (ROOT / p).is_symlink()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    for rel in _source_files():
        dst = src / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / rel).is_symlink():
            os.symlink(os.readlink(ROOT / rel), dst)
        else:
            shutil.copy2(ROOT / rel, dst)
    dist = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, SEGPCL_NO_EXT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps",
         "--no-index", "-w", str(dist), str(src)],
        capture_output=True, text=True, env=env, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    (whl,) = dist.glob("segpcl_fast-*.whl")
    return zipfile.ZipFile(whl), log


def test_build_has_no_setuptools_warnings(wheel):
    _, log = wheel
    bad = [line.strip() for line in log.splitlines()
           if "SetuptoolsDeprecationWarning" in line or "_Warning:" in line
           or "SetuptoolsWarning" in line]
    assert not bad, "\n".join(bad)


def test_wheel_holds_package_data_and_kernels_inside_the_package(wheel):
    zf, _ = wheel
    names = set(zf.namelist())
    for folder, pattern in [("segpcl_fast/model_configs", "*.json"),
                            ("segpcl_fast/assets", "*"), ("segpcl_fast/configs", "*.yaml")]:
        expected = {f"{folder}/{p.name}" for p in (ROOT / folder).glob(pattern)}
        assert expected and expected <= names, sorted(expected - names)
    for op in ("pgd_step", "anchor_kl", "knn_subgraph_kl", "_triton_utils"):
        assert f"segpcl_fast/kernels/{op}.py" in names
    # `kernels` is another project's name on PyPI: nothing top-level but our package
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"segpcl_fast"}, tops
    assert not any(n.endswith((".pyc", ".so")) for n in names)


def test_wheel_metadata(wheel):
    zf, _ = wheel
    (meta_name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
    meta = email.message_from_bytes(zf.read(meta_name))
    assert meta["Name"].replace("-", "_") == "segpcl_fast"
    assert meta["License"] == "Apache-2.0"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE")
               for n in zf.namelist())
    requires = meta.get_all("Requires-Dist")
    torch_req = [r for r in requires if r.split(">")[0].split("=")[0].strip() == "torch"]
    # users bring their own CUDA torch: a floor, never a pin or a ceiling
    assert torch_req == ["torch>=2.6"], torch_req
    (ep_name,) = [n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt")]
    assert "segpcl-fast = segpcl_fast.cli:main" in zf.read(ep_name).decode()


def test_python_dash_m_runs_the_cli(wheel):
    """`python -m segpcl_fast` is the CLI (as `segpcl-fast` and `python -m segpcl_fast.cli`, which torchrun's
    -m also takes), and the wheel carries its __main__.py."""
    zf, _ = wheel
    assert "segpcl_fast/__main__.py" in set(zf.namelist())
    from segpcl_fast import __version__
    proc = subprocess.run([sys.executable, "-m", "segpcl_fast", "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.split() == ["segpcl-fast", __version__], proc.stdout + proc.stderr


def test_checkout_root_shadows_no_installed_package():
    """`python -m pytest` and scripts run from the checkout put its root first on sys.path: a package
    there hides an installed one of the same name (a root kernels/ hid PyPI's `kernels`, which
    peft and transformers import, and the peft peer tests failed to import)."""
    roots = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())
    assert roots == ["segpcl_fast"], roots
    if importlib.util.find_spec("peft") is None:
        pytest.skip("peft is not installed")
    proc = subprocess.run([sys.executable, "-c", "import peft"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_ci_runs_the_readmes_test_command():
    """.ci/run is README's command 2 (install the test extras, run the suite) line for line: the set-up
    and the test command a reader copies are the ones CI lands on, and the suite's runner (pytest-xdist,
    for -n) is among the test extras that command installs."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("# 2. install the test extras and run the tests (what CI runs)\n", 1)[1].split("\n```", 1)[0]
    install, test = (part.strip() for part in block.strip().rsplit(" && ", 1))
    ci_lines = [line.strip().rstrip("\\").strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    ci = " ".join(line for line in ci_lines if line and not line.startswith("#"))
    assert install in ci, f".ci/run does not run README's install step:\n{install}"
    assert f"\n{test}\n" in (ROOT / ".ci" / "run").read_text(), f".ci/run does not run README's test command: {test}"
    assert "--runslow" in test.split(), f"CI runs the whole suite, the tests marked slow too: {test}"
    if " -n " in f" {test} ":
        import tomllib
        extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
        assert any(req.split(">")[0].split("=")[0].strip() == "pytest-xdist" for req in extras), extras


@pytest.mark.slow
def test_a_test_marked_slow_runs_only_under_runslow(request):
    """tests/conftest.py skips the tests marked slow unless --runslow is given (CI gives it): run without it,
    this test must have been skipped."""
    assert request.config.getoption("--runslow")
