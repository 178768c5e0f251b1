"""The kernel library as built: what build_info reports, and how the package behaves without it."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import betanas_fast
from betanas_fast.ops import OP_NAMES


def test_build_info_lists_cpu_kernels_for_every_op():
    info = betanas_fast.build_info()
    assert info["kernels_loaded"], info["load_error"]
    assert info["built_with_torch"] == torch.__version__
    assert set(info["ops"]) == set(OP_NAMES)
    assert all(kernels["cpu"] for kernels in info["ops"].values()), info["ops"]


def test_build_info_lists_cuda_kernels_when_built_with_cuda():
    info = betanas_fast.build_info()
    if not info["cuda_kernels_compiled"]:
        # A CPU-only build is legitimate only where CUDA could not be used, or was switched off.
        assert torch.version.cuda is None or os.environ.get("BETANAS_EXPECT_CPU_ONLY_BUILD") == "1", (
            "torch has CUDA but the kernels were built without it; set BETANAS_EXPECT_CPU_ONLY_BUILD=1 "
            "for a deliberately CPU-only build")
        return
    assert info["cuda_archs"], info
    assert all(kernels["cuda"] for kernels in info["ops"].values()), info["ops"]


def _copy_package_without(tmp_path, drop_extension=False, built_with=None):
    """A copy of the installed package, optionally without its compiled library or claiming another torch."""
    src = os.path.dirname(betanas_fast.__file__)
    dst = tmp_path / "betanas_fast"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    if drop_extension:
        for name in os.listdir(dst):
            if name.startswith("_C.") and name.endswith((".so", ".pyd")):
                os.remove(dst / name)
    if built_with is not None:
        (dst / "_build_config.py").write_text(textwrap.dedent(f"""\
            TORCH_VERSION = {built_with!r}
            TORCH_CUDA_VERSION = None
            WITH_CUDA = False
            CUDA_ARCH_LIST = ''
            NVCC_VERSION = None
        """))
    return tmp_path


# Imports only the copied package: an editable install's finder would resolve betanas_fast._C to the
# source tree.
ISOLATE = "import sys\nsys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"

PROBE = ISOLATE + textwrap.dedent("""\
    import warnings, torch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import betanas_fast
        import betanas_fast.nn
    messages = [str(w.message) for w in caught if "betanas_fast._C" in str(w.message)]
    assert len(messages) == 1, messages
    print(messages[0])
    layer = betanas_fast.nn.DWConvBNAct(4, 5, 2)
    x = torch.randn(2, 4, 9, 9, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and not betanas_fast.KERNELS_LOADED
    assert not any(k["cpu"] for k in betanas_fast.build_info()["ops"].values())
    print("fallback ok")
""")


def _run(root, code, **env):
    full_env = {**os.environ, "PYTHONPATH": str(root), **env}
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=full_env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("case", ["missing", "other_torch"])
def test_import_without_usable_kernels_warns_once_and_falls_back(tmp_path, case):
    root = _copy_package_without(tmp_path, drop_extension=case == "missing",
                                 built_with="1.0.0+other" if case == "other_torch" else None)
    result = _run(root, PROBE)
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout
    assert "pip install --no-build-isolation" in result.stdout  # the exact rebuild command
    if case == "other_torch":
        assert "built against torch 1.0.0+other" in result.stdout


def test_require_kernels_makes_it_an_error(tmp_path):
    root = _copy_package_without(tmp_path, drop_extension=True)
    result = _run(root, ISOLATE + "import betanas_fast", BETANAS_REQUIRE_KERNELS="1")
    assert result.returncode != 0
    assert "ImportError" in result.stderr and "could not be loaded" in result.stderr
