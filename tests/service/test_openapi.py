"""The OpenAPI document in the repository is the app's, and schemathesis finds no 500 in it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from gravel.client import Client

from .conftest import ADMIN, open_session

DOC = Path(__file__).parents[2] / "docs" / "openapi.json"


def test_committed_openapi_document_is_current():
    from gravel.service import ServiceConfig, create_app

    current = create_app(ServiceConfig()).openapi()
    assert json.loads(DOC.read_text()) == current, "run: gravel openapi --out docs/openapi.json"


def _schemathesis(url: str, token: str, params: dict[str, str], workdir: Path, *extra: str) -> str:
    config = workdir / "schemathesis.toml"
    config.write_text("[parameters]\n" + "".join(f'"{k}" = "{v}"\n' for k, v in params.items()))
    st = Path(sys.executable).with_name("st")
    proc = subprocess.run(
        [str(st), "--config-file", str(config), "run", str(DOC), "--url", url,
         "-H", f"Authorization: Bearer {token}", "--checks", "not_a_server_error",
         "-n", "25", "--seed", "7", "--request-timeout", "60", *extra],
        capture_output=True, text=True, timeout=600, cwd=workdir,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return proc.stdout


def test_schemathesis_finds_no_server_errors(server, deployed, service_keys, service_artifact, tmp_path):
    """On the shared server (its low limits make more of the generated bodies reach them); the
    admin's view may delete the model, so it is deployed again afterwards."""
    start = len(server.log.read_bytes())
    sid, headers = open_session(server.url, deployed, service_keys[2])
    token = headers["Authorization"].split()[1]
    try:
        # A client's view: its real session id and token, random bodies and parameters.
        out = _schemathesis(server.url, token, {"sid": sid, "name": deployed}, tmp_path,
                            "--exclude-method", "DELETE")
        assert int(re.search(r"(\d+) generated", out).group(1)) >= 100, out[-2000:]
        # The admin's view, deletes included.
        _schemathesis(server.url, ADMIN, {"name": deployed}, tmp_path)
    finally:
        with Client(server.url, token=ADMIN, cache_dir=tmp_path / "cache") as c:
            c.deploy(service_artifact)
    log = server.log.read_bytes()[start:].decode(errors="replace")
    assert not re.search(r"error e_[0-9a-f]+ ", log), log[-3000:]  # no server fault was logged
