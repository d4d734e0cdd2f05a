"""The OpenAPI document in the repository is the app's, and schemathesis finds no 500 in it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from gravel.client import Client

from .conftest import ADMIN, ServerProcess

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


def test_schemathesis_finds_no_server_errors(tmp_path, service_artifact):
    srv = ServerProcess(tmp_path / "data", env={"GRAVEL_MAX_INPUT_BYTES": str(1 << 20)}).start()
    try:
        with Client(srv.url, token=ADMIN, cache_dir=tmp_path / "cache") as c:
            c.deploy(service_artifact)
            session = c.session("digits")
            # A client's view: its real session id and token, random bodies and parameters.
            out = _schemathesis(srv.url, session.token, {"sid": session.id, "name": "digits"}, tmp_path,
                                "--exclude-method", "DELETE")
            assert int(re.search(r"(\d+) generated", out).group(1)) >= 100, out[-2000:]
            # The admin's view, deletes included.
            _schemathesis(srv.url, ADMIN, {"name": "digits"}, tmp_path)
        log = srv.log.read_text()
        assert not re.search(r"error e_[0-9a-f]+ ", log), log[-3000:]  # no server fault was logged
    finally:
        srv.stop()
