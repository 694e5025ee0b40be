#!/usr/bin/env python
"""Reprint the outputs shown in README.md and docs/*.md on this machine.

    python tools/regen_docs.py                  # every file
    python tools/regen_docs.py docs/guide.md    # one file

An output is a ```text block right after a line ``<!-- output of the block above -->``
(or ``<!-- output of the block above, first N lines -->``, which keeps N lines and adds
``[...]``). This runs the file's code blocks as tests/test_docs.py does (one thread, a
temporary folder per block chain) and writes what the block above each output printed into it;
for a bash block, each command's output after a ``$ command`` line. A ``<sub>`` line after the
output says where it was printed. Only the outputs change; review them with ``git diff``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import re
import sys
import tempfile
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"  # as the docs test runs; set before torch is imported

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
_OUTPUT = re.compile(r"<!--\s*output of the block above(?:, first (\d+) lines)?\s*-->")


def _load_test_module():
    spec = importlib.util.spec_from_file_location("docs_blocks", ROOT / "tests" / "test_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["docs_blocks"] = module
    spec.loader.exec_module(module)
    return module


def machine_line() -> str:
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as stream:
            names = [line.split(":", 1)[1].strip() for line in stream if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return (f"<sub>Printed by <code>python tools/regen_docs.py</code> on a {os.cpu_count()}-core {cpu}, torch "
            f"{torch.__version__.split('+')[0]}, one thread; on another machine the numbers may differ "
            f"(<a href=\"{{budget}}#what-varies-between-machines\">what varies</a>).</sub>")


def regenerate(path: Path, docs, base: Path) -> int:
    lines = path.read_text(encoding="utf-8").splitlines()
    units = [unit for unit in docs.collect_units([path])]
    runner = docs.Runner(base)
    budget_link = "budget.md" if path.parent.name == "docs" else "docs/budget.md"
    caption = machine_line().replace("{budget}", budget_link)
    replaced, i, out = 0, 0, []
    while i < len(lines):
        match = _OUTPUT.fullmatch(lines[i].strip())
        if not match:
            out.append(lines[i])
            i += 1
            continue
        # The fence after the marker, and the block above it.
        fence = next(k for k in range(i + 1, len(lines)) if lines[k].strip())
        if lines[fence].strip() != "```text":
            raise SystemExit(f"{path}:{i + 1}: an output marker must be followed by a ```text block")
        end = next(k for k in range(fence + 1, len(lines)) if lines[k].rstrip() == "```")
        above = [unit for unit in units if unit.line < i + 1]
        if not above:
            raise SystemExit(f"{path}:{i + 1}: an output marker with no code block above it")
        block = [unit for unit in above if unit.line == above[-1].line]
        printed = []
        for unit in block:
            text = runner.run(unit).rstrip("\n")
            if unit.language == "bash":
                printed.append(f"$ {unit.code}")
            printed.extend(text.splitlines())
        if match.group(1):
            keep = int(match.group(1))
            printed = printed[:keep] + ["[...]"] if len(printed) > keep else printed
        out.extend([lines[i], "```text", *printed, "```"])
        i = end + 1
        if i < len(lines) and lines[i].startswith("<sub>Printed by"):
            i += 1
        out.append(caption)
        replaced += 1
        print(f"{path.relative_to(ROOT)}:{fence + 1}: {len(printed)} lines", file=sys.stderr)
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return replaced


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help="markdown files (default: README.md and docs/*.md)")
    args = parser.parse_args(argv)
    docs = _load_test_module()
    paths = [Path(name).resolve() for name in args.files] or docs.DOC_FILES
    with tempfile.TemporaryDirectory(prefix="regen-docs-") as base:
        total = sum(regenerate(path, docs, Path(base)) for path in paths)
    print(f"rewrote {total} outputs", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
