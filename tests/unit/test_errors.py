"""One table turns every error into an exit code and an HTTP status; the CLI and the service say the same words."""

import duckdb
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from cli.main import app
from spectraldb import errors
from spectraldb.bounds import QueryTimeout
from spectraldb.errors import (InputError, MissingPackage, QueryError, RayStartError, SpecError, StoreError,
                               StoreLocked, StoreOutdated)
from spectraldb.service import create_app
from tests.conftest import plant_widths

runner = CliRunner()


@pytest.mark.parametrize("exc, code, status", [
    (SpecError("x"), 2, 400), (QueryError("x"), 2, 400), (QueryTimeout("x"), 2, 400), (InputError("x"), 2, 400),
    (StoreError("x"), 2, 503), (StoreLocked("x"), 2, 503), (StoreOutdated("x"), 2, 503),
    (MissingPackage("x"), 1, 501), (RayStartError("x"), 1, 503), (MemoryError(), 1, 400),
    (duckdb.ConversionException("Conversion Error: x"), 2, 400), (KeyError("bug"), 1, 500),
])
def test_the_table(exc, code, status):
    assert (errors.exit_code(exc), errors.http_status(exc)) == (code, status)


def test_messages_never_leak_a_bug_or_a_value():
    assert errors.message(KeyError("secret")) == "internal error (KeyError)"
    evaluated = duckdb.ConversionException("Conversion Error: Could not convert string 'secret' to INT32")
    assert "secret" not in errors.message(evaluated, where="CAST(corpus AS INTEGER) > 0")
    assert errors.message(evaluated, where="x").startswith("--where: query failed")
    assert "SPECDB_PROCESS_MEMORY_MB" in errors.message(MemoryError())


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("errors") / "e.duckdb"
    plant_widths(path)
    return path


@pytest.mark.parametrize("args, params", [
    (["query", "beta", "--stratum", "tial"], {"stratum": "tial"}),
    (["query", "beta", "--by", "colour"], {"by": "colour"}),
    (["query", "beta", "--where", "CAST(corpus AS INTEGER) > 0"], {"where": "CAST(corpus AS INTEGER) > 0"}),
    (["query", "beta", "--where", "seed IN (SELECT 1)"], {"where": "seed IN (SELECT 1)"}),
])
def test_the_cli_and_the_service_say_the_same_words(db, args, params):
    cli = runner.invoke(app, [*args, "--db", str(db)])
    with TestClient(create_app(db), base_url="http://localhost") as client:
        http = client.get("/api/beta", params=params)
    assert cli.exit_code == 2 and http.status_code == 400
    assert cli.stderr.strip() == http.json()["detail"]


def test_a_missing_store_is_2_and_503(tmp_path):
    cli = runner.invoke(app, ["query", "beta", "--db", str(tmp_path / "none.duckdb")])
    assert cli.exit_code == 2 and "no such store" in cli.stderr
    with TestClient(create_app(tmp_path / "none.duckdb"), base_url="http://localhost") as client:
        http = client.get("/api/beta")
    assert http.status_code == 503 and "no such store" in http.json()["detail"]
    assert str(tmp_path) not in http.text  # the path is scrubbed to its name
