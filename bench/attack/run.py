"""Running the cases (each followed by a /health check), the fixtures they need, the final checks and the report."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import tempfile
import time
from pathlib import Path

from attack.bodies import JSON_CT, image_bytes, jbody, make_images, multipart
from attack.cases import Case, expect_ok, generation_cases, with_
from attack.cases_custom import custom_cases
from attack.cases_routes import auth_cases, protocol_cases, resource_cases
from attack.cases_upload import EDIT_FIELDS, edit_cases, export_cases, layers_cases
from attack.client import (API_KEY, HANG_S, HEALTH_S, RESULTS, Resp, Server, all_jobs, code_version, exchange,
                           stored_jobs, transfer)


# -- running -------------------------------------------------------------------------------------------------------
def shape_of(resp: Resp) -> tuple[bool | None, str]:
    """(has OpenAI's error shape with a non-empty message, the message); None when not applicable."""
    if resp.status is None or resp.status < 400:
        return None, ""
    data = resp.json()
    err = data.get("error") if isinstance(data, dict) else None
    if not isinstance(err, dict):
        text = resp.body[:160].decode("utf-8", "replace")
        return False, text
    msg = err.get("message")
    ok = set(err) >= {"message", "type", "param", "code"} and isinstance(msg, str) and bool(msg.strip())
    return ok, msg if isinstance(msg, str) else repr(msg)


def run_case(case: Case, ctx) -> dict:
    port = ctx["auth_port"] if case.server == "auth" else ctx["port"]
    note = ""
    override = None
    if case.fn is not None:
        resp, note = case.fn(ctx)
        override = getattr(resp, "ok_override", None)
    elif case.raw is not None:
        resp = transfer(port, case.raw, method=case.method)
    else:
        headers = list(case.headers)
        if case.async_job:
            headers.append(("Prefer", "respond-async"))
        resp = exchange(port, case.method, case.path, headers, case.body, chunked=case.chunked, host=case.host)
    shaped, message = shape_of(resp)
    if case.method == "HEAD" and resp.status is not None and resp.status >= 400:
        shaped, message = None, "(HEAD: no body)"
    job_id = resp.headers.get("x-qimg-job-id")
    if resp.status == 202 and job_id:
        d = exchange(port, "DELETE", f"/v1/jobs/{job_id}")
        note = (note + "; " if note else "") + f"cancelled its job: DELETE -> {d.status}"
    sse = resp.status == 200 and resp.headers.get("content-type", "").startswith("text/event-stream")
    if sse and b"event: error" in resp.body:
        note = (note + "; " if note else "") + "the stream ended with an error event: " + \
            resp.body[resp.body.find(b"event: error"):][:200].decode("utf-8", "replace")
    if resp.status == 200 and not message:
        data = resp.json()
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            message = f"{len(data['data'])} item(s)"
    five = resp.status is not None and resp.status >= 500
    parser = resp.body.startswith(b"Invalid HTTP request received")
    ok = not five and not resp.hang and (shaped is not False or parser) and expect_ok(case.expect, resp.status)
    if case.fn is not None and override is not None:
        ok = ok and override
    # the server must still answer /health quickly
    h = exchange(ctx["port"], "GET", "/health", timeout=HEALTH_S)
    health_ok = h.status == 200 and h.elapsed < HEALTH_S
    ok = ok and health_ok
    return {"case": case.name, "group": case.group, "method": case.method, "path": case.path[:200],
            "server": case.server, "status": resp.status, "ms": round(resp.elapsed * 1000, 1),
            "total_ms": round(resp.total * 1000, 1), "hang": resp.hang, "shaped": shaped,
            "message": message[:400], "code": ((resp.json() or {}).get("error") or {}).get("code")
            if isinstance(resp.json(), dict) and isinstance((resp.json() or {}).get("error"), dict) else None,
            "expect": case.expect, "expected": expect_ok(case.expect, resp.status), "client_error": resp.error,
            "job_id": job_id, "note": note, "health_ms": round(h.elapsed * 1000, 1), "health_ok": health_ok,
            "http_parser": resp.body.startswith(b"Invalid HTTP request received"),
            "rss_mb": ctx["rss"]() if "rss" in ctx else None,
            "request_bytes": len(case.body) if case.body is not None else (len(case.raw) if case.raw else 0),
            "ok": ok}


def setup(ctx) -> None:
    """Fixtures for the id-based cases: a finished job, its output PNG, a JPEG output, an edit's input, layers."""
    port = ctx["port"]
    r = exchange(port, "POST", "/v1/images/generations", [JSON_CT], jbody(with_(response_format="url")))
    assert r.status == 200, (r.status, r.body[:300])
    ctx["job_id"] = r.headers["x-qimg-job-id"]
    ctx["output_file"] = r.json()["data"][0]["url"].rsplit("/", 1)[1]
    r = exchange(port, "POST", "/v1/images/generations", [JSON_CT],
                 jbody(with_(response_format="url", output_format="jpeg")))
    assert r.status == 200, (r.status, r.body[:300])
    ctx["jpeg_file"] = r.json()["data"][0]["url"].rsplit("/", 1)[1]
    data, ctype = multipart([(k, v, None, None) for k, v in EDIT_FIELDS]
                            + [("image", image_bytes(), "a.png", "image/png")])
    r = exchange(port, "POST", "/v1/images/edits", [("Content-Type", ctype)], data)
    assert r.status == 200, (r.status, r.body[:300])
    job = exchange(port, "GET", f"/v1/jobs/{r.headers['x-qimg-job-id']}").json()
    ctx["input_file"] = job["inputs"][0]["id"]
    data, ctype = multipart([("layers", "2", None, None), ("steps", "1", None, None),
                             ("response_format", "url", None, None),
                             ("image", image_bytes(mode="RGBA"), "a.png", "image/png")])
    r = exchange(port, "POST", "/v1/images/layers", [("Content-Type", ctype)], data)
    if r.status == 200:
        ctx["layer_files"] = [d["url"].rsplit("/", 1)[1] for d in r.json()["data"]]
    else:
        print(f"(layers fixture: HTTP {r.status} {r.body[:200]!r}; export cases use a generated PNG)")


def main(argv=None, doc: str | None = None) -> int:
    """The bench; `doc` is the entry point's docstring, whose first paragraph describes it in --help."""
    p = argparse.ArgumentParser(description=(doc or __doc__).split("\n\n")[0])
    p.add_argument("--only", default=None, help="run only cases whose name contains this text")
    p.add_argument("--timeout", type=float, default=HANG_S, help="seconds without an answer that make a hang")
    p.add_argument("--output", default=str(RESULTS))
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (server logs, data)")
    p.add_argument("--heavy", action="store_true",
                   help="add a 2048x2048 1-step generation (within the cost budget): does --job-timeout 20 stop it? "
                        "(about 45 s of CPU for the tiny model on 2 cores)")
    args = p.parse_args(argv)

    wall_start = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="qimg-serve-attack-"))
    main_srv = auth_srv = None
    try:
        main_srv = Server(workdir, "main", ["--max-queue", "16", "--job-timeout", "20"])
        auth_srv = Server(workdir, "auth", ["--model", "qimg-tiny", "--lazy", "--api-key", API_KEY,
                                            "--max-queue", "4", "--job-timeout", "20"])
        images = make_images()
        main_srv.wait_ready()
        auth_srv.wait_ready(need_models=False)
        ctx = {"port": main_srv.port, "auth_port": auth_srv.port, "rss": main_srv.rss_mb, "data": main_srv.data}
        setup(ctx)
        cases = (generation_cases() + edit_cases(images) + layers_cases(images) + export_cases(ctx)
                 + resource_cases(ctx) + protocol_cases() + auth_cases() + custom_cases())
        if args.heavy:
            cases.append(Case("gen.heavy.2048x2048_steps1_vs_job_timeout_20s", "POST", "/v1/images/generations",
                              [JSON_CT], jbody(with_(size="2048x2048", seed=2048)), "408", group="generations"))
        names = [c.name for c in cases]
        dupes = {n for n in names if names.count(n) > 1}
        assert not dupes, f"duplicate case names: {sorted(dupes)}"
        if args.only:
            cases = [c for c in cases if args.only in c.name]
        rss_before = main_srv.rss_mb()
        results = []
        print(f"{'case':<58} {'status':>6} {'ms':>8}  ok  message")
        for case in cases:
            try:
                row = run_case(case, ctx)
            except Exception as err:  # noqa: BLE001 - a bench bug must not hide the other cases
                row = {"case": case.name, "group": case.group, "status": None, "ms": None, "hang": False,
                       "shaped": None, "message": "", "ok": False, "bench_error": repr(err), "health_ok": True,
                       "expected": True, "expect": case.expect}
            results.append(row)
            msg = (row.get("message") or row.get("client_error") or row.get("bench_error") or "").replace("\n", " ")
            flag = "ok" if row["ok"] else "NO"
            ms = f"{row['ms']:.0f}" if row.get("ms") is not None else "-"
            print(f"{case.name[:58]:<58} {row['status']!s:>6} {ms:>8}  {flag:<3} {msg[:110]}", flush=True)
        rss_after = main_srv.rss_mb()
        alive = main_srv.alive() and auth_srv.alive()
        jobs, job_problems = all_jobs(main_srv.port)
        listed_by = "GET /v1/jobs"
        if job_problems:  # the API cannot list them: take the rows from the database and read each by id
            jobs, listed_by = stored_jobs(main_srv.data), "the database (the list failed)"
        for job in jobs:
            r = exchange(main_srv.port, "GET", f"/v1/jobs/{job['id']}")
            if r.status != 200:
                job_problems.append(f"GET /v1/jobs/{job['id']} -> {r.status} {r.body[:200]!r}")
        server_failed = [{"id": j["id"], "error": j.get("error"),
                          "params": {k: v for k, v in (j.get("params") or {}).items() if k in ("prompt", "width",
                                                                                                  "height", "steps",
                                                                                                  "scheduler")}
                          or j.get("params_text", "")[:300]}
                         for j in jobs if j["status"] == "failed" and (j.get("error") or {}).get("type")
                         in ("server_error", "internal_error", "model_error")]
        nan_jobs = [j["id"] for j in stored_jobs(main_srv.data) if re.search(r"\bNaN\b|Infinity", j["params_text"])]
        statuses = {}
        for j in jobs:
            statuses[j["status"]] = statuses.get(j["status"], 0) + 1
        log_text = main_srv.log.read_text(errors="replace") + auth_srv.log.read_text(errors="replace")
        log_errors = [ln for ln in log_text.splitlines() if re.search(r"ERROR|Traceback|Exception|Error:", ln)]

        n = len(results)
        five = [r for r in results if r.get("status") is not None and r["status"] >= 500]
        hangs = [r for r in results if r.get("hang")]
        unshaped = [r for r in results if r.get("shaped") is False]
        unshaped_app = [r for r in unshaped if not r.get("http_parser")]
        unexpected = [r for r in results if not r.get("expected", True)]
        slow_health = [r for r in results if not r.get("health_ok", True)]
        failed_rows = [r for r in results if not r["ok"]]
        summary = {
            "cases": n, "5xx": len(five), "hangs": len(hangs), "4xx_without_openai_shape": len(unshaped),
            "4xx_without_openai_shape_app_routes": len(unshaped_app), "unexpected_status": len(unexpected),
            "health_over_2s": len(slow_health), "not_ok": len(failed_rows), "server_alive": alive,
            "rss_before_mb": rss_before, "rss_after_mb": rss_after, "jobs_listed": len(jobs),
            "jobs_listed_from": listed_by, "job_statuses": statuses, "job_read_problems": job_problems[:50],
            "jobs_failed_with_server_error": server_failed, "jobs_stored_with_nan_or_infinity": nan_jobs,
            "wall_s": round(time.perf_counter() - wall_start, 1),
        }
        line = (f"{n} cases, {len(five)} 5xx, {len(hangs)} hangs, {len(unshaped)} 4xx without OpenAI shape "
                f"({len(unshaped_app)} not from uvicorn's HTTP parser), {len(unexpected)} unexpected status, "
                f"{len(slow_health)} slow /health, server alive {alive}, {len(jobs)} jobs (from {listed_by}; "
                f"{len(job_problems)} read problems, {len(server_failed)} failed with a server error), "
                f"server RSS {rss_before} MB before / {rss_after} MB after, wall {summary['wall_s']} s")
        print()
        for r in failed_rows:
            print(f"  NOT OK {r['case']}: status {r['status']} expect {r.get('expect')} shaped {r.get('shaped')} "
                  f"hang {r.get('hang')} health_ok {r.get('health_ok')} {r.get('client_error') or ''} "
                  f"{r.get('bench_error') or ''} {(r.get('message') or '')[:200]!r} {r.get('note') or ''}")
        for j in server_failed:
            print(f"  JOB FAILED WITH A SERVER ERROR {j}")
        for p_ in job_problems[:10]:
            print("  JOB READ PROBLEM", p_)
        if log_errors:
            print(f"  server log: {len(log_errors)} error line(s), first: {log_errors[:5]}")
        print(line)
        result = {"summary": summary, "summary_line": line, "cases": results, "server_log_errors": log_errors[:200],
                  "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                              "platform": platform.platform()}, "code": code_version(),
                  "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "server": "qimg serve (embedded qimg-tiny, qimg-tiny-layered) --max-queue 16 --job-timeout 20"}
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        from qimg.atomic import atomic_write

        with atomic_write(out, "w") as handle:
            json.dump(result, handle, indent=1, default=str)
        print(f"wrote {out}")
        bad = five or hangs or not alive or server_failed or job_problems
        return 1 if bad else 0
    finally:
        for srv in (main_srv, auth_srv):
            if srv is not None:
                srv.stop()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
