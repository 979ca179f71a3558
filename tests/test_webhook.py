"""The webhook receiver in process: every status code, signatures, idempotency, recovery.

The signatures the tests send are computed here with hmac/hashlib directly (not with the code
under test), and checked against the published vector of the Standard Webhooks repository.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.events import Event, loads
from common.retry import Backoff
from common.storage import LineReader
from common.waiting import wait_until
from level_3_advanced.webhook import demo
from level_3_advanced.webhook.eventbus_webhook import WebhookBus, build_bus, wire_listeners
from level_3_advanced.webhook.sign import DeliveryError, WebhookSender
from level_3_advanced.webhook.sign import main as sign_main
from level_3_advanced.webhook.standard_webhooks import (
    SignatureError,
    Verifier,
    decode_secret,
    sign,
)
from level_3_advanced.webhook.store import StorageError, WebhookStore
from level_3_advanced.webhook.webhook_server import ServerThread, WebhookService, create_app

KEY = b"an-independent-test-key-0123456789"
SECRET = "whsec_" + base64.b64encode(KEY).decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"some-other-key-abcdefghijklmnop").decode()
BODY = b'{"order_id": 777, "status": "created"}'


# -- helpers ---------------------------------------------------------------------------------
def ref_signature(key: bytes, msg_id: str, ts: int | str, body: bytes) -> str:
    """The Standard Webhooks signature, computed independently of the code under test."""
    mac = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def signed(
    body: bytes = BODY,
    *,
    msg_id: str = "msg_test",
    ts: int | None = None,
    key: bytes = KEY,
    content_type: str | None = "application/json",
) -> dict[str, str]:
    ts = int(time.time()) if ts is None else ts
    headers = {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": ref_signature(key, msg_id, ts, body),
    }
    if content_type is not None:
        headers["Content-Type"] = content_type
    return headers


def lines(path: Path) -> list[dict[str, Any]]:
    return [loads(line) for _, line in LineReader(path)] if path.exists() else []


def service_of(app: Flask) -> WebhookService:
    return app.extensions["webhook"]


def wait_idle(app: Flask, timeout: float = 10.0) -> None:
    service = service_of(app)
    wait_until(
        lambda: service.store is not None and service.store.unhandled == 0 and not service._backlog,
        timeout,
        message="every accepted event to be handled",
    )


@pytest.fixture
def make_app(tmp_path: Path) -> Iterator[Callable[..., Flask]]:
    apps: list[Flask] = []

    def factory(data_dir: Path | None = None, *, bus: WebhookBus | None = None, **config: Any):
        cfg = {"WEBHOOK_DATA_DIR": str(data_dir or tmp_path / "wh"), "WEBHOOK_SECRET": SECRET}
        cfg.update(config)
        app = create_app(cfg, bus=bus)
        apps.append(app)
        return app

    yield factory
    for app in apps:
        service_of(app).close(timeout=10.0)


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


# -- signatures ------------------------------------------------------------------------------
def test_published_standard_webhooks_vector() -> None:
    # From standard-webhooks/standard-webhooks, libraries/python/tests/test_webhooks.py.
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    msg_id, ts, body = "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}'
    expected = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert sign(secret, msg_id, ts, body) == expected
    assert ref_signature(base64.b64decode(secret[6:]), msg_id, ts, body) == expected
    verifier = Verifier(secret, clock=lambda: ts + 10)
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": expected}
    assert verifier.verify(headers, body) == msg_id
    with pytest.raises(SignatureError, match="too old"):
        Verifier(secret, clock=lambda: ts + 301).verify(headers, body)


def test_secret_decoding() -> None:
    assert decode_secret(SECRET) == KEY
    assert decode_secret("plain passphrase") == b"plain passphrase"
    assert decode_secret(b"raw") == b"raw"
    with pytest.raises(ValueError, match="base64"):
        decode_secret("whsec_not*base64")
    with pytest.raises(ValueError, match="empty"):
        decode_secret("whsec_")


def test_sign_matches_independent_hmac_for_plain_secret() -> None:
    assert sign("dev-secret", "m1", 1700000000, BODY) == ref_signature(
        b"dev-secret", "m1", 1700000000, BODY
    )


# -- every status code, table-driven ---------------------------------------------------------
def _case(
    body: bytes = BODY, headers: dict[str, str] | None = None, **kw: Any
) -> tuple[bytes, dict[str, str]]:
    if "age" in kw:  # seconds before now, taken when the case runs (not when it is collected)
        kw["ts"] = int(time.time()) - kw.pop("age")
    return body, signed(body, **kw) if headers is None else headers


def _tampered() -> tuple[bytes, dict[str, str]]:
    headers = signed(BODY)
    return BODY.replace(b"777", b"778"), headers


def _rotation() -> tuple[bytes, dict[str, str]]:
    headers = signed(BODY, msg_id="msg_rot")
    stale = ref_signature(b"old-key", "msg_rot", headers["webhook-timestamp"], BODY)
    headers["webhook-signature"] = f"v1a,abc {stale} v1,!!notbase64 {headers['webhook-signature']}"
    return BODY, headers


def _only_v1a() -> tuple[bytes, dict[str, str]]:
    headers = signed(BODY)
    headers["webhook-signature"] = headers["webhook-signature"].replace("v1,", "v1a,")
    return BODY, headers


def _without(name: str) -> tuple[bytes, dict[str, str]]:
    headers = signed(BODY)
    del headers[name]
    return BODY, headers


def _bad_timestamp() -> tuple[bytes, dict[str, str]]:
    headers = signed(BODY)
    headers["webhook-timestamp"] = "yesterday"
    return BODY, headers


def _with(body: bytes, **kw: Any) -> Callable[[], tuple[bytes, dict[str, str]]]:
    return lambda: _case(body, **kw)


CASES: list[tuple[str, Callable[[], tuple[bytes, dict[str, str]]], int, str]] = [
    ("valid", _with(BODY), 202, ""),
    ("extra fields ignored", _with(b'{"order_id": 1, "status": "paid", "x": [1]}'), 202, ""),
    ("charset utf-8", _with(BODY, content_type="application/json; charset=utf-8"), 202, ""),
    ("timestamp 4 minutes old", _with(BODY, age=240), 202, ""),
    ("rotation: several signatures", _rotation, 202, ""),
    ("text/plain", _with(BODY, content_type="text/plain"), 415, "Content-Type"),
    ("no content type", _with(BODY, content_type=None), 415, "Content-Type"),
    ("latin-1", _with(BODY, content_type="application/json; charset=latin-1"), 415, "UTF-8"),
    ("malformed JSON", _with(b'{"order_id": 7'), 400, "not valid JSON"),
    ("invalid UTF-8", _with(b'{"order_id": 7, "status": "\xff"}'), 400, "not valid JSON"),
    ("JSON array", _with(b"[1, 2]"), 400, "JSON object"),
    ("missing order_id", _with(b'{"status": "paid"}'), 400, "'order_id' is required"),
    ("order_id zero", _with(b'{"order_id": 0, "status": "paid"}'), 400, "'order_id'"),
    ("order_id negative", _with(b'{"order_id": -5, "status": "paid"}'), 400, "'order_id'"),
    ("order_id string", _with(b'{"order_id": "777", "status": "paid"}'), 400, "'order_id'"),
    ("order_id float", _with(b'{"order_id": 7.0, "status": "paid"}'), 400, "'order_id'"),
    ("order_id bool", _with(b'{"order_id": true, "status": "paid"}'), 400, "'order_id'"),
    ("order_id 2**63", _with(b'{"order_id": 9223372036854775808, "status": "paid"}'), 400, ""),
    ("missing status", _with(b'{"order_id": 7}'), 400, "'status' is required"),
    ("unknown status", _with(b'{"order_id": 7, "status": "lost"}'), 400, "'status' must be"),
    ("status not a string", _with(b'{"order_id": 7, "status": ["paid"]}'), 400, "'status'"),
    (
        "too large",
        _with(b'{"order_id": 7, "status": "paid", "pad": "' + b"x" * 70_000 + b'"}'),
        413,
        "larger than",
    ),
    ("no signature", lambda: _without("webhook-signature"), 401, "webhook-signature"),
    ("no webhook-id", lambda: _without("webhook-id"), 401, "webhook-id"),
    ("no timestamp", lambda: _without("webhook-timestamp"), 401, "webhook-timestamp"),
    ("timestamp not a number", _bad_timestamp, 401, "invalid webhook-timestamp"),
    ("timestamp 6 minutes old", _with(BODY, age=360), 401, "too old"),
    ("timestamp 6 minutes ahead", _with(BODY, age=-360), 401, "too new"),
    ("wrong secret", _with(BODY, key=b"wrong"), 401, "no matching signature"),
    ("body changed after signing", _tampered, 401, "no matching signature"),
    ("only v1a signatures", _only_v1a, 401, "no v1 signature"),
    ("webhook-id with a space", _with(BODY, msg_id="msg 1"), 401, "invalid webhook-id"),
]


@pytest.mark.parametrize(("name", "build", "status", "error"), CASES, ids=[c[0] for c in CASES])
def test_status_codes(
    client: FlaskClient,
    name: str,
    build: Callable[[], tuple[bytes, dict[str, str]]],
    status: int,
    error: str,
) -> None:
    body, headers = build()
    response = client.post("/webhook/order", data=body, headers=headers)
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    payload = response.get_json()
    if status >= 400:
        assert set(payload) == {"error"}
        assert error in payload["error"]
    else:
        assert isinstance(payload["event_id"], str)


def test_nothing_starts_before_the_first_request(make_app: Callable[..., Flask]) -> None:
    before = threading.active_count()
    app = make_app()
    service = service_of(app)
    assert threading.active_count() == before  # no threads, no files: a pre-fork master is safe
    assert service.store is None and not service.started
    assert app.test_client().post("/webhook/order", data=BODY, headers=signed()).status_code == 202
    assert service.started and threading.active_count() > before


def test_other_methods_and_paths_answer_json(client: FlaskClient) -> None:
    response = client.get("/webhook/order")
    assert response.status_code == 405
    assert "POST" in response.headers["Allow"]
    assert "error" in response.get_json()
    response = client.post("/webhook/nothing", data=BODY)
    assert response.status_code == 404
    assert "error" in response.get_json()


def test_receiver_side_rotation_accepts_old_and_new_secret(make_app: Callable[..., Flask]) -> None:
    client = make_app(WEBHOOK_SECRET=f"{OTHER_SECRET} {SECRET}").test_client()
    assert client.post("/webhook/order", data=BODY, headers=signed(msg_id="a")).status_code == 202
    other_key = base64.b64decode(OTHER_SECRET[6:])
    response = client.post("/webhook/order", data=BODY, headers=signed(msg_id="b", key=other_key))
    assert response.status_code == 202


def test_rejections_are_counted_and_nothing_is_recorded(app: Flask, client: FlaskClient) -> None:
    client.post("/webhook/order", data=BODY, headers=signed(key=b"wrong"))
    client.post("/webhook/order", data=b"{", headers=signed(b"{"))
    client.post("/webhook/order", data=BODY, headers=signed(content_type="text/plain"))
    metrics = client.get("/metrics").get_json()
    assert metrics["rejected"] == {
        "bad_signature": 1,
        "invalid_json": 1,
        "unsupported_media_type": 1,
    }
    assert metrics["accepted"] == 0
    assert lines(service_of(app).data_dir / "accepted.log") == []


# -- random input never produces a 500 -------------------------------------------------------
header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)
order_like = st.fixed_dictionaries(
    {},
    optional={
        "order_id": st.one_of(st.integers(), json_values),
        "status": st.one_of(
            st.sampled_from(["created", "paid", "shipped", "cancelled"]), json_values
        ),
    },
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    body=st.one_of(st.binary(max_size=200), order_like.map(lambda d: repr(d).encode())),
    json_body=order_like,
    use_json=st.booleans(),
    sign_it=st.booleans(),
    content_type=st.sampled_from(
        ["application/json", "text/plain", "", "application/json; charset=x", "application/x+json"]
    ),
    extra=st.dictionaries(
        st.sampled_from(
            ["webhook-id", "webhook-timestamp", "webhook-signature", "Idempotency-Key"]
        ),
        header_text,
        max_size=3,
    ),
)
def test_random_requests_never_500(
    app: Flask,
    body: bytes,
    json_body: dict[str, Any],
    use_json: bool,
    sign_it: bool,
    content_type: str,
    extra: dict[str, str],
) -> None:
    if use_json:
        body = json.dumps(json_body).encode()  # the standard library: any integer size
    headers = (
        signed(body, msg_id=f"msg_{os.urandom(6).hex()}", content_type=None) if sign_it else {}
    )
    headers.update(extra)
    if content_type:
        headers["Content-Type"] = content_type
    response = app.test_client().post("/webhook/order", data=body, headers=headers)
    assert response.status_code in (200, 202, 400, 401, 413, 415, 422), response.get_data()
    assert response.mimetype == "application/json"
    assert isinstance(response.get_json(), dict)


# -- idempotency -----------------------------------------------------------------------------
def test_repeated_webhook_id_returns_original_and_emits_nothing(
    app: Flask, client: FlaskClient
) -> None:
    first = client.post("/webhook/order", data=BODY, headers=signed(msg_id="msg_once"))
    assert first.status_code == 202
    event_id = first.get_json()["event_id"]
    # A retry is signed again with a later timestamp: still the same message.
    later = signed(msg_id="msg_once", ts=int(time.time()) + 5)
    again = client.post("/webhook/order", data=BODY, headers=later)
    assert again.status_code == 200
    assert again.get_json() == {"event_id": event_id, "duplicate": True}
    wait_idle(app)
    service = service_of(app)
    assert service.bus is not None and service.bus.join(10.0)
    data_dir = service.data_dir
    assert [r["id"] for r in lines(data_dir / "accepted.log")] == [event_id]
    assert [r["data"]["event_id"] for r in lines(data_dir / "handled.log")] == [event_id]
    metrics = client.get("/metrics").get_json()
    assert (metrics["accepted"], metrics["duplicates"], metrics["handled"]) == (1, 1, 1)


def test_same_key_with_another_payload_is_422(client: FlaskClient) -> None:
    assert client.post("/webhook/order", data=BODY, headers=signed(msg_id="k")).status_code == 202
    other = b'{"order_id": 777, "status": "paid"}'
    response = client.post("/webhook/order", data=other, headers=signed(other, msg_id="k"))
    assert response.status_code == 422
    assert "different payload" in response.get_json()["error"]


def test_idempotency_key_header_without_secret(make_app: Callable[..., Flask]) -> None:
    app = make_app(WEBHOOK_SECRET="")
    client = app.test_client()
    headers = {"Content-Type": "application/json", "Idempotency-Key": "order-777-created"}
    first = client.post("/webhook/order", data=BODY, headers=headers)
    second = client.post("/webhook/order", data=BODY, headers=headers)
    assert (first.status_code, second.status_code) == (202, 200)
    assert first.get_json()["event_id"] == second.get_json()["event_id"]
    # No key at all: nothing to deduplicate on, each request is a new event.
    plain = {"Content-Type": "application/json"}
    a = client.post("/webhook/order", data=BODY, headers=plain).get_json()["event_id"]
    b = client.post("/webhook/order", data=BODY, headers=plain).get_json()["event_id"]
    assert a != b
    bad = client.post("/webhook/order", data=BODY, headers={**plain, "Idempotency-Key": "a b"})
    assert bad.status_code == 400


def test_concurrent_duplicates_get_one_event(app: Flask) -> None:
    results: list[tuple[int, str]] = []
    lock = threading.Lock()
    headers = signed(msg_id="msg_race")

    def post() -> None:
        response = app.test_client().post("/webhook/order", data=BODY, headers=headers)
        with lock:
            results.append((response.status_code, response.get_json()["event_id"]))

    threads = [threading.Thread(target=post) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    statuses = sorted(status for status, _ in results)
    assert statuses == [200] * 7 + [202]
    assert len({event_id for _, event_id in results}) == 1


def test_duplicate_is_recognised_after_restart(
    make_app: Callable[..., Flask], tmp_path: Path
) -> None:
    first_app = make_app(tmp_path / "d")
    first = first_app.test_client().post("/webhook/order", data=BODY, headers=signed(msg_id="r"))
    wait_idle(first_app)
    service_of(first_app).close()
    second_app = make_app(tmp_path / "d")
    again = second_app.test_client().post("/webhook/order", data=BODY, headers=signed(msg_id="r"))
    assert again.status_code == 200
    assert again.get_json()["event_id"] == first.get_json()["event_id"]
    assert len(lines(tmp_path / "d" / "handled.log")) == 1


# -- the workers -----------------------------------------------------------------------------
def test_workers_send_email_and_count(app: Flask, client: FlaskClient) -> None:
    for i, status in enumerate(["created", "paid", "shipped", "created"]):
        body = f'{{"order_id": {100 + i}, "status": "{status}"}}'.encode()
        assert (
            client.post(
                "/webhook/order", data=body, headers=signed(body, msg_id=f"m{i}")
            ).status_code
            == 202
        )
    wait_idle(app)
    orders = client.get("/metrics").get_json()["orders"]
    assert orders["emails"] == 2
    assert orders["by_status"] == {"created": 2, "paid": 1, "shipped": 1}
    emails = [e["to"] for e in service_of(app).projection.outbox]
    assert sorted(emails) == ["customer-100@example.com", "customer-103@example.com"]
    health = client.get("/health")
    assert health.status_code == 200
    assert health.get_json()["queue_depth"] == 0


def test_failing_listener_is_dead_lettered_and_recorded_once(
    make_app: Callable[..., Flask], tmp_path: Path
) -> None:
    bus = WebhookBus(1, 100, max_retries=1, backoff=Backoff(base=0.001, cap=0.001))
    wire_listeners(bus)

    def broken_crm(event: Event) -> None:
        raise ConnectionError("CRM is down")

    bus.subscribe("order.paid", broken_crm)
    app = make_app(tmp_path / "f", bus=bus)
    body = b'{"order_id": 5, "status": "paid"}'
    response = app.test_client().post("/webhook/order", data=body, headers=signed(body))
    assert response.status_code == 202
    wait_idle(app)
    metrics = app.test_client().get("/metrics").get_json()
    assert (metrics["handled"], metrics["failed"]) == (0, 1)
    (record,) = lines(tmp_path / "f" / "handled.log")
    assert record["data"]["failed"] is True
    assert "CRM is down" in record["data"]["error"]
    assert record["data"]["effects"] == [{"kind": "analytics", "order_id": 5, "status": "paid"}]
    service_of(app).close()
    bus.close(5.0)
    # A failed event is settled (dead-lettered), not handled again after a restart.
    restarted = make_app(tmp_path / "f")
    service_of(restarted).start()
    assert service_of(restarted).metrics.snapshot()["recovered"] == 0


def test_an_effect_that_is_not_json_settles_the_event_as_failed(
    make_app: Callable[..., Flask], tmp_path: Path
) -> None:
    bus = WebhookBus(1, 100)
    bus.subscribe("order.*", lambda event: bus.effects.add(event, {"kind": "x", "v": object()}))
    app = make_app(tmp_path / "nj", bus=bus)
    client = app.test_client()
    assert client.post("/webhook/order", data=BODY, headers=signed()).status_code == 202
    wait_idle(app)
    (record,) = lines(tmp_path / "nj" / "handled.log")
    assert record["data"]["failed"] is True
    assert "effects not recordable" in record["data"]["error"]
    other = b'{"order_id": 8, "status": "paid"}'
    assert (
        client.post("/webhook/order", data=other, headers=signed(other, msg_id="m2")).status_code
        == 202
    )
    service_of(app).close()
    bus.close(5.0)


def test_full_queue_answers_503_and_accepts_nothing(
    make_app: Callable[..., Flask], tmp_path: Path
) -> None:
    gate = threading.Event()
    bus = WebhookBus(1, 2, put_timeout=0.5)
    bus.subscribe("order.*", lambda event: gate.wait(30))
    app = make_app(tmp_path / "q", bus=bus)
    client = app.test_client()
    try:

        def post(i: int) -> Any:
            body = f'{{"order_id": {i}, "status": "paid"}}'.encode()
            return client.post("/webhook/order", data=body, headers=signed(body, msg_id=f"q{i}"))

        assert post(1).status_code == 202  # the worker takes it and blocks
        assert post(2).status_code == 202  # waits in the queue
        refused = post(3)  # two accepted and not handled: the limit
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "1"
        assert "too many events" in refused.get_json()["error"]
        assert len(lines(tmp_path / "q" / "accepted.log")) == 2
    finally:
        gate.set()
    wait_idle(app)
    service_of(app).close()
    bus.close(5.0)


# -- the durable record ----------------------------------------------------------------------
def test_restart_handles_what_was_accepted_but_not_handled(
    make_app: Callable[..., Flask], tmp_path: Path
) -> None:
    data_dir = tmp_path / "r"
    store = WebhookStore(data_dir)
    store.open()
    events = [
        Event(f"order.{s}", {"order_id": i + 1, "status": s})
        for i, s in enumerate(["created", "paid", "created"])
    ]
    for event in events:
        store.accept(event)
    store.mark_handled(events[0], effects=[{"kind": "analytics", "status": "created"}])
    store.close()
    with open(data_dir / "accepted.log", "ab") as fh:
        fh.write(b'{"id": "torn-by-a-cr')  # a writer killed mid-line: never acknowledged

    app = make_app(data_dir)
    service = service_of(app).start()
    assert service.metrics.snapshot()["recovered"] == 2
    wait_idle(app)
    handled = [r["data"]["event_id"] for r in lines(data_dir / "handled.log")]
    assert sorted(handled) == sorted(e.id for e in events)
    assert service.projection.emails == 1  # order 3's email; order 1's record had none
    assert [r["id"] for r in lines(data_dir / "accepted.log")] == [e.id for e in events]


def test_corrupt_record_stops_the_start_with_a_clear_error(
    make_app: Callable[..., Flask], tmp_path: Path
) -> None:
    data_dir = tmp_path / "c"
    data_dir.mkdir()
    (data_dir / "accepted.log").write_bytes(b'{"not": "an event"}\n')
    app = make_app(data_dir)
    with pytest.raises(StorageError, match=r"accepted.log:1: not a valid record"):
        service_of(app).start()
    response = app.test_client().post("/webhook/order", data=BODY, headers=signed())
    assert response.status_code == 503


def test_one_server_per_data_directory(make_app: Callable[..., Flask], tmp_path: Path) -> None:
    service_of(make_app(tmp_path / "one")).start()
    with pytest.raises(StorageError, match="in use by another webhook server"):
        service_of(make_app(tmp_path / "one")).start()


def test_group_commit_covers_concurrent_requests_with_fewer_fsyncs(tmp_path: Path) -> None:
    store = WebhookStore(tmp_path / "g")
    store.open()
    try:

        def accept_many(k: int) -> None:
            for i in range(50):
                store.accept(Event("order.paid", {"order_id": k * 100 + i + 1, "status": "paid"}))

        threads = [threading.Thread(target=accept_many, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert store.batched == 400
        assert store.batches <= 400
        assert len(lines(tmp_path / "g" / "accepted.log")) == 400
    finally:
        store.close()


def test_unknown_sync_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sync must be one of"):
        WebhookStore(tmp_path, sync="sometimes")
    with pytest.raises(ValueError, match="WEBHOOK_SYNC"):
        create_app({"WEBHOOK_DATA_DIR": str(tmp_path), "WEBHOOK_SECRET": "", "WEBHOOK_SYNC": "x"})


# -- the sender, against the real server on a loopback port ----------------------------------
def test_sender_end_to_end_with_retry_on_503(
    make_app: Callable[..., Flask], tmp_path: Path
) -> None:
    app = make_app(tmp_path / "e")
    hits = {"n": 0}

    @app.before_request
    def flaky() -> Any:  # the first attempt meets an overloaded receiver
        hits["n"] += 1
        if hits["n"] == 1:
            return {"error": "busy"}, 503, {"Retry-After": "0"}
        return None

    with (
        ServerThread(app) as server,
        WebhookSender(
            f"{server.url}/webhook/order", SECRET, attempts=3, backoff=Backoff(base=0.01, cap=0.05)
        ) as sender,
    ):
        result = sender.send({"order_id": 9, "status": "created"}, msg_id="msg_e2e")
        assert (result.status, result.attempts) == (202, 2)
        wait_idle(app)
        again = sender.send({"order_id": 9, "status": "created"}, msg_id="msg_e2e")
        assert again.status == 200 and again.body["event_id"] == result.body["event_id"]
        bad = sender.send({"order_id": 9, "status": "nope"})
        assert (bad.status, bad.attempts) == (400, 1)  # a 4xx is final: no retry
    (record,) = lines(tmp_path / "e" / "handled.log")
    assert record["data"]["event_id"] == result.body["event_id"]


def test_sender_gives_up_with_a_clear_error() -> None:
    sender = WebhookSender(
        "http://127.0.0.1:9/webhook/order",
        SECRET,
        attempts=2,
        timeout=1.0,
        backoff=Backoff(base=0.001, cap=0.001),
    )
    with sender, pytest.raises(DeliveryError, match="after 2 attempt") as info:
        sender.send({"order_id": 1, "status": "paid"})
    assert info.value.last_status is None
    with pytest.raises(ValueError, match="url must be"):
        WebhookSender("ftp://x/y")


def test_sign_cli_prints_headers_a_receiver_accepts(capsys: pytest.CaptureFixture[str]) -> None:
    assert sign_main(["--print-headers", "--secret", SECRET, "--id", "msg_cli", BODY.decode()]) == 0
    out = capsys.readouterr().out.splitlines()
    headers = dict(line.split(": ", 1) for line in out)
    assert headers["webhook-id"] == "msg_cli"
    expected = ref_signature(KEY, "msg_cli", headers["webhook-timestamp"], BODY)
    assert headers["webhook-signature"] == expected


def test_demo_main(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert demo.main(["--data-dir", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "-> 202" in out and "-> 200" in out and "-> 400" in out and "-> 401" in out
    assert '"duplicate":true' in out
    assert "email     -> customer-777@example.com" in out
    assert "accepted.log 2 line(s)" in out and "handled.log 2 line(s)" in out


def test_bus_must_be_a_webhook_bus(tmp_path: Path) -> None:
    from level_2_intermediate.eventbus_queue import QueuedEventBus

    plain = QueuedEventBus(1, 10)
    with pytest.raises(TypeError, match="WebhookBus"):
        create_app({"WEBHOOK_DATA_DIR": str(tmp_path), "WEBHOOK_SECRET": ""}, bus=plain)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="on_handled"):
        WebhookBus(1, 10, on_done=print)
    build_bus(workers=1).close()
