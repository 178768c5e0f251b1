"""benchmarks/gpu_library.py: a prebuilt library is used only for the torch and the source it was built for, and only
when it is the very file its manifest describes."""
import hashlib
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def gpu_library():
    spec = importlib.util.spec_from_file_location("gpu_library", os.path.join(ROOT, "benchmarks", "gpu_library.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prebuilt(folder, gpu_library, **changes):
    library = folder / "_C.abi3.so"
    library.write_bytes(os.urandom(256))
    manifest = {"library": library.name, "sha256": hashlib.sha256(library.read_bytes()).hexdigest(),
                "torch": "2.11.0+cu130", "package_version": gpu_library._package_version(), **changes}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return library


def test_a_matching_prebuilt_library_is_used(tmp_path, gpu_library):
    _prebuilt(tmp_path, gpu_library)
    manifest, why = gpu_library.prebuilt_problem(str(tmp_path), "2.11.0+cu130")
    assert why is None and manifest["library"] == "_C.abi3.so"


@pytest.mark.parametrize("torch_version,changes,tamper,message", [
    ("2.11.0+cu128", {}, False, "for torch 2.11.0+cu130, torch 2.11.0+cu128 is running"),
    ("2.11.0+cu130", {"package_version": "0.0.1"}, False, "of betanas_fast 0.0.1"),
    ("2.11.0+cu130", {}, True, "not the file the manifest describes"),
])
def test_a_prebuilt_library_for_something_else_is_refused(tmp_path, gpu_library, torch_version, changes, tamper,
                                                           message):
    library = _prebuilt(tmp_path, gpu_library, **changes)
    if tamper:
        data = bytearray(library.read_bytes())
        data[-1] ^= 0xFF
        library.write_bytes(bytes(data))
    _, why = gpu_library.prebuilt_problem(str(tmp_path), torch_version)
    assert why is not None and message in why


def test_no_prebuilt_library(tmp_path, gpu_library):
    manifest, why = gpu_library.prebuilt_problem(str(tmp_path), "2.11.0+cu130")
    assert manifest is None and "manifest.json missing" in why
