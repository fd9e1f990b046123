"""The workers' side of the benchmark protocol: one JSON command per stdin line, one JSON answer.

Standard library only: torch_van.py imports it from the PyTorch side env, tf_van.py from ours.
"""

from __future__ import annotations

import json
import sys


def serve(answer) -> int:
    """Print `answer(command)` as JSON for each command read, until 'quit' or end of input."""
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "quit":
            break
        print(json.dumps(answer(command)), flush=True)
    return 0
