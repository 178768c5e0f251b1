"""The CUDA kernel library for a GPU machine, built on a machine without a GPU, and put in place on the GPU machine.

A lent GPU machine has minutes of device time; compiling every kernel for sm_90 takes several of them. So the
library is built here, against the torch the GPU machine runs, and carried over with the working tree:

    python benchmarks/gpu_library.py build      # here: a venv with that torch, the library for sm_90 in build/gpu/
    python benchmarks/gpu_library.py install    # there (benchmarks/gpu_check.sh does it): into betanas_fast/

`build` makes (or reuses) a virtual environment with exactly `--torch` (default: the GPU machine's 2.11.0, a
CUDA 13.0 build like the nvcc here), compiles csrc/ in it for `--arch` (TORCH_CUDA_ARCH_LIST) with portable CPU
code (`-march=x86-64-v3`: the GPU machine's CPU is not this one), and writes build/gpu/: the library (built for
CPython's stable ABI, so that the GPU machine's Python 3.12 loads what a 3.11 built), its _build_config.py and
manifest.json (torch, CUDA, archs, size, sha256, package version, commit). `--check` then runs the CPU test
suite against that torch with this library (slow: ~20 min on 2 cores).

`install` copies the library into the checkout's betanas_fast/ when the manifest matches the running torch and
package version and the file's sha256, and otherwise builds it in place for the visible GPUs (minutes). It
prints one line and exits non-zero when no usable library results. The carry to the GPU machine must include
build/gpu (git ignores build/).
"""
import argparse
import datetime
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_DIR = os.path.join(ROOT, "betanas_fast")
DEFAULT_DIR = os.path.join(ROOT, "build", "gpu")
DEVICE_TORCH = "2.11.0"  # the GPU machine's torch (2.11.0+cu130)
DEVICE_ARCH = "9.0"  # H100 / H200
MAX_LIBRARY_MB = 48  # what the working tree can carry beside the sources
# What the CPU tests need beside torch, as CI installs it: pyproject's dependencies and its test, export, bench and
# dali extras (installed with torch held at the venv's version).
TEST_REQUIREMENTS = ["numpy", "tqdm", "matplotlib", "tensorboard", "scikit-learn", "pytest", "pytest-benchmark",
                     "pytest-timeout", "expecttest", "mlxtend", "timm", "onnx", "onnxruntime", "onnxscript",
                     "nvidia-dali-cuda130"]
BUILD_REQUIREMENTS = ["setuptools>=64", "wheel", "ninja", "pybind11", "numpy"]


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# _package_version and _commit read the checkout without importing betanas_fast (whose runs.provenance.commit says
# the same): importing the package loads a kernel library, the very file `install` is about to choose.
def _package_version() -> str:
    namespace = {}
    with open(os.path.join(PACKAGE_DIR, "_version.py")) as f:
        exec(f.read(), namespace)
    return namespace["__version__"]


def _commit() -> str:
    try:
        out = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _run(cmd, env=None, log=None, cwd=ROOT):
    print("+", " ".join(cmd), flush=True)
    with open(log, "a") if log else open(os.devnull, "w") as f:
        result = subprocess.run(cmd, env=env, cwd=cwd, stdout=f if log else None, stderr=subprocess.STDOUT if log
                                else None)
    if result.returncode:
        tail = open(log).read()[-6000:] if log else ""
        sys.exit(f"{tail}\nfailed ({result.returncode}): {' '.join(cmd)}")


