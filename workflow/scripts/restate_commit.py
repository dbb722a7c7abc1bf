#!/usr/bin/env python
"""Restate the commit in JSON records made from a copied working tree whose ``.git`` was stale.

A device machine received the working tree of commit C but its ``.git`` still named the previous
commit P, so ``e4srec.provenance.git_state`` recorded P with ``dirty: true`` (the tree differed from
P). This script sets ``git`` to ``{"commit": C, "dirty": false, "source": "restated: ..."}`` and keeps
what was recorded as ``git_recorded``; only records that say exactly P and dirty are changed, and C
must be a commit of this repository. Files are rewritten atomically.

    python workflow/scripts/restate_commit.py --recorded P --commit C --reason "..." FILE.json ...
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from e4srec.files import write_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recorded", required=True, help="the stale commit the records name")
    parser.add_argument("--commit", required=True, help="the commit whose tree actually ran")
    parser.add_argument("--reason", required=True, help="why, kept in the record")
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    if subprocess.run(["git", "cat-file", "-e", f"{args.commit}^{{commit}}"], capture_output=True).returncode:
        parser.error(f"{args.commit} is not a commit of this repository")
    changed = 0
    for path in args.files:
        record = json.loads(path.read_text())
        git = record.get("git") or {}
        if git.get("commit") != args.recorded or not git.get("dirty"):
            print(f"{path}: records {git}, not {args.recorded[:10]} dirty: left as it is", file=sys.stderr)
            continue
        record["git_recorded"] = git
        record["git"] = {"commit": args.commit, "dirty": False, "source": f"restated: {args.reason}"}
        write_json(path, record)
        changed += 1
    print(f"restated {changed} of {len(args.files)} records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
