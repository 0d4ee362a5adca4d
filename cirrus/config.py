"""Configuration: one YAML file, every key overridable by a CIRRUS_... variable.

The file is ``deploy/cirrus.yaml`` unless CIRRUS_CONFIG names another. A key
``section: {key: value}`` is overridden by ``CIRRUS_SECTION_KEY``; the value is
read as YAML, so numbers and booleans keep their type. Every key of the shipped
file can be set so, even when an operator's own file leaves it out (the
launcher sets CIRRUS_LOGGING_DIR and CIRRUS_METRICS_PORT for its children).
"""
import os
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PATH = REPO_ROOT / "deploy" / "cirrus.yaml"


class ConfigError(ValueError):
    pass


def _flatten(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def env_name(path):
    return "CIRRUS_" + "_".join(path).upper()


def load(path=None, environ=None):
    """Return the configuration as nested dicts, with the environment applied."""
    environ = os.environ if environ is None else environ
    path = Path(path or environ.get("CIRRUS_CONFIG") or DEFAULT_PATH)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"configuration file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    known = {key_path for key_path, _ in _flatten(tree)}
    if path.resolve() != DEFAULT_PATH:
        known |= {key_path for key_path, _ in _flatten(yaml.safe_load(DEFAULT_PATH.read_text()))}
    for key_path in sorted(known):
        name = env_name(key_path)
        if name in environ:
            node = tree
            for part in key_path[:-1]:
                if not isinstance(node.get(part), dict):
                    node[part] = {}     # a section the file leaves out, or leaves empty
                node = node[part]
            node[key_path[-1]] = yaml.safe_load(environ[name])
    return tree


def read_pem(key, path, kind):
    """The bytes of the PEM file at ``path``, set by ``key``, which must hold
    a ``kind`` ("CERTIFICATE", "PRIVATE KEY"): a wrong file is refused here,
    naming it, rather than failing every TLS handshake later."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None
    if f"{kind}-----".encode() not in data:
        raise ConfigError(f"{key}: {path} holds no PEM {kind}")
    return data


def tls_files(section, values):
    """The (certificate, key) PEM paths of ``section``'s tls_cert and tls_key,
    each checked to hold what it should, or None (plaintext) when neither is
    set; one without the other is a ConfigError."""
    cert, key = values.get("tls_cert"), values.get("tls_key")
    if not cert and not key:
        return None
    if not (cert and key):
        missing, given = ("tls_key", "tls_cert") if cert else ("tls_cert", "tls_key")
        raise ConfigError(f"{section}.{given} is set but {section}.{missing} is not")
    read_pem(f"{section}.tls_cert", cert, "CERTIFICATE")
    read_pem(f"{section}.tls_key", key, "PRIVATE KEY")
    return cert, key


_cached = None


def get():
    """The process-wide configuration, loaded once."""
    global _cached
    if _cached is None:
        _cached = load()
    return _cached
