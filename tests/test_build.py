"""The kernel library as built: what build_info reports, where the library is loaded from, how the package
behaves without it, and the one switch between kernels and references."""
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import betanas_fast
from betanas_fast import _ext, ops, reference
from betanas_fast.ops import OP_NAMES

from common import DEVICES, requires_cuda

# The checkout these tests belong to; the package they import may be installed elsewhere.
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_DIR = os.path.dirname(betanas_fast.__file__)


def test_build_info_lists_cpu_kernels_for_every_op():
    info = betanas_fast.build_info()
    assert info["kernels_loaded"], info["load_error"]
    assert info["built_with_torch"] == torch.__version__
    assert info["built_package_version"] == betanas_fast.__version__
    assert info["library"] and os.path.dirname(info["library"]) in (PACKAGE_DIR, os.path.realpath(PACKAGE_DIR))
    assert set(info["ops"]) == set(OP_NAMES)
    assert all(kernels["cpu"] for kernels in info["ops"].values()), info["ops"]


def test_build_info_lists_cuda_kernels_when_built_with_cuda():
    info = betanas_fast.build_info()
    if not info["cuda_kernels_compiled"]:
        # A CPU-only build is legitimate only where CUDA could not be used, was switched off, or was not asked
        # for (no GPU visible at build time and no TORCH_CUDA_ARCH_LIST).
        assert (torch.version.cuda is None or os.environ.get("BETANAS_EXPECT_CPU_ONLY_BUILD") == "1"
                or (info["cuda_not_built_because"] and not torch.cuda.is_available())), (
            "torch has CUDA but the kernels were built without it; set BETANAS_EXPECT_CPU_ONLY_BUILD=1 "
            "for a deliberately CPU-only build")
        return
    assert info["cuda_archs"], info
    assert all(kernels["cuda"] for kernels in info["ops"].values()), info["ops"]


@requires_cuda
def test_cuda_kernels_are_built_and_chosen_on_this_gpu():
    """On a machine with a GPU, every op has its CUDA kernel, and ops on CUDA tensors run it (not the reference)."""
    info = betanas_fast.build_info()
    assert info["kernels_loaded"], info["load_error"]
    assert info["cuda_kernels_compiled"], (
        f"the library was built without CUDA kernels ({info['cuda_not_built_because']}); rebuild on this machine")
    assert all(kernels["cuda"] for kernels in info["ops"].values()), info["ops"]
    assert all(_ext.use_kernel(name, "cuda") for name in OP_NAMES)


def _copy_package_without(tmp_path, drop_extension=False, built_with=None, version=None):
    """A copy of the imported package in tmp_path, optionally without its compiled library, claiming to be
    built against another torch, or claiming another package version."""
    dst = tmp_path / "betanas_fast"
    shutil.copytree(PACKAGE_DIR, dst, ignore=shutil.ignore_patterns("__pycache__"))
    if drop_extension:
        for name in os.listdir(dst):
            if name.startswith("_C.") and name.endswith((".so", ".pyd")):
                os.remove(dst / name)
    if built_with is not None:
        (dst / "_build_config.py").write_text(textwrap.dedent(f"""\
            PACKAGE_VERSION = {betanas_fast.__version__!r}
            TORCH_VERSION = {built_with!r}
            TORCH_CUDA_VERSION = None
            WITH_CUDA = False
            CUDA_ARCH_LIST = ''
            NVCC_VERSION = None
        """))
    if version is not None:
        (dst / "_version.py").write_text(f"__version__ = {version!r}\n")
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


def _run(root, code, pythonpath=None, **env):
    """`python -c code` in root, with root (or pythonpath) on PYTHONPATH."""
    full_env = {**os.environ, "PYTHONPATH": str(pythonpath or root), **env}
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=full_env, capture_output=True, text=True,
                          timeout=120)


# A package version no installed build has: a copy without a library finds no stand-in on sys.path.
UNINSTALLED_VERSION = "0.0.0+copy"


@pytest.mark.parametrize("case", ["missing", "other_torch"])
def test_import_without_usable_kernels_warns_once_and_falls_back(tmp_path, case):
    root = _copy_package_without(tmp_path, drop_extension=case == "missing",
                                 built_with="1.0.0+other" if case == "other_torch" else None,
                                 version=UNINSTALLED_VERSION if case == "missing" else None)
    result = _run(root, PROBE)
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout
    assert "pip install --no-build-isolation" in result.stdout  # the exact rebuild command
    if case == "other_torch":
        assert "built against torch 1.0.0+other" in result.stdout


def test_require_kernels_makes_it_an_error(tmp_path):
    root = _copy_package_without(tmp_path, drop_extension=True, version=UNINSTALLED_VERSION)
    result = _run(root, ISOLATE + "import betanas_fast", BETANAS_REQUIRE_KERNELS="1")
    assert result.returncode != 0
    assert "ImportError" in result.stderr and "could not be loaded" in result.stderr


