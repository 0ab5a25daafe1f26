"""The study's web server (FastAPI on uvicorn): reader pages, answers, admin export.

Routes
------
``GET /r/{token}``
    The reader page (one HTML file with bundled script and style; no external resource).
``GET /api/r/{token}/state``
    The reader's own questions, in their order, and their answers so far.
``GET /api/r/{token}/img/{id}``
    A picture of one of the reader's own questions (its reference image) or panels.
``PUT /api/r/{token}/answer/{item}``
    Save one answer (``{"value": int, "time_ms": float | null}``) in one transaction.
``GET /admin``
    The admin page: asks for the admin key, shows progress, exports, reader links.
``GET /api/admin/{progress, readers, export.csv, export.json}``
    Need the admin key in an ``X-Admin-Key`` (or ``Authorization: Bearer``) header, never
    in a URL: 401 without it, 403 with a wrong one.

Blinding: a reader sees random ids only (a new id per reader, question and panel), images
without any metadata, and no method name anywhere. A token or id of another reader, a
forged one, or one with any character outside ``[A-Za-z0-9_-]`` (path traversal) gets 404
and no data.
"""

# No "from __future__ import annotations": FastAPI reads the endpoints' annotations at run
# time, and the request and body types are defined inside create_app.
import contextlib
import csv
import errno
import io
import os
import re
import socket
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

from trustmap.study.design import CONFIDENCE_SCALE
from trustmap.study.store import Study, hash_secret

__all__ = ["bind_socket", "create_app", "serve"]

_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_STATIC = {
    "reader.js": "text/javascript; charset=utf-8",
    "admin.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self'; script-src 'self'; style-src 'self'; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
        "form-action 'none'"
    ),
}


def _asset(name: str) -> bytes:
    return resources.files("trustmap.study").joinpath("static", name).read_bytes()


def _require_web() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "the study server needs FastAPI and uvicorn: pip install 'trustmap[study]'"
        ) from err


