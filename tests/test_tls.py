"""HTTPS on the router's own port, with a certificate each test makes (tests/certs.py): the OpenAI
SDK talks to it trusting only the test's CA, a reload serves a renewed certificate, a broken one
is refused by the reload and by `check`, and `check` says what is served."""

from __future__ import annotations

import asyncio
import shutil
import ssl
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
import yaml

from llama_router.cli import main
from tests.certs import make_certs
from tests.conftest import RouterFactory, fake_profile


async def served_certificate(port: int, ca: Path) -> bytes:
    """The certificate a new TLS connection to the port gets (DER), checked against `ca`."""
    context = ssl.create_default_context(cafile=str(ca))
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost")
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
        await writer.wait_closed()
    return bytes(der)


def der(cert: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.read_text())


def sdk(port: int, ca: Path | None) -> openai.AsyncOpenAI:
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca)) if ca else True
    return openai.AsyncOpenAI(
        base_url=f"https://localhost:{port}/v1",
        api_key="unused",
        max_retries=0,
        http_client=httpx2.AsyncClient(verify=verify, timeout=20),
    )


async def test_the_openai_sdk_talks_to_the_router_over_https_trusting_the_ca(
    start_router: RouterFactory, dummy_model: Path, tmp_path: Path
) -> None:
    certs = make_certs(tmp_path / "tls")
    router = await start_router(
        {"m": fake_profile(dummy_model)}, tls_cert=str(certs.cert), tls_key=str(certs.key)
    )
    assert router.server.urls.startswith("https://")
    client = sdk(router.port, certs.ca)
    models = await client.models.list()
    assert [model.id for model in models.data] == ["m"]
    chat = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hello there"}], max_tokens=4
    )
    assert chat.choices[0].message.content
    stream = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    pieces = [chunk.choices[0].delta.content async for chunk in stream if chunk.choices]
    assert "".join(piece or "" for piece in pieces)
    await client.close()

    stranger = sdk(router.port, None)  # the system's CAs do not know the test's
    with pytest.raises(openai.APIConnectionError):
        await stranger.models.list()
    await stranger.close()


async def test_a_reload_serves_the_renewed_certificate_and_refuses_a_broken_one(
    start_router: RouterFactory, dummy_model: Path, tmp_path: Path
) -> None:
    certs = make_certs(tmp_path / "tls")
    router = await start_router(
        {"m": fake_profile(dummy_model)}, tls_cert=str(certs.cert), tls_key=str(certs.key)
    )
    assert await served_certificate(router.port, certs.ca) == der(certs.cert)

    renewed = make_certs(tmp_path / "renewed", ca=certs.ca)
    shutil.copy(renewed.cert, certs.cert)
    shutil.copy(renewed.key, certs.key)
    assert await router.server.reloader.reload("SIGHUP")
    assert await served_certificate(router.port, certs.ca) == der(renewed.cert)

    certs.key.write_text("not a key\n")
    assert not await router.server.reloader.reload("SIGHUP")
    error = router.server.reloader.last_error
    assert error is not None and "server.tls_cert/server.tls_key" in error["message"]
    assert str(certs.key) in error["message"]
    # The running certificate is kept, and still served.
    assert await served_certificate(router.port, certs.ca) == der(renewed.cert)


def write_config(path: Path, dummy_model: Path, server: dict[str, Any], peers: dict[str, Any]) -> Path:
    profiles = {"m": fake_profile(dummy_model)}
    path.write_text(yaml.safe_dump({"server": server, "profiles": profiles, "peers": peers}))
    return path


def test_check_names_the_certificate_and_how_https_peers_are_verified(
    tmp_path: Path, dummy_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    certs = make_certs(tmp_path / "tls")
    peers = {
        "lab": {"url": "https://lab.example:8443", "ca_file": str(certs.ca)},
        "cloud": {"url": "https://api.example/v1"},
        "lan": {"url": "http://10.0.0.2:8080"},
    }
    server = {"port": 8443, "tls_cert": str(certs.cert), "tls_key": str(certs.key)}
    path = write_config(tmp_path / "profiles.yaml", dummy_model, server, peers)
    assert main(["check", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert "listen: https://127.0.0.1:8443" in out
    about = "commonName=server; names localhost, 127.0.0.1; valid until"
    assert f"tls: {certs.cert} with {certs.key}: {about}" in out
    assert f"tls: its certificate is verified against the CA in {certs.ca}" in out
    assert "tls: its certificate is verified against the system's trusted CAs" in out
    assert out.count("tls: its certificate") == 2  # none for the plain-http peer
    assert "limits: bodies up to 32 MiB each, 256 MiB in all, each whole within 60s" in out


@pytest.mark.parametrize(
    ("server", "problem"),
    [
        ({"tls_cert": "server.pem"}, "tls_cert and tls_key go together"),
        ({"tls_cert": "missing.pem", "tls_key": "server.key"}, "server.tls_cert: no such file"),
        ({"tls_cert": "server.key", "tls_key": "server.key"}, "server.tls_cert/server.tls_key: cannot serve"),
    ],
)
def test_check_refuses_a_certificate_it_could_not_serve(
    tmp_path: Path,
    dummy_model: Path,
    capsys: pytest.CaptureFixture[str],
    server: dict[str, str],
    problem: str,
) -> None:
    make_certs(tmp_path)  # server.pem and server.key beside the config, named relative to it
    path = write_config(tmp_path / "profiles.yaml", dummy_model, server, {})
    assert main(["check", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and problem in err
