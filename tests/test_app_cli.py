"""`python app.py` as a user starts it: bound to 127.0.0.1, a login with --gradio-auth."""

import subprocess
import sys

import httpx
import pytest

from tests.browser import ROOT, AppProcess


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("app")
    process = AppProcess(["--models-dir", str(tmp / "models"), "--gradio-auth", "alice:wonderland"], {},
                         tmp / "app.log")
    yield process
    process.stop()


def test_listens_on_loopback_only(app):
    sockets = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout
    bound = [line.split()[3] for line in sockets.splitlines() if line.split()[3].endswith(f":{app.port}")]
    assert bound == [f"127.0.0.1:{app.port}"], sockets


def test_login_is_required(app):
    with httpx.Client(base_url=app.url, timeout=30) as client:
        assert client.get("config").status_code == 401
        assert client.post("login", data={"username": "alice", "password": "nope"}).status_code >= 400
        assert client.get("config").status_code == 401
        assert client.post("login", data={"username": "alice", "password": "wonderland"}).status_code == 200
        config = client.get("config")
        assert config.status_code == 200 and "GPTQ Workbench" in config.text


def test_bad_auth_flag_is_explained():
    result = subprocess.run([sys.executable, "app.py", "--gradio-auth", "nocolon"], capture_output=True, text=True,
                            cwd=ROOT, timeout=60)
    assert result.returncode == 2 and "USER:PASS" in result.stderr
