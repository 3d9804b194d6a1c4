"""`specdb report`: the study on one offline page (and as Markdown), from the verbs' own answers."""

import ast
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from contract.vocabulary import STRATA
from spectraldb import store
from tests.conftest import plant_widths, planting

runner = CliRunner()
MULTS = (1, 2, 4, 8)
HOSTILE = "<img src=x onerror=alert(1)>"
STRATA_FACTORS = {"all": 1.0, "head": 0.5, "mid": 0.7, "tail": 0.9}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """AdamW (β 1), Muon (β 0.5 at 4 heads, 0.6 at 8), Dion at two rank fractions, an AdamW arm with
    a hostile label, and a diverged run: every section has something to show."""
    db = tmp_path_factory.mktemp("report") / "s.duckdb"
    with planting(db) as plant:
        for m in MULTS:
            for heads in (4, 8):
                plant(optimizer="adamw", mult=m, n_head=heads, strata=STRATA_FACTORS, rank_of=lambda D, s, l: D / 4)
                plant(optimizer="muon", mult=m, n_head=heads, strata=STRATA_FACTORS,
                      rank_of=lambda D, s, l, h=heads: 2 * D ** (0.5 if h == 4 else 0.6))
            for fraction in (0.5, 0.0625):
                plant(optimizer={"name": "dion", "rank_fraction": fraction}, mult=m, strata=STRATA_FACTORS,
                      rank_of=lambda D, s, l, f=fraction: D ** (0.4 + f))
            plant(optimizer={"name": "adamw", "label": HOSTILE, "lr": 1e-3}, mult=m, rank_of=lambda D, s, l: D / 5)
        plant(optimizer="muon", mult=2, n_head=8, seed=1, status="diverged", rank_of=lambda D, s, l: D / 4)
    return db


class Tables(HTMLParser):
    """Each <table id=…>: its header and, per row, (shown text, data-value) of every cell."""

    def __init__(self, text):
        super().__init__()
        self.tables, self.current, self.cell = {}, None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.current = self.tables.setdefault(attrs["id"], {"header": [], "rows": []})
        elif tag == "tr" and self.current is not None:
            self.current["rows"].append([])
        elif tag in ("td", "th") and self.current is not None:
            self.cell = [tag, "", attrs.get("data-value")]

    def handle_data(self, data):
        if self.cell is not None:
            self.cell[1] += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            kind, text, value = self.cell
            if kind == "th":
                self.current["header"].append(text)
            else:
                self.current["rows"][-1].append((text, value))
            self.cell = None
        elif tag == "table":
            self.current["rows"] = [r for r in self.current["rows"] if r]
            self.current = None


def markdown_tables(text: str) -> dict:
    """name → (header, rows of cell text) of every table in report.md (named by its CSV)."""
    out, lines = {}, text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("**") and "(`tables/" in line:
            name = line.split("(`tables/")[1].split(".csv")[0]
            header = split_row(lines[i + 2])
            rows, j = [], i + 4
            while j < len(lines) and lines[j].startswith("|"):
                rows.append(split_row(lines[j]))
                j += 1
            out[name] = (header, rows)
    return out


def split_row(line: str) -> list[str]:
    cells, cur, escaped = [], "", False
    for ch in line.strip()[1:-1]:
        if escaped:
            cur += ch
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "|":
            cells.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return cells + [cur.strip()]


@pytest.fixture(scope="module")
def page(study, tmp_path_factory):
    out = tmp_path_factory.mktemp("page") / "report.html"
    result = runner.invoke(app, ["report", "-o", str(out), "--db", str(study)])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.stderr
    return out


