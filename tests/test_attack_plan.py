"""`plan` tells the truth: every check `run` makes before training, `plan` makes too — the same
one line and exit 2 from both, nothing written, nothing trained."""

import os

import pytest
from typer.testing import CliRunner

from cli.main import app
from tests.conftest import tiny_spec

runner = CliRunner()


def _plan_and_run_case(tmp_path, corpus, case):
    """(spec text, store path) for one of PLAN_TELLS_THE_TRUTH's cases."""
    db = tmp_path / "never.duckdb"
    base = dict(corpus=corpus, extra="")
    if case == "dev-null":
        base["corpus"] = "/dev/null"
    elif case == "missing corpus":
        base["corpus"] = tmp_path / "nowhere"
    elif case == "fifo corpus":
        os.mkfifo(tmp_path / "fifo")
        base["corpus"] = tmp_path / "fifo"
    elif case == "short corpus":
        (tmp_path / "short").mkdir()
        for i in range(3):
            (tmp_path / "short" / f"d{i}.txt").write_text("few words")
        base["corpus"] = tmp_path / "short"
    elif case == "bin header under-counts":
        import numpy as np

        from workers.data import write_shard

        (tmp_path / "shards").mkdir()
        write_shard(tmp_path / "shards" / "a.bin", np.arange(5000) % 300)
        raw = bytearray((tmp_path / "shards" / "a.bin").read_bytes())
        raw[8:12] = (4000).to_bytes(4, "little", signed=True)
        (tmp_path / "shards" / "a.bin").write_bytes(bytes(raw))
        base["corpus"] = tmp_path / "shards"
    text = tiny_spec(base["corpus"], db)
    if case == "tokens above held-out":
        text = text.replace("tokens: 1024", "tokens: 100000000")
    elif case == "memory above the machine's":
        text = text.replace("n_layer: 2", "n_layer: 100000000")
    elif case == "cuda without a GPU":
        text = text.replace("device: cpu", "device: cuda")
    elif case == "unwritable checkpoint.dir":
        text += "checkpoint: {every: 2, dir: /proc/specdb-ckpt}\n"
    elif case == "missing store folder":
        db = tmp_path / "missing" / "s.duckdb"
    elif case in (":memory:", "file:x.duckdb", "md:remote"):
        db = case
    return text, db


PLAN_TELLS_THE_TRUTH = [
    ("dev-null", "not a regular file or folder"), ("missing corpus", "no such file or folder"),
    ("fifo corpus", "not a regular file or folder"), ("short corpus", "fewer than one window"),
    ("bin header under-counts", "header says 4000 tokens but the file holds 5000"),
    ("tokens above held-out", "measure.tokens"), ("memory above the machine's", "needs an estimated"),
    ("cuda without a GPU", "train.device: cuda"), ("unwritable checkpoint.dir", "checkpoint.dir"),
    ("missing store folder", "does not exist"), (":memory:", "not a store file name"),
    ("file:x.duckdb", "not a store file name"), ("md:remote", "not a store file name"),
]


@pytest.mark.parametrize("case, message", PLAN_TELLS_THE_TRUTH, ids=[c for c, _ in PLAN_TELLS_THE_TRUTH])
def test_plan_makes_every_check_run_makes_before_training(tmp_path, corpus, monkeypatch, case, message):
    """The same one line and exit 2 from `plan` and `run`, nothing written, nothing trained."""
    monkeypatch.chdir(tmp_path)
    if case == "cuda without a GPU":
        monkeypatch.setattr("spectraldb.run.preflight._local_gpus", lambda: 0)
    text, db = _plan_and_run_case(tmp_path, corpus, case)
    spec = tmp_path / "s.yaml"
    spec.write_text(text)
    said = []
    for verb in ("plan", "run"):
        result = runner.invoke(app, [verb, str(spec), "--db", str(db)] + (["--executor", "inline"] if verb == "run" else []))
        assert result.exit_code == 2, (verb, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (verb, result.stderr)
        said.append(lines[0])
    assert said[0] == said[1]
    assert not any(p.name.endswith((".duckdb", ".spool", ".lock")) for p in tmp_path.iterdir()), list(tmp_path.iterdir())
