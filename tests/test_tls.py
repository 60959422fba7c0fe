"""TLS and mutual TLS between `SearchServer` and `SearchClient`, and the CLI's checks of the PEM files."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from pki import Pki, make_pki
from test_cli import _cli, _one_line_error
from test_searcher import D, make_searcher

from elias_retrieval.client import SearchClient
from elias_retrieval.server import ServerConfig, start_server
from elias_retrieval.tls import channel_credentials, server_credentials, server_tls


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory) -> Pki:
    """Certificates from a CA the servers do not trust."""
    return make_pki(tmp_path_factory.mktemp("other-pki"), "another CA")


def tls_server(pki: Pki, mutual: bool = False):
    return start_server(make_searcher(), ServerConfig(host="127.0.0.1", port=0, tls_cert=pki.server_cert,
                                                      tls_key=pki.server_key,
                                                      tls_client_ca=pki.ca if mutual else None), warmup=False)


@pytest.fixture(scope="module")
def tls_served(pki):
    server = tls_server(pki)
    yield server
    server.stop(0)


@pytest.fixture(scope="module")
def mtls_served(pki):
    server = tls_server(pki, mutual=True)
    yield server
    server.stop(0)


def refused(client: SearchClient) -> grpc.RpcError:
    """The error of a search that must fail at the handshake: UNAVAILABLE, well within its deadline."""
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        client.search(embedding=np.ones(D, np.float32), timeout=5)
    assert time.monotonic() - t0 < 4
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value
    return e.value


def test_search_over_tls_matches_in_process(tls_served, pki):
    emb = np.linspace(-1, 1, D).astype(np.float32)
    for target in (tls_served.address, f"localhost:{tls_served.port}"):  # the certificate names both
        with SearchClient(target, timeout=10, tls_ca=pki.ca) as c:
            assert c.health() == "SERVING"
            np.testing.assert_array_equal(c.search(embedding=emb, k=7).ids,
                                          make_searcher().search_embeddings(emb[None], k=7).ids)
            assert c.last_index_version == "test-v1"


def test_plaintext_client_to_a_tls_port_fails_cleanly(tls_served):
    with SearchClient(tls_served.address) as c:
        refused(c)


def test_client_that_does_not_trust_the_server_certificate_is_refused(tls_served, other_pki):
    with SearchClient(tls_served.address, tls_ca=other_pki.ca) as c:
        refused(c)


def test_mutual_tls_rejects_a_client_without_a_certificate(mtls_served, pki):
    with SearchClient(mtls_served.address, tls_ca=pki.ca) as c:
        refused(c)


def test_mutual_tls_rejects_a_certificate_from_another_ca(mtls_served, pki, other_pki):
    with SearchClient(mtls_served.address, tls_ca=pki.ca, tls_cert=other_pki.client_cert,
                      tls_key=other_pki.client_key) as c:
        refused(c)


def test_mutual_tls_accepts_a_client_certificate_signed_by_the_client_ca(mtls_served, pki):
    with SearchClient(mtls_served.address, tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key) as c:
        assert c.search(embedding=np.ones(D, np.float32), k=3).ids.shape == (1, 3)


def test_plaintext_server_is_unchanged_by_default():
    server = start_server(make_searcher(), ServerConfig(host="127.0.0.1", port=0), warmup=False)
    try:
        with SearchClient(server.address) as c:
            assert c.search(embedding=np.ones(D, np.float32), k=3).ids.shape == (1, 3)
    finally:
        server.stop(0)


# ----- bad files: one error naming the file -----


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, pki) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    garbage = d / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n")
    empty = d / "empty.pem"
    empty.write_text("")
    key_as_cert = d / "key-as-cert.pem"
    key_as_cert.write_bytes(pki.server_key.read_bytes())
    bad_key = d / "bad.key"
    bad_key.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    return {"missing": d / "missing.pem", "garbage": garbage, "empty": empty, "key_as_cert": key_as_cert,
            "bad_key": bad_key, "dir": d}


@pytest.mark.parametrize("which", ["missing", "garbage", "empty", "key_as_cert", "dir"])
def test_bad_certificate_files_are_named(bad_files, pki, which):
    path = bad_files[which]
    with pytest.raises(ValueError, match=f"^{path}: "):
        server_credentials(path, pki.server_key)
    with pytest.raises(ValueError, match=f"^{path}: "):
        channel_credentials(ca=path)
    with pytest.raises(ValueError, match=f"^{path}: "):
        server_credentials(pki.server_cert, pki.server_key, client_ca=path)


def test_bad_or_mismatched_keys_are_named(bad_files, pki, other_pki):
    with pytest.raises(ValueError, match=f"^{bad_files['bad_key']}: not an unencrypted PEM private key"):
        server_credentials(pki.server_cert, bad_files["bad_key"])
    with pytest.raises(ValueError, match=f"^{other_pki.server_key}: this private key does not belong"):
        server_credentials(pki.server_cert, other_pki.server_key)
    with pytest.raises(ValueError, match=f"^{bad_files['missing']}: cannot read the private key"):
        channel_credentials(pki.ca, pki.client_cert, bad_files["missing"])


def test_half_a_key_pair_or_a_client_ca_alone_is_refused(pki):
    assert server_tls(None, None) is None
    with pytest.raises(ValueError, match="^tls_cert needs tls_key"):
        server_tls(pki.server_cert, None)
    with pytest.raises(ValueError, match="^tls_key needs tls_cert"):
        server_tls(None, pki.server_key)
    with pytest.raises(ValueError, match="^tls_client_ca needs tls_cert and tls_key"):
        server_tls(None, None, pki.ca)  # never a silent plaintext server
    with pytest.raises(ValueError, match="^tls_cert needs tls_key"):
        SearchClient("127.0.0.1:1", tls_ca=pki.ca, tls_cert=pki.client_cert)


def test_serve_cli_reports_tls_file_errors_in_one_line(tmp_path, pki, bad_files):
    serve = ["serve", tmp_path, "--port", "0"]
    _one_line_error(_cli(*serve, "--tls-cert", bad_files["missing"], "--tls-key", pki.server_key),
                    str(bad_files["missing"]), "cannot read the certificate")
    _one_line_error(_cli(*serve, "--tls-cert", bad_files["garbage"], "--tls-key", pki.server_key),
                    str(bad_files["garbage"]), "not a PEM certificate")
    _one_line_error(_cli(*serve, "--tls-cert", pki.server_cert, "--tls-key", bad_files["bad_key"]),
                    str(bad_files["bad_key"]))
    _one_line_error(_cli(*serve, "--tls-cert", pki.server_cert), "--tls-cert needs --tls-key")
    _one_line_error(_cli(*serve, "--tls-key", pki.server_key), "--tls-key needs --tls-cert")
    _one_line_error(_cli(*serve, "--tls-client-ca", pki.ca), "--tls-client-ca needs --tls-cert and --tls-key")
    _one_line_error(_cli(*serve, "--tls-cert", pki.server_cert, "--tls-key", pki.server_key,
                         "--tls-client-ca", bad_files["empty"]), str(bad_files["empty"]), "CA certificate")


def test_search_cli_over_tls_and_its_errors(tls_served, mtls_served, pki, bad_files):
    res = _cli("search", "--server", tls_served.address, "--tls-ca", pki.ca, "-k", "3", "wine market")
    assert res.exit_code == 0, res.output
    assert "3 labels by ELIAS" in res.stdout and "index version test-v1" in res.stdout
    res = _cli("search", "--server", mtls_served.address, "--tls-ca", pki.ca, "--tls-cert", pki.client_cert,
               "--tls-key", pki.client_key, "-k", "3", "wine market")
    assert res.exit_code == 0, res.output
    _one_line_error(_cli("search", "--server", mtls_served.address, "--tls-ca", pki.ca, "--timeout", "5", "wine"),
                    mtls_served.address, "UNAVAILABLE")
    _one_line_error(_cli("search", "--server", tls_served.address, "--tls-ca", bad_files["missing"], "wine"),
                    str(bad_files["missing"]))
    _one_line_error(_cli("search", "--server", tls_served.address, "--tls-key", pki.client_key, "wine"),
                    "--tls-key needs --tls-cert")
    _one_line_error(_cli("search", "some-index", "wine", "--tls-ca", pki.ca), "need --server")
