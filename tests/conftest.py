pytest_plugins = ["tpm_enroll_testing", "tests.support.fixtures", "tests.support.fleet"]


# Tests that reach a real service through these fixtures are integration tests too (the
# modules that start servers, swtpm or SoftHSM themselves say so with pytestmark); the
# shipped plugin's fixtures (tpm_enroll_testing) start served instances, swtpm, Mosquitto.
_INTEGRATION_FIXTURES = {
    "est_instance", "postgres", "pg_url", "mosquitto",
    "enroll_server", "enroll_tpm_group", "enroll_broker", "enroll_device", "enroll_operator",
}


def pytest_collection_modifyitems(items):
    import pytest

    for item in items:
        callspec = getattr(item, "callspec", None)
        if _INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())) or (
                callspec is not None and "postgres" in callspec.id.split("-")):
            item.add_marker(pytest.mark.integration)
