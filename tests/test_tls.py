"""TLS on the client port (dtf.streams.tls): a CA made here signs the server's certificate; a client
that trusts that CA connects (and is still bound by its role), one that does not is refused."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys

import nats
import pytest
from conftest import SecuredServer
from dtf.streams import auth, tls, topology


@pytest.fixture
def ca(tmp_path):
    return tls.make_ca(tmp_path / "ca")


@pytest.fixture
def tls_server(tmp_path, ca):
    files = tls.issue(tmp_path / "server-cert", *ca, hosts=["127.0.0.1", "localhost"])
    secured = SecuredServer(tmp_path / "secured", tls_files=files)
    secured.creds("viewer", "vic")
    with secured.server:
        yield secured


async def test_a_client_that_trusts_the_ca_connects_over_tls(tls_server):
    nc = await tls_server.connect(tls_server.admin)
    try:
        assert nc.connected_url.scheme == "tls"
        await topology.provision(nc.jetstream())
        assert (await nc.jetstream().stream_info(topology.EVENTS)).config.name == topology.EVENTS
    finally:
        await nc.close()


async def _refused(url: str, **options) -> BaseException:
    with pytest.raises(Exception) as raised:
        await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=1, connect_timeout=3, **options)
    return raised.value


async def test_a_client_that_does_not_trust_the_ca_is_refused(tls_server, tmp_path):
    options = auth.client_options(tls_server.admin)
    other_ca, _ = tls.make_ca(tmp_path / "other-ca", "somebody else's CA")
    for context in (ssl.create_default_context(), ssl.create_default_context(cafile=str(other_ca))):
        error = await _refused(tls_server.url, tls=context, **options)
        assert "certificate verify failed" in repr(error).lower() or isinstance(error, ssl.SSLError), error


async def test_a_client_without_tls_is_refused(tls_server):
    plain = tls_server.url.replace("tls://", "nats://")
    await _refused(plain, **auth.client_options(tls_server.admin))


async def test_tls_does_not_widen_a_role(tls_server):
    refused = []

    async def on_error(exc):
        refused.append(str(exc))

    nc = await tls_server.connect(tls_server.creds("viewer", "vic"), error_cb=on_error)
    try:
        await nc.publish("dtf.worker.w1.drain", b"{}")
        await nc.flush()
        for _ in range(100):
            if refused:
                break
            await nc.flush()
        assert refused and "permissions violation" in refused[0]
    finally:
        await nc.close()


def test_the_certificate_names_the_addresses_clients_use(tmp_path, ca):
    from cryptography import x509

    files = tls.issue(tmp_path, *ca, hosts=tls.listen_hosts("10.1.2.3"))
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"10.1.2.3", "127.0.0.1"}
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert oct(files.key.stat().st_mode & 0o777) == "0o600"


@pytest.mark.slow
def test_dtf_up_tls_end_to_end_and_an_untrusting_cli_is_refused(tmp_path):
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    for name in ("DTF_NATS_URL", "DTF_CREDS", "DTF_CA"):
        env.pop(name, None)
    up = subprocess.Popen(
        [sys.executable, "-m", "dtf", "up", "--tls", "--workers", "1", "--data-dir", str(tmp_path / "d"),
         "--nats-port", "0", "--no-dashboard"],
        stdout=subprocess.PIPE, stderr=(tmp_path / "up.log").open("ab"), env=env, text=True)
    try:
        exports = dict(up.stdout.readline().strip().removeprefix("export ").split("=", 1) for _ in range(3))
        assert exports["DTF_NATS_URL"].startswith("tls://127.0.0.1:")
        context = json.loads((tmp_path / "d" / "context.json").read_text())
        assert context["ca"] == exports["DTF_CA"] and context["nats_url"] == exports["DTF_NATS_URL"]

        def cli(*args: str, **extra: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "dtf", *args], check=False, capture_output=True,
                                  text=True, env={**env, **extra}, timeout=120, cwd=tmp_path)

        done = cli("submit", "--command", "true", "--wait")  # URL, credentials and CA from the context
        assert done.returncode == 0, done.stderr
        untrusting = cli("tasks", "--nats", exports["DTF_NATS_URL"], DTF_CREDS=exports["DTF_CREDS"])
        assert untrusting.returncode == 2 and "certificate verify failed" in untrusting.stderr.lower()
        trusting = cli("tasks", "--json", "--nats", exports["DTF_NATS_URL"], DTF_CREDS=exports["DTF_CREDS"],
                       DTF_CA=exports["DTF_CA"])
        assert trusting.returncode == 0, trusting.stderr
        assert [t["state"] for t in json.loads(trusting.stdout)["tasks"]] == ["passed"]
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0
