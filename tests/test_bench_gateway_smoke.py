"""The gateway benchmark's parts still work: its profile loads, its lean client reads answers and streams.

No timing is asserted; ``./dev bench gateway`` prints the numbers.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import httpx

from benchmarks import bench_gateway
from reconciler.loading import parse_profile
from reconciler.testing.ports import free_port
from tests.e2e_support import wait_until


def test_the_benchmark_profile_is_valid_and_routes_both_models():
    text = bench_gateway.PROFILE.format(warm=18001, cold=18002, delay=0.5)
    profile = parse_profile(text, "bench.yaml", environ={"RECONCILER_PYTHON": "/usr/bin/python3"})
    assert {name: spec.model for name, spec in profile.services.items()} == {"warm": "m", "cold": "c"}


def test_the_lean_client_counts_every_chunk_of_a_stream_and_reads_whole_answers():
    port = free_port()
    upstream = subprocess.Popen([sys.executable, "-m", "reconciler.testing.fake_openai", "--port", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(f"{url}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, timeout_s=15, what="the fake upstream answering")
        assert asyncio.run(bench_gateway._throughput(url, 300)) > 0  # raises unless all 300 chunks were read
        samples = asyncio.run(bench_gateway._latencies(url, 2, 10))
        assert len(samples) == 10 and all(s > 0 for s in samples)
        assert len(asyncio.run(bench_gateway._first_chunks(url, 3))) == 3
    finally:
        upstream.terminate()
        upstream.wait(10)
