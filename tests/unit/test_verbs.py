"""Each question is declared once (spectraldb/verbs.py) and made into a CLI command, an HTTP
route, a notebook method, a figure where it has one, and a report section."""

import inspect

import pytest

from spectraldb import plots, report
from spectraldb.reader import Reader
from spectraldb.verbs import PLOTS, VERBS

pytestmark = pytest.mark.unit


def test_every_verb_is_a_cli_command_an_api_route_a_reader_method_and_a_report_section(tmp_path):
    from typer.main import get_command

    from cli.main import app
    from spectraldb.service import create_app

    query = get_command(app).commands["query"]
    routes = {r.path: r for r in create_app(tmp_path / "none.duckdb").routes}
    sections = {f.__name__ for f in report.SECTIONS}
    assert [v.name for v in VERBS] == ["beta", "dynamics", "trajectories", "depth", "matched", "delta", "renyi"]
    for verb in VERBS:
        options = [o.name for o in verb.options]
        command = query.commands[verb.name]
        assert [p.name for p in command.params] == options + ["db", "fmt"], verb.name
        assert command.help.startswith(verb.summary)
        route = routes[f"/api/{verb.name}"]
        assert [p.name for p in route.dependant.query_params] == options, verb.name
        method = getattr(Reader, verb.name)
        assert method.__doc__.startswith(verb.summary) and method.__name__ == verb.name
        assert verb.section in sections, verb.name
        assert verb.plot is None or callable(getattr(plots, verb.plot)), verb.name
        assert list(inspect.signature(verb.answer).parameters)[:2] == ["con", "sel"]
    assert set(PLOTS) == {"scaling", "dynamics", "trajectories", "depth", "renyi"}


def test_a_question_refuses_an_option_it_does_not_have_in_one_line(tmp_path):
    from spectraldb.errors import QueryError
    from spectraldb.verbs import BY_NAME

    with pytest.raises(QueryError, match=r"^dynamics: unknown option 'metric' \(expected one of: stratum, site, "):
        BY_NAME["dynamics"].ask(None, {"metric": "hard"})
