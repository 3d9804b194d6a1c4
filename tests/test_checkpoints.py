"""`specdb measure`: saved checkpoints (tiny HF models saved here, with a tokenizer trained here)."""

import json

import duckdb
import pytest
from typer.testing import CliRunner

from cli.main import app

pytestmark = pytest.mark.slow  # builds, saves and loads HF models


def hf():
    """transformers, imported when a test runs (collecting this slow module must not import it)."""
    return pytest.importorskip("transformers")
runner = CliRunner()


def save_checkpoint(folder, corpus, n_inner, seed=0, n_embd=16):
    """A tiny GPT-2 and a word-level tokenizer of the test corpus, saved as an HF model folder."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    text = [p.read_text() for p in sorted(corpus.glob("*.txt"))]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(text, trainers.WordLevelTrainer(vocab_size=200, special_tokens=["[UNK]", "<eos>"]))
    fast = hf().PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<eos>")
    torch.manual_seed(seed)
    cfg = hf().GPT2Config(vocab_size=fast.vocab_size, n_positions=64, n_embd=n_embd, n_layer=2, n_head=2,
                                  n_inner=n_inner, eos_token_id=fast.eos_token_id, bos_token_id=fast.eos_token_id)
    hf().GPT2LMHeadModel(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def spec_text(store, corpus, entries):
    lines = [f"name: suite\nstore: {store}\ncorpus: {corpus}\n",
             "measure: {tokens: 2048, context: 32, min_stratum_tokens: 16}\ncheckpoints:\n"]
    lines += [f"  - {json.dumps(e)}\n" for e in entries]
    return "".join(lines)


def test_three_checkpoints_are_three_runs_and_a_corrupt_one_fails_alone(tmp_path, corpus):
    store = tmp_path / "c.duckdb"
    entries = []
    for i, n_inner in enumerate((32, 64, 128)):
        path = save_checkpoint(tmp_path / f"w{n_inner}", corpus, n_inner)
        entries.append({"path": str(path), "optimizer": "AdamW", "step": 1000 * (i + 1), "tokens_seen": 4096 * (i + 1),
                        "factors": {"suite": "tiny"}})
    broken = save_checkpoint(tmp_path / "broken", corpus, 64)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    entries.append({"path": str(broken), "optimizer": "AdamW", "step": 9000})
    entries.append({"path": str(tmp_path / "gone"), "optimizer": "AdamW", "step": 9500})
    spec = tmp_path / "c.yaml"
    spec.write_text(spec_text(store, corpus, entries))

    plan = runner.invoke(app, ["plan", str(spec), "--format", "json"])
    assert plan.exit_code == 0, plan.output
    assert [r["status"] for r in json.loads(plan.stdout)] == ["new"] * 5 and "5 checkpoints: 5 new" in plan.stderr

    result = runner.invoke(app, ["measure", str(spec), "--executor", "inline"])  # Ray: the suite test below
    assert result.exit_code == 3, result.output  # one failed
    assert "stored 5 checkpoints" in result.stderr and "3 done" in result.stderr and "2 failed" in result.stderr
    con = duckdb.connect(str(store), read_only=True)
    try:
        rows = con.execute("""SELECT status, source, steps, tokens_seen, ffn_width, d_model, gated, error
                              FROM runs ORDER BY steps""").fetchall()
        spectra = con.execute("SELECT count(DISTINCT run_id), min(n_tokens) FROM spectra WHERE stratum = 'all'").fetchone()
    finally:
        con.close()
    assert [r[:7] for r in rows[:3]] == [("done", "checkpoint", 1000 * (i + 1), 4096 * (i + 1), w, 16, False)
                                         for i, w in enumerate((32, 64, 128))]
    for (status, _, steps, _, width, _, _, error), step in zip(rows[3:], (9000, 9500)):
        assert (status, steps, width) == ("failed", step, None) and "cannot load" in error and "\n" not in error
    assert spectra == (3, 2048)
    beta = runner.invoke(app, ["query", "beta", "--db", str(store), "--by", "optimizer,suite", "--format", "json"])
    row = json.loads(beta.stdout)[0]
    assert row["suite"] == "tiny" and row["n_widths"] == 3 and row["beta_hard"] is not None
    status = runner.invoke(app, ["status", str(spec), "--format", "json"])
    assert json.loads(status.stdout) == [{"status": "done", "runs": 3}, {"status": "failed", "runs": 2}]
    again = runner.invoke(app, ["measure", str(spec), "--executor", "inline"])
    assert again.exit_code == 0 and "nothing to do" in again.stderr  # the failed one waits for --retry-failed


def test_a_suite_of_model_sizes_says_width_is_confounded(tmp_path, corpus):
    store = tmp_path / "s.duckdb"
    entries = [{"path": str(save_checkpoint(tmp_path / f"m{d}", corpus, 4 * d, n_embd=d)), "optimizer": "AdamW"}
               for d in (8, 16, 32)]
    spec = tmp_path / "s.yaml"
    spec.write_text(spec_text(store, corpus, entries))
    assert runner.invoke(app, ["measure", str(spec), "--executor", "inline"]).exit_code == 0
    beta = runner.invoke(app, ["query", "beta", "--db", str(store)])
    assert "AdamW: d_model changes with the width (8, 16, 32): β mixes FFN width with model size" in beta.stderr


@pytest.mark.parametrize("entry, message", [
    ({"optimizer": "AdamW"}, "give path"),
    ({"path": "x", "model": "y", "optimizer": "AdamW"}, "give path"),
    ({"path": "x", "revision": "step1", "optimizer": "AdamW"}, "revision goes with model"),
    ({"path": "x"}, "optimizer"),
])
def test_a_bad_checkpoints_spec_is_one_line_exit_2(tmp_path, corpus, entry, message):
    spec = tmp_path / "bad.yaml"
    spec.write_text(spec_text(tmp_path / "b.duckdb", corpus, [entry]))
    for cmd in ("measure", "plan"):
        result = runner.invoke(app, [cmd, str(spec)])
        assert result.exit_code == 2 and message in result.stderr and "bad.yaml:" in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "b.duckdb").exists()


def test_a_revision_in_the_local_hf_cache_is_measured_offline(tmp_path, corpus):
    """`model:` + `revision:` resolve in the local HF cache (HF_HUB_CACHE) with nothing downloaded."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    hub = tmp_path / "hub"
    repo = hub / "models--tiny--gpt2-suite"
    for revision, commit in (("step1000", "a" * 40), ("step2000", "b" * 40)):
        save_checkpoint(repo / "snapshots" / commit, corpus, 64, seed=int(revision[4]))
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / revision).write_text(commit)
    store = tmp_path / "h.duckdb"
    spec = tmp_path / "h.yaml"
    spec.write_text(spec_text(store, corpus, [
        {"model": "tiny/gpt2-suite", "revision": "step1000", "optimizer": "AdamW", "step": 1000},
        {"model": "tiny/gpt2-suite", "revision": "step2000", "optimizer": "AdamW", "step": 2000},
        {"model": "tiny/gpt2-suite", "revision": "step3000", "optimizer": "AdamW", "step": 3000}]))  # not cached
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    out = subprocess.run([sys.executable, "-m", "cli.main", "measure", str(spec), "--executor", "inline"], env=env,
                         capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 3, out.stderr  # the uncached revision fails alone
    con = duckdb.connect(str(store), read_only=True)
    try:
        got = con.execute("SELECT steps, status, json_extract_string(config, '$.checkpoint') FROM runs ORDER BY steps"
                          ).fetchall()
    finally:
        con.close()
    assert got == [(1000, "done", "tiny/gpt2-suite@step1000"), (2000, "done", "tiny/gpt2-suite@step2000"),
                   (3000, "failed", "tiny/gpt2-suite@step3000")]
    status = runner.invoke(app, ["status", "--db", str(store)])  # a checkpoint that never loaded has no width
    assert status.exit_code == 0, status.output
    failed, = [line for line in status.stderr.splitlines() if line.startswith("failed ")]
    assert failed.split(": ", 1)[0].endswith(" AdamW tiny/gpt2-suite@step3000"), failed


def test_token_counts_of_a_corpus_read_by_a_models_tokenizer(tmp_path, corpus):
    from transformers import AutoTokenizer

    from workers.checkpoints import token_counts

    tokenizer = AutoTokenizer.from_pretrained(save_checkpoint(tmp_path / "m", corpus, 32), local_files_only=True)
    counts = token_counts(tokenizer, str(corpus))
    assert len(counts) >= len(tokenizer) and counts.sum() > 1000 and counts[tokenizer.eos_token_id] >= 40


def test_patterns_in_the_spec_reach_the_probe(tmp_path, corpus):
    """`measure.patterns` in a checkpoints spec name the FFN modules the probe hooks."""
    store, spec = tmp_path / "p.duckdb", tmp_path / "p.yaml"
    path = save_checkpoint(tmp_path / "m", corpus, 32)
    entry = {"path": str(path), "optimizer": "AdamW"}
    first, down = r"transformer\.h\.\d+\.mlp\.c_fc", r"transformer\.h\.\d+\.mlp\.c_proj"
    spec.write_text(spec_text(store, corpus, [entry]).replace(
        "min_stratum_tokens: 16}", f"min_stratum_tokens: 16, patterns: ['{first}', '{down}']}}"))
    result = runner.invoke(app, ["measure", str(spec), "--executor", "inline"])
    assert result.exit_code == 0, result.output
    con = duckdb.connect(str(store), read_only=True)
    try:
        assert con.execute("SELECT count(DISTINCT layer) FROM spectra").fetchone() == (2,)
    finally:
        con.close()


def test_a_checkpoint_runs_in_its_stored_dtype_or_the_one_asked_for(tmp_path, corpus):
    """`measure.dtype`: auto is float32 on a CPU; stored loads the saved dtype; the fold stays
    float64, so a bfloat16 forward moves the spectra only by the activations' rounding."""
    import torch

    path = save_checkpoint(tmp_path / "m", corpus, 64)
    half = tmp_path / "m-bf16"
    hf().AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).save_pretrained(half)
    hf().AutoTokenizer.from_pretrained(path).save_pretrained(half)
    got = {}
    for name, folder, dtype in (("auto", path, "auto"), ("stored", half, "stored"), ("asked", path, "bfloat16")):
        store, spec = tmp_path / f"{name}.duckdb", tmp_path / f"{name}.yaml"
        spec.write_text(spec_text(store, corpus, [{"path": str(folder), "optimizer": "AdamW"}])
                        .replace("min_stratum_tokens: 16}", f"min_stratum_tokens: 16, dtype: {dtype}}}"))
        out = runner.invoke(app, ["measure", str(spec), "--executor", "inline"])
        assert out.exit_code == 0, out.output
        con = duckdb.connect(str(store), read_only=True)
        try:
            got[name] = con.execute("""SELECT r.forward_dtype, k.hard_rank FROM runs r JOIN ranks k USING (run_id)
                                       WHERE k.layer = 0 AND k.site = 'pre' AND k.stratum = 'all'""").fetchone()
        finally:
            con.close()
    assert [got[n][0] for n in ("auto", "stored", "asked")] == ["float32", "bfloat16", "bfloat16"]
    assert got["asked"][1] == pytest.approx(got["auto"][1], rel=0.05) and got["asked"][1] != got["auto"][1]
    bad = tmp_path / "bad.yaml"
    bad.write_text(spec_text(tmp_path / "b.duckdb", corpus, [{"path": str(path), "optimizer": "AdamW"}])
                   .replace("min_stratum_tokens: 16}", "min_stratum_tokens: 16, dtype: float8}"))
    refused = runner.invoke(app, ["measure", str(bad)])
    assert refused.exit_code == 2 and "measure.dtype" in refused.stderr and not (tmp_path / "b.duckdb").exists()


