"""Several server replicas sharing one PostgreSQL database, over real TLS."""

import psycopg2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from device_sdk.est import EstClient, EstError
from simulators.served import ServedInstance, free_port

pytestmark = pytest.mark.integration  # served, swtpm, SoftHSM or a private broker


def csr(cn):
    key = ec.generate_private_key(ec.SECP256R1())
    return x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])).sign(key, hashes.SHA256())


def pg_scalar(url, query):
    with psycopg2.connect(url) as connection, connection.cursor() as cursor:
        cursor.execute(query)
        return cursor.fetchone()[0]


@pytest.fixture
def replicas(pg_url):
    env = {"ENROLL_DATABASE__URL": pg_url}
    first = ServedInstance(env=env)
    port = free_port()
    second = ServedInstance(directory=first.dir, env={
        **env, "ENROLL_SERVER__PORT": str(port),
        "ENROLL_SERVER__PUBLIC_URL": f"https://localhost:{port}"})
    second.port = port
    try:
        with first, second:
            yield first, second
    finally:
        second.stop()
        first.cleanup()


def test_replicas_share_state_through_postgresql(replicas, pg_url):
    first, second = replicas
    token = first.token("default")  # created by the operator CLI in PostgreSQL
    with EstClient(first.url, first.trust_anchor) as client:
        issued = client.simpleenroll(csr("pg-dev-1"), token=token)
    # The token is single use across replicas: the other replica refuses it.
    with EstClient(second.url, second.trust_anchor) as client, \
            pytest.raises(EstError) as excinfo:
        client.simpleenroll(csr("pg-dev-2"), token=token)
    assert excinfo.value.code == "auth.token_used"
    assert pg_scalar(pg_url, "SELECT COUNT(*) FROM certificate") == 1
    assert pg_scalar(pg_url, "SELECT serial FROM certificate") == str(issued.serial_number)
    assert pg_scalar(pg_url, "SELECT COUNT(*) FROM audit_event WHERE code = "
                             "'auth.token_used'") == 1
    # The operator sees the device from the shared database.
    assert [d["device_id"] for d in second.cli_json("devices", "list")] == ["pg-dev-1"]
