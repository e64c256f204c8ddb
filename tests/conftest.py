pytest_plugins = ["tests.support.fixtures", "tests.support.fleet"]


# Tests that reach a real service through these fixtures are integration tests too (the
# modules that start servers, swtpm or SoftHSM themselves say so with pytestmark).
_INTEGRATION_FIXTURES = {"est_instance", "postgres", "pg_url", "mosquitto"}


def pytest_collection_modifyitems(items):
    import pytest

    for item in items:
        callspec = getattr(item, "callspec", None)
        if _INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())) or (
                callspec is not None and "postgres" in callspec.id.split("-")):
            item.add_marker(pytest.mark.integration)
