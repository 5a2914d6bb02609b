"""freemask.shared.config: defaults < YAML file < FREEMASK_* env, secrets, and errors.

Every call passes `environ=` explicitly (or clears FREEMASK_* from os.environ), so
the developer's shell never leaks into a test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from freemask.shared.config import (
    SERVICE_NAMES,
    ConfigError,
    FreemaskConfig,
    WorldConfig,
    load_config,
)

SECRET = "0123-Sup3r/secret+value"


def write_yaml(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- layering ---------------------------------------------------------------


def test_defaults_load() -> None:
    cfg = load_config(environ={})
    assert isinstance(cfg, FreemaskConfig)
    assert cfg.store.endpoint == "127.0.0.1:8333"
    assert cfg.bus.max_attempts == 3
    assert cfg.log_level == "INFO"
    # the packaged default.yaml supplies the vocabulary
    assert "dog" in cfg.world.classes and "grass" in cfg.world.backgrounds
    assert all("{cls}" in t and "{background}" in t for t in cfg.world.prompt_templates)
    assert set(cfg.server.ports) == set(SERVICE_NAMES)
    assert cfg.store.access_key is None and cfg.store.secret_key is None


def test_yaml_file_overrides_defaults_and_keeps_the_rest(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "store:\n  endpoint: minio:9000\n  secure: true\nbus:\n  max_attempts: 7\n")
    cfg = load_config(path, environ={})
    assert cfg.store.endpoint == "minio:9000"
    assert cfg.store.secure is True
    assert cfg.bus.max_attempts == 7
    # untouched keys of the same section, and the packaged world, survive the merge
    assert cfg.store.bucket == "freemask"
    assert cfg.bus.session_timeout_ms == 3000
    assert "dog" in cfg.world.classes


def test_empty_yaml_file_means_defaults(tmp_path: Path) -> None:
    assert load_config(write_yaml(tmp_path, ""), environ={}) == load_config(environ={})


def test_env_overrides_yaml(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "store:\n  endpoint: from-yaml:1\n  bucket: yaml-bucket\n")
    cfg = load_config(path, environ={"FREEMASK_STORE__ENDPOINT": "from-env:2"})
    assert cfg.store.endpoint == "from-env:2"
    assert cfg.store.bucket == "yaml-bucket"


@pytest.mark.parametrize(
    ("name", "raw", "read", "expected"),
    [
        ("FREEMASK_BUS__MAX_ATTEMPTS", "5", lambda c: c.bus.max_attempts, 5),
        ("FREEMASK_STORE__SECURE", "true", lambda c: c.store.secure, True),
        ("FREEMASK_STORE__SECURE", "false", lambda c: c.store.secure, False),
        ("FREEMASK_TRITON__TIMEOUT_S", "2.5", lambda c: c.triton.timeout_s, 2.5),
        ("FREEMASK_LOG_LEVEL", "DEBUG", lambda c: c.log_level, "DEBUG"),
        ("FREEMASK_STACK__DATA_DIR", "/srv/stack", lambda c: c.stack.data_dir, Path("/srv/stack")),
        ("FREEMASK_WORLD__CLASSES", "[cat, dog]", lambda c: c.world.classes, ("cat", "dog")),
        ("FREEMASK_WORLD__BACKGROUNDS", "[ sea ]", lambda c: c.world.backgrounds, ("sea",)),
    ],
)
def test_env_values_are_converted_to_the_field_type(name: str, raw: str, read, expected) -> None:
    value = read(load_config(environ={name: raw}))
    assert value == expected
    assert type(value) is type(expected)


def test_env_list_replaces_only_its_own_key() -> None:
    cfg = load_config(environ={"FREEMASK_WORLD__CLASSES": "[cat, dog]"})
    assert cfg.world.backgrounds == load_config(environ={}).world.backgrounds


def test_freemask_config_env_names_the_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "store:\n  endpoint: named-by-env:9000\n")
    cfg = load_config(environ={"FREEMASK_CONFIG": str(path), "FREEMASK_BUS__CLIENT_ID": "c1"})
    assert cfg.store.endpoint == "named-by-env:9000"
    assert cfg.bus.client_id == "c1"


def test_process_environment_is_read_when_environ_is_not_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    for name in [n for n in os.environ if n.startswith("FREEMASK_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("FREEMASK_CONFIG", str(write_yaml(tmp_path, "bus:\n  client_id: from-file\n")))
    monkeypatch.setenv("FREEMASK_STORE__ENDPOINT", "from-os-env:1")
    cfg = load_config()
    assert cfg.bus.client_id == "from-file"
    assert cfg.store.endpoint == "from-os-env:1"


def test_explicit_path_wins_over_freemask_config(tmp_path: Path) -> None:
    named = write_yaml(tmp_path, "bus:\n  client_id: named\n", "named.yaml")
    explicit = write_yaml(tmp_path, "bus:\n  client_id: explicit\n", "explicit.yaml")
    assert load_config(explicit, environ={"FREEMASK_CONFIG": str(named)}).bus.client_id == "explicit"


# --- secrets ----------------------------------------------------------------


@pytest.mark.parametrize("value", ["0123", "007", "true", "1e3", "null", SECRET])
def test_env_secrets_keep_their_exact_text(value: str) -> None:
    cfg = load_config(environ={"FREEMASK_STORE__SECRET_KEY": value, "FREEMASK_BUS__SASL_PASSWORD": value})
    assert isinstance(cfg.store.secret_key, SecretStr)
    assert cfg.store.secret_key.get_secret_value() == value
    assert cfg.bus.sasl_password.get_secret_value() == value


@pytest.mark.parametrize("value", ["[abc]def", "{s3cret"])
def test_env_secrets_starting_with_a_bracket_keep_their_exact_text(value: str) -> None:
    cfg = load_config(environ={"FREEMASK_STORE__SECRET_KEY": value})
    assert cfg.store.secret_key.get_secret_value() == value


def test_config_errors_never_echo_an_env_secret() -> None:
    value = "{hunter2-" + SECRET
    try:
        load_config(environ={"FREEMASK_STORE__SECRET_KEY": value})
    except ConfigError as err:
        assert "hunter2" not in str(err)


def test_secrets_never_appear_in_repr_str_or_dump(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret_key"
    secret_file.write_text("file-" + SECRET + "\n")
    cfg = load_config(
        environ={
            "FREEMASK_STORE__ACCESS_KEY": SECRET,
            "FREEMASK_STORE__SECRET_KEY_FILE": str(secret_file),
            "FREEMASK_BUS__SASL_USERNAME": SECRET,
            "FREEMASK_BUS__SASL_PASSWORD": SECRET,
        }
    )
    assert cfg.store.access_key.get_secret_value() == SECRET  # it is really there...
    for rendered in (repr(cfg), str(cfg), cfg.model_dump_json(), str(cfg.model_dump()), repr(cfg.store), f"{cfg.bus}"):
        assert SECRET not in rendered  # ...but never shown
        assert "**********" in rendered


def test_secret_files_are_read(tmp_path: Path) -> None:
    (tmp_path / "access").write_text("AKIA-from-file\n")
    (tmp_path / "secret").write_text("  0123  \n")
    (tmp_path / "sasl").write_text("sasl-pw")
    cfg = load_config(
        environ={
            "FREEMASK_STORE__ACCESS_KEY_FILE": str(tmp_path / "access"),
            "FREEMASK_STORE__SECRET_KEY_FILE": str(tmp_path / "secret"),
            "FREEMASK_BUS__SASL_PASSWORD_FILE": str(tmp_path / "sasl"),
        }
    )
    assert cfg.store.access_key.get_secret_value() == "AKIA-from-file"
    assert cfg.store.secret_key.get_secret_value() == "0123"
    assert cfg.bus.sasl_password.get_secret_value() == "sasl-pw"


def test_secret_file_named_in_yaml_is_read(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("yaml-named")
    path = write_yaml(tmp_path, f"store:\n  secret_key_file: {tmp_path / 'secret'}\n")
    assert load_config(path, environ={}).store.secret_key.get_secret_value() == "yaml-named"


@pytest.mark.parametrize(
    ("name", "what"),
    [
        ("FREEMASK_STORE__SECRET_KEY_FILE", "store.secret_key"),
        ("FREEMASK_STORE__ACCESS_KEY_FILE", "store.access_key"),
        ("FREEMASK_BUS__SASL_PASSWORD_FILE", "bus.sasl_password"),
    ],
)
def test_missing_secret_file_is_a_clear_config_error(tmp_path: Path, name: str, what: str) -> None:
    missing = tmp_path / "no-such-file"
    with pytest.raises(ConfigError) as info:
        load_config(environ={name: str(missing)})
    message = str(info.value)
    assert what in message and str(missing) in message and "cannot read secret file" in message


# --- errors -----------------------------------------------------------------


def test_several_invalid_values_give_one_error_naming_all() -> None:
    env = {
        "FREEMASK_BUS__MAX_ATTEMPTS": "0",
        "FREEMASK_STORE__BUCKET": "Not_A_Bucket",
        "FREEMASK_LOG_LEVEL": "LOUD",
        "FREEMASK_TRITON__TIMEOUT_S": "soon",
    }
    with pytest.raises(ConfigError) as info:
        load_config(environ=env)
    message = str(info.value)
    assert "4 problems" in message
    for where in ("bus.max_attempts", "store.bucket", "log_level", "triton.timeout_s"):
        assert where in message


@pytest.mark.parametrize(
    ("env", "yaml_text", "where"),
    [
        ({"FREEMASK_STORE__BOGUS": "1"}, "", "store.bogus"),
        ({"FREEMASK_STORE__NOPE": "1"}, "", "store.nope"),
        ({}, "store:\n  endpoint: x:1\n  endpiont: typo:1\n", "store.endpiont"),
        ({}, "limits:\n  max_prompt_char: 10\n", "limits.max_prompt_char"),
    ],
)
def test_unknown_keys_are_rejected(tmp_path: Path, env: dict[str, str], yaml_text: str, where: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write_yaml(tmp_path, yaml_text), environ=env)
    assert where in str(info.value)
    assert "Extra inputs are not permitted" in str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("store: [unclosed\n", "is not valid YAML"),
        ("store:\n  endpoint: a\n bad-indent: b\n", "is not valid YAML"),
        ("- a\n- b\n", "must hold a mapping at the top level"),
        ("just a string\n", "must hold a mapping at the top level"),
    ],
)
def test_bad_yaml_files_give_clear_errors(tmp_path: Path, text: str, expected: str) -> None:
    path = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert expected in str(info.value) and str(path) in str(info.value)


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.yaml", environ={})


@pytest.mark.parametrize(
    ("name", "raw", "expected"),
    [
        ("FREEMASK_STORE____ENDPOINT", "x", "empty key segment"),
        ("FREEMASK_WORLD__CLASSES", "[cat, dog", "not a YAML flow list or mapping"),
    ],
)
def test_malformed_env_is_a_config_error(name: str, raw: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(environ={name: raw})


def test_config_is_frozen() -> None:
    cfg = load_config(environ={})
    with pytest.raises(ValidationError, match="frozen"):
        cfg.store.endpoint = "elsewhere:1"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        cfg.log_level = "DEBUG"  # type: ignore[misc]
    assert cfg.store.endpoint == "127.0.0.1:8333"


@pytest.mark.parametrize(
    "templates",
    [
        '["a photo of a {cls}"]',
        '["a photo on the {background}"]',
        '["a {cls} on the {background}", "no slots at all"]',
        '["a {class} on the {bg}"]',
    ],
)
def test_prompt_templates_must_name_cls_and_background(templates: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ={"FREEMASK_WORLD__PROMPT_TEMPLATES": templates})
    assert "world" in str(info.value) and "{cls} and {background}" in str(info.value)


def test_world_config_accepts_templates_with_both_slots() -> None:
    world = WorldConfig(classes=("cat",), backgrounds=("sky",), prompt_templates=("a {cls} under the {background}",))
    assert world.prompt_templates[0].format(cls="cat", background="sky") == "a cat under the sky"


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("server:\n  ports:\n    nosuch:\n      grpc_port: 1\n      metrics_port: 2\n", "server.ports.nosuch"),
        ("server:\n  ports:\n    attention_mask:\n      grpc_port: 70000\n      metrics_port: 2\n", "grpc_port"),
    ],
)
def test_server_ports_are_validated(tmp_path: Path, yaml_text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(write_yaml(tmp_path, yaml_text), environ={})


def test_one_service_port_can_be_overridden_alone(tmp_path: Path) -> None:
    defaults = load_config(environ={}).server.ports
    from_env = load_config(environ={"FREEMASK_SERVER__PORTS__ATTENTION_MASK__GRPC_PORT": "6000"}).server.ports
    path = write_yaml(tmp_path, "server:\n  ports:\n    scoring:\n      metrics_port: 9999\n")
    from_yaml = load_config(path, environ={}).server.ports
    assert from_env["attention_mask"].grpc_port == 6000
    assert from_env["attention_mask"].metrics_port == defaults["attention_mask"].metrics_port
    assert from_yaml["scoring"].metrics_port == 9999
    assert from_yaml["scoring"].grpc_port == defaults["scoring"].grpc_port
    for ports in (from_env, from_yaml):
        assert set(ports) == set(SERVICE_NAMES)


def test_env_variables_outside_the_config_sections_are_ignored() -> None:
    # Kubernetes injects these for a Service named "freemask"; they are not settings.
    injected = {"FREEMASK_SERVICE_HOST": "10.0.0.1", "FREEMASK_PORT": "tcp://10.0.0.1:50051",
                "FREEMASK_PORT_50051_TCP_PORT": "50051"}
    assert load_config(environ=injected) == load_config(environ={})


def test_thesaurus_synonyms_come_from_the_packaged_defaults_and_env_adds_to_them() -> None:
    assert load_config(environ={}).thesaurus.synonyms["aeroplane"] == ("airplane", "plane")
    config = load_config(environ={"FREEMASK_THESAURUS__SYNONYMS": "{dog: [puppy, hound], sea: [waves]}"})
    assert config.thesaurus.synonyms["dog"] == ("puppy", "hound")
    assert config.thesaurus.synonyms["sea"] == ("waves",)  # a named word's list is replaced, not extended
    assert config.thesaurus.synonyms["aeroplane"] == ("airplane", "plane")


@pytest.mark.parametrize("version", ["../x", ".hidden", "V1", "a/b", ""])
def test_thesaurus_version_must_be_a_safe_key_segment(version: str) -> None:
    with pytest.raises(ConfigError, match="thesaurus.version"):
        load_config(environ={"FREEMASK_THESAURUS__VERSION": version})


def test_partitions_per_topic_fall_back_to_the_bus_default_and_must_be_positive() -> None:
    bus = load_config(environ={"FREEMASK_BUS__PARTITIONS": "4",
                               "FREEMASK_BUS__TOPIC_PARTITIONS": "{freemask.place.v1: 12}"}).bus
    assert (bus.partitions_of("freemask.place.v1"), bus.partitions_of("freemask.compose.v1")) == (12, 4)
    with pytest.raises(ConfigError, match="partitions must be at least 1"):
        load_config(environ={"FREEMASK_BUS__TOPIC_PARTITIONS": "{freemask.place.v1: 0}"})


# --- gRPC TLS ---------------------------------------------------------------

_SERVER_TLS = {"FREEMASK_SERVER__TLS_CERT_FILE": "/tls/tls.crt", "FREEMASK_SERVER__TLS_KEY_FILE": "/tls/tls.key",
               "FREEMASK_SERVER__TLS_CA_FILE": "/tls/ca.crt"}
_MUTUAL_TLS = {**_SERVER_TLS, "FREEMASK_SERVER__TLS_CLIENT_CA_FILE": "/tls/ca.crt",
               "FREEMASK_SERVER__TLS_CLIENT_CERT_FILE": "/tls/client.crt",
               "FREEMASK_SERVER__TLS_CLIENT_KEY_FILE": "/tls/client.key"}


def test_grpc_tls_is_off_by_default_and_paths_are_taken_as_given() -> None:
    plain = load_config(environ={}).server
    assert (plain.tls_cert_file, plain.tls_key_file, plain.tls_ca_file) == (None, None, None)
    # paths only: nothing is read while the config loads (the chart's tests load configs whose
    # mounted files exist only in the pod); the server and channels read them when they start
    mutual = load_config(environ=_MUTUAL_TLS).server
    assert (mutual.tls_cert_file, mutual.tls_client_ca_file, mutual.tls_client_key_file) == (
        Path("/tls/tls.crt"), Path("/tls/ca.crt"), Path("/tls/client.key"))
    client_only = load_config(environ={"FREEMASK_SERVER__TLS_CA_FILE": "/tls/ca.crt"}).server
    assert client_only.tls_ca_file == Path("/tls/ca.crt") and client_only.tls_cert_file is None


@pytest.mark.parametrize(
    ("drop", "expected"),
    [
        (["FREEMASK_SERVER__TLS_KEY_FILE"], "tls_cert_file and tls_key_file go together; only tls_cert_file is set"),
        (["FREEMASK_SERVER__TLS_CERT_FILE"], "only tls_key_file is set"),
        (["FREEMASK_SERVER__TLS_CA_FILE"], "tls_cert_file (servers on TLS) needs tls_ca_file"),
        (["FREEMASK_SERVER__TLS_CLIENT_KEY_FILE"],
         "tls_client_cert_file and tls_client_key_file go together; only tls_client_cert_file is set"),
        (["FREEMASK_SERVER__TLS_CLIENT_CERT_FILE", "FREEMASK_SERVER__TLS_CLIENT_KEY_FILE"],
         "tls_client_ca_file (servers require client certificates) needs tls_client_cert_file"),
        (["FREEMASK_SERVER__TLS_CERT_FILE", "FREEMASK_SERVER__TLS_KEY_FILE"],
         "tls_client_ca_file (mutual TLS) needs the server's own tls_cert_file and tls_key_file"),
    ],
)
def test_half_configured_grpc_tls_is_refused_with_what_is_missing(drop: list[str], expected: str) -> None:
    environ = {k: v for k, v in _MUTUAL_TLS.items() if k not in drop}
    with pytest.raises(ConfigError, match="half-configured gRPC TLS") as info:
        load_config(environ=environ)
    assert expected in str(info.value)


def test_every_tls_problem_is_named_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ={"FREEMASK_SERVER__TLS_CERT_FILE": "/tls/tls.crt",
                             "FREEMASK_SERVER__TLS_CLIENT_CERT_FILE": "/tls/client.crt"})
    message = str(info.value)
    for fragment in ("only tls_cert_file is set", "only tls_client_cert_file is set",
                     "tls_client_cert_file needs tls_ca_file", "tls_cert_file (servers on TLS) needs tls_ca_file"):
        assert fragment in message, message
