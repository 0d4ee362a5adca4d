import pytest

from cirrus import config


@pytest.fixture
def cfg_file(tmp_path):
    path = tmp_path / "cirrus.yaml"
    path.write_text("amqp:\n  uri: amqp://a/\ndrivers:\n  monitor_interval: 3\n  uri: test:///default\n")
    return path


def test_the_file_is_read_as_nested_sections(cfg_file):
    cfg = config.load(cfg_file, environ={})
    assert cfg["amqp"]["uri"] == "amqp://a/" and cfg["drivers"]["monitor_interval"] == 3


def test_every_key_is_overridden_by_its_variable_keeping_its_type(cfg_file):
    cfg = config.load(cfg_file, environ={"CIRRUS_DRIVERS_MONITOR_INTERVAL": "1",
                                         "CIRRUS_DRIVERS_URI": "qemu:///system",
                                         "CIRRUS_UNRELATED": "x"})
    assert cfg["drivers"]["monitor_interval"] == 1
    assert cfg["drivers"]["uri"] == "qemu:///system"


def test_a_shipped_key_the_file_leaves_out_is_still_set_by_its_variable(cfg_file):
    cfg = config.load(cfg_file, environ={"CIRRUS_LOGGING_DIR": "/var/log/cirrus",
                                         "CIRRUS_METRICS_PORT": "0",
                                         "CIRRUS_NOSUCH_KEY": "x"})
    assert cfg["logging"] == {"dir": "/var/log/cirrus"} and cfg["metrics"] == {"port": 0}
    assert "nosuch" not in cfg


def test_the_file_itself_is_chosen_by_cirrus_config(cfg_file):
    assert config.load(environ={"CIRRUS_CONFIG": str(cfg_file)})["amqp"]["uri"] == "amqp://a/"


def test_a_missing_or_broken_file_is_a_clear_error(tmp_path):
    with pytest.raises(config.ConfigError, match="not found"):
        config.load(tmp_path / "nope.yaml", environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("amqp: [\n")
    with pytest.raises(config.ConfigError, match="bad.yaml"):
        config.load(bad, environ={})


def test_the_shipped_file_has_every_setting_the_issue_names():
    cfg = config.load(config.DEFAULT_PATH, environ={})
    assert cfg["amqp"]["uri"] and cfg["database"]["url"] and cfg["gateway"]["port"]
    assert cfg["drivers"]["uri"] == "test:///default"