def _venv_python(venv: str, torch_version: str, log: str) -> str:
    """The venv's python, with torch==torch_version and the build requirements (created when absent)."""
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        _run([sys.executable, "-m", "venv", venv])
    probe = subprocess.run([python, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True)
    if probe.returncode or probe.stdout.strip().split("+")[0] != torch_version:
        _run([python, "-m", "pip", "install", "--quiet", f"torch=={torch_version}", *BUILD_REQUIREMENTS], log=log)
    return python


def build(args) -> None:
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "build.log")
    open(log, "w").close()
    python = _venv_python(os.path.abspath(args.venv), args.torch, log)
    torch_info = json.loads(subprocess.run(
        [python, "-c", "import json, torch; print(json.dumps([torch.__version__, torch.version.cuda]))"],
        capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    if torch_info[1] is None:
        sys.exit(f"torch {torch_info[0]} in {args.venv} has no CUDA: no CUDA kernels can be built against it")
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=args.arch, BETANAS_FORCE_CUDA="1", BETANAS_CPU_MARCH=args.march,
               MAX_JOBS=str(args.jobs))
    env.pop("BETANAS_FORCE_CPU", None)
    started = time.time()
    # the object files are kept beside the output (build/gpu-objects), so that a rebuild compiles what changed only
    objects = os.path.join(os.path.dirname(out), os.path.basename(out) + "-objects")
    with tempfile.TemporaryDirectory(prefix="betanas-gpu-build-") as tmp:
        _run([python, "setup.py", "build_ext", "--build-lib", os.path.join(tmp, "lib"), "--build-temp", objects],
             env=env, log=log)
        built = glob.glob(os.path.join(tmp, "lib", "betanas_fast", "_C*.so"))
        if len(built) != 1:
            sys.exit(f"expected one library in the build, found {built}")
        for old in glob.glob(os.path.join(out, "_C*.so")):
            os.remove(old)
        library = os.path.join(out, os.path.basename(built[0]))
        shutil.copy2(built[0], library)
        # torch compiles host code with -g: the debug sections are most of the file and nothing runs them (the
        # device code keeps its -lineinfo, which compute-sanitizer reports with)
        _run(["strip", "--strip-debug", library])
        shutil.copy2(os.path.join(tmp, "lib", "betanas_fast", "_build_config.py"),
                     os.path.join(out, "_build_config.py"))
    size_mb = os.path.getsize(library) / 2**20
    manifest = {
        "library": os.path.basename(library), "sha256": _sha256(library), "size_mib": round(size_mb, 2),
        "torch": torch_info[0], "torch_cuda": torch_info[1], "cuda_archs": args.arch, "cpu_march": args.march,
        "package_version": _package_version(), "commit": _commit(),
        "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(time.time() - started),
    }
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(json.dumps(manifest))
    if size_mb > MAX_LIBRARY_MB:
        sys.exit(f"the library is {size_mb:.1f} MiB, more than the {MAX_LIBRARY_MB} MiB the working tree can carry")
    if args.check:
        check(python, out, log)


def check(python: str, out: str, log: str) -> None:
    """The CPU test suite against the venv's torch, with the built library, on a copy of the checkout."""
    torch_version = subprocess.run([python, "-c", "import torch; print(torch.__version__.split('+')[0])"],
                                   capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints:
        constraints.write(f"torch=={torch_version}\n")  # timm's torchvision must not move torch
    _run([python, "-m", "pip", "install", "--quiet", "-c", constraints.name, *TEST_REQUIREMENTS], log=log)
    os.remove(constraints.name)
    with tempfile.TemporaryDirectory(prefix="betanas-gpu-check-") as tmp:
        tree = os.path.join(tmp, "tree")
        _run(["git", "-C", ROOT, "worktree", "add", "--detach", tree, "HEAD"])
        try:
            for name in glob.glob(os.path.join(out, "_C*.so")) + [os.path.join(out, "_build_config.py")]:
                shutil.copy2(name, os.path.join(tree, "betanas_fast"))
            env = dict(os.environ, PYTHONPATH=tree)
            env.pop("BETANAS_REQUIRE_KERNELS", None)  # a test imports the package without its library on purpose
            # the suite must run the built library, not fall back to the references
            _run([python, "-c", "import betanas_fast, sys; info = betanas_fast.build_info(); "
                  "sys.exit(0 if info['kernels_loaded'] and info['cuda_kernels_compiled'] else info['load_error'])"],
                 env=env, cwd=tree)
            _run([python, "-m", "pytest", "tests/", "-q", "-p", "no:cacheprovider"], env=env, cwd=tree)
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree])


