"""Level 3 webhook demo: a real receiver on a free loopback port, a real signed sender.

Run it either way (no server needed; it starts its own):

    python level_3_advanced/webhook/demo.py
    python -m level_3_advanced.webhook.demo --data-dir /tmp/webhook-demo

What to look at in the output: the valid webhook gets 202 at once (durable, not yet handled);
the same message sent again gets 200 with the SAME event id and is not handled twice; a bad
body gets 400 naming the field; a request signed with the wrong secret gets 401. Then the
workers' effects (the email, the analytics counts) appear — after the answers, in the
background — and the records on disk that make it all survive a crash.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.config import Settings
from common.events import dumps
from common.logger import configure_logging
from common.storage import LineReader
from common.waiting import wait_until
from level_3_advanced.webhook.sign import WebhookSender, new_message_id
from level_3_advanced.webhook.standard_webhooks import new_secret
from level_3_advanced.webhook.webhook_server import ServerThread, WebhookService, create_app

RECORD_FILES = ("accepted.log", "handled.log", "webhook.lock")


def _lines(path: Path) -> int:
    return sum(1 for _ in LineReader(path)) if path.exists() else 0


def run(data_dir: Path, write: Callable[[str], None] = print, timeout: float = 10.0) -> dict:
    """The scenario; returns a summary (``unexpected`` lists answers that were wrong)."""
    secret = new_secret()
    app = create_app(
        {"WEBHOOK_DATA_DIR": str(data_dir), "WEBHOOK_SECRET": secret, "WEBHOOK_WORKERS": 2}
    )
    service: WebhookService = app.extensions["webhook"]
    service.start()
    unexpected: list[str] = []
    try:
        with ServerThread(app) as server:
            url = f"{server.url}/webhook/order"
            write(f"receiver listening on {url} (signed with a fresh whsec_ secret)")
            with (
                WebhookSender(url, secret, attempts=3, timeout=5.0) as sender,
                WebhookSender(url, new_secret(), attempts=1, timeout=5.0) as intruder,
            ):
                first_id = new_message_id()
                steps: list[tuple[str, Callable[[], Any], int]] = [
                    (
                        "order 777 created",
                        lambda: sender.send(
                            {"order_id": 777, "status": "created"}, msg_id=first_id
                        ),
                        202,
                    ),
                    (
                        "the same message again (a retry)",
                        lambda: sender.send(
                            {"order_id": 777, "status": "created"}, msg_id=first_id
                        ),
                        200,
                    ),
                    (
                        "order 777 paid",
                        lambda: sender.send({"order_id": 777, "status": "paid"}),
                        202,
                    ),
                    (
                        "a bad body {order_id: -1, status: lost}",
                        lambda: sender.send({"order_id": -1, "status": "lost"}),
                        400,
                    ),
                    (
                        "signed with the wrong secret",
                        lambda: intruder.send({"order_id": 778, "status": "created"}),
                        401,
                    ),
                ]
                this_run: set[str] = set()
                for label, call, expected in steps:
                    result = call()
                    mark = "" if result.status == expected else f"   <-- expected {expected}"
                    if mark:
                        unexpected.append(label)
                    if result.status == 202:
                        this_run.add(result.body["event_id"])
                    write(
                        f"send {label:<40} -> {result.status} {dumps(result.body).decode()}{mark}"
                    )

            store = service.store
            assert store is not None
            wait_until(
                lambda: store.unhandled == 0,
                timeout,
                message="the workers to handle every accepted event",
            )
            metrics = service.metrics_snapshot()
            write(f"workers handled {metrics['handled']} event(s) after the answers:")
            for email in service.projection.outbox:
                if email.get("event_id") in this_run:
                    write(f"  email     -> {email['to']}: {email['subject']}")
            write(f"  analytics -> {dict(service.projection.by_status)} (all runs kept)")
    finally:
        service.close()
    write(
        f"metrics: accepted {metrics['accepted']}, duplicates {metrics['duplicates']}, "
        f"rejected {metrics['rejected']}, handled {metrics['handled']}, failed {metrics['failed']}"
    )
    accepted_lines = _lines(data_dir / "accepted.log")
    handled_lines = _lines(data_dir / "handled.log")
    write(
        f"records in {data_dir}: accepted.log {accepted_lines} line(s) (fsync'd before each 202), "
        f"handled.log {handled_lines} line(s) (marker + effects, one line per event)"
    )
    return {
        "metrics": metrics,
        "unexpected": unexpected,
        "accepted_lines": accepted_lines,
        "handled_lines": handled_lines,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir", type=Path, help="where the records go (default: $EDA_DATA_DIR/webhook-demo)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the records of earlier runs (shows recovery)"
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for workers")
    args = parser.parse_args(argv)
    if not 0 < args.timeout <= 120:
        parser.error("--timeout must be in (0, 120]")
    configure_logging()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access log in the demo output

    data_dir = args.data_dir or Settings.load().data_dir / "webhook-demo"
    if not args.keep:
        for name in RECORD_FILES:  # only the files this demo writes
            (data_dir / name).unlink(missing_ok=True)
    summary = run(data_dir, timeout=args.timeout)
    if summary["unexpected"]:
        print(f"UNEXPECTED answers: {', '.join(summary['unexpected'])}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
