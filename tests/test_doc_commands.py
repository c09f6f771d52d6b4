"""Every command the docs show still works: README.md and docs/*.md cannot drift from the code.

A fenced shell block (```bash, ```sh, ```shell, ```console) must carry a ``doc-test`` marker in its info string,
which says how its commands are exercised:

* ``doc-test run``: each command runs here (cheap ones: ``--help``, the memory estimator) and must exit 0;
* ``doc-test dry-run``: each command runs with ``--dry-run`` appended (the server launchers print what they would
  start) and must exit 0;
* ``doc-test covered-by=PATH``: too expensive or needing what CI lacks (GPUs, servers, weights); PATH (a test or a
  CI file) must exist and name the command's script or module, i.e. a named test or CI runs it.

Whatever the mode, each command is also checked statically: its script, module or Python file exists, every
``--flag`` it passes is one its real parser lists in its ``--help`` (for ``scripts/train.sh``: the script's own
``--help``, which prints the trainer's flags), and every ``VAR=value`` / ``export VAR`` names a variable the code
reads. Outside fences, every ``python -m deepgen_rl.<module>`` and every repository path the pages cite
(``scripts/...``, ``deepgen_rl/...``, ``tests/...``, ``benchmarks/...``, ``assets/...``) must exist.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^(\s*)(```|~~~)\s*([\w-]*)\s*(.*?)\s*$")
ENV_ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
PYTHON_MODULE = re.compile(r"python3? -m (deepgen_rl(?:\.\w+)+)")
# Repository paths cited in prose or code spans; $VAR and <placeholder> paths are not ours to check.
REPO_PATH = re.compile(r"(?<![\w./$<-])((?:scripts|deepgen_rl|tests|benchmarks|assets|docs)/[\w./-]*[\w/])")
RUN_TIMEOUT_S = 600


@dataclass(frozen=True)
class Block:
    """One fenced shell block: where it is, its mode (run, dry-run, covered-by), the covering file and commands."""

    where: str
    mode: str
    covered_by: str | None
    commands: tuple[str, ...]


def doc_pages(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def shell_blocks(page: Path, root: Path) -> tuple[list[Block], list[str]]:
    """The page's shell blocks and 'file:line: problem' for each block without a valid doc-test marker."""
    blocks, problems = [], []
    lines = page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        start, language, info = i + 1, match.group(3), match.group(4)
        i += 1
        body = []
        while i < len(lines) and not FENCE.match(lines[i]):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        if language not in SHELL_LANGUAGES:
            continue
        where = f"{page.relative_to(root)}:{start}"
        words = info.split()
        if not words or words[0] != "doc-test":
            problems.append(f"{where}: shell block without a doc-test marker (```{language} doc-test run|dry-run|"
                            "covered-by=PATH)")
            continue
        options = words[1:]
        if options in (["run"], ["dry-run"]):
            mode, covered_by = options[0], None
        elif len(options) == 1 and options[0].startswith("covered-by="):
            mode, covered_by = "covered-by", options[0].split("=", 1)[1]
        else:
            problems.append(f"{where}: doc-test marker needs one of run, dry-run, covered-by=PATH; got {info!r}")
            continue
        blocks.append(Block(where, mode, covered_by, tuple(join_continuations(body))))
    return blocks, problems


def join_continuations(body: list[str]) -> list[str]:
    """Command lines of a block: comments and blank lines dropped, backslash continuations joined."""
    commands, pending = [], ""
    for line in body:
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        commands.append(pending + stripped)
        pending = ""
    return commands


@dataclass(frozen=True)
class Command:
    env: tuple[str, ...]  # names assigned before the command (VAR=value) or exported
    kind: str  # "script" (bash scripts/x.sh), "module" (python -m x), "file" (python path.py), "export"
    target: str
    flags: tuple[str, ...]


