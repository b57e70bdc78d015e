"""Check params files as complete recipes before a long run: every key known, typed, in range.

python -m stages.check_params configs/coco_r50_fpn_1x.yaml
"""

from __future__ import annotations

import argparse
import sys

from pipeline.config.errors import command, describe
from pipeline.config.params import load_params


@command
def main(argv: list[str]) -> int:
    """Check params files as complete recipes; print what is wrong, exit 1 if anything is."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="*", default=["params.yaml"], help="params files")
    failed = 0
    for path in parser.parse_args(argv).paths:
        try:
            load_params(path, complete=True)
        except (OSError, ValueError) as exc:  # report every file, not only the first bad one
            print(f"error: {describe(exc)}", file=sys.stderr)
            failed += 1
        else:
            print(f"{path}: ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
