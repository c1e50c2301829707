"""`python -m ssecfs.mount`: the daemon `ssecfs mount` starts in the background.

It receives its MountConfig, already validated by the parent, as JSON on an inherited pipe
(--config-fd) and answers READY or ERROR CODE MESSAGE on another (--ready-fd). Handing over
the config object, not a command line rebuilt from it, keeps each mount option in one place:
its field in ssecfs.config. The trailing arguments (source and mount point) are not read:
they are there for ps, and for tools that tell a mount's daemon by its command line.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..config import MountConfig
from ..errors import UserError
from .daemon import ParentPipe, run, setup_logging


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ssecfs.mount")
    p.add_argument("--config-fd", type=int, required=True)
    p.add_argument("--ready-fd", type=int, required=True)
    p.add_argument("serves", nargs="*", help="source and mount point (for ps; not read)")
    args = p.parse_args(argv)
    try:
        with os.fdopen(args.config_fd, "rb") as f:
            cfg = MountConfig.from_json(f.read())
        setup_logging(cfg.log_level, cfg.log_file)
    except UserError as e:
        return ParentPipe(args.ready_fd).refuse(e)
    return run(cfg, ready_fd=args.ready_fd)


if __name__ == "__main__":
    sys.exit(main())
