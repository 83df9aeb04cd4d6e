"""setup.py's native build (python/native_build.py): the CUDA targets, the toolkit it finds, the generated header.
The builds themselves (a CUDA torch, default targets, a failing CUDA part) run in .ci/cuda_build."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("native_build", ROOT / "python" / "native_build.py")
native_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(native_build)


def test_default_targets():
    gencode, targets = native_build.cuda_targets("80;90+PTX")
    assert targets == ["sm_80", "sm_90", "compute_90"]
    assert gencode == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                       "-gencode=arch=compute_90,code=compute_90"]
    assert native_build.cuda_targets("80, 90a+PTX")[1] == ["sm_80", "sm_90a", "compute_90a"]


@pytest.mark.parametrize("archs", ["sm_90", "", "90+ptx", "8.0"])
def test_malformed_targets_name_the_variable(archs):
    with pytest.raises(ValueError, match=r"FLOWCUT_CUDA_ARCHS=.*e\.g\. FLOWCUT_CUDA_ARCHS='80;90\+PTX'"):
        native_build.cuda_targets(archs)


def test_mode(monkeypatch):
    for value, mode in (("0", "0"), ("off", "0"), ("1", "1"), ("Yes", "1"), ("", "auto"), ("auto", "auto")):
        monkeypatch.setenv("FLOWCUT_BUILD_NATIVE", value)
        assert native_build.native_mode() == mode
    monkeypatch.setenv("FLOWCUT_BUILD_NATIVE", "maybe")
    with pytest.raises(ValueError, match="FLOWCUT_BUILD_NATIVE='maybe' is not a choice"):
        native_build.native_mode()


def test_header_has_the_targets_as_one_string(tmp_path):
    """The targets reach _C as a string in a generated header: nvcc would split a -D value at its commas."""
    native_build.write_build_info(tmp_path, "1.2.3", ["sm_80", "sm_90", "compute_90"])
    header = (tmp_path / "build_info.h").read_text()
    assert '#define FLOWCUT_VERSION "1.2.3"' in header and "#define FLOWCUT_WITH_CUDA 1" in header
    assert '#define FLOWCUT_CUDA_TARGETS "sm_80,sm_90,compute_90"' in header and "@" not in header
    native_build.write_build_info(tmp_path, "1.2.3", [])
    header = (tmp_path / "build_info.h").read_text()
    assert "#define FLOWCUT_WITH_CUDA 0" in header and '#define FLOWCUT_CUDA_TARGETS ""' in header


def fake_toolkit(root: Path, reports_top: bool = True) -> Path:
    """A folder that looks like a CUDA toolkit: bin/nvcc (which reports its TOP under --dryrun, as nvcc does, if
    ``reports_top``) and include/cuda_runtime.h."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f'#!/bin/sh\necho "#\\$ TOP={root}/bin/.." >&2\n' if reports_top else "#!/bin/sh\n")
    nvcc.chmod(0o755)
    return root


@pytest.fixture
def no_toolkit_around(monkeypatch, tmp_path):
    """No CUDA_HOME, CUDA_PATH or nvcc on PATH, and nothing at the default place."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "path").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "path"))
    monkeypatch.setattr(native_build, "DEFAULT_TOOLKIT", tmp_path / "no-cuda")
    return tmp_path / "path"


@pytest.mark.parametrize("var", ["CUDA_HOME", "CUDA_PATH"])
def test_toolkit_from_the_environment(no_toolkit_around, monkeypatch, tmp_path, var):
    toolkit = fake_toolkit(tmp_path / "cuda")
    monkeypatch.setenv(var, str(toolkit))
    assert native_build.find_cuda_toolkit() == (toolkit, var)


def test_cuda_home_without_a_toolkit_says_how_to_set_it(no_toolkit_around, monkeypatch, tmp_path):
    """CUDA_HOME is taken as given: an empty folder means no CUDA kernels, with a line saying how to set it, even
    where another toolkit would be found."""
    monkeypatch.setattr(native_build, "DEFAULT_TOOLKIT", fake_toolkit(tmp_path / "cuda"))
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "empty"))
    root, why = native_build.find_cuda_toolkit()
    assert root is None and "\n" not in why
    assert why.startswith(f"CUDA_HOME={tmp_path / 'empty'} is not a CUDA toolkit (no bin/nvcc and "
                          "include/cuda_runtime.h there); set CUDA_HOME to the toolkit's root"), why


def test_toolkit_of_a_symlinked_nvcc(no_toolkit_around, tmp_path):
    toolkit = fake_toolkit(tmp_path / "cuda-13.0", reports_top=False)
    (no_toolkit_around / "nvcc").symlink_to(toolkit / "bin" / "nvcc")
    assert native_build.find_cuda_toolkit() == (toolkit, f"nvcc on PATH ({no_toolkit_around / 'nvcc'})")


def test_toolkit_of_an_nvcc_wrapper_script(no_toolkit_around, tmp_path):
    """A wrapper script outside the toolkit (e.g. /usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc):
    the toolkit is the one nvcc itself reports."""
    toolkit = fake_toolkit(tmp_path / "cuda-13.0")
    wrapper = no_toolkit_around / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    assert native_build.find_cuda_toolkit() == (toolkit, f"nvcc on PATH ({wrapper})")


def test_default_toolkit_place(no_toolkit_around, monkeypatch, tmp_path):
    toolkit = fake_toolkit(tmp_path / "cuda")
    monkeypatch.setattr(native_build, "DEFAULT_TOOLKIT", toolkit)
    assert native_build.find_cuda_toolkit() == (toolkit, str(toolkit))


def test_no_toolkit_names_cuda_home(no_toolkit_around, tmp_path):
    root, why = native_build.find_cuda_toolkit()
    assert root is None and "\n" not in why
    assert re.match(r"no CUDA toolkit found \(CUDA_HOME and CUDA_PATH unset, no nvcc on PATH, none at .*\); "
                    r"set CUDA_HOME to the toolkit's root, the folder holding bin/nvcc and include/cuda_runtime.h",
                    why), why
