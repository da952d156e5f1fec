"""Every `JobStore` keeps the same contract (SQLite, and PostgreSQL from Debian's `postgresql` package, started here
in a temporary folder): rows, paging, transitions that happen once, recovery, the file index; on PostgreSQL, workers
claim each queued job once, whatever their number."""

from __future__ import annotations

import threading
import time

import pytest

from qimg.serve.store import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, FileRecord, new_file_id, new_job_id
from qimg.serve.store_sqlite import SQLiteJobStore


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        made = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    else:
        from qimg.serve.store_postgres import PostgresJobStore

        url = request.getfixturevalue("postgres_url")
        made = PostgresJobStore(url)
        made._db.execute("TRUNCATE jobs, files CASCADE")
    yield made
    made.close()


def test_rows_paging_and_transitions(store):
    ids = [new_job_id() for _ in range(5)]
    for i, job_id in enumerate(ids):
        store.create(job_id, "generate", "qimg-tiny", {"prompt": f"p{i}", "size": [64, 64], "bad": "a \ud800 b\x00"})
    assert [j.id for j in store.list(limit=3)] == ids[::-1][:3]
    assert [j.id for j in store.list(limit=10, before=ids[2])] == [ids[1], ids[0]]
    assert store.list(before=new_job_id()) == []
    assert [j.id for j in store.queued()] == ids
    job = store.get(ids[0])
    assert job.status == QUEUED and job.params["prompt"] == "p0" and job.params["size"] == [64, 64]
    assert "\\ud800" in job.params["bad"]  # unencodable text comes back escaped, never as an error
    assert store.mark_running(ids[0]) and not store.mark_running(ids[0])
    assert store.finish(ids[0], SUCCEEDED, result={"images": 1}) and not store.finish(ids[0], FAILED, error="x")
    assert store.get(ids[0]).result == {"images": 1} and store.get(ids[0]).status == SUCCEEDED
    assert store.cancel_queued(ids[1], "by request") and not store.cancel_queued(ids[1], "again")
    assert store.get(ids[1]).status == CANCELLED
    assert store.mark_running(ids[2])
    failed = store.recover(keep_queued=True)
    assert failed == [ids[2]] and store.get(ids[2]).status == FAILED and store.get(ids[3]).status == QUEUED
    assert sorted(store.recover()) == sorted(ids[3:]) and store.queued() == []
    assert store.get(new_job_id()) is None


def test_file_index(store):
    job_id = new_job_id()
    store.create(job_id, "edit", "m", {})
    records = [FileRecord(new_file_id(), job_id, role, f"{i}.png", "image/png", 10 + i, i, 1.0)
               for i, role in enumerate(["input", "output", "output"])]
    for record in records:
        store.add_file(record)
    assert store.get_file(records[1].id) == records[1]
    assert [f.role for f in store.get(job_id).files] == ["input", "output", "output"]
    assert store.files_of_jobs([job_id], ("output",)) == records[1:]
    assert store.all_file_names() == {"0.png", "1.png", "2.png"}
    store.delete_files([records[0].id])
    assert store.get_file(records[0].id) is None and store.files_of_jobs([], ("output",)) == []


