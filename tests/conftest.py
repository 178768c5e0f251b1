import os
import sys

# The tests import the installed package (--import-mode=importlib keeps the source tree off sys.path);
# only this directory is added, for the shared helpers in common.py.
sys.path.insert(0, os.path.dirname(__file__))
