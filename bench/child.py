"""Child-process entry point: `python -m bench.child <module.function> '<json kwargs>'`.

Runs one benchmark side in a fresh process (clean memory figures) and prints its JSON result on
a line starting with RESULT_MARKER, then shuts down Ray if the function started it. Torch threads come from OMP_NUM_THREADS (set by
`bench.common.child_env`); torch is imported only by the sides that use it.
"""

from __future__ import annotations

import importlib
import json
import sys

from bench.common import RESULT_MARKER, quiet_environment, shutdown_ray


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m bench.child <module.function> '<json kwargs>'", file=sys.stderr)
        return 2
    module_name, _, function_name = argv[1].rpartition(".")
    quiet_environment()
    function = getattr(importlib.import_module(module_name), function_name)
    try:
        result = function(**json.loads(argv[2]))
        print(RESULT_MARKER + json.dumps(result), flush=True)  # before Ray's shutdown, which can be slow
    finally:
        shutdown_ray()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
