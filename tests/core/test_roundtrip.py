"""Arbitrary bytes round-trip byte-exact through a cat-like child in every real mode."""

from __future__ import annotations

import asyncio
import shutil

from conftest import REAL, WRAPPER_FACTORIES
from helpers import py
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prismq_subprocess as pq

# The system's cat where there is one: 12 examples x every mode x 2 spawns of a Python child
# took 11-25 s of the suite, most of it the interpreter starting.
_cat = shutil.which("cat")
CAT = (
    [_cat]
    if _cat is not None
    else py("import sys, shutil; shutil.copyfileobj(sys.stdin.buffer, sys.stdout.buffer)")
)

interesting = st.one_of(
    st.binary(max_size=2048),
    st.lists(
        st.sampled_from([b"\0", b"\xff\xfe", b"\n", b"\r\n", b"\xc3", b"text"]), max_size=50
    ).map(b"".join),
    st.binary(min_size=70_000, max_size=70_100),  # more than one pipe buffer
)


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=interesting)
def test_bytes_round_trip(data: bytes) -> None:
    async def main() -> None:
        for name in REAL:
            async with WRAPPER_FACTORIES[name]() as wrapper:
                result = await wrapper.run(*CAT, input=data, max_output_bytes=None)
                assert result.stdout == data, name
                proc = await wrapper.create_subprocess_exec(*CAT, stdin=pq.PIPE, stdout=pq.PIPE)
                out, _ = await proc.communicate(data)
                assert out == data, name

    asyncio.run(main())
