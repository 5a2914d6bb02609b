"""freemask.shared.logs: one JSON object per record, and no credentials in it."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest
from pydantic import SecretStr

from freemask.shared.logs import JsonFormatter, configure_logging, redact

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A private logger whose records go through JsonFormatter('scoring') into a buffer."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("scoring"))
    logger = logging.getLogger("freemask.test.logs")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream
    logger.handlers.clear()
    logger.propagate = True


def entries(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_one_json_object_per_record_with_the_standard_fields(capture) -> None:
    logger, stream = capture
    logger.info("scored %d samples", 3, extra={"run_id": "run-1", "round": 2, "scores": [0.5, 1.0]})
    logger.warning("second")
    first, second = entries(stream)
    assert TS.match(first["ts"])
    assert first["level"] == "INFO"
    assert first["service"] == "scoring"
    assert first["logger"] == "freemask.test.logs"
    assert first["msg"] == "scored 3 samples"
    assert (first["run_id"], first["round"], first["scores"]) == ("run-1", 2, [0.5, 1.0])
    assert second["level"] == "WARNING" and second["msg"] == "second"
    # LogRecord internals do not leak into the entry
    assert not {"args", "levelno", "pathname", "lineno", "exc_info", "msecs"} & set(first)


def test_exception_stays_in_one_line(capture) -> None:
    logger, stream = capture
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        logger.exception("failed")
    (entry,) = entries(stream)  # a multi-line traceback is still one line of output
    assert entry["level"] == "ERROR"
    assert "Traceback" in entry["exc"] and "RuntimeError: boom" in entry["exc"]


def test_non_json_extras_are_rendered_as_text(capture) -> None:
    logger, stream = capture
    logger.info("odd extra", extra={"obj": object(), "path": __import__("pathlib").Path("/x/y")})
    (entry,) = entries(stream)
    assert entry["path"] == "/x/y"
    assert entry["obj"].startswith("<object object")


SECRET = "hunter2-AKIAEXAMPLE"


@pytest.mark.parametrize(
    "text",
    [
        f"connecting with secret_key={SECRET}",
        f"secret_key = {SECRET}",
        f"SECRET_KEY={SECRET}",
        f"aws_secret_access_key={SECRET}",
        f"password: {SECRET}",
        f"Password:{SECRET} and more",
        f"passwd={SECRET}",
        f"token={SECRET}",
        f"auth_token: {SECRET}",
        f'{{"access_key": "{SECRET}", "bucket": "b"}}',
        f"{{'access-key': '{SECRET}'}}",
        f"accessKey={SECRET}",
        f"sasl_password={SECRET},next=1",
        f"endpoint https://admin:{SECRET}@minio.example:9000/bucket",
        f"kafka at sasl_ssl://user:{SECRET}@broker:9093",
    ],
)
def test_redact_masks_credentials(text: str) -> None:
    redacted = redact(text)
    assert SECRET not in redacted
    assert "***" in redacted


@pytest.mark.parametrize(
    "text",
    ["plain message", "bucket=freemask endpoint=127.0.0.1:8333", "https://minio.example:9000/bucket", "key=runs/a"],
)
def test_redact_leaves_ordinary_text_alone(text: str) -> None:
    assert redact(text) == text


def test_redact_keeps_what_identifies_the_credential() -> None:
    assert redact("https://admin:pw@host/x") == "https://admin:***@host/x"
    assert redact("secret_key=abc other=1") == "secret_key=*** other=1"


def test_formatter_redacts_message_args_extras_and_exceptions(capture) -> None:
    logger, stream = capture
    try:
        raise ValueError(f"could not log in with password={SECRET}")
    except ValueError:
        logger.exception(
            "store at %s",
            f"s3://user:{SECRET}@host",
            extra={"detail": f"secret_key={SECRET}", "dsn": f"postgres://u:{SECRET}@db/x"},
        )
    raw = stream.getvalue()
    assert SECRET not in raw
    (entry,) = entries(stream)
    assert entry["msg"] == "store at s3://user:***@host"
    assert entry["detail"] == "secret_key=***"
    assert entry["dsn"] == "postgres://u:***@db/x"
    assert "password=***" in entry["exc"]


@pytest.mark.parametrize(
    "extra",
    [{"secret_key": SECRET}, {"password": SECRET}, {"store": {"access_key": SECRET}}, {"creds": [f"token={SECRET}"]}],
)
def test_formatter_redacts_secret_named_and_nested_extras(capture, extra: dict) -> None:
    logger, stream = capture
    logger.info("connecting", extra=extra)
    assert SECRET not in stream.getvalue()


def test_secret_str_is_masked_in_messages_and_extras(capture) -> None:
    logger, stream = capture
    secret = SecretStr(SECRET)
    logger.info(f"using key {secret}", extra={"key": secret})
    logger.info("using key %s", secret)
    raw = stream.getvalue()
    assert SECRET not in raw
    first, second = entries(stream)
    assert first["msg"] == "using key **********"
    assert first["key"] == "**********"
    assert second["msg"] == "using key **********"


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root, kafka = logging.getLogger(), logging.getLogger("kafka")
    saved = (root.handlers[:], root.level, kafka.level)
    yield
    root.handlers[:], root.level = saved[0], saved[1]
    kafka.setLevel(saved[2])


def test_configure_logging_routes_the_root_logger_to_stdout_as_json(
    restore_root_logger, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("placement", "INFO")
    assert len(logging.getLogger().handlers) == 1
    logging.getLogger("freemask.placement.worker").info(
        "placed %s", "obj", extra={"sample_id": "s-1", "note": f"password={SECRET}"}
    )
    logging.getLogger("freemask.placement.worker").debug("hidden below INFO")
    logging.getLogger("kafka.conn").info("reconnecting")  # kafka is held at WARNING
    logging.getLogger("kafka.conn").warning("broker down")
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert [line["msg"] for line in lines] == ["placed obj", "broker down"]
    first = lines[0]
    assert first["service"] == "placement"
    assert first["logger"] == "freemask.placement.worker"
    assert first["sample_id"] == "s-1"
    assert first["note"] == "password=***"


def test_configure_logging_replaces_handlers_and_honours_the_level(
    restore_root_logger, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("scoring", "INFO")
    configure_logging("scoring", "WARNING")  # calling twice must not duplicate output
    log = logging.getLogger("freemask.scoring")
    log.info("not shown")
    log.error("shown")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["msg"] == "shown"