@pytest.mark.skipif(not os.path.isfile(os.path.join(CHECKOUT, "pyproject.toml")), reason="no checkout beside the tests")
def test_package_version_is_the_projects():
    """setup.py records the project's version beside the library; the package compares it with its own."""
    with open(os.path.join(CHECKOUT, "pyproject.toml")) as f:
        project = f.read()
    declared = re.search(r'^version = "([^"]+)"', project, re.MULTILINE)
    if declared is None:  # taken from the package itself
        assert re.search(r'^dynamic = \[[^]]*"version"', project, re.MULTILINE), "pyproject.toml declares no version"
        return
    assert declared.group(1) == betanas_fast.__version__


BUILD_INFO = "import betanas_fast, json; print(json.dumps(betanas_fast.build_info()))"


@pytest.mark.skipif(not os.path.isfile(os.path.join(CHECKOUT, "betanas_fast", "__init__.py")),
                    reason="no source tree beside the tests")
@pytest.mark.parametrize("command", [["-c", BUILD_INFO], ["-m", "betanas_fast.search", "--help"]],
                         ids=["build_info", "search_help"])
def test_kernels_load_when_run_from_the_checkout_root(command):
    """The README's commands typed in the checkout import its source tree (the current directory comes
    first on sys.path), which has no library unless built in place: after `pip install .` the installed
    library must stand in for it, without a warning."""
    result = subprocess.run([sys.executable, *command], cwd=CHECKOUT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "betanas_fast._C" not in result.stderr, result.stderr
    if command[0] == "-c":
        info = json.loads(result.stdout.splitlines()[-1])
        assert os.path.samefile(info["package_dir"], os.path.join(CHECKOUT, "betanas_fast"))  # the source tree
        assert info["kernels_loaded"], info["load_error"]
        assert all(kernels["cpu"] for kernels in info["ops"].values()), info["ops"]


def _checkout_without_library(tmp_path, version):
    """A source checkout (setup.py beside the package) of the given package version, never built."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    _copy_package_without(checkout, drop_extension=True, version=version)
    (checkout / "betanas_fast" / "_build_config.py").unlink(missing_ok=True)
    (checkout / "setup.py").write_text("# the checkout's build script\n")
    return checkout


def _installed_build(tmp_path, **recorded):
    """A built copy of the package in a sys.path entry of its own, as pip installs it, with some of the
    values of its _build_config.py replaced."""
    site = tmp_path / "site-packages"
    site.mkdir()
    _copy_package_without(site)
    config = site / "betanas_fast" / "_build_config.py"
    text = config.read_text()
    for key, value in recorded.items():
        text, found = re.subn(rf"^{key} = .*$", f"{key} = {value!r}", text, flags=re.MULTILINE)
        assert found == 1, (key, text)
    config.write_text(text)
    return site


CHECKOUT_PROBE = ISOLATE + textwrap.dedent("""\
    import json, warnings, torch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import betanas_fast
    from betanas_fast import ops, reference
    x, w, g, b = torch.randn(2, 4, 9, 9), torch.randn(4, 1, 3, 3), torch.rand(4) + 0.5, torch.randn(4)
    out = ops.dw_bn_act_train(x, w, g, b, 2, "relu6")[0]
    torch.testing.assert_close(out, reference.dw_bn_act_train(x, w, g, b, 2, 1, 1e-5)[0], atol=1e-5, rtol=1e-5)
    print(json.dumps({"info": betanas_fast.build_info(), "warnings": [str(w.message) for w in caught]}))
""")


@pytest.mark.parametrize("case", ["same_build", "other_version", "other_torch"])
def test_checkout_without_library_uses_an_installed_build_of_its_version(tmp_path, case):
    """The checkout's case in miniature: a source tree without library, run from its root, and a build of the
    package further along sys.path. The checkout's version is one no real installation has, so that only the
    build made here can match it."""
    checkout = _checkout_without_library(tmp_path, version=UNINSTALLED_VERSION)
    recorded = {"same_build": {"PACKAGE_VERSION": UNINSTALLED_VERSION}, "other_version": {},
                "other_torch": {"PACKAGE_VERSION": UNINSTALLED_VERSION, "TORCH_VERSION": "1.0.0+other"}}[case]
    site = _installed_build(tmp_path, **recorded)
    result = _run(checkout, CHECKOUT_PROBE, pythonpath=site)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    info, warned = report["info"], report["warnings"]
    assert os.path.samefile(info["package_dir"], checkout / "betanas_fast")
    if case == "same_build":
        assert info["kernels_loaded"], info["load_error"]
        assert os.path.samefile(os.path.dirname(info["library"]), site / "betanas_fast")
        assert all(kernels["cpu"] for kernels in info["ops"].values()), info["ops"]
        assert not warned, warned
        return
    assert not info["kernels_loaded"] and info["library"] is None
    assert len(warned) == 1, warned
    message = warned[0]
    assert f"source checkout {checkout}" in message and str(site / "betanas_fast") in message
    assert ("built against torch 1.0.0+other" if case == "other_torch"
            else f"it is betanas_fast {betanas_fast.__version__}, this source is {UNINSTALLED_VERSION}") in message
    assert "python setup.py build_ext --inplace" in message and "run from another directory" in message


@pytest.mark.skipif(not betanas_fast.KERNELS_LOADED, reason="kernel library not built")
def test_reference_ops_is_the_one_switch_for_every_op():
    assert all(_ext.use_kernel(name, "cpu") for name in OP_NAMES)
    assert not _ext.use_kernel("dw_bn_act_train", "meta")  # no kernels for other backends
    with ops.reference_ops():
        assert not any(_ext.use_kernel(name, "cpu") for name in OP_NAMES)
        with ops.reference_ops():
            pass
        assert not any(_ext.use_kernel(name, "cpu") for name in OP_NAMES)  # the inner block restores the outer
    assert all(_ext.use_kernel(name, "cpu") for name in OP_NAMES)


def _entry_calls(monkeypatch, device="cpu"):
    """Calls of every op's Python entry on `device`, and the references they may run, recorded by name."""
    from betanas_fast.nn import MBConv
    from betanas_fast.reference import grouped as grouped_reference

    ran = []

    def recording(name, original):
        def run(*args):
            ran.append(name)
            return original(*args)
        return run

    for module, name in [(reference, "dw_bn_act_train"), (reference, "dw_bn_act_eval"), (reference, "alpha_grad"),
                         (grouped_reference, "dw_bn_act_grouped_train"), (grouped_reference, "block_gate_grads")]:
        monkeypatch.setattr(module, name, recording(name, getattr(module, name)))
    torch.manual_seed(0)
    x, w, g, b = (t.to(device) for t in (torch.randn(2, 4, 9, 9), torch.randn(4, 1, 3, 3), torch.rand(4) + 0.5,
                                         torch.randn(4)))
    block = MBConv(4, 4, 3, 1, 3).to(device)
    alpha, remaining = torch.randn(3, 5).to(device), torch.ones(3, 5, dtype=torch.bool).to(device)
    calls = {
        "dw_bn_act_train": lambda: ops.dw_bn_act_train(x, w, g, b, 1, "relu6"),
        "dw_bn_act_eval": lambda: ops.dw_bn_act_eval(x, w, g, b, 1, "relu6"),
        "alpha_grad": lambda: ops.alpha_grad(alpha, remaining, torch.randn(3, 5).to(device),
                                             torch.rand(3, 5).to(device), 0.1),
        "dw_bn_act_grouped_train": lambda: ops.dw_bn_act_grouped_train(
            torch.cat([x.reshape(-1), x.reshape(-1)]), torch.cat([w.reshape(-1)] * 2), torch.cat([g, g]),
            torch.cat([b, b]), [2, 2], [4, 4], [3, 3], 9, 9, 1, "relu6"),
        "block_gate_grads": lambda: ops.block_gate_grads(x, torch.randn(2, 4, 9, 9).to(device),
                                                         *[[p] for p in block.gate_grad_params()], 1, True),
    }
    return calls, ran


@pytest.mark.skipif(not betanas_fast.KERNELS_LOADED, reason="kernel library not built")
@pytest.mark.parametrize("device", DEVICES)
def test_every_op_entry_runs_its_kernel_or_its_reference_by_the_switch(monkeypatch, device):
    calls, ran = _entry_calls(monkeypatch, device)
    for name, call in calls.items():
        call()
        assert ran == [], (name, ran)
        with ops.reference_ops():
            call()
        assert ran == [name], (name, ran)
        ran.clear()


def _package_imports(path):
    """(absolute module, imported names) of every `from ... import ...` of the package in a source file."""
    package = os.path.dirname(os.path.relpath(path, os.path.dirname(PACKAGE_DIR))).replace(os.sep, ".")
    with open(path) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("betanas_fast")):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            source = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            yield source, [alias.name for alias in node.names]


def test_private_names_come_only_from_the_modules_that_share_them():
    """No import cycle through the loader, and no module takes a private helper from a sibling: the loader
    (_ext) and the rules (_rules) import nothing of the package but its version; private helpers are shared
    through the private modules made for it (ops._common, reference._common)."""
    layers = ["_ext.py", "_rules.py", "space.py", "ops", "reference", "nn", "cost"]
    files = [os.path.join(PACKAGE_DIR, layer) for layer in layers if layer.endswith(".py")]
    for layer in (layer for layer in layers if not layer.endswith(".py")):
        files += [os.path.join(PACKAGE_DIR, layer, f) for f in os.listdir(os.path.join(PACKAGE_DIR, layer))
                  if f.endswith(".py")]
    for path in files:
        for source, names in _package_imports(path):
            if os.path.basename(path) in ("_ext.py", "_rules.py"):
                assert source == "betanas_fast._version", (path, source)
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                assert source.rsplit(".", 1)[-1] in ("_common", "_rules", "_ext", "_version"), (path, source, private)
