"""Throwaway Google credentials for talking to local emulators, so no client ever waits on a browser.

Beam's BigQuery sink builds an apitools client that insists on credentials
(with none it starts an interactive OAuth flow and hangs). ``start`` serves a
loopback OAuth token endpoint and writes a service-account JSON with a fresh
RSA key whose ``token_uri`` points at it, then sets
``GOOGLE_APPLICATION_CREDENTIALS``. The real google-auth code signs and
exchanges a token as usual; it just never leaves 127.0.0.1. Nothing is
written outside a temporary folder, and no key is ever committed.
"""

from __future__ import annotations

import http.server
import json
import pathlib
import tempfile
import threading

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

_TOKEN = b'{"access_token": "emulator-token", "expires_in": 3600, "token_type": "Bearer"}'


class _TokenHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(_TOKEN)))
        self.end_headers()
        self.wfile.write(_TOKEN)

    def log_message(self, *args):
        pass


class FakeCredentials:
    """A loopback token server plus a service-account file pointing at it."""

    def __init__(self, project: str = "test-project"):
        self.project = project
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TokenHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._dir = tempfile.TemporaryDirectory(prefix="fake-sa-")
        self.path = pathlib.Path(self._dir.name) / "service-account.json"

    def start(self) -> FakeCredentials:
        self._thread.start()
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        port = self._server.server_address[1]
        self.path.write_text(
            json.dumps(
                {
                    "type": "service_account",
                    "project_id": self.project,
                    "private_key_id": "emulator",
                    "private_key": pem,
                    "client_email": f"emulator@{self.project}.iam.gserviceaccount.com",
                    "client_id": "1",
                    "token_uri": f"http://127.0.0.1:{port}/token",
                }
            )
        )
        return self

    def environment(self) -> dict[str, str]:
        return {"GOOGLE_APPLICATION_CREDENTIALS": str(self.path), "GOOGLE_CLOUD_PROJECT": self.project}

    def stop(self) -> None:
        self._server.shutdown()
        self._dir.cleanup()