def parse_command(line: str) -> Command:
    """What a documented command runs; ValueError for a shape this checker does not know (so it cannot pass
    unchecked)."""
    words = shlex.split(line, comments=True)
    env = []
    while words and ENV_ASSIGNMENT.match(words[0]):
        env.append(ENV_ASSIGNMENT.match(words.pop(0)).group(1))
    if not words:
        raise ValueError("no command")
    if words[0] == "export":
        names = [ENV_ASSIGNMENT.match(w).group(1) for w in words[1:] if ENV_ASSIGNMENT.match(w)]
        if not names:
            raise ValueError("export without VAR=value")
        return Command(tuple(env + names), "export", "", ())
    if any(w in ("|", "&&", "||", ";") for w in words):
        raise ValueError("pipelines and command lists are not checked: one command per line")
    if words[0] == "bash" and len(words) >= 2 and words[1].endswith(".sh"):
        kind, target, rest = "script", words[1], words[2:]
    elif words[0] in ("python", "python3") and len(words) >= 3 and words[1] == "-m":
        kind, target, rest = "module", words[2], words[3:]
    elif words[0] in ("python", "python3") and len(words) >= 2 and words[1].endswith(".py"):
        kind, target, rest = "file", words[1], words[2:]
    else:
        raise ValueError(f"unknown command shape {words[0]!r} (expected bash scripts/x.sh, python -m module, "
                         "python file.py or export VAR=value)")
    flags = tuple(w.split("=", 1)[0] for w in rest if w.startswith("--"))
    return Command(tuple(env), kind, target, flags)


# The help that lists a launcher's flags: train.sh prints its variables then the trainer's flags; the reward
# launchers pass their flags on to the server module.
SCRIPT_HELP = {
    "scripts/train.sh": ("bash", "scripts/train.sh", "--help"),
    "scripts/reward_ocr.sh": ("{python}", "-m", "deepgen_rl.rewards.servers.ocr", "--help"),
    "scripts/reward_server.sh": ("{python}", "-m", "deepgen_rl.rewards.servers.serve", "--help"),
}


def _environment() -> dict[str, str]:
    """The environment documented commands run in: this interpreter first on PATH (``python`` is the venv's)."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PYTHON": sys.executable, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


@functools.lru_cache(maxsize=None)
def _run(argv: tuple[str, ...], root: str) -> subprocess.CompletedProcess:
    """One run of ``argv`` in ``root``, shared by every check that needs it (a --help both listed and run)."""
    return subprocess.run(argv, cwd=root, env=_environment(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def help_text(argv: tuple[str, ...], root: str) -> str:
    argv = tuple(sys.executable if a == "{python}" else a for a in argv)
    if argv[1:2] == ("-m",):  # a module's help does not depend on the folder: one call for every tree
        root = str(REPO_ROOT)
    result = _run(argv, root)
    assert result.returncode == 0, f"{' '.join(argv)} failed (exit {result.returncode}):\n{result.stderr[-2000:]}"
    return result.stdout + result.stderr


def reads_variable(name: str, root: Path) -> bool:
    """Whether the code (scripts/ or deepgen_rl/) mentions the environment variable ``name``."""
    pattern = re.compile(rf"(?<![\w]){re.escape(name)}(?![\w])")
    for folder in ("scripts", "deepgen_rl"):
        for path in (root / folder).rglob("*"):
            if path.suffix in (".sh", ".py") and pattern.search(path.read_text(encoding="utf-8", errors="replace")):
                return True
    return False


# Variables the docs may set that libraries read, not our code (name: reader).
SYSTEM_VARIABLES = {"CUDA_VISIBLE_DEVICES": "CUDA", "OMP_NUM_THREADS": "OpenMP", "PATH": "the shell",
                    "WANDB_API_KEY": "wandb"}


def static_problems(command: Command, root: Path) -> list[str]:
    """Why the command cannot be what the docs say: a missing script/module/file, a flag its parser does not
    list, a variable nothing reads."""
    problems = [f"variable {name} is read by nothing in scripts/ or deepgen_rl/" for name in command.env
                if name not in SYSTEM_VARIABLES and not reads_variable(name, root)]
    if command.kind == "export":
        return problems
    if command.kind == "module":
        if importlib.util.find_spec(command.target.split(".")[0]) is None or _missing_module(command.target):
            return problems + [f"no module {command.target}"]
        help_argv = ("{python}", "-m", command.target, "--help")
    else:
        if not (root / command.target).is_file():
            return problems + [f"no file {command.target}"]
        help_argv = (SCRIPT_HELP.get(command.target) if command.kind == "script"
                     else ("{python}", command.target, "--help"))
    if command.flags:
        listed = help_text(help_argv, str(root)) if help_argv else (root / command.target).read_text()
        problems += [f"{command.target} lists no flag {flag}" for flag in command.flags
                     if flag != "--dry-run" and not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", listed)]
    return problems


def _missing_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except ModuleNotFoundError:
        return True


def coverage_problems(block: Block, commands: list[Command], root: Path) -> list[str]:
    """A covered-by block: the named file exists and names each command's script or module."""
    path = root / block.covered_by
    if not path.is_file():
        return [f"covered-by={block.covered_by}: no such file"]
    text = path.read_text(encoding="utf-8")
    problems = []
    for command in commands:
        if command.kind == "export":
            continue
        names = {command.target, Path(command.target).name} if command.kind != "module" else {command.target}
        if not any(name in text for name in names):
            problems.append(f"covered-by={block.covered_by} does not name {command.target}")
    return problems


