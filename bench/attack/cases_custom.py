"""The custom cases: disconnects, slowloris, a full queue, NaN in a stored job."""

from __future__ import annotations

import socket
import time

from attack.bodies import JSON_CT, jbody
from attack.cases import Case, with_
from attack.client import HEALTH_S, Resp, build_request, exchange, stored_jobs


# -- custom cases ------------------------------------------------------------------------------------------------
def case_disconnect_mid_body(ctx, path="/v1/images/generations", ctype="application/json"):
    port = ctx["port"]
    start = time.perf_counter()
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: 1000000\r\n\r\n".encode()
              + b'{"prompt":')
    time.sleep(0.2)
    s.close()
    r = Resp(elapsed=time.perf_counter() - start, error="client closed after 10 of 1,000,000 body bytes")
    return r, "no answer expected; the server must stay healthy"


def case_disconnect_during_job(ctx):
    """A synchronous generation whose client goes away while the job runs: the job must end up cancelled."""
    port = ctx["port"]
    body = jbody(with_(steps=1000, seed=424242))
    head, pieces = build_request(port, "POST", "/v1/images/generations", [JSON_CT], body)
    start = time.perf_counter()
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(head + b"".join(pieces))
    time.sleep(1.5)
    s.close()
    deadline = time.monotonic() + 10
    status = None
    while time.monotonic() < deadline:
        jobs = (exchange(port, "GET", "/v1/jobs?limit=20").json() or {}).get("data", [])
        mine = [j for j in jobs if j.get("params", {}).get("seed") == 424242]
        status = mine[0]["status"] if mine else None
        if status in ("cancelled", "failed", "succeeded"):
            break
        time.sleep(0.2)
    r = Resp(status=None, elapsed=time.perf_counter() - start, error=f"client closed; job status {status}")
    r.ok_override = status == "cancelled"
    return r, f"the job ended {status!r} (want 'cancelled')"


def case_slowloris(ctx):
    """20 connections send a partial request head and hold it open 5 s; meanwhile /health and a generation run."""
    port = ctx["port"]
    socks = []
    for i in range(20):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Ty")
        socks.append(s)
    slow_body = socket.create_connection(("127.0.0.1", port), timeout=5)
    slow_body.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"prompt\":")
    socks.append(slow_body)
    start = time.perf_counter()
    worst_health, gen = 0.0, None
    try:
        while time.perf_counter() - start < 5.0:
            h = exchange(port, "GET", "/health", timeout=HEALTH_S)
            worst_health = max(worst_health, h.elapsed if h.status == 200 else 99.0)
            if gen is None:
                gen = exchange(port, "POST", "/v1/images/generations", [JSON_CT], jbody(with_(seed=99)))
            time.sleep(0.25)
    finally:
        for s in socks:
            s.close()
    r = Resp(status=gen.status if gen else None, elapsed=time.perf_counter() - start, body=gen.body if gen else b"",
             headers=gen.headers if gen else {})
    r.ok_override = bool(gen and gen.status == 200 and worst_health < HEALTH_S)
    return r, (f"21 half-open connections held 5 s; meanwhile /health worst {worst_health * 1000:.0f} ms, "
               f"a generation answered {gen.status if gen else None} in {gen.elapsed * 1000 if gen else 0:.0f} ms")


def case_queue_full(ctx):
    """17 async jobs of 1000 steps against --max-queue 16: the 17th (or so) gets 429 with Retry-After; all cancelled."""
    port = ctx["port"]
    ids, answer = [], None
    for i in range(20):
        r = exchange(port, "POST", "/v1/images/generations", [JSON_CT, ("Prefer", "respond-async")],
                     jbody(with_(steps=1000, seed=5000 + i)))
        if r.status == 202:
            ids.append(r.headers.get("x-qimg-job-id"))
        else:
            answer = r
            break
    for job_id in ids:
        exchange(port, "DELETE", f"/v1/jobs/{job_id}")
    if answer is None:
        answer = Resp(error="no 429 after 20 jobs")
    return answer, (f"{len(ids)} accepted before the answer; retry-after {answer.headers.get('retry-after')}; "
                    "all cancelled")


def case_nan_job(ctx, prefer_async=False):
    """A generation whose scheduler_config carries NaN (JSON's NaN literal): if it is accepted, its job must still
    read back (GET /v1/jobs/{id} and the list)."""
    port = ctx["port"]
    headers = [JSON_CT] + ([("Prefer", "respond-async")] if prefer_async else [])
    post = exchange(port, "POST", "/v1/images/generations", headers,
                    jbody(with_(seed=777 + prefer_async, scheduler_config={"shift": float("nan")})))
    job_id = post.headers.get("x-qimg-job-id")
    if prefer_async:
        note = f"POST (Prefer: respond-async) -> {post.status}, job {job_id}"
        if job_id is None and "data" in ctx:
            rows = stored_jobs(ctx["data"])
            nan = [r for r in rows if r["seed"] == 778]
            if nan:
                note += f"; yet the job was created: {nan[-1]['id']} is {nan[-1]['status']} in the database"
        if job_id:
            time.sleep(1.0)
            got = exchange(port, "GET", f"/v1/jobs/{job_id}")
            note += f"; GET /v1/jobs/{job_id} -> {got.status}"
        return post, note
    if not job_id:
        return post, f"POST -> {post.status} without a job"
    got = exchange(port, "GET", f"/v1/jobs/{job_id}")
    listed = exchange(port, "GET", "/v1/jobs?limit=5")
    note = (f"POST -> {post.status} (job {job_id}); GET /v1/jobs/{job_id} -> {got.status}; "
            f"GET /v1/jobs?limit=5 -> {listed.status}")
    got.ok_override = post.status == 400 or (got.status == 200 and listed.status == 200)
    return got, note


def custom_cases() -> list[Case]:
    return [

        Case("conn.disconnect_mid_body_generations", fn=case_disconnect_mid_body, group="connection"),
        Case("conn.disconnect_mid_body_edits", group="connection",
             fn=lambda ctx: case_disconnect_mid_body(ctx, "/v1/images/edits", "multipart/form-data; boundary=x")),
        Case("conn.disconnect_during_sync_job", fn=case_disconnect_during_job, group="connection"),
        Case("conn.slowloris_partial_headers_5s", fn=case_slowloris, group="connection"),
        Case("conn.queue_full_429", fn=case_queue_full, expect="429", group="connection"),
        Case("gen.limit.steps_1000_256px_sync_hits_job_timeout", "POST", "/v1/images/generations", [JSON_CT],
             jbody(with_(steps=1000, size="256x256", seed=31337)), "408", group="generations"),
        # last: if a NaN gets into a stored job, reading the job list may break for every case after it
        Case("gen.limit.scheduler_config.value_NaN.then_read_job", fn=case_nan_job, expect="400|200",
             group="generations"),
        Case("gen.limit.scheduler_config.value_NaN.async_202", fn=lambda ctx: case_nan_job(ctx, True),
             expect="4xx|202", group="generations"),
    ]
