"""The study server's API: authentication, isolation of readers, blinding, path traversal,
concurrent writes and a killed server."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import struct
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.study.conftest import METHODS, start_server
from trustmap.study.server import create_app
from trustmap.study.store import Study, read_admin_key


@pytest.fixture
def client(study_copy):
    st = Study.open(study_copy)
    key = read_admin_key(study_copy)
    with TestClient(create_app(st)) as c:
        yield c, st.reader_tokens(key), key


def _state(c, token):
    r = c.get(f"/api/r/{token}/state")
    assert r.status_code == 200, r.text
    return r.json()


def _items(state):
    return [it for q in state["questions"] for it in q["items"]]


def test_missing_forged_and_malformed_tokens_get_no_data(client):
    c, tokens, _ = client
    forged = "A" * len(tokens[0])
    for path in (
        f"/api/r/{forged}/state",
        "/api/r//state",
        "/api/r/state",
        f"/r/{forged}",
        "/api/r/short/state",
    ):
        r = c.get(path)
        assert r.status_code in (401, 403, 404), path
        assert "questions" not in r.text and "png" not in r.headers.get("content-type", "")
    r = c.put(f"/api/r/{forged}/answer/{'0' * 24}", json={"value": 1})
    assert r.status_code == 404


def test_a_reader_cannot_read_or_write_another_readers_items(client):
    c, tokens, key = client
    mine, theirs = _state(c, tokens[0]), _state(c, tokens[1])
    my_ids = {it["id"] for it in _items(mine)} | {q["id"] for q in mine["questions"]}
    their_ids = {it["id"] for it in _items(theirs)} | {q["id"] for q in theirs["questions"]}
    assert not my_ids & their_ids  # ids are per reader: nothing to compare or guess from
    target = _items(theirs)[0]["id"]
    assert c.put(f"/api/r/{tokens[1]}/answer/{target}", json={"value": 2}).status_code == 200
    # Reader 0 tries the other reader's item id, for writing and for its image.
    assert c.put(f"/api/r/{tokens[0]}/answer/{target}", json={"value": -4}).status_code == 404
    assert c.get(f"/api/r/{tokens[0]}/img/{target}").status_code == 404
    assert c.get(f"/api/r/{tokens[0]}/img/{theirs['questions'][0]['id']}").status_code == 404
    # ... and guessed ids of the right shape.
    for guess in ("0" * 24, "f" * 24, target[:-1] + ("0" if target[-1] != "0" else "1")):
        assert c.put(f"/api/r/{tokens[0]}/answer/{guess}", json={"value": 1}).status_code == 404
    assert _state(c, tokens[1])["answers"] == {target: 2}
    assert _state(c, tokens[0])["answers"] == {}
    exported = c.get("/api/admin/export.json", headers={"X-Admin-Key": key}).json()["answers"]
    assert [(a["reader"], a["value"]) for a in exported] == [(1, 2)]


def _png_chunks(data: bytes) -> list[bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, kinds = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        kinds.append(kind)
        pos += 12 + length
    return kinds


def _names(method: str) -> set[str]:
    from trustmap import get_method

    cls = get_method(method)
    spaced = method.replace("_", " ")
    return {method, spaced, method.replace("_", "-"), method.replace("_", ""), cls.__name__}


def test_no_response_reveals_a_method(client):
    c, tokens, _ = client
    forbidden = set().union(*(_names(m) for m in METHODS)) | {"Grad-CAM", "gradient"}
    token = tokens[2]
    bodies = {}
    state_resp = c.get(f"/api/r/{token}/state")
    bodies["state"] = state_resp.content
    for path in (f"/r/{token}", "/static/reader.js", "/static/style.css", "/"):
        r = c.get(path)
        assert r.status_code == 200
        bodies[path] = r.content
    state = state_resp.json()
    images = [q["image"] for q in state["questions"]] + [it["image"] for it in _items(state)]
    for url in images:
        r = c.get(url)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        # No text chunk at all (tEXt, zTXt, iTXt, eXIf) that could carry a name.
        assert set(_png_chunks(r.content)) <= {b"IHDR", b"IDAT", b"IEND", b"PLTE", b"tRNS"}
        bodies[url] = r.content
        assert "filename" not in r.headers.get("content-disposition", "")
    for where, body in bodies.items():
        text = body.decode("latin-1").lower()
        for name in forbidden:
            assert name.lower() not in text, (name, where)
    # Ids are random: the same method's panels have unrelated ids and urls in every question.
    assert len(set(images)) == len(images)


def test_admin_endpoints_need_the_admin_key(client):
    c, tokens, key = client
    for path in ("/api/admin/export.csv", "/api/admin/export.json", "/api/admin/progress"):
        assert c.get(path).status_code == 401
        bad = c.get(path, headers={"X-Admin-Key": tokens[0]})
        assert bad.status_code == 403 and "answers" not in bad.text and "reader" not in bad.text
        assert c.get(path, params={"admin_key": key}).status_code == 401  # never from a URL
        assert c.get(path, headers={"Authorization": f"Bearer {key}"}).status_code == 200
    links = c.get("/api/admin/readers", headers={"X-Admin-Key": key}).json()
    assert [x["url"].rsplit("/", 1)[1] for x in links] == [tokens[r] for r in sorted(tokens)]


def test_path_traversal_is_refused(client):
    c, tokens, _ = client
    t = tokens[0]
    for path in (
        "/static/../store.py",
        "/static/..%2fstore.py",
        "/static/%2e%2e%2fserver.py",
        f"/api/r/{t}/img/..%2f..%2f..%2fetc%2fpasswd",
        f"/api/r/{t}/img/....//....//etc//passwd",
        "/api/r/..%2f..%2fstudy.sqlite/state",
        f"/r/{t}/../../ADMIN_KEY",
        "/static/reader.js%00.py",
    ):
        r = c.get(path)
        assert r.status_code in (400, 404), path
        assert b"SQLite" not in r.content and b"def " not in r.content
    r = c.put(f"/api/r/{t}/answer/..%2f..%2fx", json={"value": 1})
    assert r.status_code == 404


def test_answers_are_validated(client):
    c, tokens, _ = client
    item = _items(_state(c, tokens[0]))[0]["id"]
    url = f"/api/r/{tokens[0]}/answer/{item}"
    for body in ({"value": 5}, {"value": -5}, {"value": 1.5}, {"value": True}, {"value": "2"}, {}):
        assert c.put(url, json=body).status_code == 422, body
    assert c.put(url, json={"value": 1, "extra": 1}).status_code == 422
    assert c.put(url, json={"value": 1, "time_ms": -3}).status_code == 422
    ok = c.put(url, json={"value": -4, "time_ms": 1500})
    assert ok.status_code == 200 and ok.json()["revision"] == 1
    again = c.put(url, json={"value": 4})
    assert again.json()["revision"] == 2 and again.json()["answered"] == 1


def test_security_headers_and_no_external_resources(client):
    c, tokens, _ = client
    page = c.get(f"/r/{tokens[0]}")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["referrer-policy"] == "no-referrer"
    for body in (page.text, c.get("/static/reader.js").text, c.get("/static/style.css").text):
        assert "http://" not in body and "https://" not in body and "//cdn" not in body


def test_200_concurrent_writes_from_8_readers_lose_nothing(trained_model, tmp_path):
    from trustmap.study import create_study

    data, run = trained_model
    made = create_study(
        tmp_path / "s", methods=METHODS[:2], dataset=data, model=run, n_cases=6, n_readers=8
    )
    proc, base = start_server(tmp_path / "s")
    try:
        plans = {}
        with httpx.Client(base_url=base) as h:
            for r, token in enumerate(made.tokens):
                items = _items(h.get(f"/api/r/{token}/state").json())[:25]
                plans[r] = [(it["id"], (i + r) % 9 - 4) for i, it in enumerate(items)]
        assert sum(len(p) for p in plans.values()) == 200
        failures = []
        barrier = threading.Barrier(8)

        def reader(r: int) -> None:
            with httpx.Client(base_url=base, timeout=30) as h:
                barrier.wait()
                for item, value in plans[r]:
                    resp = h.put(f"/api/r/{made.tokens[r]}/answer/{item}", json={"value": value})
                    if resp.status_code != 200:
                        failures.append(resp.text)

        threads = [threading.Thread(target=reader, args=(r,)) for r in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert failures == []
        with httpx.Client(base_url=base) as h:
            rows = h.get("/api/admin/export.json", headers={"X-Admin-Key": made.admin_key})
        got = {(a["reader"], a["item"]): a["value"] for a in rows.json()["answers"]}
        want = {(r, item): v for r, plan in plans.items() for item, v in plan}
        assert got == want
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()


def test_sigkill_mid_write_loses_no_committed_answer(live_server):
    study_dir, base, proc = live_server
    key = read_admin_key(study_dir)
    tokens = Study.open(study_dir).reader_tokens(key)
    with httpx.Client(base_url=base) as h:
        work = [
            (tokens[r], it["id"])
            for r in tokens
            for it in _items(h.get(f"/api/r/{tokens[r]}/state").json())
        ]
    acked: dict[str, int] = {}
    stop = threading.Event()

    def writer(part: list[tuple[str, str]], offset: int) -> None:
        with httpx.Client(base_url=base, timeout=5) as h:
            for k, (token, item) in enumerate(part):
                if stop.is_set():
                    return
                value = (k + offset) % 9 - 4
                try:
                    resp = h.put(f"/api/r/{token}/answer/{item}", json={"value": value})
                except httpx.HTTPError:
                    return
                if resp.status_code == 200:
                    acked[item] = value

    threads = [threading.Thread(target=writer, args=(work[k::4], k)) for k in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while len(acked) < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)  # mid-write: the writers are still sending
    proc.wait(10)
    stop.set()
    for t in threads:
        t.join()
    assert len(acked) >= 40
    con = sqlite3.connect(study_dir / "study.sqlite")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = dict(con.execute("SELECT item_id, value FROM answers"))
    con.close()
    missing = {i: v for i, v in acked.items() if stored.get(i) != v}
    assert missing == {}
    # The file opens cleanly and the server starts again on it.
    again, base2 = start_server(study_dir)
    try:
        r = httpx.get(f"{base2}/api/admin/progress", headers={"X-Admin-Key": key})
        assert sum(x["answered"] for x in r.json()["readers"]) == len(stored)
    finally:
        again.terminate()
        again.wait(10)
        again.stdout.close()


def test_export_csv_matches_json(client):
    c, tokens, key = client
    state = _state(c, tokens[3])
    for k, it in enumerate(_items(state)[:5]):
        c.put(f"/api/r/{tokens[3]}/answer/{it['id']}", json={"value": k - 2})
    rows = c.get("/api/admin/export.json", headers={"X-Admin-Key": key}).json()["answers"]
    csv_text = c.get("/api/admin/export.csv", headers={"X-Admin-Key": key}).text
    lines = csv_text.strip().splitlines()
    assert len(lines) == 1 + len(rows) == 6
    assert all(a["method"] in METHODS for a in rows)
    assert json.dumps(sorted(a["value"] for a in rows)) == "[-2, -1, 0, 1, 2]"
