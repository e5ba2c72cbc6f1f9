"""The README is the front door and docs/ the manual: the tables generated from the code match
it, every relative link resolves, the README keeps the two commands CI and the Makefile rely on,
and every benchmark has its page."""

import importlib.util
import re
import shutil
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
README_MAX_LINES = 150  # issue #26: a front door, not a manual


@pytest.fixture(scope="module")
def gen_docs():
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_tables_match_the_code(gen_docs):
    assert gen_docs.stale() == [], "run `python scripts/gen_docs.py` and commit the docs"
    # what the blocks hold comes from the registries, not from a copy
    from sweep.launch import build_parser
    from sweep.results.figures import FIGURES
    from sweep.techniques import TECHNIQUES

    recipes = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
    sweep_page = (ROOT / "docs" / "sweep.md").read_text(encoding="utf-8")
    builtin = [c for c in TECHNIQUES.values() if c.__module__.startswith("sweep.techniques.")]
    assert all(f"| `{name}` |" in recipes for c in builtin for name in c.PARAMS)
    assert all(f"| `{c.__module__.rsplit('.', 1)[1]}` |" in recipes for c in builtin)
    assert all(f"| `{f.name}` |" in recipes for f in FIGURES)
    flags = [a.option_strings[0] for a in build_parser()._actions
             if a.option_strings and a.option_strings[0] != "-h"]
    assert len(flags) > 20 and all(f"| `{flag}`" in sweep_page for flag in flags)


def test_check_names_the_stale_page_and_rewriting_fixes_it(gen_docs, tmp_path, capsys):
    for page in {page for page, _ in gen_docs.BLOCKS.values()}:
        (tmp_path / page).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / page, tmp_path / page)
    sweep_page = tmp_path / "docs" / "sweep.md"
    text = sweep_page.read_text(encoding="utf-8")
    assert "| `--space` | `quick` |" in text
    sweep_page.write_text(text.replace("| `--space` | `quick` |", "| `--space` | `full` |"))
    assert gen_docs.main(["--check", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "docs/sweep.md is stale" in err and "docs/recipes.md" not in err
    assert gen_docs.main(["--root", str(tmp_path)]) == 0
    assert sweep_page.read_text(encoding="utf-8") == text
    assert gen_docs.main(["--check", "--root", str(tmp_path)]) == 0

    recipes = tmp_path / "docs" / "recipes.md"
    recipes.write_text(recipes.read_text(encoding="utf-8").replace(
        gen_docs.BEGIN.format("figures"), "<!-- figures -->"))
    assert gen_docs.main(["--check", "--root", str(tmp_path)]) == 2
    assert "docs/recipes.md must hold the block `figures` once" in capsys.readouterr().err


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, code marks and punctuation dropped, spaces
    to hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", _prose(page.read_text(encoding="utf-8")), re.M):
        slug = _slug(heading)
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def _prose(text: str) -> str:
    """The text without fenced code blocks (their `#` lines are comments, not headings)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _links(page: Path) -> list[str]:
    prose = re.sub(r"`[^`\n]*`", "", _prose(page.read_text(encoding="utf-8")))
    return re.findall(r"\]\(([^)\s]+)\)", prose)


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for link in _links(page):
            if re.match(r"[a-z]+:", link):  # http:, https:, mailto:
                continue
            path, _, anchor = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}: ({link})"
            if not target.exists():
                broken.append(f"{where} names no file")
            elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
                broken.append(f"{where}: {target.name} has no heading #{anchor}")
    assert not broken, "broken links:\n" + "\n".join(broken)
    assert len([link for page in PAGES for link in _links(page)]) > 50  # the check saw them


def test_readme_opens_with_the_two_commands_ci_and_the_makefile_run():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("# HYPER")
    assert lines[2] == "```bash" and lines[5] == "```"
    commands = [line.split("#")[0].split() for line in lines[3:5]]
    assert commands == [["make", "sweep"], ["make", "test"]]
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert all(re.search(rf"^{target}:", makefile, re.M) for _, target in commands)
    assert re.search(r"^make test$", (ROOT / ".ci" / "run").read_text(), re.M)  # CI runs it
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines: move to docs/"
    linked = set(_links(README))
    assert {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")
            if p.name != "CONTRACTS.md"} <= linked  # every manual page is reachable


def test_every_benchmark_has_a_page():
    """Each runnable bench/ module has docs/benchmarks/<name>.md naming its command, listed in
    the benchmarks' index (gpu_prepare shares gpu's page)."""
    pages = {"gpu_prepare": "gpu"}
    index = (ROOT / "docs" / "benchmarks" / "README.md").read_text(encoding="utf-8")
    runnable = [p.stem for p in sorted((ROOT / "bench").glob("*.py"))
                if '__name__ == "__main__"' in p.read_text(encoding="utf-8")]
    assert "recipes" in runnable and "search_full" in runnable
    for stem in runnable:
        page = ROOT / "docs" / "benchmarks" / f"{pages.get(stem, stem)}.md"
        assert page.is_file(), f"bench/{stem}.py has no page {page.relative_to(ROOT)}"
        assert f"bench.{stem}" in page.read_text(encoding="utf-8")
        assert f"({page.name})" in index
