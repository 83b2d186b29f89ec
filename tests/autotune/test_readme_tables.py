"""Every README table that quotes a committed result is what ``python -m autotune report`` prints
from the committed file: each sits between ``<!-- python -m autotune report ARGS -->`` and
``<!-- end of report -->``, and is regenerated here, so a figure cannot drift from its JSON.

After re-measuring, ``PYTHONPATH=. python -m tests.autotune.test_readme_tables`` rewrites the blocks.
"""
import contextlib
import io
import re
import shlex

import pytest

from autotune import cli
from tests.conftest import REPO

README = REPO / "README.md"
BLOCK = re.compile(r"(<!-- (python -m autotune report [^\n]*?) -->\n)(.*?)(<!-- end of report -->)", re.DOTALL)


def regenerate(command: str) -> str:
    """What ``command`` (``python -m autotune report ...``, run from the repository root) prints."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli.main(shlex.split(command)[3:])
    assert status == 0, f"`{command}` failed"
    return out.getvalue().strip() + "\n"


def refresh(text: str) -> str:
    """``text`` with every report block replaced by what its command prints now."""
    return BLOCK.sub(lambda m: m.group(1) + regenerate(m.group(2)) + m.group(4), text)


def _blocks() -> list[tuple[str, str]]:
    return [(m.group(2), m.group(3)) for m in BLOCK.finditer(README.read_text())]


def test_the_readme_mcu_table_is_a_report_block():
    assert any("benchmarks/results/mcu.json" in command and "mcu:summary" in command for command, _ in _blocks())


@pytest.mark.parametrize("command, block", _blocks(), ids=[c for c, _ in _blocks()])
def test_readme_table_is_what_report_prints(command, block, monkeypatch):
    monkeypatch.chdir(REPO)
    assert block == regenerate(command), (
        f"README.md no longer holds what `{command}` prints: run `PYTHONPATH=. python -m "
        "tests.autotune.test_readme_tables` to rewrite the block, and check the change")


def test_a_block_whose_figures_drift_from_its_file_is_caught(monkeypatch):
    monkeypatch.chdir(REPO)
    command, block = next(b for b in _blocks() if "mcu.json" in b[0])
    drifted = block.replace("| 0.521 |", "| 0.520 |")
    assert drifted != block and drifted != regenerate(command)
    text = f"<!-- {command} -->\n{drifted}<!-- end of report -->\n"
    assert refresh(text) == f"<!-- {command} -->\n{block}<!-- end of report -->\n"


def test_a_block_of_llama_rows_is_regenerated(tmp_path, monkeypatch):
    """The blocks work for the LLaMA benchmark's rows too (a synthetic document: the table, not a speed)."""
    from autotune import results
    from tests.autotune.test_report import synthetic_llama_document

    monkeypatch.chdir(tmp_path)
    results.save_json(tmp_path / "llama_cpu.json", synthetic_llama_document())
    command = "python -m autotune report llama_cpu.json --table llama:decode --columns contender,4,5,6"
    text = f"Decode:\n\n<!-- {command} -->\nstale\n<!-- end of report -->\n"
    fresh = refresh(text)
    assert fresh.startswith(f"Decode:\n\n<!-- {command} -->\n### llama: decode\n") and "stale" not in fresh
    assert "| cpu | " in fresh and "| cpu-q8 | " in fresh and "prefill" not in fresh
    assert refresh(fresh) == fresh


if __name__ == "__main__":
    import os

    os.chdir(REPO)
    README.write_text(refresh(README.read_text()))
    print(f"rewrote the report blocks of {README}")
