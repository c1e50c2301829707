"""Re-running a benchmark script under the project's venv: standard library only, imported
before anything of the project is."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(SCRIPTS)
VENV_PY = os.path.join(REPO, ".venv", "bin", "python")


def ensure(script: str, needs=("boto3", "fuse", "ssecfs")) -> None:
    """Return if `needs` import here; else exec `script` again under .venv/bin/python (made
    by scripts/install if missing), with the same arguments."""
    try:
        for mod in needs:
            __import__(mod)
        return
    except ImportError:
        pass
    name = os.path.basename(script)
    if os.environ.get("SSECFS_BENCH_REEXEC"):
        sys.exit(f"{name}: ssecfs is not importable under .venv/bin/python either "
                 "(run scripts/install)")
    if not os.path.exists(VENV_PY):
        print(f"{name}: no .venv; running scripts/install", file=sys.stderr, flush=True)
        subprocess.run([os.path.join(SCRIPTS, "install")], check=True)
    os.environ["SSECFS_BENCH_REEXEC"] = "1"
    os.execv(VENV_PY, [VENV_PY, os.path.abspath(script), *sys.argv[1:]])