def test_plan_reads_each_folders_shape_and_a_layer_over_the_budget_is_refused_before_anything(tmp_path, corpus):
    path = save_checkpoint(tmp_path / "m", corpus, 256, n_embd=16)
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text('{"num_hidden_layers": true, "intermediate_size": 1e400, "n_inner": [1]}')
    huge = tmp_path / "huge"
    huge.mkdir()
    (huge / "config.json").write_text('{"n_layer": 2, "n_inner": 64, "pad": "' + "x" * (1 << 20) + '"}')
    store, spec = tmp_path / "p.duckdb", tmp_path / "p.yaml"
    entries = [{"path": str(path), "optimizer": "AdamW"}, {"path": str(odd), "optimizer": "AdamW", "step": 1},
               {"path": str(huge), "optimizer": "AdamW", "step": 2},
               {"path": str(tmp_path / "gone"), "optimizer": "AdamW", "step": 3}]
    spec.write_text(spec_text(store, corpus, entries).replace("min_stratum_tokens: 16}",
                                                              "min_stratum_tokens: 16, memory: 8MiB}"))
    plan = runner.invoke(app, ["plan", str(spec), "--format", "json"])
    assert plan.exit_code == 0, plan.output
    rows = json.loads(plan.stdout)
    assert (rows[0]["ffn_width"], rows[0]["passes"]) == (256, 4)  # 2 layers × 2 sites, one a pass under 8 MiB
    assert [(r["ffn_width"], r["passes"]) for r in rows[1:]] == [(None, None)] * 3  # unknown until loaded
    tight = spec.read_text().replace("memory: 8MiB", "memory: 4MiB")
    spec.write_text(tight)
    for command in ("plan", "measure"):
        out = runner.invoke(app, [command, str(spec)])
        assert out.exit_code == 2, out.output
        line, = out.stderr.strip().splitlines()
        assert line.startswith(f"checkpoints[0] ({path}): measure.memory: one layer × site of width 256 needs")
    assert not store.exists()
    # Ray memory no node holds: refused before any task waits forever for it
    spec.write_text(tight.replace("memory: 4MiB", "memory: 8MiB") + "resources: {memory: 1000TiB}\n")
    out = runner.invoke(app, ["measure", str(spec)])
    assert out.exit_code == 2 and "bytes of memory; no node of the Ray cluster has that much" in out.stderr, out.output
    assert not store.exists() or rows_of(store, "SELECT count(*) FROM runs") == [(0,)]  # nothing measured