@pytest.mark.slow
def test_the_beta_table_equals_query_beta_value_by_value(page, study):
    """The page says which runs its β table holds (the baseline architecture: n_head 4, the most
    common) and which command gives the same numbers; that command's rows equal the table's."""
    import html
    import re

    text = page.read_text()
    tables = Tables(text)
    where = re.search(r'--where "([^"]+)"', html.unescape(text)).group(1)
    assert where == "n_head = 4"
    for stratum in STRATA:
        got = tables.tables[f"beta_{stratum}"]
        q = runner.invoke(app, ["query", "beta", "--stratum", stratum, "--db", str(study), "--format", "json",
                                "--where", where])
        expect = json.loads(q.stdout)
        assert len(got["rows"]) == len(expect) >= 3  # the hostile arm measured `all` only
        assert set(got["header"]) == {k for row in expect for k in row}
        for row, want in zip(got["rows"], expect):
            cells = dict(zip(got["header"], row))
            for column, number in want.items():
                assert stored(cells[column][1]) == number, (stratum, column)


def stored(value: str):
    """A cell's data-value (Python's repr of what the verb returned) as the value."""
    if value in ("None", "True", "False") or value[0] in "'\"":
        return ast.literal_eval(value)
    return float(value)


@pytest.mark.slow
def test_the_page_opens_offline_in_a_browser_without_errors(page, tmp_path, browser):
    """file://, no server, no network: every figure decodes, nothing logs an error, the hostile
    label is text."""
    from selenium.webdriver.common.by import By

    browser.get(page.as_uri())
    assert len(browser.find_elements(By.TAG_NAME, "h2")) == 9
    images = browser.find_elements(By.TAG_NAME, "img")
    assert len(images) >= 4 and all(browser.execute_script("return arguments[0].naturalWidth", i) > 100
                                    for i in images)
    assert HOSTILE in browser.find_element(By.TAG_NAME, "body").text
    assert browser.execute_script("return document.querySelectorAll('img[src=x]').length") == 0
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
    shot = tmp_path / "report.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 20_000


@pytest.mark.slow
def test_the_markdown_tables_equal_the_pages(page, study, tmp_path):
    folder = tmp_path / "md"
    result = runner.invoke(app, ["report", "-o", str(folder), "--db", str(study)])
    assert result.exit_code == 0, result.output
    md = markdown_tables((folder / "report.md").read_text())
    html = Tables(page.read_text()).tables
    assert set(md) == set(html) and len(md) >= 12
    for name, (header, rows) in md.items():
        assert header == html[name]["header"]
        assert rows == [[text for text, _ in row] for row in html[name]["rows"]], name
        assert (folder / "tables" / f"{name}.csv").read_text().splitlines()[0].split(",") == header
    assert {p.name for p in (folder / "figures").iterdir()} == {"scaling.png", "dynamics.png", "renyi.png",
                                                                 "depth.png", "trajectories.png"}


@pytest.mark.slow
def test_every_section_shows_what_this_store_holds(page):
    text = page.read_text()
    assert "Not in this store" not in text.split("Matched loss")[0]  # the β section is whole
    tables = Tables(text).tables
    assert {"delta_n_head", "trainability", "rank_fraction_tail", "renyi", "depth", "dynamics",
            "trajectories"} <= set(tables)
    assert [t for t, _ in tables["rank_fraction_tail"]["rows"][0][:1]][0].startswith("Dion")
    rows = tables["trainability"]["rows"]
    header = tables["trainability"]["header"]
    diverged = [dict(zip(header, (t for t, _ in r))) for r in rows if dict(zip(header, (t for t, _ in r)))["diverged"] != "0"]
    assert diverged and diverged[0]["optimizer"] == "Muon" and diverged[0]["n_head"] == "8"