def prebuilt_problem(source: str, torch_version: str):
    """(manifest, None) when the prebuilt library in `source` can run under `torch_version` with this source,
    else (manifest or None, why not)."""
    manifest_path = os.path.join(source, "manifest.json")
    if not os.path.exists(manifest_path):
        return None, f"no prebuilt library ({manifest_path} missing)"
    with open(manifest_path) as f:
        manifest = json.load(f)
    library = os.path.join(source, manifest["library"])
    if manifest["torch"] != torch_version:
        return manifest, f"the prebuilt library is for torch {manifest['torch']}, torch {torch_version} is running"
    if manifest["package_version"] != _package_version():
        return manifest, (f"the prebuilt library is of betanas_fast {manifest['package_version']}, this source is "
                          f"{_package_version()}")
    if not os.path.exists(library) or _sha256(library) != manifest["sha256"]:
        return manifest, f"{library} is missing or not the file the manifest describes"
    return manifest, None


def install(args) -> None:
    import torch  # only here: `build` runs without torch

    started = time.time()
    manifest, why = prebuilt_problem(args.source, torch.__version__)
    for old in glob.glob(os.path.join(PACKAGE_DIR, "_C*.so")):
        os.remove(old)
    if why is None:
        library = os.path.join(args.source, manifest["library"])
        shutil.copy2(library, PACKAGE_DIR)
        shutil.copy2(os.path.join(args.source, "_build_config.py"), PACKAGE_DIR)
        how = f"prebuilt {manifest['library']} (torch {manifest['torch']}, sm {manifest['cuda_archs']}, " \
              f"commit {manifest['commit']})"
    else:
        archs = ";".join(sorted({"%d.%d" % torch.cuda.get_device_capability(i)
                                 for i in range(torch.cuda.device_count())})) or DEVICE_ARCH
        env = dict(os.environ, TORCH_CUDA_ARCH_LIST=archs, MAX_JOBS=str(os.cpu_count() or 4))
        log = os.path.join(tempfile.gettempdir(), "betanas_gpu_library_build.log")
        open(log, "w").close()
        _run([sys.executable, "setup.py", "build_ext", "--inplace"], env=env, log=log)
        how = f"built in place for sm {archs} because {why}"
    probe = subprocess.run([sys.executable, "-c",
                            "import json, betanas_fast; print(json.dumps(betanas_fast.build_info()))"],
                           capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    info = json.loads(probe.stdout.strip().splitlines()[-1]) if probe.returncode == 0 and probe.stdout.strip() else {}
    ok = bool(info.get("kernels_loaded")) and bool(info.get("cuda_kernels_compiled"))
    print(f"{'ok' if ok else 'FAILED'}: {how}; {time.time() - started:.0f} s; kernels_loaded="
          f"{info.get('kernels_loaded')}, cuda_kernels_compiled={info.get('cuda_kernels_compiled')}"
          + ("" if ok else f"; {info.get('load_error') or probe.stderr.strip()[-2000:]}"), flush=True)
    sys.exit(0 if ok else 1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the library for the GPU machine here (no GPU needed)")
    b.add_argument("--torch", default=DEVICE_TORCH, help="the GPU machine's torch version (default %(default)s)")
    b.add_argument("--arch", default=DEVICE_ARCH, help="TORCH_CUDA_ARCH_LIST (default %(default)s)")
    b.add_argument("--march", default="x86-64-v3", help="-march of the CPU kernels (default %(default)s: AVX2)")
    b.add_argument("--venv", default=os.path.join(ROOT, "build", f"venv-torch-{DEVICE_TORCH}"),
                   help="virtual environment with that torch (created when absent)")
    b.add_argument("--out", default=DEFAULT_DIR, help="where the library goes (default build/gpu)")
    b.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel compile jobs")
    b.add_argument("--check", action="store_true", help="then run the CPU test suite against that torch")
    i = sub.add_parser("install", help="put the prebuilt library into betanas_fast/ (or build it in place)")
    i.add_argument("--source", default=DEFAULT_DIR, help="the prebuilt library's folder (default build/gpu)")
    args = parser.parse_args(argv)
    build(args) if args.command == "build" else install(args)


if __name__ == "__main__":
    main()
