"""Run by tests/test_export.py in a subprocess (`python -I`): rebuilds an exported timm model with torch and
timm only, as a user without betanas_fast would.

    python -I tests/timm_only_check.py EXPORT_DIR INPUT.pt LOGITS.pt

betanas_fast is made unimportable first (a meta-path finder refuses it, on top of -I keeping the checkout
off sys.path). Runs EXPORT_DIR/rebuild_timm.py as a script, then its load_model(EXPORT_DIR) (strict
loading), writes the logits for INPUT to LOGITS and prints one JSON line: the parameter count and the
top-level non-standard-library modules that were imported.
"""
import sys


class _RefuseBetanas:
    """A meta-path finder under which `import betanas_fast` (or any submodule) fails."""

    def find_spec(self, name, path=None, target=None):
        if name == "betanas_fast" or name.startswith("betanas_fast."):
            raise ImportError(f"{name} is not importable here: the rebuild must need torch and timm only")
        return None


sys.meta_path.insert(0, _RefuseBetanas())

import json  # noqa: E402
import os  # noqa: E402
import runpy  # noqa: E402

import torch  # noqa: E402


def main(directory, input_path, output_path):
    script = os.path.join(directory, "rebuild_timm.py")
    saved_argv = sys.argv
    sys.argv = [script, directory]
    try:
        namespace = runpy.run_path(script, run_name="__main__")  # the script as a user runs it
    finally:
        sys.argv = saved_argv
    model = namespace["load_model"](directory)
    x = torch.load(input_path, weights_only=True)
    with torch.no_grad():
        logits = model(x)
    torch.save(logits, output_path)
    modules = sorted({m.split(".")[0] for m in sys.modules} - set(sys.stdlib_module_names) - {"__main__"})
    print(json.dumps({"params": sum(p.numel() for p in model.parameters()), "modules": modules}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