@pytest.mark.slow
def test_sections_the_store_lacks_say_what_would_produce_them(tmp_path):
    db = plant_widths(tmp_path / "w.duckdb")
    out = tmp_path / "r.html"
    result = runner.invoke(app, ["report", "-o", str(out), "--db", str(db)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert text.count("Not in this store") == 4 and "(4 need runs this store lacks)" in result.stderr
    for hint in ("rank_fraction", "examples/paper_160m_architecture_vs_optimizer.yaml", "paper_160m_postln.yaml",
                 "2× the steps"):
        assert hint in text
    # nothing varies but the width: the β table is plain `query beta`'s
    expect = json.loads(runner.invoke(app, ["query", "beta", "--db", str(db), "--format", "json"]).stdout)
    got = Tables(text).tables["beta_all"]
    assert "--where" not in text.split("Matched loss")[0]
    assert [{c: stored(v) for c, (_, v) in zip(got["header"], row)} for row in got["rows"]] == expect


@pytest.mark.parametrize("case", ["empty store", "where selects nothing", "missing folder", "bad where",
                                  "html is a folder"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(study, tmp_path, case):
    empty = tmp_path / "empty.duckdb"
    with store.connect(empty):  # a store with its schema and no runs
        pass
    out = tmp_path / "r.html"
    args = {"empty store": ["-o", str(out), "--db", str(empty)],
            "where selects nothing": ["-o", str(out), "--db", str(study), "--where", "steps = 7"],
            "missing folder": ["-o", str(tmp_path / "nope" / "r.html"), "--db", str(study)],
            "bad where": ["-o", str(out), "--db", str(study), "--where", "1) OR (1"],
            "html is a folder": ["-o", str(tmp_path), "--db", str(study)]}[case]
    if case == "html is a folder":
        (tmp_path / "x.html").mkdir()
        args[1] = str(tmp_path / "x.html")
    before = sorted(p.name for p in tmp_path.iterdir())
    result = runner.invoke(app, ["report", *args])
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    expected = {"empty store": "holds no runs", "where selects nothing": "selects none", "missing folder": "does not exist",
                "bad where": "--where", "html is a folder": "is a folder"}[case]
    assert expected in result.stderr


def test_trajectories_are_the_planted_ranks_at_every_step(study):
    """AdamW's planted hard rank is D/4 at every step (D = 32·ffn_mult), over its two runs per width
    (n_head 4 and 8); Muon at n_head 4 and 8 averages 2·D^0.5 and 2·D^0.6."""
    q = runner.invoke(app, ["query", "trajectories", "--db", str(study), "--format", "json"])
    assert q.exit_code == 0, q.output
    rows = json.loads(q.stdout)
    adamw = [r for r in rows if r["optimizer"] == "AdamW"]
    assert len(adamw) == len(MULTS) * 3 and all(r["runs"] == 2 for r in adamw)
    assert all(r["hard"] == pytest.approx(32 * r["ffn_mult"] / 4) for r in adamw)
    muon = [r for r in rows if r["optimizer"] == "Muon"]
    assert all(r["hard"] == pytest.approx((2 * (32 * r["ffn_mult"]) ** 0.5 + 2 * (32 * r["ffn_mult"]) ** 0.6) / 2)
               for r in muon)
    assert [r["step"] for r in adamw[:3]] == [100, 200, 300]


@pytest.mark.slow
def test_the_default_sweeps_report_opens_offline(tmp_path, browser):
    """The shipped experiments.yaml, shortened to 20 steps, trained for real into a store; its
    report opens from file:// with no console error, its β table is `query beta`'s, and a
    screenshot is taken."""
    from selenium.webdriver.common.by import By

    root = Path(__file__).resolve().parents[1]
    db, out = tmp_path / "default.duckdb", tmp_path / "report.html"
    ran = runner.invoke(app, ["run", str(root / "experiments.yaml"), "-S", "train.steps=20", "-S", "measure.every=10",
                              "--executor", "inline", "--db", str(db)])
    assert ran.exit_code == 0, ran.output
    assert runner.invoke(app, ["report", "-o", str(out), "--db", str(db)]).exit_code == 0
    browser.get(out.as_uri())
    assert len(browser.find_elements(By.TAG_NAME, "h2")) == 9
    assert all(browser.execute_script("return arguments[0].naturalWidth", i) > 100
               for i in browser.find_elements(By.TAG_NAME, "img"))
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
    browser.save_screenshot(str(tmp_path / "default_report.png"))
    assert (tmp_path / "default_report.png").stat().st_size > 20_000
    got = Tables(out.read_text()).tables["beta_tail"]
    expect = json.loads(runner.invoke(app, ["query", "beta", "--stratum", "tail", "--db", str(db),
                                            "--format", "json"]).stdout)
    assert [{c: stored(v) for c, (_, v) in zip(got["header"], row)} for row in got["rows"]] == expect
    assert [r["optimizer"] for r in expect] == ["AdamW", "Muon"]
