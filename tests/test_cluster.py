"""A node removed from a two-node Ray cluster mid-sweep: its runs complete on the other node."""

import json
import threading
import time

import duckdb
import pytest
from typer.testing import CliRunner

from cli.main import app
from tests.conftest import tiny_spec

pytestmark = pytest.mark.slow


def test_node_removed_mid_sweep(tmp_path, corpus):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    db = tmp_path / "c.duckdb"
    spec = tmp_path / "c.yaml"
    spec.write_text(tiny_spec(corpus, db, "sweep:\n  seed: [0, 1, 2, 3]\n", steps=1500).replace("every: 3", "every: 500"))
    out = {}
    thread = threading.Thread(target=lambda: out.update(r=CliRunner().invoke(app, ["run", str(spec), "--address",
                                                                               cluster.address])))
    try:
        thread.start()
        sidecar = tmp_path / "c.duckdb.progress.json"
        deadline = time.time() + 120
        while time.time() < deadline:  # wait until both nodes are training a run
            try:
                if len(json.loads(sidecar.read_text())["runs"]) >= 2:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        else:
            pytest.fail("two runs never trained at once")
        cluster.remove_node(worker)
        thread.join(600)
    finally:
        cluster.shutdown()
    result = out["r"]
    assert result.exit_code == 0, (result.output, result.exc_info)
    con = duckdb.connect(str(db), read_only=True)
    rows = con.execute("SELECT status, count(*) FROM runs GROUP BY 1").fetchall()
    evals = con.execute("SELECT count(*) FROM evals").fetchone()[0]
    con.close()
    assert rows == [("done", 4)] and evals == 4 * 4  # steps 1, 500, 1000, 1500 for each run, once
