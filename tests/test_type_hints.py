"""The public classes' annotations resolve at run time, where the package publishes them.

Re-exported names get ``__module__ = "prismq_subprocess"`` (for reprs and tracebacks), and
``typing.get_type_hints`` resolves a class's string annotations in the namespace of its
``__module__``: the package's, which lacks the names the private module imported (``Any``, its
own helpers). pydantic resolves them the same way, so a FastAPI endpoint annotated ``-> Run``
failed when it was defined ("not fully defined").
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import inspect
import typing

import pytest

import prismq_subprocess as pq

PUBLIC_MODULES = [
    "prismq_subprocess",
    "prismq_subprocess.abc",
    "prismq_subprocess.exceptions",
    "prismq_subprocess.testing",
]


def _public_classes() -> list[tuple[str, type]]:
    found = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) and obj.__module__.startswith("prismq_subprocess"):
                found.append((f"{module_name}.{name}", obj))
    return found


@pytest.mark.parametrize(
    ("name", "cls"), _public_classes(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_every_public_class_has_annotations_that_resolve(name: str, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ():
        # What pydantic reads for a dataclass: the field's own type, resolved too.
        assert not isinstance(field.type, str), (name, field.name, field.type)
        assert hints[field.name] == field.type


def test_dask_classes_annotations_resolve() -> None:
    dask = pytest.importorskip("prismq_subprocess.dask")
    for name in dask.__all__:
        obj = getattr(dask, name)
        if inspect.isclass(obj):
            typing.get_type_hints(obj)


def test_a_fastapi_endpoint_can_return_a_run() -> None:
    fastapi = pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    app = fastapi.FastAPI()
    run = pq.Run(module_id="greeter", parameters={"n": 3})
    run.mark_running(pid=42)

    @app.get("/runs/{run_id}")
    async def get_run(run_id: str) -> pq.Run:
        assert run_id == run.run_id
        return run

    async def fetch() -> typing.Any:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.get(f"/runs/{run.run_id}")
        response.raise_for_status()
        return response.json()

    body = asyncio.run(fetch())
    assert body["run_id"] == run.run_id
    assert body["module_id"] == "greeter"
    assert body["parameters"] == {"n": 3}
    assert body["pid"] == 42
    assert body["status"] == "running"


def _public_functions() -> list[tuple[str, object]]:
    found: list[tuple[str, object]] = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isfunction(obj):
                found.append((f"{module_name}.{name}", obj))
            elif inspect.isclass(obj) and obj.__module__.startswith("prismq_subprocess"):
                for member_name, member in vars(obj).items():
                    if isinstance(member, classmethod | staticmethod):
                        member = member.__func__
                    if inspect.isfunction(member) and not member_name.startswith("_"):
                        found.append((f"{module_name}.{name}.{member_name}", member))
                init = vars(obj).get("__init__")
                if inspect.isfunction(init):
                    found.append((f"{module_name}.{name}.__init__", init))
    return found


def test_public_functions_and_methods_have_annotations_that_resolve() -> None:
    """What FastAPI reads of a dependency (``Depends(SomeClass)``: its ``__init__``) or typer of a
    command: names a private module imports only for type checkers resolve among the public
    ones."""
    failed = []
    functions = _public_functions()
    assert len(functions) > 200
    for name, function in functions:
        try:
            typing.get_type_hints(function)
        except Exception as exc:
            failed.append(f"{name}: {type(exc).__name__}: {exc}")
    assert failed == []
