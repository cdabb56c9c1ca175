"""The READMEs cannot go stale: every Python block of README.md runs as written (each in a fresh interpreter), every
command shown (code blocks and inline) names flags its script has, every link stays inside the repository
and points at a file that exists, and every test file or test a README names exists."""
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "benchmarks/README.md", "tests/README.md", "docs/math.md"]
# the scripts a README may show, and how to ask each for its options
SCRIPTS = {
    "relaxeq-train": [sys.executable, "-m", "relaxeq_fast.train", "--help"],
    "relaxeq-study": [sys.executable, "-m", "relaxeq_fast.study", "--help"],
    "relaxeq-bench": [sys.executable, "-c", "import sys; from relaxeq_fast.bench import main; sys.exit(main(['--help']))"],
    "relaxeq-doctor": [sys.executable, "-m", "relaxeq_fast.doctor", "--help"],
}


def _read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def _python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _commands(text):
    """Command lines of fenced bash blocks and 4-space-indented blocks (continuations joined), and inline
    `...` spans that start with a script name."""
    lines, out = [], []
    in_bash = in_other = False
    for line in text.splitlines():
        if line.startswith("```"):
            if in_bash or in_other:
                in_bash = in_other = False
            elif line.strip() in ("```bash", "```sh", "```"):
                in_bash = True
            else:
                in_other = True
            continue
        if in_bash or (not in_other and line.startswith("    ")):
            lines.append(line.strip())
    joined = []
    for line in lines:
        if joined and joined[-1].endswith("\\"):
            joined[-1] = joined[-1][:-1] + " " + line
        else:
            joined.append(line)
    for line in joined:
        out.append(line.split("#", 1)[0].strip() if " #" in line else line)
    out += re.findall(r"`((?:relaxeq-\w+|python benchmarks/bench_\w+\.py)[^`]*)`", text)
    return out


@pytest.fixture(scope="module")
def script_options():
    opts = {}
    for name, cmd in SCRIPTS.items():
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert proc.returncode == 0, (name, proc.stderr[-2000:])
        opts[name] = set(re.findall(r"(--[a-z][a-z0-9-]*)", proc.stdout))
    return opts


def _bench_options(script, cache={}):
    if script not in cache:
        proc = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)
        assert proc.returncode == 0, (script, proc.stderr[-2000:])
        cache[script] = set(re.findall(r"(--[a-z][a-z0-9-]*)", proc.stdout))
    return cache[script]


def _flags(tokens):
    return [t.split("=", 1)[0] for t in tokens if t.startswith("--") and len(t) > 2]


@pytest.mark.parametrize("doc", DOCS)
def test_every_command_shown_has_the_flags_shown(doc, script_options):
    checked = 0
    for command in _commands(_read(doc)):
        try:
            tokens = shlex.split(command.replace("<", "'<").replace(">", ">'"))
        except ValueError:
            tokens = command.split()
        if tokens and tokens[0] == "torchrun" and "relaxeq_fast.train" in tokens:
            tokens = ["relaxeq-train"] + tokens[tokens.index("relaxeq_fast.train") + 1:]
        if len(tokens) >= 2 and tokens[0] in ("python", "pytest") and re.fullmatch(r"benchmarks/bench_\w+\.py",
                                                                                   tokens[1]):
            if tokens[0] == "python":
                unknown = set(_flags(tokens[2:])) - _bench_options(tokens[1])
                assert not unknown, f"{doc}: `{command}` uses {sorted(unknown)}, which {tokens[1]} lacks"
                checked += 1
            continue
        if not tokens or tokens[0] not in SCRIPTS:
            continue
        own, train = tokens[1:], []
        if tokens[0] == "relaxeq-study" and "--" in own:  # relaxeq-study ... -- <relaxeq-train arguments>
            own, train = own[:own.index("--")], own[own.index("--") + 1:]
        unknown = set(_flags(own)) - script_options[tokens[0]]
        unknown |= set(_flags(train)) - script_options["relaxeq-train"]
        assert not unknown, f"{doc}: `{command}` uses {sorted(unknown)}, which {tokens[0]} does not have"
        checked += 1
    if doc in ("README.md", "benchmarks/README.md"):
        assert checked >= 5, f"{doc}: only {checked} commands found: the extraction broke"


@pytest.mark.parametrize("doc", DOCS)
def test_links_stay_in_the_repository_and_exist(doc):
    text = _read(doc)
    base = os.path.dirname(os.path.join(ROOT, doc))
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith("#"):
            continue
        assert "://" not in target and not target.startswith("/"), f"{doc} links outside the repository: {target}"
        path = os.path.normpath(os.path.join(base, target.split("#", 1)[0]))
        assert path.startswith(ROOT + os.sep), f"{doc} links outside the repository: {target}"
        assert os.path.exists(path), f"{doc} links to a missing file: {target}"


def _named_tests(text):
    """(file, test) for each `test_x.py::name` in ``text``; a bare `::name` continues the file named last."""
    refs, current = [], None
    for file, name in re.findall(r"`(?:tests/)?(test_\w+\.py)?::(\w+)", text):
        current = file or current
        refs.append((current, name))
    return refs


@pytest.mark.parametrize("doc", DOCS)
def test_tests_named_exist(doc):
    """A test file or `file::test` a README names must exist: a split or a rename would leave a dead pointer."""
    text = _read(doc)
    files = set(re.findall(r"`(?:tests/)?(test_\w+\.py)[`:]", text))
    missing = sorted(f for f in files if not os.path.exists(os.path.join(ROOT, "tests", f)))
    assert not missing, f"{doc} names test files that do not exist: {missing}"
    dead = [f"{f}::{t}" for f, t in _named_tests(text)
            if f is None or not re.search(rf"^(async )?def {t}\(", _read(os.path.join("tests", f)), re.M)]
    assert not dead, f"{doc} names tests that do not exist: {dead}"


def test_every_test_file_is_in_the_tests_readme():
    """tests/README.md's "What each file proves" has a row for every test file (a new or split file included)."""
    text = _read("tests/README.md")
    table = text[text.index("## What each file proves"):]
    listed = set(re.findall(r"`(test_\w+\.py)`", table[:table.index("\n## ", 1)]))
    files = {f for f in os.listdir(os.path.join(ROOT, "tests")) if re.fullmatch(r"test_\w+\.py", f)}
    assert files - listed == set(), f"tests/README.md's table lacks {sorted(files - listed)}"


BLOCKS = _python_blocks(_read("README.md"))


def test_the_readme_has_its_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs_as_written(index, tmp_path):
    block = BLOCKS[index]
    if "e3nn" in block:
        pytest.importorskip("e3nn", reason="this README block uses e3nn (pip install 'relaxeq_fast[e3nn]')")
    if "se3_transformer_pytorch" in block:
        pytest.importorskip("se3_transformer_pytorch",
                            reason="this README block uses se3-transformer-pytorch (pip install 'relaxeq_fast[se3t]')")
    if "escnn" in block:
        pytest.importorskip("escnn", reason="this README block uses escnn (bash scripts/install_escnn.sh)")
    proc = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, f"README.md python block {index + 1} failed:\n{block}\n{proc.stderr[-3000:]}"
