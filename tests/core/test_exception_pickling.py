"""Every exception of ours survives pickle, as builtin exceptions do: a ``ProcessPoolExecutor``
job, a multiprocessing pool or a Dask task that raises one hands it over pickled (a new user's
find: ``run(check=True)`` failing inside a process pool broke the pool, "terminated abruptly",
because ``ProcessFailedError`` could not be rebuilt)."""

from __future__ import annotations

import pickle

import pytest

from prismq_subprocess import exceptions as errors

SAMPLES = {
    "ProcessFailedError": lambda: errors.ProcessFailedError(
        cmd=["x", "y"], returncode=3, stdout=b"out", stderr=b"err"
    ),
    "ProcessTimeoutError": lambda: errors.ProcessTimeoutError(
        cmd="sleep 9", timeout=1.5, returncode=-15, stdout=b"o", stderr=b"e"
    ),
    "TaskTimeoutError": lambda: errors.TaskTimeoutError(task_name="job", timeout=2.0),
    "CommandNotFoundError": lambda: errors.CommandNotFoundError("nope", "not on PATH"),
    "ScriptNotFoundError": lambda: errors.ScriptNotFoundError("/x/m.py", "is a directory"),
    "UnscriptedCommandError": lambda: errors.UnscriptedCommandError("no rule", ("ls", "-l")),
}


@pytest.mark.parametrize("name", list(SAMPLES))
def test_an_error_with_its_own_constructor_round_trips(name: str) -> None:
    error = SAMPLES[name]()
    error.add_note("a note")
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error)
    assert again.args == error.args
    assert str(again) == str(error)
    assert vars(again) == vars(error)
    for attribute in ("errno", "strerror", "filename"):
        assert getattr(again, attribute, None) == getattr(error, attribute, None)


@pytest.mark.parametrize("name", sorted(errors.__all__))
def test_every_error_made_from_a_message_round_trips(name: str) -> None:
    cls = getattr(errors, name)
    try:
        error = cls("what went wrong")
    except TypeError:
        pytest.skip("takes other arguments (see the samples above)")
    error.detail = {"kept": [1, 2]}
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is cls
    assert again.args == error.args and str(again) == str(error)
    assert vars(again) == vars(error)