def test_a_result_the_store_cannot_take_is_spooled_and_committed_once(tmp_path, corpus, monkeypatch):
    from spectraldb import store as store_module
    from spectraldb.errors import StoreError

    write, calls = store_module.write_run, []

    def busy(*a, **k):  # what a reader holding the file looks like to the writer
        calls.append(1)
        if mode == "always" or len(calls) == 1:
            raise StoreError("the store is held by another process")
        return write(*a, **k)

    monkeypatch.setattr(store_module, "write_run", busy)
    store, spec = tmp_path / "s.duckdb", tmp_path / "s.yaml"
    entries = [{"path": str(save_checkpoint(tmp_path / f"m{i}", corpus, 32, seed=i)), "optimizer": "AdamW",
                "step": i + 1} for i in range(2)]
    spec.write_text(spec_text(store, corpus, entries))
    mode = "once"
    out = runner.invoke(app, ["measure", str(spec), "--executor", "inline"])
    assert out.exit_code == 0, out.output
    assert "not committed yet (StoreError: the store is held by another process); kept in" in out.stderr
    assert rows_of(store, "SELECT count(*), count(DISTINCT run_id) FROM runs") == [(2, 2)]
    assert not list((tmp_path / "s.duckdb.spool").glob("*.npz"))
    # a store that never lets go: the results wait in the spool, and the next writer commits them
    store2, spec2 = tmp_path / "t.duckdb", tmp_path / "t.yaml"
    spec2.write_text(spec_text(store2, corpus, entries))
    mode = "always"
    out = runner.invoke(app, ["measure", str(spec2), "--executor", "inline"])
    assert out.exit_code == 1 and "2 measured checkpoint(s) could not be committed and wait in" in out.stderr
    mode = "once"
    calls.append(1)  # the store lets go
    again = runner.invoke(app, ["measure", str(spec2), "--executor", "inline"])
    assert again.exit_code == 0 and "committed 2 finished run(s)" in again.stderr, again.output
    assert "nothing to do" in again.stderr  # never measured twice
    assert rows_of(store2, "SELECT count(*), count(DISTINCT run_id) FROM runs WHERE status = 'done'") == [(2, 2)]


def rows_of(db, sql):
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()