def check_pages(root: Path) -> tuple[list[str], list[tuple[str, str, str]]]:
    """(problems, runnable) for the pages under ``root``: every static problem named 'file:line: why', and the
    (where, mode, command line) of each command to run."""
    problems, runnable = [], []
    for page in doc_pages(root):
        if not page.is_file():
            continue
        blocks, marker_problems = shell_blocks(page, root)
        problems += marker_problems
        for block in blocks:
            commands = []
            for line in block.commands:
                try:
                    command = parse_command(line)
                except ValueError as error:
                    problems.append(f"{block.where}: {line!r}: {error}")
                    continue
                commands.append(command)
                problems += [f"{block.where}: {line!r}: {why}" for why in static_problems(command, root)]
                if block.mode in ("run", "dry-run"):
                    runnable.append((block.where, block.mode, line))
            if block.mode == "covered-by":
                problems += [f"{block.where}: {why}" for why in coverage_problems(block, commands, root)]
        problems += prose_problems(page, root)
    return problems, runnable


def prose_problems(page: Path, root: Path) -> list[str]:
    """Modules (python -m deepgen_rl.x) and repository paths a page names anywhere that do not exist."""
    problems = []
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        where = f"{page.relative_to(root)}:{number}"
        for module in PYTHON_MODULE.findall(line):
            if _missing_module(module):
                problems.append(f"{where}: no module {module}")
        for path in REPO_PATH.findall(line):
            if not (root / path).exists() and not any(ch in path for ch in "*{}"):
                problems.append(f"{where}: no path {path}")
    return problems


def run_documented(mode: str, line: str, root: Path) -> subprocess.CompletedProcess:
    command = line.split(" #", 1)[0].strip() + (" --dry-run" if mode == "dry-run" else "")
    words = shlex.split(command)
    if ENV_ASSIGNMENT.match(words[0]):  # VAR=value prefixes: let bash set them
        return subprocess.run(["bash", "-c", command], cwd=root, env=_environment(), capture_output=True,
                              text=True, timeout=RUN_TIMEOUT_S)
    return _run(tuple(words), str(root))


# ---- the repository's own pages -----------------------------------------------------------------------------


_CHECKED: dict[str, tuple[list[str], list[tuple[str, str, str]]]] = {}


def _checked_repo():
    if "repo" not in _CHECKED:
        _CHECKED["repo"] = check_pages(REPO_ROOT)
    return _CHECKED["repo"]


def test_every_documented_command_is_marked_and_exists():
    problems, _ = _checked_repo()
    assert not problems, "documented commands that do not match the code:\n" + "\n".join(problems)


def test_the_readme_shows_the_commands_a_newcomer_needs():
    blocks, _ = shell_blocks(REPO_ROOT / "README.md", REPO_ROOT)
    lines = [line for block in blocks for line in block.commands]
    for needed in ("bash scripts/setup_venv.sh", "bash scripts/quickstart.sh", "bash scripts/test.sh",
                   "bash scripts/train.sh"):
        assert any(line.startswith(needed) for line in lines), f"README.md shows no {needed}"
    assert len((REPO_ROOT / "README.md").read_text().splitlines()) <= 160  # a front door, the rest in docs/


def _runnable_ids():
    return [f"{where} {line.split(' #', 1)[0].strip()}" for where, _, line in check_pages_runnable_only()]


def check_pages_runnable_only():
    """The runnable commands, found without the static checks (parametrisation happens at collection)."""
    found = []
    for page in doc_pages(REPO_ROOT):
        if page.is_file():
            blocks, _ = shell_blocks(page, REPO_ROOT)
            found += [(b.where, b.mode, line) for b in blocks if b.mode in ("run", "dry-run") for line in b.commands]
    return found


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
@pytest.mark.parametrize("where, mode, line", check_pages_runnable_only(), ids=_runnable_ids())
def test_documented_command_runs(where, mode, line):
    result = run_documented(mode, line, REPO_ROOT)
    assert result.returncode == 0, (f"{where}: {line} exited {result.returncode}:\n{result.stdout[-2000:]}\n"
                                    f"{result.stderr[-2000:]}")


# ---- the checker on hand-made pages (it must be able to fail) ------------------------------------------------


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


