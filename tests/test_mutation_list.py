"""tests/mutations.py stays applicable: every mutation's text occurs exactly once in a file that exists, the tests it
names exist, and tests/README.md's table records each with the same file and tests. A split or a move of the code
(or of the tests) would otherwise leave a mutation that only fails when someone runs it, or a table that points at
files that are gone. The mutations themselves run outside pytest (`python tests/mutations.py`)."""
import os
import re

import pytest

from mutations import MUTATIONS, ROOT


def _read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def _readme_rows():
    """mutation name -> (file, tests) from tests/README.md's tables of Python mutations."""
    rows = {}
    for name, path, tests in re.findall(r"^\| (\w+) \(.*?\) \| ([\w/.]+) \| (`.*?`) \| caught \|", _read("tests/README.md"),
                                        re.M):
        rows[name] = (path, tuple(re.findall(r"`([^`]+)`", tests)))
    return rows


@pytest.mark.parametrize("m", MUTATIONS, ids=[m.name for m in MUTATIONS])
def test_mutation_applies_once_and_names_existing_tests(m):
    assert os.path.exists(os.path.join(ROOT, m.path)), f"{m.name}: {m.path} does not exist"
    count = _read(m.path).count(m.old)
    assert count == 1, f"{m.name}: the text to replace occurs {count} times in {m.path}, expected once"
    for sel in m.tests:
        file, _, expr = sel.partition(" -k ")
        node_file, _, node = file.partition("::")
        assert os.path.exists(os.path.join(ROOT, node_file)), f"{m.name}: {node_file} does not exist"
        source = _read(node_file)
        names = re.findall(r"^(?:async )?def (test_\w+)\(", source, re.M)
        if node:
            assert node.split("[")[0] in names, f"{m.name}: no test {node} in {node_file}"
        words = [w for w in re.findall(r"\w+", expr) if w not in ("and", "or", "not")]
        for word in words:  # a -k word must name a test of that file, or a parameter of one (pytest's id "dtype0")
            param = re.sub(r"\d+$", "", word)
            assert any(word in n for n in names) or re.search(rf"\b{param}\b", source), \
                f"{m.name}: -k {expr!r} selects nothing in {node_file}"


def test_readme_table_records_every_mutation_with_its_file_and_tests():
    rows = _readme_rows()
    missing = [m.name for m in MUTATIONS if m.name not in rows]
    assert not missing, f"tests/README.md has no row for {missing}"
    stale = [f"{m.name}: README says {rows[m.name]}, mutations.py says {(m.path, m.tests)}"
             for m in MUTATIONS if rows[m.name] != (m.path, m.tests)]
    assert not stale, "tests/README.md's mutation table is stale:\n" + "\n".join(stale)
    unknown = sorted(set(rows) - {m.name for m in MUTATIONS})
    assert not unknown, f"tests/README.md records mutations tests/mutations.py does not have: {unknown}"
