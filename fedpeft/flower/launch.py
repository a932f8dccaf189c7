"""Run ``fedpeft simulate`` in a child process, its output streamed to a log.

A fresh process per federation: Ray's workers, the models they load and the memory
they hold all go when it exits, so an audit's variants and a benchmark's rows do not
pile up in one interpreter.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


def simulate_in_child(
    config_file: Path,
    run_dir: Path,
    log_path: Path,
    on_line: Callable[[str], None] = lambda line: None,
    cwd: Path | None = None,
) -> int:
    """``fedpeft simulate --config config_file --out run_dir``; its exit code.

    Every line (stdout and stderr) goes to ``log_path`` as it comes and then to
    ``on_line`` (progress, echoing).
    """
    command = [sys.executable, "-m", "fedpeft.cli", "simulate", "--config", str(config_file)]
    command += ["--out", str(run_dir)]
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            log.flush()
            on_line(line)
        return proc.wait()
