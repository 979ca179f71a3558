"""Level 4 file-Kafka: the console tools end to end, and the demos' ``main()``."""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import pytest

from level_4_hard.file_kafka import Consumer, Producer
from level_4_hard.file_kafka.__main__ import main as cli
from level_4_hard.file_kafka.demo import main as demo_main
from level_4_hard.file_kafka.demo_delivery import main as delivery_main
from level_4_hard.file_kafka.topic import partition_for_key

ROOT = Path(__file__).resolve().parents[1]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_end_to_end(kdir: Path, capsys: pytest.CaptureFixture[str], python: str) -> None:
    d = ["--data-dir", str(kdir)]
    assert run(capsys, "topics", "--create", "--topic", "orders", "--partitions", "3", *d)[1] == (
        "Created topic orders with 3 partition(s).\n"
    )
    code, _, err = run(capsys, "topics", "--create", "--topic", "orders", *d)
    assert code == 1 and "already exists" in err
    code, _, err = run(capsys, "topics", "--create", "--topic", "../x", *d)
    assert code == 1 and "illegal topic name '../x'" in err
    assert run(capsys, "topics", "--list", *d)[1] == "orders\n"

    # produce in a real child process, reading stdin, with another hash seed than ours
    lines = "".join(f'customer-{i % 5}|{{"order": {i}}}\n' for i in range(12))
    lines += "customer-1|not json\n"
    child = subprocess.run(
        [
            python,
            "-m",
            "level_4_hard.file_kafka",
            "produce",
            "--topic",
            "orders",
            "--key-separator",
            "|",
            *d,
        ],
        input=lines,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    )
    assert child.returncode == 1, child.stderr  # one bad line: reported, the rest is sent
    assert "line 13 skipped" in child.stderr
    assert child.stdout == "Produced 12 record(s) to orders; 1 bad line(s).\n"

    code, out, err = run(
        capsys,
        "consume",
        "--topic",
        "orders",
        "--group",
        "audit",
        "--from-beginning",
        "--max-messages",
        "5",
        "--print-key",
        "--print-offset",
        *d,
    )
    assert code == 0 and "Processed a total of 5 messages" in err
    printed = out.splitlines()
    assert len(printed) == 5
    for line in printed:  # the child put each key where our partitioner would
        where, key, value = line.split("\t")
        assert int(where.split(":")[0]) == partition_for_key(key, 3)
        assert value.startswith('{"order":')

    code, out, _ = run(capsys, "groups", "--describe", "--group", "audit", *d)
    header, *rows = out.splitlines()
    assert header.split() == [
        "GROUP",
        "TOPIC",
        "PARTITION",
        "CURRENT-OFFSET",
        "LOG-END-OFFSET",
        "LAG",
        "CONSUMER-ID",
    ]
    assert sum(int(r.split()[5]) for r in rows) == 7  # 12 records, 5 consumed
    assert run(capsys, "groups", "--list", *d)[1] == "audit\n"

    code, out, _ = run(
        capsys,
        "consume",
        "--topic",
        "orders",
        "--group",
        "audit",
        "--max-messages",
        "100",
        "--timeout-ms",
        "300",
        *d,
    )
    assert len(out.splitlines()) == 7  # the rest, from the committed offsets

    code, out, _ = run(
        capsys, "reset-offsets", "--group", "audit", "--topic", "orders", "--to-earliest", *d
    )
    assert "Dry run" in out
    code, out, _ = run(
        capsys,
        "reset-offsets",
        "--group",
        "audit",
        "--topic",
        "orders",
        "--to-earliest",
        "--execute",
        *d,
    )
    assert code == 0 and "Dry run" not in out
    code, out, _ = run(
        capsys, "consume", "--topic", "orders", "--group", "audit", "--timeout-ms", "300", *d
    )
    assert len(out.splitlines()) == 12  # replayed from the start

    code, out, _ = run(capsys, "topics", "--describe", "--topic", "orders", *d)
    assert "PartitionCount: 3" in out and out.count("LogEndOffset:") == 3


def test_cli_retention_and_alter(kdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = ["--data-dir", str(kdir)]
    run(capsys, "topics", "--create", "--topic", "logs", "--segment-bytes", "1024", *d)
    with Producer(kdir) as producer:
        producer.send_many("logs", [{"line": i, "pad": "." * 60} for i in range(100)])
    code, out, _ = run(
        capsys, "topics", "--alter", "--topic", "logs", "--retention-bytes", "4096", *d
    )
    assert code == 0, out
    code, out, _ = run(capsys, "retention", "--topic", "logs", *d)
    header, row = out.splitlines()
    assert header.split()[:3] == ["TOPIC", "PARTITION", "DELETED-SEGMENTS"]
    assert row.split()[0] == "logs" and row.split()[2] != "none"
    with Consumer(None, data_dir=kdir, auto_offset_reset="earliest") as c:
        c.subscribe("logs")
        first = c.poll(timeout=1)[0]
    assert first.offset > 0 and row.split()[-1] == "100"
    code, _, err = run(
        capsys,
        "topics",
        "--alter",
        "--topic",
        "logs",
        "--cleanup-policy",
        "compact",
        "--segment-bytes",
        "10",
        *d,
    )
    assert code == 1 and "segment_bytes" in err


def test_demo_runs_and_survives_the_killed_member(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert demo_main(["--data-dir", str(data_dir), "--orders", "24", "--delay-ms", "20"]) == 0
    out = capsys.readouterr().out
    assert "customer-1 -> partition" in out
    assert "replayed 24 record(s) from offset 0" in out
    assert "kill -9 member-a" in out
    assert "member-b took partition" in out
    assert out.rstrip().splitlines()[-2].endswith("0 lost")
    assert (data_dir / "file_kafka_demo" / "topics" / "orders" / "topic.json").is_file()


def test_demo_delivery_shows_duplicates_with_auto_commit(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert delivery_main(["--data-dir", str(data_dir), "--mode", "auto-commit"]) == 0
    row = capsys.readouterr().out.splitlines()[-1].split()
    assert row[0] == "auto-commit" and row[-3:] == ["5", "5-6", "none"]


@pytest.mark.parametrize(
    "command",
    [
        ["level_4_hard/file_kafka/demo.py", "--help"],
        ["-m", "level_4_hard.file_kafka.demo", "--help"],
        ["level_4_hard/file_kafka/demo_delivery.py", "--help"],
        ["-m", "level_4_hard.file_kafka", "--help"],
    ],
)
def test_demos_run_as_a_path_and_as_a_module(command: list[str], python: str) -> None:
    done = subprocess.run([python, *command], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


def test_produce_text_values(kdir: Path) -> None:
    code = cli(
        ["produce", "--topic", "notes", "--text", "--data-dir", str(kdir)],
        stdin=io.StringIO("hello\nworld\n"),
    )
    assert code == 0
    with Consumer(None, data_dir=kdir, auto_offset_reset="earliest") as c:
        c.subscribe("notes")
        assert [r.value for r in c.poll(timeout=1)] == ["hello", "world"]