def create_app(study: Study | str | os.PathLike[str]) -> Any:
    """The FastAPI application serving ``study`` (a :class:`Study` or its path)."""
    _require_web()
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from pydantic import BaseModel, ConfigDict

    if not isinstance(study, Study):
        study = Study.open(study)
    meta = study.meta
    design = meta["design"]
    classes = list(meta.get("classes") or [])
    rating_values = set(range(int(meta["scale"]["low"]), int(meta["scale"]["high"]) + 1))
    allowed = {
        "rating": rating_values,
        "confidence": set(CONFIDENCE_SCALE.values),
        "diagnosis": set(range(len(classes))),
    }
    criteria = {
        c["name"]: {"label": c["label"], "prompt": c["prompt"]} for c in meta.get("criteria", [])
    }
    # Readers, items and pictures never change once the study is created: look them up
    # in memory (an answer then costs one write transaction and nothing else).
    con = study.con
    reader_by_hash = dict(con.execute("SELECT token_hash, reader_id FROM readers"))
    item_owner = {
        i: (int(r), f, g)
        for i, r, f, g in con.execute("SELECT item_id, reader_id, field, image_id FROM items")
    }
    question_owner = {
        q: (int(r), g)
        for q, r, g in con.execute("SELECT question_id, reader_id, ref_image FROM questions")
    }
    pngs: dict[str, bytes] = {}

    def png(image_id: str) -> bytes:
        data = pngs.get(image_id)
        if data is None:
            row = study.con.execute(
                "SELECT png FROM images WHERE image_id = ?", (image_id,)
            ).fetchone()
            data = pngs[image_id] = bytes(row[0])
        return data

    assets = {name: _asset(name) for name in _STATIC}
    reader_html = _asset("reader.html")
    admin_html = _asset("admin.html")
    index_html = _asset("index.html")

    app = FastAPI(
        title="trustmap reader study",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )

    @app.middleware("http")
    async def headers(request: Request, call_next: Callable[[Request], Any]) -> Any:
        start = time.perf_counter()
        response = await call_next(request)
        # The time the application spent (queueing for a worker thread included), so a
        # load test can tell the server's share of a latency from the network's.
        response.headers["Server-Timing"] = f"app;dur={1000 * (time.perf_counter() - start):.2f}"
        for key, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    class Answer(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        value: int
        time_ms: float | None = None

    def reader(token: str) -> int:
        found = reader_by_hash.get(hash_secret(token)) if _ID.match(token) else None
        if found is None:
            raise HTTPException(404, "unknown reader link")
        return int(found)

    def admin(request: Request) -> str:
        key = request.headers.get("x-admin-key")
        auth = request.headers.get("authorization", "")
        if not key and auth.lower().startswith("bearer "):
            key = auth[7:]
        if not key:
            raise HTTPException(401, "the admin key is missing (X-Admin-Key header)")
        if not study.check_admin(key.strip()):
            raise HTTPException(403, "wrong admin key")
        return key.strip()

    @app.get("/", response_class=HTMLResponse)
    def index() -> Response:
        return HTMLResponse(index_html)

    @app.get("/favicon.ico")
    def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        if name not in assets:
            raise HTTPException(404, "not found")
        return Response(
            assets[name],
            media_type=_STATIC[name],
            headers={"Cache-Control": "public, max-age=300"},
        )

    @app.get("/r/{token}", response_class=HTMLResponse)
    def reader_page(token: str) -> Response:
        reader(token)
        return HTMLResponse(reader_html)

    @app.get("/admin", response_class=HTMLResponse)
    def admin_page() -> Response:
        return HTMLResponse(admin_html)

    @app.get("/api/r/{token}/state")
    def state(token: str) -> Any:
        rid = reader(token)
        con = study.con
        questions = con.execute(
            "SELECT q.question_id, q.criterion, q.show_prediction, c.predicted, c.probability "
            "FROM questions q JOIN cases c ON c.case_id = q.case_id "
            "WHERE q.reader_id = ? ORDER BY q.seq",
            (rid,),
        ).fetchall()
        items: dict[str, list[dict[str, Any]]] = {}
        for qid, item, field in con.execute(
            "SELECT question_id, item_id, field FROM items WHERE reader_id = ? ORDER BY slot",
            (rid,),
        ):
            entry = {"id": item, "field": field}
            if field == "rating":
                entry["image"] = f"/api/r/{token}/img/{item}"
            items.setdefault(qid, []).append(entry)
        answers = dict(
            con.execute("SELECT item_id, value FROM answers WHERE reader_id = ?", (rid,))
        )
        out = []
        for qid, criterion, show_pred, predicted, probability in questions:
            q: dict[str, Any] = {
                "id": qid,
                "image": f"/api/r/{token}/img/{qid}",
                "items": items.get(qid, []),
            }
            if criterion is not None:
                q["criterion"] = criterion
            if show_pred:
                q["prediction"] = {
                    "label": classes[predicted] if predicted < len(classes) else str(predicted),
                    "probability": round(float(probability), 3),
                }
            out.append(q)
        body: dict[str, Any] = {
            "design": design,
            "title": meta.get("title", ""),
            "questions": out,
            "answers": answers,
        }
        if design == "rating":
            body["scale"] = meta["scale"]
            body["criteria"] = criteria
        else:
            body["classes"] = classes
            body["confidence"] = CONFIDENCE_SCALE.to_dict()
        return JSONResponse(body)

    @app.get("/api/r/{token}/img/{image}")
    def image(token: str, image: str) -> Response:
        rid = reader(token)
        if not _ID.match(image):
            raise HTTPException(404, "no such image")
        owner = item_owner.get(image)
        if owner is not None and owner[0] == rid and owner[2] is not None:
            image_id = owner[2]
        else:
            q_owner = question_owner.get(image)
            if q_owner is None or q_owner[0] != rid or q_owner[1] is None:
                raise HTTPException(404, "no such image")
            image_id = q_owner[1]
        return Response(
            png(image_id),
            media_type="image/png",
            headers={"Cache-Control": "private, max-age=3600"},
        )

    @app.put("/api/r/{token}/answer/{item}")
    def answer(token: str, item: str, body: Answer) -> Any:
        rid = reader(token)
        if not _ID.match(item):
            raise HTTPException(404, "no such item")
        owner = item_owner.get(item)
        if owner is None or owner[0] != rid:
            raise HTTPException(404, "no such item")
        if body.value not in allowed[owner[1]]:
            low, high = min(allowed[owner[1]]), max(allowed[owner[1]])
            raise HTTPException(422, f"value must be an integer in {low} ... {high}")
        if body.time_ms is not None and not 0 <= body.time_ms < 1e9:
            raise HTTPException(422, "time_ms must be a non-negative number of milliseconds")
        revision, answered = study.save_answer(rid, item, body.value, body.time_ms)
        return {"item": item, "value": body.value, "revision": revision, "answered": answered}

    @app.get("/api/admin/progress")
    def progress(request: Request) -> Any:
        admin(request)
        return {"title": meta.get("title", ""), "design": design, "readers": study.progress()}

    @app.get("/api/admin/readers")
    def readers(request: Request) -> Any:
        key = admin(request)
        base = str(request.base_url).rstrip("/")
        variants = {p["reader"]: p["variant"] for p in study.progress()}
        return [
            {"reader": r, "variant": variants.get(r, ""), "url": f"{base}/r/{t}"}
            for r, t in study.reader_tokens(key).items()
        ]

    @app.get("/api/admin/export.json")
    def export_json(request: Request) -> Any:
        key = admin(request)
        return {"meta": public_meta(), "answers": study.export(key)}

    @app.get("/api/admin/export.csv")
    def export_csv(request: Request) -> Response:
        key = admin(request)
        return Response(
            rows_to_csv(study.export(key)),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": 'attachment; filename="answers.csv"'},
        )

    def public_meta() -> dict[str, Any]:
        hidden = {"admin_key_hash", "key_salt", "blinding_key"}
        return {k: v for k, v in meta.items() if k not in hidden}

    return app


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    """The exported answers as CSV text (header from the first row)."""
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port).

    Raises
    ------
    ValueError
        If the port is in use or the address cannot be bound, in one line.
    """
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be within 0 ... 65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise ValueError(f"cannot resolve --host {host!r}: {err.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if os.name != "nt":
            # Lets a restarted server reuse a port in TIME_WAIT, but never one in use.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise ValueError(
                f"port {port} on {host} is already in use: stop the other server or choose "
                "another --port"
            ) from None
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    sock.set_inheritable(True)
    return sock


def serve(
    path: str | os.PathLike[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    on_ready: Callable[[str], None] | None = None,
    log_level: str = "warning",
    sync: str = "normal",
) -> None:
    """Serve the study until interrupted; ``on_ready(base_url)`` once listening.

    Binds to loopback by default. ``sync="full"`` flushes every answer to disk (see
    :mod:`trustmap.study.store`). Raises ValueError (one line) for a port in use and the
    errors of :meth:`Study.open` for a bad study file.
    """
    _require_web()
    import uvicorn

    study = Study.open(path, sync=sync)
    app = create_app(study)
    sock = bind_socket(host, port)
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    base = f"http://{shown}:{bound[1]}"
    config = uvicorn.Config(
        app,
        log_level=log_level,
        access_log=False,
        lifespan="off",
        timeout_keep_alive=30,
        server_header=False,
    )
    server = uvicorn.Server(config)
    if on_ready is not None:
        on_ready(base)
    try:
        server.run(sockets=[sock])
    finally:
        with contextlib.suppress(OSError):
            sock.close()
        study.close()
