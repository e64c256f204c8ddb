"""The server's layers keep their rules (docs/design.md, "Layers"): checked on the source,
so a new import cycle or a model used outside store/ fails here, not in review."""

from __future__ import annotations

from tests.support.imports import cycles, graph, imports, modules

PACKAGE = "enroll_server"
# Modules outside store/ allowed to use the models: none (the CA rotation's writes are
# repository methods too, store/cas.py).
MODELS_OUTSIDE_STORE: set[str] = set()
PURE = ("enroll_server.attestation", "enroll_server.policy")


def _imports_of(prefixes: tuple[str, ...]) -> dict[str, set[str]]:
    edges = graph(PACKAGE)
    return {name: targets for name, targets in edges.items() if name.startswith(prefixes)}


def test_the_server_has_no_import_cycle():
    assert cycles(graph(PACKAGE)) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_store_imports_the_models():
    found = modules(PACKAGE)
    users = {name for name, path in found.items()
             if not name.startswith(f"{PACKAGE}.store")
             and any(target == f"{PACKAGE}.store.models"
                     for target, _ in imports(name, path, set(found)))}
    assert users == MODELS_OUTSIDE_STORE


def test_pure_packages_touch_no_store_no_http_no_services():
    forbidden = ("enroll_server.store", "enroll_server.http", "enroll_server.services",
                 "enroll_server.app", "enroll_server.cli", "enroll_server.notify")
    offending = {name: sorted(t for t in targets if t.startswith(forbidden))
                 for name, targets in _imports_of(PURE).items()}
    assert {name: targets for name, targets in offending.items() if targets} == {}


def test_the_store_depends_on_no_service_and_no_route():
    allowed = ("enroll_server.store", "enroll_server.errors", "enroll_server.policy",
               "enroll_server.attestation", "enroll_server.ca.profiles")
    offending = {name: sorted(t for t in targets if not t.startswith(allowed))
                 for name, targets in _imports_of(("enroll_server.store",)).items()}
    assert {name: targets for name, targets in offending.items() if targets} == {}
