"""Every figure the README states comes from a results file: the rendered blocks of README.md and docs/*.md
equal what benchmarks/render_readme.py makes of benchmarks/results/, every results file is stamped, and the
README's text outside the rendered blocks states no measured figure."""
import importlib.util
import json
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def load_renderer():
    spec = importlib.util.spec_from_file_location("render_readme", os.path.join(ROOT, "benchmarks", "render_readme.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# A measured figure: a number with a unit of time, speed, size ratio or share.
FIGURE = re.compile(r"\b\d+(?:[.,]\d+)?\s?(?:ms|s|min|%|×|x|GB/s|GFLOP/s|MiB|GiB)(?![\w/])")


def figures_outside_blocks(text: str, renderer) -> list:
    outside = renderer.BLOCK.sub("", text)
    outside = re.sub(r"```.*?```", "", outside, flags=re.S)   # commands and their flags, not figures
    return [m.group(0) for m in FIGURE.finditer(outside)]


def test_pages_agree_with_the_results_files():
    r = load_renderer()
    for path in r.pages():
        text = open(path).read()
        assert r.render(text, path) == text, \
            f"{os.path.relpath(path, ROOT)} disagrees with benchmarks/results/: run python benchmarks/render_readme.py"


def test_a_changed_figure_is_caught():
    """Positive control: a rendered number edited by hand no longer matches its results file."""
    r = load_renderer()
    readme = os.path.join(ROOT, "README.md")
    text = open(readme).read()
    blocks = list(r.BLOCK.finditer(text))
    assert blocks, "the README renders no results block"
    edited = False
    for m in blocks:
        body = m.group("body")
        digit = re.search(r"\d", body)
        if digit:
            i = m.start("body") + digit.start()
            text = text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1:]
            edited = True
            break
    assert edited
    assert r.render(text, readme) != text


def test_every_results_file_is_stamped():
    files = [f for f in os.listdir(RESULTS) if f.endswith(".json")]
    assert files
    for name in files:
        doc = json.load(open(os.path.join(RESULTS, name)))
        stamp = doc["stamp"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", stamp["date"]), name
        assert stamp["commit"] and stamp["command"], name
        assert {"cpu", "cores", "torch", "cpu_features"} <= set(stamp["machine"]), name


def test_the_readme_states_no_figure_outside_its_rendered_blocks():
    r = load_renderer()
    text = open(os.path.join(ROOT, "README.md")).read()
    assert figures_outside_blocks(text, r) == []
    # the scanner finds a figure typed into the prose (positive control)
    assert figures_outside_blocks(text + "\nThe search takes 1 min 50 s and scores 92.0 %.\n", r) == \
        ["1 min", "50 s", "92.0 %"]


@pytest.mark.parametrize("name", sorted(load_renderer().WRITERS))
def test_every_known_results_file_has_a_writer_that_exists(name):
    r = load_renderer()
    command = r.WRITERS[name]
    script = next((w for w in command.split() if w.endswith(".py")), None)
    target = script or command.split()[1].rstrip("/")
    assert os.path.exists(os.path.join(ROOT, target)), command
