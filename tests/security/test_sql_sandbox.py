"""Issue #18 §2: `pacsflow sql` is a sandbox over the research views, and every call is audited.

Finding: `sql` reached everything: `read_parquet` of the vault printed names, IDs and birth
dates, `read_text` printed the key, `glob()` listed the restricted zone, `COPY ... TO` and
`ATTACH` wrote files, `INSTALL httpfs` tried the network."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from security.lakes import Lake, make_lake


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Lake:
    lake = make_lake(tmp_path_factory.mktemp("sql"))
    # the demo kept its key inside the lake; a key-like secret there must stay unreadable too
    (lake.root / "restricted" / "secret.key").write_text("pacsflow-key-v1\nTOPSECRET\n")
    return lake


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() and "audit" not in p.parts}


ATTACKS = {
    "vault": "SELECT * FROM read_parquet('{lake}/restricted/vault/**/*.parquet')",
    "index": "SELECT PatientID FROM read_parquet('{lake}/restricted/index/**/*.parquet')",
    "dotdot": "SELECT * FROM read_parquet('{lake}/research/../restricted/vault/**/*.parquet')",
    "key": "SELECT content FROM read_text('{lake}/restricted/secret.key')",
    "glob": "SELECT * FROM glob('{lake}/restricted/**')",
    "etc": "SELECT * FROM read_csv('/etc/passwd')",
    "copy": "COPY (SELECT * FROM series) TO '{lake}/research/out.csv'",
    "copy_tmp": "COPY (SELECT 1) TO '/tmp/pacsflow-sql-escape.csv'",
    "attach": "ATTACH '{lake}/research/x.duckdb'",
    "install": "INSTALL httpfs",
    "load": "LOAD httpfs",
    "set": "SET enable_external_access = true",
    "pragma": "PRAGMA enable_profiling",
    "create": "CREATE TABLE t AS SELECT 1",
    "second_statement": "SELECT 1; COPY (SELECT 1) TO '{lake}/research/y.csv'",
    "view_over_files": "CREATE VIEW v AS SELECT * FROM read_text('{lake}/restricted/secret.key')",
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_the_sandbox_refuses_each_attack_and_writes_nothing(lake: Lake, name: str) -> None:
    before = _files(lake.root)
    query = ATTACKS[name].format(lake=lake.root)
    result = lake.run("sql", query)
    assert result.exit_code == 2, result.output
    out = result.output
    assert out.startswith("pacsflow: SQL "), out
    assert len(out.strip().splitlines()) == 1, out
    assert "TOPSECRET" not in out
    assert _files(lake.root) == before
    assert not Path("/tmp/pacsflow-sql-escape.csv").exists()


def test_the_research_views_and_lineage_still_answer(lake: Lake) -> None:
    for query in (
        "SELECT count(*) AS n FROM instances",
        "SELECT Modality, count(*) FROM series GROUP BY ALL ORDER BY 1",
        "WITH s AS (SELECT * FROM studies) SELECT count(*) FROM s",
        "DESCRIBE patients",
        "SELECT count(*) FROM lineage",
        f"SELECT count(*) FROM read_parquet('{lake.root}/research/tables/series/**/*.parquet')",
    ):
        result = lake.run("sql", query)
        assert result.exit_code == 0, (query, result.output)


def test_every_sql_call_is_audited_with_a_hash_of_the_query(lake: Lake) -> None:
    ok = "SELECT count(*) AS n FROM series"
    bad = "COPY (SELECT 1) TO 'x.csv'"
    assert lake.run("sql", ok).exit_code == 0
    assert lake.run("sql", bad).exit_code == 2
    log = lake.root / "restricted" / "audit" / "audit.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    by_hash = {r["details"].get("query_sha256"): r for r in records if r["event"].startswith("sql")}
    done = by_hash[hashlib.sha256(ok.encode()).hexdigest()]
    refused = by_hash[hashlib.sha256(bad.encode()).hexdigest()]
    assert done["event"] == "sql"
    assert done["details"]["rows"] == 1
    assert refused["event"] == "sql_refused"
    for rec in (done, refused):
        assert rec["os_user"]
        assert rec["host"]
        assert rec["pid"]
    assert ok not in log.read_text()  # the hash, never the query text
