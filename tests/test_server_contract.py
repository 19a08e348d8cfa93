"""The server's OpenAPI document is its contract: what it documents is what it answers.

Each operation lists every status it can answer with its error body; and a
bounded schemathesis pass (its Python API, against the ASGI app in-process)
sends schema-valid and schema-invalid requests to every operation, then walks
the session links (create -> feed -> generate -> delete), with all its checks.
The long command-line pass (>= 500 examples per operation) is in the README.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server tests need the serve extra: pip install 'rnnkit[serve]'")
schemathesis = pytest.importorskip("schemathesis", reason="the contract test needs schemathesis (the dev extra)")

from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from hypothesis.stateful import run_state_machine_as_test  # noqa: E402

from rnnkit.checkpoint import load_checkpoint  # noqa: E402
from rnnkit.config import ServeLimits  # noqa: E402
from rnnkit.server import create_app  # noqa: E402
from test_server import _classifier, _lm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEY = "contract-key-0123456789"
LIMITS = ServeLimits(max_length=40, max_samples=3, max_texts=8, max_request_bytes=64_000, max_sessions=16,
                     max_client_requests=4)
EXAMPLES = 15  # per operation and generation mode: the CI pass stays well under a minute


@pytest.fixture(scope="module")
def apps(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    lm, cls = load_checkpoint(_lm(root / "lm")), load_checkpoint(_classifier(root / "cls"))
    return {"lm": create_app({"lm": lm, "cls": cls}, limits=LIMITS, api_keys=[KEY]),
            "open": create_app(lm, limits=LIMITS)}


def test_every_operation_documents_its_answers(apps):
    schema = TestClient(apps["lm"]).get("/openapi.json").json()
    expected = {
        ("get", "/health"): {"200", "413"},
        ("get", "/models"): {"200", "401", "413", "429"},
        ("get", "/model"): {"200", "401", "413", "422", "429"},
        ("post", "/generate"): {"200", "400", "401", "413", "422", "429", "503", "504"},
        ("post", "/generate/stream"): {"200", "400", "401", "413", "422", "429", "503", "504"},
        ("post", "/classify"): {"200", "400", "401", "413", "422", "429", "503", "504"},
        ("post", "/inspect"): {"200", "400", "401", "413", "422", "429", "503", "504"},
        ("post", "/inspect/words"): {"200", "400", "401", "413", "422", "429", "503", "504"},
        ("post", "/sessions"): {"201", "400", "401", "413", "422", "429", "503", "504"},
        ("get", "/sessions/{sid}"): {"200", "401", "404", "413", "422", "429"},
        ("post", "/sessions/{sid}/feed"): {"200", "400", "401", "404", "413", "422", "429", "503", "504"},
        ("post", "/sessions/{sid}/generate"): {"200", "400", "401", "404", "413", "422", "429", "503", "504"},
        ("delete", "/sessions/{sid}"): {"204", "401", "404", "413", "422", "429"},
    }
    found = {(method, path): set(op["responses"]) for path, ops in schema["paths"].items() for method, op in ops.items()}
    assert found == expected
    for (method, path), statuses in expected.items():
        op = schema["paths"][path][method]
        for status in statuses - {"200", "201", "204"}:
            ref = op["responses"][status]["content"]["application/json"]["schema"]["$ref"]
            assert ref == "#/components/schemas/ErrorBody", (method, path, status)
        assert ("security" in op) == (path != "/health")
    assert schema["paths"]["/generate"]["post"]["responses"]["401"]["headers"].keys() == {"WWW-Authenticate"}
    assert schema["paths"]["/generate"]["post"]["responses"]["429"]["headers"].keys() == {"Retry-After"}
    scheme = schema["components"]["securitySchemes"]["apiKey"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    links = schema["paths"]["/sessions"]["post"]["responses"]["201"]["links"]
    assert {link["operationId"] for link in links.values()} == {"feed_session", "continue_session", "session_info",
                                                                "delete_session"}
    # The models a request may name are the ones of its task.
    bodies = schema["components"]["schemas"]
    assert bodies["GenerateRequest"]["properties"]["model"]["anyOf"][0]["const"] == "lm"
    assert bodies["ClassifyRequest"]["properties"]["model"]["anyOf"][0]["const"] == "cls"


def test_without_keys_no_401_or_security_is_documented(apps):
    schema = TestClient(apps["open"]).get("/openapi.json").json()
    assert "securitySchemes" not in schema.get("components", {})
    for ops in schema["paths"].values():
        for op in ops.values():
            assert "401" not in op["responses"] and "security" not in op


def _schema(app):
    config = schemathesis.Config.from_path(ROOT / "schemathesis.toml")
    return schemathesis.openapi.from_asgi("/openapi.json", app, config=config)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["lm", "open"])
def test_schemathesis_finds_nothing(apps, which):
    """Schema-valid requests are accepted, invalid ones get a documented 4xx, answers match their schemas."""
    schema = _schema(apps[which])
    headers = {"Authorization": f"Bearer {KEY}"} if which == "lm" else None
    tested = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            def run(case):
                case.call_and_validate(headers=headers)

            try:
                run()
            except Unsatisfiable:  # negative: an operation without parameters or body has nothing to break
                assert mode == schemathesis.GenerationMode.NEGATIVE and operation.path in ("/health", "/models")
        tested.append(operation.label)
    assert len(tested) == (13 if which == "lm" else 11)

    # Stateful: follow the session links (create -> feed / generate / info -> delete).
    machine = schema.as_state_machine()
    if headers:
        class Machine(machine):
            def get_call_kwargs(self, case):
                return {"headers": headers}
    else:
        Machine = machine  # noqa: N806
    run_state_machine_as_test(Machine, settings=settings(max_examples=10, stateful_step_count=6, deadline=None,
                                                           database=None, derandomize=True,
                                                           suppress_health_check=list(HealthCheck)))
