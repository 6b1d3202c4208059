"""Load the single-file scripts of cleanrl_gap/ as modules (they are scripts, not a package)."""

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["rainbow_impala_gap", "rainbow_softmoe1", "rainbow_pruned"]  # every script in cleanrl_gap/, in the order the README lists them


def script_path(name: str) -> str:
    return os.path.join(ROOT, "cleanrl_gap", f"{name}.py")


def load_script(name: str):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, script_path(name))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