def test_workers_claim_each_job_once(postgres_url):
    """Four workers (own connections, threads) claiming 50 queued jobs: each job handed out exactly once."""
    from qimg.serve.store_postgres import PostgresJobStore

    stores = [PostgresJobStore(postgres_url) for _ in range(4)]
    stores[0]._db.execute("TRUNCATE jobs, files CASCADE")
    ids = [new_job_id() for _ in range(50)]
    for job_id in ids:
        stores[0].create(job_id, "generate", "m", {})
    claimed: dict[str, list] = {f"w{i}": [] for i in range(4)}

    def work(store, name):
        while (job := store.claim(name)) is not None:
            claimed[name].append(job.id)

    threads = [threading.Thread(target=work, args=(s, f"w{i}")) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = [j for jobs in claimed.values() for j in jobs]
    assert sorted(got) == sorted(ids)  # all of them, none twice
    assert all(stores[0].get(j).status == RUNNING for j in ids)
    for s in stores:
        s.close()


def test_servers_sharing_a_database_recover_only_their_own_jobs(postgres_url):
    from qimg.serve.store_postgres import PostgresJobStore

    a, b = PostgresJobStore(postgres_url, owner="host-a"), PostgresJobStore(postgres_url, owner="host-b")
    a._db.execute("TRUNCATE jobs, files CASCADE")
    a_running, a_queued, b_running, b_queued = (new_job_id() for _ in range(4))
    for store, running, queued in ((a, a_running, a_queued), (b, b_running, b_queued)):
        store.create(running, "generate", "m", {})
        store.create(queued, "generate", "m", {})
        assert store.mark_running(running)
    assert [j.id for j in a.queued()] == [a_queued]  # what a re-queues after a restart: its own
    assert sorted(a.recover()) == sorted([a_running, a_queued])
    assert b.get(b_running).status == RUNNING and b.get(b_queued).status == QUEUED
    assert b.get(a_running).status == FAILED  # and every server sees every job
    a.close()
    b.close()


def test_schema_is_created_once_and_refuses_a_newer_one(postgres_url):
    from qimg.serve.store_postgres import SCHEMA_VERSION, PostgresJobStore

    first, second = PostgresJobStore(postgres_url), PostgresJobStore(postgres_url)  # the second migrates nothing
    assert first._db.execute("SELECT version FROM qimg_schema").fetchall() == [(SCHEMA_VERSION,)]
    first._db.execute("UPDATE qimg_schema SET version=%s", (SCHEMA_VERSION + 1,))
    try:
        with pytest.raises(RuntimeError, match="written by a newer qimg"):
            PostgresJobStore(postgres_url)
    finally:
        first._db.execute("UPDATE qimg_schema SET version=%s", (SCHEMA_VERSION,))
        first.close()
        second.close()


def test_two_servers_on_one_database(postgres_url, tmp_path):
    """Two API servers (own data folders, one PostgreSQL store): a job made through one is listed and fetched
    through the other; a restart of one marks only the jobs it was running failed."""
    import httpx

    from qimg.serve.store_postgres import PostgresJobStore
    from tests.serve_support import ServerThread, make_settings, wait_models_loaded

    PostgresJobStore(postgres_url)._db.execute("TRUNCATE jobs, files CASCADE")
    settings = [make_settings(tmp_path / name, store=postgres_url, owner=name) for name in ("a", "b")]
    with ServerThread(settings[0]) as a, ServerThread(settings[1]) as b:
        wait_models_loaded(a.url)
        with httpx.Client(timeout=120) as http:
            made = http.post(f"{a.url}/v1/images/generations", headers={"Prefer": "respond-async"},
                             json={"prompt": "a red circle", "size": "64x64", "steps": 1, "model": "tiny"})
            assert made.status_code in (200, 202), made.text
            job_id = made.json()["id"]
            deadline = time.monotonic() + 120
            while http.get(f"{b.url}/v1/jobs/{job_id}").json()["status"] not in ("succeeded", "failed"):
                assert time.monotonic() < deadline
                time.sleep(0.2)
            seen = http.get(f"{b.url}/v1/jobs/{job_id}").json()
            assert seen["status"] == "succeeded" and seen["model"] == "tiny"
            assert job_id in [j["id"] for j in http.get(f"{b.url}/v1/jobs").json()["data"]]
    other = PostgresJobStore(postgres_url, owner="b")
    running_on_b = new_job_id()
    other.create(running_on_b, "generate", "tiny", {})
    assert other.claim("b", running_on_b) is not None
    with ServerThread(make_settings(tmp_path / "a", store=postgres_url, owner="a")):
        pass  # a's restart recovers a's jobs only
    assert other.get(running_on_b).status == RUNNING
    other.close()


def test_reap_requeues_then_fails_jobs_of_silent_workers(postgres_url):
    """A running job whose worker stopped sending heartbeats is queued again (its partial outputs dropped) while
    tried fewer than max_attempts times, then failed with the reason; a job with fresh heartbeats is left alone;
    cancel requests reach the running worker through its heartbeat."""
    from qimg.serve.store_postgres import PostgresJobStore

    store = PostgresJobStore(postgres_url, owner="api")
    store._db.execute("TRUNCATE jobs, files CASCADE")
    silent, alive = new_job_id(), new_job_id()
    for job_id in (silent, alive):
        store.create(job_id, "generate", "m", {})
    assert store.claim("w1", silent).id == silent and store.claim("w1", silent) is None
    assert store.claim("w2", alive).id == alive
    store.add_file_data(FileRecord(new_file_id(), silent, "output", "x.png", "image/png", 3, 0, 1.0), b"png")
    store.add_file_data(FileRecord(new_file_id(), silent, "input", "y.png", "image/png", 3, 0, 1.0), b"inp")
    time.sleep(0.3)
    assert store.heartbeat("w2", [alive]) == {}
    assert store.reap(stale_after=0.2, max_attempts=2) == ([silent], [])
    job = store.get(silent)
    assert job.status == QUEUED and [f.role for f in job.files] == ["input"]
    assert store.get(alive).status == RUNNING
    assert store.request_cancel(alive, "stop it") and store.heartbeat("w2", [alive]) == {alive: "stop it"}
    assert store.heartbeat("w1", [alive]) == {}  # not w1's job
    assert store.claim("w3").id == silent  # the oldest queued job: the requeued one
    time.sleep(0.3)
    requeued, ended = store.reap(stale_after=0.2, max_attempts=2)
    assert sorted(ended) == sorted([silent, alive]) and requeued == []
    job = store.get(silent)
    assert job.status == FAILED and job.error_type == "worker_lost" and "w3" in job.error and "2 time" in job.error
    assert store.get(alive).status == CANCELLED and "stop it" in store.get(alive).error
    assert store.count_queued() == 0
    store.close()
