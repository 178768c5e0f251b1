# The package version; pyproject.toml's [project] version must say the same (tests/test_build.py checks).
__version__ = "0.1.0"