def test_checker_names_each_drifted_command(tmp_path):
    fence = "```"
    # assembled so that this file does not cite a page that does not exist (tests/test_self_contained.py)
    PAGE = "docs" + "/page.md"
    root = _tree(tmp_path, {
        "scripts/go.sh": "#!/usr/bin/env bash\n# reads GO_SPEED and --fast\necho \"$GO_SPEED\"\n",
        "tests/test_go.py": "# runs scripts/go.sh\n",
        "tests/test_other.py": "# runs something else\n",
        "README.md": (f"# Page\n\n{fence}bash\nbash scripts/go.sh\n{fence}\n\n"
                      f"{fence}bash doc-test covered-by=tests/test_go.py\nGO_SPEED=2 bash scripts/go.sh --fast\n"
                      f"GO_SLOW=1 bash scripts/go.sh --slow\nbash scripts/gone.sh\n{fence}\n\n"
                      f"{fence}bash doc-test covered-by=tests/test_other.py\nbash scripts/go.sh\n{fence}\n\n"
                      f"{fence}bash doc-test covered-by=tests/test_missing.py\nbash scripts/go.sh\n{fence}\n\n"
                      f"{fence}bash doc-test sometimes\nbash scripts/go.sh\n{fence}\n\n"
                      f"{fence}python\nprint('not a shell block: not checked')\n{fence}\n"),
        PAGE: ("# Docs\n\nRun `python -m deepgen_rl.no_such_module` on `scripts/missing.sh`, "
                         "then `scripts/go.sh` and `$OUTPUT_DIR/checkpoint-40`.\n"
                         f"{fence}bash doc-test run\nls -l | wc -l\nmake all\n"
                         "python -m deepgen_rl.model.tiny --bogus_flag\n"
                         f"python -m deepgen_rl.model.tiny --output_dir x\n{fence}\n"),
    })
    problems, runnable = check_pages(root)
    assert problems == [
        "README.md:3: shell block without a doc-test marker (```bash doc-test run|dry-run|covered-by=PATH)",
        "README.md:21: doc-test marker needs one of run, dry-run, covered-by=PATH; got 'doc-test sometimes'",
        "README.md:7: 'GO_SLOW=1 bash scripts/go.sh --slow': variable GO_SLOW is read by nothing in scripts/ or "
        "deepgen_rl/",
        "README.md:7: 'GO_SLOW=1 bash scripts/go.sh --slow': scripts/go.sh lists no flag --slow",
        "README.md:7: 'bash scripts/gone.sh': no file scripts/gone.sh",
        "README.md:7: covered-by=tests/test_go.py does not name scripts/gone.sh",
        "README.md:13: covered-by=tests/test_other.py does not name scripts/go.sh",
        "README.md:17: covered-by=tests/test_missing.py: no such file",
        "README.md:10: no path scripts/gone.sh",
        "README.md:17: no path tests/test_missing.py",
        f"{PAGE}:4: 'ls -l | wc -l': pipelines and command lists are not checked: one command per line",
        f"{PAGE}:4: 'make all': unknown command shape 'make' (expected bash scripts/x.sh, python -m module, "
        "python file.py or export VAR=value)",
        f"{PAGE}:4: 'python -m deepgen_rl.model.tiny --bogus_flag': deepgen_rl.model.tiny lists no flag "
        "--bogus_flag",
        f"{PAGE}:3: no module deepgen_rl.no_such_module",
        f"{PAGE}:3: no path scripts/missing.sh",
    ]
    assert runnable == [(f"{PAGE}:4", "run", "python -m deepgen_rl.model.tiny --bogus_flag"),
                        (f"{PAGE}:4", "run", "python -m deepgen_rl.model.tiny --output_dir x")]


def test_a_failing_documented_command_is_reported(tmp_path):
    _tree(tmp_path, {"scripts/fail.sh": "echo 'dry' \"$@\"; [ \"$1\" = --dry-run ]\n"})
    assert run_documented("dry-run", "bash scripts/fail.sh  # a comment", tmp_path).returncode == 0
    assert run_documented("run", "bash scripts/fail.sh", tmp_path).returncode != 0


def test_continuations_and_comments():
    assert join_continuations(["# note", "", "bash scripts/train.sh \\", "    --max_steps 2  # two", "x"]) == [
        "bash scripts/train.sh --max_steps 2  # two", "x"]
    assert parse_command("NNODES=4 NGPUS=8 bash scripts/train.sh --max_steps=3 --seed 1  # why") == Command(
        ("NNODES", "NGPUS"), "script", "scripts/train.sh", ("--max_steps", "--seed"))
