"""Hostile requests against a live `qimg serve`: hundreds of bad, malformed and limit-probing requests to every route.

    python bench/serve_attack.py [--only SUBSTRING] [--timeout 30] [--output bench/results/serve_attack.json]

Starts `python -m qimg.cli serve` (the embedded qimg-tiny and qimg-tiny-layered models, `--max-queue 16
--job-timeout 20`) on a free 127.0.0.1 port with a temporary data directory, and a second one with `--api-key` for
the authorization cases. The cases are generated systematically as (name, method, path, headers, body): wrong types
for every field, values at and just past every limit, lone UTF-16 surrogates in every string field, control
characters, huge and deeply nested bodies, wrong content types, hostile multipart uploads (no image, 11 images,
empty, truncated, not an image, GIF/BMP/TIFF, a 1-bit 20000x20000 PNG bomb, 40 MB, a mask), path traversal in ids,
methods not allowed, HEAD and Range requests, protocol-level garbage, a client that disconnects mid-body, a
slowloris-ish partial header held open while other requests run, and bad Authorization headers.

Requests are sent with a small raw-socket HTTP/1.1 client (`Connection: close`) so that any byte sequence can be
sent and an early answer (413 before the body is sent) is read. For each case: the HTTP status, whether an error has
OpenAI's shape {"error": {"message", "type", "param", "code"}} with a non-empty message, the elapsed time; a "hang" is
no status line within --timeout (30 s). After each case GET /health must answer within 2 s. Jobs a case created
asynchronously (202) are cancelled. At the end: the server is still alive, GET /v1/jobs (paged) and every listed job
answer 200, no job failed with a server error, and the server's RSS before and after.

Prints a table (case, status, ms, ok, message) and a summary line; writes bench/results/serve_attack.json.
Exit code 1 if any case got a 5xx or hung (or a job failed with a server error, or the server died).
"""

from __future__ import annotations

import sys
from pathlib import Path

# the bench lives in bench/attack/ (client, bodies, cases*, run); run as a script, its folder is importable
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attack.run import main  # noqa: E402 - after the path above

if __name__ == "__main__":
    sys.exit(main(doc=__doc__))
