"""Every code block of README.md and docs/*.md runs, as a reader would run it.

Conventions (docs/guide.md states them for readers):

* ```python blocks run in a fresh namespace, in a fresh temporary folder, one thread, from
  the default random seed of a new process. A block whose first line starts with
  ``# continues the block above`` runs in the namespace and folder of the block before it in
  the same file (of either language), after that block has run.
* ```bash blocks: each command (lines joined at ``\\``, split at ``&&``) is a test of its own,
  run with ``subprocess`` in the block's folder, where ``tools/`` links to the checkout's.
  Commands are matched against ``COMMAND_RULES``: ``python tools/...`` and ``mkdir -p out`` run;
  the commands ``SKIPPED_COMMANDS`` lists (installing, the whole suite) are not run here, for
  the reason it gives; any other command fails
  until a rule is added for it.
* ```text blocks are output (reports, error messages, excerpts) and do not run; a
  ``<!-- output of the block above -->`` line before one lets ``tools/regen_docs.py`` reprint it.
* A python block after ``<!-- docs-test: save as NAME, run with COMMAND -->`` is written to
  NAME in its folder and run with COMMAND (``torchrun`` runs as ``python -m torch.distributed.run``).

Each block (or command) is one test, named by its file and line: ``docs/guide.md:23``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = {"python", "bash", "text"}
CONTINUES = "# continues the block above"
COMMAND_TIMEOUT_S = 300

# Commands a bash block may show that this test does not run, and why. A command matches a
# rule if it starts with the rule's words.
SKIPPED_COMMANDS = {
    "pip install": "installs packages; the tests run in the environment it installed",
    "python -m pytest": "the whole test suite (about 13 minutes on 2 cores); .ci/run runs it",
}
# Commands that run: the first words, and how.
RUN_PREFIXES = ("python tools/", "mkdir -p out")

_FENCE = re.compile(r"^```(\S*)\s*$")
_SCRIPT = re.compile(r"<!--\s*docs-test:\s*save as (\S+), run with (.+?)\s*-->")


@dataclass
class Unit:
    """One thing to run: a python block, or one command of a bash block."""

    path: Path
    line: int                 # the line of the fence, 1-based
    language: str             # "python", "bash" or "script"
    code: str                 # the block's text, or the command
    index: int = 0            # the command's place in its bash block
    script: tuple[str, str] | None = None   # (file name, command) for a saved script
    chain: "Chain | None" = None
    previous: "Unit | None" = None          # the unit it runs after, in its chain

    @property
    def name(self) -> str:
        relative = self.path.relative_to(ROOT).as_posix()
        return f"{relative}:{self.line}" + (f"[{self.index + 1}]" if self.language == "bash" else "")


@dataclass
class Chain:
    """Blocks that continue each other share a namespace and a folder."""

    namespace: dict = field(default_factory=dict)
    folder: Path | None = None
    rng_state: torch.Tensor = field(default_factory=lambda: torch.Generator().get_state())


@dataclass(frozen=True)
class Fence:
    path: Path
    line: int
    language: str
    code: str
    directive: str            # the comment line right before the fence, or ""


def read_fences(path: Path) -> list[Fence]:
    """The fenced blocks of a markdown file, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    fences, i = [], 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        start = i
        j = i + 1
        while j < len(lines) and lines[j].rstrip() != "```":
            j += 1
        if j == len(lines):
            raise ValueError(f"{path}:{start + 1}: a fence is opened and never closed")
        before = next((lines[k].strip() for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        directive = before if before.startswith("<!--") else ""
        fences.append(Fence(path, start + 1, match.group(1), "\n".join(lines[start + 1:j]), directive))
        i = j + 1
    return fences


def split_commands(code: str) -> list[str]:
    """The commands of a bash block: comments dropped, ``\\`` lines joined, split at ``&&``."""
    joined, pending = [], ""
    for raw in code.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = re.sub(r"\s+#\s.*$", "", line)
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    return [part.strip() for line in joined for part in line.split("&&") if part.strip()]


def skip_reason(command: str) -> str | None:
    for prefix, reason in SKIPPED_COMMANDS.items():
        if command.startswith(prefix):
            return reason
    return None


def collect_units(paths=DOC_FILES, problems: list[str] | None = None) -> list[Unit]:
    """Every unit of every file, chained by ``# continues the block above``; what is wrong goes to ``problems``."""
    units, problems = [], [] if problems is None else problems
    for path in paths:
        last_block: list[Unit] = []
        for fence in read_fences(path):
            where = f"{path.relative_to(ROOT).as_posix()}:{fence.line}"
            if fence.language not in LANGUAGES:
                problems.append(f"{where}: label the fence ```python, ```bash or ```text (got "
                                f"{fence.language!r}); unlabelled code would not be tested")
                continue
            if fence.language == "text":
                continue
            continues = fence.code.lstrip().startswith(CONTINUES)
            if continues and not last_block:
                problems.append(f"{where}: '{CONTINUES}', but there is no block above it in this file")
                continues = False
            chain = last_block[-1].chain if continues else Chain()
            previous = last_block[-1] if continues else None
            block: list[Unit] = []
            script = _SCRIPT.match(fence.directive)
            if fence.language == "python":
                language = "script" if script else "python"
                block.append(Unit(path, fence.line, language, fence.code,
                                  script=script.groups() if script else None))
            else:
                for index, command in enumerate(split_commands(fence.code)):
                    block.append(Unit(path, fence.line, "bash", command, index=index))
            for unit in block:
                unit.chain, unit.previous = chain, previous
                previous = unit
            units.extend(block)
            last_block = block or last_block
    return units


def _subprocess_env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MPLBACKEND="Agg", PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return env


def _folder(chain: Chain, base: Path) -> Path:
    if chain.folder is None:
        chain.folder = Path(tempfile.mkdtemp(prefix="block-", dir=base))
        (chain.folder / "tools").symlink_to(ROOT / "tools", target_is_directory=True)
    return chain.folder


def _run_python(unit: Unit, folder: Path) -> str:
    # Line numbers in tracebacks are the markdown file's, and linecache reads the lines from it.
    code = compile("\n" * unit.line + unit.code, str(unit.path), "exec")
    namespace = unit.chain.namespace
    namespace.setdefault("__name__", "__main__")
    stdout = io.StringIO()
    saved_rng, saved_cwd, saved_threads = torch.get_rng_state(), os.getcwd(), torch.get_num_threads()
    saved_path = list(sys.path)
    sys.path.insert(0, str(ROOT))
    torch.set_rng_state(unit.chain.rng_state)
    torch.set_num_threads(1)
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(stdout):
            exec(code, namespace)
    finally:
        unit.chain.rng_state = torch.get_rng_state()
        os.chdir(saved_cwd)
        torch.set_rng_state(saved_rng)
        torch.set_num_threads(saved_threads)
        sys.path[:] = saved_path
    return stdout.getvalue()


# A gloo worker thread can abort the process at interpreter exit, after the script has finished: it drops
# the last reference to a finished allreduce whose captured thread-local state holds a Python object, and
# the decref needs the GIL while the interpreter is finalizing (backtrace: ProcessGroupGloo::runLoop ->
# ~AsyncAllreduceWork -> ~ThreadLocalState -> SafePyObject decref -> take_gil -> pthread_exit ->
# std::terminate; pytorch/pytorch PR 179291 describes it). Measured on the 2-core EPYC with the DDP block
# of docs/training.md: 4 of 20 runs without its dist.barrier(), 1 of 40 with it. A run that aborts so,
# after printing that every process finished, is run once more, with a warning.
GLOO_EXIT_ABORT = "terminate called without an active exception"


def _run_command(argv: list[str], folder: Path, name: str, finished_marker: str | None = None) -> str:
    if argv[0] == "python":
        argv = [sys.executable, *argv[1:]]
    elif argv[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    done = subprocess.run(argv, cwd=folder, env=_subprocess_env(), capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S)
    if (done.returncode != 0 and finished_marker and GLOO_EXIT_ABORT in done.stderr
            and done.stdout.count(finished_marker) >= 2):
        warnings.warn(f"{name}: a process aborted at exit after finishing (gloo's exit-time abort, see "
                      f"GLOO_EXIT_ABORT in tests/test_docs.py); running it once more")
        done = subprocess.run(argv, cwd=folder, env=_subprocess_env(), capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S)
    if done.returncode != 0:
        raise AssertionError(f"{name}: `{shlex.join(argv)}` exited with {done.returncode}\n"
                             f"--- stdout ---\n{done.stdout[-4000:]}\n--- stderr ---\n{done.stderr[-4000:]}")
    return done.stdout


def run_unit(unit: Unit, base: Path) -> str:
    """Run ``unit`` in its chain's folder; returns what it printed. Raises on failure."""
    folder = _folder(unit.chain, base)
    if unit.language == "python":
        return _run_python(unit, folder)
    if unit.language == "script":
        filename, command = unit.script
        (folder / filename).write_text(unit.code + "\n", encoding="utf-8")
        finished = "finished" if command.startswith("torchrun") else None
        return _run_command(shlex.split(command), folder, unit.name, finished_marker=finished)
    if skip_reason(unit.code):
        return ""
    if unit.code == "mkdir -p out":
        (folder / "out").mkdir(exist_ok=True)
        return ""
    if not unit.code.startswith(RUN_PREFIXES):
        raise AssertionError(f"{unit.name}: no rule for the command `{unit.code}`; run it (RUN_PREFIXES) or "
                             f"skip it with a reason (SKIPPED_COMMANDS) in tests/test_docs.py")
    return _run_command(shlex.split(unit.code), folder, unit.name)


class Runner:
    """Runs units once each, every unit after the one it continues."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.outcomes: dict[int, BaseException | str] = {}

    def run(self, unit: Unit) -> str:
        key = id(unit)
        if key not in self.outcomes:
            if unit.previous is not None:
                try:
                    self.run(unit.previous)
                except BaseException as error:  # noqa: BLE001 (reported as this block's failure)
                    self.outcomes[key] = RuntimeError(f"{unit.name} continues {unit.previous.name}, which "
                                                      f"failed: {type(error).__name__}: {error}")
                    raise self.outcomes[key] from None
            try:
                self.outcomes[key] = run_unit(unit, self.base)
            except BaseException as error:  # noqa: BLE001
                self.outcomes[key] = error
        outcome = self.outcomes[key]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


PROBLEMS: list[str] = []
UNITS = collect_units(problems=PROBLEMS)
NOT_RUN = [unit for unit in UNITS if unit.language == "bash" and skip_reason(unit.code)]
RUN = [unit for unit in UNITS if unit not in NOT_RUN]


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> Runner:
    return Runner(tmp_path_factory.mktemp("docs"))


@pytest.mark.parametrize("unit", RUN, ids=[unit.name for unit in RUN])
def test_block_runs(unit: Unit, runner: Runner) -> None:
    output = runner.run(unit)
    print(output)


def test_the_commands_not_run_here_are_the_set_up_commands() -> None:
    """Installing packages and the whole suite are not run by this test (``SKIPPED_COMMANDS`` says why); they are
    the README's two set-up commands, which ``.ci/run`` runs, and their parts."""
    assert NOT_RUN, "the README's set-up commands were not found"
    for unit in NOT_RUN:
        assert unit.code.startswith(tuple(SKIPPED_COMMANDS)), unit.name
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert 'pip install torch==2.14.1 torchvision==0.29.1 -e ".[test]" && python -m pytest -q' in ci


def test_fences_are_labelled_and_chained() -> None:
    assert not PROBLEMS, "\n".join(PROBLEMS)


def test_readme_is_the_front_door() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.encode()) <= 16 * 1024, f"README.md is {len(text.encode()):,} bytes; keep it under 16 KiB"
    first = read_fences(ROOT / "README.md")[0]
    assert first.code.splitlines() == [
        'pip install torch==2.14.1 torchvision==0.29.1 -e . && python tools/demo.py',
        'pip install torch==2.14.1 torchvision==0.29.1 -e ".[test]" && python -m pytest -q',
    ]


@pytest.mark.parametrize("path", DOC_FILES, ids=[path.relative_to(ROOT).as_posix() for path in DOC_FILES])
def test_relative_links_resolve(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            missing.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            missing.append(target)
    assert not missing, f"{path.name}: links to nothing: {missing}"


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    for heading in re.findall(r"^#+\s+(.+?)\s*$", text, flags=re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return anchors
