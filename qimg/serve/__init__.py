"""`qimg serve`: an HTTP server for qimg pipelines (FastAPI + uvicorn; install with `pip install 'qimg[serve]'`).

Routes
    GET  /health                       status, models, queue (never needs a key)
    GET  /                             the web page (static files under /static; never need a key)
    POST /v1/images/generations        OpenAI Images API (JSON); `stream=true` for SSE partial images
    POST /v1/images/edits              OpenAI Images API (multipart: `image` or `image[]`, 1-10 files)
    POST /v1/images/layers             RGBA layer decomposition (multipart `image`, `layers`, `resolution`, `prompt`,
                                       `format` psd|ora|pptx|zip|json) -> one PNG per layer + the exported file
    POST /v1/images/layers/export      stored layers (file ids, bottom to top) -> PSD/ORA/PPTX/ZIP
    GET  /v1/models, /v1/models/{id}   the served models with their tasks
    GET  /v1/jobs, /v1/jobs/{id}       jobs, newest first (`limit`, `before`)
    GET  /v1/jobs/{id}/events          SSE: status, progress (step, total, eta, preview), done
    DELETE /v1/jobs/{id}               cancel (queued: dropped; running: stops before its next step)
    GET  /v1/files/{id}                a stored file by its server-generated id

Design
    `app.create_app(settings)` is the composition root. Interfaces in `store` (`JobStore`, `FileStore`), their
    implementations in `store_sqlite` (SQLite, WAL) and `store_disk` (atomic writes); `worker.Worker` runs jobs one
    at a time on a thread and publishes to `events.EventBus`; `runner` calls the pipelines (no HTTP there);
    `api_images` / `api_jobs` are the routes; `security` holds API keys and the body limit; `uploads` checks
    pictures, sizes and prompts. Inference code never imports this package.

Behaviour worth knowing
    * Models are loaded at start on the worker thread (jobs wait in the queue meanwhile); `--lazy` loads each on
      its first job. A model that fails to load is reported by /health and /v1/models; its jobs get HTTP 503.
    * Every accepted image request is a job (`x-qimg-job-id` header on the answer). Requests refused before that
      (malformed body, bad upload, full queue) make no job. `Prefer: respond-async` answers 202 with the job at once.
    * At most `--max-queue` jobs wait behind the running one; beyond: HTTP 429 with Retry-After.
    * On start-up, jobs a previous process left running are marked failed (error type "server_restart") and their
      partial outputs removed; jobs it left queued run again, oldest first (`--no-requeue`: marked failed too);
      finished jobs and files stay and are served.
    * `mask` on edits is refused (HTTP 400): Qwen-Image edits follow the instruction in the prompt.
    * With API keys set every route but `/`, `/static/*`, `/favicon.ico` and `/health` needs
      `Authorization: Bearer <key>` (HTTP 401 otherwise). A non-loopback `--host` without a key is refused.
"""
